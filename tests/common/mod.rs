//! Shared helpers for the end-to-end tests: a private mosquitto per test on a free loopback
//! port (which the test may freeze, kill and restart), a paho test client, and a way to run a
//! flow in-process with a given configuration.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowbus_runtime::activity::{Entry, Filter};
use flowbus_runtime::config::Config;
use flowbus_runtime::flow::load_flow;
use flowbus_runtime::services::Services;
use flowbus_runtime::{Flow, RunningFlow};
use paho_mqtt as paho;

/// A scratch directory unique to this call.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A private mosquitto.
pub struct Broker {
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
    pub dir: PathBuf,
}

impl Broker {
    /// Starts mosquitto with extra config lines (e.g. `max_qos 1`).
    pub fn start(extra: &str) -> Broker {
        Broker::start_on(free_port(), extra)
    }

    /// Starts mosquitto with a whole configuration written by `conf` from the main port and
    /// the scratch directory (for TLS and per-listener settings).
    pub fn start_with(conf: impl FnOnce(u16, &Path) -> String) -> Broker {
        let port = free_port();
        let dir = scratch("broker");
        let text = conf(port, &dir);
        Broker::launch(port, dir, &text)
    }

    fn launch(port: u16, dir: PathBuf, text: &str) -> Broker {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        }
        let mut b = Broker {
            port,
            conf,
            child: None,
            dir,
        };
        b.spawn();
        b
    }

    /// Starts mosquitto on a given port.
    pub fn start_on(port: u16, extra: &str) -> Broker {
        let dir = scratch("broker");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence_location {}/\nmax_queued_messages 100000\nmax_inflight_messages 20\nset_tcp_nodelay true\nlog_dest none\n{}\n",
                dir.display(),
                if extra.contains("persistence true") { extra.to_string() } else { format!("persistence false\n{extra}") }
            ),
        )
        .expect("write mosquitto.conf");
        // mosquitto started as root drops to its own user, which must be able to write here.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777));
        }
        let mut b = Broker {
            port,
            conf,
            child: None,
            dir,
        };
        b.spawn();
        b
    }

    /// A broker that is not running yet (for "down at start" tests).
    pub fn not_started(extra: &str) -> Broker {
        let mut b = Broker::start(extra);
        b.kill();
        b
    }

    fn spawn(&mut self) {
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (is it installed? run scripts/setup.sh)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < until,
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Thaws a frozen broker.
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// Kills the broker.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills a frozen broker as it is (no SIGCONT first, unlike [`Broker::kill`], so it
    /// answers nothing more, not even an ack it had pending).
    pub fn kill_frozen(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the broker with SIGTERM (a persistent broker saves its sessions) and waits.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again after `kill` or `terminate`.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mosquitto() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

/// A test-side MQTT client (v3.1.1 unless `v5`).
pub struct Client {
    pub cli: paho::AsyncClient,
    pub rx: paho::AsyncReceiver<Option<paho::Message>>,
}

impl Client {
    pub async fn connect(url: &str, v5: bool) -> Client {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let create = paho::CreateOptionsBuilder::new()
            .server_uri(url)
            .client_id(id)
            .mqtt_version(if v5 {
                paho::MQTT_VERSION_5
            } else {
                paho::MQTT_VERSION_3_1_1
            })
            .max_buffered_messages(100_000)
            .finalize();
        let mut cli = paho::AsyncClient::new(create).expect("client");
        // Large enough that a test's own consumer never drops.
        let rx = cli.get_stream(1_000_000);
        let opts = if v5 {
            paho::ConnectOptionsBuilder::new_v5()
                .clean_start(true)
                .max_inflight(1000)
                .finalize()
        } else {
            paho::ConnectOptionsBuilder::with_mqtt_version(paho::MQTT_VERSION_3_1_1)
                .clean_session(true)
                .max_inflight(1000)
                .finalize()
        };
        cli.connect(opts).await.expect("test client connects");
        Client { cli, rx }
    }

    pub async fn subscribe(&self, topic: &str, qos: i32) {
        self.cli
            .subscribe(topic, qos)
            .await
            .expect("test subscribe");
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: i32) {
        self.cli
            .publish(paho::Message::new(topic, payload.into(), qos))
            .await
            .expect("test publish");
    }

    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: i32) {
        self.cli
            .publish(paho::Message::new_retained(topic, payload.into(), qos))
            .await
            .expect("test publish");
    }

    /// The next message, or None after `timeout`.
    pub async fn next(&self, timeout: Duration) -> Option<paho::Message> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Ok(Some(m))) => Some(m),
            _ => None,
        }
    }

    /// `n` messages' JSON payloads (panics with what arrived if fewer come within `timeout`).
    pub async fn take_json(&self, n: usize, timeout: Duration) -> Vec<(String, serde_json::Value)> {
        let until = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(m) => out.push((
                    m.topic().to_string(),
                    serde_json::from_slice(m.payload()).unwrap_or_else(|_| {
                        serde_json::Value::String(m.payload_str().into_owned())
                    }),
                )),
                None => panic!("expected {n} messages, got {}: {out:?}", out.len()),
            }
        }
        out
    }
}

/// A flow running in this process.
pub struct Running {
    pub flow: Flow,
    pub running: Option<RunningFlow>,
    pub services: Arc<Services>,
    pub dir: PathBuf,
}

impl Running {
    /// Writes `flow_json` (and `files`) to a scratch dir and starts it with `config_toml`.
    pub fn start(flow_json: &str, config_toml: &str, files: &[(&str, &str)]) -> Running {
        let dir = scratch("flow");
        let file = dir.join("flow.json");
        std::fs::write(&file, flow_json).expect("write flow");
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write file");
        }
        let cfg_path = dir.join("flowbus.toml");
        std::fs::write(&cfg_path, config_toml).expect("write config");
        let config = Config::load(&cfg_path).unwrap_or_else(|e| panic!("{e}"));
        let services = Arc::new(Services::from_config(&config));
        let flow = load_flow(
            &file,
            &flowbus_nodes::registry(),
            Arc::new(config),
            services.clone(),
        )
        .unwrap_or_else(|e| panic!("flow invalid:\n{e}"));
        let running = flow.start();
        Running {
            flow,
            running: Some(running),
            services,
            dir,
        }
    }

    /// Activity-log entries with this number.
    pub fn entries(&self, number: &str) -> Vec<Arc<Entry>> {
        self.services.activity.query(&Filter {
            number: Some(number.to_string()),
            ..Filter::default()
        })
    }

    /// All activity-log entries.
    pub fn log(&self) -> Vec<Arc<Entry>> {
        self.services.activity.query(&Filter::default())
    }

    /// Waits until an entry with `number` (and `contains` in its message) exists.
    pub async fn wait_entry(&self, number: &str, contains: &str, timeout: Duration) -> Arc<Entry> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .entries(number)
                .into_iter()
                .find(|e| e.message.contains(contains))
            {
                return e;
            }
            if Instant::now() > until {
                let all: Vec<String> = self
                    .log()
                    .iter()
                    .map(|e| format!("{} {}", e.number, e.message))
                    .collect();
                panic!(
                    "no {number} entry containing '{contains}' within {timeout:?}; log:\n{}",
                    all.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the node's subscriptions are in place.
    pub async fn wait_subscribed(&self, n: usize) {
        let until = Instant::now() + Duration::from_secs(10);
        while self.entries("BIP12095").len() < n {
            assert!(Instant::now() < until, "not subscribed: {:?}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn server_stats(&self, url: &str) -> flowbus_runtime::stats::ServerSnapshot {
        self.services
            .stats
            .servers()
            .get(url)
            .cloned()
            .unwrap_or_default()
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop(Duration::from_secs(10)).await;
        }
    }
}

/// A blocking HTTP request; returns (status, body). Status 0 when the server is not there.
pub fn http(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> (u16, String) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    );
    let auth = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match token {
        Some(t) => r.header("Authorization", format!("Bearer {t}")),
        None => r,
    };
    let authb = |r: ureq::RequestBuilder<ureq::typestate::WithBody>| match token {
        Some(t) => r.header("Authorization", format!("Bearer {t}")),
        None => r,
    };
    let resp = match method {
        "GET" => auth(agent.get(url)).call(),
        "DELETE" => auth(agent.delete(url)).call(),
        "PUT" => authb(agent.put(url))
            .header("Content-Type", "application/json")
            .send(body.unwrap_or_default()),
        "POST" => authb(agent.post(url))
            .header("Content-Type", "application/json")
            .send(body.unwrap_or_default()),
        other => panic!("method {other}"),
    };
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            (status, r.body_mut().read_to_string().unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// `http` with the body parsed as JSON (panics on a non-JSON body).
pub fn http_json(
    method: &str,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, text) = http(method, url, body, token);
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {url}: HTTP {status}, not JSON ({e}): {text}"));
    (status, v)
}

/// A `flowbus.toml` with a scaled-down schedule and the data directory in `dir`.
pub fn fast_config(extra: &str) -> String {
    format!(
        "data_dir = \"data\"\n[mqtt]\nreconnect_initial = \"200ms\"\nreconnect_step = \"200ms\"\nreconnect_max = \"1s\"\nack_timeout = \"5s\"\n{extra}\n"
    )
}

/// Polls `cond` every 10 ms until it holds; panics after `timeout`.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < until,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `flowbus run` process with its own scratch directory (config, flows, data, output) and
/// its admin API on a free loopback port.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    /// `127.0.0.1:PORT` of the admin API.
    pub admin: String,
    /// Extra environment for the daemon and for `cli` (e.g. the admin token).
    pub env: Vec<(String, String)>,
    /// Shell commands run before the daemon in the same shell (`ulimit -n 256`, `umask 0`).
    pub shell: Option<String>,
}

impl Daemon {
    /// Writes the config and flows and starts `flowbus run --config ... --flows ...`.
    pub fn spawn(config_toml: &str, flows: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_with_env(config_toml, flows, &[])
    }

    /// Like `spawn`, with extra environment variables.
    pub fn spawn_with_env(
        config_toml: &str,
        flows: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::spawn_in_shell(config_toml, flows, env, None)
    }

    /// Like `spawn_with_env`, the daemon started by `sh -c '<shell>; exec flowbus run ...'`
    /// (so its pid is the daemon's).
    pub fn spawn_in_shell(
        config_toml: &str,
        flows: &[(&str, &str)],
        env: &[(&str, &str)],
        shell: Option<&str>,
    ) -> Daemon {
        let dir = scratch("daemon");
        std::fs::write(dir.join("flowbus.toml"), config_toml).expect("config");
        std::fs::create_dir_all(dir.join("flows")).expect("flows dir");
        for (name, text) in flows {
            std::fs::write(dir.join("flows").join(name), text).expect("flow");
        }
        let mut d = Daemon {
            child: None,
            dir,
            admin: format!("127.0.0.1:{}", free_port()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            shell: shell.map(str::to_string),
        };
        d.start();
        d
    }

    /// Starts (or starts again, after `terminate`) the process; stderr and stdout are
    /// appended to the same files.
    pub fn start(&mut self) {
        let out = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(name))
                .expect(name)
        };
        let mut cmd = match &self.shell {
            Some(sh) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{sh}; exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_flowbus"))
                    .current_dir(&self.dir);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_flowbus")),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(self.dir.join("flowbus.toml"))
            .arg("--flows")
            .arg(self.dir.join("flows"))
            .arg("--admin")
            .arg(&self.admin)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out("stdout"))
            .stderr(out("stderr"))
            .spawn()
            .expect("start flowbus");
        self.child = Some(child);
    }

    /// The admin token the daemon generated into its data directory (`data_dir` of the
    /// test configurations is `data` or, when they set none, `.flowbus`).
    pub fn token(&self) -> String {
        ["data", ".flowbus"]
            .iter()
            .find_map(|d| std::fs::read_to_string(self.dir.join(d).join("admin.token")).ok())
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|| panic!("no admin.token under {}", self.dir.display()))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Waits until the admin API answers `/healthz`.
    pub async fn wait_api(&self) {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if http("GET", &format!("{}/healthz", self.admin_url()), None, None).0 == 200 {
                return;
            }
            assert!(
                Instant::now() < until,
                "the admin API did not come up; log:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `flowbus ARGS... --admin URL` (a CLI command against this daemon) with the
    /// daemon's environment; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_flowbus"))
            .args(args)
            .arg("--admin")
            .arg(&self.admin)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NO_COLOR", "1")
            .current_dir(&self.dir)
            .output()
            .expect("run flowbus");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs the CLI until `done` holds for its stdout (exit 0), or panics after `timeout`
    /// with what it printed and the daemon's log; returns that stdout.
    pub async fn cli_until(
        &self,
        args: &[&str],
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let until = Instant::now() + timeout;
        loop {
            let (code, out, err) = self.cli(args);
            if code == 0 && done(&out) {
                return out;
            }
            assert!(
                Instant::now() < until,
                "flowbus {args:?} never showed what was expected (exit {code}):\n{out}\n{err}\ndaemon log:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The activity-log entries with this number, as `flowbus log --json` prints them.
    pub fn entries(&self, number: &str) -> Vec<serde_json::Value> {
        let (code, out, err) = self.cli(&["log", "--json", "--number", number]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    /// Waits until stderr has `n` lines containing `needle`.
    pub async fn wait_log(&self, needle: &str, n: usize, timeout: Duration) {
        let until = Instant::now() + timeout;
        while self.stderr().matches(needle).count() < n {
            assert!(
                Instant::now() < until,
                "no '{needle}' (x{n}) in the daemon's log:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, then the exit status (panics if it does not exit within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let until = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!(
                    "flowbus did not exit within {timeout:?} after SIGTERM; log:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The statistics JSON that `flowbus run` prints when it exits.
    pub fn exit_stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("exit statistics: {e}: {}", self.stdout()))
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
