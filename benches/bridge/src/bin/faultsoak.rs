//! Broker fault-injection soak for flowbus (`make soak-faults`, `soak-faults.sh`).
//!
//! **Scenario `soak`** (the default): a private mosquitto with persistence on, flowbus with
//! two relay flows (`soak/in/1` → Compute → `soak/out/1` at QoS 1, the same at QoS 2; the
//! subscribers with persistent sessions and fixed client ids), a producer that publishes
//! 500-byte messages at `--rate` per QoS and republishes each until the broker acknowledges
//! it, and a consumer with a persistent session on `soak/out/#`. Meanwhile the broker is
//! restarted gracefully (SIGTERM, start), killed (SIGKILL, start) or frozen (SIGSTOP … SIGCONT,
//! a network stall), one fault after another. Two phases, accounted apart:
//!
//! 1. `graceful+freeze` (the first two thirds of `--secs`): nothing may be lost.
//! 2. `with-kills`: kills, restarts and freezes in turn. A killed broker loses what it
//!    acknowledged since its last save (`autosave_interval`, `--autosave`); lost messages are
//!    matched against the kills (acknowledged to the producer at most `--autosave` + 1 s before
//!    one) and flowbus's activity log is searched for publications it gave up (BIP12099).
//!
//! Each phase ends by stopping the producer and waiting for the consumer to drain. A crash
//! (the daemon exited) is counted and the daemon started again; a stall is `--stall` seconds
//! with messages owed and none arriving, or `/healthz` not answering. The daemon's RSS is
//! sampled every second; the peak (`VmHWM`) is read at the end.
//!
//! **Scenario `session-loss`** (issue 18 item 8, for `--wrap valgrind…` or an ASan build):
//! per run, a fresh mosquitto without persistence and a fresh daemon with one relay (QoS 1,
//! persistent subscriber, a Compute that loops `--loop` times, file persistence); 3,000
//! messages of 500 bytes; once the subscriber is paused by back-pressure (or a third of the
//! messages are through) the broker is stopped (SIGTERM) and started again on the same port;
//! once the relay has subscribed again (after BIP12118), 100 more are published. A run passes when
//! the daemon neither crashed nor stopped answering `/healthz`, logged BIP12118, relayed
//! messages published after the restart, and (under a checker) the checker found no error.
//! (The broker lost every session, so what it had queued is gone; the daemon's own counts
//! of messages received and published are in the result.)
//!
//! Output: progress on stderr, one JSON document on stdout (also `OUT/result.json`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use flowbus_bench::args::Args;
use flowbus_bench::procfs;
use paho_mqtt as paho;
use serde_json::{json, Value};

const USAGE: &str = "faultsoak: flowbus relays under broker restarts, kills and freezes

  --flowbus PATH       the flowbus binary (required)
  --out DIR            working directory (required; broker, daemon, logs, result.json)
  --scenario S         soak (default) or session-loss
  --secs S             soak: run at least S seconds (default 960)
  --min-faults N       soak: and at least N faults (default 100)
  --rate R             soak: messages per second per QoS (default 40)
  --autosave S         soak: the broker's autosave_interval (default 5)
  --loop N             Compute loop iterations per message (soak default 300, session-loss 3000)
  --runs N             session-loss: runs (default 5)
  --stall S            no progress for S seconds while messages are owed is a stall (default 90)
  --wrap CMD           run flowbus under CMD (split on spaces), e.g. a valgrind command line
  --env K=V[,K=V]      extra environment for flowbus (e.g. LD_PRELOAD=...,ASAN_OPTIONS=...)
  --seed N             fault schedule seed (default 1)";

fn now() -> f64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_secs_f64()
}

macro_rules! say {
    ($($t:tt)*) => { eprintln!("[{:7.1}s] {}", now(), format!($($t)*)) };
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A small xorshift generator: the fault schedule repeats for a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [lo, hi) seconds.
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let f = (self.next() % 10_000) as f64 / 10_000.0;
        Duration::from_secs_f64(lo + f * (hi - lo))
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child we started; no memory is touched.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

// ---------------------------------------------------------------------------------------
// Processes

struct Broker {
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    fn start(dir: &Path, port: u16, persistence: bool, autosave: u32) -> Broker {
        std::fs::create_dir_all(dir).expect("broker dir");
        let conf = dir.join("mosquitto.conf");
        let persist = if persistence {
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval {autosave}\n",
                dir.display()
            )
        } else {
            "persistence false\n".to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n{persist}max_queued_messages 100000\nmax_inflight_messages 20\nset_tcp_nodelay true\nlog_dest none\n"
            ),
        )
        .expect("write mosquitto.conf");
        // mosquitto started as root drops to its own user, which must be able to write here.
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("a+rwx")
            .arg(dir)
            .status();
        let mut b = Broker {
            port,
            conf,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("mosquitto log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        // Ready when it accepts connections.
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        say!("warning: mosquitto did not listen within 10 s");
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM (a persistent broker saves its state) and wait for it to exit.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// SIGKILL: whatever it did not save is gone.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGCONT);
        }
        self.kill();
    }
}

struct Daemon {
    dir: PathBuf,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    admin: u16,
    child: Option<Child>,
    starts: u32,
}

impl Daemon {
    fn start(dir: &Path, flowbus: &str, wrap: &[String], env: &[(String, String)]) -> Daemon {
        let mut cmd: Vec<String> = wrap.to_vec();
        cmd.push(flowbus.to_string());
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            cmd,
            env: env.to_vec(),
            admin: free_port(),
            child: None,
            starts: 0,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let cfg = std::fs::read_to_string(self.dir.join("flowbus.toml.in")).expect("config");
        std::fs::write(
            self.dir.join("flowbus.toml"),
            cfg.replace("@ADMIN@", &self.admin.to_string()),
        )
        .expect("write flowbus.toml");
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("flowbus.{}.log", self.starts)))
            .expect("daemon log");
        let mut c = Command::new(&self.cmd[0]);
        c.args(&self.cmd[1..])
            .arg("run")
            .arg("--config")
            .arg(self.dir.join("flowbus.toml"))
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        self.child = Some(c.spawn().expect("start flowbus"));
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(description)` when the daemon has exited.
    fn exited(&mut self) -> Option<String> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.child = None;
                use std::os::unix::process::ExitStatusExt;
                Some(match st.signal() {
                    Some(s) => format!("killed by signal {s}"),
                    None => format!("exited with {st}"),
                })
            }
            _ => None,
        }
    }

    /// Whether `/healthz` answers within 5 s.
    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.admin).into(),
            Duration::from_secs(5),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        // The admin API answers only requests addressed to it (Host).
        let req = format!(
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.admin
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
    }

    /// SIGTERM and wait (at most 60 s, then SIGKILL); the exit status.
    fn stop(&mut self) -> Option<String> {
        let mut c = self.child.take()?;
        signal(c.id(), libc::SIGTERM);
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st.to_string());
            }
            if Instant::now() > until {
                let _ = c.kill();
                let _ = c.wait();
                return Some("did not stop within 60 s".into());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Activity-log entries by number, from the daemon's files.
    fn activity_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for e in activity_entries(&self.dir.join("data")) {
            if let Some(n) = e.get("number").and_then(Value::as_str) {
                *counts.entry(n.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every entry of the activity-log files under `dir`.
fn activity_entries(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("activity") && n.ends_with(".jsonl"))
            {
                if let Ok(text) = std::fs::read_to_string(&p) {
                    out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
                }
            }
        }
    }
    out
}

fn relay_flow(url: &str, qos: u8, work_loop: u32) -> String {
    json!({
        "name": format!("relay{qos}"),
        "description": "faultsoak: a relay through a Compute",
        "nodes": [
            {"id": "in", "type": "MQTTSubscribe", "url": url, "topic": format!("soak/in/{qos}"),
             "qos": qos, "clean_session": false, "client_id": format!("faultsoak-relay{qos}-in"),
             "domain": "JSON"},
            {"id": "work", "type": "Compute",
             "code": format!("let i = 0; while i < {work_loop} {{ i += 1; }} Root.Body.relayed = true;")},
            {"id": "out", "type": "MQTTPublish", "url": url, "topic": format!("soak/out/{qos}"), "qos": qos}
        ],
        "connections": [
            {"from": "in.Out", "to": "work"},
            {"from": "work.Out", "to": "out"}
        ]
    })
    .to_string()
}

/// Writes the flows and `flowbus.toml.in` (the admin port filled in at each start).
fn write_daemon_files(dir: &Path, url: &str, qoss: &[u8], work_loop: u32) {
    std::fs::create_dir_all(dir).expect("daemon dir");
    let mut flows = Vec::new();
    for &q in qoss {
        let f = dir.join(format!("relay{q}.json"));
        std::fs::write(&f, relay_flow(url, q, work_loop)).expect("write flow");
        flows.push(format!("\"{}\"", f.display()));
    }
    // A reconnect schedule scaled down from IIB's 5 s + 5 s per attempt, so that a fault is
    // over in seconds and a run has many.
    std::fs::write(
        dir.join("flowbus.toml.in"),
        format!(
            "data_dir = \"{}/data\"\nflows = [{}]\n[admin]\nlisten = \"127.0.0.1:@ADMIN@\"\n[mqtt]\nreconnect_initial = \"1s\"\nreconnect_step = \"1s\"\nreconnect_max = \"5s\"\n",
            dir.display(),
            flows.join(", ")
        ),
    )
    .expect("write flowbus.toml.in");
}

// ---------------------------------------------------------------------------------------
// Producer and consumer

/// What one QoS stream did, per phase.
#[derive(Default)]
struct Stream {
    /// (phase, seq) → when the broker acknowledged it to the producer.
    acked: BTreeMap<(u32, u64), f64>,
    /// (phase, seq) → times received by the consumer.
    received: HashMap<(u32, u64), u32>,
    /// Publishes that failed and were sent again.
    retries: u64,
    /// Of those, failures after which the broker may have had it (the session was dropped).
    ambiguous: u64,
}

struct Shared {
    streams: Mutex<BTreeMap<u8, Stream>>,
    last_receipt: AtomicU64,
    phase: AtomicU64,
    producing: AtomicBool,
    /// Ends the producers.
    stop_producers: AtomicBool,
    /// Ends the consumer (and the producers).
    quit: AtomicBool,
}

impl Shared {
    fn new(qoss: &[u8]) -> Arc<Shared> {
        Arc::new(Shared {
            streams: Mutex::new(qoss.iter().map(|&q| (q, Stream::default())).collect()),
            last_receipt: AtomicU64::new(0),
            phase: AtomicU64::new(0),
            producing: AtomicBool::new(true),
            stop_producers: AtomicBool::new(false),
            quit: AtomicBool::new(false),
        })
    }

    /// (acknowledged, received distinct) over all streams for a phase.
    fn progress(&self, phase: u32) -> (u64, u64) {
        let s = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let mut a = 0;
        let mut r = 0;
        for st in s.values() {
            a += st.acked.keys().filter(|k| k.0 == phase).count() as u64;
            r += st.received.keys().filter(|k| k.0 == phase).count() as u64;
        }
        (a, r)
    }
}

fn client(url: &str, id: &str) -> paho::AsyncClient {
    let create = paho::CreateOptionsBuilder::new()
        .server_uri(url)
        .client_id(id)
        .persistence(paho::PersistenceType::None)
        .max_buffered_messages(0)
        .finalize();
    paho::AsyncClient::new(create).expect("paho client")
}

fn connect_opts() -> paho::ConnectOptions {
    paho::ConnectOptionsBuilder::with_mqtt_version(paho::MQTT_VERSION_3_1_1)
        .clean_session(false)
        .keep_alive_interval(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .automatic_reconnect(Duration::from_millis(200), Duration::from_secs(1))
        .max_inflight(20)
        .finalize()
}

fn connect_retrying(cli: &paho::AsyncClient) {
    loop {
        match cli.connect(connect_opts()).wait() {
            Ok(_) => return,
            Err(e) => {
                say!("client {}: connect failed: {e}; again", cli.client_id());
                thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn payload(phase: u32, seq: u64) -> Vec<u8> {
    let mut s = format!("{{\"p\":{phase},\"s\":{seq},\"pad\":\"");
    while s.len() < 498 {
        s.push('x');
    }
    s.push_str("\"}");
    s.into_bytes()
}

/// Publishes `soak/in/<qos>` at `rate` per second (or as fast as the window allows when
/// `rate` is 0) while `producing`, each until acknowledged; `limit` messages at most.
fn producer(
    url: String,
    qos: u8,
    rate: f64,
    limit: u64,
    sh: Arc<Shared>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let cli = client(&url, &format!("faultsoak-producer{qos}"));
        connect_retrying(&cli);
        let topic = format!("soak/in/{qos}");
        // Within mosquitto's max_inflight_messages (20), over which it drops QoS 2 publishes of
        // an MQTT 3.1.1 client after acknowledging them.
        const WINDOW: usize = 20;
        let mut inflight: VecDeque<(u32, u64, paho::Token, u32)> = VecDeque::new();
        let mut retry: VecDeque<(u32, u64, u32, Instant)> = VecDeque::new();
        let mut seq = 0u64;
        let mut phase_seen = 0u32;
        let t0 = Instant::now();
        let mut sent_in_phase = 0u64;
        let mut phase_t0 = t0;
        loop {
            if sh.quit.load(Ordering::Relaxed) || sh.stop_producers.load(Ordering::Relaxed) {
                let _ = cli.disconnect(None).wait();
                return;
            }
            let phase = sh.phase.load(Ordering::Relaxed) as u32;
            if phase != phase_seen {
                phase_seen = phase;
                seq = 0;
                sent_in_phase = 0;
                phase_t0 = Instant::now();
            }
            // Completed publishes.
            let mut i = 0;
            while i < inflight.len() {
                match inflight[i].2.try_wait() {
                    None => i += 1,
                    Some(r) => {
                        let (p, s, _, attempt) = inflight.remove(i).expect("index");
                        let mut streams = sh.streams.lock().unwrap_or_else(|e| e.into_inner());
                        let st = streams.get_mut(&qos).expect("stream");
                        match r {
                            Ok(_) => {
                                st.acked.insert((p, s), now());
                            }
                            Err(e) => {
                                st.retries += 1;
                                if matches!(e, paho::Error::OperationIncomplete) {
                                    st.ambiguous += 1;
                                }
                                drop(streams);
                                retry.push_back((
                                    p,
                                    s,
                                    attempt + 1,
                                    Instant::now() + Duration::from_millis(200),
                                ));
                            }
                        }
                    }
                }
            }
            let mut did = false;
            // Failed ones again first (their phase may be over: they still count there).
            while inflight.len() < WINDOW && retry.front().is_some_and(|r| r.3 <= Instant::now()) {
                let (p, s, attempt, _) = retry.pop_front().expect("front");
                let m = paho::Message::new(topic.as_str(), payload(p, s), i32::from(qos));
                inflight.push_back((p, s, cli.publish(m).into(), attempt));
                did = true;
            }
            while sh.producing.load(Ordering::Relaxed)
                && inflight.len() < WINDOW
                && (rate == 0.0 || phase_t0.elapsed().as_secs_f64() * rate >= sent_in_phase as f64)
                && (limit == 0 || seq < limit)
            {
                let m = paho::Message::new(topic.as_str(), payload(phase, seq), i32::from(qos));
                inflight.push_back((phase, seq, cli.publish(m).into(), 0));
                seq += 1;
                sent_in_phase += 1;
                did = true;
            }
            if !did {
                thread::sleep(Duration::from_millis(2));
            }
        }
    })
}

/// Consumes `soak/out/#` with a persistent session (subscribing again on every connect, in
/// case the broker lost the session).
fn consumer(url: String, sh: Arc<Shared>) -> (paho::AsyncClient, thread::JoinHandle<()>) {
    let cli = client(&url, "faultsoak-consumer");
    cli.set_connected_callback(|c| {
        c.subscribe("soak/out/#", 2);
    });
    let rx = cli.start_consuming();
    connect_retrying(&cli);
    let c2 = cli.clone();
    let h = thread::spawn(move || {
        let _keep = c2;
        while !sh.quit.load(Ordering::Relaxed) {
            let Ok(Some(m)) = rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            let qos: u8 = m
                .topic()
                .rsplit('/')
                .next()
                .and_then(|q| q.parse().ok())
                .unwrap_or(0);
            let Ok(v) = serde_json::from_slice::<Value>(m.payload()) else {
                continue;
            };
            let (Some(p), Some(s)) = (v["p"].as_u64(), v["s"].as_u64()) else {
                continue;
            };
            let mut streams = sh.streams.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(st) = streams.get_mut(&qos) {
                *st.received.entry((p as u32, s)).or_insert(0) += 1;
            }
            sh.last_receipt
                .store((now() * 1000.0) as u64, Ordering::Relaxed);
        }
    });
    (cli, h)
}

// ---------------------------------------------------------------------------------------
// The soak

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Restart,
    Kill,
    Freeze,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Restart => "restart",
            Fault::Kill => "kill",
            Fault::Freeze => "freeze",
        }
    }
}

/// Watches the daemon while waiting: crashes (restarted), stalls, RSS.
struct Watch {
    crashes: Vec<Value>,
    stalls: Vec<Value>,
    rss_max_kib: u64,
    stalled_since: Option<f64>,
    last_check: f64,
    last_progress: (u64, u64),
    last_change: f64,
    stall_secs: f64,
    unhealthy: u32,
}

impl Watch {
    fn new(stall_secs: f64) -> Watch {
        Watch {
            crashes: Vec::new(),
            stalls: Vec::new(),
            rss_max_kib: 0,
            stalled_since: None,
            last_check: 0.0,
            last_progress: (0, 0),
            last_change: now(),
            stall_secs,
            unhealthy: 0,
        }
    }

    /// Sleeps `d`, checking the daemon every second.
    fn sleep(&mut self, d: Duration, daemon: &mut Daemon, sh: &Shared, broker_up: bool) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            thread::sleep(Duration::from_millis(200).min(until - Instant::now()));
            self.check(daemon, sh, broker_up);
        }
    }

    fn check(&mut self, daemon: &mut Daemon, sh: &Shared, broker_up: bool) {
        if now() - self.last_check < 1.0 {
            return;
        }
        self.last_check = now();
        if let Some(pid) = daemon.pid() {
            if let Some(r) = procfs::rss_kib(pid) {
                self.rss_max_kib = self.rss_max_kib.max(r);
            }
        }
        if let Some(how) = daemon.exited() {
            say!("CRASH: flowbus {how}; starting it again");
            self.crashes.push(
                json!({"at_s": now(), "how": how, "log": format!("flowbus.{}.log", daemon.starts)}),
            );
            daemon.spawn();
            return;
        }
        let phase = sh.phase.load(Ordering::Relaxed) as u32;
        let p = sh.progress(phase);
        if p != self.last_progress {
            self.last_progress = p;
            self.last_change = now();
            self.stalled_since = None;
        }
        // Owed: acknowledged by the broker, not yet seen by the consumer.
        let owed = p.0 > p.1;
        let idle = now() - self.last_change;
        if broker_up && owed && idle > self.stall_secs && self.stalled_since.is_none() {
            say!(
                "STALL: nothing moved for {idle:.0} s with {} message(s) owed",
                p.0 - p.1
            );
            self.stalled_since = Some(now());
            self.stalls
                .push(json!({"at_s": now(), "owed": p.0 - p.1, "kind": "no progress"}));
        }
        if broker_up && (self.last_check as u64).is_multiple_of(5) {
            if daemon.healthy() {
                self.unhealthy = 0;
            } else {
                self.unhealthy += 1;
                if self.unhealthy == 3 {
                    say!("STALL: /healthz did not answer three times in a row");
                    self.stalls.push(json!({"at_s": now(), "kind": "healthz"}));
                }
            }
        }
    }
}

/// Per-phase accounting for one QoS.
fn account(st: &Stream, phase: u32, kills: &[f64], window: f64) -> Value {
    let acked: Vec<(&(u32, u64), &f64)> = st.acked.iter().filter(|(k, _)| k.0 == phase).collect();
    let mut lost = Vec::new();
    let mut lost_near_kill = 0u64;
    for (k, t) in &acked {
        if !st.received.contains_key(k) {
            lost.push(k.1);
            // Acknowledged to the producer within `window` before a kill: the broker may not
            // have saved it.
            if kills.iter().any(|&kt| kt >= **t && kt - **t <= window) {
                lost_near_kill += 1;
            }
        }
    }
    let received: Vec<(&(u32, u64), &u32)> =
        st.received.iter().filter(|(k, _)| k.0 == phase).collect();
    let duplicates: u64 = received.iter().map(|(_, &n)| u64::from(n - 1)).sum();
    let dup_msgs = received.iter().filter(|(_, &n)| n > 1).count();
    let unexpected = received
        .iter()
        .filter(|(k, _)| !st.acked.contains_key(k))
        .count();
    lost.sort_unstable();
    json!({
        "sent": acked.len(),
        "delivered": received.len(),
        "lost": lost.len(),
        "lost_acked_within_window_before_a_kill": lost_near_kill,
        "lost_first": lost.iter().take(20).collect::<Vec<_>>(),
        "duplicates": duplicates,
        "duplicated_messages": dup_msgs,
        "received_not_acknowledged": unexpected,
    })
}

fn soak(a: &Args, out: &Path, flowbus: &str, wrap: &[String], env: &[(String, String)]) -> Value {
    let secs: f64 = a.get("secs", 960.0);
    let min_faults: u32 = a.get("min-faults", 100);
    let rate: f64 = a.get("rate", 40.0);
    let autosave: u32 = a.get("autosave", 5);
    let work_loop: u32 = a.get("loop", 300);
    let stall: f64 = a.get("stall", 90.0);
    let mut rng = Rng(a.get::<u64>("seed", 1).max(1) * 0x9e37_79b9_7f4a_7c15);
    let qoss = [1u8, 2u8];

    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut broker = Broker::start(&out.join("broker"), port, true, autosave);
    let ddir = out.join("daemon");
    write_daemon_files(&ddir, &url, &qoss, work_loop);
    let mut daemon = Daemon::start(&ddir, flowbus, wrap, env);
    let sh = Shared::new(&qoss);
    let (_cons, cons_h) = consumer(url.clone(), sh.clone());
    // Let the relays subscribe before the first message.
    let mut watch = Watch::new(stall);
    watch.sleep(Duration::from_secs(5), &mut daemon, &sh, true);
    let prods: Vec<_> = qoss
        .iter()
        .map(|&q| producer(url.clone(), q, rate, 0, sh.clone()))
        .collect();

    let phases = [
        ("graceful+freeze", vec![Fault::Restart, Fault::Freeze]),
        (
            "with-kills",
            vec![Fault::Kill, Fault::Restart, Fault::Freeze],
        ),
    ];
    let t0 = now();
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut results = Vec::new();
    let mut kills_at: Vec<f64> = Vec::new();
    for (pi, (pname, kinds)) in phases.iter().enumerate() {
        let phase = pi as u32;
        sh.phase.store(u64::from(phase), Ordering::Relaxed);
        sh.producing.store(true, Ordering::Relaxed);
        let phase_t0 = now();
        // The first phase gets two thirds of the time and of the faults.
        let (p_secs, p_faults) = if pi == 0 {
            (secs * 2.0 / 3.0, min_faults * 2 / 3)
        } else {
            (
                secs - (now() - t0),
                min_faults - faults.values().sum::<u64>() as u32,
            )
        };
        say!("phase {pname}: at least {p_secs:.0} s and {p_faults} faults");
        let mut n = 0u32;
        let mut pf: BTreeMap<&str, u64> = BTreeMap::new();
        while now() - phase_t0 < p_secs || n < p_faults {
            // Steady flow between faults.
            watch.sleep(rng.secs(3.0, 7.0), &mut daemon, &sh, true);
            let f = kinds[n as usize % kinds.len()];
            match f {
                Fault::Restart => {
                    broker.terminate();
                    watch.sleep(rng.secs(0.3, 2.5), &mut daemon, &sh, false);
                    broker.spawn();
                }
                Fault::Kill => {
                    kills_at.push(now());
                    broker.kill();
                    watch.sleep(rng.secs(0.3, 2.5), &mut daemon, &sh, false);
                    broker.spawn();
                }
                Fault::Freeze => {
                    let pid = broker.pid().expect("broker running");
                    signal(pid, libc::SIGSTOP);
                    watch.sleep(rng.secs(2.0, 15.0), &mut daemon, &sh, false);
                    signal(pid, libc::SIGCONT);
                }
            }
            n += 1;
            *faults.entry(f.name()).or_insert(0) += 1;
            *pf.entry(f.name()).or_insert(0) += 1;
            if n.is_multiple_of(10) {
                let (ack, rcv) = sh.progress(phase);
                say!("phase {pname}: {n} faults, {ack} acknowledged, {rcv} delivered, {} crash(es), {} stall(s)", watch.crashes.len(), watch.stalls.len());
            }
        }
        // Drain: stop producing; wait until everything acknowledged arrived, or nothing has
        // for a minute.
        sh.producing.store(false, Ordering::Relaxed);
        say!("phase {pname}: draining");
        let drain_t0 = now();
        let mut last = sh.progress(phase);
        let mut last_t = now();
        loop {
            watch.sleep(Duration::from_secs(2), &mut daemon, &sh, true);
            let p = sh.progress(phase);
            if p != last {
                last = p;
                last_t = now();
            }
            // The producer's retries are settled when nothing moved for 10 s.
            if p.0 <= p.1 && now() - last_t > 10.0 {
                break;
            }
            if now() - last_t > 60.0 {
                say!(
                    "phase {pname}: drain gave up, {} owed",
                    p.0.saturating_sub(p.1)
                );
                break;
            }
        }
        let window = f64::from(autosave) + 1.0;
        let per_qos: BTreeMap<String, Value> = {
            let s = sh.streams.lock().unwrap_or_else(|e| e.into_inner());
            s.iter()
                .map(|(q, st)| {
                    let mut v = account(st, phase, &kills_at, window);
                    v["producer_retries_total"] = json!(st.retries);
                    v["producer_ambiguous_retries_total"] = json!(st.ambiguous);
                    (format!("qos{q}"), v)
                })
                .collect()
        };
        say!(
            "phase {pname}: {}",
            serde_json::to_string(&per_qos).unwrap_or_default()
        );
        results.push(json!({
            "phase": pname,
            "seconds": now() - phase_t0,
            "drain_seconds": now() - drain_t0,
            "faults": pf,
            "streams": per_qos,
        }));
    }
    let peak = daemon.pid().and_then(procfs::peak_rss_kib);
    let activity = daemon.activity_counts();
    sh.quit.store(true, Ordering::Relaxed);
    for p in prods {
        let _ = p.join();
    }
    let _ = cons_h.join();
    let stop = daemon.stop();
    broker.terminate();
    json!({
        "scenario": "soak",
        "seconds": now() - t0,
        "rate_per_qos": rate,
        "broker_autosave_interval_s": autosave,
        "compute_loop": work_loop,
        "faults": faults,
        "faults_total": faults.values().sum::<u64>(),
        "phases": results,
        "crashes": watch.crashes,
        "stalls": watch.stalls,
        "daemon_starts": daemon.starts,
        "daemon_peak_rss_kib": peak,
        "daemon_max_sampled_rss_kib": watch.rss_max_kib,
        "daemon_stop": stop,
        "activity_log_counts": activity,
    })
}

// ---------------------------------------------------------------------------------------
// Session loss (issue 18 item 8)

/// Whether the relay lost its session (BIP12118) and has subscribed again since.
fn resubscribed(entries: &[Value]) -> bool {
    let seq = |e: &Value| e["seq"].as_u64().unwrap_or(0);
    let Some(lost) = entries.iter().find(|e| e["number"] == "BIP12118") else {
        return false;
    };
    entries.iter().any(|e| {
        e["number"] == "BIP12095"
            && seq(e) > seq(lost)
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Subscribed to"))
    })
}

fn session_loss(
    a: &Args,
    out: &Path,
    flowbus: &str,
    wrap: &[String],
    env: &[(String, String)],
) -> Value {
    let runs: u32 = a.get("runs", 5);
    let work_loop: u32 = a.get("loop", 3000);
    let stall: f64 = a.get("stall", 90.0);
    let checker_log = wrap.iter().any(|w| w.contains("valgrind"));
    let mut results = Vec::new();
    let mut passed = 0;
    for run in 1..=runs {
        let dir = out.join(format!("run{run}"));
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut broker = Broker::start(&dir.join("broker"), port, false, 0);
        let ddir = dir.join("daemon");
        write_daemon_files(&ddir, &url, &[1], work_loop);
        let mut wrap_run = wrap.to_vec();
        if checker_log {
            wrap_run.insert(1, format!("--log-file={}/valgrind.%p.log", ddir.display()));
        }
        let mut daemon = Daemon::start(&ddir, flowbus, &wrap_run, env);
        let sh = Shared::new(&[1]);
        let (cons, cons_h) = consumer(url.clone(), sh.clone());
        let mut watch = Watch::new(stall);
        // The relay subscribed (under a checker start-up is slow).
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until && !daemon.activity_counts().contains_key("BIP12095") {
            watch.sleep(Duration::from_millis(500), &mut daemon, &sh, true);
        }
        say!("run {run}: relay subscribed; 3,000 messages");
        let prod = producer(url.clone(), 1, 0.0, 3000, sh.clone());
        // Wait for back-pressure to pause the subscriber (BIP12101), or for a third of the
        // messages to be through.
        let until = Instant::now() + Duration::from_secs(120);
        let paused = loop {
            watch.sleep(Duration::from_millis(300), &mut daemon, &sh, true);
            let paused = activity_entries(&ddir.join("data")).iter().any(|e| {
                e["number"] == "BIP12101"
                    && e["message"].as_str().is_some_and(|m| m.contains("pausing"))
            });
            if paused || Instant::now() > until || sh.progress(0).1 >= 1000 {
                break paused;
            }
        };
        let before = sh.progress(0);
        say!(
            "run {run}: paused={paused}, {} acknowledged, {} delivered; broker SIGTERM and start",
            before.0,
            before.1
        );
        broker.terminate();
        watch.sleep(Duration::from_millis(500), &mut daemon, &sh, false);
        broker.spawn();
        // Then 100 more, once the relay has subscribed again (published before, they would
        // go to no subscriber): a paused relay reconnects only when it has caught up.
        sh.stop_producers.store(true, Ordering::Relaxed);
        let _ = prod.join();
        sh.stop_producers.store(false, Ordering::Relaxed);
        let until = Instant::now() + Duration::from_secs(stall as u64);
        while Instant::now() < until && !resubscribed(&activity_entries(&ddir.join("data"))) {
            watch.sleep(Duration::from_millis(300), &mut daemon, &sh, true);
        }
        // The consumer lost its session too: its client reconnects within a second and
        // subscribes again.
        watch.sleep(Duration::from_secs(3), &mut daemon, &sh, true);
        sh.phase.store(1, Ordering::Relaxed);
        let prod = producer(url.clone(), 1, 0.0, 100, sh.clone());
        let until = Instant::now() + Duration::from_secs(stall as u64 + 60);
        let mut after = sh.progress(1);
        // The relay may still be working through what it held before the restart: any
        // delivery counts as movement.
        let mut total = sh.progress(0).1 + after.1;
        let mut moved = Instant::now();
        loop {
            watch.sleep(Duration::from_millis(500), &mut daemon, &sh, true);
            after = sh.progress(1);
            let t = sh.progress(0).1 + after.1;
            if t != total {
                total = t;
                moved = Instant::now();
            }
            // Done when all came through, or nothing moved for 30 s (the broker, having lost
            // every session, may have dropped some: the daemon's own counts say whether it
            // did), or the daemon crashed.
            if after.1 >= 100
                || moved.elapsed() > Duration::from_secs(30)
                || Instant::now() > until
                || !watch.crashes.is_empty()
            {
                break;
            }
        }
        let delivered_after = after.1;
        let crashed = watch.crashes.clone();
        let counts = daemon.activity_counts();
        sh.quit.store(true, Ordering::Relaxed);
        let _ = prod.join();
        let _ = cons_h.join();
        let _ = cons.disconnect(None).wait();
        let stop = daemon.stop();
        broker.terminate();
        let delivered_before = sh.progress(0).1;
        // The checker's verdict.
        let mut checker_errors: Option<u64> = None;
        let mut checker_first = Vec::new();
        if checker_log {
            let mut total = 0;
            for e in std::fs::read_dir(&ddir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("valgrind.") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    for l in text.lines() {
                        if let Some(rest) = l.split("ERROR SUMMARY: ").nth(1) {
                            total += rest
                                .split_whitespace()
                                .next()
                                .and_then(|n| n.parse::<u64>().ok())
                                .unwrap_or(0);
                        }
                        if (l.contains("Invalid") || l.contains("uninitialised"))
                            && checker_first.len() < 5
                        {
                            checker_first.push(l.to_string());
                        }
                    }
                }
            }
            checker_errors = Some(total);
        }
        let asan: Vec<String> = (1..=daemon.starts)
            .filter_map(|i| std::fs::read_to_string(ddir.join(format!("flowbus.{i}.log"))).ok())
            .flat_map(|t| {
                t.lines()
                    .filter(|l| {
                        l.contains("AddressSanitizer")
                            || l.contains("malloc()")
                            || l.contains("double free")
                    })
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .take(5)
            .collect();
        let session_lost_logged = counts.get("BIP12118").copied().unwrap_or(0);
        // What the daemon received and published (its statistics, printed when it stops;
        // under a checker it may be stopped with messages still in the flow: BIP1009).
        let (in_msgs, out_msgs) = (1..=daemon.starts)
            .filter_map(|i| std::fs::read_to_string(ddir.join(format!("flowbus.{i}.log"))).ok())
            .fold((0u64, 0u64), |(a, b), t| {
                let num = |key: &str| {
                    t.split(key)
                        .nth(1)
                        .and_then(|r| {
                            r.trim_start_matches([':', ' '])
                                .split(|c: char| !c.is_ascii_digit())
                                .next()
                                .map(str::to_string)
                        })
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                (a + num("\"MessagesReceived\""), b + num("\"MessagesSent\""))
            });
        let healthz_stalls = watch
            .stalls
            .iter()
            .filter(|s| s["kind"] == "healthz")
            .count();
        let ok = crashed.is_empty()
            && healthz_stalls == 0
            && delivered_after > 0
            && session_lost_logged > 0
            && checker_errors.unwrap_or(0) == 0
            && asan.is_empty();
        if ok {
            passed += 1;
        }
        say!("run {run}: {} (after the restart {delivered_after}/100 delivered; daemon in {in_msgs} out {out_msgs}; crashes {}; checker errors {checker_errors:?}; BIP12118 {session_lost_logged}; BIP12114 {})",
            if ok { "PASS" } else { "FAIL" }, crashed.len(), counts.get("BIP12114").copied().unwrap_or(0));
        results.push(json!({
            "run": run,
            "pass": ok,
            "paused_before_restart": paused,
            "acknowledged_before_restart": before.0,
            "delivered_before_restart_total": delivered_before,
            "delivered_after_restart": delivered_after,
            "acknowledged_after_restart": after.0,
            "daemon_messages_received": in_msgs,
            "daemon_messages_published": out_msgs,
            "crashes": crashed,
            "stalls": watch.stalls,
            "checker_errors": checker_errors,
            "checker_first": checker_first,
            "sanitizer_lines": asan,
            "daemon_stop": stop,
            "peak_rss_kib_sampled": watch.rss_max_kib,
            "activity_log_counts": counts,
        }));
    }
    json!({
        "scenario": "session-loss",
        "runs": runs,
        "passed": passed,
        "compute_loop": work_loop,
        "wrap": wrap.join(" "),
        "results": results,
    })
}

fn main() {
    let a = Args::parse(USAGE, &[]);
    now();
    let Some(flowbus) = a.opt("flowbus") else {
        eprintln!("error: --flowbus is required\n\n{USAGE}");
        std::process::exit(2)
    };
    let Some(out) = a.opt("out") else {
        eprintln!("error: --out is required\n\n{USAGE}");
        std::process::exit(2)
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).expect("out dir");
    // The daemon runs in its own directory.
    let out = std::fs::canonicalize(&out).expect("out dir");
    let flowbus = std::fs::canonicalize(&flowbus)
        .map(|p| p.display().to_string())
        .unwrap_or(flowbus);
    let wrap: Vec<String> = a
        .opt("wrap")
        .map(|w| w.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let env: Vec<(String, String)> = a
        .opt("env")
        .map(|e| {
            e.split(',')
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    let scenario: String = a.get("scenario", "soak".to_string());
    let result = match scenario.as_str() {
        "soak" => soak(&a, &out, &flowbus, &wrap, &env),
        "session-loss" => session_loss(&a, &out, &flowbus, &wrap, &env),
        s => {
            eprintln!("error: unknown --scenario {s}");
            std::process::exit(2)
        }
    };
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    let _ = std::fs::write(out.join("result.json"), &text);
    println!("{text}");
}
