//! The examples are part of the documentation, so they are tested like code:
//!
//! - every `examples/**/*.json` flow validates and builds (with the `flowbus.toml` next to it,
//!   when there is one);
//! - the Rhai cookbook and error-handling flows produce what their READMEs and `docs/rhai.md`
//!   say, run through the test harness with the message their Timer would produce (the
//!   dead-letter example against a private mosquitto);
//! - every Rhai example in `docs/rhai.md` is one of the cookbook's scripts or expressions, so
//!   the doc cannot show code that is not tested here.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flowbus_runtime::activity::Severity;
use flowbus_runtime::config::Config;
use flowbus_runtime::flow::load_flow;
use flowbus_runtime::harness::Harness;
use flowbus_runtime::services::Services;
use flowbus_runtime::{Body, Disposition, Message};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cookbook(name: &str) -> PathBuf {
    root().join("examples/rhai-cookbook").join(name)
}

fn error_handling(name: &str) -> PathBuf {
    root().join("examples/error-handling").join(name)
}

fn files_under(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_under(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

fn load(path: &Path) -> Harness {
    Harness::load(path, &flowbus_nodes::registry())
        .unwrap_or_else(|e| panic!("{} does not load:\n{e}", path.display()))
}

/// The message the flow's Timer node `node` produces the `count`-th time.
fn timer_message(flow: &Path, node: &str, count: u64) -> Message {
    let text = std::fs::read_to_string(flow).expect("flow file");
    let v: Value = serde_json::from_str(&text).expect("flow JSON");
    let decl = v["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["id"] == node))
        .unwrap_or_else(|| panic!("no node '{node}' in {}", flow.display()));
    assert_eq!(decl["type"], "Timer", "'{node}' is not a Timer");
    let mut m = Message::new(Body::Json(decl["payload"].clone()));
    m.set_local(&["Timer", "Input", "Count"], json!(count));
    m
}

fn with_body(body: Value) -> Message {
    let mut m = Message::new(Body::Json(body));
    m.set_local(&["Timer", "Input", "Count"], json!(1));
    m
}

/// The bodies that left `node.Terminal`, in order.
fn bodies(h: &Harness, terminal: &str) -> Vec<Value> {
    h.messages(terminal)
        .iter()
        .map(|m| m.root.body.to_value())
        .collect()
}

/// What the Trace nodes wrote to the activity log, as `(node, text)`.
fn traces(h: &Harness) -> Vec<(String, String)> {
    h.activity()
        .iter()
        .filter(|e| e.number == "BIP1003")
        .map(|e| (e.node.clone(), e.message.clone()))
        .collect()
}

/// The activity-log entries with this number, as `(severity, node, text)`.
fn entries(h: &Harness, number: &str) -> Vec<(Severity, String, String)> {
    h.activity()
        .iter()
        .filter(|e| e.number == number)
        .map(|e| (e.severity, e.node.clone(), e.message.clone()))
        .collect()
}

fn trace(node: &str, text: &str) -> (String, String) {
    (node.to_string(), text.to_string())
}

// ---- every example flow is valid --------------------------------------------------------

#[test]
fn every_example_flow_validates_and_builds() {
    let mut flows = Vec::new();
    files_under(&root().join("examples"), "json", &mut flows);
    assert!(
        flows.len() >= 18,
        "expected the cookbook and error-handling flows, found {flows:?}"
    );
    let registry = flowbus_nodes::registry();
    // The TLS example takes its password from the environment, as a deployment would.
    std::env::set_var("GATEWAY_PASSWORD", "example-only");
    let mut problems = Vec::new();
    for f in &flows {
        let dir = f.parent().expect("a flow file has a directory");
        // The example's flowbus.toml sits next to the flow or one level up (`flows/`).
        let config = [dir.join("flowbus.toml"), dir.join("../flowbus.toml")]
            .into_iter()
            .find(|c| c.is_file())
            .map_or_else(Config::default, |c| {
                Config::load(&c).unwrap_or_else(|e| panic!("{e}"))
            });
        if let Err(e) = load_flow(
            f,
            &registry,
            Arc::new(config),
            Arc::new(Services::default()),
        ) {
            problems.push(e.to_string());
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- docs/rhai.md shows only tested code ------------------------------------------------

/// Every string a cookbook flow or script holds: script files whole, and the `code` and
/// `expression` properties of the flows.
fn cookbook_sources() -> Vec<String> {
    let mut files = Vec::new();
    files_under(&root().join("examples/rhai-cookbook"), "rhai", &mut files);
    let mut out: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("script"))
        .collect();
    let mut flows = Vec::new();
    files_under(&root().join("examples/rhai-cookbook"), "json", &mut flows);
    for f in flows {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&f).expect("flow")).expect("JSON");
        for n in v["nodes"].as_array().into_iter().flatten() {
            for key in ["code", "expression"] {
                if let Some(s) = n[key].as_str() {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

/// The fenced blocks of a Markdown file with the given info string.
fn fenced_blocks(markdown: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == format!("```{lang}") => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_start() == "```" => {
                blocks.push(current.take().unwrap_or_default())
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
        }
    }
    blocks
}

#[test]
fn every_rhai_example_in_the_docs_is_a_tested_cookbook_script() {
    let doc = std::fs::read_to_string(root().join("docs/rhai.md")).expect("docs/rhai.md");
    let blocks = fenced_blocks(&doc, "rhai");
    assert!(
        blocks.len() >= 10,
        "docs/rhai.md has {} rhai blocks",
        blocks.len()
    );
    let sources = cookbook_sources();
    let missing: Vec<&String> = blocks
        .iter()
        .filter(|b| !sources.iter().any(|s| s.contains(b.trim())))
        .collect();
    assert!(
        missing.is_empty(),
        "rhai blocks in docs/rhai.md that are not in examples/rhai-cookbook:\n{}",
        missing
            .iter()
            .map(|b| b.as_str())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
}

/// Every node object in a cookbook flow.
fn cookbook_nodes() -> Vec<Value> {
    let mut flows = Vec::new();
    files_under(&root().join("examples/rhai-cookbook"), "json", &mut flows);
    flows
        .iter()
        .flat_map(|f| {
            let v: Value =
                serde_json::from_str(&std::fs::read_to_string(f).expect("flow")).expect("JSON");
            v["nodes"].as_array().cloned().unwrap_or_default()
        })
        .collect()
}

#[test]
fn every_node_shown_in_the_rhai_doc_is_a_cookbook_node() {
    let doc = std::fs::read_to_string(root().join("docs/rhai.md")).expect("docs/rhai.md");
    let blocks = fenced_blocks(&doc, "json");
    assert!(!blocks.is_empty());
    let nodes = cookbook_nodes();
    for b in blocks {
        let v: Value = serde_json::from_str(&b)
            .unwrap_or_else(|e| panic!("json block in docs/rhai.md does not parse ({e}):\n{b}"));
        assert!(
            nodes.contains(&v),
            "json block in docs/rhai.md is not a node of examples/rhai-cookbook:\n{b}"
        );
    }
}

/// The README's flows: each is valid, and one named like a file in `flows/` is that file.
#[test]
fn readme_flows_are_valid_and_match_flows_dir() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let blocks = fenced_blocks(&readme, "json");
    assert!(
        !blocks.is_empty(),
        "README.md has {} json blocks",
        blocks.len()
    );
    let registry = flowbus_nodes::registry();
    let mut matched = 0;
    for b in &blocks {
        let v: Value = serde_json::from_str(b)
            .unwrap_or_else(|e| panic!("json block in README.md does not parse ({e}):\n{b}"));
        // README flows name the servers of the project's flowbus.toml.
        let config = Config::load(&root().join("flowbus.toml")).expect("flowbus.toml");
        let ctx = flowbus_runtime::node::ValidateCtx {
            servers: config.servers.keys().cloned().collect(),
        };
        if let Err(errors) =
            flowbus_runtime::flow::validate(Path::new("README.md"), b, &registry, &ctx)
        {
            panic!(
                "README.md flow is invalid:\n{}",
                flowbus_runtime::flow::FlowErrors(errors)
            );
        }
        let name = v["name"].as_str().expect("README flows have a name");
        let file = root().join("flows").join(format!("{name}.json"));
        if file.is_file() {
            let on_disk: Value =
                serde_json::from_str(&std::fs::read_to_string(&file).expect("flow")).expect("JSON");
            assert_eq!(v, on_disk, "README.md shows {} differently", file.display());
            matched += 1;
        }
    }
    assert!(matched >= 1, "README.md shows none of the flows in flows/");
    for b in fenced_blocks(&readme, "rhai") {
        let mut scripts = Vec::new();
        files_under(&root().join("flows"), "rhai", &mut scripts);
        assert!(
            scripts
                .iter()
                .any(|f| std::fs::read_to_string(f).expect("script") == b),
            "README.md shows a script that is not in flows/:\n{b}"
        );
    }
}

// ---- the Rhai cookbook ------------------------------------------------------------------

#[tokio::test]
async fn cookbook_convert() {
    let flow = cookbook("convert.json");
    let h = load(&flow);
    assert_eq!(
        h.inject("tick", timer_message(&flow, "tick", 1)).await,
        Disposition::Completed
    );
    let out = bodies(&h, "convert.Out");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["fahrenheit"], json!(70.7));
    let at = out[0]["converted_at"].as_str().expect("converted_at");
    assert!(at.len() == 24 && at.ends_with('Z'), "{at}");
    assert_eq!(traces(&h), [trace("show", "sensor-1: 21.5 C = 70.7 F")]);
}

#[tokio::test]
async fn cookbook_reshape() {
    let flow = cookbook("reshape.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    assert_eq!(
        bodies(&h, "reshape.Out"),
        [json!({"device": "pump-4", "readings": [20.0, 23.0], "average": 21.5})]
    );
    assert_eq!(
        traces(&h),
        [trace(
            "show",
            r#"{"average":21.5,"device":"pump-4","readings":[20.0,23.0]}"#
        )]
    );
}

#[tokio::test]
async fn cookbook_properties() {
    let flow = cookbook("properties.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 7)).await;
    assert_eq!(
        bodies(&h, "describe.Out"),
        [json!({"device": "sensor-1", "format": "JSON", "number": 7})]
    );
    assert_eq!(traces(&h), [trace("show", "message #7 is JSON")]);
}

#[tokio::test]
async fn cookbook_local_environment() {
    let flow = cookbook("local-environment.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    let out = h.messages("route.Out");
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].local(&["Destination", "MQTT", "Output", "TopicName"]),
        Some(json!("sites/plant-7/sensor-1"))
    );
    assert_eq!(
        traces(&h),
        [trace("show", "site plant-7, topic sites/plant-7/sensor-1")]
    );
}

#[tokio::test]
async fn cookbook_environment_is_shared_local_environment_is_not() {
    let flow = cookbook("environment.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    assert_eq!(
        bodies(&h, "second.Out"),
        [json!({"device": "sensor-1", "first_saw": "sensor-1", "first_branch": null})]
    );
    assert_eq!(
        traces(&h),
        [trace(
            "show",
            "second branch: first_saw=sensor-1 first_branch=null"
        )]
    );
}

#[tokio::test]
async fn cookbook_drop_with_return_false() {
    let flow = cookbook("drop.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    h.inject(
        "tick",
        with_body(json!({"device": "boiler-2", "celsius": 21.0})),
    )
    .await;
    assert_eq!(
        bodies(&h, "hot-only.Out"),
        [json!({"device": "boiler-2", "celsius": 35.0, "alert": "hot"})]
    );
    assert_eq!(traces(&h), [trace("show", "boiler-2 is hot: 35.0 C")]);
}

#[tokio::test]
async fn cookbook_split_propagates_copies_in_order() {
    let flow = cookbook("split.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    assert_eq!(
        bodies(&h, "split.Out1"),
        [
            json!({"device": "sensor-1", "value": 20.5}),
            json!({"device": "sensor-1", "value": 21.0}),
            json!({"device": "sensor-1", "value": 21.5}),
        ]
    );
    assert!(h.messages("split.Out").is_empty());
    assert_eq!(
        traces(&h),
        [
            trace("show", "sensor-1 reading 20.5"),
            trace("show", "sensor-1 reading 21.0"),
            trace("show", "sensor-1 reading 21.5"),
        ]
    );
}

#[tokio::test]
async fn cookbook_route() {
    let flow = cookbook("route.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    h.inject(
        "tick",
        with_body(json!({"kind": "telemetry", "device": "meter-1"})),
    )
    .await;
    h.inject(
        "tick",
        with_body(json!({"kind": "audit", "device": "gate-2"})),
    )
    .await;
    assert!(h.messages("route.Out").is_empty());
    assert_eq!(
        traces(&h),
        [
            trace("alarm", "ALARM from door-3"),
            trace("telemetry", "telemetry from meter-1"),
            trace("other", "unknown kind audit from gate-2"),
        ]
    );
}

#[tokio::test]
async fn cookbook_filter_true_false_unknown() {
    let flow = cookbook("filter.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    h.inject(
        "tick",
        with_body(json!({"device": "boiler-2", "celsius": 20.0})),
    )
    .await;
    h.inject("tick", with_body(json!({"device": "boiler-2"})))
        .await;
    assert_eq!(
        traces(&h),
        [
            trace("hot", "hot: 35.0 C"),
            trace("fine", "fine: 20.0 C"),
            trace("no-reading", r#"no temperature in {"device":"boiler-2"}"#),
        ]
    );
}

#[tokio::test]
async fn cookbook_functions() {
    let flow = cookbook("functions.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    assert_eq!(traces(&h), [trace("show", "high 86.0 F, low 14.0 F")]);
}

#[tokio::test]
async fn cookbook_json_helpers() {
    let flow = cookbook("json.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    assert_eq!(
        bodies(&h, "decode.Out"),
        [json!({
            "device": "valve-9",
            "settings": {"mode": "auto", "limit": 80, "debug": false},
            "summary": r#"{"limit":80,"mode":"auto"}"#
        })]
    );
    assert_eq!(
        traces(&h),
        [trace(
            "show",
            r#"mode auto, summary {"limit":80,"mode":"auto"}"#
        )]
    );
}

#[tokio::test]
async fn cookbook_script_error_to_failure_with_line_and_column() {
    let flow = cookbook("errors.json");
    let h = load(&flow);
    assert_eq!(
        h.inject("tick", timer_message(&flow, "tick", 1)).await,
        Disposition::Completed
    );
    h.inject(
        "tick",
        with_body(json!({"device": "sensor-1", "celsius": 25.0})),
    )
    .await;
    // The Failure terminal gets the message as it arrived, with the exception.
    let failed = h.messages("kelvin.Failure");
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0].root.body.to_value(),
        json!({"device": "sensor-1", "celsius": -300.0})
    );
    let e = failed[0].exception_list.as_ref().expect("ExceptionList");
    assert_eq!(e.number, 2488);
    assert_eq!(&*e.node, "kelvin");
    assert_eq!(e.inserts, ["kelvin.rhai", "4", "5"]);
    assert_eq!(
        bodies(&h, "report.Out"),
        [json!({
            "failed_node": "kelvin",
            "number": 2488,
            "reason": "Rhai error in kelvin.rhai at line 4, column 5: script threw: impossible temperature -300.0",
            "line": "4"
        })]
    );
    assert_eq!(
        traces(&h),
        [
            trace(
                "failed",
                "BIP2488 in kelvin: Rhai error in kelvin.rhai at line 4, column 5: script threw: impossible temperature -300.0"
            ),
            trace("ok", "298.15 K"),
        ]
    );
}

#[tokio::test]
async fn cookbook_limits() {
    let flow = cookbook("limits.json");
    let h = load(&flow);
    h.inject("tick", timer_message(&flow, "tick", 1)).await;
    h.inject("tick", with_body(json!({"n": 10}))).await;
    assert_eq!(
        traces(&h),
        [
            trace(
                "failed",
                "Rhai error in sum.rhai at line 4, column 11: the script exceeded max_operations (5000): an endless loop? If the work is legitimate, raise the node's \"max_operations\" (at most 1000000000)"
            ),
            trace("ok", "total 45"),
        ]
    );
}

#[tokio::test]
async fn cookbook_gotcha_last_statement_false_drops_the_message() {
    let flow = cookbook("gotcha.json");
    let h = load(&flow);
    assert_eq!(
        h.inject("tick", timer_message(&flow, "tick", 1)).await,
        Disposition::Completed
    );
    assert!(h.messages("check.Out").is_empty());
    h.inject("tick", with_body(json!({"celsius": 120.0}))).await;
    assert_eq!(
        bodies(&h, "check.Out"),
        [json!({"celsius": 120.0, "checked": true})]
    );
}

/// Copies a rejected script next to a one-node flow in a fresh directory and loads it.
fn load_rejected(script: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "flowbus-examples-{}-{}",
        std::process::id(),
        script.replace('.', "-")
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::copy(cookbook("rejected").join(script), dir.join(script)).expect("copy script");
    let flow = dir.join("flow.json");
    let text = r#"{
  "nodes": [
    { "id": "tick", "type": "Timer" },
    { "id": "c", "type": "Compute", "script": "SCRIPT" }
  ],
  "connections": [{ "from": "tick.Out", "to": "c" }]
}"#;
    std::fs::write(&flow, text.replace("SCRIPT", script)).expect("write flow");
    let result = Harness::load(&flow, &flowbus_nodes::registry());
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(_) => panic!("{script} was accepted"),
        // As `flowbus validate` prints it, from the flow file's name on.
        Err(e) => e
            .to_string()
            .strip_prefix(dir.to_str().expect("UTF-8 temp dir"))
            .map(|s| s.trim_start_matches('/').to_string())
            .unwrap_or_else(|| panic!("{e}")),
    }
}

#[test]
fn cookbook_rejected_scripts_fail_at_deploy_with_line_and_column() {
    assert_eq!(
        load_rejected("eval.rhai"),
        "flow.json:4:37: node 'c': Rhai compile error in eval.rhai at line 2, column 9: reserved keyword 'eval' is disabled"
    );
    assert_eq!(
        load_rejected("import.rhai"),
        "flow.json:4:37: node 'c': Rhai compile error in import.rhai at line 2, column 1: 'import' is a reserved keyword"
    );
    let e = load_rejected("syntax.rhai");
    assert!(
        e.starts_with(
            "flow.json:4:37: node 'c': Rhai compile error in syntax.rhai at line 2, column 5: "
        ),
        "{e}"
    );
}

#[tokio::test]
async fn filter_giving_a_non_boolean_is_a_script_error() {
    let dir = std::env::temp_dir().join(format!("flowbus-examples-{}-filter", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let flow = dir.join("f.json");
    std::fs::write(
        &flow,
        json!({
            "nodes": [
                {"id": "tick", "type": "Timer"},
                {"id": "f", "type": "Filter", "expression": "Root.Body.celsius"}
            ],
            "connections": [{"from": "tick.Out", "to": "f"}]
        })
        .to_string(),
    )
    .expect("write flow");
    let h = load(&flow);
    let _ = std::fs::remove_dir_all(&dir);
    let d = h.inject("tick", with_body(json!({"celsius": 3}))).await;
    let Disposition::Discarded(e) = d else {
        panic!("{d:?}")
    };
    assert_eq!(e.number, 2488);
    assert!(
        e.text.contains("it must give true, false or () (unknown)"),
        "{}",
        e.text
    );
}

/// The cookbook flows run on their own Timer, not only under the harness.
#[tokio::test]
async fn cookbook_flow_runs_on_its_timer() {
    let h = load(&cookbook("split.json"));
    let running = h.flow().start();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while traces(&h).len() < 3 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running.stop(Duration::from_secs(2)).await.is_empty());
    let t = traces(&h);
    assert!(t.len() >= 3, "{t:?}");
    assert_eq!(t[0], trace("show", "sensor-1 reading 20.5"));
}

// ---- error handling ---------------------------------------------------------------------

#[tokio::test]
async fn error_handling_failure_terminal() {
    let flow = error_handling("failure-terminal.json");
    let h = load(&flow);
    for n in 1..=3 {
        assert_eq!(
            h.inject("tick", timer_message(&flow, "tick", n)).await,
            Disposition::Completed
        );
    }
    assert_eq!(
        traces(&h),
        [
            trace(
                "ok",
                r#"#1 ok: {"celsius":21.5,"checked":true,"device":"sensor-1"}"#
            ),
            trace(
                "ok",
                r#"#2 ok: {"celsius":21.5,"checked":true,"device":"sensor-1"}"#
            ),
            trace(
                "failed",
                r#"#3 failed: Rhai error in check.rhai at line 3, column 5: script threw: corrupt reading; body {"celsius":21.5,"device":"sensor-1"}"#
            ),
        ]
    );
    // The handled error is in the activity log too, as a warning.
    assert_eq!(
        entries(&h, "BIP2230"),
        [(
            Severity::Warning,
            "check".to_string(),
            "error in node 'check', message routed to its Failure terminal: BIP2488 RecoverableException in failure-terminal.check: Rhai error in check.rhai at line 3, column 5: script threw: corrupt reading".to_string()
        )]
    );
    let errors = h.flow().node_stats();
    let check = errors.iter().find(|s| s.node == "check").expect("check");
    assert_eq!(check.errors, 1);
    assert_eq!(check.terminals["Failure"], 1);
    assert_eq!(check.terminals["Out"], 2);
}

#[tokio::test]
async fn error_handling_trycatch_rolls_back_the_try_path() {
    let flow = error_handling("trycatch.json");
    let h = load(&flow);
    assert_eq!(
        h.inject("tick", timer_message(&flow, "tick", 1)).await,
        Disposition::Completed
    );
    h.inject(
        "tick",
        with_body(json!({"device": "boiler-2", "celsius": 40.0})),
    )
    .await;
    assert_eq!(
        traces(&h),
        [
            trace(
                "caught",
                r#"caught BIP3100 from reject: temperature above the limit of 50 C; body {"celsius":72.5,"device":"boiler-2"}, stage ''"#
            ),
            trace(
                "accepted",
                r#"accepted: {"celsius":40.0,"device":"boiler-2","enriched":true}"#
            ),
        ]
    );
    assert_eq!(
        entries(&h, "BIP2630"),
        [(
            Severity::Warning,
            "guard".to_string(),
            "exception caught by TryCatch 'guard', message routed to its Catch terminal: BIP3100 UserException in trycatch.reject: temperature above the limit of 50 C".to_string()
        )]
    );
    let caught = h.messages("guard.Catch");
    assert_eq!(caught.len(), 1);
    assert_eq!(caught[0].local(&["Variables", "stage"]), None);
}

#[tokio::test]
async fn error_handling_input_catch_gets_the_original_message() {
    let flow = error_handling("input-catch.json");
    let h = load(&flow);
    assert_eq!(
        h.inject("tick", timer_message(&flow, "tick", 1)).await,
        Disposition::Caught
    );
    assert_eq!(
        traces(&h),
        [trace(
            "rolled-back",
            r#"rolled back to input-catch.tick: Rhai error in store.rhai at line 3, column 1: script threw: store unavailable; original body {"items":3,"order":1017}"#
        )]
    );
    assert!(h.discards().is_empty());
    assert_eq!(
        entries(&h, "BIP2631"),
        [(
            Severity::Warning,
            "tick".to_string(),
            "message rolled back to input node 'tick' and routed to its Catch terminal: BIP2488 RecoverableException in input-catch.store: Rhai error in store.rhai at line 3, column 1: script threw: store unavailable".to_string()
        )]
    );
}

#[tokio::test]
async fn error_handling_failure_terminal_does_not_catch_downstream_exceptions() {
    let flow = error_handling("passthrough.json");
    let h = load(&flow);
    assert_eq!(
        h.inject("tick", timer_message(&flow, "tick", 1)).await,
        Disposition::Caught
    );
    assert!(h.messages("stamp.Failure").is_empty());
    assert_eq!(
        traces(&h),
        [trace(
            "at-input",
            "reached tick.Catch: downstream failure (thrown by downstream)"
        )]
    );
    // tick.Catch gets the message as the Timer sent it: stamp's change is undone.
    assert_eq!(bodies(&h, "tick.Catch"), [json!({"device": "sensor-1"})]);
}

#[tokio::test]
async fn error_handling_uncaught_exception_is_logged_and_discarded() {
    let flow = error_handling("discard.json");
    let h = load(&flow);
    let d = h.inject("tick", timer_message(&flow, "tick", 1)).await;
    let Disposition::Discarded(e) = d else {
        panic!("{d:?}")
    };
    assert_eq!((e.number, &*e.node), (3200, "fail"));
    let errors: Vec<_> = h
        .activity()
        .into_iter()
        .filter(|e| e.severity == Severity::Error)
        .collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].number, "BIP2628");
    assert_eq!(errors[0].node, "tick");
    assert_eq!(
        errors[0].message,
        "message rolled back to input node 'tick' and discarded (its Catch terminal is not connected): BIP3200 UserException in discard.fail: no route for this message"
    );
    assert_eq!(
        errors[0].tags["exception"]["UserException"]["Text"],
        "no route for this message"
    );
    let tick = h.flow().node_stats();
    let tick = tick.iter().find(|s| s.node == "tick").expect("tick");
    assert_eq!(tick.discards, 1);
}

// ---- error handling: a dead-letter topic (against a broker) -------------------------------

/// The dead-letter example, run against a private mosquitto (its `[servers.local]` pointed
/// there), with `edit` applied to the flow's text.
fn dead_letter_flow(broker: &common::Broker, edit: impl Fn(String) -> String) -> common::Running {
    let dir = error_handling("dead-letter");
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let config = format!(
        "{}[servers.local]\nurl = \"{}\"\n",
        common::fast_config(""),
        broker.url()
    );
    common::Running::start(
        &edit(read("shipments.json")),
        &config,
        &[
            ("route.rhai", &read("route.rhai")),
            ("explain.rhai", &read("explain.rhai")),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_handling_dead_letter_publishes_what_ship_could_not() {
    let broker = common::Broker::start("");
    let mut run = dead_letter_flow(&broker, |f| f);
    run.wait_subscribed(1).await;
    let c = common::Client::connect(&broker.url(), false).await;
    c.subscribe("shipments/#", 1).await;
    c.subscribe("errors/#", 1).await;
    // Nothing listens there.
    let partner = format!("tcp://127.0.0.1:{}", common::free_port());
    c.publish("orders/1017", r#"{"order":1017,"region":"eu"}"#, 1)
        .await;
    c.publish("orders/1018", r#"{"order":1018,"region":"eu/#"}"#, 1)
        .await;
    c.publish(
        "orders/1019",
        json!({"order": 1019, "region": "us", "broker": partner}).to_string(),
        1,
    )
    .await;
    let got = c.take_json(3, Duration::from_secs(20)).await;
    assert_eq!(
        got[0],
        (
            "shipments/eu".to_string(),
            json!({"order": 1017, "region": "eu"})
        )
    );
    assert_eq!(
        got[1],
        (
            "errors/shipments".to_string(),
            json!({
                "number": 4311,
                "order": {"order": 1018, "region": "eu/#"},
                "reason": "LocalEnvironment.Destination.MQTT.Output.TopicName: topic \"shipments/eu/#\" contains a wildcard; a publish needs a topic name"
            })
        )
    );
    assert_eq!(got[2].0, "errors/shipments");
    assert_eq!(got[2].1["number"], 12099);
    assert_eq!(
        got[2].1["order"],
        json!({"order": 1019, "region": "us", "broker": partner})
    );
    let reason = got[2].1["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!(
            "the publication to 'shipments/us' at QoS 1 on {partner} was not acknowledged: "
        )),
        "{reason}"
    );
    // The connection opened for the partner's broker is not left retrying.
    run.wait_entry(
        "BIP12092",
        "not connected and no message waits for it",
        Duration::from_secs(10),
    )
    .await;
    run.stop().await;
}

/// What the README says happens without `"overrides": false`: the dead-letter node reads the
/// overrides that failed, fails the same way, and the order is discarded at the input node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_handling_dead_letter_without_overrides_false_fails_like_the_message() {
    let broker = common::Broker::start("");
    let mut run = dead_letter_flow(&broker, |f| {
        let edited = f.replace(",\n      \"overrides\": false", "");
        assert_ne!(edited, f, "the example sets overrides: false");
        edited
    });
    run.wait_subscribed(1).await;
    let c = common::Client::connect(&broker.url(), false).await;
    c.subscribe("errors/#", 1).await;
    c.publish("orders/1018", r#"{"order":1018,"region":"eu/#"}"#, 1)
        .await;
    let discarded = run
        .wait_entry("BIP2628", "discarded", Duration::from_secs(10))
        .await;
    assert!(
        discarded.message.contains("BIP4311") && discarded.message.contains("dead-letter"),
        "{discarded:?}"
    );
    assert!(
        c.next(Duration::from_secs(1)).await.is_none(),
        "nothing reaches errors/shipments"
    );
    run.stop().await;
}
