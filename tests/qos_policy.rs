//! QoS policy alignment against real mosquitto listeners with `max_qos 1` (the seed's
//! gateway) and a normal one, over MQTT 3.1.1 and v5: detection (CONNACK, probe and SUBACK,
//! server policy), `fail` and `downgrade`, per-topic rules, and no reconnect storm.

mod common;

use std::time::Duration;

use common::{fast_config, wait_until, Broker, Client, Running};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

fn server(url: &str, version: u8, extra: &str) -> String {
    fast_config(&format!(
        "[servers.gateway]\nurl = \"{url}\"\nversion = {version}\n{extra}\n"
    ))
}

/// in (QoS 1 from a normal broker) → out (publish at `qos` to the gateway) with Failure to
/// an error topic on the normal broker.
fn publish_flow(normal: &str, qos: Option<u8>) -> String {
    let mut out = json!({"id": "out", "type": "MQTTPublish", "server": "gateway", "topic": "devices/d1/provision"});
    if let Some(q) = qos {
        out["qos"] = json!(q);
    }
    json!({
        "name": "provisioning",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": normal, "topic": "in", "qos": 1},
            out,
            {"id": "report", "type": "Compute", "code": "Root.Body = #{ error: ExceptionList.ConfigurationException.Text, number: ExceptionList.ConfigurationException.Number };"},
            {"id": "errors", "type": "MQTTPublish", "url": normal, "topic": "errors", "qos": 1}
        ],
        "connections": [
            {"from": "in.Out", "to": "out"},
            {"from": "out.Failure", "to": "report"},
            {"from": "report.Out", "to": "errors"}
        ]
    })
    .to_string()
}

async fn publish_above_limit_fails(version: u8) {
    let normal = Broker::start("");
    let gateway = Broker::start("max_qos 1");
    let mut flow = Running::start(
        &publish_flow(&normal.url(), Some(2)),
        &server(&gateway.url(), version, ""),
        &[],
    );
    flow.wait_subscribed(1).await;
    // The limit is learnt when the publish node connects (CONNACK on v5, a probe on 3.1.1).
    flow.wait_entry("BIP12113", "allows at most QoS 1", T).await;
    let c = Client::connect(&normal.url(), false).await;
    c.subscribe("errors", 1).await;
    for i in 0..3 {
        c.publish("in", json!({"device": i}).to_string(), 1).await;
    }
    let got = c.take_json(3, T).await;
    let err = &got[0].1;
    assert_eq!(err["number"], 12110);
    assert_eq!(
        err["error"].as_str().unwrap().split("; fix:").next().unwrap(),
        format!(
            "QoS policy mismatch on node 'out', topic 'devices/d1/provision': requested QoS 2, allowed QoS 1 on server gateway (limited by {})",
            if version == 5 { "the broker's Maximum QoS (MQTT v5 CONNACK)" } else { "the QoS the broker granted to a subscription" }
        )
    );
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("fix: lower the node's qos to 1"),
        "{err}"
    );
    // Caught before it reached the broker: no disconnect, no reconnect storm.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = flow.server_stats(&gateway.url());
    assert_eq!(s.qos_mismatches, 3);
    assert_eq!(s.messages_sent, 0);
    assert_eq!(s.failed_connections, 0);
    assert!(
        flow.entries("BIP12062").is_empty(),
        "connection lost: {:?}",
        flow.entries("BIP12062")
    );
    assert_eq!(
        flow.entries("BIP12063")
            .iter()
            .filter(|e| e.node == "out")
            .count(),
        1,
        "one connect only"
    );
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_above_the_brokers_maximum_qos_fails_clearly() {
    publish_above_limit_fails(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_publish_above_the_probed_limit_fails_clearly() {
    publish_above_limit_fails(3).await;
}

async fn publish_downgrades(version: u8) {
    let normal = Broker::start("");
    let gateway = Broker::start("max_qos 1");
    let mut flow = Running::start(
        &publish_flow(&normal.url(), Some(2)),
        &server(&gateway.url(), version, "on_qos_mismatch = \"downgrade\""),
        &[],
    );
    flow.wait_subscribed(1).await;
    flow.wait_entry("BIP12113", "allows at most QoS 1", T).await;
    let consumer = Client::connect(&gateway.url(), version == 5).await;
    consumer.subscribe("devices/#", 1).await;
    let c = Client::connect(&normal.url(), false).await;
    for i in 0..5 {
        c.publish("in", json!({"device": i}).to_string(), 1).await;
    }
    for _ in 0..5 {
        let m = consumer
            .next(T)
            .await
            .expect("published at the allowed QoS");
        assert_eq!(m.qos() as i32, 1);
    }
    wait_until(T, || flow.server_stats(&gateway.url()).messages_sent == 5).await;
    let s = flow.server_stats(&gateway.url());
    assert_eq!(s.qos_downgrades, 5);
    let warnings = flow.entries("BIP12111");
    assert_eq!(
        warnings.len(),
        1,
        "one warning per node and topic: {warnings:?}"
    );
    assert!(
        warnings[0]
            .message
            .contains("requested QoS 2, allowed QoS 1"),
        "{}",
        warnings[0].message
    );
    assert!(
        warnings[0].message.contains(
            "; on_qos_mismatch = \"downgrade\": using QoS 1 (for QoS 2, allow QoS 2 on the broker"
        ),
        "{}",
        warnings[0].message
    );
    assert_eq!(warnings[0].tags["topic"], "devices/d1/provision");
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_downgrades_with_one_warning() {
    publish_downgrades(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_publish_downgrades_with_one_warning() {
    publish_downgrades(3).await;
}

fn subscribe_flow(out_url: &str) -> String {
    json!({
        "name": "control",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "server": "gateway", "topic": "control/#", "qos": 2},
            {"id": "out", "type": "MQTTPublish", "url": out_url, "topic": "seen", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_above_the_limit_fails_over_v5_and_v311() {
    for version in [5u8, 3] {
        let normal = Broker::start("");
        let gateway = Broker::start("max_qos 1");
        let mut flow = Running::start(
            &subscribe_flow(&normal.url()),
            &server(&gateway.url(), version, ""),
            &[],
        );
        let e = flow
            .wait_entry(
                "BIP12110",
                "QoS policy mismatch on node 'in', topic 'control/#'",
                T,
            )
            .await;
        assert_eq!(e.severity, flowbus_runtime::activity::Severity::Error);
        assert!(
            e.message
                .contains("requested QoS 2, allowed QoS 1 on server gateway"),
            "{}",
            e.message
        );
        // v5: known from the CONNACK, so never subscribed; 3.1.1: the SUBACK granted 1, so
        // the subscription is taken back.
        let end = if version == 5 {
            "; not subscribed"
        } else {
            "; unsubscribed"
        };
        assert!(e.message.ends_with(end), "v{version}: {}", e.message);
        // Nothing flows: the subscription is not in place.
        let c = Client::connect(&gateway.url(), false).await;
        let seen = Client::connect(&normal.url(), false).await;
        seen.subscribe("seen", 1).await;
        c.publish("control/valve", "{}", 1).await;
        assert!(
            seen.next(Duration::from_millis(500)).await.is_none(),
            "v{version}: message passed"
        );
        assert_eq!(flow.server_stats(&gateway.url()).qos_mismatches, 1);
        flow.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_downgrades_and_messages_flow() {
    for version in [5u8, 3] {
        let normal = Broker::start("");
        let gateway = Broker::start("max_qos 1");
        let mut flow = Running::start(
            &subscribe_flow(&normal.url()),
            &server(&gateway.url(), version, "on_qos_mismatch = \"downgrade\""),
            &[],
        );
        let sub = flow
            .wait_entry("BIP12095", "Subscribed to 'control/#'", T)
            .await;
        // v5 knows the limit from the CONNACK and asks for 1; 3.1.1 asks for 2 and accepts
        // the SUBACK's 1.
        let requested = if version == 5 { 1 } else { 2 };
        assert_eq!(
            sub.message,
            format!("Subscribed to 'control/#' (requested QoS {requested}, granted 1)"),
            "v{version}"
        );
        flow.wait_entry("BIP12111", "requested QoS 2, allowed QoS 1", T)
            .await;
        let seen = Client::connect(&normal.url(), false).await;
        seen.subscribe("seen", 1).await;
        let c = Client::connect(&gateway.url(), false).await;
        c.publish("control/valve", json!({"open": true}).to_string(), 1)
            .await;
        assert_eq!(
            seen.take_json(1, T).await[0].1,
            json!({"open": true}),
            "v{version}"
        );
        assert_eq!(flow.server_stats(&gateway.url()).qos_downgrades, 1);
        flow.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_policy_max_qos_applies_before_the_broker_is_asked() {
    let normal = Broker::start("");
    let gateway = Broker::start("");
    let mut flow = Running::start(
        &publish_flow(&normal.url(), Some(2)),
        &server(&gateway.url(), 3, "max_qos = 1"),
        &[],
    );
    flow.wait_subscribed(1).await;
    let c = Client::connect(&normal.url(), false).await;
    c.subscribe("errors", 1).await;
    c.publish("in", "{}", 1).await;
    let got = c.take_json(1, T).await;
    assert!(
        got[0].1["error"].as_str().unwrap().contains("allowed QoS 1 on server gateway (limited by max_qos of [servers.gateway] in flowbus.toml)"),
        "{}",
        got[0].1
    );
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_topic_rules_choose_the_qos_and_the_log_names_the_rule() {
    let gateway = Broker::start("");
    let rules = "[[servers.gateway.qos_rules]]\ntopic = \"devices/+/provision\"\nqos = 2\n[[servers.gateway.qos_rules]]\ntopic = \"telemetry/#\"\nqos = 1\n[[servers.gateway.qos_rules]]\ntopic = \"diag/#\"\nqos = 0\n";
    let flow_json = json!({
        "name": "hybrid",
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": "10ms", "count": 3},
            {"id": "route", "type": "Compute", "code": r#"
                let topics = ["devices/d1/provision", "telemetry/boiler", "diag/rssi"];
                LocalEnvironment.Destination = #{ MQTT: #{ Output: #{ TopicName: topics[LocalEnvironment.Timer.Input.Count - 1] } } };
            "#},
            {"id": "out", "type": "MQTTPublish", "server": "gateway"}
        ],
        "connections": [{"from": "tick.Out", "to": "route"}, {"from": "route.Out", "to": "out"}]
    })
    .to_string();
    let consumer = Client::connect(&gateway.url(), false).await;
    consumer.subscribe("#", 2).await;
    let mut flow = Running::start(&flow_json, &server(&gateway.url(), 3, rules), &[]);
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let m = consumer.next(T).await.expect("published");
        got.insert(m.topic().to_string(), m.qos() as i32);
    }
    assert_eq!(got["devices/d1/provision"], 2);
    assert_eq!(got["telemetry/boiler"], 1);
    assert_eq!(got["diag/rssi"], 0);
    let rule = flow
        .wait_entry("BIP12112", "QoS rule 'telemetry/#'", T)
        .await;
    assert_eq!(
        rule.message,
        "QoS rule 'telemetry/#' of server gateway decided QoS 1 for topic 'telemetry/boiler'"
    );
    assert_eq!(rule.tags["rule"], "telemetry/#");
    let published = flow
        .wait_entry("BIP12097", "Published to 'devices/d1/provision' (QoS 2", T)
        .await;
    assert_eq!(published.tags["rule"], "devices/+/provision");
    flow.stop().await;
}

fn doctor(dir: &std::path::Path, extra_args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .arg("doctor")
        .arg("--config")
        .arg(dir.join("flowbus.toml"))
        .arg("--flows")
        .arg(dir.join("flows"))
        .args(extra_args)
        .output()
        .expect("run flowbus doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn doctor_setup(config: &str, flows: &[(&str, String)]) -> std::path::PathBuf {
    let dir = common::scratch("doctor");
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::write(dir.join("flowbus.toml"), config).unwrap();
    for (name, text) in flows {
        std::fs::write(dir.join("flows").join(name), text).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_the_mismatch_over_v5_and_v311_and_explains_the_fix() {
    for version in [5u8, 3] {
        let normal = Broker::start("");
        let gateway = Broker::start("max_qos 1");
        let dir = doctor_setup(
            &server(&gateway.url(), version, ""),
            &[("provisioning.json", publish_flow(&normal.url(), Some(2)))],
        );
        let (code, table) = doctor(&dir, &[]);
        assert_eq!(code, 1, "v{version}: a mismatch exits non-zero:\n{table}");
        let how = if version == 5 {
            "1 (CONNACK)"
        } else {
            "1 (probe subscription)"
        };
        assert!(
            table.contains(&format!("reachable  -    anonymous  {how}")),
            "v{version}:\n{table}"
        );
        let row = table
            .lines()
            .find(|l| l.contains("devices/d1/provision"))
            .expect("a row for the publish node");
        assert!(
            row.contains("  2          1      mismatch  "),
            "v{version}: {row}"
        );
        assert!(
            row.contains("fix: lower the node's qos to 1, allow QoS 2 on the broker"),
            "{row}"
        );
        let (_, json) = doctor(&dir, &["--json"]);
        let report: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(report["ok"], false);
        let out = report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "out")
            .unwrap();
        assert_eq!(out["requested"], 2);
        assert_eq!(out["limit"], 1);
        assert_eq!(out["verdict"], "mismatch");
        // The subscriber on the normal broker is fine.
        let input = report["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "in")
            .unwrap();
        assert_eq!(input["verdict"], "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_aligned_flows_and_fails_on_an_unreachable_server() {
    let normal = Broker::start("");
    let gateway = Broker::start("max_qos 1");
    // QoS 1 on the gateway: aligned.
    let dir = doctor_setup(
        &server(&gateway.url(), 3, ""),
        &[("p.json", publish_flow(&normal.url(), Some(1)))],
    );
    let (code, table) = doctor(&dir, &[]);
    assert_eq!(code, 0, "{table}");
    assert!(
        table.ends_with("All MQTT nodes can run at the QoS they ask for.\n"),
        "{table}"
    );
    // The gateway down.
    let down = format!("tcp://127.0.0.1:{}", common::free_port());
    let dir = doctor_setup(
        &server(&down, 3, ""),
        &[("p.json", publish_flow(&normal.url(), Some(1)))],
    );
    let (code, table) = doctor(&dir, &["--timeout", "2s"]);
    assert_eq!(code, 1, "{table}");
    assert!(table.contains("UNREACHABLE"), "{table}");
    assert!(
        table.contains(&format!("fix: make {down} reachable")),
        "{table}"
    );
}
