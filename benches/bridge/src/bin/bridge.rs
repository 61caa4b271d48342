//! A hand-written paho-mqtt bridge with flowbus's bridge semantics: subscribe to
//! `bench/in/#`, parse each payload as JSON, add a field (`"bridged": true`), publish it to
//! `bench/out/<rest of the topic>` at the same QoS. The yardstick flowbus is measured against.
//!
//! Modes:
//! - `wait`: waits for each publish's acknowledgement (QoS 1/2) or write (QoS 0) before
//!   handling the next message — the MQTTPublish node's contract, one message at a time.
//! - `pipelined`: hands each message to paho as soon as it is processed and awaits the acks
//!   concurrently, oldest first, with at most `--window` unacknowledged; paho sends in call
//!   order, so output order is input order. The client-library limit.
//!
//! The paho message callback runs on the Paho C library's one callback thread (shared by
//! every client in the process), so it only moves the message into an unbounded channel
//! (it must neither block nor drop); a tokio task does the work. With QoS 1/2 the broker's
//! in-flight limit bounds that queue; with QoS 0 the producer's pace does (the load generator
//! runs a closed loop).
//!
//! Two clients (subscriber and publisher), as a flowbus flow with an MQTTSubscribe and an
//! MQTTPublish node has. No paho persistence (`--persist DIR` adds file persistence to the
//! publisher, as flowbus's MQTTPublish uses for QoS 1/2).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flowbus_bench::args::Args;
use paho_mqtt as paho;
use serde_json::Value;
use tokio::sync::mpsc;

const USAGE: &str = "bridge: a hand-written paho-mqtt bridge bench/in/# -> bench/out/#

  --url URL         broker (default tcp://127.0.0.1:1883)
  --qos Q           QoS of the subscription and of every publish (default 0)
  --mode MODE       wait (one publish at a time) or pipelined (default wait)
  --window W        pipelined: most unacknowledged publishes (default 1024)
  --max-inflight M  paho's in-flight limit (default 20, mosquitto's max_inflight_messages)
  --persist DIR     give the publisher paho file persistence under DIR
  --shared-client   use one client for subscribe and publish";

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    published: AtomicU64,
    bad_json: AtomicU64,
    failed: AtomicU64,
}

fn client(url: &str, id: &str, persist: Option<&str>, max_inflight: i32) -> paho::AsyncClient {
    let persistence = match persist {
        Some(dir) => paho::PersistenceType::FilePath(dir.into()),
        None => paho::PersistenceType::None,
    };
    let cli = paho::AsyncClient::new(
        paho::CreateOptionsBuilder::new()
            .server_uri(url)
            .client_id(id)
            .persistence(persistence)
            // Paho refuses a publish while 100 (the default) are queued and not yet written,
            // even when connected; the window is what bounds the queue here.
            .max_buffered_messages(100_000)
            .finalize(),
    )
    .unwrap_or_else(|e| fail(&format!("cannot create a client: {e}")));
    let opts = paho::ConnectOptionsBuilder::with_mqtt_version(paho::MQTT_VERSION_3_1_1)
        .clean_session(true)
        .keep_alive_interval(Duration::from_secs(60))
        // Not above the broker's limit for incoming QoS 2 (mosquitto: max_inflight_messages,
        // default 20): over it, mosquitto acknowledges a 3.1.1 client's QoS 2 publish with
        // PUBREC and drops it. Paho queues the rest in order; the window still overlaps acks.
        .max_inflight(max_inflight)
        .finalize();
    if let Err(e) = cli.connect(opts).wait() {
        fail(&format!("cannot connect to {url}: {e}"));
    }
    cli
}

fn fail(msg: &str) -> ! {
    eprintln!("bridge: error: {msg}");
    std::process::exit(1)
}

/// Parse, enrich, re-serialise; `None` for a payload that is not a JSON object.
fn transform(m: &paho::Message, qos: i32) -> Option<paho::Message> {
    let mut v: Value = serde_json::from_slice(m.payload()).ok()?;
    v.as_object_mut()?
        .insert("bridged".into(), Value::Bool(true));
    let body = serde_json::to_vec(&v).ok()?;
    let rest = m.topic().strip_prefix("bench/in/").unwrap_or(m.topic());
    Some(paho::Message::new(format!("bench/out/{rest}"), body, qos))
}

async fn run_wait(
    cli: paho::AsyncClient,
    mut rx: mpsc::UnboundedReceiver<paho::Message>,
    qos: i32,
    c: Arc<Counters>,
) {
    while let Some(m) = rx.recv().await {
        let Some(out) = transform(&m, qos) else {
            c.bad_json.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match cli.publish(out).await {
            Ok(()) => c.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => c.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

async fn run_pipelined(
    cli: paho::AsyncClient,
    mut rx: mpsc::UnboundedReceiver<paho::Message>,
    qos: i32,
    window: usize,
    c: Arc<Counters>,
) {
    let mut inflight: VecDeque<paho::DeliveryToken> = VecDeque::with_capacity(window);
    let mut open = true;
    while open || !inflight.is_empty() {
        tokio::select! {
            biased;
            r = async { (&mut inflight[0]).await }, if !inflight.is_empty() => {
                inflight.pop_front();
                match r {
                    Ok(()) => c.published.fetch_add(1, Ordering::Relaxed),
                    Err(_) => c.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
            m = rx.recv(), if open && inflight.len() < window => {
                let Some(m) = m else { open = false; continue };
                match transform(&m, qos) {
                    Some(out) => inflight.push_back(cli.publish(out)),
                    None => { c.bad_json.fetch_add(1, Ordering::Relaxed); }
                }
            }
        }
    }
}

fn main() {
    let a = Args::parse(USAGE, &["shared-client"]);
    let url: String = a.get("url", "tcp://127.0.0.1:1883".to_string());
    let qos: i32 = a.get("qos", 0);
    let mode: String = a.get("mode", "wait".to_string());
    let window: usize = a.get("window", 1024usize).max(1);
    let persist = a.opt("persist");
    let max_inflight: i32 = a.get("max-inflight", 20);
    if !(0..=2).contains(&qos) || !(mode == "wait" || mode == "pipelined") {
        fail("--qos must be 0..2 and --mode wait or pipelined");
    }
    let me = std::process::id();
    let sub = client(&url, &format!("bench-bridge-sub-{me}"), None, max_inflight);
    let publ = if a.flag("shared-client") {
        sub.clone()
    } else {
        client(
            &url,
            &format!("bench-bridge-pub-{me}"),
            persist.as_deref(),
            max_inflight,
        )
    };
    let counters = Arc::new(Counters::default());
    let (tx, rx) = mpsc::unbounded_channel::<paho::Message>();
    {
        let c = counters.clone();
        // Paho's callback thread: hand over and return.
        sub.set_message_callback(move |_, m| {
            if let Some(m) = m {
                c.received.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(m);
            }
        });
    }
    if let Err(e) = sub.subscribe("bench/in/#", qos).wait() {
        fail(&format!("cannot subscribe: {e}"));
    }
    eprintln!("bridge: {mode}, qos {qos}, ready");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio: {e}")));
    let c = counters.clone();
    rt.block_on(async move {
        let work = async {
            if mode == "wait" {
                run_wait(publ, rx, qos, c).await
            } else {
                run_pipelined(publ, rx, qos, window, c).await
            }
        };
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .unwrap_or_else(|e| fail(&format!("signal: {e}")));
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        tokio::select! {
            _ = work => {}
            _ = stop => {}
        }
    });
    eprintln!(
        "bridge: received {}, published {}, bad json {}, failed {}",
        counters.received.load(Ordering::Relaxed),
        counters.published.load(Ordering::Relaxed),
        counters.bad_json.load(Ordering::Relaxed),
        counters.failed.load(Ordering::Relaxed)
    );
}
