//! Closed paho clients are destroyed once no connect of theirs can still be in flight, on a
//! thread of ours, and the library keeps working. Its own test binary: the closed clients are
//! process-wide.

mod common;

use std::time::{Duration, Instant};

use common::{fast_config, wait_until, Broker, Client, Running};
use flowbus_nodes::mqtt_client::{closed_clients, reap_closed_clients, REAP_GRACE};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn bridge(url: &str) -> String {
    json!({
        "name": "bridge",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1},
            {"id": "enrich", "type": "Compute", "code": "Root.Body.seen = true;"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "out", "qos": 1}
        ],
        "connections": [
            {"from": "in.Out", "to": "enrich"},
            {"from": "enrich.Out", "to": "out"}
        ]
    })
    .to_string()
}

async fn bridges_one(url: &str, n: i64) -> Running {
    let flow = Running::start(&bridge(url), &fast_config(""), &[]);
    flow.wait_subscribed(1).await;
    let c = Client::connect(url, false).await;
    c.subscribe("out", 1).await;
    c.publish("in", json!({"n": n}).to_string(), 1).await;
    let got = c.take_json(1, T).await;
    assert_eq!(got[0].1, json!({"n": n, "seen": true}));
    flow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_clients_are_destroyed_after_their_grace_and_paho_keeps_working() {
    let broker = Broker::start("");
    let url = broker.url();
    let mut flow = bridges_one(&url, 1).await;
    flow.stop().await;
    drop(flow);
    // The subscriber's and the publisher's clients.
    wait_until(T, || closed_clients() >= 2).await;
    let closed = closed_clients();
    // Not before twice the connect timeout and the grace.
    assert_eq!(reap_closed_clients(Instant::now()), 0);
    assert_eq!(closed_clients(), closed);
    // Later: destroyed here, on a blocking thread of the test (a deadlock fails the test).
    // Passing a later time is only sound because both clients' connects ended long ago: a
    // client reaped while a connect token still held it would be destroyed on Paho's thread
    // when that connect ends (seen with a frozen broker: the deadlock the grace prevents).
    let later = Instant::now() + Duration::from_secs(2 * 30) + REAP_GRACE + Duration::from_secs(1);
    let reaped = tokio::time::timeout(
        T,
        tokio::task::spawn_blocking(move || reap_closed_clients(later)),
    )
    .await
    .expect("destroying the closed clients hangs")
    .unwrap();
    assert_eq!(reaped, closed);
    assert_eq!(closed_clients(), 0);
    // New clients connect and bridge as before.
    let mut again = bridges_one(&url, 2).await;
    again.stop().await;
}
