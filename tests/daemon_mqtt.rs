//! `flowbus run` as a process against a real mosquitto: back-pressure without loss under a
//! flood, clean shutdown on SIGTERM mid-stream, and MQTT v5 (user properties, a shared
//! subscription split between two daemons).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{fast_config, Broker, Client, Daemon};
use paho_mqtt as paho;
use serde_json::json;

/// Publishes `n` QoS 1 messages `{"seq": i}` as fast as the client allows (acks awaited in
/// batches, so many are in flight at once).
async fn flood(c: &Client, topic: &str, from: u64, n: u64) {
    let mut pending = Vec::new();
    for i in from..from + n {
        pending.push(
            c.cli
                .publish(paho::Message::new(topic, json!({"seq": i}).to_string(), 1)),
        );
        if pending.len() == 500 {
            for t in pending.drain(..) {
                t.await.expect("publish acked");
            }
        }
    }
    for t in pending {
        t.await.expect("publish acked");
    }
}

/// Reads `{"seq": i}` messages until `n` distinct ones arrived; returns (in arrival order,
/// duplicates). If they do not arrive in time, it fails with what `why` says.
async fn collect(
    c: &Client,
    n: usize,
    timeout: Duration,
    why: impl Fn() -> String,
) -> (Vec<u64>, usize) {
    let until = Instant::now() + timeout;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut dups = 0;
    while seen.len() < n {
        let left = until.saturating_duration_since(Instant::now());
        let Some(m) = c.next(left).await else {
            panic!("only {} of {n} arrived\n{}", seen.len(), why());
        };
        let v: serde_json::Value = serde_json::from_slice(m.payload()).expect("json");
        let seq = v["seq"].as_u64().expect("seq");
        if seen.insert(seq) {
            order.push(seq);
        } else {
            dups += 1;
        }
    }
    (order, dups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_into_a_slow_flow_loses_nothing_and_memory_stays_bounded() {
    const N: u64 = 20_000;
    let broker = Broker::start("");
    let url = broker.url();
    let flow = json!({
        "name": "slow",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "bp/in", "qos": 1, "queue_high": 500},
            {"id": "busy", "type": "Compute", "code": "let i = 0; while i < 300 { i += 1; } Root.Body.done = true;"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "bp/out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "busy"}, {"from": "busy.Out", "to": "out"}]
    })
    .to_string();
    let mut daemon = Daemon::spawn(&fast_config(""), &[("slow.json", &flow)]);
    daemon
        .wait_log("BIP12095", 1, Duration::from_secs(20))
        .await;
    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("bp/out", 1).await;
    let producer = Client::connect(&url, false).await;
    let started = Instant::now();
    flood(&producer, "bp/in", 0, N).await;
    let published = started.elapsed();
    let (order, dups) = collect(&consumer, N as usize, Duration::from_secs(240), || {
        // What flow control and the connection did, to tell a pause that never ended from a
        // broker that stopped sending.
        let log = daemon.stderr();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["BIP12101", "BIP12092", "BIP12095", "BIP12096", "BIP12063"]
                    .iter()
                    .any(|b| l.contains(b))
            })
            .collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    })
    .await;
    let total = started.elapsed();
    assert_eq!(order, (0..N).collect::<Vec<_>>(), "every message, in order");
    let peak = daemon.peak_rss_kib();
    println!(
        "{N} QoS 1 messages: published in {published:?}, all through the slow flow in {total:?}; {dups} duplicates; flowbus peak RSS {} MiB",
        peak / 1024
    );
    // The flow fell behind and the subscriber paused rather than buffering everything.
    let log = daemon.stderr();
    assert!(
        log.contains("BIP12101") && log.contains("pausing receipt"),
        "back-pressure never engaged:\n{log}"
    );
    assert!(log.contains("resuming receipt"));
    assert!(peak > 0 && peak < 200 * 1024, "peak RSS {peak} KiB");
    assert!(daemon.terminate(Duration::from_secs(20)).success());
    let stats = daemon.exit_stats();
    println!("{}", stats["servers"]);
    println!(
        "{}",
        daemon
            .stderr()
            .lines()
            .filter(|l| l.contains("BIP12101")
                || l.contains("BIP12063")
                || l.contains("BIP12092")
                || l.contains("BIP4311"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_finishes_what_was_received_and_exits_zero() {
    sigterm_mid_stream(1).await;
}

/// At QoS 0 a publish completes as soon as it is queued for paho (the connection's outbox):
/// what is still queued at the stop goes out before the disconnect, including a batch the
/// outbox's task is still handing over on another thread (this failed about one run in four,
/// with the tail of such a batch missing, until the hand-over took a lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_at_qos_0_publishes_everything_queued() {
    sigterm_mid_stream(0).await;
}

/// A daemon relaying `in` on broker `a` to `out` on broker `b` at `qos`, through a Compute
/// node that counts to `work` so that each message costs time, with `[daemon]
/// shutdown_timeout`; returned once it has subscribed.
async fn busy_relay(
    a: &Broker,
    b: &Broker,
    work: u32,
    qos: u8,
    in_flight: Option<u32>,
    shutdown_timeout: &str,
) -> Daemon {
    let mut input =
        json!({"id": "in", "type": "MQTTSubscribe", "url": a.url(), "topic": "in", "qos": 1});
    if let Some(n) = in_flight {
        input["in_flight"] = json!(n);
    }
    let flow = json!({
        "name": "relay",
        "nodes": [
            input,
            {"id": "work", "type": "Compute", "code": format!("let i = 0; while i < {work} {{ i += 1; }}")},
            {"id": "out", "type": "MQTTPublish", "url": b.url(), "topic": "out", "qos": qos}
        ],
        "connections": [{"from": "in.Out", "to": "work"}, {"from": "work.Out", "to": "out"}]
    })
    .to_string();
    // These tests read per-message summaries (BIP12102) from the console.
    let config = fast_config(&format!(
        "[daemon]\nshutdown_timeout = \"{shutdown_timeout}\"\n[activity_log]\nconsole_per_message = true\n"
    ));
    let daemon = Daemon::spawn(&config, &[("relay.json", &flow)]);
    daemon
        .wait_log("BIP12095", 1, Duration::from_secs(20))
        .await;
    daemon
}

/// A server statistic from the exit statistics.
fn stat(stats: &serde_json::Value, broker: &Broker, key: &str) -> u64 {
    stats["servers"][broker.url()][key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} of {}: {stats}", broker.url()))
}

async fn sigterm_mid_stream(qos: u8) {
    let a = Broker::start("");
    // mosquitto drops QoS 0 messages for a subscriber with more than max_queued_messages
    // (1,000) waiting; the test's consumer must not lose any on a loaded machine.
    // (Not 0 for "no limit": some 2.0 releases then drop every QoS 0 message.)
    let b = Broker::start("max_queued_messages 1000000");
    // A deadline no loaded machine reaches: this test is about finishing everything (the one
    // below is about a deadline that cuts the flow short).
    // 1,000 iterations a message: the flow falls behind the flood at once, and finishing
    // 20,000 still takes well under the wait below on a slow machine (2,000 took 38 s on one).
    let mut daemon = busy_relay(&a, &b, 1000, qos, None, "120s").await;
    let consumer = Client::connect(&b.url(), false).await;
    consumer.subscribe("out", 1).await;
    let producer = Client::connect(&a.url(), false).await;
    let feed = tokio::spawn(async move {
        flood(&producer, "in", 0, 20_000).await;
        producer
    });
    // Let the stream get going, then stop the daemon in the middle of it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = daemon.terminate(Duration::from_secs(90));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        daemon.stderr()
    );
    let _ = feed.await;
    let stats = daemon.exit_stats();
    let received = stat(&stats, &a, "MessagesReceived");
    let sent = stat(&stats, &b, "MessagesSent");
    // The subscriber takes the burst at the client library's speed (issue 19), so it may have
    // received all of it; the flow, 1,000 iterations a message, had not processed it.
    assert!(
        received > 0 && received <= 20_000,
        "stopped mid-stream: received {received}"
    );
    // Redeliveries after a pause are counted as received and skipped, not processed twice.
    let received = received - stat(&stats, &a, "RedeliveriesSkipped");
    assert_eq!(
        sent, received,
        "every received message was published before exit"
    );
    let mut got = BTreeSet::new();
    while let Some(m) = consumer.next(Duration::from_millis(500)).await {
        let v: serde_json::Value = serde_json::from_slice(m.payload()).unwrap();
        got.insert(v["seq"].as_u64().unwrap());
    }
    assert_eq!(
        got.len() as u64,
        received,
        "the consumer has every message the daemon received"
    );
    let log = daemon.stderr();
    assert!(
        log.contains("Stopping receipt; the broker keeps the subscription to 'in'"),
        "{log}"
    );
    assert!(log.contains("BIP12092"), "disconnected: {log}");
    assert_eq!(stat(&stats, &a, "OpenConnections"), 0);
}

/// A stop deadline too short for what the flow holds: the node's task is aborted, and the
/// activity log says how many received messages were abandoned (BIP1009: those still queued,
/// and those the flow had started), so every received message is accounted for — published,
/// or counted as abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_deadline_that_cuts_the_flow_short_counts_what_it_abandoned() {
    let a = Broker::start("");
    let b = Broker::start("");
    let mut daemon = busy_relay(&a, &b, 20_000, 1, Some(4), "500ms").await;
    let producer = Client::connect(&a.url(), false).await;
    flood(&producer, "in", 0, 300).await;
    // Let the daemon receive them and work for a second (its first per-second summary), then
    // stop it with most of them still queued.
    daemon
        .wait_log("BIP12102 ", 1, Duration::from_secs(20))
        .await;
    let _ = daemon.terminate(Duration::from_secs(30));
    let stats = daemon.exit_stats();
    let received = stat(&stats, &a, "MessagesReceived") - stat(&stats, &a, "RedeliveriesSkipped");
    let sent = stat(&stats, &b, "MessagesSent");
    let log = daemon.stderr();
    let abandoned: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split_once("BIP1009 "))
        .map(|(_, rest)| {
            rest.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("a count first: {rest}"))
        })
        .collect();
    assert!(
        !abandoned.is_empty() && sent < received,
        "the deadline cut the flow short: sent {sent} of {received}; log:\n{log}"
    );
    assert_eq!(
        sent + abandoned.iter().sum::<u64>(),
        received,
        "published + abandoned = received ({abandoned:?}); log:\n{log}"
    );
    assert!(
        log.contains("were still queued when the flow was stopped at its deadline"),
        "{log}"
    );
}

fn shared_flow(url: &str, worker: &str) -> String {
    json!({
        "name": format!("worker-{worker}"),
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "version": 5, "topic": "$share/workers/jobs/#", "qos": 1},
            {"id": "tag", "type": "Compute", "code": format!(r#"
                Root.Body.worker = "{worker}";
                let up = LocalEnvironment.MQTT.Input.UserProperties;
                if up != () {{ up["handled-by"] = "{worker}"; }} else {{ up = #{{ "handled-by": "{worker}" }}; }}
                LocalEnvironment.Destination = #{{ MQTT: #{{ Output: #{{ UserProperties: up }} }} }};
            "#)},
            {"id": "out", "type": "MQTTPublish", "url": url, "version": 5, "topic": "done", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "tag"}, {"from": "tag.Out", "to": "out"}]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_shared_subscription_splits_a_stream_between_two_daemons() {
    const N: u64 = 1000;
    let broker = Broker::start("");
    let url = broker.url();
    let mut a = Daemon::spawn(&fast_config(""), &[("w.json", &shared_flow(&url, "A"))]);
    let mut b = Daemon::spawn(&fast_config(""), &[("w.json", &shared_flow(&url, "B"))]);
    a.wait_log("BIP12095", 1, Duration::from_secs(20)).await;
    b.wait_log("BIP12095", 1, Duration::from_secs(20)).await;
    let consumer = Client::connect(&url, true).await;
    consumer.subscribe("done", 1).await;
    let producer = Client::connect(&url, true).await;
    // One message with a user property, passed through to the output.
    let mut props = paho::Properties::new();
    props
        .push_string_pair(paho::PropertyCode::UserProperty, "trace-id", "t-42")
        .unwrap();
    let first = paho::MessageBuilder::new()
        .topic("jobs/x")
        .payload(json!({"seq": 0}).to_string())
        .qos(1)
        .properties(props)
        .finalize();
    producer.cli.publish(first).await.unwrap();
    let m = consumer
        .next(Duration::from_secs(10))
        .await
        .expect("first job done");
    let up: BTreeMap<String, String> = m.properties().user_iter().collect();
    assert_eq!(
        up.get("trace-id").map(String::as_str),
        Some("t-42"),
        "{up:?}"
    );
    assert!(matches!(
        up.get("handled-by").map(String::as_str),
        Some("A" | "B")
    ));

    flood(&producer, "jobs/y", 1, N - 1).await;
    let until = Instant::now() + Duration::from_secs(60);
    let mut by_worker: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = BTreeSet::from([0u64]);
    let mut dups = 0;
    while (seen.len() as u64) < N {
        let left = until.saturating_duration_since(Instant::now());
        let m = consumer
            .next(left)
            .await
            .unwrap_or_else(|| panic!("only {} of {N}", seen.len()));
        let v: serde_json::Value = serde_json::from_slice(m.payload()).unwrap();
        if !seen.insert(v["seq"].as_u64().unwrap()) {
            dups += 1;
        }
        *by_worker
            .entry(v["worker"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(dups, 0, "nothing doubled");
    assert!(
        consumer.next(Duration::from_millis(300)).await.is_none(),
        "nothing extra"
    );
    println!("shared subscription split: {by_worker:?}");
    assert!(
        by_worker.get("A").copied().unwrap_or(0) > 0
            && by_worker.get("B").copied().unwrap_or(0) > 0,
        "{by_worker:?}"
    );
    assert!(a.terminate(Duration::from_secs(20)).success());
    assert!(b.terminate(Duration::from_secs(20)).success());
}
