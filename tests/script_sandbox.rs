//! Issue 18, "scripts cannot take the process down": hostile Compute scripts run by the real
//! `flowbus` binary against a real mosquitto, next to a healthy flow that must keep working.
//! Each hostile script must end as a script error routed to its Failure terminal (an activity
//! entry BIP2230), never as a crash of the daemon: values nested 12,000 levels deep (the
//! stack overflow of the issue) and a script that tries for 200,000, a memory hog, and an
//! endless loop with the longest timeout allowed, whose thread must end when its flow is
//! removed.

mod common;

use std::time::{Duration, Instant};

use common::{fast_config, Broker, Client, Daemon};
use serde_json::{json, Value};

/// A Compute node fed by its own subscription (`sb/<id>`), its Failure terminal connected.
fn hostile_nodes(url: &str, id: &str, compute: Value) -> (Vec<Value>, Vec<Value>) {
    let mut compute = compute;
    compute["id"] = json!(id);
    compute["type"] = json!("Compute");
    let nodes = vec![
        json!({"id": format!("in_{id}"), "type": "MQTTSubscribe", "url": url, "topic": format!("sb/{id}")}),
        compute,
        json!({"id": format!("failed_{id}"), "type": "Compute", "code": "Root.Body.failed = true;"}),
    ];
    let connections = vec![
        json!({"from": format!("in_{id}.Out"), "to": id}),
        json!({"from": format!("{id}.Failure"), "to": format!("failed_{id}")}),
    ];
    (nodes, connections)
}

fn flow(name: &str, parts: Vec<(Vec<Value>, Vec<Value>)>) -> String {
    let (mut nodes, mut connections) = (Vec::new(), Vec::new());
    for (n, c) in parts {
        nodes.extend(n);
        connections.extend(c);
    }
    json!({"name": name, "nodes": nodes, "connections": connections}).to_string()
}

/// sb/ok → y = x + 1 → sb/ok/out.
fn healthy(url: &str) -> String {
    json!({
        "name": "healthy",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": "sb/ok"},
            {"id": "calc", "type": "Compute", "code": "Root.Body.y = Root.Body.x + 1;"},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": "sb/ok/out"}
        ],
        "connections": [{"from": "in.Out", "to": "calc"}, {"from": "calc.Out", "to": "out"}]
    })
    .to_string()
}

/// The daemon's threads with this name.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

/// Waits for the BIP2230 entry of `node` and returns its message.
async fn failure_of(d: &Daemon, node: &str, timeout: Duration) -> String {
    let until = Instant::now() + timeout;
    loop {
        if let Some(e) = d.entries("BIP2230").into_iter().find(|e| e["node"] == node) {
            return e["message"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < until,
            "no failure of '{node}'; log:\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The healthy flow answers (the daemon is alive and its other flows are not held up).
async fn healthy_answers(producer: &Client, consumer: &Client, x: i64) {
    producer
        .publish("sb/ok", json!({ "x": x }).to_string(), 0)
        .await;
    let got = consumer.take_json(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].1["y"], json!(x + 1), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_scripts_fail_alone_and_the_daemon_keeps_working() {
    let broker = Broker::start("");
    let url = broker.url();
    let hostile = flow(
        "hostile",
        vec![
            // The script overflowed the stack at 12,000 levels; it wrote `a = [a]`,
            // which copies `a` each time (over 10 s for 12,000 levels in a debug build):
            // `take` moves it instead.
            hostile_nodes(
                &url,
                "nest",
                json!({"code": "let a = []; for i in 0..Root.Body.n { a = [a.take()]; } Root.Body = a;"}),
            ),
            // Rhai's own size checks walk the whole value once per level, so 200,000 levels
            // take longer than this timeout: built as deep as the time allows, then dropped.
            hostile_nodes(
                &url,
                "deeper",
                json!({
                    "code": "let a = []; for i in 0..Root.Body.n { a = [a.take()]; } Root.Body = a;",
                    "max_operations": 100_000_000, "timeout": "1s"
                }),
            ),
            // Distinct 8 MiB strings, key by key (Rhai checks the size of each, not of the map):
            // over the 64 MiB budget after eight.
            hostile_nodes(
                &url,
                "hog",
                json!({
                    "code": "let s = \"x\"; for i in 0..23 { s += s; } let m = #{}; for i in 0..Root.Body.n { m[`k${i}`] = s + i; } Root.Body.n = m.len();"
                }),
            ),
        ],
    );
    let spin = flow(
        "spin",
        vec![hostile_nodes(
            &url,
            "spin",
            json!({"code": "loop { }", "timeout": "60s", "max_operations": 1_000_000_000}),
        )],
    );
    let config = fast_config("[daemon]\nwatch_interval = \"100ms\"\nshutdown_timeout = \"5s\"\n");
    let d = Daemon::spawn(
        &config,
        &[
            ("healthy.json", &healthy(&url)),
            ("hostile.json", &hostile),
            ("spin.json", &spin),
        ],
    );
    d.wait_api().await;
    d.cli_until(
        &["log", "--number", "BIP12095"],
        Duration::from_secs(20),
        |o| o.matches("Subscribed to").count() >= 5,
    )
    .await;
    let consumer = Client::connect(&url, false).await;
    consumer.subscribe("sb/ok/out", 0).await;
    let producer = Client::connect(&url, false).await;
    healthy_answers(&producer, &consumer, 1).await;
    let send = |topic: &'static str, n: u32| {
        let producer = &producer;
        async move {
            producer
                .publish(topic, json!({ "n": n }).to_string(), 0)
                .await
        }
    };

    send("sb/nest", 12_000).await;
    let e = failure_of(&d, "nest", Duration::from_secs(60)).await;
    assert!(
        e.contains("the script left Root.Body with a value nested more than 128 levels deep: raise the node's \"max_depth\" (at most 1024)"),
        "{e}"
    );
    healthy_answers(&producer, &consumer, 2).await;

    send("sb/deeper", 200_000).await;
    let e = failure_of(&d, "deeper", Duration::from_secs(60)).await;
    assert!(
        e.contains("the script ran longer than its timeout (1s")
            || e.contains("nested more than 128 levels deep"),
        "{e}"
    );
    healthy_answers(&producer, &consumer, 3).await;

    send("sb/hog", 100).await;
    let e = failure_of(&d, "hog", Duration::from_secs(60)).await;
    assert!(
        e.contains("the script used more than its memory budget (64 MiB): raise the node's \"max_memory\" (at most 256 MiB) or process less at once"),
        "{e}"
    );
    assert!(
        d.peak_rss_kib() < 400 * 1024,
        "peak RSS {} KiB",
        d.peak_rss_kib()
    );
    healthy_answers(&producer, &consumer, 4).await;

    // The endless loop holds its input thread; removing its flow interrupts it (a second
    // after the stop: the grace a stopping flow gives a running script) and the thread ends.
    let inputs = threads_named(d.pid(), "flowbus-input");
    assert_eq!(inputs, 5, "one thread per input node");
    send("sb/spin", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    healthy_answers(&producer, &consumer, 5).await;
    let started = Instant::now();
    let (code, out, err) = d.cli(&["flows", "remove", "spin"]);
    assert_eq!(code, 0, "{out}{err}");
    common::wait_until(Duration::from_secs(3), || {
        threads_named(d.pid(), "flowbus-input") == inputs - 1
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let e = failure_of(&d, "spin", Duration::from_secs(5)).await;
    assert!(e.contains("the flow is stopping"), "{e}");
    healthy_answers(&producer, &consumer, 6).await;
    assert!(
        !d.stderr().contains("overflowed its stack"),
        "{}",
        d.stderr()
    );
}
