//! The daemon as an operator meets it: the real `flowbus` binary against a real mosquitto,
//! driven only through its CLI (`flowbus flows|log|stats`) and its HTTP API.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{fast_config, http, Broker, Client, Daemon};
use serde_json::{json, Value};

const TOKEN_VAR: &str = "FLOWBUS_E2E_TOKEN";
const TOKEN: &str = "e2e-token-3b9d7a51c2";

fn with_token(extra: &str) -> String {
    fast_config(&format!(
        "[admin]\ntoken_env = \"{TOKEN_VAR}\"\n[daemon]\nwatch_interval = \"100ms\"\nshutdown_timeout = \"5s\"\n{extra}"
    ))
}

/// in → Compute (tags the version) → out, on one broker.
fn relay(url: &str, version: u32, qos: u8, clean_session: bool) -> String {
    json!({
        "name": "relay",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "e2e/in", "qos": qos, "clean_session": clean_session},
            {"id": "tag", "type": "Compute", "code": format!("Root.Body.version = {version};")},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "e2e/out", "qos": qos}
        ],
        "connections": [{"from": "in.Out", "to": "tag"}, {"from": "tag.Out", "to": "out"}]
    })
    .to_string()
}

/// A flow that traces `tick N` to the log every `interval`.
fn tick_flow(interval: &str) -> String {
    json!({
        "name": "tick",
        "nodes": [
            {"id": "t", "type": "Timer", "interval": interval},
            {"id": "show", "type": "Trace", "pattern": "tick ${LocalEnvironment.Timer.Input.Count}"}
        ],
        "connections": [{"from": "t.Out", "to": "show"}]
    })
    .to_string()
}

fn start(config: &str, flows: &[(&str, &str)]) -> Daemon {
    Daemon::spawn_with_env(config, flows, &[(TOKEN_VAR, TOKEN)])
}

/// Runs the CLI until `done` holds for its stdout, or panics after `timeout`.
async fn cli_until(
    d: &Daemon,
    args: &[&str],
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let until = Instant::now() + timeout;
    loop {
        let (code, out, err) = d.cli(args);
        if code == 0 && done(&out) {
            return out;
        }
        assert!(
            Instant::now() < until,
            "flowbus {args:?} never showed what was expected (exit {code}):\n{out}\n{err}\ndaemon log:\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_deployed_through_the_cli_runs() {
    let broker = Broker::start("");
    let url = broker.url();
    let d = start(&with_token(""), &[]);
    d.wait_api().await;
    let (code, out, _) = d.cli(&["flows", "list"]);
    assert_eq!((code, out.as_str()), (0, "no flows deployed\n"));

    // Deploy from a file anywhere: the daemon validates, stores and starts it.
    let file = d.dir.join("relay-to-deploy.json");
    std::fs::write(&file, relay(&url, 1, 1, true)).unwrap();
    let (code, out, err) = d.cli(&["flows", "deploy", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("deployed flow 'relay' (version 1, running) to "),
        "{out}"
    );
    assert!(d.dir.join("flows/relay.json").is_file());
    cli_until(
        &d,
        &["log", "--flow", "relay", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed to 'e2e/in'"),
    )
    .await;

    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("e2e/out", 1).await;
    let producer = Client::connect(&url, false).await;
    for i in 0..5 {
        producer
            .publish("e2e/in", json!({"n": i}).to_string(), 1)
            .await;
    }
    let got = consumer.take_json(5, Duration::from_secs(10)).await;
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, (_, v))| v["n"] == i && v["version"] == 1));

    // What an operator sees.
    let (code, out, _) = d.cli(&["flows", "list"]);
    assert_eq!(code, 0);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "STATE", "NODES", "VERSION", "FILE", "REASON"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["relay", "running", "3", "1"], "{out}");
    let stats = cli_until(&d, &["stats", "--json"], Duration::from_secs(5), |o| {
        serde_json::from_str::<Value>(o).is_ok_and(|v| v["servers"][&url]["MessagesSent"] == 5)
    })
    .await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["servers"][&url]["MessagesReceived"], 5);
    let (code, table, _) = d.cli(&["stats"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("MQTT servers") && table.contains(&url),
        "{table}"
    );
    let tag = table
        .lines()
        .find(|l| l.starts_with("relay") && l.contains(" tag "))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = tag.split_whitespace().collect();
    assert_eq!(
        &cells[..6],
        ["relay", "tag", "Compute", "5", "0", "0"],
        "{tag}"
    );
    assert!(tag.ends_with("Out=5"), "{tag}");
    let (status, metrics) = http(
        "GET",
        &format!("{}/metrics", d.admin_url()),
        None,
        Some(TOKEN),
    );
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &metrics,
            "flowbus_node_messages_total{flow=\"relay\",node=\"tag\",terminal=\"Out\"}"
        ),
        Some(5.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("flowbus_mqtt_messages_received_total{{server=\"{url}\"}}")
        ),
        Some(5.0)
    );
}

/// Issue 18: the JSON statistics and Prometheus said 0 invocations for every MQTTSubscribe
/// while the table showed its processing-time count, which left out messages routed to
/// Failure. Here the input node's messages take every path: Out (and on), Catch (a Throw
/// downstream), Failure (a payload that is not JSON); all three views must say 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_agree_on_an_input_node_whose_messages_take_every_path() {
    let broker = Broker::start("");
    let url = broker.url();
    let flow = json!({
        "name": "paths",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "paths/in", "qos": 1, "domain": "JSON"},
            {"id": "check", "type": "Filter", "expression": "Root.Body.bad == true"},
            {"id": "reject", "type": "Throw", "number": 3001, "text": "bad message"},
            {"id": "caught", "type": "Compute", "code": "Root.Body.caught = true;"},
            {"id": "unparsed", "type": "Compute", "code": "true"}
        ],
        "connections": [
            {"from": "in.Out", "to": "check"},
            {"from": "check.True", "to": "reject"},
            {"from": "in.Catch", "to": "caught"},
            {"from": "in.Failure", "to": "unparsed"}
        ]
    })
    .to_string();
    let d = start(&with_token(""), &[("paths.json", &flow)]);
    d.wait_api().await;
    d.wait_log("BIP12095", 1, Duration::from_secs(20)).await;
    let producer = Client::connect(&url, false).await;
    for i in 0..5 {
        producer
            .publish("paths/in", json!({"n": i}).to_string(), 1)
            .await;
    }
    for i in 0..3 {
        producer
            .publish("paths/in", json!({"n": i, "bad": true}).to_string(), 1)
            .await;
    }
    for _ in 0..2 {
        producer.publish("paths/in", "not json {", 1).await;
    }
    let json_out = cli_until(&d, &["stats", "--json"], Duration::from_secs(20), |o| {
        serde_json::from_str::<Value>(o).is_ok_and(|v| {
            v["flows"]["paths"]
                .as_array()
                .and_then(|nodes| nodes.iter().find(|n| n["node"] == "caught"))
                .is_some_and(|n| n["invocations"] == 3)
                && v["flows"]["paths"]
                    .as_array()
                    .and_then(|nodes| nodes.iter().find(|n| n["node"] == "unparsed"))
                    .is_some_and(|n| n["invocations"] == 2)
        })
    })
    .await;
    let stats: Value = serde_json::from_str(&json_out).unwrap();
    let node = |id: &str| {
        stats["flows"]["paths"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["node"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("no node {id}: {stats}"))
    };
    let input = node("in");
    assert_eq!(input["invocations"], 10, "{input}");
    assert_eq!(
        input["terminals"],
        json!({"Out": 8, "Catch": 3, "Failure": 2}),
        "{input}"
    );
    assert_eq!(input["errors"], 2, "{input}");
    assert_eq!(input["processing"]["count"], 10, "{input}");
    assert_eq!(node("check")["invocations"], 8);

    let (status, metrics) = http(
        "GET",
        &format!("{}/metrics", d.admin_url()),
        None,
        Some(TOKEN),
    );
    assert_eq!(status, 200);
    for (id, n) in [
        ("in", 10.0),
        ("check", 8.0),
        ("caught", 3.0),
        ("unparsed", 2.0),
    ] {
        assert_eq!(
            metric(
                &metrics,
                &format!("flowbus_node_invocations_total{{flow=\"paths\",node=\"{id}\"}}")
            ),
            Some(n),
            "{id}: {metrics}"
        );
    }

    let (code, table, _) = d.cli(&["stats"]);
    assert_eq!(code, 0);
    let calls = |id: &str| {
        let row = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|c| c.len() > 3 && c[0] == "paths" && c[1] == id)
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
        row[3].to_string()
    };
    assert!(table.contains("CALLS"), "{table}");
    assert_eq!(calls("in"), "10", "{table}");
    assert_eq!(calls("check"), "8", "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_shows_in_flowbus_log_and_in_metrics() {
    let mut broker = Broker::start("");
    let url = broker.url();
    let d = start(&with_token(""), &[("relay.json", &relay(&url, 1, 1, true))]);
    d.wait_api().await;
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    let failed = format!("flowbus_mqtt_failed_connections_total{{server=\"{url}\"}}");
    let open = format!("flowbus_mqtt_open_connections{{server=\"{url}\"}}");
    let scrape = || {
        http(
            "GET",
            &format!("{}/metrics", d.admin_url()),
            None,
            Some(TOKEN),
        )
        .1
    };
    assert_eq!(metric(&scrape(), &failed), Some(0.0));
    assert_eq!(metric(&scrape(), &open), Some(2.0));

    broker.kill();
    let out = cli_until(
        &d,
        &["log", "--severity", "error"],
        Duration::from_secs(20),
        |o| o.contains("BIP12096"),
    )
    .await;
    // An aligned table: every row's columns start where the header's do.
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    let col = |name: &str| header.find(name).unwrap();
    assert!(header.starts_with("TIME"));
    let outage = out
        .lines()
        .find(|l| l.contains("BIP12096"))
        .unwrap()
        .to_string();
    assert_eq!(&outage[col("SEVERITY")..col("SEVERITY") + 5], "error");
    assert_eq!(&outage[col("NUMBER")..col("NUMBER") + 8], "BIP12096");
    assert_eq!(&outage[col("FLOW")..col("FLOW") + 5], "relay");
    assert!(
        outage[col("MESSAGE")..].starts_with(&format!("Connection to {url} failed (attempt 1)")),
        "{out}"
    );
    // Only errors were asked for.
    assert!(
        out.lines()
            .skip(1)
            .all(|l| l[col("SEVERITY")..].starts_with("error")),
        "{out}"
    );
    // Coloured only on a terminal: piped, plain text; under a pseudo-terminal (script(1)),
    // the severity in colour.
    let exe = env!("CARGO_BIN_EXE_flowbus");
    let piped = std::process::Command::new(exe)
        .args(["log", "--severity", "error", "--admin", &d.admin])
        .env(TOKEN_VAR, TOKEN)
        .env_remove("NO_COLOR")
        .current_dir(&d.dir)
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert!(!String::from_utf8_lossy(&piped.stdout).contains('\x1b'));
    let tty = std::process::Command::new("script")
        .args([
            "-qec",
            &format!("{exe} log --severity error --admin {}", d.admin),
            "/dev/null",
        ])
        .env(TOKEN_VAR, TOKEN)
        .env_remove("NO_COLOR")
        .current_dir(&d.dir)
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&tty.stdout);
    assert!(
        tty.contains("\x1b[31;1merror   \x1b[0m BIP12096"),
        "{tty:?}"
    );
    // JSON lines too.
    let (code, json_out, _) = d.cli(&["log", "--number", "12096", "--json"]);
    assert_eq!(code, 0);
    let first: Value = serde_json::from_str(json_out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (first["number"].as_str(), first["severity"].as_str()),
        (Some("BIP12096"), Some("error"))
    );
    assert_eq!(first["tags"]["url"], url);

    let metrics = scrape();
    assert!(metric(&metrics, &failed).unwrap() >= 1.0, "{metrics}");
    assert_eq!(metric(&metrics, &open), Some(0.0));
    let (_, stats) = common::http_json(
        "GET",
        &format!("{}/api/v1/statistics", d.admin_url()),
        None,
        Some(TOKEN),
    );
    assert!(
        stats["servers"][&url]["FailedConnections"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // The broker comes back: connected again, and the flow works.
    broker.start_again();
    cli_until(
        &d,
        &["log", "--number", "BIP12063"],
        Duration::from_secs(20),
        |o| o.matches("BIP12063").count() >= 4,
    )
    .await;
    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("e2e/out", 1).await;
    let producer = Client::connect(&url, false).await;
    producer.publish("e2e/in", "{\"after\": true}", 1).await;
    let got = consumer.take_json(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].1["after"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_deploy_is_refused_with_a_clear_error_and_the_running_version_stays() {
    let broker = Broker::start("");
    let url = broker.url();
    let d = start(&with_token(""), &[("relay.json", &relay(&url, 1, 1, true))]);
    d.wait_api().await;
    let before = std::fs::read_to_string(d.dir.join("flows/relay.json")).unwrap();
    let bad = d.dir.join("bad.json");
    std::fs::write(
        &bad,
        format!(
            "{{\n  \"name\": \"relay\",\n  \"nodes\": [\n    {{ \"id\": \"in\", \"type\": \"MQTTSubscribe\", \"url\": \"{url}\", \"topic\": \"e2e/#/in\", \"qos\": 1 }},\n    {{ \"id\": \"out\", \"type\": \"MQTTPublish\", \"url\": \"{url}\", \"topic\": \"e2e/out\", \"qos\": 3 }}\n  ],\n  \"connections\": [ {{ \"from\": \"in.Out\", \"to\": \"out\" }} ]\n}}\n"
        ),
    )
    .unwrap();
    let (code, out, err) = d.cli(&["flows", "deploy", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("the flow is invalid and was not deployed (2 problems); nothing was changed (HTTP 400)\n"),
        "{err}"
    );
    // Shown against the file the operator deployed.
    let at = |line: u32| format!("\n  {}:{line}:", bad.display());
    assert!(
        err.contains(&at(4))
            && err.contains("node 'in': invalid value for 'topic'")
            && err.contains("misuses a wildcard"),
        "{err}"
    );
    assert!(
        err.contains(&at(5))
            && err.contains("node 'out': invalid value for 'qos': 3 is out of range"),
        "{err}"
    );
    // The same through HTTP: a 400 with the details.
    let (status, v) = common::http_json(
        "PUT",
        &format!("{}/api/v1/flows/relay", d.admin_url()),
        Some(&std::fs::read_to_string(&bad).unwrap()),
        Some(TOKEN),
    );
    assert_eq!(status, 400);
    assert_eq!(v["details"].as_array().unwrap().len(), 2);
    assert_eq!(v["details"][1]["line"], 5);

    // Nothing changed: same file, version 1, still relaying.
    assert_eq!(
        std::fs::read_to_string(d.dir.join("flows/relay.json")).unwrap(),
        before
    );
    let (_, out, _) = d.cli(&["flows", "list"]);
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()[..4]
            == ["relay", "running", "3", "1"],
        "{out}"
    );
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("e2e/out", 1).await;
    let producer = Client::connect(&url, false).await;
    producer.publish("e2e/in", "{}", 1).await;
    let got = consumer.take_json(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].1["version"], 1);
    // Unknown flows and bad parameters are refused too, by the CLI with the API's words.
    let (code, _, err) = d.cli(&["flows", "stop", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no flow named 'nope' (flows: relay) (HTTP 404)"),
        "{err}"
    );
    let (code, _, err) = d.cli(&["log", "--severity", "loud"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("severity 'loud' is not one of info, warning, error"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_the_api() {
    let d = start(&with_token(""), &[]);
    d.wait_api().await;
    let base = d.admin_url();
    for path in [
        "/api/v1/flows",
        "/api/v1/activity-log",
        "/api/v1/statistics",
        "/metrics",
    ] {
        let (status, body) = http("GET", &format!("{base}{path}"), None, None);
        assert_eq!(status, 401, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
        let (status, _) = http("GET", &format!("{base}{path}"), None, Some("not-it"));
        assert_eq!(status, 401);
        let (status, _) = http("GET", &format!("{base}{path}"), None, Some(TOKEN));
        assert_eq!(status, 200);
    }
    let (status, _) = http("PUT", &format!("{base}/api/v1/flows/x"), Some("{}"), None);
    assert_eq!(status, 401);
    assert_eq!(http("GET", &format!("{base}/healthz"), None, None).0, 200);
    // The CLI without the token is refused with the API's reason; with it, it works.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args(["flows", "list", "--admin", &d.admin])
        .env_remove(TOKEN_VAR)
        .env_remove("FLOWBUS_ADMIN_TOKEN")
        // The daemon's configuration (token_env, the variable unset), not whatever
        // flowbus.toml and data directory the test's own directory may hold.
        .current_dir(&d.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs an 'Authorization: Bearer <token>' header") && err.contains("HTTP 401"),
        "{err}"
    );
    let (code, _, _) = d.cli(&["flows", "list"]);
    assert_eq!(code, 0);
    // The token is in no log line.
    assert!(!d.stderr().contains(TOKEN));

    // A daemon told to use a token it cannot find refuses to start instead of serving an
    // open API.
    let mut open = Daemon::spawn(&with_token(""), &[]);
    let status = open.child.as_mut().unwrap().wait().unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        open.stderr().contains(&format!(
            "admin.token_env names the environment variable {TOKEN_VAR}, which is not set"
        )),
        "{}",
        open.stderr()
    );
}

/// Counts `{"seq": i}` arrivals per seq, until `quiet` passes without a message.
async fn drain(c: &Client, into: &mut BTreeMap<u64, Vec<u64>>, quiet: Duration) {
    while let Some(m) = c.next(quiet).await {
        let v: Value = serde_json::from_slice(m.payload()).unwrap();
        into.entry(v["seq"].as_u64().unwrap())
            .or_default()
            .push(v["version"].as_u64().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_deploy_on_a_real_broker_never_runs_two_subscriptions() {
    let broker = Broker::start("");
    let url = broker.url();
    // A persistent QoS 1 subscription: the broker keeps what arrives while the flow is being
    // swapped, so every message is delivered exactly once, across redeploys.
    let d = start(
        &with_token(""),
        &[("relay.json", &relay(&url, 1, 1, false))],
    );
    d.wait_api().await;
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("e2e/out", 1).await;
    let producer = Client::connect(&url, false).await;

    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut seq = 0u64;
    let mut send = |n: u64| {
        let from = seq;
        seq += n;
        (from, from + n)
    };
    let publish = |range: (u64, u64)| {
        let p = &producer;
        async move {
            for i in range.0..range.1 {
                p.publish("e2e/in", json!({"seq": i}).to_string(), 1).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    publish(send(50)).await;
    drain(&consumer, &mut seen, Duration::from_millis(500)).await;

    // v2 by editing the file, while messages keep coming.
    let file = d.dir.join("flows/relay.json");
    let tmp = d.dir.join("flows/relay.json.tmp");
    std::fs::write(&tmp, relay(&url, 2, 1, false)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    publish(send(200)).await;
    cli_until(
        &d,
        &["flows", "list", "--json"],
        Duration::from_secs(20),
        |o| {
            serde_json::from_str::<Value>(o)
                .is_ok_and(|v| v[0]["version"] == 2 && v[0]["state"] == "running")
        },
    )
    .await;
    // v3 through the API (the CLI), while messages keep coming.
    let v3 = d.dir.join("v3.json");
    std::fs::write(&v3, relay(&url, 3, 1, false)).unwrap();
    let deploying = {
        let (admin, env, dir) = (d.admin.clone(), (TOKEN_VAR, TOKEN), d.dir.clone());
        let v3 = v3.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
                .args(["flows", "deploy", v3.to_str().unwrap(), "--admin", &admin])
                .env(env.0, env.1)
                .current_dir(dir)
                .output()
                .unwrap()
        })
    };
    publish(send(200)).await;
    let out = deploying.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    publish(send(50)).await;
    drain(&consumer, &mut seen, Duration::from_secs(2)).await;

    // Every message exactly once: two subscriptions at once would have doubled some.
    let doubled: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    let missing: Vec<u64> = (0..seq).filter(|i| !seen.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "lost: {missing:?}; daemon log:\n{}",
        d.stderr()
            .lines()
            .filter(|l| !l.contains("BIP12065") && !l.contains("BIP12097"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Versions only move forward, and each version handled part of the stream.
    let versions: Vec<u64> = seen.values().map(|v| v[0]).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
    for v in 1..=3 {
        assert!(versions.contains(&v), "version {v} never ran: {versions:?}");
    }
    // The subscriber of each version subscribed or resumed once, and stopped before the
    // next one started.
    let (_, log, _) = d.cli(&["log", "--flow", "relay", "--json", "--limit", "10000"]);
    let entries: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let order: Vec<&str> = entries
        .iter()
        .filter_map(|e| match e["number"].as_str() {
            Some("BIP1001") => Some("started"),
            Some("BIP1002") => Some("stopped"),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        ["started", "stopped", "started", "stopped", "started"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_within_the_deadline_and_the_log_survives_a_restart() {
    let a = Broker::start("");
    let b = Broker::start("");
    let flow = json!({
        "name": "bridge",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": a.url(), "topic": "in", "qos": 1},
            {"id": "out", "type": "MQTTPublish", "url": b.url(), "topic": "out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string();
    let config = fast_config(&format!(
        "[admin]\ntoken_env = \"{TOKEN_VAR}\"\n[daemon]\nshutdown_timeout = \"1s\"\n"
    ));
    let mut d = start(&config, &[("bridge.json", &flow)]);
    d.wait_api().await;
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    cli_until(&d, &["stats", "--json"], Duration::from_secs(20), |o| {
        serde_json::from_str::<Value>(o)
            .is_ok_and(|v| v["servers"][b.url()]["OpenConnections"] == 1)
    })
    .await;
    // B stops answering: the publish waits for an ack that does not come (ack_timeout 5s).
    b.freeze();
    let producer = Client::connect(&a.url(), false).await;
    producer.publish("in", "{\"stuck\": true}", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let status = d.terminate(Duration::from_secs(15));
    let took = t.elapsed();
    assert!(status.success(), "exit {status:?}; log:\n{}", d.stderr());
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} with a 1s deadline"
    );
    assert!(
        d.stderr().contains("did not finish within"),
        "{}",
        d.stderr()
    );
    b.thaw();

    // The activity log files survive: a restarted daemon shows the previous run's entries,
    // and the sequence goes on.
    d.start();
    d.wait_api().await;
    let out = cli_until(
        &d,
        &["log", "--number", "BIP1008", "--json"],
        Duration::from_secs(10),
        |o| o.lines().count() >= 3,
    )
    .await;
    let entries: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let messages: Vec<&str> = entries
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages[0].starts_with("flowbus ") && messages[0].contains("running 1 flow(s)"),
        "{messages:?}"
    );
    assert!(
        messages[1].starts_with("flowbus stopping (deadline 1s)"),
        "{messages:?}"
    );
    assert!(messages[2].contains("running 1 flow(s)"), "{messages:?}");
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(d.terminate(Duration::from_secs(15)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeployed_flow_with_a_new_client_id_never_overlaps_the_old_one() {
    // Each version subscribes under its own client id with a clean session, so the broker
    // would happily keep both subscriptions: if the old version were still subscribed when
    // the new one starts, messages in the overlap would come out twice.
    let broker = Broker::start("");
    let url = broker.url();
    let versioned = |v: u32| {
        let mut f: Value = serde_json::from_str(&relay(&url, v, 1, true)).unwrap();
        f["nodes"][0]["client_id"] = json!(format!("relay-in-v{v}"));
        f.to_string()
    };
    let d = start(&with_token(""), &[("relay.json", &versioned(1))]);
    d.wait_api().await;
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("e2e/out", 1).await;
    let producer = Client::connect(&url, false).await;
    let file = d.dir.join("flows/relay.json");
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut i = 0u64;
    for v in 2..=3 {
        std::fs::write(file.with_extension("tmp"), versioned(v)).unwrap();
        std::fs::rename(file.with_extension("tmp"), &file).unwrap();
        // A stream across the swap.
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            producer
                .publish("e2e/in", json!({"seq": i}).to_string(), 1)
                .await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    drain(&consumer, &mut seen, Duration::from_secs(2)).await;
    let doubled: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(doubled.is_empty(), "two subscriptions at once: {doubled:?}");
    let versions: Vec<u64> = seen.values().map(|v| v[0]).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
    assert_eq!(versions.last(), Some(&3), "{versions:?}");
    assert!(versions.contains(&2));
    // Clean sessions lose what is published in the gap between the two (unsubscribe,
    // disconnect, connect, subscribe); the persistent-session test above shows no loss.
    println!(
        "{} of {i} delivered across two clean-session swaps",
        seen.len()
    );
}

/// The number of clients connected to a broker, as the broker itself reports it.
async fn connected_clients(monitor: &Client) -> u64 {
    // mosquitto publishes $SYS every sys_interval (1 s here): read until it is quiet.
    let mut last = None;
    while let Some(m) = monitor.next(Duration::from_millis(2500)).await {
        if m.topic() == "$SYS/broker/clients/connected" {
            last = m.payload_str().trim().parse().ok();
        }
    }
    last.expect("mosquitto reports $SYS/broker/clients/connected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_aborted_at_the_stop_deadline_does_not_stay_subscribed() {
    let a = Broker::start("sys_interval 1");
    let b = Broker::start("");
    let flow = |v: u32, out: &str| {
        json!({
            "name": "stuck",
            "nodes": [
                {"id": "in", "type": "MQTTSubscribe", "url": a.url(), "topic": "in", "qos": 1, "client_id": format!("stuck-in-v{v}")},
                {"id": "out", "type": "MQTTPublish", "url": out, "topic": "out", "qos": 1}
            ],
            "connections": [{"from": "in.Out", "to": "out"}]
        })
        .to_string()
    };
    let d = start(
        &fast_config(&format!("[admin]\ntoken_env = \"{TOKEN_VAR}\"\n[daemon]\nshutdown_timeout = \"1s\"\nwatch = false\n")),
        &[("stuck.json", &flow(1, &b.url()))],
    );
    d.wait_api().await;
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    cli_until(&d, &["stats", "--json"], Duration::from_secs(20), |o| {
        serde_json::from_str::<Value>(o)
            .is_ok_and(|v| v["servers"][b.url()]["OpenConnections"] == 1)
    })
    .await;
    // B stops answering; the first message waits for its ack, the second for the first
    // (in_flight 1): v1's subscriber is stuck and will not finish within the 1s deadline.
    b.freeze();
    let producer = Client::connect(&a.url(), false).await;
    producer.subscribe("$SYS/broker/clients/connected", 0).await;
    producer.publish("in", "{\"n\": 1}", 1).await;
    producer.publish("in", "{\"n\": 2}", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = d.dir.join("v2.json");
    std::fs::write(&v2, flow(2, &a.url())).unwrap();
    let (code, out, err) = d.cli(&["flows", "deploy", v2.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        d.stderr().contains("did not finish within"),
        "v1 was not aborted:\n{}",
        d.stderr()
    );
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.matches("Subscribed").count() >= 2,
    )
    .await;
    // On A: the test client, and v2's subscriber and publisher. v1's subscriber is gone.
    assert_eq!(connected_clients(&producer).await, 3);
    b.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_overrides_the_configuration_and_log_follows() {
    // The configuration names other flows, another data directory and another admin port;
    // the test harness passes --flows and --admin, and --data-dir is added here.
    let mut d = Daemon::spawn_with_env(
        "data_dir = \"data-from-config\"\nflows = [\"nowhere\"]\n[admin]\nlisten = \"127.0.0.1:1\"\n[daemon]\nwatch_interval = \"100ms\"\n",
        &[("tick.json", &tick_flow("200ms"))],
        &[],
    );
    // Restart it with --data-dir on top of --config/--flows/--admin.
    d.wait_api().await;
    assert!(
        d.terminate(Duration::from_secs(10)).success(),
        "{}",
        d.stderr()
    );
    assert!(d
        .dir
        .join("data-from-config/activity-log/activity.jsonl")
        .is_file());
    let data = d.dir.join("data-from-cli");
    assert!(!data.exists());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .arg("run")
        .arg("--config")
        .arg(d.dir.join("flowbus.toml"))
        .arg("--flows")
        .arg(d.dir.join("flows"))
        .arg("--admin")
        .arg(&d.admin)
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    d.wait_api().await;
    // The CLI finds the token the daemon generated in the data directory it is told.
    let data_arg = data.to_str().unwrap().to_string();
    let (code, _, err) = d.cli(&["log", "--number", "BIP1003"]);
    assert!(
        code != 0 && err.contains("HTTP 401") && err.contains("data-from-config/admin.token"),
        "without --data-dir the CLI looks in the configuration's data directory: {err}"
    );
    cli_until(
        &d,
        &["log", "--number", "BIP1003", "--data-dir", &data_arg],
        Duration::from_secs(10),
        |o| o.contains("tick 2"),
    )
    .await;
    assert!(data.join("activity-log/activity.jsonl").is_file());

    // `flowbus log --follow` prints what is there, then what comes, without repeats.
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args([
            "log",
            "--follow",
            "--json",
            "--number",
            "BIP1003",
            "--limit",
            "1",
            "--admin",
            &d.admin,
            "--data-dir",
            &data_arg,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .take(5)
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let _ = follow.kill();
    let _ = follow.wait();
    let counts: Vec<u64> = lines
        .iter()
        .map(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            e["message"]
                .as_str()
                .unwrap()
                .trim_start_matches("tick ")
                .parse()
                .unwrap()
        })
        .collect();
    assert!(counts.windows(2).all(|w| w[1] == w[0] + 1), "{counts:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Files named `name` anywhere under `dir`.
fn find_files(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(find_files(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            found.push(p);
        }
    }
    found
}

fn live_records(log: &std::path::Path) -> usize {
    flowbus_nodes::mqtt_store::replay(&std::fs::read(log).unwrap_or_default())
        .live
        .len()
}

/// Brokers A (input) and B (output), a daemon bridging A → B at QoS 1 (ack timeout 60 s),
/// and one publication that the daemon has handed to B's connection but that B has not
/// acknowledged: B is frozen while it goes out. Returns with B still frozen and the path of
/// the publisher's in-flight log (one live record). With `v5` the publisher speaks MQTT v5
/// and adds a user property `trace: t-1`; with `retain` it publishes retained.
async fn a_publication_in_flight(
    v5: bool,
    retain: bool,
) -> (Broker, Broker, Daemon, std::path::PathBuf) {
    let a = Broker::start("");
    let b = Broker::start("");
    let mut nodes = vec![
        json!({"id": "in", "type": "MQTTSubscribe", "url": a.url(), "topic": "crash/in", "qos": 1}),
        json!({"id": "out", "type": "MQTTPublish", "url": b.url(), "topic": "crash/out", "qos": 1, "ack_timeout": "60s", "retain": retain}),
    ];
    let mut connections = vec![json!({"from": "in.Out", "to": "out"})];
    if v5 {
        nodes[1]["version"] = json!(5);
        nodes.push(json!({"id": "tag", "type": "Compute", "code":
            "LocalEnvironment.Destination = #{ MQTT: #{ Output: #{ UserProperties: #{ trace: \"t-1\" } } } };"}));
        connections = vec![
            json!({"from": "in.Out", "to": "tag"}),
            json!({"from": "tag.Out", "to": "out"}),
        ];
    }
    let flow = json!({"name": "crash", "nodes": nodes, "connections": connections}).to_string();
    let d = start(&with_token(""), &[("crash.json", &flow)]);
    d.wait_api().await;
    cli_until(&d, &["stats", "--json"], Duration::from_secs(20), |o| {
        serde_json::from_str::<Value>(o).is_ok_and(|v| {
            v["servers"][b.url()]["OpenConnections"] == 1
                && v["servers"][a.url()]["OpenConnections"] == 1
        })
    })
    .await;
    cli_until(
        &d,
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    let logs = find_files(&d.dir, "inflight.log");
    assert_eq!(logs.len(), 1, "one publisher log under {:?}", d.dir);
    let log = logs[0].clone();
    assert_eq!(live_records(&log), 0);

    // B stops answering; the publication goes out on the socket and waits for its PUBACK.
    b.freeze();
    let producer = Client::connect(&a.url(), false).await;
    producer
        .publish("crash/in", "{\"survives\": true}", 1)
        .await;
    common::wait_until(Duration::from_secs(10), || live_records(&log) == 1).await;
    (a, b, d, log)
}

/// [`a_publication_in_flight`], then the daemon is killed (SIGKILL).
async fn crash_with_a_publication_in_flight(
    v5: bool,
) -> (Broker, Broker, Daemon, std::path::PathBuf) {
    let (a, b, mut d, log) = a_publication_in_flight(v5, false).await;
    let mut child = d.child.take().expect("running");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    (a, b, d, log)
}

/// A QoS 1 publication that the daemon has handed to the output broker's connection, but that
/// is not acknowledged when the daemon crashes, is sent by the next start: the publisher's
/// in-flight log (`persistence = "file"`, the default) keeps it. The input broker already has
/// its ack, and what the old connection wrote reaches the output broker before anyone
/// subscribes there, so the log is the only place the message can come from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_in_flight_survives_a_crash_of_the_daemon() {
    let (_a, b, mut d, log) = crash_with_a_publication_in_flight(false).await;
    // B reads what the dead connection wrote (delivered to nobody: no subscriber yet) and
    // keeps the publisher's session.
    b.thaw();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let consumer = Client::connect(&b.url(), false).await;
    consumer.subscribe("crash/out", 1).await;

    d.start();
    let got = consumer.take_json(1, Duration::from_secs(20)).await;
    assert_eq!(
        got,
        vec![("crash/out".to_string(), json!({"survives": true}))],
        "log:\n{}",
        d.stderr()
    );
    // Acknowledged now: nothing live in the log.
    common::wait_until(Duration::from_secs(10), || live_records(&log) == 0).await;
    assert!(d.terminate(Duration::from_secs(15)).success());
}

/// The same crash, but the output broker is restarted without persistence: it has no session
/// for the publisher, and Paho drops what it had in flight. flowbus reads the publication back
/// from its in-flight log and publishes it again, and the activity log says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_in_flight_dropped_for_a_lost_session_are_published_again() {
    lost_session(false).await;
}

/// The same with MQTT v5: the publication goes out again with its properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publications_dropped_for_a_lost_session_are_published_again_with_their_properties() {
    lost_session(true).await;
}

async fn lost_session(v5: bool) {
    let (_a, mut b, mut d, log) = crash_with_a_publication_in_flight(v5).await;
    b.kill();
    b.start_again();
    let consumer = Client::connect(&b.url(), v5).await;
    consumer.subscribe("crash/out", 1).await;
    d.start();
    d.wait_api().await;
    let m = consumer
        .next(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("nothing published again; log:\n{}", d.stderr()));
    assert_eq!(m.topic(), "crash/out");
    assert_eq!(&*m.payload_str(), "{\"survives\":true}");
    assert_eq!(m.qos() as i32, 1);
    if v5 {
        let up: Vec<(String, String)> = m.properties().user_iter().collect();
        assert_eq!(up, [("trace".to_string(), "t-1".to_string())]);
    }
    let out = cli_until(
        &d,
        &["log", "--number", "BIP12114", "--json"],
        Duration::from_secs(20),
        |o| !o.trim().is_empty(),
    )
    .await;
    let e: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(e["severity"], "warning", "{e}");
    assert_eq!(e["tags"]["count"], 1, "{e}");
    assert_eq!(e["tags"]["restored"], 1, "{e}");
    let text = e["message"].as_str().unwrap();
    assert!(
        text.starts_with("1 publication(s) in flight were dropped")
            && text.contains(&b.url())
            && text.contains("had no session")
            && text.contains("1 from before flowbus started are published again"),
        "{text}"
    );
    let again = cli_until(
        &d,
        &["log", "--number", "BIP12097", "--json"],
        Duration::from_secs(20),
        |o| o.contains("Published again 1 publication(s)"),
    )
    .await;
    assert!(again.contains("acknowledged"), "{again}");
    // Acknowledged by the new broker: nothing live in the log.
    common::wait_until(Duration::from_secs(10), || live_records(&log) == 0).await;
    // Nothing was lost on the way.
    let (_, lost, _) = d.cli(&["log", "--number", "BIP12099", "--json"]);
    assert!(lost.trim().is_empty(), "{lost}");
    assert!(d.terminate(Duration::from_secs(15)).success());
}

/// A running flow's publication in flight when the output broker restarts without persistence:
/// Paho drops it with the session (failing its token), and MQTTPublish retries it on the new
/// connection at once — without asking for yet another reconnect, and not at its ack timeout
/// (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_flow_publishes_again_at_once_when_the_broker_lost_the_session() {
    // Retained: the daemon may reconnect and publish before the consumer below subscribes.
    let (_a, mut b, d, log) = a_publication_in_flight(false, true).await;
    b.kill_frozen();
    b.start_again();
    let consumer = Client::connect(&b.url(), false).await;
    consumer.subscribe("crash/out", 1).await;
    let m = consumer
        .next(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("not published again within 20 s; log:\n{}", d.stderr()));
    assert_eq!(&*m.payload_str(), "{\"survives\":true}");
    let warned = cli_until(
        &d,
        &["log", "--number", "BIP4311"],
        Duration::from_secs(5),
        |o| o.contains("had no session for it when it reconnected"),
    )
    .await;
    assert!(warned.contains("; retrying once"), "{warned}");
    assert!(!warned.contains("reconnecting and retrying"), "{warned}");
    common::wait_until(Duration::from_secs(10), || live_records(&log) == 0).await;
    let (_, lost, _) = d.cli(&["log", "--number", "BIP12099"]);
    assert!(lost.trim().is_empty(), "{lost}");
}

/// MQTT v5 session expiry (`[servers.NAME] session_expiry`): a persistent subscription outlives
/// a stop of the daemon for as long as the configured expiry, and no longer. With an expiry of
/// an hour, a message sent while the daemon is down is delivered when it starts again; with
/// one second, the broker has dropped the session (and the message) by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_decides_what_a_stopped_daemon_gets_later() {
    for (expiry, delivered) in [("1h", true), ("1s", false)] {
        let b = Broker::start("");
        let flow = json!({
            "name": "expiry",
            "nodes": [
                {"id": "in", "type": "MQTTSubscribe", "server": "b", "topic": "expiry/in", "qos": 1},
                {"id": "out", "type": "MQTTPublish", "server": "b", "topic": "expiry/out", "qos": 1}
            ],
            "connections": [{"from": "in.Out", "to": "out"}]
        })
        .to_string();
        let config = with_token(&format!(
            "[servers.b]\nurl = \"{}\"\nversion = 5\nsession_expiry = \"{expiry}\"\n",
            b.url()
        ));
        let mut d = start(&config, &[("expiry.json", &flow)]);
        d.wait_api().await;
        cli_until(
            &d,
            &["log", "--number", "BIP12095"],
            Duration::from_secs(20),
            |o| o.contains("Subscribed"),
        )
        .await;
        assert!(d.terminate(Duration::from_secs(15)).success());
        // Longer than the short expiry (mosquitto checks expiries about once a second).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let consumer = Client::connect(&b.url(), false).await;
        consumer.subscribe("expiry/out", 1).await;
        consumer
            .publish("expiry/in", "{\"while\": \"down\"}", 1)
            .await;

        d.start();
        d.wait_api().await;
        let resumed = cli_until(
            &d,
            &["log", "--number", "BIP12063", "--json"],
            Duration::from_secs(20),
            // Two connections (in, out) per start, and the log survives the restart.
            |o| o.lines().count() >= 4,
        )
        .await;
        let got = consumer.next(Duration::from_secs(3)).await;
        assert_eq!(
            got.is_some(),
            delivered,
            "session_expiry {expiry}: got {got:?}; connections:\n{resumed}"
        );
        // The subscriber's second connection says whether the broker kept the session.
        let subscriber_connects: Vec<Value> = resumed
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["node"] == "in")
            .collect();
        assert_eq!(
            subscriber_connects.last().unwrap()["tags"]["session_present"],
            delivered,
            "session_expiry {expiry}: {resumed}"
        );
        assert!(d.terminate(Duration::from_secs(15)).success());
    }
}

/// Threads of a process by name.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"));
            comm.is_ok_and(|c| c.trim() == name)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_worker_threads_sets_how_many_threads_run_the_flows() {
    // 3: not what the runtime would pick by itself on the 1- and 2-core machines this runs on.
    let d = start(
        &with_token("worker_threads = 3\n"),
        &[("tick.json", &tick_flow("100ms"))],
    );
    d.wait_api().await;
    cli_until(
        &d,
        &["log", "--number", "BIP1003"],
        Duration::from_secs(10),
        |o| o.contains("tick 3"),
    )
    .await;
    assert_eq!(
        threads_named(d.pid(), "tokio-rt-worker"),
        3,
        "{}",
        d.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_events_warnings_and_errors_not_every_message() {
    let flows = [("tick.json", tick_flow("50ms"))];
    let flows: Vec<(&str, &str)> = flows.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let mut d = start(&with_token(""), &flows);
    d.wait_api().await;
    // Ten ticks are in the log (API, files) ...
    cli_until(
        &d,
        &["log", "--number", "BIP1003"],
        Duration::from_secs(10),
        |o| o.contains("tick 10"),
    )
    .await;
    // ... but not on the console, which has the deploy and the start.
    let console = d.stderr();
    assert!(!console.contains("BIP1003"), "{console}");
    assert!(
        console.contains("BIP1005") && console.contains("BIP1001"),
        "{console}"
    );
    // The setting puts them on the console too.
    assert!(d.terminate(Duration::from_secs(10)).success());
    let config = with_token("[activity_log]\nconsole_per_message = true\n");
    std::fs::write(d.dir.join("flowbus.toml"), config).unwrap();
    d.start();
    d.wait_log("BIP1003 tick 3", 1, Duration::from_secs(10))
        .await;
}
