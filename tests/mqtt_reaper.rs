//! Closed paho clients are destroyed once no connect of theirs can still be in flight, on a
//! thread of ours, and the library keeps working. Its own test binary: the closed clients are
//! process-wide.

mod common;

use std::time::{Duration, Instant};

use common::{fast_config, wait_until, Broker, Client, Running};
use flowbus_nodes::mqtt::{closed_clients, reap_closed_clients, REAP_GRACE};
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
    assert_eq!(look(Instant::now()).await, 0);
    assert_eq!(closed_clients(), closed);
    // Later: the first look finds them idle, the second destroys them, here, on a blocking
    // thread of the test (a deadlock fails the test).
    let later = Instant::now() + Duration::from_secs(2 * 30) + REAP_GRACE;
    assert_eq!(look(later).await, 0);
    assert_eq!(look(later).await, closed);
    assert_eq!(closed_clients(), 0);
    // New clients connect and bridge as before.
    let mut again = bridges_one(&url, 2).await;
    again.stop().await;
    drop(again);
    wait_until(T, || closed_clients() >= 2).await;
    let closed = closed_clients();
    assert_eq!(look(later).await, 0);
    assert_eq!(look(later).await, closed);

    // Clients let go while their connect waits for a frozen broker: kept while Paho's token
    // for the connect holds them (destroying them then would happen on Paho's thread, when
    // the connect ends, and deadlock the library), destroyed once Paho has answered it (the
    // connect times out after 5 s in the test config).
    let frozen = Broker::start("");
    frozen.freeze();
    let mut stuck = Running::start(&bridge(&frozen.url()), &fast_config(""), &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stuck.stop().await;
    drop(stuck);
    wait_until(T, || closed_clients() >= 2).await;
    let stuck = closed_clients();
    assert_eq!(look(later).await, 0);
    assert_eq!(look(later).await, 0, "destroyed while connecting");
    let mut reaped = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while reaped < stuck && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reaped += look(later).await;
    }
    assert_eq!(reaped, stuck, "not destroyed after the connect timed out");
    frozen.thaw();
    let mut last = bridges_one(&url, 3).await;
    last.stop().await;
}

/// One look of the reaper at `at`, on a blocking thread; fails on a deadlock.
async fn look(at: Instant) -> usize {
    tokio::time::timeout(
        T,
        tokio::task::spawn_blocking(move || reap_closed_clients(at)),
    )
    .await
    .expect("destroying closed clients hangs")
    .unwrap()
}
