//! The load generator: publishes 200-byte JSON messages to `bench/in/<k>` and consumes
//! `bench/out/#`, in two phases against a system that bridges one to the other:
//!
//! 1. **Throughput**: up to `--n` messages as fast as the system takes them, with at most
//!    `--window` messages between send and receive (closed loop, so no queue anywhere grows
//!    without bound and a QoS 0 system is not pushed into dropping); sending stops after
//!    `--secs` seconds if the system is slower. Rate = messages received / (last receive −
//!    first send).
//! 2. **Latency**: `--lat-n` messages at a fixed `--rate` (default 1,000 msg/s, open loop),
//!    each timestamped just before it is handed to paho; latency = receive − send.
//!
//! Or, with `--burst N`, one open-loop phase instead of both: N messages handed to one paho
//! client as fast as it takes them (no window: only paho's limits, `--max-inflight` (20)
//! unacknowledged and `--max-buffered` (100) queued; a publish paho refuses for want of room
//! is retried, never dropped), then a wait until nothing has arrived for `--quiet-secs` (or
//! until `--secs` after the first send). It reports how many came out, lost, duplicated and
//! out of order, the publish rate and the throughput (delivered / (last new delivery − first
//! send)): what a system does when its input arrives faster than it can bridge.
//!
//! Why those limits and not higher: Paho C keeps queued and in-flight publishes in linked
//! lists it searches for every new message id, so the more it holds the slower it publishes
//! (a QoS 2 burst with 65,000 in flight ran at 4–5k msg/s, with 20 at about 20k); and
//! against mosquitto's defaults more than 20 unreleased QoS 2 publishes are acknowledged and
//! discarded by the broker. With 20 and 100, broker-only bursts (`--direct`) lose nothing in
//! either broker configuration of `run.sh --burst`, at 80–130k (QoS 0), 43k (QoS 1) and 22–26k
//! (QoS 2) msg/s on two idle cores (less with a system sharing them).
//!
//! Each phase reports loss, duplicates and order violations (per input topic). With
//! `--pid`, the CPU seconds each phase cost that process and its peak RSS (`VmHWM`) are read
//! from /proc. Output: one JSON line on stdout and one human line on stderr.
//!
//! The consumer's paho callback only scans three numbers out of the payload and appends to a
//! vector (no JSON parser, no allocation beyond the vector's growth), so the consumer stays
//! much cheaper than any system it measures.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flowbus_bench::args::Args;
use flowbus_bench::{payload, procfs, stats};
use paho_mqtt as paho;
use serde_json::{json, Value};

const USAGE: &str = "loadgen: measure an MQTT bridge from bench/in/# to bench/out/#

  --url URL            broker (default tcp://127.0.0.1:1883)
  --qos Q              QoS of every publish and subscription, 0/1/2 (default 0)
  --system NAME        label for the output (default: sut)
  --label TEXT         extra label, e.g. nodelay=on (default: empty)
  --n N                throughput phase: messages (default 20000; 0 skips the phase)
  --secs S             throughput phase: stop sending after S seconds (default 10)
  --window W           throughput phase: most messages between send and receive (default 500;
                       0 = open loop)
  --lat-n N            latency phase: messages (default 5000; 0 skips the phase)
  --rate R             latency phase: messages per second (default 1000)
  --topics K           spread messages over bench/in/0..K-1 (default 1)
  --idle S             give up waiting when nothing arrived for S seconds (default 3)
  --ready-timeout S    wait this long for the system to bridge a probe (default 60)
  --pid PID            measure this process (the system under test): CPU seconds, peak RSS
  --broker-pid PID     also report the broker's CPU seconds
  --max-inflight M     paho's in-flight limit for the producer (default 20: mosquitto's
                       max_inflight_messages; over it, mosquitto drops QoS 2 publishes of an
                       MQTT 3.1.1 client after acknowledging them)
  --direct             broker only: publish straight to bench/out/<k> (no system in between)

Burst mode (open loop, replaces both phases):
  --burst N            publish N messages as fast as one paho client takes them, then wait
  --quiet-secs S       ... until nothing arrived for S seconds (default 3)
  --secs S             ... or S seconds after the first send (default 120 in burst mode)
  --max-buffered B     paho's queue of unwritten publishes (default 100 in burst mode:
                       over it a publish is retried)";

/// Microseconds on a monotonic clock shared by producer and consumer (one process).
fn now_us() -> u64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// One received message.
#[derive(Clone, Copy)]
struct Rec {
    run: u64,
    seq: u64,
    ts: u64,
    k: u32,
    recv: u64,
}

/// What the consumer callback shares with the producer.
struct Shared {
    base: u64,
    events: Mutex<Vec<Rec>>,
    /// Messages received per phase (index = run − base).
    received: [AtomicU64; 3],
    probes: AtomicU64,
    foreign: AtomicU64,
    last_recv: AtomicU64,
    waiting: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Shared {
    fn on_message(&self, p: &[u8]) {
        let recv = now_us();
        self.last_recv.store(recv, Ordering::Relaxed);
        let run = payload::field(p, "run").unwrap_or(u64::MAX);
        let ix = run.wrapping_sub(self.base);
        if ix >= 3 {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match (payload::field(p, "seq"), payload::field(p, "ts")) {
            (Some(seq), Some(ts)) => {
                let k = payload::field(p, "k").unwrap_or(0) as u32;
                self.events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Rec {
                        run,
                        seq,
                        ts,
                        k,
                        recv,
                    });
                self.received[ix as usize].fetch_add(1, Ordering::Release);
            }
            _ => {
                self.probes.fetch_add(1, Ordering::Release);
            }
        }
        if self.waiting.load(Ordering::Acquire) {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
    }

    /// Waits (up to `max`) for a message to arrive.
    fn wait_a_little(&self, max: Duration) {
        self.waiting.store(true, Ordering::Release);
        let g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.cv.wait_timeout(g, max);
        self.waiting.store(false, Ordering::Release);
    }

    fn count(&self, run: u64) -> u64 {
        self.received[(run - self.base) as usize].load(Ordering::Acquire)
    }
}

struct Producer {
    cli: paho::AsyncClient,
    qos: i32,
    topics: Vec<String>,
    tokens: VecDeque<paho::DeliveryToken>,
    errors: u64,
}

impl Producer {
    fn send(&mut self, run: u64, seq: u64) {
        let k = (seq % self.topics.len() as u64) as u32;
        let ts = now_us();
        let body = payload::build(run, seq, ts, k);
        let m = paho::Message::new(self.topics[k as usize].as_str(), body, self.qos);
        self.tokens.push_back(self.cli.publish(m));
        // Paho queues without limit; keep our own bound and collect the outcomes.
        while self.tokens.len() > 4096 {
            self.settle_one();
        }
    }

    fn settle_one(&mut self) {
        if let Some(t) = self.tokens.pop_front() {
            if let Err(e) = t.wait_for(Duration::from_secs(30)) {
                if self.errors == 0 {
                    eprintln!("loadgen: publish failed: {e}");
                }
                self.errors += 1;
            }
        }
    }

    fn settle_all(&mut self) {
        while !self.tokens.is_empty() {
            self.settle_one();
        }
    }
}

fn connect(url: &str, id: &str, max_inflight: i32, max_buffered: i32) -> paho::AsyncClient {
    let cli = paho::AsyncClient::new(
        paho::CreateOptionsBuilder::new()
            .server_uri(url)
            .client_id(id)
            .persistence(paho::PersistenceType::None)
            // Paho refuses a publish while 100 (the default) are queued and not yet written,
            // even when connected; our own bound (4096 tokens) is what limits the queue
            // (in burst mode, this limit: the publish is retried).
            .max_buffered_messages(max_buffered)
            .finalize(),
    )
    .unwrap_or_else(|e| fail(&format!("cannot create a client for {url}: {e}")));
    let opts = paho::ConnectOptionsBuilder::with_mqtt_version(paho::MQTT_VERSION_3_1_1)
        .clean_session(true)
        .keep_alive_interval(Duration::from_secs(60))
        .max_inflight(max_inflight)
        .finalize();
    if let Err(e) = cli.connect(opts).wait() {
        fail(&format!("cannot connect to {url}: {e}"));
    }
    cli
}

fn fail(msg: &str) -> ! {
    eprintln!("loadgen: error: {msg}");
    std::process::exit(1)
}

/// Loss, duplicates, order and latency of one phase.
fn analyse(events: &[Rec], run: u64, sent: u64, first_send: u64, topics: usize) -> Value {
    let mut count = vec![0u32; sent as usize];
    let mut last = vec![None::<u64>; topics.max(1)];
    let mut order = 0u64;
    let mut unexpected = 0u64;
    let mut lat = Vec::with_capacity(sent as usize);
    let mut by_seq = Vec::with_capacity(sent as usize);
    let mut last_recv = first_send;
    for e in events.iter().filter(|e| e.run == run) {
        if e.seq >= sent {
            unexpected += 1;
            continue;
        }
        let c = &mut count[e.seq as usize];
        *c += 1;
        if *c == 1 {
            let ms = e.recv.saturating_sub(e.ts) as f64 / 1000.0;
            lat.push(ms);
            by_seq.push((e.seq, ms));
            last_recv = last_recv.max(e.recv);
        }
        let slot = &mut last[(e.k as usize).min(topics.max(1) - 1)];
        match slot {
            Some(prev) if e.seq < *prev => order += 1,
            _ => *slot = Some(e.seq),
        }
    }
    let unique = count.iter().filter(|&&c| c > 0).count() as u64;
    // Where the missing messages are (the first few ranges), to tell a burst from a trickle.
    let mut missing = Vec::new();
    let mut i = 0;
    while i < count.len() && missing.len() < 5 {
        if count[i] == 0 {
            let start = i;
            while i < count.len() && count[i] == 0 {
                i += 1;
            }
            missing.push(format!("{start}..{}", i - 1));
        }
        i += 1;
    }
    let dups: u64 = count.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    lat.sort_by(f64::total_cmp);
    // The messages slower than the p99, in sending order (at most 100): a run of consecutive
    // sequence numbers is one stall of the system; scattered ones are scheduling noise.
    let p99 = stats::percentile(&lat, 99.0);
    by_seq.sort_unstable_by_key(|(seq, _)| *seq);
    let slow: Vec<(u64, f64)> = by_seq
        .iter()
        .filter(|(_, ms)| p99.is_some_and(|p| *ms > p))
        .take(100)
        .map(|(seq, ms)| (*seq, round(*ms, 3)))
        .collect();
    let elapsed = (last_recv.saturating_sub(first_send)) as f64 / 1e6;
    json!({
        "sent": sent,
        "received": unique,
        "lost": sent - unique,
        "dups": dups,
        "order_violations": order,
        "unexpected": unexpected,
        "missing": missing,
        "elapsed_s": round(elapsed, 4),
        "rate": if elapsed > 0.0 { round(unique as f64 / elapsed, 0) } else { 0.0 },
        "p50_ms": stats::percentile(&lat, 50.0).map(|x| round(x, 3)),
        "p99_ms": p99.map(|x| round(x, 3)),
        "max_ms": lat.last().map(|x| round(*x, 3)),
        "slower_than_p99": slow,
    })
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Waits until `run` has `target` messages, or nothing arrived for `idle`.
fn wait_for(shared: &Shared, run: u64, target: u64, idle: Duration) {
    loop {
        if shared.count(run) >= target {
            return;
        }
        let quiet = now_us().saturating_sub(shared.last_recv.load(Ordering::Relaxed));
        if quiet > idle.as_micros() as u64 {
            return;
        }
        shared.wait_a_little(Duration::from_millis(20));
    }
}

/// What the burst phase needs besides the clients.
struct Burst {
    n: u64,
    quiet: Duration,
    cap: Duration,
    pid: Option<u32>,
    broker_pid: Option<u32>,
}

/// Paho C return codes of a publish refused for want of room, not for a fault: too many
/// messages in flight (MQTTASYNC_MAX_MESSAGES_INFLIGHT), no free message id
/// (MQTTASYNC_NO_MORE_MSGIDS), too many buffered (MQTTASYNC_MAX_BUFFERED_MESSAGES). Retried.
const PAHO_BUSY: [i32; 3] = [-4, -10, -12];

/// The burst: `b.n` messages handed to paho as fast as it takes them, then a wait for quiet.
/// Returns the JSON line without the labels.
fn run_burst(b: &Burst, shared: &Shared, prod: &mut Producer, topics: usize) -> Value {
    let cpu = || b.pid.and_then(procfs::cpu_seconds);
    let bcpu = || b.broker_pid.and_then(procfs::cpu_seconds);
    let own = || procfs::cpu_seconds(std::process::id());
    let ctx = || b.pid.and_then(procfs::context_switches);
    let (cpu0, bcpu0, own0, busy0, ctx0) =
        (cpu(), bcpu(), own(), procfs::machine_busy_seconds(), ctx());
    let run = shared.base + 1;
    let first_send = now_us();
    let give_up = Instant::now() + b.cap;
    let mut tokens = Vec::with_capacity(b.n as usize);
    let mut retries = 0u64;
    let mut refused = 0u64;
    for seq in 0..b.n {
        let k = (seq % prod.topics.len() as u64) as u32;
        let body = payload::build(run, seq, now_us(), k);
        let mut m = paho::Message::new(prod.topics[k as usize].as_str(), body, prod.qos);
        loop {
            match prod.cli.try_publish(m) {
                Ok(t) => {
                    tokens.push(t);
                    break;
                }
                Err(paho::Error::Publish(rc, back))
                    if PAHO_BUSY.contains(&rc) && Instant::now() < give_up =>
                {
                    // Paho is full: let it write (and the broker acknowledge) some, then again.
                    retries += 1;
                    m = back;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => {
                    if refused == 0 {
                        eprintln!("loadgen: publish refused: {e}");
                    }
                    refused += 1;
                    break;
                }
            }
        }
    }
    let handed = now_us();
    // Every publish's outcome: written (QoS 0) or acknowledged by the broker (QoS 1/2).
    for t in tokens {
        let left = give_up.saturating_duration_since(Instant::now());
        if let Err(e) = t.wait_for(left.max(Duration::from_millis(1))) {
            if prod.errors == 0 {
                eprintln!("loadgen: publish failed: {e}");
            }
            prod.errors += 1;
        }
    }
    let published = now_us();
    // Quiet: nothing arrived for `quiet` since the last publish completed; or the cap.
    let mut capped = false;
    loop {
        let last = shared.last_recv.load(Ordering::Relaxed).max(published);
        if now_us().saturating_sub(last) > b.quiet.as_micros() as u64 {
            break;
        }
        if Instant::now() >= give_up {
            capped = true;
            break;
        }
        shared.wait_a_little(Duration::from_millis(50));
    }
    let end = now_us();
    let (cpu1, bcpu1, own1, busy1, ctx1) =
        (cpu(), bcpu(), own(), procfs::machine_busy_seconds(), ctx());
    let events = std::mem::take(&mut *shared.events.lock().unwrap_or_else(|e| e.into_inner()));
    let mut r = analyse(&events, run, b.n, first_send, topics);
    // In a burst most of the latency is queueing; the slowest by sequence number say little.
    if let Some(o) = r.as_object_mut() {
        o.remove("slower_than_p99");
    }
    let (first_recv, last_any) =
        events
            .iter()
            .filter(|e| e.run == run)
            .fold((None::<u64>, None::<u64>), |(f, l), e| {
                (
                    Some(f.map_or(e.recv, |f| f.min(e.recv))),
                    Some(l.map_or(e.recv, |l| l.max(e.recv))),
                )
            });
    let secs_since = |t: u64| round(t.saturating_sub(first_send) as f64 / 1e6, 4);
    let publish_s = published.saturating_sub(first_send) as f64 / 1e6;
    r["publish_refused"] = json!(refused);
    r["publish_retries"] = json!(retries);
    r["publish_errors"] = json!(prod.errors);
    r["handed_s"] = json!(secs_since(handed));
    r["publish_s"] = json!(round(publish_s, 4));
    r["publish_rate"] = json!(if publish_s > 0.0 {
        round(b.n as f64 / publish_s, 0)
    } else {
        0.0
    });
    r["first_recv_s"] = json!(first_recv.map(secs_since));
    r["last_recv_any_s"] = json!(last_any.map(secs_since));
    r["capped"] = json!(capped);
    let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(round(b - a, 3)),
        _ => None,
    };
    let measured_s = end.saturating_sub(first_send) as f64 / 1e6;
    let other_cpu = match (
        diff(busy0, busy1),
        diff(cpu0, cpu1),
        diff(bcpu0, bcpu1),
        diff(own0, own1),
    ) {
        (Some(total), sut, broker, Some(me)) => Some(round(
            total - sut.unwrap_or(0.0) - broker.unwrap_or(0.0) - me,
            3,
        )),
        _ => None,
    };
    let received = r["received"].as_u64().unwrap_or(0);
    json!({
        "mode": "burst",
        "qos": prod.qos,
        "payload_bytes": payload::SIZE,
        "topics": topics,
        "n": b.n,
        "quiet_secs": b.quiet.as_secs_f64(),
        "cap_secs": b.cap.as_secs_f64(),
        "burst": r,
        "foreign_messages": shared.foreign.load(Ordering::Relaxed),
        "sut": {
            "pid": b.pid,
            "cpu_s": diff(cpu0, cpu1),
            "cpu_us_per_msg": match diff(cpu0, cpu1) {
                Some(c) if received > 0 => Some(round(c / received as f64 * 1e6, 2)),
                _ => None,
            },
            "ctx_switches_per_msg": match (ctx0, ctx1) {
                (Some(a), Some(b)) if received > 0 => Some(round((b - a) as f64 / received as f64, 2)),
                _ => None,
            },
            "peak_rss_kib": b.pid.and_then(procfs::peak_rss_kib),
            "rss_kib": b.pid.and_then(procfs::rss_kib),
        },
        "loadgen_cpu_s": diff(own0, own1),
        "measured_s": round(measured_s, 3),
        "other_cpu_s": other_cpu,
        "other_cpu_share": other_cpu.map(|o| round(o / measured_s.max(1e-3), 3)),
        "broker": { "pid": b.broker_pid, "cpu_s": diff(bcpu0, bcpu1) },
    })
}

fn main() {
    let a = Args::parse(USAGE, &["direct"]);
    let url: String = a.get("url", "tcp://127.0.0.1:1883".to_string());
    let qos: i32 = a.get("qos", 0);
    if !(0..=2).contains(&qos) {
        fail("--qos must be 0, 1 or 2");
    }
    let system: String = a.get("system", "sut".to_string());
    let label: String = a.get("label", String::new());
    let n: u64 = a.get("n", 20_000);
    let burst: u64 = a.get("burst", 0);
    let secs: f64 = a.get("secs", if burst > 0 { 120.0 } else { 10.0 });
    let quiet = Duration::from_secs_f64(a.get("quiet-secs", 3.0));
    let window: u64 = a.get("window", 500);
    let lat_n: u64 = a.get("lat-n", 5_000);
    let rate: f64 = a.get("rate", 1000.0);
    let k: usize = a.get("topics", 1usize).max(1);
    let idle = Duration::from_secs_f64(a.get("idle", 3.0));
    let max_inflight: i32 = a.get("max-inflight", 20);
    // Burst: paho's default (100). Over it paho refuses a publish and the burst retries it; a
    // longer queue only makes paho slower (it searches its command list for a free message id).
    let max_buffered: i32 = a.get("max-buffered", if burst > 0 { 100 } else { 100_000 });
    let ready_timeout = Duration::from_secs_f64(a.get("ready-timeout", 60.0));
    let pid: Option<u32> = a.opt("pid").map(|_| a.get("pid", 0));
    let broker_pid: Option<u32> = a.opt("broker-pid").map(|_| a.get("broker-pid", 0));

    now_us();
    // Runs of this process are told apart from anything else on the broker.
    let base = (u64::from(std::process::id()) << 20)
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            & 0xfffff);
    let base = base & ((1 << 50) - 1);
    let shared = Arc::new(Shared {
        base,
        events: Mutex::new(Vec::with_capacity(
            (if burst > 0 { burst } else { n + lat_n }) as usize + 16,
        )),
        received: Default::default(),
        probes: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        last_recv: AtomicU64::new(0),
        waiting: AtomicBool::new(false),
        lock: Mutex::new(()),
        cv: Condvar::new(),
    });

    let prefix = if a.flag("direct") {
        "bench/out"
    } else {
        "bench/in"
    };
    let me = std::process::id();
    let consumer = connect(&url, &format!("bench-consumer-{me}"), max_inflight, 100_000);
    {
        let shared = shared.clone();
        // Runs on the Paho library thread: scan, append, notify; never block.
        consumer.set_message_callback(move |_, m| {
            if let Some(m) = m {
                shared.on_message(m.payload());
            }
        });
    }
    if let Err(e) = consumer.subscribe("bench/out/#", qos).wait() {
        fail(&format!("cannot subscribe to bench/out/#: {e}"));
    }
    let mut prod = Producer {
        cli: connect(
            &url,
            &format!("bench-producer-{me}"),
            max_inflight,
            max_buffered,
        ),
        qos,
        topics: (0..k).map(|i| format!("{prefix}/{i}")).collect(),
        tokens: VecDeque::new(),
        errors: 0,
    };

    // Ready: the system bridges a probe.
    let t = Instant::now();
    while shared.probes.load(Ordering::Acquire) == 0 {
        if t.elapsed() > ready_timeout {
            fail(&format!(
                "the system did not bridge a probe from bench/in/0 to bench/out/0 within {ready_timeout:?}"
            ));
        }
        let m = paho::Message::new(format!("{prefix}/0"), payload::probe(base), qos);
        // The outcome does not matter: the probe is repeated until one comes through.
        drop(prod.cli.publish(m));
        shared.wait_a_little(Duration::from_millis(200));
    }
    // Let stragglers (more probes) pass.
    std::thread::sleep(Duration::from_millis(300));

    if burst > 0 {
        let b = Burst {
            n: burst,
            quiet,
            cap: Duration::from_secs_f64(secs),
            pid,
            broker_pid,
        };
        let mut out = run_burst(&b, &shared, &mut prod, k);
        out["system"] = json!(system);
        out["label"] = json!(label);
        out["url"] = json!(url);
        out["max_inflight"] = json!(max_inflight);
        println!("{out}");
        let r = &out["burst"];
        let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x}"));
        eprintln!(
            "{system} qos={qos} {label} burst: {} sent at {} msg/s{} | {} delivered at {} msg/s ({} lost, {} dup, {} order){} | cpu {} s, peak rss {} KiB | other processes used {} cores",
            r["sent"],
            f(&r["publish_rate"]),
            match r["publish_retries"].as_u64() {
                Some(0) | None => String::new(),
                Some(x) => format!(" ({x} publishes retried)"),
            },
            r["received"],
            f(&r["rate"]),
            r["lost"],
            r["dups"],
            r["order_violations"],
            if r["capped"].as_bool() == Some(true) { " CAPPED" } else { "" },
            f(&out["sut"]["cpu_s"]),
            f(&out["sut"]["peak_rss_kib"]),
            f(&out["other_cpu_share"]),
        );
        let _ = prod.cli.disconnect(None).wait_for(Duration::from_secs(2));
        let _ = consumer.disconnect(None).wait_for(Duration::from_secs(2));
        return;
    }

    let cpu = || pid.and_then(procfs::cpu_seconds);
    let bcpu = || broker_pid.and_then(procfs::cpu_seconds);
    let own = || procfs::cpu_seconds(std::process::id());
    let ctx = || pid.and_then(procfs::context_switches);
    let ctx0 = ctx();
    let (cpu0, bcpu0, own0, busy0) = (cpu(), bcpu(), own(), procfs::machine_busy_seconds());

    // Phase 1: throughput.
    let run_t = base + 1;
    let start_t = now_us();
    let mut sent_t = 0u64;
    let mut stalled = false;
    if n > 0 {
        let stop_at = Instant::now() + Duration::from_secs_f64(secs);
        let mut since = 0u32;
        while sent_t < n {
            if window > 0 {
                let mut progress_at = Instant::now();
                let mut seen = shared.count(run_t);
                while sent_t - shared.count(run_t) >= window {
                    shared.wait_a_little(Duration::from_millis(5));
                    let c = shared.count(run_t);
                    if c != seen {
                        seen = c;
                        progress_at = Instant::now();
                    } else if progress_at.elapsed() > idle {
                        stalled = true;
                        break;
                    }
                }
                if stalled {
                    break;
                }
            }
            prod.send(run_t, sent_t);
            sent_t += 1;
            since += 1;
            if since == 256 {
                since = 0;
                if Instant::now() >= stop_at {
                    break;
                }
            }
        }
        prod.settle_all();
        wait_for(&shared, run_t, sent_t, idle);
    }
    let (cpu1, bcpu1) = (cpu(), bcpu());
    let ctx1 = ctx();

    // Phase 2: latency at a fixed rate.
    let run_l = base + 2;
    let start_l = now_us();
    if lat_n > 0 {
        let every = Duration::from_secs_f64(1.0 / rate.max(1e-3));
        let t0 = Instant::now();
        for i in 0..lat_n {
            let due = t0 + every.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            prod.send(run_l, i);
        }
        prod.settle_all();
        wait_for(&shared, run_l, lat_n, idle);
    }
    let (cpu2, bcpu2, own2, busy2) = (cpu(), bcpu(), own(), procfs::machine_busy_seconds());
    let measured_s = (now_us() - start_t) as f64 / 1e6;

    let events = std::mem::take(&mut *shared.events.lock().unwrap_or_else(|e| e.into_inner()));
    let tput = analyse(&events, run_t, sent_t, start_t, k);
    let lat = analyse(&events, run_l, lat_n, start_l, k);
    let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(round(b - a, 3)),
        _ => None,
    };
    // CPU the rest of the machine used meanwhile (other processes): a noisy neighbour makes
    // every number here unreliable, so the report shows it.
    let other_cpu = match (
        diff(busy0, busy2),
        diff(cpu0, cpu2),
        diff(bcpu0, bcpu2),
        diff(own0, own2),
    ) {
        (Some(total), sut, broker, Some(me)) => Some(round(
            total - sut.unwrap_or(0.0) - broker.unwrap_or(0.0) - me,
            3,
        )),
        _ => None,
    };
    let out = json!({
        "system": system,
        "label": label,
        "qos": qos,
        "url": url,
        "payload_bytes": payload::SIZE,
        "window": window,
        "topics": k,
        "throughput": tput,
        "throughput_stalled": stalled,
        "latency": lat,
        "latency_rate": rate,
        "publish_errors": prod.errors,
        "foreign_messages": shared.foreign.load(Ordering::Relaxed),
        "sut": {
            "pid": pid,
            "cpu_s_throughput": diff(cpu0, cpu1),
            "cpu_s_latency": diff(cpu1, cpu2),
            "cpu_s": diff(cpu0, cpu2),
            // Context switches of the system's threads per message in the throughput phase.
            "ctx_switches_per_msg": match (ctx0, ctx1, tput["received"].as_u64()) {
                (Some(a), Some(b), Some(n)) if n > 0 => Some(round((b - a) as f64 / n as f64, 2)),
                _ => None,
            },
            "peak_rss_kib": pid.and_then(procfs::peak_rss_kib),
            "rss_kib": pid.and_then(procfs::rss_kib),
        },
        "loadgen_cpu_s": diff(own0, own2),
        "measured_s": round(measured_s, 3),
        "other_cpu_s": other_cpu,
        "other_cpu_share": other_cpu.map(|o| round(o / measured_s.max(1e-3), 3)),
        "broker": {
            "pid": broker_pid,
            "cpu_s_throughput": diff(bcpu0, bcpu1),
            "cpu_s_latency": diff(bcpu1, bcpu2),
            "cpu_s": diff(bcpu0, bcpu2),
        },
    });
    println!("{out}");
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x}"));
    eprintln!(
        "{system} qos={qos} {label}: {} msg/s ({} sent, {} lost, {} dup, {} order){} | at {rate} msg/s: p50 {} p99 {} max {} ms ({} lost, {} dup, {} order) | cpu {} s, peak rss {} KiB | other processes used {} cores",
        f(&tput["rate"]),
        tput["sent"],
        tput["lost"],
        tput["dups"],
        tput["order_violations"],
        if stalled { " STALLED" } else { "" },
        f(&lat["p50_ms"]),
        f(&lat["p99_ms"]),
        f(&lat["max_ms"]),
        lat["lost"],
        lat["dups"],
        lat["order_violations"],
        f(&out["sut"]["cpu_s"]),
        f(&out["sut"]["peak_rss_kib"]),
        f(&out["other_cpu_share"]),
    );
    let _ = prod.cli.disconnect(None).wait_for(Duration::from_secs(2));
    let _ = consumer.disconnect(None).wait_for(Duration::from_secs(2));
}
