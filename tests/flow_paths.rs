//! Flows stay inside their directory: a `script` or Trace `file` outside it is refused (on
//! disk and through the admin API) unless `[daemon] allowed_paths` lists its directory; a
//! trace file is private and a symbolic link swapped in for it later is not followed; a flow
//! is deployed over the API together with its scripts, and `flowbus flows deploy` sends them.
//! The API and CLI tests run the `flowbus` binary, with a token, as an operator would.
//!
//! The static refusals (`..`, absolute paths, a symbolic link leading out, names that are not
//! scripts) are cases under `tests/flow_errors/`; these are the ones that need a scene built
//! at run time or a running daemon.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{http_json, scratch};
use flowbus_runtime::config::Config;
use flowbus_runtime::harness::Harness;
use flowbus_runtime::{Body, Message};
use serde_json::{json, Value};

const SECRET: &str = "Hunter2Secret";

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// Timer → Compute (`script`) → Trace to the activity log.
fn echo_flow(name: &str, script: &str) -> String {
    json!({
        "name": name,
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": "50ms"},
            {"id": "echo", "type": "Compute", "script": script},
            {"id": "show", "type": "Trace", "pattern": "echo ${Root.Body.echo}"}
        ],
        "connections": [{"from": "tick.Out", "to": "echo"}, {"from": "echo.Out", "to": "show"}]
    })
    .to_string()
}

fn config_in(dir: &Path, text: &str) -> Config {
    let path = dir.join("flowbus.toml");
    write(&path, text);
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn a_script_outside_is_accepted_only_when_its_directory_is_allowed() {
    let dir = scratch("allowed");
    write(
        &dir.join("shared/echo.rhai"),
        "Root.Body.echo = \"shared\";",
    );
    let flow = dir.join("flows/echo.json");
    write(&flow, &echo_flow("echo", "../shared/echo.rhai"));
    let registry = flowbus_nodes::registry();

    let Err(e) = Harness::load_with(&flow, &registry, config_in(&dir, "")) else {
        panic!("a script outside the flow directory was accepted")
    };
    assert!(
        e.to_string().ends_with(
            "node 'echo': \"script\" '../shared/echo.rhai' must be inside the flow directory (after following symbolic links); to use a file elsewhere, list its directory in [daemon] allowed_paths"
        ),
        "{e}"
    );

    // Listed (relative to the configuration file), it is read and runs.
    let config = config_in(&dir, "[daemon]\nallowed_paths = [\"shared\"]\n");
    let h = Harness::load_with(&flow, &registry, config).unwrap_or_else(|e| panic!("{e}"));
    h.inject("tick", Message::new(Body::Json(json!({})))).await;
    let out = h.messages("echo.Out");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].root.body.to_value(), json!({"echo": "shared"}));

    // Another directory beside it stays out.
    write(&dir.join("other/echo.rhai"), "1");
    write(&flow, &echo_flow("echo", "../other/echo.rhai"));
    let config = config_in(&dir, "[daemon]\nallowed_paths = [\"shared\"]\n");
    assert!(Harness::load_with(&flow, &registry, config).is_err());
}

#[tokio::test]
async fn a_trace_file_is_private_and_a_link_swapped_in_later_is_not_followed() {
    let dir = scratch("trace-file");
    let flow = dir.join("flows/trace.json");
    write(
        &flow,
        &json!({
            "nodes": [
                {"id": "tick", "type": "Timer"},
                {"id": "log", "type": "Trace", "destination": "file", "file": "out/trace.log",
                 "pattern": "n=${Root.Body.n}"}
            ],
            "connections": [{"from": "tick.Out", "to": "log"}]
        })
        .to_string(),
    );
    std::fs::create_dir_all(dir.join("flows/out")).unwrap();
    let h = Harness::load(&flow, &flowbus_nodes::registry()).unwrap_or_else(|e| panic!("{e}"));
    h.inject("tick", Message::new(Body::Json(json!({"n": 1}))))
        .await;
    let trace = dir.join("flows/out/trace.log");
    assert_eq!(std::fs::read_to_string(&trace).unwrap(), "n=1\n");
    let mode = std::fs::metadata(&trace).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "created with mode {mode:o}");

    // The file is replaced by a link to a file outside after the flow was deployed.
    let outside = dir.join("authorized_keys");
    write(&outside, "ssh-ed25519 AAAA operator\n");
    std::fs::remove_file(&trace).unwrap();
    symlink(&outside, &trace).unwrap();
    h.inject("tick", Message::new(Body::Json(json!({"n": 2}))))
        .await;
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "ssh-ed25519 AAAA operator\n"
    );
    let discards = h.discards();
    assert_eq!(discards.len(), 1, "{discards:?}");
    assert!(
        discards[0].1.text.contains("cannot write the trace file"),
        "{:?}",
        discards[0].1
    );
}

// ---- the admin API of a running daemon ----

const TOKEN_VAR: &str = "FLOWBUS_PATHS_TOKEN";
const TOKEN: &str = "paths-test-token-5f1c";

/// `flowbus run` with a token (both it and `cli` get the variable) and a fast watcher.
fn daemon() -> common::Daemon {
    common::Daemon::spawn_with_env(
        &common::fast_config(&format!(
            "[admin]\ntoken_env = \"{TOKEN_VAR}\"\n[daemon]\nwatch_interval = \"50ms\"\nshutdown_timeout = \"5s\"\n"
        )),
        &[],
        &[(TOKEN_VAR, TOKEN)],
    )
}

/// The daemon binary, driven over its admin API.
struct App {
    d: common::Daemon,
    dir: PathBuf,
}

impl App {
    async fn start() -> App {
        let d = daemon();
        d.wait_api().await;
        let dir = d.dir.clone();
        App { d, dir }
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> (u16, Value) {
        let url = format!("{}{path}", self.d.admin_url());
        http_json(method, &url, body.as_deref(), Some(TOKEN))
    }

    fn put(&self, name: &str, body: String) -> (u16, Value) {
        self.call("PUT", &format!("/api/v1/flows/{name}"), Some(body))
    }

    fn flows_dir(&self) -> PathBuf {
        self.dir.join("flows")
    }

    fn entries(&self, query: &str) -> Vec<String> {
        let (status, v) = self.call("GET", &format!("/api/v1/activity-log?{query}"), None);
        assert_eq!(status, 200, "{v}");
        v["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Every activity-log message so far, and the daemon's own log lines.
    fn log(&self) -> Vec<String> {
        let mut all = self.entries("limit=10000");
        all.push(self.d.stderr());
        all
    }

    fn traces(&self, flow: &str) -> Vec<String> {
        self.entries(&format!("flow={flow}&number=BIP1003"))
    }

    /// The files under the flows directory, relative to it, sorted.
    fn files(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.flows_dir(), &self.flows_dir(), &mut out);
        out.sort();
        out
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The problem texts of a 400 answer.
fn details(v: &Value) -> Vec<String> {
    v["details"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_flows_are_refused_over_the_api_and_touch_nothing_outside() {
    let app = App::start().await;
    let outside = app.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret.conf");
    write(&secret, &format!("password = {SECRET}\n{SECRET}\n"));
    write(
        &outside.join("secret.rhai"),
        &format!("lookup_{SECRET}(1, 2"),
    );

    // Trace appending to a file elsewhere: by absolute path, and by `..`.
    for (file, shown) in [
        (
            outside.join("authorized_keys").display().to_string(),
            "authorized_keys",
        ),
        ("../outside/authorized_keys".to_string(), "../outside"),
    ] {
        let flow = json!({
            "nodes": [
                {"id": "tick", "type": "Timer", "interval": "50ms"},
                {"id": "keys", "type": "Trace", "destination": "file", "file": file,
                 "pattern": "ssh-ed25519 AAAA attacker"}
            ],
            "connections": [{"from": "tick.Out", "to": "keys"}]
        });
        let (status, v) = app.put("append", flow.to_string());
        assert_eq!(status, 400, "{v}");
        let d = &v["details"][0];
        assert_eq!(d["node"], "keys", "{v}");
        let message = d["message"].as_str().unwrap();
        assert!(
            message.starts_with("\"file\" '") && message.contains(shown),
            "{message}"
        );
        assert!(
            message.contains("must be inside the flow directory"),
            "{message}"
        );
    }

    // Compute reading a file elsewhere: not a script, or a script outside.
    let mut answers = Vec::new();
    for (script, rule) in [
        (
            secret.display().to_string(),
            "must name a Rhai script file ending in .rhai",
        ),
        (
            outside.join("secret.rhai").display().to_string(),
            "must be inside the flow directory",
        ),
        (
            "../outside/secret.rhai".to_string(),
            "must be inside the flow directory",
        ),
        (
            "/etc/shadow".to_string(),
            "must name a Rhai script file ending in .rhai",
        ),
    ] {
        let (status, v) = app.put("steal", echo_flow("steal", &script));
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["details"][0]["node"], "echo", "{v}");
        assert!(details(&v)[0].contains(rule), "{v}");
        answers.push(v.to_string());
    }

    // Nothing was written, in the flows directory or outside, and the secret is in no answer
    // and no log entry.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.files(), Vec::<String>::new());
    assert!(!outside.join("authorized_keys").exists());
    let log = app.log();
    for text in answers.iter().chain(&log) {
        assert!(!text.contains(SECRET), "the secret shows: {text}");
    }
    let (_, v) = app.call("GET", "/api/v1/flows", None);
    assert_eq!(v["flows"], json!([]), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_deployed_with_its_scripts_runs_them_and_is_not_redeployed() {
    let app = App::start().await;
    // The flow as a string, as the CLI sends it; a script in a directory that is not there yet.
    let body = json!({
        "flow": echo_flow("echo", "lib/echo.rhai"),
        "scripts": {"lib/echo.rhai": "Root.Body.echo = \"shipped\";"}
    });
    let (status, v) = app.put("echo", body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["deployed"]["version"], 1, "{v}");
    assert_eq!(app.files(), ["echo.json", "lib/echo.rhai"]);
    assert_eq!(
        std::fs::read_to_string(app.flows_dir().join("lib/echo.rhai")).unwrap(),
        "Root.Body.echo = \"shipped\";"
    );
    wait_for("the script's output", || {
        app.traces("echo").iter().any(|t| t == "echo shipped")
    })
    .await;

    // The watcher sees the files as they were deployed: no second deployment.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, v) = app.call("GET", "/api/v1/flows/echo", None);
    assert_eq!(
        (v["version"].as_u64(), v["state"].as_str()),
        (Some(1), Some("running"))
    );

    // A new version of the script, with the flow as an object this time.
    let body = json!({
        "flow": serde_json::from_str::<Value>(&echo_flow("echo", "lib/echo.rhai")).unwrap(),
        "scripts": {"lib/echo.rhai": "Root.Body.echo = \"second\";"}
    });
    let (status, v) = app.put("echo", body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["deployed"]["version"], 2, "{v}");
    wait_for("the new script's output", || {
        app.traces("echo").iter().any(|t| t == "echo second")
    })
    .await;

    // A plain flow document still deploys, and its script is read from the flow's directory.
    let (status, v) = app.put("plain", echo_flow("plain", "lib/echo.rhai"));
    assert_eq!(status, 200, "{v}");
    wait_for("the plain flow's output", || {
        app.traces("plain").iter().any(|t| t == "echo second")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_the_flow_does_not_name_or_that_lead_outside_are_refused_and_nothing_is_written() {
    let app = App::start().await;
    let cases = [
        // A script the flow does not name.
        (
            echo_flow("f", "echo.rhai"),
            json!({"echo.rhai": "1", "other.rhai": "1"}),
            "script 'other.rhai' is not named by any node of the flow",
        ),
        // Named, but outside the directory.
        (
            echo_flow("f", "../x.rhai"),
            json!({"../x.rhai": "1"}),
            "script '../x.rhai' must be a relative path of plain names ending in .rhai",
        ),
        (
            echo_flow("f", "/tmp/x.rhai"),
            json!({"/tmp/x.rhai": "1"}),
            "script '/tmp/x.rhai' must be a relative path of plain names ending in .rhai",
        ),
        // Not a script.
        (
            echo_flow("f", "x.json"),
            json!({"x.json": "{}"}),
            "script 'x.json' must be a relative path of plain names ending in .rhai",
        ),
    ];
    for (flow, scripts, says) in cases {
        let (status, v) = app.put("f", json!({"flow": flow, "scripts": scripts}).to_string());
        assert_eq!(status, 400, "{v}");
        assert!(
            details(&v).iter().any(|d| d.starts_with(says)),
            "{says}: {v}"
        );
    }
    // A script inside, through a link that leads out.
    std::fs::create_dir_all(app.dir.join("elsewhere")).unwrap();
    symlink(app.dir.join("elsewhere"), app.flows_dir().join("lib")).unwrap();
    let (status, v) = app.put(
        "f",
        json!({"flow": echo_flow("f", "lib/x.rhai"), "scripts": {"lib/x.rhai": "1"}}).to_string(),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        details(&v)[0].starts_with("script 'lib/x.rhai' must be inside the flow directory"),
        "{v}"
    );
    std::fs::remove_file(app.flows_dir().join("lib")).unwrap();
    // A flow that is invalid with its script: the script is not written either.
    let (status, v) = app.put(
        "f",
        json!({"flow": echo_flow("f", "echo.rhai"), "scripts": {"echo.rhai": "let x = ;"}})
            .to_string(),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        details(&v)[0].contains("Rhai compile error in echo.rhai at line 1, column 9"),
        "{v}"
    );
    // Bodies that are not a flow with scripts.
    for (body, says) in [
        (json!({"flow": 3}), "\"flow\" must be the flow"),
        (
            json!({"flow": echo_flow("f", "echo.rhai"), "scripts": ["echo.rhai"]}),
            "\"scripts\" must be an object",
        ),
        (
            json!({"flow": echo_flow("f", "echo.rhai"), "scripts": {"echo.rhai": 1}}),
            "the value of 'echo.rhai' must be the script's text",
        ),
        (
            json!({"flow": echo_flow("f", "echo.rhai"), "script": {}}),
            "unknown key 'script'",
        ),
    ] {
        let (status, v) = app.put("f", body.to_string());
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{says}: {v}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.files(), Vec::<String>::new());
    assert!(!app.dir.join("x.rhai").exists());
    assert_eq!(
        std::fs::read_dir(app.dir.join("elsewhere"))
            .unwrap()
            .count(),
        0
    );
}

// ---- the CLI against a daemon ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_deploy_ships_the_scripts_of_a_flow_kept_elsewhere() {
    let d = daemon();
    d.wait_api().await;
    write(
        &d.dir.join("elsewhere/echo.json"),
        &echo_flow("echo", "echo.rhai"),
    );
    write(
        &d.dir.join("elsewhere/echo.rhai"),
        "Root.Body.echo = \"from elsewhere\";",
    );
    let validate = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args(["validate", "elsewhere/echo.json"])
        .current_dir(&d.dir)
        .output()
        .unwrap();
    assert!(validate.status.success(), "{validate:?}");

    let (code, out, err) = d.cli(&["flows", "deploy", "elsewhere/echo.json"]);
    assert_eq!(code, 0, "{out}{err}\ndaemon log:\n{}", d.stderr());
    assert!(
        out.starts_with("deployed flow 'echo' (version 1, running) to "),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(d.dir.join("flows/echo.rhai")).unwrap(),
        "Root.Body.echo = \"from elsewhere\";"
    );
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = d.cli(&["log", "--flow", "echo", "--number", "BIP1003"]);
        if code == 0 && out.contains("echo from elsewhere") {
            break;
        }
        assert!(
            Instant::now() < until,
            "no trace of the script (exit {code}):\n{out}{err}\ndaemon log:\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A copy of the flow without its script: the daemon's own copy is used.
    write(
        &d.dir.join("copy/echo.json"),
        &echo_flow("echo", "echo.rhai"),
    );
    let (code, out, err) = d.cli(&["flows", "deploy", "copy/echo.json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("deployed flow 'echo' (version 2, running)"),
        "{out}"
    );
    assert!(
        err.contains("no script") && err.contains("its own copy"),
        "{err}"
    );

    // A script path that leaves the flow's directory is refused before anything is sent.
    write(
        &d.dir.join("elsewhere/up.json"),
        &echo_flow("up", "../echo.rhai"),
    );
    let (code, out, err) = d.cli(&["flows", "deploy", "elsewhere/up.json"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("node 'echo': \"script\" '../echo.rhai' must be a path relative to the flow file, inside its directory"),
        "{err}"
    );
    let (_, out, _) = d.cli(&["flows", "list"]);
    assert!(!out.contains("up"), "{out}");
}
