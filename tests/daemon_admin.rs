//! The daemon and its admin API in-process, without a broker (Timer flows): deploy, list,
//! start, stop and remove over HTTP; refusals that change nothing; the bearer token; one
//! failure domain per flow (a node kind that panics, registered only here); hot deploy by the
//! file watcher; statistics, `/metrics` and the live event stream.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, http_json, scratch};
use flowbus_runtime::admin;
use flowbus_runtime::config::Config;
use flowbus_runtime::daemon::Daemon;
use flowbus_runtime::engine::{CancellationToken, Outputs};
use flowbus_runtime::message::Message;
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, Registry,
};
use flowbus_runtime::services::Services;
use serde_json::{json, Value};

/// A node kind that panics on its `n`-th message: the only honest way to make a node panic,
/// so it exists only in this test's registry.
struct ExplodeKind;

static EXPLODE: NodeSpec = NodeSpec {
    type_name: "Explode",
    inputs: &["In"],
    outputs: &["Out"],
    props: &[],
};

impl NodeKind for ExplodeKind {
    fn spec(&self) -> &'static NodeSpec {
        &EXPLODE
    }

    fn build(&self, _node: &NodeDecl, _ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        Ok(BuiltNode::Processing(Arc::new(Explode)))
    }
}

struct Explode;

impl ProcessingNode for Explode {
    fn process<'a>(
        &'a self,
        msg: Message,
        out: Outputs<'a>,
    ) -> BoxFut<'a, Result<(), NodeFailure>> {
        Box::pin(async move {
            let n = msg
                .trees_json()
                .pointer("/LocalEnvironment/Timer/Input/Count")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if n >= 3 {
                panic!("explode node blew up on message {n}");
            }
            out.propagate("Out", msg).await?;
            Ok(())
        })
    }
}

fn registry() -> Registry {
    let mut r = flowbus_nodes::registry();
    r.register(ExplodeKind);
    r
}

/// A Timer flow whose Trace writes `v<version> #<count>` to the activity log.
fn timer_flow(name: &str, version: u32, interval: &str) -> String {
    json!({
        "name": name,
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": interval, "payload": {"v": version}},
            {"id": "show", "type": "Trace", "pattern": "v${Root.Body.v} #${LocalEnvironment.Timer.Input.Count}"}
        ],
        "connections": [{"from": "tick.Out", "to": "show"}]
    })
    .to_string()
}

struct App {
    daemon: Daemon,
    url: String,
    dir: PathBuf,
    stop: CancellationToken,
}

impl App {
    async fn start(flows: &[(&str, &str)], token: Option<&str>) -> App {
        let dir = scratch("admin");
        std::fs::create_dir_all(dir.join("flows")).unwrap();
        for (name, text) in flows {
            std::fs::write(dir.join("flows").join(name), text).unwrap();
        }
        let cfg_path = dir.join("flowbus.toml");
        let text = "data_dir = \"data\"\nflows = [\"flows\"]\n[daemon]\nwatch_interval = \"50ms\"\nshutdown_timeout = \"5s\"\n[servers.plant]\nurl = \"tcp://127.0.0.1:1\"\nusername = \"gw\"\npassword_env = \"ADMIN_TEST_PLANT_PASSWORD\"\n";
        std::fs::write(&cfg_path, text).unwrap();
        let config = Config::load(&cfg_path).unwrap();
        let services = Arc::new(Services::open(&config).unwrap());
        let daemon = Daemon::with_services(config, registry(), services);
        let failed = daemon.start_all().await;
        assert!(failed.is_empty(), "{failed:?}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let auth = token.map_or(admin::Auth::None, admin::Auth::token);
        let router = admin::router(daemon.clone(), admin::Options::with_auth(auth));
        let s = stop.clone();
        tokio::spawn(admin::serve(
            listener,
            router,
            admin::Limits::default(),
            async move { s.cancelled().await },
        ));
        let d = daemon.clone();
        tokio::spawn(async move { d.watch().await });
        App {
            daemon,
            url,
            dir,
            stop,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_as(method, path, body, None).await
    }

    async fn call_as(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let (m, url) = (method.to_string(), format!("{}{path}", self.url));
        let (body, token) = (body.map(str::to_string), token.map(str::to_string));
        tokio::task::spawn_blocking(move || http_json(&m, &url, body.as_deref(), token.as_deref()))
            .await
            .unwrap()
    }

    async fn text(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let url = format!("{}{path}", self.url);
        let token = token.map(str::to_string);
        tokio::task::spawn_blocking(move || http("GET", &url, None, token.as_deref()))
            .await
            .unwrap()
    }

    fn flows_dir(&self) -> PathBuf {
        self.dir.join("flows")
    }

    /// The Trace lines of a flow, oldest first.
    fn traces(&self, flow: &str) -> Vec<String> {
        self.daemon
            .services()
            .activity
            .query(&flowbus_runtime::activity::Filter {
                flow: Some(flow.into()),
                number: Some("BIP1003".into()),
                ..Default::default()
            })
            .iter()
            .map(|e| e.message.clone())
            .collect()
    }

    async fn state(&self, flow: &str) -> String {
        let (_, v) = self
            .call("GET", &format!("/api/v1/flows/{flow}"), None)
            .await;
        v["state"].as_str().unwrap_or("absent").to_string()
    }

    async fn shutdown(self) {
        self.daemon.shutdown(Duration::from_secs(5)).await;
        self.stop.cancel();
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_deploys_lists_starts_stops_and_removes_flows() {
    let app = App::start(&[("a.json", &timer_flow("a", 1, "50ms"))], None).await;
    let (status, v) = app.call("GET", "/api/v1/flows", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["flows"][0]["name"], "a");
    assert_eq!(v["flows"][0]["state"], "running");
    assert_eq!(v["flows"][0]["nodes"], 2);

    // Deploy a new flow: written to the flows directory and started.
    let (status, v) = app
        .call("PUT", "/api/v1/flows/b", Some(&timer_flow("b", 7, "50ms")))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["deployed"]["state"], "running");
    assert_eq!(v["deployed"]["version"], 1);
    assert!(app.flows_dir().join("b.json").is_file());
    wait_for("b's traces", Duration::from_secs(5), || {
        !app.traces("b").is_empty()
    })
    .await;
    assert!(
        app.traces("b")[0].starts_with("v7 #1"),
        "{:?}",
        app.traces("b")
    );

    // The definition comes back; statistics count what went through.
    let (status, v) = app.call("GET", "/api/v1/flows/b", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["definition"]["nodes"][0]["payload"]["v"], 7);
    let show = v["statistics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "show")
        .unwrap();
    assert!(show["invocations"].as_u64().unwrap() >= 1, "{show}");

    // Stop: no more traces; start: they come again.
    let (status, v) = app.call("POST", "/api/v1/flows/b/stop", None).await;
    assert_eq!(
        (status, v["flow"]["state"].as_str()),
        (200, Some("stopped"))
    );
    let n = app.traces("b").len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.traces("b").len(), n, "a stopped flow produced messages");
    // Stopping again changes nothing.
    let (status, _) = app.call("POST", "/api/v1/flows/b/stop", None).await;
    assert_eq!(status, 200);
    let (status, v) = app.call("POST", "/api/v1/flows/b/start", None).await;
    assert_eq!(
        (status, v["flow"]["state"].as_str()),
        (200, Some("running"))
    );
    wait_for("b to run again", Duration::from_secs(5), || {
        app.traces("b").len() > n
    })
    .await;

    // A stopped flow that is redeployed stays stopped.
    app.call("POST", "/api/v1/flows/a/stop", None).await;
    let (status, v) = app
        .call("PUT", "/api/v1/flows/a", Some(&timer_flow("a", 2, "50ms")))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["deployed"]["state"], "stopped");
    assert_eq!(v["deployed"]["version"], 2);

    // Remove: gone from the list, file moved aside, and the watcher does not bring it back.
    let (status, v) = app.call("DELETE", "/api/v1/flows/b", None).await;
    assert_eq!((status, v["removed"].as_str()), (200, Some("b")));
    assert!(!app.flows_dir().join("b.json").exists());
    let removed = std::fs::read_dir(app.dir.join("data/removed"))
        .unwrap()
        .count();
    assert_eq!(removed, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.state("b").await, "absent");
    let (_, v) = app.call("GET", "/api/v1/flows", None).await;
    assert_eq!(v["flows"].as_array().unwrap().len(), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_deploy_is_refused_with_positions_and_changes_nothing() {
    let app = App::start(&[("a.json", &timer_flow("a", 1, "50ms"))], None).await;
    let before = std::fs::read_to_string(app.flows_dir().join("a.json")).unwrap();
    let bad = r#"{
  "name": "a",
  "nodes": [
    { "id": "tick", "type": "Timer", "interval": "50ms" },
    { "id": "calc", "type": "Compute", "code": "let x = ;" },
    { "id": "pub", "type": "MQTTPublish", "server": "nowhere", "topic": "t", "qos": 3 }
  ],
  "connections": [ { "from": "tick.Out", "to": "calc" }, { "from": "tick.Oops", "to": "pub" } ]
}"#;
    let (status, v) = app.call("PUT", "/api/v1/flows/a", Some(bad)).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("the flow is invalid and was not deployed"),
        "{v}"
    );
    let details = v["details"].as_array().unwrap();
    let text: Vec<&str> = details
        .iter()
        .map(|d| d["text"].as_str().unwrap())
        .collect();
    assert!(details.len() >= 4, "{text:#?}");
    // Each problem with its line and column.
    let qos = details
        .iter()
        .find(|d| d["message"].as_str().unwrap().contains("qos"))
        .unwrap_or_else(|| panic!("{text:#?}"));
    assert_eq!(
        (qos["line"].as_u64(), qos["node"].as_str()),
        (Some(6), Some("pub"))
    );
    assert!(
        text.iter().any(|t| t.contains("unknown server 'nowhere'")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|t| t.contains("Rhai compile error")),
        "{text:#?}"
    );
    assert!(text.iter().any(|t| t.contains("'Oops'")), "{text:#?}");

    // Nothing changed: same file, same version, still running, still producing v1.
    assert_eq!(
        std::fs::read_to_string(app.flows_dir().join("a.json")).unwrap(),
        before
    );
    let (_, v) = app.call("GET", "/api/v1/flows/a", None).await;
    assert_eq!(
        (v["state"].as_str(), v["version"].as_u64()),
        (Some("running"), Some(1))
    );
    let n = app.traces("a").len();
    wait_for("a to go on", Duration::from_secs(5), || {
        app.traces("a").len() > n + 2
    })
    .await;
    assert!(app.traces("a").iter().all(|t| t.starts_with("v1 ")));

    // Malformed JSON too, with its position.
    let (status, v) = app
        .call("PUT", "/api/v1/flows/a", Some("{\n  \"nodes\": [,]\n}"))
        .await;
    assert_eq!(status, 400);
    assert_eq!(v["details"][0]["line"], 2, "{v}");
    assert!(v["details"][0]["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    // And a new flow that is invalid leaves no file behind.
    let (status, _) = app
        .call("PUT", "/api/v1/flows/new", Some("{\"nodes\": []}"))
        .await;
    assert_eq!(status, 400);
    assert!(!app.flows_dir().join("new.json").exists());
    assert_eq!(app.state("new").await, "absent");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_that_say_what_is_wrong() {
    let app = App::start(&[("a.json", &timer_flow("a", 1, "1s"))], None).await;
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "GET",
            "/api/v1/flows/nope",
            None,
            404,
            "no flow named 'nope' (flows: a)",
        ),
        (
            "POST",
            "/api/v1/flows/nope/start",
            None,
            404,
            "no flow named 'nope'",
        ),
        (
            "DELETE",
            "/api/v1/flows/nope",
            None,
            404,
            "no flow named 'nope'",
        ),
        (
            "GET",
            "/api/v1/activity-log?severity=loud",
            None,
            400,
            "severity 'loud' is not one of info, warning, error",
        ),
        (
            "GET",
            "/api/v1/activity-log?limit=lots",
            None,
            400,
            "bad query parameters",
        ),
        (
            "GET",
            "/api/v1/activity-log?limit=0",
            None,
            400,
            "limit must be from 1 to 10000",
        ),
        (
            "GET",
            "/api/v1/activity-log?colour=red",
            None,
            400,
            "unknown field `colour`",
        ),
        (
            "GET",
            "/api/v1/activity-log?since=yesterday",
            None,
            400,
            "since 'yesterday' is neither",
        ),
        (
            "GET",
            "/api/v1/activity-log/stream?severity=x",
            None,
            400,
            "severity 'x'",
        ),
        (
            "PUT",
            "/api/v1/flows/b",
            Some(""),
            400,
            "the request body is empty",
        ),
        (
            "PUT",
            "/api/v1/flows/b",
            Some(&timer_flow("c", 1, "1s")),
            409,
            "named 'c' but the request is for 'b'",
        ),
        (
            "PUT",
            "/api/v1/flows/..x",
            Some(&timer_flow("..x", 1, "1s")),
            409,
            "not a usable flow name",
        ),
        ("GET", "/api/v1/nothing", None, 404, "no such endpoint"),
        (
            "POST",
            "/api/v1/flows",
            None,
            405,
            "does not take that method",
        ),
    ];
    for (method, path, body, want, says) in cases {
        let (status, v) = app.call(method, path, *body).await;
        let error = v["error"].as_str().unwrap_or_default();
        assert_eq!(status, *want, "{method} {path}: {v}");
        assert!(error.contains(says), "{method} {path}: {error}");
    }
    // A body over the limit gets a JSON 413 after the server has read it, never a reset
    // connection (the client writes the whole body before it reads; a few times, since
    // without the read it is a race).
    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(3 << 20));
    for _ in 0..10 {
        let (status, v) = app.call("PUT", "/api/v1/flows/b", Some(&huge)).await;
        assert_eq!(status, 413, "{v}");
        let error = v["error"].as_str().unwrap();
        assert!(
            error.contains("over the length limit of 2097152 bytes"),
            "{v}"
        );
    }
    // None of it changed anything.
    let (_, v) = app.call("GET", "/api/v1/flows", None).await;
    assert_eq!(v["flows"].as_array().unwrap().len(), 1);
    assert_eq!(v["flows"][0]["version"], 1);
    let files = std::fs::read_dir(app.flows_dir()).unwrap().count();
    assert_eq!(files, 1);
    // A good query works, with filters.
    let (status, v) = app
        .call(
            "GET",
            "/api/v1/activity-log?flow=a&number=1001&severity=info&since=1h&limit=5",
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["entries"][0]["number"], "BIP1001");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_every_endpoint_but_healthz_and_secrets_never_show() {
    let token = "tok-7f3a9c1e55d04b2a";
    let password = "pw-f00dfacecafe";
    std::env::set_var("ADMIN_TEST_PLANT_PASSWORD", password);
    let flow = json!({
        "name": "creds",
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": "1s"},
            {"id": "out", "type": "MQTTPublish", "server": "plant", "topic": "t", "qos": 0},
            {"id": "out2", "type": "MQTTPublish", "url": format!("tcp://user:{password}@127.0.0.1:1"), "topic": "t", "qos": 0}
        ],
        "connections": [{"from": "tick.Out", "to": "out"}, {"from": "tick.Out", "to": "out2"}]
    })
    .to_string();
    let app = App::start(
        &[("a.json", &timer_flow("a", 1, "1s")), ("creds.json", &flow)],
        Some(token),
    )
    .await;
    let paths = [
        ("GET", "/api/v1/flows"),
        ("GET", "/api/v1/flows/a"),
        ("PUT", "/api/v1/flows/a"),
        ("DELETE", "/api/v1/flows/a"),
        ("POST", "/api/v1/flows/a/stop"),
        ("POST", "/api/v1/flows/a/start"),
        ("GET", "/api/v1/activity-log"),
        ("GET", "/api/v1/activity-log/stream"),
        ("GET", "/api/v1/statistics"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/unknown"),
    ];
    for (method, path) in paths {
        for bad in [None, Some("wrong"), Some("tok-7f3a9c1e55d04b2")] {
            let (status, v) = app
                .call_as(method, path, Some(&timer_flow("a", 9, "1s")), bad)
                .await;
            assert_eq!(status, 401, "{method} {path} with {bad:?}: {v}");
            assert!(v["error"].as_str().unwrap().contains("token"), "{v}");
        }
    }
    // Nothing was changed by the refused requests.
    assert_eq!(
        app.state("a").await,
        "absent",
        "without the token nothing is visible"
    );
    let (status, v) = app
        .call_as("GET", "/api/v1/flows/a", None, Some(token))
        .await;
    assert_eq!(
        (status, v["state"].as_str(), v["version"].as_u64()),
        (200, Some("running"), Some(1))
    );
    let (status, v) = app.call("GET", "/healthz", None).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));

    // With the token, everything answers, and no answer holds the password or the token.
    wait_for("a connection attempt", Duration::from_secs(10), || {
        !app.daemon
            .services()
            .activity
            .query(&flowbus_runtime::activity::Filter {
                number: Some("BIP12096".into()),
                ..Default::default()
            })
            .is_empty()
    })
    .await;
    let mut seen = String::new();
    for path in [
        "/api/v1/flows",
        "/api/v1/flows/creds",
        "/api/v1/activity-log?limit=10000",
        "/api/v1/statistics",
        "/metrics",
    ] {
        let (status, body) = app.text(path, Some(token)).await;
        assert_eq!(status, 200, "{path}: {body}");
        seen.push_str(&body);
    }
    assert!(
        seen.contains("tcp://***@127.0.0.1:1"),
        "the inline URL is shown redacted"
    );
    assert!(!seen.contains(password) && !seen.contains(token));
    let files: String = std::fs::read_dir(app.dir.join("data/activity-log"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(files.contains("BIP12096"));
    assert!(!files.contains(password) && !files.contains(token));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_node_stops_only_its_flow() {
    let bomb = json!({
        "name": "bomb",
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": "30ms"},
            {"id": "boom", "type": "Explode"},
            {"id": "show", "type": "Trace", "pattern": "survived ${LocalEnvironment.Timer.Input.Count}"}
        ],
        "connections": [{"from": "tick.Out", "to": "boom"}, {"from": "boom.Out", "to": "show"}]
    })
    .to_string();
    let app = App::start(
        &[
            ("bomb.json", &bomb),
            ("steady.json", &timer_flow("steady", 1, "30ms")),
        ],
        None,
    )
    .await;
    let until = Instant::now() + Duration::from_secs(10);
    while app.state("bomb").await != "failed" {
        assert!(Instant::now() < until, "the flow did not fail");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, list) = app.call("GET", "/api/v1/flows", None).await;
    let bomb = list["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "bomb")
        .unwrap();
    let reason = bomb["reason"].as_str().unwrap();
    assert!(
        reason.contains("node 'boom' panicked: explode node blew up on message 3")
            && reason.contains("bomb.boom"),
        "{reason}"
    );
    // Logged as the flow's failure, and it was stopped (its inputs ended, BIP1002).
    let entries = app
        .daemon
        .services()
        .activity
        .query(&flowbus_runtime::activity::Filter {
            flow: Some("bomb".into()),
            ..Default::default()
        });
    let failed = entries
        .iter()
        .find(|e| e.number == "BIP1007")
        .expect("BIP1007");
    assert_eq!(failed.severity, flowbus_runtime::activity::Severity::Error);
    assert!(failed.message.contains("explode node blew up"));
    assert!(entries
        .iter()
        .any(|e| e.number == "BIP1002" && e.seq > failed.seq));
    // Exactly the two messages before the panic got through.
    assert_eq!(app.traces("bomb"), ["survived 1", "survived 2"]);
    // The other flow and the daemon go on.
    let n = app.traces("steady").len();
    wait_for("steady to go on", Duration::from_secs(5), || {
        app.traces("steady").len() > n + 3
    })
    .await;
    assert_eq!(app.state("steady").await, "running");
    let (status, _) = app.call("GET", "/api/v1/statistics", None).await;
    assert_eq!(status, 200);
    // The failed flow can be started again (and fails again the same way).
    let (status, v) = app.call("POST", "/api/v1/flows/bomb/start", None).await;
    assert_eq!(
        (status, v["flow"]["state"].as_str()),
        (200, Some("running"))
    );
    let until = Instant::now() + Duration::from_secs(10);
    while app.state("bomb").await != "failed" {
        assert!(
            Instant::now() < until,
            "the restarted flow did not fail again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.shutdown().await;
}

fn write(path: &Path, text: &str) {
    // Write then rename, as editors do, so the watcher never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_redeploys_changed_files_keeps_the_old_on_invalid_and_stops_removed() {
    let app = App::start(
        &[
            ("a.json", &timer_flow("a", 1, "40ms")),
            ("other.json", &timer_flow("other", 1, "40ms")),
        ],
        None,
    )
    .await;
    wait_for("v1", Duration::from_secs(5), || !app.traces("a").is_empty()).await;

    // A changed file: only that flow is redeployed; the old version stops before the new
    // starts, so no v1 line comes after the first v2 line.
    write(&app.flows_dir().join("a.json"), &timer_flow("a", 2, "40ms"));
    wait_for("v2", Duration::from_secs(5), || {
        app.traces("a").iter().any(|t| t.starts_with("v2"))
    })
    .await;
    let traces = app.traces("a");
    let first_v2 = traces.iter().position(|t| t.starts_with("v2")).unwrap();
    assert!(
        traces[first_v2..].iter().all(|t| t.starts_with("v2")),
        "{traces:?}"
    );
    // A new version starts counting again.
    assert_eq!(traces[first_v2], "v2 #1");
    let (_, v) = app.call("GET", "/api/v1/flows/a", None).await;
    assert_eq!(v["version"], 2);
    let (_, v) = app.call("GET", "/api/v1/flows/other", None).await;
    assert_eq!(v["version"], 1, "the other flow was left alone");

    // An invalid version: logged with the reason; the old one keeps running.
    write(&app.flows_dir().join("a.json"), "{\n  \"name\": \"a\",\n  \"nodes\": [ { \"id\": \"t\", \"type\": \"Timer\", \"interval\": \"0s\" } ]\n}");
    let invalid = |app: &App| {
        app.daemon
            .services()
            .activity
            .query(&flowbus_runtime::activity::Filter {
                flow: Some("a".into()),
                number: Some("BIP1004".into()),
                ..Default::default()
            })
    };
    wait_for("BIP1004", Duration::from_secs(5), || {
        !invalid(&app).is_empty()
    })
    .await;
    let e = &invalid(&app)[0];
    assert!(
        e.message.contains("the running version keeps running"),
        "{}",
        e.message
    );
    assert!(e.message.contains("a.json:3:"), "{}", e.message);
    assert!(
        e.message.contains("must be longer than zero"),
        "{}",
        e.message
    );
    let (_, v) = app.call("GET", "/api/v1/flows/a", None).await;
    assert_eq!(
        (v["state"].as_str(), v["version"].as_u64()),
        (Some("running"), Some(2))
    );
    assert!(v["rejected"]
        .as_str()
        .unwrap()
        .contains("must be longer than zero"));
    let n = app.traces("a").len();
    wait_for("v2 to go on", Duration::from_secs(5), || {
        app.traces("a").len() > n + 2
    })
    .await;
    // Logged once, not on every check.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(invalid(&app).len(), 1);

    // A flow that uses a script file is redeployed when the script changes.
    std::fs::write(app.flows_dir().join("s.rhai"), "Root.Body.v = 10;").unwrap();
    let scripted = json!({
        "name": "s",
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": "40ms"},
            {"id": "calc", "type": "Compute", "script": "s.rhai"},
            {"id": "show", "type": "Trace", "pattern": "v${Root.Body.v}"}
        ],
        "connections": [{"from": "tick.Out", "to": "calc"}, {"from": "calc.Out", "to": "show"}]
    })
    .to_string();
    write(&app.flows_dir().join("s.json"), &scripted);
    wait_for("v10", Duration::from_secs(5), || {
        app.traces("s").iter().any(|t| t == "v10")
    })
    .await;
    std::fs::write(app.flows_dir().join("s.rhai"), "Root.Body.v = 11;").unwrap();
    wait_for("v11", Duration::from_secs(5), || {
        app.traces("s").iter().any(|t| t == "v11")
    })
    .await;

    // A flow renamed inside its file: the old name stops, the new one runs.
    write(
        &app.flows_dir().join("s.json"),
        &scripted.replace("\"name\":\"s\"", "\"name\":\"s2\""),
    );
    let until = Instant::now() + Duration::from_secs(5);
    while app.state("s").await != "absent" || app.state("s2").await != "running" {
        assert!(Instant::now() < until, "s was not renamed to s2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = app.traces("s").len();
    wait_for("s2 to run", Duration::from_secs(5), || {
        !app.traces("s2").is_empty()
    })
    .await;
    assert_eq!(app.traces("s").len(), n, "the old name went on");

    // A removed file stops and removes its flow.
    std::fs::remove_file(app.flows_dir().join("a.json")).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while app.state("a").await != "absent" {
        assert!(Instant::now() < until, "a was not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = app.traces("a").len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.traces("a").len(), n, "a removed flow went on");
    assert_eq!(app.state("other").await, "running");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_and_metrics_expose_node_counters_and_processing_time() {
    let app = App::start(&[("a.json", &timer_flow("a", 1, "20ms"))], None).await;
    wait_for("traffic", Duration::from_secs(5), || {
        app.traces("a").len() >= 5
    })
    .await;
    let (status, v) = app.call("GET", "/api/v1/statistics", None).await;
    assert_eq!(status, 200);
    let show = v["flows"]["a"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "show")
        .unwrap()
        .clone();
    let calls = show["invocations"].as_u64().unwrap();
    assert!(calls >= 5);
    assert!(show["processing"]["count"].as_u64().unwrap() >= 5, "{show}");
    let (status, text) = app.text("/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE flowbus_node_messages_total counter"),
        "{text}"
    );
    let tick_out = text
        .lines()
        .find(|l| {
            l.starts_with("flowbus_node_messages_total{flow=\"a\",node=\"tick\",terminal=\"Out\"}")
        })
        .unwrap_or_else(|| panic!("{text}"));
    let n: u64 = tick_out.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= calls, "{tick_out} vs {calls}");
    assert!(text.contains("# TYPE flowbus_node_processing_seconds histogram"));
    assert!(text
        .contains("flowbus_node_processing_seconds_bucket{flow=\"a\",node=\"show\",le=\"+Inf\"}"));
    assert!(text.contains("flowbus_flow_up{flow=\"a\"} 1"));
    assert!(text.contains("flowbus_flows{state=\"running\"} 1"));
    assert!(text.contains("flowbus_activity_log_entries_total{severity=\"info\"}"));
    // A removed flow leaves no series behind.
    app.call("DELETE", "/api/v1/flows/a", None).await;
    let (_, text) = app.text("/metrics", None).await;
    assert!(!text.contains("flow=\"a\""), "{text}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_sends_new_entries_as_they_happen() {
    let app = App::start(&[("a.json", &timer_flow("a", 1, "1h"))], None).await;
    let addr = app.url.trim_start_matches("http://").to_string();
    let reader = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /api/v1/activity-log/stream?flow=b&number=BIP1005 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .unwrap();
        let mut lines = Vec::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            let done = line.starts_with("data:");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    // Once the stream is open, deploy b: its BIP1005 entry must arrive on the stream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = app
        .call("PUT", "/api/v1/flows/b", Some(&timer_flow("b", 1, "1h")))
        .await;
    assert_eq!(status, 200);
    let lines = reader.await.unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("content-type: text/event-stream")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "event: entry"), "{lines:?}");
    let data = lines.last().unwrap().trim_start_matches("data:").trim();
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (e["number"].as_str(), e["flow"].as_str()),
        (Some("BIP1005"), Some("b"))
    );
    assert!(e["message"].as_str().unwrap().contains("flow 'b' deployed"));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failing_messages_is_summarised_not_written_one_by_one() {
    let flood = json!({
        "name": "flood",
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": "1ms", "count": 2000},
            {"id": "boom", "type": "Throw", "number": 3001, "text": "nope"},
            // Keeps the flow running after the flood, so no stop flushes the last summary.
            {"id": "idle", "type": "Timer", "interval": "1h"}
        ],
        "connections": [{"from": "tick.Out", "to": "boom"}]
    })
    .to_string();
    let app = App::start(&[("flood.json", &flood)], None).await;
    let discards = || {
        app.daemon.stats().flows["flood"]
            .iter()
            .find(|n| n.node == "tick")
            .map_or(0, |n| n.discards)
    };
    wait_for("2000 discards", Duration::from_secs(30), || {
        discards() == 2000
    })
    .await;
    // Every message is counted...
    let (_, text) = app.text("/metrics", None).await;
    assert!(
        text.contains("flowbus_node_discards_total{flow=\"flood\",node=\"tick\"} 2000"),
        "{text}"
    );
    // ...and in the log, one by one or in a summary, once the second it happened in is over
    // (even the last one: no further error comes to trigger its summary).
    let accounted = || {
        let file = std::fs::read_to_string(app.dir.join("data/activity-log/activity.jsonl"))
            .unwrap_or_default();
        file.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["flow"] == "flood")
            .map(|e| match e["number"].as_str() {
                Some("BIP2628") => 1,
                Some("BIP2632") => e["message"]
                    .as_str()
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap(),
                _ => 0u64,
            })
            .sum::<u64>()
    };
    wait_for(
        "every discard accounted for in the log",
        Duration::from_secs(5),
        || accounted() == 2000,
    )
    .await;
    // The log (memory and file) holds a few entries a second and summaries.
    let file = std::fs::read_to_string(app.dir.join("data/activity-log/activity.jsonl")).unwrap();
    let entries: Vec<Value> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &Value| e["flow"] == "flood")
        .collect();
    let one_by_one = entries.iter().filter(|e| e["number"] == "BIP2628").count();
    let summaries: Vec<&Value> = entries
        .iter()
        .filter(|e| e["number"] == "BIP2632")
        .collect();
    assert!(
        (10..200).contains(&one_by_one),
        "{one_by_one} discards logged one by one"
    );
    assert!(!summaries.is_empty());
    assert!(summaries[0]["message"]
        .as_str()
        .unwrap()
        .contains("further error entries of node 'tick'"));
    // The flow's start is still in memory, however many message entries came after it.
    let started = app
        .daemon
        .services()
        .activity
        .query(&flowbus_runtime::activity::Filter {
            flow: Some("flood".into()),
            number: Some("BIP1001".into()),
            ..Default::default()
        });
    assert_eq!(started.len(), 1);
    app.shutdown().await;
}
