//! MQTTSubscribe → Compute → MQTTPublish against a real mosquitto: QoS 0/1/2, the
//! LocalEnvironment the script sees, wildcards, several topics, retained messages, domains,
//! parser failures, publish overrides and WrittenDestination.

mod common;

use std::time::Duration;

use common::{fast_config, Broker, Client, Running};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn bridge(url: &str, sub_topic: serde_json::Value, qos: i32, domain: &str, script: &str) -> String {
    json!({
        "name": "bridge",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": sub_topic, "qos": qos, "domain": domain},
            {"id": "enrich", "type": "Compute", "code": script},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": format!("out/q{qos}"), "qos": qos},
            {"id": "failed", "type": "MQTTPublish", "url": url, "topic": "errors", "qos": 1},
            {"id": "tag-error", "type": "Compute", "code": "Root.Body = #{ error: ExceptionList.ParserException.Text, number: ExceptionList.ParserException.Number, raw_len: Root.Body.len() };"}
        ],
        "connections": [
            {"from": "in.Out", "to": "enrich"},
            {"from": "enrich.Out", "to": "out"},
            {"from": "in.Failure", "to": "tag-error"},
            {"from": "tag-error.Out", "to": "failed"}
        ]
    })
    .to_string()
}

const SEES_INPUT: &str = r#"
let i = LocalEnvironment.MQTT.Input;
Root.Body.seen = #{ qos: i.QualityOfService, topic: i.Topic, dup: i.Duplicate, retained: i.Retained };
"#;

async fn round_trip(qos: i32) {
    let broker = Broker::start("");
    let url = broker.url();
    let mut flow = Running::start(
        &bridge(&url, json!("in/+/data"), qos, "JSON", SEES_INPUT),
        &fast_config(""),
        &[],
    );
    flow.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out/#", 2).await;
    for i in 0..5 {
        c.publish(&format!("in/dev{i}/data"), json!({"n": i}).to_string(), qos)
            .await;
    }
    let got = c.take_json(5, T).await;
    for (i, (topic, body)) in got.iter().enumerate() {
        assert_eq!(topic, &format!("out/q{qos}"));
        assert_eq!(
            body,
            &json!({"n": i, "seen": {"qos": qos, "topic": format!("in/dev{i}/data"), "dup": false, "retained": false}})
        );
    }
    // Statistics and activity log, as an operator would see them.
    // The publisher counts a message once the broker has acknowledged it, which may be just
    // after our client got it.
    common::wait_until(T, || flow.server_stats(&url).messages_sent == 5).await;
    let s = flow.server_stats(&url);
    assert_eq!(s.messages_received, 5, "{s:?} {:?}", flow.log());
    assert_eq!(s.messages_sent, 5);
    assert_eq!(s.open_connections, 3, "one client per MQTT node");
    assert!(s.bytes_received > 0 && s.bytes_sent > s.bytes_received);
    let sub = flow
        .wait_entry("BIP12095", "Subscribed to 'in/+/data'", T)
        .await;
    assert_eq!(
        sub.message,
        format!("Subscribed to 'in/+/data' (requested QoS {qos}, granted {qos})")
    );
    assert_eq!(sub.tags["topic"], "in/+/data");
    assert_eq!(sub.tags["url"], url.as_str());
    assert!(sub.tags["client_id"]
        .as_str()
        .unwrap()
        .contains("bridge-in"));
    flow.wait_entry("BIP12063", "Connected to", T).await;
    let rec = flow
        .wait_entry("BIP12065", "Received a message on 'in/dev0/data'", T)
        .await;
    assert_eq!(rec.tags["qos"], qos);
    let publ = flow
        .wait_entry(
            "BIP12097",
            &format!("Published to 'out/q{qos}' (QoS {qos}"),
            T,
        )
        .await;
    assert_eq!(publ.tags["topic"], format!("out/q{qos}"));
    flow.stop().await;
    let s = flow.server_stats(&url);
    assert_eq!(s.open_connections, 0);
    assert_eq!(s.closed_connections, 3);
    flow.wait_entry("BIP12092", "Disconnected from", T).await;
    if qos == 0 {
        // A clean session unsubscribes; a persistent one keeps its subscription at the broker.
        flow.wait_entry("BIP12095", "Unsubscribed from 'in/+/data'", T)
            .await;
    } else {
        flow.wait_entry("BIP12101", "Stopping receipt", T).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_qos0() {
    round_trip(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_qos1() {
    round_trip(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_qos2() {
    round_trip(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_topics_wildcards_and_retained() {
    let broker = Broker::start("");
    let url = broker.url();
    let c = Client::connect(&url, false).await;
    // Retained before the flow subscribes: delivered on subscribe with Retained = true.
    c.publish_retained("status/boiler", json!({"up": true}).to_string(), 1)
        .await;
    c.subscribe("out/#", 1).await;
    let mut flow = Running::start(
        &bridge(&url, json!(["status/#", "cmd/+"]), 1, "JSON", SEES_INPUT),
        &fast_config(""),
        &[],
    );
    flow.wait_subscribed(2).await;
    let got = c.take_json(1, T).await;
    assert_eq!(
        got[0].1["seen"],
        json!({"qos": 1, "topic": "status/boiler", "dup": false, "retained": true})
    );
    c.publish("cmd/start", json!({"go": 1}).to_string(), 1)
        .await;
    c.publish("other/x", json!({"no": 1}).to_string(), 1).await;
    c.publish("status/a/b/c", json!({"deep": 1}).to_string(), 1)
        .await;
    let got = c.take_json(2, T).await;
    assert_eq!(got[0].1["seen"]["topic"], "cmd/start");
    assert_eq!(got[0].1["seen"]["retained"], false);
    assert_eq!(got[1].1["seen"]["topic"], "status/a/b/c");
    assert!(
        c.next(Duration::from_millis(300)).await.is_none(),
        "other/x matched no filter"
    );
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_blob_domains_and_parser_failure() {
    let broker = Broker::start("");
    let url = broker.url();
    // TEXT: the body is a string.
    let mut text = Running::start(
        &bridge(
            &url,
            json!("text/in"),
            1,
            "TEXT",
            "Root.Body = #{ upper: Root.Body.to_upper(), len: Root.Body.len() };",
        ),
        &fast_config(""),
        &[],
    );
    // BLOB: the body is bytes; the script sees a blob.
    let mut blob = Running::start(
        &bridge(
            &url,
            json!("blob/in"),
            1,
            "BLOB",
            "Root.Body = #{ len: Root.Body.len(), first: Root.Body[0] };",
        )
        .replace("out/q1", "out/blob"),
        &fast_config(""),
        &[],
    );
    // JSON: a payload that is not JSON goes to Failure with a parser exception.
    let mut json_flow = Running::start(
        &bridge(&url, json!("json/in"), 1, "JSON", SEES_INPUT),
        &fast_config(""),
        &[],
    );
    text.wait_subscribed(1).await;
    blob.wait_subscribed(1).await;
    json_flow.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out/#", 1).await;
    c.subscribe("errors", 1).await;
    c.publish("text/in", "hello", 1).await;
    let got = c.take_json(1, T).await;
    assert_eq!(got[0].1, json!({"upper": "HELLO", "len": 5}));
    c.publish("blob/in", vec![0xffu8, 0, 1], 1).await;
    let got = c.take_json(1, T).await;
    assert_eq!(
        got[0],
        ("out/blob".to_string(), json!({"len": 3, "first": 255}))
    );
    c.publish("json/in", "not json {", 1).await;
    let got = c.take_json(1, T).await;
    assert_eq!(got[0].0, "errors");
    assert_eq!(got[0].1["number"], 5705);
    assert_eq!(got[0].1["raw_len"], 10);
    assert!(
        got[0].1["error"]
            .as_str()
            .unwrap()
            .starts_with("payload is not valid JSON (line 1 column 2"),
        "{}",
        got[0].1
    );
    let stats = json_flow.flow.node_stats();
    let input = stats.iter().find(|n| n.node == "in").unwrap();
    assert_eq!(input.terminals["Failure"], 1);
    assert_eq!(input.terminals["Out"], 0);
    text.stop().await;
    blob.stop().await;
    json_flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_overrides_and_written_destination() {
    let broker = Broker::start("");
    let other = Broker::start("");
    let url = broker.url();
    let flow_json = json!({
        "name": "overrides",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1},
            {"id": "route", "type": "Compute", "code": r#"
                let o = #{};
                if Root.Body.to == "elsewhere" { o = #{ TopicName: "routed/" + Root.Body.id, qos: 2, retained: true, URL: Root.Body.url }; }
                else { o = #{ TopicName: "routed/" + Root.Body.id }; }
                LocalEnvironment.Destination = #{ MQTT: #{ Output: o } };
            "#},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "default", "qos": 1},
            {"id": "report", "type": "Compute", "code": "Root.Body = LocalEnvironment.WrittenDestination.MQTT; LocalEnvironment.Destination = #{};"},
            {"id": "receipts", "type": "MQTTPublish", "url": url, "topic": "receipts", "qos": 1}
        ],
        "connections": [
            {"from": "in.Out", "to": "route"},
            {"from": "route.Out", "to": "out"},
            {"from": "out.Out", "to": "report"},
            {"from": "report.Out", "to": "receipts"}
        ]
    })
    .to_string();
    let mut flow = Running::start(&flow_json, &fast_config(""), &[]);
    flow.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("routed/#", 2).await;
    c.subscribe("receipts", 1).await;
    let far = Client::connect(&other.url(), false).await;
    far.subscribe("routed/#", 2).await;
    c.publish("in", json!({"id": "a"}).to_string(), 1).await;
    let got = c.take_json(2, T).await;
    assert_eq!(got[0].0, "routed/a");
    assert_eq!(got[1].0, "receipts");
    let receipt = &got[1].1;
    assert_eq!(receipt["Topic"], "routed/a");
    assert_eq!(receipt["QoS"], 1);
    assert_eq!(receipt["MessageId"], 1);
    assert!(receipt["ClientId"]
        .as_str()
        .unwrap()
        .contains("overrides-out"));
    c.publish(
        "in",
        json!({"id": "b", "to": "elsewhere", "url": other.url()}).to_string(),
        1,
    )
    .await;
    let m = far.next(T).await.expect("published on the other broker");
    assert_eq!(m.topic(), "routed/b");
    assert_eq!(m.qos() as i32, 2);
    let got = c.take_json(1, T).await;
    assert_eq!(got[0].0, "receipts");
    assert_eq!(got[0].1["URL"], other.url().as_str());
    assert_eq!(got[0].1["QoS"], 2);
    assert_eq!(got[0].1["Retained"], true);
    // The retained flag took effect: a new subscriber gets it.
    let late = Client::connect(&other.url(), false).await;
    late.subscribe("routed/b", 1).await;
    assert!(late.next(T).await.expect("retained").retained());
    flow.stop().await;
}

/// The per-message log is sampled (10 entries a second per node, the rest summarised once a
/// second): a burst followed by silence is still fully accounted for, without a further
/// message to trigger the last summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_then_silence_is_fully_summarised_in_the_log() {
    let broker = Broker::start("");
    let url = broker.url();
    let flow = Running::start(
        &bridge(&url, json!("in/+/data"), 1, "JSON", "Root.Body.ok = true;"),
        &fast_config(""),
        &[],
    );
    flow.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out/#", 1).await;
    let n = 40u64;
    for i in 0..n {
        c.publish("in/dev/data", json!({"n": i}).to_string(), 1)
            .await;
    }
    c.take_json(n as usize, T).await;
    // Individual entries plus summarised ones add up to the burst, per node, once the second
    // in which the burst ended is over.
    let accounted = |single: &str, what: &str| {
        let one = flow.entries(single).len() as u64;
        let summarised: u64 = flow
            .entries("BIP12102")
            .iter()
            .filter(|e| e.message.contains(what))
            .map(|e| e.message.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        one + summarised
    };
    common::wait_until(Duration::from_secs(5), || {
        accounted("BIP12065", "received") == n && accounted("BIP12097", "published") == n
    })
    .await;
    assert!(flow.entries("BIP12065").len() < n as usize, "sampled");
}
