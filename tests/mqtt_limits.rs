//! Issue 18, items 3-5, against a real mosquitto: what MQTT cannot carry (a topic over 65,535
//! bytes, a user property over it, a `$` topic) and malformed overrides end on `Failure` with
//! an ExceptionList naming the field and never reach the wire; payloads over `max_payload`
//! are refused on publish and not parsed on receipt; a connection opened for a `URL` override
//! is closed when unused and not retried for nobody; a burst of large messages into a slow
//! flow stays within `queue_high_bytes` (peak RSS of the daemon) and loses nothing.

mod common;

use std::time::{Duration, Instant};

use common::{fast_config, free_port, Broker, Client, Daemon, Running};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(15);

/// What the dead-letter path publishes for a message that failed: its id and the exception.
const REPORT: &str = r#"
let e = ExceptionList.RecoverableException;
Root.Body = #{ id: Root.Body.id, number: e.Number, text: e.Text, field: e.Insert[0] };
"#;

/// Every message on `#` (but the test's own input on `in`) until none came for `quiet`.
async fn drain(c: &Client, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(m) = c.next(quiet).await {
        if m.topic() != "in" {
            out.push((m.topic().to_string(), m.payload().to_vec()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_overrides_and_what_mqtt_cannot_carry_go_to_failure_never_to_the_wire() {
    let broker = Broker::start("");
    let url = broker.url();
    let flow = json!({
        "name": "limits",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1},
            {"id": "route", "type": "Compute", "code": "LocalEnvironment.Destination = #{ MQTT: #{ Output: Root.Body.output } };"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "default", "qos": 1,
             "version": 5, "max_payload": "256KiB"},
            {"id": "report", "type": "Compute", "code": REPORT},
            {"id": "dead-letter", "type": "MQTTPublish", "url": url, "topic": "errors", "qos": 1,
             "overrides": false}
        ],
        "connections": [
            {"from": "in.Out", "to": "route"},
            {"from": "route.Out", "to": "out"},
            {"from": "out.Failure", "to": "report"},
            {"from": "report.Out", "to": "dead-letter"}
        ]
    })
    .to_string();
    let mut run = Running::start(&flow, &fast_config(""), &[]);
    run.wait_subscribed(1).await;
    let c = Client::connect(&url, true).await;
    c.subscribe("#", 1).await;
    const OUT: &str = "LocalEnvironment.Destination.MQTT.Output";
    // (output override, the field the exception names, words it says)
    let cases: Vec<(Value, String, &str)> = vec![
        (json!("not-a-map"), OUT.into(), "must be a map"),
        (
            json!({"topicName": "x"}),
            format!("{OUT}.topicName"),
            "did you mean 'TopicName'?",
        ),
        (
            json!({"Bogus": 1}),
            format!("{OUT}.Bogus"),
            "is not an MQTTPublish override",
        ),
        (
            json!({"qos": "1"}),
            format!("{OUT}.qos"),
            "must be the integer 0, 1 or 2, found the string \"1\"",
        ),
        (
            json!({"retained": "yes"}),
            format!("{OUT}.retained"),
            "must be true or false",
        ),
        (
            json!({"TopicName": "a".repeat(70_000)}),
            format!("{OUT}.TopicName"),
            "is 70000 bytes long",
        ),
        (
            json!({"TopicName": "$SYS/broker/uptime"}),
            format!("{OUT}.TopicName"),
            "starts with '$'",
        ),
        (
            json!({"TopicName": "ok/up", "UserProperties": {"k": "v".repeat(70_000)}}),
            format!("{OUT}.UserProperties.k"),
            "is 70000 bytes long",
        ),
    ];
    for (id, (output, _, _)) in cases.iter().enumerate() {
        c.publish("in", json!({"id": id, "output": output}).to_string(), 1)
            .await;
    }
    // A payload over the node's max_payload (256 KiB), and one that is fine.
    let big = cases.len();
    c.publish(
        "in",
        json!({"id": big, "output": {"TopicName": "ok/big"}, "pad": "x".repeat(300_000)})
            .to_string(),
        1,
    )
    .await;
    c.publish(
        "in",
        json!({"id": big + 1, "output": {"TopicName": "ok/1", "UserProperties": {"trace": "t-1"}}})
            .to_string(),
        1,
    )
    .await;

    let got = drain(&c, Duration::from_secs(3)).await;
    // Nothing but the dead letters and the good message: no default topic, no corrupt packet
    // (a topic written with a wrapped length arrived as a 4,464-byte topic), nothing on $SYS.
    let topics: Vec<&str> = got.iter().map(|(t, _)| t.as_str()).collect();
    assert!(
        topics.iter().all(|t| *t == "errors" || *t == "ok/1"),
        "unexpected topics: {:?}",
        topics
            .iter()
            .map(|t| &t[..t.len().min(60)])
            .collect::<Vec<_>>()
    );
    assert_eq!(topics.iter().filter(|t| **t == "ok/1").count(), 1);
    let errors: Vec<Value> = got
        .iter()
        .filter(|(t, _)| t == "errors")
        .map(|(_, p)| serde_json::from_slice(p).expect("a JSON report"))
        .collect();
    assert_eq!(errors.len(), cases.len() + 1, "{errors:#?}");
    for (id, (_, field, says)) in cases.iter().enumerate() {
        let e = errors
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("no report for case {id}: {errors:#?}"));
        assert_eq!(e["number"], 4311, "case {id}: {e}");
        assert_eq!(e["field"], field.as_str(), "case {id}: {e}");
        let text = e["text"].as_str().unwrap_or_default();
        assert!(text.contains(says), "case {id}: {text}");
        assert!(
            text.len() < 400,
            "case {id}: the text quotes the value whole: {text}"
        );
    }
    let e = errors.iter().find(|e| e["id"] == big).expect("oversized");
    assert_eq!(e["number"], 12119, "{e}");
    let text = e["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("Root.Body (serialised) is 3000")
            && text.ends_with("more than max_payload (262144 bytes)"),
        "{text}"
    );
    let stats = run.flow.node_stats();
    let out = stats.iter().find(|n| n.node == "out").expect("out");
    assert_eq!(out.terminals["Failure"], cases.len() as u64 + 1);
    assert_eq!(out.terminals["Out"], 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_payload_over_max_payload_goes_to_failure_unparsed() {
    let broker = Broker::start("");
    let url = broker.url();
    let flow = json!({
        "name": "receipt",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in/#", "qos": 1, "max_payload": "1KiB"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "out", "qos": 1},
            {"id": "report", "type": "Compute", "code": r#"
                let e = ExceptionList.RecoverableException;
                Root.Body = #{ number: e.Number, text: e.Text, inserts: e.Insert,
                               body_len: Root.Body.len(), topic: LocalEnvironment.MQTT.Input.Topic };
            "#},
            {"id": "errors", "type": "MQTTPublish", "url": url, "topic": "errors", "qos": 1}
        ],
        "connections": [
            {"from": "in.Out", "to": "out"},
            {"from": "in.Failure", "to": "report"},
            {"from": "report.Out", "to": "errors"}
        ]
    })
    .to_string();
    let mut run = Running::start(&flow, &fast_config(""), &[]);
    run.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out", 1).await;
    c.subscribe("errors", 1).await;
    // Valid JSON, 1025 bytes: one over the limit.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(1025 - 10));
    assert_eq!(big.len(), 1025);
    c.publish("in/big", big, 1).await;
    c.publish("in/small", json!({"n": 1}).to_string(), 1).await;
    let got = c.take_json(2, T).await;
    assert_eq!(got[0].0, "errors");
    let e = &got[0].1;
    assert_eq!(e["number"], 12119);
    assert_eq!(e["inserts"], json!(["1025", "1024", "in/big"]));
    assert_eq!(e["body_len"], 0, "the body is dropped, not kept: {e}");
    assert_eq!(e["topic"], "in/big");
    assert!(
        e["text"]
            .as_str()
            .unwrap_or_default()
            .starts_with("the payload is 1025 bytes, more than max_payload (1024 bytes), received on 'in/big': not parsed"),
        "{e}"
    );
    assert_eq!(got[1], ("out".to_string(), json!({"n": 1})));
    let stats = run.flow.node_stats();
    let input = stats.iter().find(|n| n.node == "in").expect("in");
    assert_eq!((input.terminals["Failure"], input.terminals["Out"]), (1, 1));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_override_connections_close_when_unused_and_are_not_retried_for_nobody() {
    let broker = Broker::start("");
    let other = Broker::start("");
    let url = broker.url();
    // Nothing listens there: connects are refused at once.
    let dead = format!("tcp://127.0.0.1:{}", free_port());
    // A rule chooses the QoS, as in the issue's log line ("QoS by rule", "qos": null).
    let config = format!(
        "{}[servers.local]\nurl = \"{url}\"\nqos_rules = [{{ topic = \"ovr/#\", qos = 1 }}]\n",
        fast_config("override_idle = \"1s\"")
    );
    let flow = json!({
        "name": "ovr",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "server": "local", "topic": "in", "qos": 1},
            {"id": "route", "type": "Compute", "code": "LocalEnvironment.Destination = #{ MQTT: #{ Output: #{ URL: Root.Body.url } } };"},
            {"id": "out", "type": "MQTTPublish", "server": "local", "topic": "ovr/default", "ack_timeout": "1s"},
            {"id": "report", "type": "Compute", "code": "Root.Body = #{ url: Root.Body.url, number: ExceptionList.SocketTimeoutException.Number };"},
            {"id": "dead-letter", "type": "MQTTPublish", "server": "local", "topic": "errors", "qos": 1, "overrides": false}
        ],
        "connections": [
            {"from": "in.Out", "to": "route"},
            {"from": "route.Out", "to": "out"},
            {"from": "out.Failure", "to": "report"},
            {"from": "report.Out", "to": "dead-letter"}
        ]
    })
    .to_string();
    let mut run = Running::start(&flow, &config, &[]);
    run.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("errors", 1).await;
    let far = Client::connect(&other.url(), false).await;
    far.subscribe("ovr/#", 1).await;

    // An unreachable URL: the message fails (BIP12099) after the retry and goes to the dead
    // letter, which publishes to its own server whatever the message carries.
    c.publish("in", json!({"url": dead}).to_string(), 1).await;
    let got = c.take_json(1, T).await;
    assert_eq!(
        got[0],
        ("errors".to_string(), json!({"url": dead, "number": 12099}))
    );
    let closed = run
        .wait_entry("BIP12092", "not connected and no message waits for it", T)
        .await;
    assert_eq!(closed.tags["url"], dead.as_str());
    let attempts = |run: &Running| {
        run.entries("BIP12096")
            .iter()
            .filter(|e| e.tags["url"] == dead.as_str())
            .count()
    };
    let at_close = attempts(&run);
    assert!(at_close >= 1, "{:?}", run.log());
    // The log says the real QoS (the rule's), not "by rule" and null.
    let retry = run.wait_entry("BIP4311", "(QoS 1) failed", T).await;
    assert_eq!(retry.tags["qos"], 1, "{retry:?}");
    let failed = run
        .wait_entry("BIP12099", "(QoS 1) failed after the retry", T)
        .await;
    assert_eq!(failed.tags["qos"], 1, "{failed:?}");
    // With a 200 ms reconnect schedule, a connection left behind would have tried again
    // several times by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        attempts(&run),
        at_close,
        "retried for nobody: {:?}",
        run.log()
    );

    // A reachable URL: published there, then closed after override_idle (1 s) without a
    // message, and opened again (the same client id) for the next one.
    c.publish("in", json!({"url": other.url()}).to_string(), 1)
        .await;
    let m = far.next(T).await.expect("published on the other broker");
    assert_eq!(m.topic(), "ovr/default");
    let idle = run.wait_entry("BIP12092", &other.url(), T).await;
    assert!(idle.message.contains("no message for it in 1s"), "{idle:?}");
    common::wait_until(T, || run.server_stats(&other.url()).open_connections == 0).await;
    c.publish("in", json!({"url": other.url(), "n": 2}).to_string(), 1)
        .await;
    let m = far.next(T).await.expect("published again after the close");
    assert_eq!(m.topic(), "ovr/default");
    assert_eq!(
        run.entries("BIP12063")
            .iter()
            .filter(|e| e.tags["url"] == other.url().as_str())
            .map(|e| e.tags["client_id"].to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        1,
        "one client id per URL"
    );
    run.stop().await;
}

/// A burst of large messages into a slow flow: the subscriber pauses at `queue_high_bytes`
/// (long before `queue_high`, 1000 messages), so the daemon's memory stays bounded, and every
/// message comes out, in order, once.
///
/// The numbers: a 150 MiB burst (600 × 256 KiB) into a flow of ~20 ms a message. With the
/// mark at 8 MiB the daemon grew by 27-46 MiB for two thirds of that burst (debug build, on a
/// busy machine: the mark, what the broker had on the wire when a pause took effect, the
/// copies a message makes on its way, the allocator's slack); with the mark out of the way
/// (1 GiB) by the whole burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_messages_stays_within_queue_high_bytes_and_nothing_is_lost() {
    const N: usize = 600;
    const SIZE: usize = 256 * 1024;
    let broker = Broker::start("");
    let url = broker.url();
    let flow = json!({
        "name": "burst",
        "nodes": [
            // The mark is above the broker's in-flight window (mosquitto's 20 × 256 KiB), or
            // every resume would take in a window and pause again at once.
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1,
             "domain": "TEXT", "queue_high_bytes": "8MiB", "in_flight": 1},
            // Slow: the burst outruns it.
            {"id": "slow", "type": "Compute", "max_operations": 5000000,
             "code": "let n = 0; for i in 0..100000 { n += i; } Root.Body = Root.Body.sub_string(0, 12);"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "out", "qos": 1}
        ],
        "connections": [
            {"from": "in.Out", "to": "slow"},
            {"from": "slow.Out", "to": "out"}
        ]
    })
    .to_string();
    let d = Daemon::spawn(&fast_config(""), &[("burst.json", &flow)]);
    d.wait_api().await;
    d.wait_log("Subscribed to 'in'", 1, T).await;
    let idle_kib = d.peak_rss_kib();
    let c = Client::connect(&url, false).await;
    c.subscribe("out", 1).await;
    for i in 0..N {
        let mut payload = format!("{i:012}").into_bytes();
        payload.resize(SIZE, b'x');
        c.publish("in", payload, 1).await;
    }
    let until = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    while seen.len() < N {
        let left = until.saturating_duration_since(Instant::now());
        match c.next(left).await {
            Some(m) => seen.push(String::from_utf8_lossy(m.payload()).into_owned()),
            None => panic!("{} of {N} messages came out", seen.len()),
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("{i:012}")).collect();
    assert_eq!(seen, expected, "every message, in order, once");
    let grown_mib = d.peak_rss_kib().saturating_sub(idle_kib) / 1024;
    eprintln!(
        "peak RSS grew by {grown_mib} MiB for a {} MiB burst",
        (N * SIZE) >> 20
    );
    assert!(
        grown_mib < 80,
        "grew by {grown_mib} MiB for a 150 MiB burst with queue_high_bytes 8 MiB"
    );
    assert!(
        d.stderr()
            .contains("bytes held (queue_high_bytes 8388608; input journal"),
        "the byte mark paused receipt:\n{}",
        d.stderr()
    );
}
