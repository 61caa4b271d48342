//! Flows stay inside their directory: a `script` or Trace `file` outside it is refused unless
//! `[daemon] allowed_paths` lists its directory; a trace file is private and a symbolic link
//! swapped in for it later is not followed.
//!
//! The static refusals (`..`, absolute paths, a symbolic link leading out, names that are not
//! scripts) are cases under `tests/flow_errors/`; these are the ones that need a scene built
//! at run time or a running daemon.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::scratch;
use flowbus_runtime::config::Config;
use flowbus_runtime::harness::Harness;
use flowbus_runtime::{Body, Message};
use serde_json::json;

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
