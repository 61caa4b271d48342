//! The MQTT delivery contract against a real mosquitto: the ack wait with one retry and
//! BIP12099 (broker frozen with SIGSTOP), connection failures on the reconnect schedule, a
//! broker restarted mid-stream, and additional instances.

mod common;

use std::time::{Duration, Instant};

use common::{fast_config, wait_until, Broker, Client, Running};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

/// in (broker A) → fwd (Compute) → out (broker B, frozen in the test); error paths publish
/// to broker A.
fn ack_flow(a: &str, b: &str, failure: bool, catch: bool, ack: &str) -> String {
    let mut conns = vec![
        json!({"from": "in.Out", "to": "fwd"}),
        json!({"from": "fwd.Out", "to": "out"}),
    ];
    if failure {
        conns.push(json!({"from": "out.Failure", "to": "report"}));
    }
    if catch {
        conns.push(json!({"from": "in.Catch", "to": "report"}));
    }
    conns.push(json!({"from": "report.Out", "to": "errors"}));
    json!({
        "name": "acks",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": a, "topic": "in", "qos": 1},
            {"id": "fwd", "type": "Compute", "code": "Root.Body.forwarded = true;"},
            {"id": "out", "type": "MQTTPublish", "url": b, "topic": "out", "qos": 1, "ack_timeout": ack},
            {"id": "report", "type": "Compute", "code": r#"
                let e = ExceptionList;
                let top = if "SocketTimeoutException" in e { e.SocketTimeoutException } else { e.RecoverableException };
                Root.Body.error = top;
            "#},
            {"id": "errors", "type": "MQTTPublish", "url": a, "topic": "errors", "qos": 1}
        ],
        "connections": conns
    })
    .to_string()
}

/// Returns (elapsed from publish to error, the error message body).
async fn freeze_and_publish(
    failure: bool,
    catch: bool,
) -> (Running, Duration, Option<serde_json::Value>) {
    let a = Broker::start("");
    let b = Broker::start("");
    let flow = Running::start(
        &ack_flow(&a.url(), &b.url(), failure, catch, "2s"),
        &fast_config(""),
        &[],
    );
    flow.wait_subscribed(1).await;
    wait_until(T, || flow.server_stats(&b.url()).open_connections == 1).await;
    let c = Client::connect(&a.url(), false).await;
    c.subscribe("errors", 1).await;
    b.freeze();
    let started = Instant::now();
    c.publish("in", json!({"n": 1}).to_string(), 1).await;
    let got = if failure || catch {
        Some(c.take_json(1, T).await.remove(0).1)
    } else {
        flow.wait_entry("BIP2628", "discarded", T).await;
        None
    };
    let elapsed = started.elapsed();
    b.thaw();
    drop(b);
    drop(a);
    (flow, elapsed, got)
}

fn assert_one_retry(flow: &Running, elapsed: Duration) {
    // Two waits of ack_timeout (2 s) with a reconnect between: one retry. None would be ~2 s,
    // two would be ~6 s.
    assert!(
        elapsed >= Duration::from_millis(3800) && elapsed < Duration::from_millis(5900),
        "expected one retry (~4 s), took {elapsed:?}"
    );
    let warnings = flow.entries("BIP4311");
    assert_eq!(warnings.len(), 1, "one failed first attempt: {warnings:?}");
    assert!(warnings[0]
        .message
        .contains("reconnecting and retrying once"));
    let errors = flow.entries("BIP12099");
    assert_eq!(errors.len(), 1, "one final failure: {errors:?}");
    assert_eq!(errors[0].tags["topic"], "out");
    assert_eq!(errors[0].tags["qos"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_publish_goes_to_failure_after_one_retry() {
    let (mut flow, elapsed, got) = freeze_and_publish(true, false).await;
    assert_one_retry(&flow, elapsed);
    let body = got.expect("failure message");
    assert_eq!(body["n"], 1);
    assert_eq!(
        body["forwarded"], true,
        "Failure gets the message as it reached the publish node"
    );
    assert_eq!(body["error"]["Number"], 12099);
    assert_eq!(body["error"]["Node"], "out");
    assert!(
        body["error"]["Text"]
            .as_str()
            .unwrap()
            .contains("was not acknowledged"),
        "{body}"
    );
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_publish_rolls_back_to_the_input_catch() {
    let (mut flow, elapsed, got) = freeze_and_publish(false, true).await;
    assert_one_retry(&flow, elapsed);
    let body = got.expect("catch message");
    // Rolled back: the input node's original message, without the Compute's change.
    assert_eq!(body["n"], 1);
    assert!(body.get("forwarded").is_none(), "{body}");
    assert_eq!(body["error"]["Number"], 12099);
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_publish_without_catch_is_logged_and_discarded() {
    let (mut flow, elapsed, _) = freeze_and_publish(false, false).await;
    assert_one_retry(&flow, elapsed);
    let e = &flow.entries("BIP2628")[0];
    assert_eq!(e.severity, flowbus_runtime::activity::Severity::Error);
    assert!(e.message.contains("BIP12099"), "{}", e.message);
    assert_eq!(e.tags["exception"]["SocketTimeoutException"]["Node"], "out");
    flow.stop().await;
}

fn millis_of(time: &str) -> i64 {
    // "2026-11-23T15:20:38.123Z" → milliseconds since midnight.
    let t = &time[11..23];
    let h: i64 = t[0..2].parse().unwrap();
    let m: i64 = t[3..5].parse().unwrap();
    let s: i64 = t[6..8].parse().unwrap();
    let ms: i64 = t[9..12].parse().unwrap();
    ((h * 60 + m) * 60 + s) * 1000 + ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_is_retried_on_the_schedule_then_connects() {
    let mut broker = Broker::not_started("");
    let url = broker.url();
    let flow_json = json!({
        "name": "late",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "out"}]
    })
    .to_string();
    let config = fast_config("")
        .replace(
            "reconnect_initial = \"200ms\"",
            "reconnect_initial = \"300ms\"",
        )
        .replace("reconnect_step = \"200ms\"", "reconnect_step = \"300ms\"")
        .replace("reconnect_max = \"1s\"", "reconnect_max = \"1200ms\"");
    let mut flow = Running::start(&flow_json, &config, &[]);
    wait_until(T, || {
        flow.entries("BIP12096")
            .iter()
            .filter(|e| e.node == "in")
            .count()
            >= 6
    })
    .await;
    let failures: Vec<_> = flow
        .entries("BIP12096")
        .into_iter()
        .filter(|e| e.node == "in")
        .collect();
    let delays: Vec<u64> = failures
        .iter()
        .map(|e| e.tags["retry_in_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(
        &delays[..6],
        &[300, 600, 900, 1200, 1200, 1200],
        "5 s, +5 s, at most 2 min — scaled down"
    );
    for (i, pair) in failures.windows(2).take(5).enumerate() {
        let gap = millis_of(&pair[1].time) - millis_of(&pair[0].time);
        let want = delays[i] as i64;
        assert!(
            gap >= want - 20 && gap < want + 700,
            "gap {i}: {gap} ms, expected about {want} ms"
        );
    }
    assert!(
        failures[0]
            .message
            .contains(&format!("Connection to {url} failed (attempt 1)")),
        "{}",
        failures[0].message
    );
    assert_eq!(
        flow.entries("BIP12071")
            .iter()
            .filter(|e| e.node == "in")
            .count(),
        1,
        "first failure logged once"
    );
    let attempts = flow.entries("BIP12096").len() as u64;
    assert!(
        flow.server_stats(&url).failed_connections >= attempts,
        "FailedConnections counts every failed attempt"
    );

    broker.start_again();
    flow.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out", 1).await;
    c.publish("in", json!({"late": true}).to_string(), 1).await;
    assert_eq!(c.take_json(1, T).await[0].1, json!({"late": true}));
    flow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_qos1_publication() {
    let mut broker = Broker::start("persistence true\nautosave_interval 1");
    let url = broker.url();
    // A consumer with a persistent session, so the broker keeps what it missed.
    let consumer = {
        let create = paho_mqtt::CreateOptionsBuilder::new()
            .server_uri(&url)
            .client_id("restart-consumer")
            .finalize();
        let mut cli = paho_mqtt::AsyncClient::new(create).unwrap();
        let rx = cli.get_stream(100_000);
        let opts =
            paho_mqtt::ConnectOptionsBuilder::with_mqtt_version(paho_mqtt::MQTT_VERSION_3_1_1)
                .clean_session(false)
                .automatic_reconnect(Duration::from_millis(100), Duration::from_millis(200))
                .finalize();
        cli.connect(opts).await.unwrap();
        cli.subscribe("seq", 1).await.unwrap();
        (cli, rx)
    };
    const N: u64 = 300;
    let flow_json = json!({
        "name": "stream",
        "nodes": [
            {"id": "tick", "type": "Timer", "interval": "5ms", "count": N},
            {"id": "number", "type": "Compute", "code": "Root.Body = #{ seq: LocalEnvironment.Timer.Input.Count };"},
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "echo", "qos": 1},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "seq", "qos": 1}
        ],
        "connections": [
            {"from": "tick.Out", "to": "number"},
            {"from": "number.Out", "to": "out"}
        ]
    })
    .to_string();
    let mut flow = Running::start(&flow_json, &fast_config(""), &[]);
    flow.wait_subscribed(1).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut dups = 0;
    let until = Instant::now() + Duration::from_secs(20);
    let mut restarted = false;
    while (seen.len() as u64) < N {
        assert!(
            Instant::now() < until,
            "only {} of {N} arrived; log:\n{}",
            seen.len(),
            flow.log()
                .iter()
                .map(|e| format!("{} {} {} {}", e.time, e.number, e.node, e.message))
                .collect::<Vec<_>>()
                .join("\n")
        );
        if !restarted && seen.len() >= 100 {
            broker.terminate();
            tokio::time::sleep(Duration::from_millis(500)).await;
            broker.start_again();
            restarted = true;
        }
        if let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.1.recv()).await
        {
            let v: serde_json::Value = serde_json::from_slice(m.payload()).unwrap();
            if !seen.insert(v["seq"].as_u64().unwrap()) {
                dups += 1;
            }
        }
    }
    assert!(restarted);
    assert_eq!(seen.len() as u64, N);
    assert_eq!(seen.iter().next_back().copied(), Some(N));
    println!("{dups} duplicates after the restart (QoS 1 allows them)");
    // Both nodes saw the connection go and come back.
    flow.wait_entry("BIP12062", "Lost the connection", T).await;
    let connects = flow.entries("BIP12063");
    assert!(
        connects.iter().filter(|e| e.node == "in").count() >= 2,
        "{connects:?}"
    );
    assert!(
        connects.iter().filter(|e| e.node == "out").count() >= 2,
        "{connects:?}"
    );
    // The subscriber resubscribed (the broker restarted; its session was persistent).
    let c = Client::connect(&url, false).await;
    c.subscribe("seq", 1).await;
    flow.stop().await;
}

/// in (instances N) → slow Compute → out; returns the outputs' (seq, start µs, end µs).
async fn run_instances(instances: u32, n: usize) -> Vec<(u64, i64, i64)> {
    let broker = Broker::start("");
    let url = broker.url();
    let flow_json = json!({
        "name": format!("instances{instances}"),
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "in", "qos": 1, "instances": instances},
            {"id": "slow", "type": "Compute", "code": "let t0 = now_micros(); let i = 0; while i < 40000 { i += 1; } Root.Body.t0 = t0; Root.Body.t1 = now_micros();"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "out", "qos": 1}
        ],
        "connections": [{"from": "in.Out", "to": "slow"}, {"from": "slow.Out", "to": "out"}]
    })
    .to_string();
    let mut flow = Running::start(&flow_json, &fast_config(""), &[]);
    flow.wait_subscribed(1).await;
    let c = Client::connect(&url, false).await;
    c.subscribe("out", 1).await;
    for i in 0..n {
        c.publish("in", json!({"seq": i}).to_string(), 1).await;
    }
    let got = c.take_json(n, Duration::from_secs(60)).await;
    flow.stop().await;
    got.into_iter()
        .map(|(_, b)| {
            (
                b["seq"].as_u64().unwrap(),
                b["t0"].as_i64().unwrap(),
                b["t1"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn max_overlap(runs: &[(u64, i64, i64)]) -> usize {
    let mut events: Vec<(i64, i32)> = runs.iter().flat_map(|r| [(r.1, 1), (r.2, -1)]).collect();
    events.sort();
    let (mut cur, mut best) = (0i32, 0i32);
    for (_, d) in events {
        cur += d;
        best = best.max(cur);
    }
    best as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_keeps_order_and_four_run_concurrently() {
    let one = run_instances(1, 24).await;
    let seqs: Vec<u64> = one.iter().map(|r| r.0).collect();
    assert_eq!(
        seqs,
        (0..24).collect::<Vec<_>>(),
        "instances: 1 keeps strict order"
    );
    assert_eq!(
        max_overlap(&one),
        1,
        "instances: 1 runs one message at a time"
    );

    let four = run_instances(4, 24).await;
    let mut seqs: Vec<u64> = four.iter().map(|r| r.0).collect();
    seqs.sort();
    assert_eq!(
        seqs,
        (0..24).collect::<Vec<_>>(),
        "nothing lost or doubled with 4 instances"
    );
    assert!(
        max_overlap(&four) >= 2,
        "instances: 4 processes messages concurrently"
    );
    let span = |r: &[(u64, i64, i64)]| {
        r.iter().map(|x| x.2).max().unwrap() - r.iter().map(|x| x.1).min().unwrap()
    };
    println!(
        "24 slow messages: instances 1 took {} ms, instances 4 took {} ms",
        span(&one) / 1000,
        span(&four) / 1000
    );
}
