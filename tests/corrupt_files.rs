//! Damaged files in the data directory, met by the `flowbus` binary against a real mosquitto:
//! an MQTTPublish in-flight log that is not sound is put aside loudly and the flow publishes
//! with what was sound; one that cannot be opened at all fails the flow with the reason
//! instead of leaving it `running`; lines of the activity-log files that cannot be read back
//! are skipped and counted.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{fast_config, Broker, Client, Daemon};
use flowbus_nodes::mqtt_store::{replay, LogStore, FILE_NAME};
use paho_mqtt::ClientPersistence;
use serde_json::{json, Value};

fn config() -> String {
    fast_config("[daemon]\nwatch_interval = \"100ms\"\nshutdown_timeout = \"5s\"\n")
}

/// in (MQTTSubscribe on `<name>/in`) → out (MQTTPublish QoS 1 to `<name>/out`, client id
/// `<name>-pub`).
fn bridge(name: &str, url: &str) -> String {
    json!({
        "name": name,
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": format!("{name}/in"), "qos": 1},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": format!("{name}/out"), "qos": 1, "client_id": format!("{name}-pub")}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string()
}

/// A sent QoS 1 PUBLISH as Paho stores it (`s-<id>`).
fn publish_packet(topic: &str, msgid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&msgid.to_be_bytes());
    body.extend_from_slice(payload);
    assert!(body.len() < 128);
    let mut p = vec![0x32, body.len() as u8];
    p.extend(body);
    p
}

/// The in-flight log directory of a client of the daemon `d`.
fn client_dir(d: &Daemon, client_id: &str) -> PathBuf {
    d.dir.join("data/mqtt").join(client_id)
}

/// Writes an in-flight log with these records (each with a right checksum) into `dir`.
fn write_log(dir: &Path, records: &[(&str, Vec<u8>)]) {
    let mut store = LogStore::new(dir.to_path_buf());
    store.open("writer", "tcp://127.0.0.1:1").expect("open");
    for (key, data) in records {
        store.put(key, vec![data.as_slice()]).expect("put");
    }
}

/// The files put aside in a client's directory.
fn asides(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("inflight.log.corrupt-"))
        })
        .collect()
}

/// The BIP12115 entry of a client, once there is one.
async fn corrupt_entry(d: &Daemon, client_id: &str) -> Value {
    let needle = format!("'{client_id}'");
    d.cli_until(
        &["log", "--number", "BIP12115"],
        Duration::from_secs(20),
        |o| o.contains(&needle),
    )
    .await;
    d.entries("BIP12115")
        .into_iter()
        .find(|e| e["message"].as_str().is_some_and(|m| m.contains(&needle)))
        .expect("entry")
}

/// A flow's state and reason in the flows list.
fn state(d: &Daemon, name: &str) -> (String, String) {
    let (code, out, err) = d.cli(&["flows", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let flows: Value = serde_json::from_str(&out).unwrap();
    let f = flows
        .as_array()
        .and_then(|a| a.iter().find(|f| f["name"] == name))
        .unwrap_or_else(|| panic!("no flow {name}: {out}"))
        .clone();
    (
        f["state"].as_str().unwrap_or_default().to_string(),
        f["reason"].as_str().unwrap_or_default().to_string(),
    )
}

/// Sends one message through a bridge flow and waits for it at the other end.
async fn passes(url: &str, name: &str) {
    let consumer = Client::connect(url, false).await;
    consumer.subscribe(&format!("{name}/out"), 1).await;
    let producer = Client::connect(url, false).await;
    producer
        .publish(&format!("{name}/in"), json!({"flow": name}).to_string(), 1)
        .await;
    let got = consumer.take_json(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].1, json!({"flow": name}));
}

/// Issue 18: a log with a bad header was overwritten with only a line on stderr; a record with
/// a right checksum that Paho could not restore (an MQTT v5 record in a 3.1.1 client's log)
/// made the client fail with `BIP12096 ... Persistence error` while the flow showed `running`
/// and never published again. Each is now put aside with an error that says what was kept and
/// lost, and the flow publishes; what was sound is still sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_inflight_logs_are_put_aside_loudly_and_the_flow_publishes() {
    let broker = Broker::start("");
    let url = broker.url();
    let d = Daemon::spawn(&config(), &[]);
    d.wait_api().await;

    // Not a log at all.
    let magic = client_dir(&d, "magic-pub");
    std::fs::create_dir_all(&magic).unwrap();
    std::fs::write(magic.join(FILE_NAME), b"NOTALOG!\x01\x02\x03").unwrap();
    // A sound publication, then a record cut short (a crash while it was copied).
    let torn = client_dir(&d, "torn-pub");
    write_log(
        &torn,
        &[
            ("s-1", publish_packet("torn/out", 1, b"{\"kept\": true}")),
            ("s-2", publish_packet("torn/out", 2, b"{\"cut\": true}")),
        ],
    );
    let bytes = std::fs::read(torn.join(FILE_NAME)).unwrap();
    let used = replay(&bytes).good;
    let mut cut = bytes.clone();
    cut[used - 5..].fill(0);
    std::fs::write(torn.join(FILE_NAME), &cut).unwrap();
    // Records of three bytes with right checksums: one in MQTT v5 form, which Paho refuses
    // to restore for this MQTT 3.1.1 client.
    let tiny = client_dir(&d, "tiny-pub");
    write_log(
        &tiny,
        &[("s5-1", b"abc".to_vec()), ("s-2", b"abc".to_vec())],
    );

    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("torn/out", 1).await;
    for name in ["magic", "torn", "tiny"] {
        std::fs::write(
            d.dir.join("flows").join(format!("{name}.json")),
            bridge(name, &url),
        )
        .unwrap();
    }

    let e = corrupt_entry(&d, "magic-pub").await;
    assert_eq!(e["severity"], "error");
    assert_eq!(
        (e["tags"]["kept"].clone(), e["tags"]["lost"].clone()),
        (json!(0), json!(0))
    );
    let m = e["message"].as_str().unwrap();
    assert!(
        m.contains("does not start with the header FBINFL02")
            && m.contains("magic-pub/inflight.log"),
        "{m}"
    );
    assert_eq!(asides(&magic).len(), 1);
    assert_eq!(
        std::fs::read(&asides(&magic)[0]).unwrap(),
        b"NOTALOG!\x01\x02\x03",
        "the damaged file is kept as it was"
    );

    let e = corrupt_entry(&d, "torn-pub").await;
    assert_eq!(e["tags"]["kept"], 1, "{e}");
    assert!(e["tags"]["unreadable_bytes"].as_u64().unwrap() > 0, "{e}");
    assert_eq!(asides(&torn).len(), 1);
    // The sound record was a publication the broker never acknowledged: it is sent.
    let got = consumer.take_json(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].1, json!({"kept": true}), "log:\n{}", d.stderr());

    let e = corrupt_entry(&d, "tiny-pub").await;
    assert_eq!(
        (e["tags"]["kept"].clone(), e["tags"]["lost"].clone()),
        (json!(0), json!(2))
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("s5-1: an MQTT v5 record in the log of an MQTT 3.1.1 client"),
        "{e}"
    );

    for name in ["magic", "torn", "tiny"] {
        assert_eq!(state(&d, name).0, "running");
        passes(&url, name).await;
    }
    assert!(!d.stderr().contains("Persistence error"), "{}", d.stderr());
}

/// An in-flight log that cannot be opened at all (here a directory where the file should be)
/// leaves the publisher without a client: the flow is shown `failed` with the reason, not
/// `running` while it cannot publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inflight_log_that_cannot_be_opened_fails_the_flow_with_the_reason() {
    let broker = Broker::start("");
    let d = Daemon::spawn(&config(), &[]);
    d.wait_api().await;
    std::fs::create_dir_all(client_dir(&d, "blocked-pub").join(FILE_NAME)).unwrap();
    std::fs::write(
        d.dir.join("flows/blocked.json"),
        bridge("blocked", &broker.url()),
    )
    .unwrap();
    d.cli_until(&["flows", "list"], Duration::from_secs(20), |o| {
        o.contains("failed")
    })
    .await;
    let (st, reason) = state(&d, "blocked");
    assert_eq!(st, "failed");
    assert!(
        reason.contains("node 'out' (MQTTPublish) failed")
            && reason.contains("cannot create the MQTT client")
            && reason.contains("Persistence error"),
        "{reason}"
    );
    let failed = d.entries("BIP1007");
    assert!(failed.iter().any(|e| e["flow"] == "blocked"), "{failed:?}");
}

/// Issue 18: one line that was not UTF-8 dropped the rest of its activity-log file when the
/// daemon read it back; now the line is skipped, the rest read, and one error counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_activity_log_line_is_skipped_and_counted_at_restart() {
    let mut d = Daemon::spawn(&config(), &[]);
    d.wait_api().await;
    assert!(d.terminate(Duration::from_secs(10)).success());
    let file = d.dir.join("data/activity-log/activity.jsonl");
    let mut text = std::fs::read(&file).unwrap();
    let lines_before = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    text.extend_from_slice(b"\xff\xfe\xfd not UTF-8\n");
    let marker = json!({"seq": 500, "time": "2026-01-01T00:00:00.000Z", "severity": "info",
        "number": "BIP1001", "resource": "Flow", "flow": "old", "node": "",
        "message": "after the bad line", "tags": {}});
    text.extend_from_slice(format!("{marker}\n").as_bytes());
    std::fs::write(&file, text).unwrap();

    d.start();
    d.wait_api().await;
    let report = d.entries("BIP1011");
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!(report[0]["severity"], "error");
    assert_eq!(report[0]["tags"]["count"], 1);
    assert!(
        report[0]["message"]
            .as_str()
            .unwrap()
            .contains("activity.jsonl: 1 not UTF-8"),
        "{report:?}"
    );
    let (code, out, _) = d.cli(&["log", "--flow", "old", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("after the bad line"), "{out}");
    // The entries before it were read back too, and the numbers go on after the largest.
    let (_, all, _) = d.cli(&["log", "--json", "--limit", "10000"]);
    assert!(all.lines().count() > lines_before, "{all}");
    assert!(report[0]["seq"].as_u64().unwrap() > 500);
}
