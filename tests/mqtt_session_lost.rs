//! A persistent subscriber whose broker comes back without its session (mosquitto restarted
//! without persistence: CONNACK session-present 0) says so: BIP12118, a warning naming the
//! client id and saying that what the broker had queued for it is gone. Then it subscribes
//! again and the flow goes on.

mod common;

use std::time::Duration;

use common::{fast_config, wait_until, Broker, Client, Running};
use flowbus_runtime::activity::Severity;
use serde_json::json;

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_subscriber_warns_when_the_broker_lost_its_session() {
    // Without persistence (the helper's default), as in the issue.
    let mut broker = Broker::start("");
    let url = broker.url();
    let flow_json = json!({
        "name": "relay",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1,
             "clean_session": false, "client_id": "lost-sub"},
            {"id": "fwd", "type": "Compute", "code": "Root.Body.relayed = true;"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "out", "qos": 1}
        ],
        "connections": [
            {"from": "in.Out", "to": "fwd"},
            {"from": "fwd.Out", "to": "out"}
        ]
    })
    .to_string();
    let mut flow = Running::start(&flow_json, &fast_config(""), &[]);
    flow.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out", 1).await;
    c.publish("in", json!({"n": 1}).to_string(), 1).await;
    assert_eq!(
        c.take_json(1, T).await[0].1,
        json!({"n": 1, "relayed": true})
    );
    // The first connect of a run cannot tell a lost session from a new one: no warning.
    assert!(flow.entries("BIP12118").is_empty(), "{:?}", flow.log());

    // The broker forgets every session.
    broker.terminate();
    broker.start_again();
    let e = flow.wait_entry("BIP12118", "lost-sub", T).await;
    assert_eq!(e.severity, Severity::Warning);
    assert_eq!(e.node, "in");
    assert!(e.message.contains("is gone"), "{}", e.message);
    assert_eq!(e.tags["client_id"], json!("lost-sub"));

    // It subscribed again: the flow relays what is published now.
    wait_until(T, || {
        flow.entries("BIP12095")
            .iter()
            .filter(|e| e.message.contains("Subscribed to 'in'"))
            .count()
            >= 2
    })
    .await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out", 1).await;
    c.publish("in", json!({"n": 2}).to_string(), 1).await;
    assert_eq!(
        c.take_json(1, T).await[0].1,
        json!({"n": 2, "relayed": true})
    );
    assert_eq!(flow.entries("BIP12118").len(), 1);
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_subscriber_that_kept_its_session_does_not_warn() {
    let mut broker = Broker::start("persistence true\nautosave_interval 1");
    let url = broker.url();
    let flow_json = json!({
        "name": "kept",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1,
             "clean_session": false, "client_id": "kept-sub"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string();
    let mut flow = Running::start(&flow_json, &fast_config(""), &[]);
    flow.wait_subscribed(1).await;
    broker.terminate();
    broker.start_again();
    flow.wait_entry("BIP12095", "resumed with the session", T)
        .await;
    assert!(flow.entries("BIP12118").is_empty(), "{:?}", flow.log());
    flow.stop().await;
}
