//! The MQTT connection shared by MQTTSubscribe and MQTTPublish: one paho-mqtt async client
//! per node (per URL for publish overrides), a supervisor task that connects, reconnects on the
//! IIB schedule (5 s, +5 s per attempt, at most 2 min, for ever), pauses on request, and
//! reports every event to the activity log and the statistics together.
//!
//! Protocol decisions (the backoff schedule, client ids, QoS names) are plain functions with
//! unit tests; the paho calls sit in [`Conn`].

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowbus_runtime::activity::{NewEntry, Severity};
use flowbus_runtime::config::{Config, ServerConfig};
use flowbus_runtime::engine::Cancel;
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::node::{NodeDecl, Problem, PropKind, PropSpec, ValidateCtx};
use flowbus_runtime::services::Services;
use flowbus_runtime::stats::{inc, ServerStats};
use paho_mqtt as paho;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// Activity-log numbers of MQTT events (IIB's where IIB defines the event).
pub mod bip {
    /// Connected to the server.
    pub const CONNECTED: u32 = 12063;
    /// The connection was lost.
    pub const CONNECTION_LOST: u32 = 12062;
    /// A connection attempt failed at network level.
    pub const CONNECTION_FAILURE: u32 = 12096;
    /// The first failed connection attempt of a series.
    pub const FIRST_FAILED_CONNECT: u32 = 12071;
    /// Disconnected.
    pub const DISCONNECTED: u32 = 12092;
    /// Disconnecting failed.
    pub const DISCONNECT_FAILED: u32 = 12094;
    /// Subscribed (topic, requested and granted QoS).
    pub const SUBSCRIBED: u32 = 12095;
    /// A message was received.
    pub const RECEIVED: u32 = 12065;
    /// A message was published.
    pub const PUBLISHED: u32 = 12097;
    /// A publish was not acknowledged after the retry.
    pub const NOT_ACKNOWLEDGED: u32 = 12099;
    /// A publish failed (the first attempt, or an error other than a missing ack).
    pub const PUBLISH_ERROR: u32 = 4311;
    /// The subscriber paused (flow behind) or resumed.
    pub const FLOW_CONTROL: u32 = 12101;
    /// Per-message entries were summarised.
    pub const SUMMARY: u32 = 12102;
    /// A subscription was refused or granted a lower QoS than requested.
    pub const SUBSCRIBE_FAILED: u32 = 12103;
}

/// Properties both MQTT nodes have.
pub const COMMON_PROPS: [PropSpec; 6] = [
    PropSpec::opt("server", PropKind::Str),
    PropSpec::opt("url", PropKind::Str),
    PropSpec::opt("qos", PropKind::Int { min: 0, max: 2 }),
    PropSpec::opt("client_id", PropKind::Str),
    PropSpec::opt("clean_session", PropKind::Bool),
    PropSpec::opt("version", PropKind::Int { min: 3, max: 5 }),
];

/// Checks shared by both nodes: exactly one of `server` and `url`, a usable URL, version 3
/// or 5.
pub fn check_common(node: &NodeDecl, _ctx: &ValidateCtx) -> Vec<Problem> {
    let mut p = Vec::new();
    match (node.str("server"), node.str("url")) {
        (Some(_), Some(_)) => p.push(Problem::at(
            "url",
            FlowErrorKind::BadValue {
                property: "url".into(),
                message: "give either \"server\" (defined in flowbus.toml) or \"url\", not both"
                    .into(),
            },
        )),
        (None, None) => p.push(Problem::node(FlowErrorKind::MissingProperty(
            "server\" or \"url".into(),
        ))),
        (None, Some(url)) => {
            if let Err(m) = normalise_url(url) {
                p.push(Problem::at(
                    "url",
                    FlowErrorKind::BadValue {
                        property: "url".into(),
                        message: m,
                    },
                ));
            }
        }
        _ => {}
    }
    if let Some(v) = node.int("version") {
        if v != 3 && v != 5 {
            p.push(Problem::at(
                "version",
                FlowErrorKind::BadValue {
                    property: "version".into(),
                    message: format!(
                        "{v} is not an MQTT version flowbus speaks; use 3 (3.1.1) or 5"
                    ),
                },
            ));
        }
    }
    if let Some(id) = node.str("client_id") {
        if id.len() > 65_535 || id.contains(['+', '#', '/']) {
            p.push(Problem::at(
                "client_id",
                FlowErrorKind::BadValue {
                    property: "client_id".into(),
                    message: "must be at most 65535 characters without '+', '#' or '/'".into(),
                },
            ));
        }
    }
    p
}

/// `tcp://h:p` / `ssl://h:p`, accepting `mqtt://` and `mqtts://` as aliases.
pub fn normalise_url(url: &str) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("'{url}' is not a broker URL; write tcp://host:port or ssl://host:port")
    })?;
    let scheme = match scheme {
        "tcp" | "mqtt" => "tcp",
        "ssl" | "mqtts" => "ssl",
        other => {
            return Err(format!(
                "scheme '{other}' in '{url}' is not supported; use tcp:// or ssl://"
            ))
        }
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("'{url}' has no port; write e.g. {scheme}://{rest}:1883"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "'{url}' must be {scheme}://host:port with a port from 1 to 65535"
        ));
    }
    Ok(format!("{scheme}://{host}:{port}"))
}

/// A broker as a node uses it: URL, protocol version, credentials, policy.
#[derive(Clone)]
pub struct Endpoint {
    /// Normalised URL.
    pub url: String,
    /// The configured server name, when the node names one.
    pub server: Option<String>,
    /// 3 (MQTT 3.1.1) or 5.
    pub version: u8,
    /// User name.
    pub username: Option<String>,
    /// Password (from env or file; never logged, never shown).
    password: Option<String>,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// CA file for TLS.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("server", &self.server)
            .field("version", &self.version)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Endpoint {
    /// The same protocol version at another URL, without credentials or TLS files (those
    /// belong to the configured server).
    pub fn elsewhere(&self, url: &str) -> Endpoint {
        Endpoint {
            url: url.to_string(),
            server: None,
            version: self.version,
            username: None,
            password: None,
            keep_alive: self.keep_alive,
            ca_file: None,
        }
    }
}

/// Resolves a node's server (named or inline) at build time. Reading a password is I/O, so
/// it happens here, not in validation.
pub fn resolve_endpoint(node: &NodeDecl, config: &Config) -> Result<Endpoint, Vec<Problem>> {
    let version_prop = node.int("version").map(|v| v as u8);
    if let Some(name) = node.str("server") {
        let Some(s) = config.servers.get(name) else {
            return Err(vec![Problem::at(
                "server",
                FlowErrorKind::UnknownServer {
                    name: name.to_string(),
                    known: config
                        .servers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                },
            )]);
        };
        return endpoint_from_server(name, s, version_prop);
    }
    let url = node.str("url").unwrap_or_default();
    let url = normalise_url(url).map_err(|m| {
        vec![Problem::at(
            "url",
            FlowErrorKind::BadValue {
                property: "url".into(),
                message: m,
            },
        )]
    })?;
    Ok(Endpoint {
        url,
        server: None,
        version: version_prop.unwrap_or(3),
        username: None,
        password: None,
        keep_alive: Duration::from_secs(60),
        ca_file: None,
    })
}

fn endpoint_from_server(
    name: &str,
    s: &ServerConfig,
    version: Option<u8>,
) -> Result<Endpoint, Vec<Problem>> {
    let bad = |m: String| {
        vec![Problem::at(
            "server",
            FlowErrorKind::BadValue {
                property: "server".into(),
                message: m,
            },
        )]
    };
    let url = normalise_url(&s.url).map_err(|m| bad(format!("[servers.{name}] url: {m}")))?;
    let password = match (&s.password_env, &s.password_file) {
        (Some(var), _) => Some(std::env::var(var).map_err(|_| {
            bad(format!(
                "[servers.{name}] password_env names the environment variable {var}, which is not set"
            ))
        })?),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map(|p| p.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| bad(format!("[servers.{name}] password_file {}: {e}", file.display())))?,
        ),
        (None, None) => None,
    };
    Ok(Endpoint {
        url,
        server: Some(name.to_string()),
        version: version.or(s.version).unwrap_or(3),
        username: s.username.clone(),
        password,
        keep_alive: s.keep_alive.map_or(Duration::from_secs(60), |d| d.0),
        ca_file: s.ca_file.clone(),
    })
}

/// The reconnect schedule: `initial`, then `step` longer each attempt, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Increase per attempt.
    pub step: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Backoff {
    /// From `[mqtt]` in the configuration.
    pub fn from_config(c: &Config) -> Backoff {
        Backoff {
            initial: c.mqtt.reconnect_initial.0,
            step: c.mqtt.reconnect_step.0,
            max: c.mqtt.reconnect_max.0,
        }
    }

    /// The delay before attempt `n` (counting failed attempts from 0).
    pub fn delay(&self, n: u32) -> Duration {
        (self.initial + self.step.saturating_mul(n)).min(self.max)
    }
}

/// A stable client id for a node: `fb-<instance>-<flow>-<node>`, so a restarted daemon
/// resumes its persistent sessions and two daemons (different data directories) never clash.
pub fn client_id(instance: &str, flow: &str, node: &str, suffix: Option<usize>) -> String {
    let mut id = format!("fb-{instance}-{flow}-{node}");
    if let Some(n) = suffix {
        let _ = write!(id, "-{n}");
    }
    id.retain(|c| !matches!(c, '+' | '#' | '/'));
    id
}

/// This installation's id (per data directory), created on first use.
pub fn instance_id(data_dir: &std::path::Path) -> String {
    let path = data_dir.join("instance-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return s;
        }
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        ^ (u128::from(std::process::id()) << 64);
    let id = format!("{:08x}", (seed ^ (seed >> 37) ^ (seed >> 71)) as u32);
    let _ = std::fs::create_dir_all(data_dir);
    let _ = std::fs::write(&path, &id);
    id
}

/// Identifies a connection's entries in the activity log.
#[derive(Clone)]
pub struct LogCtx {
    /// Services.
    pub services: Arc<Services>,
    /// Flow name.
    pub flow: String,
    /// Node id.
    pub node: String,
    /// URL.
    pub url: String,
    /// Client id.
    pub client_id: String,
    /// The server's statistics.
    pub stats: Arc<ServerStats>,
}

impl LogCtx {
    /// An entry tagged with url and client id.
    pub fn entry(&self, severity: Severity, number: u32, message: impl Into<String>) -> NewEntry {
        NewEntry::new(severity, number, "MQTT", &self.flow, &self.node, message)
            .tag("url", self.url.clone())
            .tag("client_id", self.client_id.clone())
    }

    /// Records an entry.
    pub fn record(&self, e: NewEntry) {
        self.services.activity.record(e);
    }
}

/// Limits per-message entries (received, published) to a few per second per node; the rest
/// are counted and summarised in one entry per second, so high rates neither flood the log nor
/// evict connection events.
pub struct Sampler {
    state: Mutex<(Instant, u32, u64)>,
    per_second: u32,
}

impl Sampler {
    /// Allows `per_second` individual entries per second.
    pub fn new(per_second: u32) -> Sampler {
        Sampler {
            state: Mutex::new((Instant::now(), 0, 0)),
            per_second,
        }
    }

    /// Whether this event gets its own entry; `Some(n)` in `.1` when a summary of `n`
    /// suppressed events is due first.
    pub fn admit(&self) -> (bool, Option<u64>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut summary = None;
        if st.0.elapsed() >= Duration::from_secs(1) {
            if st.2 > 0 {
                summary = Some(st.2);
            }
            *st = (Instant::now(), 0, 0);
        }
        if st.1 < self.per_second {
            st.1 += 1;
            (true, summary)
        } else {
            st.2 += 1;
            (false, summary)
        }
    }
}

/// What the supervisor should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Be connected.
    Up,
    /// Stay disconnected (a paused subscriber; the broker keeps the session's messages).
    Paused,
}

/// Called after each successful connect with `session_present`.
pub type OnConnected = Box<dyn Fn(bool) -> flowbus_runtime::BoxFut<'static, ()> + Send + Sync>;

/// One client and its supervisor.
pub struct Conn {
    /// The paho client.
    pub client: paho::AsyncClient,
    /// Log context.
    pub log: LogCtx,
    opts: paho::ConnectOptions,
    backoff: Backoff,
    connected: watch::Sender<bool>,
    want: watch::Sender<Want>,
    reconnect: mpsc::UnboundedSender<()>,
    reconnect_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    lost_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    stop: Cancel,
    counted_open: AtomicBool,
    /// Whether the connection uses MQTT v5.
    pub v5: bool,
}

/// How to create a [`Conn`].
pub struct ConnSpec<'a> {
    /// The broker.
    pub endpoint: &'a Endpoint,
    /// The client id.
    pub client_id: String,
    /// Persistent session (clean session false) with file persistence under this directory.
    pub persist_dir: Option<PathBuf>,
    /// How long a connect attempt may take.
    pub connect_timeout: Duration,
    /// Reconnect schedule.
    pub backoff: Backoff,
    /// Flow, node, services.
    pub services: Arc<Services>,
    /// Flow name.
    pub flow: &'a str,
    /// Node id.
    pub node: &'a str,
}

impl Conn {
    /// Creates the client (connects nothing).
    pub fn new(spec: ConnSpec<'_>) -> Result<Arc<Conn>, String> {
        let ep = spec.endpoint;
        let v5 = ep.version == 5;
        let persistence = match &spec.persist_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    format!(
                        "cannot create the persistence directory {}: {e}",
                        dir.display()
                    )
                })?;
                paho::PersistenceType::FilePath(dir.clone())
            }
            None => paho::PersistenceType::None,
        };
        let create = paho::CreateOptionsBuilder::new()
            .server_uri(&ep.url)
            .client_id(&spec.client_id)
            .persistence(persistence)
            .mqtt_version(if v5 {
                paho::MQTT_VERSION_5
            } else {
                paho::MQTT_VERSION_3_1_1
            })
            .finalize();
        let client = paho::AsyncClient::new(create)
            .map_err(|e| format!("cannot create the MQTT client for {}: {e}", ep.url))?;
        let persistent = spec.persist_dir.is_some();
        let mut b = if v5 {
            paho::ConnectOptionsBuilder::new_v5()
        } else {
            paho::ConnectOptionsBuilder::with_mqtt_version(paho::MQTT_VERSION_3_1_1)
        };
        b.keep_alive_interval(ep.keep_alive)
            .connect_timeout(spec.connect_timeout)
            .max_inflight(1024);
        // Paho's own automatic reconnect stays off: the supervisor follows the IIB schedule
        // and logs every attempt.
        if v5 {
            b.clean_start(!persistent);
            if persistent {
                let mut props = paho::Properties::new();
                // A day: long enough to ride out a pause or a restart, short enough not to
                // leave sessions behind for ever.
                let _ = props.push_u32(paho::PropertyCode::SessionExpiryInterval, 86_400);
                b.properties(props);
            }
        } else {
            b.clean_session(!persistent);
        }
        if let Some(u) = &ep.username {
            b.user_name(u);
        }
        if let Some(p) = &ep.password {
            b.password(p.as_str());
        }
        if ep.url.starts_with("ssl://") {
            let mut ssl = paho::SslOptionsBuilder::new();
            if let Some(ca) = &ep.ca_file {
                ssl.trust_store(ca)
                    .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
            }
            b.ssl_options(ssl.finalize());
        }
        let opts = b.finalize();
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        client.set_connection_lost_callback(move |_| {
            let _ = lost_tx.send(());
        });
        let (reconnect, reconnect_rx) = mpsc::unbounded_channel();
        let log = LogCtx {
            stats: spec.services.stats.server(&ep.url),
            services: spec.services,
            flow: spec.flow.to_string(),
            node: spec.node.to_string(),
            url: ep.url.clone(),
            client_id: spec.client_id,
        };
        Ok(Arc::new(Conn {
            client,
            log,
            opts,
            backoff: spec.backoff,
            connected: watch::channel(false).0,
            want: watch::channel(Want::Up).0,
            reconnect,
            reconnect_rx: Mutex::new(Some(reconnect_rx)),
            lost_rx: Mutex::new(Some(lost_rx)),
            stop: Cancel::default(),
            counted_open: AtomicBool::new(false),
            v5,
        }))
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until connected, at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.subscribe();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await,
            Ok(Ok(_))
        );
        ok
    }

    /// Asks the supervisor to pause (disconnect, keeping the session) or resume.
    pub fn set_want(&self, w: Want) {
        self.want.send_replace(w);
    }

    /// Asks the supervisor to drop the connection and connect again (after a missing ack).
    pub fn request_reconnect(&self) {
        // Marked down at once, so a retry waits for the new connection instead of using the
        // one being dropped.
        self.connected.send_replace(false);
        let _ = self.reconnect.send(());
    }

    fn mark_open(&self) {
        if !self.counted_open.swap(true, Ordering::SeqCst) {
            self.log
                .stats
                .open_connections
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn mark_closed(&self) {
        if self.counted_open.swap(false, Ordering::SeqCst) {
            self.log
                .stats
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
            inc(&self.log.stats.closed_connections);
        }
        self.connected.send_replace(false);
    }

    /// Starts the supervisor task.
    pub fn spawn(self: &Arc<Self>, on_connected: OnConnected) {
        let me = self.clone();
        tokio::spawn(async move { me.supervise(on_connected).await });
    }

    async fn supervise(self: Arc<Self>, on_connected: OnConnected) {
        let (Some(mut lost), Some(mut reconnect)) = (
            self.lost_rx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
            self.reconnect_rx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        ) else {
            return;
        };
        let mut want = self.want.subscribe();
        let mut failures: u32 = 0;
        let log = &self.log;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            if *want.borrow_and_update() == Want::Paused {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = want.changed() => continue,
                }
            }
            let attempt = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = self.client.connect(self.opts.clone()) => r,
            };
            match attempt {
                Ok(resp) => {
                    failures = 0;
                    let session_present =
                        resp.connect_response().is_some_and(|c| c.session_present);
                    // Connection-lost notifications from before this connection are stale.
                    while lost.try_recv().is_ok() {}
                    while reconnect.try_recv().is_ok() {}
                    self.mark_open();
                    log.record(
                        log.entry(
                            Severity::Info,
                            bip::CONNECTED,
                            format!(
                                "Connected to {} as '{}'{}",
                                log.url,
                                log.client_id,
                                if session_present {
                                    " (session resumed)"
                                } else {
                                    ""
                                }
                            ),
                        )
                        .tag("session_present", session_present),
                    );
                    self.connected.send_replace(true);
                    on_connected(session_present).await;
                    let why = tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = lost.recv() => "lost",
                        _ = reconnect.recv() => "reconnect",
                        _ = want.wait_for(|w| *w == Want::Paused) => "pause",
                    };
                    self.mark_closed();
                    match why {
                        "lost" => {
                            log.record(log.entry(
                                Severity::Warning,
                                bip::CONNECTION_LOST,
                                format!("Lost the connection to {}; reconnecting in {:?}", log.url, self.backoff.delay(0)),
                            ));
                            tokio::select! {
                                _ = self.stop.cancelled() => return,
                                _ = tokio::time::sleep(self.backoff.delay(0)) => {}
                            }
                        }
                        "reconnect" => {
                            let _ = self.client.disconnect_after(Duration::ZERO).await;
                            log.record(log.entry(
                                Severity::Warning,
                                bip::DISCONNECTED,
                                format!("Disconnected from {} to reconnect (a publish was not acknowledged in time)", log.url),
                            ));
                        }
                        _ => {
                            match self.client.disconnect(None).await {
                                Ok(_) => log.record(log.entry(
                                    Severity::Info,
                                    bip::DISCONNECTED,
                                    format!("Disconnected from {} (paused; the broker keeps the session's messages)", log.url),
                                )),
                                Err(e) => log.record(log.entry(
                                    Severity::Warning,
                                    bip::DISCONNECT_FAILED,
                                    format!("Failed to disconnect from {} while pausing: {e}", log.url),
                                )),
                            }
                        }
                    }
                }
                Err(e) => {
                    inc(&log.stats.failed_connections);
                    let delay = self.backoff.delay(failures);
                    if failures == 0 {
                        log.record(log.entry(
                            Severity::Error,
                            bip::FIRST_FAILED_CONNECT,
                            format!("Failed to connect to {}: {e}", log.url),
                        ));
                    }
                    log.record(
                        log.entry(
                            Severity::Error,
                            bip::CONNECTION_FAILURE,
                            format!(
                                "Connection to {} failed (attempt {}): {e}; retrying in {}",
                                log.url,
                                failures + 1,
                                humantime::format_duration(delay)
                            ),
                        )
                        .tag("attempt", failures + 1)
                        .tag("retry_in_ms", delay.as_millis() as u64),
                    );
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Stops the supervisor and disconnects (bounded by `timeout`).
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop.cancel();
        if !self.client.is_connected() {
            self.mark_closed();
            return;
        }
        let log = &self.log;
        match self.client.disconnect_after(timeout).await {
            Ok(_) => log.record(log.entry(
                Severity::Info,
                bip::DISCONNECTED,
                format!("Disconnected from {}", log.url),
            )),
            Err(e) => log.record(log.entry(
                Severity::Warning,
                bip::DISCONNECT_FAILED,
                format!("Failed to disconnect from {}: {e}", log.url),
            )),
        }
        self.mark_closed();
    }
}

/// The `Duplicate` flag of a received message. paho-mqtt does not expose it, but its `Debug`
/// output starts with the C struct, so we read the flag there and stop formatting as soon as
/// it is found (the payload is never formatted).
pub fn duplicate_flag(m: &paho::Message) -> bool {
    struct Finder {
        buf: String,
        found: Option<bool>,
    }
    impl std::fmt::Write for Finder {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.buf.push_str(s);
            if let Some(i) = self.buf.find("dup: ") {
                if let Some(c) = self.buf[i + 5..].chars().next() {
                    self.found = Some(c == '1');
                    return Err(std::fmt::Error);
                }
            }
            if self.buf.len() > 512 {
                return Err(std::fmt::Error);
            }
            Ok(())
        }
    }
    let mut f = Finder {
        buf: String::new(),
        found: None,
    };
    let _ = write!(f, "{m:?}");
    f.found.unwrap_or(false)
}

/// v5 user properties as a JSON object (later values of a repeated key win).
pub fn user_properties(props: &paho::Properties) -> Option<Value> {
    let mut m = serde_json::Map::new();
    for (k, v) in props.user_iter() {
        m.insert(k, Value::String(v));
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

/// Topic filters as given (string or list), deduplicated, in order.
pub fn topics(node: &NodeDecl) -> Vec<String> {
    let mut seen = BTreeSet::new();
    node.str_list("topic")
        .into_iter()
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// Checks an MQTT topic filter (subscribe) or name (publish).
pub fn check_topic(t: &str, filter: bool) -> Result<(), String> {
    if t.is_empty() {
        return Err("a topic must not be empty".into());
    }
    if t.contains('\0') {
        return Err(format!("topic '{t}' contains a NUL character"));
    }
    let body = if filter {
        match t.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((group, f))
                    if !group.is_empty() && !group.contains(['+', '#']) && !f.is_empty() =>
                {
                    f
                }
                _ => return Err(format!("'{t}' must be $share/<group>/<filter>")),
            },
            None => t,
        }
    } else {
        t
    };
    let levels: Vec<&str> = body.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        let wild = l.contains('+') || l.contains('#');
        if !filter && wild {
            return Err(format!(
                "topic '{t}' contains a wildcard; a publish needs a topic name"
            ));
        }
        if filter && wild && !(*l == "+" || (*l == "#" && i == levels.len() - 1)) {
            return Err(format!(
                "topic filter '{t}' misuses a wildcard: '+' must fill a whole level and '#' must be the whole last level"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_iib_schedule() {
        let b = Backoff {
            initial: Duration::from_secs(5),
            step: Duration::from_secs(5),
            max: Duration::from_secs(120),
        };
        let d: Vec<u64> = (0..26).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(&d[..4], &[5, 10, 15, 20]);
        assert_eq!(d[22], 115);
        assert_eq!(d[23], 120);
        assert_eq!(d[25], 120);
    }

    #[test]
    fn urls_are_normalised_or_refused() {
        assert_eq!(normalise_url("mqtt://h:1883").unwrap(), "tcp://h:1883");
        assert_eq!(normalise_url("mqtts://h:8883").unwrap(), "ssl://h:8883");
        assert!(normalise_url("http://h:1")
            .unwrap_err()
            .contains("not supported"));
        assert!(normalise_url("tcp://h").unwrap_err().contains("no port"));
        assert!(normalise_url("tcp://h:99999").is_err());
    }

    #[test]
    fn topic_checks() {
        assert!(check_topic("plant/+/telemetry", true).is_ok());
        assert!(check_topic("a/#", true).is_ok());
        assert!(check_topic("$share/g/a/+", true).is_ok());
        assert!(check_topic("a/b#", true).is_err());
        assert!(check_topic("a/#/b", true).is_err());
        assert!(check_topic("a/+", false).is_err());
        assert!(check_topic("$share//a", true).is_err());
    }

    #[test]
    fn sampler_admits_a_few_then_summarises() {
        let s = Sampler::new(2);
        assert_eq!(s.admit(), (true, None));
        assert_eq!(s.admit(), (true, None));
        assert_eq!(s.admit(), (false, None));
        assert_eq!(s.admit(), (false, None));
        {
            let mut st = s.state.lock().unwrap();
            st.0 -= Duration::from_secs(2);
        }
        assert_eq!(s.admit(), (true, Some(2)));
    }

    #[test]
    fn duplicate_flag_reads_the_c_struct() {
        let m = paho::Message::new("t", vec![1u8; 100], 1);
        assert!(!duplicate_flag(&m));
    }

    #[test]
    fn client_ids_are_stable_and_clean() {
        assert_eq!(client_id("ab12", "f", "n", None), "fb-ab12-f-n");
        assert_eq!(client_id("ab12", "f", "n", Some(2)), "fb-ab12-f-n-2");
    }
}
