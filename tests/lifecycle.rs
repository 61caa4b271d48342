//! Stop versus remove, as an operator meets them with the `flowbus` binary and a real
//! mosquitto: a stop keeps a persistent session (the broker queues for the next start); a
//! removal — through the CLI, or by deleting the flow file — ends it (the broker forgets the
//! subscription) and deletes the flow's files under the data directory, unless a publisher
//! still owes publications: those are kept, reported, and sent when the client id comes back.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{fast_config, Broker, Client, Daemon};
use serde_json::{json, Value};

fn config(shutdown: &str) -> String {
    fast_config(&format!(
        "[daemon]\nwatch_interval = \"100ms\"\nshutdown_timeout = \"{shutdown}\"\n"
    ))
}

/// in (MQTTSubscribe QoS 1: a persistent session) → out (MQTTPublish QoS 1: a persistent
/// session and an in-flight log), on one broker, in MQTT `version` 3 (3.1.1) or 5.
fn relay(url: &str, version: u8) -> String {
    json!({
        "name": "relay",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "life/in", "qos": 1, "version": version},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "life/out", "qos": 1, "version": version}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string()
}

/// The client directories under the daemon's `data/mqtt`.
fn client_dirs(d: &Daemon) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(d.dir.join("data/mqtt"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn live_records(log: &Path) -> usize {
    flowbus_nodes::mqtt_store::replay(&std::fs::read(log).unwrap_or_default())
        .live
        .len()
}

/// Waits for the `n`th BIP12095 "Subscribed" entry.
async fn subscribed(d: &Daemon, n: usize) {
    d.cli_until(
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.matches("Subscribed to 'life/in'").count() >= n,
    )
    .await;
}

/// The `n` values that arrive next on the consumer, then that nothing else follows.
async fn next_values(consumer: &Client, n: usize) -> Vec<Value> {
    let got = consumer.take_json(n, Duration::from_secs(20)).await;
    assert!(
        consumer.next(Duration::from_millis(500)).await.is_none(),
        "more arrived than {got:?}"
    );
    got.into_iter().map(|(_, v)| v["n"].clone()).collect()
}

fn retired(d: &Daemon) -> Vec<Value> {
    d.entries("BIP12116")
}

/// Issue 18: after `flows remove` the broker still held the persistent subscription, and
/// what was published meanwhile was processed when a flow of the same name came back; and
/// the publisher's `data/mqtt/<client>/` stayed for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_keeps_the_session_and_remove_or_a_deleted_file_ends_it() {
    stop_keeps_remove_ends(3).await;
}

/// The same in MQTT v5, where the session outlives the connection by its expiry interval (a
/// day by default) unless the removal ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_stop_keeps_the_session_and_remove_or_a_deleted_file_ends_it() {
    stop_keeps_remove_ends(5).await;
}

async fn stop_keeps_remove_ends(version: u8) {
    let broker = Broker::start("");
    let url = broker.url();
    let relay = |url: &str| relay(url, version);
    let d = Daemon::spawn(&config("5s"), &[("relay.json", &relay(&url))]);
    d.wait_api().await;
    subscribed(&d, 1).await;
    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("life/out", 1).await;
    let producer = Client::connect(&url, false).await;
    let send = |n: u32| {
        let producer = &producer;
        async move {
            producer
                .publish("life/in", json!({"n": n}).to_string(), 1)
                .await
        }
    };
    send(1).await;
    assert_eq!(next_values(&consumer, 1).await, [1]);
    let dirs = client_dirs(&d);
    assert_eq!(dirs.len(), 1, "the publisher's directory: {dirs:?}");
    assert!(dirs[0].join("inflight.log").is_file());

    // A stop keeps the session: what is published meanwhile waits at the broker.
    let (code, _, err) = d.cli(&["flows", "stop", "relay"]);
    assert_eq!(code, 0, "{err}");
    send(2).await;
    let (code, _, err) = d.cli(&["flows", "start", "relay"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(next_values(&consumer, 1).await, [2]);
    assert!(retired(&d).is_empty(), "a stop retires nothing");
    assert_eq!(client_dirs(&d), dirs, "a stop keeps the files");

    // A removal (of a running flow, through the CLI) ends both sessions and deletes the
    // publisher's directory.
    let (code, out, err) = d.cli(&["flows", "remove", "relay"]);
    assert_eq!(code, 0, "{out}{err}");
    let entries = retired(&d);
    assert_eq!(entries.len(), 2, "{entries:?}");
    let of = |node: &str| {
        entries
            .iter()
            .find(|e| e["node"] == node)
            .unwrap_or_else(|| panic!("no BIP12116 of {node}: {entries:?}"))
            .clone()
    };
    let e = of("in");
    assert_eq!(e["severity"], "info", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("no longer keeps its subscription to 'life/in'"),
        "{e}"
    );
    let e = of("out");
    assert_eq!(e["severity"], "info", "{e}");
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("ended its session") && m.contains(&format!("deleted {}", dirs[0].display())),
        "{m}"
    );
    assert!(client_dirs(&d).is_empty(), "{:?}", client_dirs(&d));
    // Published while the flow is gone: the broker keeps it for nobody.
    send(3).await;

    // The flow comes back under the same name (the same client ids): it starts afresh.
    std::fs::write(d.dir.join("flows/relay.json"), relay(&url)).unwrap();
    subscribed(&d, 3).await;
    send(4).await;
    assert_eq!(
        next_values(&consumer, 1).await,
        [4],
        "3 was published while removed"
    );

    // Stopped, then its file deleted: the watcher's removal ends the session as well, with
    // the flow no longer running.
    let (code, _, err) = d.cli(&["flows", "stop", "relay"]);
    assert_eq!(code, 0, "{err}");
    send(5).await;
    std::fs::remove_file(d.dir.join("flows/relay.json")).unwrap();
    d.cli_until(&["flows", "list"], Duration::from_secs(20), |o| {
        o.contains("no flows deployed")
    })
    .await;
    assert_eq!(retired(&d).len(), 4, "{:?}", retired(&d));
    assert!(client_dirs(&d).is_empty(), "{:?}", client_dirs(&d));
    std::fs::write(d.dir.join("flows/relay.json"), relay(&url)).unwrap();
    subscribed(&d, 4).await;
    send(6).await;
    assert_eq!(
        next_values(&consumer, 1).await,
        [6],
        "5 was queued for a removed flow"
    );
}

/// in (on A) → out (on B, client id `owed-pub`, QoS 1, a long ack timeout).
fn bridge(name: &str, a: &str, b: &str) -> String {
    json!({
        "name": name,
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": a, "topic": format!("{name}/in"), "qos": 1},
            {"id": "out", "type": "MQTTPublish", "url": b, "topic": "owed/out", "qos": 1,
             "client_id": "owed-pub", "ack_timeout": "60s"}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string()
}

/// A removed flow's publication that the broker never acknowledged is neither dropped nor
/// silently kept: the removal reports it (BIP12117 with the count) and keeps the in-flight
/// log and the session, and a flow with the same client id publishes it later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_flows_unacknowledged_publication_is_reported_kept_and_sent_later() {
    let a = Broker::start("");
    let b = Broker::start("");
    let d = Daemon::spawn(
        &config("2s"),
        &[("owed.json", &bridge("owed", &a.url(), &b.url()))],
    );
    d.wait_api().await;
    d.cli_until(&["stats", "--json"], Duration::from_secs(20), |o| {
        serde_json::from_str::<Value>(o).is_ok_and(|v| {
            v["servers"][b.url()]["OpenConnections"] == 1
                && v["servers"][a.url()]["OpenConnections"] == 1
        })
    })
    .await;
    d.cli_until(
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.contains("Subscribed"),
    )
    .await;
    let dir = d.dir.join("data/mqtt/owed-pub");
    let log = dir.join("inflight.log");

    // B stops answering: the publication goes out and waits for its PUBACK.
    b.freeze();
    let producer = Client::connect(&a.url(), false).await;
    producer.publish("owed/in", "{\"owed\": true}", 1).await;
    common::wait_until(Duration::from_secs(10), || live_records(&log) == 1).await;

    let (code, out, err) = d.cli(&["flows", "remove", "owed"]);
    assert_eq!(code, 0, "{out}{err}");
    let owed = d.entries("BIP12117");
    assert_eq!(owed.len(), 1, "{owed:?}");
    assert_eq!(owed[0]["severity"], "error");
    assert_eq!(owed[0]["tags"]["count"], 1);
    let m = owed[0]["message"].as_str().unwrap();
    assert!(
        m.contains("1 publication(s) of client id 'owed-pub'")
            && m.contains("published when a flow with client id 'owed-pub' starts again"),
        "{m}"
    );
    assert_eq!(live_records(&log), 1, "the log is kept");
    // The subscriber's session (on A) is ended as usual; the publisher's is not.
    let retired = d.entries("BIP12116");
    assert!(retired.iter().all(|e| e["node"] == "in"), "{retired:?}");

    // B answers again; what the dead connection wrote reaches it before anyone subscribes.
    b.thaw();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let consumer = Client::connect(&b.url(), false).await;
    consumer.subscribe("owed/out", 1).await;
    // Another flow with the same publisher client id sends what the log kept.
    std::fs::write(
        d.dir.join("flows/later.json"),
        bridge("later", &a.url(), &b.url()),
    )
    .unwrap();
    let got = consumer.take_json(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].1, json!({"owed": true}), "log:\n{}", d.stderr());
    common::wait_until(Duration::from_secs(10), || live_records(&log) == 0).await;
}

/// A session that cannot be ended (the broker is down when the flow is removed) is reported
/// as an error that says what the broker keeps; the publisher's files, which owe nothing, are
/// deleted all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_removal_cannot_end_is_reported() {
    let mut broker = Broker::start("");
    let d = Daemon::spawn(&config("5s"), &[("relay.json", &relay(&broker.url(), 3))]);
    d.wait_api().await;
    subscribed(&d, 1).await;
    broker.kill();
    let (code, out, err) = d.cli(&["flows", "remove", "relay"]);
    assert_eq!(code, 0, "{out}{err}");
    let entries = retired(&d);
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(
        entries.iter().all(|e| e["severity"] == "error"),
        "{entries:?}"
    );
    let text: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        text.iter()
            .any(|m| m.starts_with("Could not end the session")
                && m.contains("keeps its subscription to 'life/in' and queues messages for it")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|m| m.contains("could not end its session") && m.contains("deleted")),
        "{text:?}"
    );
    assert!(client_dirs(&d).is_empty(), "{:?}", client_dirs(&d));
}

/// The connection a publisher opened for a message's URL override has a session and an
/// in-flight log of its own. Removing the flow ends and deletes them also after a restart of
/// the daemon, when nothing in this run opened it: its directory says where it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_client_of_an_earlier_run_is_retired_with_its_flow() {
    let (a, b) = (Broker::start(""), Broker::start(""));
    let flow = json!({
        "name": "ovr",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": a.url(), "topic": "life/in", "qos": 1},
            {"id": "route", "type": "Compute",
             "code": format!("LocalEnvironment.Destination.MQTT.Output.URL = \"{}\";", b.url())},
            {"id": "out", "type": "MQTTPublish", "url": a.url(), "topic": "life/out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "route"}, {"from": "route.Out", "to": "out"}]
    })
    .to_string();
    let mut d = Daemon::spawn(&config("5s"), &[("ovr.json", &flow)]);
    d.wait_api().await;
    subscribed(&d, 1).await;
    let consumer = Client::connect(&b.url(), false).await;
    consumer.subscribe("life/out", 1).await;
    let producer = Client::connect(&a.url(), false).await;
    producer
        .publish("life/in", json!({"n": 1}).to_string(), 1)
        .await;
    assert_eq!(next_values(&consumer, 1).await, [1]);
    let with_url: Vec<PathBuf> = client_dirs(&d)
        .into_iter()
        .filter(|p| p.join("override-url").is_file())
        .collect();
    assert_eq!(with_url.len(), 1, "{:?}", client_dirs(&d));
    assert_eq!(
        std::fs::read_to_string(with_url[0].join("override-url")).unwrap(),
        b.url()
    );

    // A new run: only the node's own client is known to it until a message overrides again.
    assert!(d.terminate(Duration::from_secs(20)).success());
    d.start();
    d.wait_api().await;
    subscribed(&d, 2).await;
    let (code, out, err) = d.cli(&["flows", "remove", "ovr"]);
    assert_eq!(code, 0, "{out}{err}");
    let entries = retired(&d);
    let of_override: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("deleted {}", with_url[0].display())))
        })
        .collect();
    assert_eq!(of_override.len(), 1, "{entries:?}");
    let m = of_override[0]["message"].as_str().unwrap();
    assert!(
        m.contains(&format!("ended its session at {}", b.url())),
        "{m}"
    );
    assert!(client_dirs(&d).is_empty(), "{:?}", client_dirs(&d));
}
