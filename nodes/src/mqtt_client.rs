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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowbus_runtime::activity::{NewEntry, Severity};
use flowbus_runtime::config::{Config, ServerConfig};
use flowbus_runtime::datadir::{create_private_dir_all, private_options};

use crate::qos_policy::{mismatch_head, mismatch_text, Decision, Policy, Source};
use flowbus_runtime::engine::CancellationToken;
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::node::{NodeDecl, Problem, PropKind, PropSpec, ValidateCtx};
use flowbus_runtime::services::Services;
use flowbus_runtime::stats::{add, inc, ServerStats};
use flowbus_runtime::BoxFut;
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
    /// A node asked for more QoS than the policy or the broker allows (policy `fail`).
    pub const QOS_MISMATCH: u32 = 12110;
    /// A node uses a lower QoS than it asked for (policy `downgrade`); once per node and topic.
    pub const QOS_DOWNGRADE: u32 = 12111;
    /// A per-topic QoS rule decided a node's QoS; once per node and topic.
    pub const QOS_RULE: u32 = 12112;
    /// The broker's QoS limit was learnt (CONNACK or probe).
    pub const BROKER_LIMIT: u32 = 12113;
    /// Publications in flight were dropped by the client: the broker had no session for it.
    pub const INFLIGHT_DISCARDED: u32 = 12114;
    /// The in-flight log was corrupt: renamed aside, a new one started from its sound records.
    pub const INFLIGHT_LOG_CORRUPT: u32 = 12115;
    /// A removed flow's client: its session ended at the broker and its files deleted (or
    /// why not).
    pub const RETIRED: u32 = 12116;
    /// A removed flow's publisher still owed publications: its log and session were kept.
    pub const OWED_AT_REMOVAL: u32 = 12117;
    /// A persistent subscriber reconnected to a broker that had no session for it: what the
    /// broker had queued for it is gone.
    pub const SESSION_LOST: u32 = 12118;
    /// A payload over the node's `max_payload` (received: not parsed; to publish: refused).
    pub const PAYLOAD_TOO_LARGE: u32 = 12119;
    /// A subscriber found messages in its input journal that a previous run received and did
    /// not finish: processing them first.
    pub const JOURNAL_REPLAY: u32 = 12120;
    /// A subscriber's input journal could not be opened or written, or was damaged.
    pub const JOURNAL_ERROR: u32 = 12121;
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

/// `max_payload`, which both nodes have: the largest payload the node receives or publishes.
pub const MAX_PAYLOAD_PROP: PropSpec = PropSpec::opt(
    "max_payload",
    PropKind::Size {
        max: flowbus_runtime::config::MQTT_MAX_PAYLOAD,
    },
);

/// A node's `max_payload`: its own property, else its server's, else `[mqtt] max_payload`.
pub fn max_payload(node: &NodeDecl, config: &Config) -> usize {
    let server = || {
        node.str("server")
            .and_then(|s| config.servers.get(s))
            .and_then(|s| s.max_payload)
            .map(|s| s.0)
    };
    let bytes = node
        .size("max_payload")
        .or_else(server)
        .unwrap_or(config.mqtt.max_payload.0);
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

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
        (None, None) => p.push(Problem::node(FlowErrorKind::MissingOneOf(
            "\"server\" (a server defined in flowbus.toml) or \"url\"".into(),
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
        // The id names the client's directory under `<data_dir>/mqtt/`: `..` would make that
        // the data directory itself.
        if id.len() > crate::mqtt_limits::MAX_STRING
            || id.contains(['+', '#', '/', '\0'])
            || id == "."
            || id == ".."
        {
            p.push(Problem::at(
                "client_id",
                FlowErrorKind::BadValue {
                    property: "client_id".into(),
                    message: "must be at most 65535 bytes (UTF-8) without '+', '#', '/' or NUL, and not '.' or '..'".into(),
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
    /// TLS settings (used with `ssl://`).
    pub tls: Tls,
    /// MQTT v5 session expiry of persistent sessions.
    pub session_expiry: Duration,
    /// Last will.
    pub will: Option<flowbus_runtime::config::WillConfig>,
    /// The QoS policy.
    pub policy: Policy,
    /// Unacknowledged QoS 1/2 publications allowed at once.
    pub max_inflight: u16,
    /// Paho file persistence for QoS 1/2 publishers (else in memory).
    pub file_persistence: bool,
}

/// TLS settings of a server.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// CA certificates (PEM) to trust; the system's default store when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Verify the server certificate and host name.
    pub verify: bool,
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
        Endpoint::inline(url, self.version)
    }

    /// A server given inline by URL: no credentials, default TLS verification, no policy
    /// beyond what the broker says.
    pub fn inline(url: &str, version: u8) -> Endpoint {
        Endpoint {
            url: url.to_string(),
            server: None,
            version,
            username: None,
            password: None,
            keep_alive: Duration::from_secs(60),
            tls: Tls {
                verify: true,
                ..Tls::default()
            },
            session_expiry: Duration::from_secs(86_400),
            will: None,
            policy: Policy::open(url),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            file_persistence: true,
        }
    }

    /// The server's name, or its URL for an inline server (for messages).
    pub fn label(&self) -> String {
        match &self.server {
            Some(name) => format!("'{name}' ({})", self.url),
            None => self.url.clone(),
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
    Ok(Endpoint::inline(&url, version_prop.unwrap_or(3)))
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
        tls: Tls {
            ca_file: s.ca_file.clone(),
            cert_file: s.cert_file.clone(),
            key_file: s.key_file.clone(),
            verify: s.verify_server.unwrap_or(true),
        },
        session_expiry: s
            .session_expiry
            .map_or(Duration::from_secs(86_400), |d| d.0),
        will: s.will.clone(),
        policy: Policy::from_server(name, s),
        max_inflight: s.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT),
        file_persistence: s.persistence.as_deref() != Some("memory"),
    })
}

/// mosquitto's default `max_inflight_messages`.
pub const DEFAULT_MAX_INFLIGHT: u16 = 20;

/// Paho TLS options from a server's settings; a file that cannot be read is an error that
/// names it.
pub fn ssl_options(tls: &Tls) -> Result<paho::SslOptions, String> {
    let mut ssl = paho::SslOptionsBuilder::new();
    for f in [&tls.ca_file, &tls.cert_file, &tls.key_file]
        .into_iter()
        .flatten()
    {
        std::fs::metadata(f).map_err(|e| format!("TLS file {}: {e}", f.display()))?;
    }
    if let Some(ca) = &tls.ca_file {
        ssl.trust_store(ca)
            .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
    }
    if let Some(cert) = &tls.cert_file {
        ssl.key_store(cert)
            .map_err(|e| format!("certificate file {}: {e}", cert.display()))?;
    }
    if let Some(key) = &tls.key_file {
        ssl.private_key(key)
            .map_err(|e| format!("key file {}: {e}", key.display()))?;
    }
    ssl.enable_server_cert_auth(tls.verify).verify(tls.verify);
    Ok(ssl.finalize())
}

/// A paho error in words an operator can act on (paho-mqtt 0.14 prints a refused CONNACK
/// as "(0)", and TLS failures only as a connect failure).
pub fn describe_error(e: &paho::Error, url: &str) -> String {
    use paho::ConnectReturnCode as C;
    match e {
        paho::Error::ConnectReturn(code) => {
            let what = match code {
                C::UnacceptableProtocolVersion => "it does not support this MQTT version (set version = 3 or 5 for the server)",
                C::IdentifierRejected => "it rejected the client id (set client_id on the node)",
                C::ServerUnavailable => "the MQTT service is unavailable",
                C::BadUserNameOrPassword => "bad user name or password (check username and password_env/password_file)",
                C::NotAuthorized => "not authorized (check username, password and the broker's ACL)",
                C::Accepted => "accepted",
            };
            format!("the broker refused the connection: {what} (CONNACK return code {})", *code as i32)
        }
        paho::Error::ReasonCode(rc, _) => format!("the broker refused the connection: {rc}"),
        paho::Error::TcpTlsConnectFailure if url.starts_with("ssl://") => {
            "TCP/TLS connect failure (TLS handshake failed: check ca_file, the server certificate's host name, and cert_file/key_file if the broker requires a client certificate)".to_string()
        }
        other => other.to_string(),
    }
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
    let _ = create_private_dir_all(data_dir);
    let _ = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, id.as_bytes()));
    id
}

/// Paho drops the publications it has in flight when the broker answers a connect with no
/// session for the client (`sessionPresent` 0: a broker restarted without persistence, or a
/// session that expired). Those may never have reached the broker; say so where an operator
/// looks, rather than lose them silently.
fn report_discarded(log: &LogCtx, n: usize, restored: usize) {
    log.record(
        log.entry(
            Severity::Warning,
            bip::INFLIGHT_DISCARDED,
            format!(
                "{n} publication(s) in flight were dropped by the MQTT client: the broker at {} \
                 had no session for '{}' when it connected (restarted without persistence, or \
                 the session expired), so they may not have reached it. {restored} from before \
                 flowbus started are published again now from the in-flight log; those of a \
                 running flow are published again at once by their MQTTPublish node (either \
                 may reach the broker twice). Run the broker \
                 with persistence to keep sessions across its restarts",
                log.url, log.client_id
            ),
        )
        .tag("count", n)
        .tag("restored", restored),
    );
}

/// Whether a failed connect is one no retry mends: the client's persistence failed (the
/// in-flight log could not be read or written), so the supervisor stops and the flow fails.
fn gives_up(e: &paho::Error) -> bool {
    matches!(e, paho::Error::PersistenceError)
}

/// An in-flight log that was not sound when the client opened it (see `mqtt_store`): it was
/// renamed aside and a new one started from its sound records. Publications in the records
/// that were lost are not sent; the error says how many, and where the old file is.
fn report_corrupt_log(log: &LogCtx, r: &crate::mqtt_store::Recovery) {
    log.record(
        log.entry(
            Severity::Error,
            bip::INFLIGHT_LOG_CORRUPT,
            format!(
                "{} (client '{}'); the publications in lost records are not sent",
                r.describe(),
                log.client_id
            ),
        )
        .tag("file", r.file.display().to_string())
        .tag("aside", r.aside.display().to_string())
        .tag("kept", r.kept)
        .tag("lost", r.invalid)
        .tag("unreadable_bytes", r.unreadable_bytes),
    );
}

/// A publication read back from the in-flight log, as a paho message.
fn restored_message(p: &crate::mqtt_store::Publication) -> paho::Message {
    use crate::mqtt_store::Property as P;
    let mut b = paho::MessageBuilder::new()
        .topic(p.topic.as_str())
        .payload(p.payload.as_slice())
        .qos(i32::from(p.qos))
        .retained(p.retained);
    if !p.properties.is_empty() {
        let mut props = paho::Properties::new();
        for prop in &p.properties {
            let _ = match prop {
                P::PayloadFormat(v) => {
                    props.push_int(paho::PropertyCode::PayloadFormatIndicator, i32::from(*v))
                }
                P::MessageExpiry(v) => props.push_int(
                    paho::PropertyCode::MessageExpiryInterval,
                    i32::try_from(*v).unwrap_or(i32::MAX),
                ),
                P::ContentType(v) => props.push_string(paho::PropertyCode::ContentType, v),
                P::ResponseTopic(v) => props.push_string(paho::PropertyCode::ResponseTopic, v),
                P::CorrelationData(v) => {
                    props.push_binary(paho::PropertyCode::CorrelationData, v.clone())
                }
                P::User(k, v) => props.push_string_pair(paho::PropertyCode::UserProperty, k, v),
            };
        }
        b = b.properties(props);
    }
    b.finalize()
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

pub use flowbus_runtime::activity::Sampler;

/// Applies a server's QoS policy for one node: decides each topic's QoS, logs the rule that
/// decided or the downgrade once per topic, and counts downgrades and refusals.
pub struct PolicyGate {
    policy: Policy,
    noted: Mutex<BTreeSet<String>>,
}

/// How many topics a node notes individually before it stops (a publish node with a topic per
/// device must not grow this without bound).
const NOTED_TOPICS: usize = 1000;

impl PolicyGate {
    /// The gate for a node's endpoint.
    pub fn new(policy: Policy) -> PolicyGate {
        PolicyGate {
            policy,
            noted: Mutex::new(BTreeSet::new()),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn first_time(&self, key: String) -> bool {
        let mut n = self.noted.lock().unwrap_or_else(|p| p.into_inner());
        n.len() < NOTED_TOPICS && n.insert(key)
    }

    /// The QoS to use on `topic`, or the mismatch text (policy `fail`; counted).
    pub fn apply(&self, conn: &Conn, topic: &str, requested: Option<u8>) -> Result<u8, String> {
        self.apply_granted(conn, topic, requested, None)
    }

    /// Like [`apply`](Self::apply), with the QoS a SUBACK granted for this topic as a further
    /// limit.
    pub fn apply_granted(
        &self,
        conn: &Conn,
        topic: &str,
        requested: Option<u8>,
        granted: Option<u8>,
    ) -> Result<u8, String> {
        let log = &conn.log;
        let mut limit = conn.broker_limit();
        if let Some(g) = granted {
            if limit.as_ref().is_none_or(|(l, _)| g < *l) {
                limit = Some((g, Source::Suback));
            }
        }
        match self.policy.decide(topic, requested, limit) {
            Decision::Use { qos, rule } => {
                if let Some(rule) = rule {
                    if self.first_time(format!("rule {topic}")) {
                        log.record(
                            log.entry(
                                Severity::Info,
                                bip::QOS_RULE,
                                format!("QoS rule '{rule}' of server {} decided QoS {qos} for topic '{topic}'", self.policy.server),
                            )
                            .tag("topic", topic)
                            .tag("qos", qos)
                            .tag("rule", rule),
                        );
                    }
                }
                Ok(qos)
            }
            Decision::Downgrade {
                requested,
                allowed,
                source,
            } => {
                inc(&log.stats.qos_downgrades);
                if self.first_time(format!("downgrade {topic}")) {
                    log.record(
                        log.entry(
                            Severity::Warning,
                            bip::QOS_DOWNGRADE,
                            format!(
                                "{}; on_qos_mismatch = \"downgrade\": using QoS {allowed} (for QoS {requested}, {})",
                                mismatch_head(&log.node, topic, requested, allowed, &self.policy.server, &source),
                                source.raise(requested)
                            ),
                        )
                        .tag("topic", topic)
                        .tag("qos", allowed)
                        .tag("requested_qos", requested),
                    );
                }
                Ok(allowed)
            }
            Decision::Fail {
                requested,
                allowed,
                source,
            } => {
                inc(&log.stats.qos_mismatches);
                Err(mismatch_text(
                    &log.node,
                    topic,
                    requested,
                    allowed,
                    &self.policy.server,
                    &source,
                ))
            }
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
    pub client: std::mem::ManuallyDrop<paho::AsyncClient>,
    /// Log context.
    pub log: LogCtx,
    opts: paho::ConnectOptions,
    backoff: Backoff,
    connected: watch::Sender<bool>,
    want: watch::Sender<Want>,
    reconnect: mpsc::UnboundedSender<()>,
    reconnect_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    lost_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    stop: CancellationToken,
    /// The supervisor task, awaited on shutdown so the client is released before a new
    /// version of the flow creates one with the same id (and persistence directory).
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    counted_open: AtomicBool,
    /// Whether the connection uses MQTT v5.
    pub v5: bool,
    /// The broker's QoS limit and how we learnt it, once known.
    limit: Mutex<Option<(u8, Source)>>,
    connect_timeout: Duration,
    /// Connects started and not yet answered by Paho (see [`Conn::connect`]).
    connecting: Arc<AtomicUsize>,
    /// Sent publications in the in-flight log the broker has not acknowledged (file
    /// persistence only).
    unacknowledged: Option<Arc<AtomicUsize>>,
    /// Of those, the ones restored from the log at start-up (file persistence only): nobody
    /// waits for them, so the connection sends them again if Paho drops them.
    restored: Option<crate::mqtt_store::Restored>,
    /// Releases the in-flight log when the connection is dropped (Paho closes it only when the
    /// client is destroyed, minutes later: see `CLOSED_CLIENTS`).
    store: Option<crate::mqtt_store::Release>,
    /// Publications on their way to paho (see [`Conn::send`]).
    outbox: Arc<Outbox>,
    /// Permits for unacknowledged QoS 1/2 publications (the server's `max_inflight`): paho
    /// fails a publish over its limit instead of waiting, so the node waits here.
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Why the connection gave up for good (see [`Conn::fatal`]).
    fatal: watch::Sender<Option<String>>,
}

/// How to create a [`Conn`].
pub struct ConnSpec<'a> {
    /// The broker.
    pub endpoint: &'a Endpoint,
    /// The client id.
    pub client_id: String,
    /// Persistent session (clean session false).
    pub persistent_session: bool,
    /// Paho file persistence for in-flight publications under this directory.
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

/// Publications that nodes have handed over, in order, waiting to be handed to paho.
///
/// Each paho publish wakes paho's send thread, which writes the packet and sleeps again: one
/// hand-off (a futex wake and two context switches) per message when publishes come one at a
/// time, tens of microseconds apart, as they do behind a script. So a node's publish goes into
/// this queue, and everything queued is handed to paho in one go when the flow input's task
/// that queued it yields (`flowbus_runtime::input_task`), i.e. once the messages that had
/// already arrived have been processed, on the same thread. Paho's send thread then finds a
/// batch per wake-up. A publication queued from anywhere else (several instances, restored
/// publications) is handed over by a task per connection instead, woken for it. Order is kept
/// (one queue, handed over under one lock); at a low rate a batch is one message and costs no
/// task switch.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<Vec<Outgoing>>,
    /// Held while a batch is handed to paho: a flush before a disconnect waits for a hand-over
    /// in progress on another thread, so nothing taken from the queue reaches paho after the
    /// disconnect (paho refuses it then; seen as QoS 0 messages missing after a SIGTERM).
    handing: Mutex<()>,
    wake: tokio::sync::Notify,
    started: AtomicBool,
    closed: AtomicBool,
}

/// A publication and, if its sender wants it, where its token goes.
type Outgoing = (
    paho::Message,
    Option<tokio::sync::oneshot::Sender<paho::DeliveryToken>>,
);

impl Outbox {
    /// Hands everything queued to paho, in order. A hand-over in progress elsewhere finishes
    /// first, so whatever was queued when this is called is with paho when it returns.
    fn hand_over(&self, client: &paho::AsyncClient, log: &LogCtx) {
        let _turn = self.handing.lock().unwrap_or_else(|p| p.into_inner());
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        for (m, tx) in batch {
            match tx {
                Some(tx) => {
                    let _ = tx.send(client.publish(m));
                }
                // QoS 0: nobody waits for the token, so a publication paho refuses (the
                // connection went away since the node checked) is reported here, and what it
                // takes is counted here (the node counts QoS 1/2 once acknowledged).
                None => {
                    let len = m.payload().len() as u64;
                    match client.try_publish(m) {
                        Ok(_) => {
                            inc(&log.stats.messages_sent);
                            add(&log.stats.bytes_sent, len);
                        }
                        Err(e) => refused_qos0(log, &e),
                    }
                }
            }
        }
    }
}

/// A QoS 0 publication paho refused at the hand-over: the node has already passed the message
/// on, so the activity log is where it ends.
fn refused_qos0(log: &LogCtx, e: &paho::Error) {
    let (topic, why) = match e {
        paho::Error::Publish(rc, m) => (m.topic().to_string(), paho::Error::from(*rc).to_string()),
        other => (String::new(), other.to_string()),
    };
    log.record(
        log.entry(
            Severity::Error,
            bip::PUBLISH_ERROR,
            format!(
                "Publish to '{topic}' (QoS 0) was refused by the client: {why}; the message is lost (QoS 0 is not retried)"
            ),
        )
        .tag("topic", topic),
    );
}

/// A publication sent from a flow input's task is handed to paho when that task yields (see
/// [`Outbox`]).
impl flowbus_runtime::input_task::OnYield for Conn {
    fn on_yield(&self) {
        self.outbox.hand_over(&self.client, &self.log);
    }
}

impl Conn {
    /// Queues a publication for paho (see [`Outbox`]); the token comes through the returned
    /// receiver when `want_token` (an error from it means the connection was dropped first).
    pub fn send(
        self: &Arc<Self>,
        m: paho::Message,
        want_token: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<paho::DeliveryToken>> {
        let (tx, rx) = if want_token {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.outbox
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((m, tx));
        // In a flow input's task: handed over when that task yields, on its own thread.
        if flowbus_runtime::input_task::defer(self) {
            return rx;
        }
        if !self.outbox.started.swap(true, Ordering::SeqCst) {
            let outbox = self.outbox.clone();
            let conn = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    outbox.wake.notified().await;
                    if outbox.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some(conn) = conn.upgrade() else { return };
                    outbox.hand_over(&conn.client, &conn.log);
                }
            });
        }
        self.outbox.wake.notify_one();
        rx
    }

    /// Hands whatever is still queued to paho now (before a disconnect).
    pub fn flush(&self) {
        self.outbox.hand_over(&self.client, &self.log);
    }

    /// Creates the client (connects nothing).
    pub fn new(spec: ConnSpec<'_>) -> Result<Arc<Conn>, String> {
        let ep = spec.endpoint;
        let v5 = ep.version == 5;
        // A generated id grows with the flow's name and the node's id: paho would write one
        // over 65,535 bytes with a wrapped length.
        crate::mqtt_limits::check_string("the client id", &spec.client_id)
            .map_err(|e| format!("cannot create the MQTT client for {}: {e}", ep.url))?;
        if let Some(dir) = &spec.persist_dir {
            create_private_dir_all(dir).map_err(|e| {
                format!(
                    "cannot create the persistence directory {}: {e}",
                    dir.display()
                )
            })?;
        }
        let log = LogCtx {
            stats: spec.services.stats.server(&ep.url),
            services: spec.services,
            flow: spec.flow.to_string(),
            node: spec.node.to_string(),
            url: ep.url.clone(),
            client_id: spec.client_id,
        };
        let mut create = paho::CreateOptionsBuilder::new()
            .server_uri(&ep.url)
            .client_id(&log.client_id);
        let mut unacknowledged = None;
        let mut restored = None;
        let mut store = None;
        let mut recovery = None;
        create = match &spec.persist_dir {
            // Publications in flight go to an append-only log (see `mqtt_store`) rather than
            // Paho's file-per-message store.
            Some(dir) => {
                let log_store = crate::mqtt_store::LogStore::new(dir.clone()).mqtt_v5(v5);
                unacknowledged = Some(log_store.unacknowledged());
                restored = Some(log_store.restored());
                store = Some(log_store.releaser());
                recovery = Some(log_store.recovery());
                create.user_persistence(log_store)
            }
            None => create.persistence(paho::PersistenceType::None),
        };
        let create = create
            // Paho refuses publishes beyond this many queued-and-not-yet-written messages, even
            // while connected (default 100); the node's own window bounds what it queues.
            .max_buffered_messages(10_000)
            .mqtt_version(if v5 {
                paho::MQTT_VERSION_5
            } else {
                paho::MQTT_VERSION_3_1_1
            })
            .finalize();
        let client = paho::AsyncClient::new(create);
        // Creating the client opened the in-flight log: whether or not that went well, say
        // what it had to do with a log that was not sound.
        let recovered = recovery.and_then(|r| r.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(r) = recovered {
            report_corrupt_log(&log, &r);
        }
        let client =
            client.map_err(|e| format!("cannot create the MQTT client for {}: {e}", ep.url))?;
        let persistent = spec.persistent_session;
        let mut b = if v5 {
            paho::ConnectOptionsBuilder::new_v5()
        } else {
            paho::ConnectOptionsBuilder::with_mqtt_version(paho::MQTT_VERSION_3_1_1)
        };
        b.keep_alive_interval(ep.keep_alive)
            .connect_timeout(spec.connect_timeout)
            .max_inflight(i32::from(ep.max_inflight));
        // Paho's own automatic reconnect stays off: the supervisor follows the IIB schedule
        // and logs every attempt.
        if v5 {
            b.clean_start(!persistent);
            if persistent {
                let mut props = paho::Properties::new();
                // Default a day: long enough to ride out a pause or a restart, short enough
                // not to leave sessions behind for ever.
                let secs = ep.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32;
                let _ = props.push_u32(paho::PropertyCode::SessionExpiryInterval, secs);
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
        if let Some(w) = &ep.will {
            let will = if w.retain {
                paho::Message::new_retained(
                    w.topic.as_str(),
                    w.payload.as_bytes(),
                    i32::from(w.qos),
                )
            } else {
                paho::Message::new(w.topic.as_str(), w.payload.as_bytes(), i32::from(w.qos))
            };
            b.will_message(will);
        }
        if ep.url.starts_with("ssl://") {
            b.ssl_options(ssl_options(&ep.tls)?);
        }
        let opts = b.finalize();
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        client.set_connection_lost_callback(move |_| {
            let _ = lost_tx.send(());
        });
        let (reconnect, reconnect_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Conn {
            client: std::mem::ManuallyDrop::new(client),
            log,
            opts,
            backoff: spec.backoff,
            connected: watch::channel(false).0,
            want: watch::channel(Want::Up).0,
            reconnect,
            reconnect_rx: Mutex::new(Some(reconnect_rx)),
            lost_rx: Mutex::new(Some(lost_rx)),
            stop: CancellationToken::new(),
            supervisor: Mutex::new(None),
            counted_open: AtomicBool::new(false),
            v5,
            limit: Mutex::new(None),
            connect_timeout: spec.connect_timeout,
            connecting: Arc::default(),
            unacknowledged,
            restored,
            store,
            outbox: Arc::default(),
            inflight: Arc::new(tokio::sync::Semaphore::new(usize::from(
                ep.max_inflight.max(1),
            ))),
            fatal: watch::channel(None).0,
        }))
    }

    /// Resolves with the reason when the connection has given up for good: its client's
    /// persistence failed on connect, which no retry mends. The node then fails its flow
    /// (shown `failed` with the reason) rather than stay `running` and publish nothing. Never
    /// resolves once the connection is dropped.
    pub fn fatal(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.fatal.subscribe();
        async move {
            let reason = rx
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().unwrap_or_default());
            match reason {
                Ok(reason) => reason,
                Err(_) => futures::future::pending().await,
            }
        }
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until connected, at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        // The common case, without a receiver and a timer per message.
        if *self.connected.borrow() {
            return true;
        }
        let mut rx = self.connected.subscribe();
        let ok = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c)).await,
            Ok(Ok(_))
        );
        ok
    }

    /// The broker's QoS limit, if known.
    pub fn broker_limit(&self) -> Option<(u8, Source)> {
        self.limit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a limit the broker showed (the lowest seen wins).
    pub fn learn_limit(&self, q: u8, source: Source) {
        let mut l = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        if l.as_ref().is_none_or(|(old, _)| q < *old) {
            *l = Some((q, source));
        }
    }

    /// Starts a connect, counted until Paho answers it: Paho's token for a connect holds the
    /// client, so until then the client must not be destroyed (see `CLOSED_CLIENTS`). A task
    /// waits for the answer, so the count comes down even when the caller gives up first.
    fn connect(&self) -> impl std::future::Future<Output = paho::Result<paho::ServerResponse>> {
        let connecting = self.connecting.clone();
        connecting.fetch_add(1, Ordering::SeqCst);
        let token = self.client.connect(self.opts.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let answer = token.await;
            connecting.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(answer);
        });
        async move {
            rx.await
                .unwrap_or(Err(paho::Error::General("the connect was abandoned")))
        }
    }

    /// Connects once, without the supervisor (for `flowbus doctor`); returns the broker's
    /// CONNACK Maximum QoS (MQTT v5) if it sent one.
    pub async fn connect_once(&self, timeout: Duration) -> Result<Option<u8>, String> {
        match tokio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(resp)) => {
                let max = resp
                    .properties()
                    .get_int(paho::PropertyCode::MaximumQos)
                    .map(|q| q.clamp(0, 2) as u8);
                if let Some(q) = max {
                    self.learn_limit(q, Source::Connack);
                }
                Ok(max)
            }
            Ok(Err(e)) => Err(describe_error(&e, &self.log.url)),
            Err(_) => Err(format!(
                "no answer within {}",
                flowbus_runtime::time::human(timeout)
            )),
        }
    }

    /// Learns the broker's QoS limit for an MQTT 3.1.1 connection, which has no CONNACK
    /// property for it: subscribes to a private topic at QoS 2 and reads the granted QoS from
    /// the SUBACK, then unsubscribes. Returns the granted QoS (None when refused or
    /// unanswered; a broker's ACL may forbid the topic).
    pub async fn probe_qos(&self) -> Option<u8> {
        let topic = format!("flowbus/probe/{}", self.log.client_id);
        let granted = match tokio::time::timeout(
            self.connect_timeout,
            self.client.subscribe(topic.as_str(), 2),
        )
        .await
        {
            Ok(Ok(resp)) => resp.subscribe_response(),
            _ => None,
        };
        let _ = tokio::time::timeout(
            self.connect_timeout,
            self.client.unsubscribe(topic.as_str()),
        )
        .await;
        match granted {
            Some(g @ 0..=2) => {
                if g < 2 {
                    self.learn_limit(g as u8, Source::Suback);
                    self.log.record(
                        self.log
                            .entry(
                                Severity::Info,
                                bip::BROKER_LIMIT,
                                format!("The broker allows at most QoS {g} (a probe subscription at QoS 2 was granted {g})"),
                            )
                            .tag("max_qos", g),
                    );
                }
                Some(g as u8)
            }
            _ => None,
        }
    }

    /// Asks the supervisor to pause (disconnect, keeping the session) or resume.
    pub fn set_want(&self, w: Want) {
        self.want.send_replace(w);
    }

    /// A handle that does what [`set_want`](Self::set_want) does without holding the
    /// connection: for the message callback, which the client holds (an `Arc<Conn>` there
    /// would keep the connection alive through its own client). Sending never blocks.
    pub fn want_handle(&self) -> watch::Sender<Want> {
        self.want.clone()
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
        let h = tokio::spawn(async move { me.supervise(on_connected).await });
        *self.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    /// Carries out what the session state machine ([`crate::mqtt::session`]) decides, and
    /// feeds it what happened: the only place that connects, disconnects and sleeps.
    async fn supervise(self: Arc<Self>, on_connected: OnConnected) {
        use crate::mqtt::session::{Action, Event, Session};
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
        let mut session = Session::new(self.backoff);
        let mut todo: std::collections::VecDeque<Action> =
            session.start(*want.borrow_and_update()).into();
        // What an action started and has not answered yet.
        let mut connecting: Option<BoxFut<'static, paho::Result<paho::ServerResponse>>> = None;
        let mut disconnecting: Option<BoxFut<'static, Result<(), String>>> = None;
        let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        // In flight when the connect started, and of those the restored ones (Paho removes
        // them from the store while it answers the connect, so they are read before).
        let mut unacknowledged = 0;
        let mut restored: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            while let Some(action) = todo.pop_front() {
                match action {
                    Action::Connect => {
                        unacknowledged = self
                            .unacknowledged
                            .as_ref()
                            .map_or(0, |n| n.load(Ordering::Relaxed));
                        restored = match &self.restored {
                            Some(r) if unacknowledged > 0 => r
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .iter()
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                            _ => Vec::new(),
                        };
                        connecting = Some(Box::pin(self.connect()));
                    }
                    Action::MarkOpen => self.mark_open(),
                    Action::MarkClosed => self.mark_closed(),
                    Action::Ready { session_present } => {
                        let _ = tokio::time::timeout(
                            self.connect_timeout,
                            on_connected(session_present),
                        )
                        .await;
                        self.connected.send_replace(true);
                    }
                    Action::Republish => {
                        tokio::spawn(self.clone().publish_restored(std::mem::take(&mut restored)));
                    }
                    Action::LearnLimit(q) => self.learn_limit(q, Source::Connack),
                    Action::Disconnect { grace, .. } => {
                        let token = self.client.disconnect_after(grace);
                        disconnecting = Some(Box::pin(async move {
                            token.await.map(drop).map_err(|e| e.to_string())
                        }));
                    }
                    Action::Wait(d) => timer = Some(Box::pin(tokio::time::sleep(d))),
                    Action::CountFailure => inc(&self.log.stats.failed_connections),
                    Action::GiveUp(reason) => {
                        self.fatal.send_replace(Some(reason));
                        return;
                    }
                    Action::Note(note) => self.note(note),
                }
            }
            let event = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                    connecting = None;
                    match r {
                        Ok(resp) => {
                            // Connection-lost notifications from before this connection are
                            // stale.
                            while lost.try_recv().is_ok() {}
                            while reconnect.try_recv().is_ok() {}
                            Event::Connected {
                                session_present: resp
                                    .connect_response()
                                    .is_some_and(|c| c.session_present),
                                unacknowledged,
                                restored: restored.len(),
                                max_qos: resp
                                    .properties()
                                    .get_int(paho::PropertyCode::MaximumQos)
                                    .map(|q| q.clamp(0, 2) as u8),
                            }
                        }
                        Err(e) if gives_up(&e) => Event::ConnectFailed {
                            error: format!(
                                "connecting to {} failed: the MQTT client's persistence (the in-flight log under the data directory) failed: {e}; not retried",
                                self.log.url
                            ),
                            fatal: true,
                        },
                        Err(e) => Event::ConnectFailed {
                            error: describe_error(&e, &self.log.url),
                            fatal: false,
                        },
                    }
                }
                r = async { disconnecting.as_mut().expect("guarded").await }, if disconnecting.is_some() => {
                    disconnecting = None;
                    Event::Disconnected(r)
                }
                _ = async { timer.as_mut().expect("guarded").await }, if timer.is_some() => {
                    timer = None;
                    Event::TimerFired
                }
                Some(()) = lost.recv() => Event::Lost,
                Some(()) = reconnect.recv() => Event::ReconnectAsked,
                Ok(()) = want.changed() => Event::Want(*want.borrow_and_update()),
            };
            todo.extend(session.on(event));
        }
    }

    /// Writes what the session state machine says to the activity log.
    fn note(&self, note: crate::mqtt::session::Note) {
        use crate::mqtt::session::Note;
        let log = &self.log;
        let url = &log.url;
        let entry = match note {
            Note::Connected { session_present } => log
                .entry(
                    Severity::Info,
                    bip::CONNECTED,
                    format!(
                        "Connected to {url} as '{}'{}",
                        log.client_id,
                        if session_present {
                            " (session resumed)"
                        } else {
                            ""
                        }
                    ),
                )
                .tag("session_present", session_present),
            Note::Discarded {
                unacknowledged,
                restored,
            } => return report_discarded(log, unacknowledged, restored),
            Note::BrokerLimit(q) => log
                .entry(
                    Severity::Info,
                    bip::BROKER_LIMIT,
                    format!("The broker allows at most QoS {q} (MQTT v5 CONNACK Maximum QoS)"),
                )
                .tag("max_qos", q),
            Note::Lost { retry_in } => log.entry(
                Severity::Warning,
                bip::CONNECTION_LOST,
                format!(
                    "Lost the connection to {url}; reconnecting in {}",
                    flowbus_runtime::time::human(retry_in)
                ),
            ),
            Note::DisconnectedToReconnect => log.entry(
                Severity::Warning,
                bip::DISCONNECTED,
                format!("Disconnected from {url} to reconnect after a failed publish attempt"),
            ),
            Note::Paused => log.entry(
                Severity::Info,
                bip::DISCONNECTED,
                format!(
                    "Disconnected from {url} (paused; the broker keeps the session's messages)"
                ),
            ),
            Note::PauseFailed(e) => log.entry(
                Severity::Warning,
                bip::DISCONNECT_FAILED,
                format!("Failed to disconnect from {url} while pausing: {e}"),
            ),
            Note::FirstFailure(e) => log.entry(
                Severity::Error,
                bip::FIRST_FAILED_CONNECT,
                format!("Failed to connect to {url}: {e}"),
            ),
            Note::Failure {
                attempt,
                error,
                retry_in,
            } => log
                .entry(
                    Severity::Error,
                    bip::CONNECTION_FAILURE,
                    format!(
                        "Connection to {url} failed (attempt {attempt}): {error}; retrying in {}",
                        flowbus_runtime::time::human(retry_in)
                    ),
                )
                .tag("attempt", attempt)
                .tag("retry_in_ms", retry_in.as_millis() as u64),
            Note::Fatal(reason) => log.entry(Severity::Error, bip::CONNECTION_FAILURE, reason),
        };
        log.record(entry);
    }

    /// Publishes again, in packet-id order and each under an in-flight permit, the publications
    /// from before a restart that Paho dropped with the broker's session (`records`: key and
    /// record from the in-flight log), and logs what became of every one: each ends
    /// acknowledged or as an error entry.
    async fn publish_restored(self: Arc<Self>, records: Vec<(String, Vec<u8>)>) {
        let log = &self.log;
        let mut publications = Vec::new();
        for (key, rec) in records {
            match crate::mqtt_store::parse_publish(&rec, key.starts_with("s5-")) {
                Ok(p) => publications.push(p),
                Err(e) => log.record(log.entry(
                    Severity::Error,
                    bip::NOT_ACKNOWLEDGED,
                    format!(
                        "A publication restored from the in-flight log ({key}) cannot be read, so it cannot be published again after the broker at {} lost the session: {e}; it is lost",
                        log.url
                    ),
                )),
            }
        }
        publications.sort_by_key(|p| p.msgid);
        let mut waits = Vec::new();
        for (i, p) in publications.iter().enumerate() {
            let permit = tokio::select! {
                _ = self.stop.cancelled() => {
                    // Paho has already removed these from the log: say so. (Those handed over
                    // are in the log again and go out after the next start.)
                    log.record(log.entry(
                        Severity::Error,
                        bip::NOT_ACKNOWLEDGED,
                        format!(
                            "{} publication(s) restored from the in-flight log were not published again to {} before the connection was stopped; they are lost",
                            publications.len() - i,
                            log.url
                        ),
                    ).tag("count", publications.len() - i));
                    return;
                }
                p = self.inflight.clone().acquire_owned() => p.ok(),
            };
            let token = self.client.publish(restored_message(p));
            let timeout = self.connect_timeout;
            waits.push(async move {
                let r = tokio::time::timeout(timeout, token).await;
                drop(permit);
                match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "no acknowledgement within {}",
                        flowbus_runtime::time::human(timeout)
                    )),
                }
            });
        }
        let results = tokio::select! {
            _ = self.stop.cancelled() => return,
            r = futures::future::join_all(waits) => r,
        };
        let mut acked = 0;
        for (p, r) in publications.iter().zip(results) {
            match r {
                Ok(()) => acked += 1,
                Err(why) => log.record(
                    log.entry(
                        Severity::Error,
                        bip::NOT_ACKNOWLEDGED,
                        format!(
                            "Publish to '{}' (QoS {}), restored from the in-flight log and published again after the broker lost the session, failed: {why}; it is lost",
                            p.topic, p.qos
                        ),
                    )
                    .tag("topic", p.topic.clone())
                    .tag("qos", p.qos),
                ),
            }
        }
        if acked > 0 {
            log.record(
                log.entry(
                    Severity::Info,
                    bip::PUBLISHED,
                    format!(
                        "Published again {acked} publication(s) from before flowbus started, which the broker at {} had lost with the session; acknowledged",
                        log.url
                    ),
                )
                .tag("count", acked),
            );
        }
    }

    /// Stops the supervisor and starts disconnecting without waiting: for a node whose task is
    /// dropped before it could shut down (aborted at a stop deadline), so its connection —
    /// and a subscription — does not outlive it.
    pub fn abandon(&self) {
        if !self.stop.is_cancelled() {
            self.stop.cancel();
            // Paho starts disconnecting when asked; nobody is left to wait for the token.
            drop(self.client.disconnect(None::<paho::DisconnectOptions>));
        }
    }

    /// Stops the supervisor and disconnects (bounded by `timeout`).
    pub async fn shutdown(&self, timeout: Duration) {
        // Nothing handed over by a node stays behind in the outbox.
        self.flush();
        self.stop.cancel();
        let supervisor = self
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = supervisor {
            let _ = tokio::time::timeout(timeout, h).await;
        }
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

/// Ends a client id's persistent session at its broker, for a flow that is removed: connects
/// once with a clean session (MQTT v5: clean start, session expiry 0) and disconnects, so the
/// broker discards the session — its subscriptions and the messages it queued for it. (A
/// session is ended by the client id, not by the connection that made it, so this works as
/// well for a flow that was stopped long ago.) The connect waits at most `spec`'s connect
/// timeout. Returns the reason when the broker could not be reached or refused.
pub async fn end_session(spec: ConnSpec<'_>) -> Result<(), String> {
    // No will: this connection is not the node's, and must not announce it gone.
    let mut endpoint = spec.endpoint.clone();
    endpoint.will = None;
    let timeout = spec.connect_timeout;
    let conn = Conn::new(ConnSpec {
        endpoint: &endpoint,
        persistent_session: false,
        persist_dir: None,
        ..spec
    })?;
    let result = match tokio::time::timeout(timeout, conn.connect()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(describe_error(&e, &conn.log.url)),
        Err(_) => Err(format!(
            "no answer within {}",
            flowbus_runtime::time::human(timeout)
        )),
    };
    if conn.client.is_connected() {
        let _ = tokio::time::timeout(timeout, conn.client.disconnect(None)).await;
    }
    // Dropped here: the client is destroyed by the reaper, as every closed client.
    result
}

/// paho-mqtt clients that have been closed and wait to be destroyed. Paho's token for a
/// connect holds a reference to its client; if that reference turned out to be the last,
/// paho-mqtt would destroy the client inside the Paho C library's own thread, which deadlocks
/// the library (seen in a test that let a frozen broker answer a connect after the client was
/// let go). So a closed client stays here, holding a reference, until no connect of its is
/// waiting for Paho's answer, at two looks of the reaper thread in a row (30 s apart: Paho
/// lets go of the token just after it answers), and not before twice its connect timeout and
/// [`REAP_GRACE`] have passed; then the reaper drops it and the client (its buffers,
/// callbacks and the flow objects they hold) is destroyed there, never on a Paho thread.
static CLOSED_CLIENTS: Mutex<Vec<Closed>> = Mutex::new(Vec::new());

struct Closed {
    /// Held only to be dropped by the reaper.
    _client: paho::AsyncClient,
    /// Not destroyed before.
    due: Instant,
    /// Its connects not yet answered.
    connecting: Arc<AtomicUsize>,
    /// A look of the reaper found it due with no connect waiting.
    idle_seen: bool,
}

/// How long a closed client waits beyond twice its connect timeout.
pub const REAP_GRACE: Duration = Duration::from_secs(60);
/// How often the reaper thread looks.
const REAP_EVERY: Duration = Duration::from_secs(30);

fn retire(client: paho::AsyncClient, connect_timeout: Duration, connecting: Arc<AtomicUsize>) {
    static REAPER: std::sync::Once = std::sync::Once::new();
    let due = Instant::now() + connect_timeout.saturating_mul(2) + REAP_GRACE;
    CLOSED_CLIENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Closed {
            _client: client,
            due,
            connecting,
            idle_seen: false,
        });
    REAPER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("mqtt-reaper".into())
            .spawn(|| loop {
                std::thread::sleep(REAP_EVERY);
                reap_closed_clients(Instant::now());
            });
        // Without the thread closed clients are only kept, as they always were.
        if let Err(e) = spawned {
            tracing::warn!("cannot start the MQTT client reaper thread: {e}");
        }
    });
}

/// One look of the reaper at `now`: destroys, on the calling thread (never call it on one of
/// Paho's), the closed clients that the previous look already found due with no connect
/// waiting and that still have none; returns how many. The reaper thread calls it every 30 s.
pub fn reap_closed_clients(now: Instant) -> usize {
    let due: Vec<Closed> = {
        let mut closed = CLOSED_CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        let mut keep = Vec::new();
        for mut c in std::mem::take(&mut *closed) {
            let idle = c.due <= now && c.connecting.load(Ordering::SeqCst) == 0;
            if idle && c.idle_seen {
                due.push(c);
            } else {
                c.idle_seen = idle;
                keep.push(c);
            }
        }
        *closed = keep;
        due
    };
    // Outside the lock: destroying a client waits for Paho.
    let n = due.len();
    drop(due);
    n
}

/// How many closed clients wait to be destroyed.
pub fn closed_clients() -> usize {
    CLOSED_CLIENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len()
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: `client` is never used again: this is the drop of its owner.
        let client = unsafe { std::mem::ManuallyDrop::take(&mut self.client) };
        self.outbox.hand_over(&client, &self.log);
        if client.is_connected() {
            // Nobody is left to wait for the token.
            drop(client.disconnect(None::<paho::DisconnectOptions>));
        }
        self.outbox.closed.store(true, Ordering::SeqCst);
        self.outbox.wake.notify_one();
        retire(client, self.connect_timeout, self.connecting.clone());
        if let Some(store) = &self.store {
            store.release();
        }
    }
}

/// Abandons a connection when dropped (see [`Conn::abandon`]); after a normal shutdown it does
/// nothing.
pub struct AbandonOnDrop(pub Arc<Conn>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// The `Duplicate` flag and packet id of a received message. paho-mqtt exposes neither; they
/// are fields of the C struct that a `paho::Message` holds. [`wire_info_raw`] reads them
/// there; should that ever fail its checks (another paho-mqtt), they are read from the
/// message's `Debug` output, which starts with the C struct (`... dup: 0, msgid: 7, ...`),
/// stopping as soon as they are found (5,000 instructions a message against 30).
pub fn wire_info(m: &paho::Message) -> (bool, i32) {
    wire_info_raw(m)
        .or_else(|| wire_info_fast(m))
        .unwrap_or_else(|| wire_info_text(m))
}

/// The head of Paho's C `MQTTAsync_message` (MQTTAsync.h, unchanged since Paho C 1.3), as far
/// as `msgid`.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(test, derive(Debug))]
struct CMessageHead {
    struct_id: [u8; 4],
    struct_version: i32,
    payloadlen: i32,
    payload: *const u8,
    qos: i32,
    retained: i32,
    dup: i32,
    msgid: i32,
}

/// The whole C struct: the head and `MQTTProperties` (three ints and a pointer).
const C_MESSAGE_SIZE: usize = std::mem::size_of::<CMessageHead>() + 24;

/// Where the C struct sits inside a `paho::Message`: [`NOT_FOUND`] until the first look, then
/// the offset, or [`UNUSABLE`].
static C_MESSAGE_AT: AtomicUsize = AtomicUsize::new(NOT_FOUND);
const NOT_FOUND: usize = usize::MAX;
const UNUSABLE: usize = usize::MAX - 1;

/// `dup` and `msgid` read from the C struct inside `m`, or None if it cannot be found there.
///
/// paho-mqtt 0.14's `Message` has two fields, the C struct and a pointer to the Rust copies
/// of its data (`Pin<Box<MessageData>>`), so it is 8 bytes larger than the C struct and the
/// struct is at offset 0 or 8 (Rust may order the fields either way). The offset is looked
/// for once, and every read is checked against what paho-mqtt's accessors say: the struct's
/// tag `MQTM`, a payload pointer and length equal to `payload()`'s, the same QoS and retained
/// flag. A paho-mqtt laid out otherwise fails the checks, and the caller reads `Debug`.
fn wire_info_raw(m: &paho::Message) -> Option<(bool, i32)> {
    let base = (m as *const paho::Message).cast::<u8>();
    let matches = |at: usize| -> Option<CMessageHead> {
        // SAFETY: `at` is 0 or 8 and the value is `C_MESSAGE_SIZE + 8` bytes long (checked
        // below before any read). In either order of the two fields, bytes `at..at + 4` are
        // initialised: the struct's tag, the box pointer, or `payloadlen`. The head is read
        // only once they are `MQTM`, which neither of the others can be: a box pointer is
        // 8-aligned and `M` (0x4d) is odd; as `payloadlen` they would be 1.3 GB, above MQTT's
        // 256 MB packet limit. So it is read from where the C struct is.
        let tag = unsafe { base.add(at).cast::<[u8; 4]>().read_unaligned() };
        if &tag != b"MQTM" {
            return None;
        }
        let head = unsafe { base.add(at).cast::<CMessageHead>().read_unaligned() };
        let p = m.payload();
        let same = std::ptr::eq(head.payload, p.as_ptr())
            && usize::try_from(head.payloadlen) == Ok(p.len())
            && head.qos == m.qos() as i32
            && (head.retained != 0) == m.retained();
        same.then_some(head)
    };
    let at = match C_MESSAGE_AT.load(Ordering::Relaxed) {
        UNUSABLE => return None,
        NOT_FOUND => {
            let at = (std::mem::size_of::<paho::Message>() == C_MESSAGE_SIZE + 8)
                .then(|| [0, 8].into_iter().find(|at| matches(*at).is_some()))
                .flatten();
            C_MESSAGE_AT.store(at.unwrap_or(UNUSABLE), Ordering::Relaxed);
            at?
        }
        at => at,
    };
    matches(at).map(|h| (h.dup != 0, h.msgid))
}

/// Follows the formatter's pieces: `debug_struct` writes a field's name, `": "`, then the
/// value (one piece for an integer). No buffer, no searching: this runs for every message.
fn wire_info_fast(m: &dyn std::fmt::Debug) -> Option<(bool, i32)> {
    #[derive(Clone, Copy)]
    enum Want {
        Nothing,
        Dup,
        MsgId,
    }
    struct Pieces {
        want: Want,
        dup: Option<bool>,
        msgid: Option<i32>,
        seen: usize,
    }
    impl std::fmt::Write for Pieces {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.seen += s.len();
            match (s, self.want) {
                ("dup", _) => self.want = Want::Dup,
                ("msgid", _) => self.want = Want::MsgId,
                (": ", _) => {}
                (v, Want::Dup) => {
                    self.dup = v.parse::<i32>().ok().map(|d| d != 0);
                    self.want = Want::Nothing;
                }
                (v, Want::MsgId) => {
                    self.msgid = v.parse().ok();
                    self.want = Want::Nothing;
                }
                _ => {}
            }
            if (self.dup.is_some() && self.msgid.is_some()) || self.seen > 1024 {
                return Err(std::fmt::Error);
            }
            Ok(())
        }
    }
    let mut p = Pieces {
        want: Want::Nothing,
        dup: None,
        msgid: None,
        seen: 0,
    };
    let _ = write!(p, "{m:?}");
    Some((p.dup?, p.msgid?))
}

/// The same from the formatted text (if the formatter's pieces ever change shape).
fn wire_info_text(m: &paho::Message) -> (bool, i32) {
    struct Finder {
        buf: String,
        found: Option<(bool, i32)>,
    }
    impl std::fmt::Write for Finder {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.buf.push_str(s);
            if let (Some(d), Some(i)) = (self.buf.find("dup: "), self.buf.find("msgid: ")) {
                let rest = &self.buf[i + 7..];
                if let Some(end) = rest.find(|c: char| !c.is_ascii_digit() && c != '-') {
                    let dup = self.buf[d + 5..].starts_with('1');
                    self.found = Some((dup, rest[..end].parse().unwrap_or(0)));
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
    f.found.unwrap_or((false, 0))
}

/// Recognises the QoS 1 messages a broker sends again after a reconnect — what it had sent
/// and not seen acknowledged when the connection closed, flagged `Duplicate` — that were in
/// fact received, so they are not processed twice.
///
/// A broker cannot reuse a packet id until the message that had it is acknowledged, so a
/// resent message with id `n` is either the last message received with id `n` or one that
/// never arrived. The filter therefore keeps, per packet id, a digest (topic and payload) of
/// the last message received with it: one entry per id the broker actually used, so it covers
/// whatever the broker had in flight — up to the 65,535 ids MQTT has — at 8 bytes an id, and
/// forgets nothing it may still need. A broker resends in order, so the resends of messages
/// that arrived come first: the first message of a connection that is not one of them ends
/// the recognition for that connection, and a later `Duplicate` with a repeated id, topic and
/// payload (a sensor sending the same value) is taken as new.
pub struct Redeliveries {
    /// Digest + 1 of the last message received with each packet id (0: none yet).
    last: Vec<u64>,
    /// The connection the previous message came on.
    connection: u64,
    /// Whether the messages of this connection so far were all recognised resends.
    resending: bool,
    /// The digests' hasher, seeded at random: a publisher who knows the function still does
    /// not know the seed to prepare a payload with another's digest.
    digests: foldhash::quality::RandomState,
}

impl Default for Redeliveries {
    fn default() -> Self {
        Redeliveries::new()
    }
}

impl Redeliveries {
    /// An empty filter.
    pub fn new() -> Redeliveries {
        Redeliveries {
            last: Vec::new(),
            connection: 0,
            resending: false,
            digests: foldhash::quality::RandomState::default(),
        }
    }

    fn key(&self, topic: &str, payload: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        // Slices hash with their lengths, so topic and payload cannot trade bytes.
        self.digests
            .hash_one((topic.as_bytes(), payload))
            .wrapping_add(1)
    }

    /// Remembers a message received before this run without checking it (a message replayed
    /// from the input journal): the broker may send it again, not knowing it arrived.
    pub fn remember(&mut self, msgid: u16, topic: &str, payload: &[u8]) {
        self.set(msgid, self.key(topic, payload));
    }

    fn set(&mut self, msgid: u16, key: u64) {
        let i = usize::from(msgid);
        if i >= self.last.len() {
            // Grows with the ids the broker uses (mosquitto counts up through all of them).
            self.last.resize(
                (i + 1).next_power_of_two().min(usize::from(u16::MAX) + 1),
                0,
            );
        }
        self.last[i] = key;
    }

    /// Records a QoS 1/2 message received on connection number `connection` (counted up at
    /// each connect); returns true when it is a resend of one already received.
    pub fn is_redelivery(
        &mut self,
        connection: u64,
        dup: bool,
        msgid: u16,
        topic: &str,
        payload: &[u8],
    ) -> bool {
        if connection != self.connection {
            self.connection = connection;
            self.resending = true;
        }
        let key = self.key(topic, payload);
        let seen = self.last.get(usize::from(msgid)) == Some(&key);
        if dup && seen && self.resending {
            return true;
        }
        self.resending = false;
        self.set(msgid, key);
        false
    }
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

/// Checks an MQTT topic filter (subscribe) or name (publish): not empty, an MQTT string (at
/// most 65,535 bytes of UTF-8, no NUL: see [`mqtt_limits`](crate::mqtt_limits)), wildcards
/// only where a filter allows them.
pub fn check_topic(t: &str, filter: bool) -> Result<(), String> {
    if t.is_empty() {
        return Err("a topic must not be empty".into());
    }
    crate::mqtt_limits::check_string("topic", t).map_err(|e| e.to_string())?;
    let shown = || crate::mqtt_limits::preview(t);
    if !filter {
        // A name has no wildcard anywhere: found without splitting it into levels, since a
        // publish checks every TopicName override.
        if t.contains(['+', '#']) {
            return Err(format!(
                "topic {} contains a wildcard; a publish needs a topic name",
                shown()
            ));
        }
        return Ok(());
    }
    let body = match t.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f))
                if !group.is_empty() && !group.contains(['+', '#']) && !f.is_empty() =>
            {
                f
            }
            _ => return Err(format!("{} must be $share/<group>/<filter>", shown())),
        },
        None => t,
    };
    let levels = body.split('/').count();
    for (i, l) in body.split('/').enumerate() {
        let wild = l.contains('+') || l.contains('#');
        if wild && !(l == "+" || (l == "#" && i == levels - 1)) {
            return Err(format!(
                "topic filter {} misuses a wildcard: '+' must fill a whole level and '#' must be the whole last level",
                shown()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that is never connected (paho refuses its publications).
    fn unconnected(services: &Arc<Services>, client_id: &str) -> Arc<Conn> {
        Conn::new(ConnSpec {
            endpoint: &Endpoint::inline("tcp://127.0.0.1:9", 4),
            client_id: client_id.into(),
            persistent_session: false,
            persist_dir: None,
            connect_timeout: Duration::from_secs(1),
            backoff: Backoff {
                initial: Duration::from_secs(5),
                step: Duration::from_secs(5),
                max: Duration::from_secs(5),
            },
            services: services.clone(),
            flow: "f",
            node: "out",
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error entries of the activity log.
    fn errors(services: &Services) -> Vec<Arc<flowbus_runtime::activity::Entry>> {
        services.activity.query(&flowbus_runtime::activity::Filter {
            severity: Some(Severity::Error),
            ..Default::default()
        })
    }

    /// From a flow input's task, publications are queued and handed to paho together when
    /// the task yields, on the same task: no outbox task is started or woken for them.
    #[tokio::test]
    async fn publications_from_a_flow_input_are_handed_over_when_its_task_yields() {
        let services = Arc::new(Services::default());
        let conn = unconnected(&services, "on-yield");
        let task = {
            let (conn, services) = (conn.clone(), services.clone());
            tokio::spawn(flowbus_runtime::input_task::RunOnYield::new(async move {
                for _ in 0..3 {
                    assert!(conn
                        .send(paho::Message::new("plant/out", "{}", 0), false)
                        .is_none());
                }
                let queued = conn.outbox.queue.lock().unwrap().len();
                let refused = errors(&services).len();
                tokio::task::yield_now().await;
                (queued, refused)
            }))
        };
        // Queued, not yet handed over (paho would have refused them: not connected).
        assert_eq!(task.await.unwrap(), (3, 0));
        // Handed over at the yield: all three refused, each logged.
        assert!(conn.outbox.queue.lock().unwrap().is_empty());
        assert_eq!(errors(&services).len(), 3);
        assert!(
            !conn.outbox.started.load(Ordering::SeqCst),
            "no outbox task"
        );
        // Elsewhere, the connection's outbox task hands them over.
        conn.send(paho::Message::new("plant/out", "{}", 0), false);
        assert!(conn.outbox.started.load(Ordering::SeqCst));
    }

    /// A QoS 0 publication is not waited for, so one paho refuses at the hand-over (here: the
    /// client never connected) must end in the activity log, not vanish.
    #[tokio::test]
    async fn a_refused_qos_0_publication_is_logged() {
        let services = Arc::new(Services::default());
        let conn = unconnected(&services, "refused-qos0");
        assert!(conn
            .send(paho::Message::new("plant/out", "{}", 0), false)
            .is_none());
        conn.flush();
        let errors = errors(&services);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            conn.log.stats.messages_sent.load(Ordering::SeqCst),
            0,
            "not counted as sent"
        );
        assert_eq!(errors[0].number, "BIP4311");
        assert_eq!(errors[0].node, "out");
        assert!(
            errors[0]
                .message
                .starts_with("Publish to 'plant/out' (QoS 0) was refused by the client: ")
                && errors[0]
                    .message
                    .ends_with("the message is lost (QoS 0 is not retried)"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn only_a_persistence_failure_ends_the_reconnects() {
        assert!(gives_up(&paho::Error::PersistenceError));
        assert!(!gives_up(&paho::Error::TcpTlsConnectFailure));
        assert!(!gives_up(&paho::Error::ConnectReturn(
            paho::ConnectReturnCode::ServerUnavailable
        )));
    }

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
        // Longer than MQTT can say, for either: refused, and quoted only in part.
        let long = format!("a/{}", "b".repeat(70_000));
        for filter in [false, true] {
            let e = check_topic(&long, filter).unwrap_err();
            assert!(e.contains("70002 bytes long") && e.len() < 200, "{e}");
        }
        assert!(check_topic(&"c".repeat(65_535), false).is_ok());
        assert!(check_topic("a\0b", false).unwrap_err().contains("NUL"));
    }

    #[test]
    fn wire_info_reads_the_c_struct() {
        let m = paho::Message::new("t", vec![1u8; 100], 1);
        assert_eq!(wire_info(&m), (false, 0));
        // The fast path understands the formatter (no fallback to searching the text).
        assert_eq!(wire_info_fast(&m), Some((false, 0)));
        assert_eq!(wire_info_text(&m), (false, 0));
        // What the C struct looks like to the formatter, with a resend's flag and id.
        let like = CMessageHead {
            struct_id: *b"MQTM",
            struct_version: 1,
            payloadlen: 3,
            payload: std::ptr::null(),
            qos: 1,
            retained: 0,
            dup: 1,
            msgid: 4711,
        };
        assert_eq!(wire_info_fast(&like), Some((true, 4711)));
    }

    #[test]
    fn wire_info_finds_the_c_struct_in_place_and_agrees_with_debug() {
        for (payload, qos, retained) in [(vec![7u8; 200], 1, false), (vec![], 2, true)] {
            let mut m = paho::MessageBuilder::new()
                .topic("t")
                .payload(payload)
                .qos(qos)
                .retained(retained)
                .finalize();
            assert_eq!(wire_info_raw(&m), Some((false, 0)));
            let at = C_MESSAGE_AT.load(Ordering::Relaxed);
            assert!(at == 0 || at == 8, "found at {at}");
            // Give it a resend's flag and id where the C struct keeps them; the formatter,
            // which prints the struct's own fields, must read the same.
            // SAFETY: the offset was found and checked above; the fields are plain ints.
            unsafe {
                let head = (&mut m as *mut paho::Message)
                    .cast::<u8>()
                    .add(at)
                    .cast::<CMessageHead>();
                (*head).dup = 1;
                (*head).msgid = 4711;
            }
            assert_eq!(wire_info_fast(&m), Some((true, 4711)));
            assert_eq!(wire_info_raw(&m), Some((true, 4711)));
            assert_eq!(wire_info(&m), (true, 4711));
            // A message whose struct does not hold what the accessors say is refused.
            unsafe {
                let head = (&mut m as *mut paho::Message)
                    .cast::<u8>()
                    .add(at)
                    .cast::<CMessageHead>();
                (*head).payloadlen += 1;
            }
            assert_eq!(wire_info_raw(&m), None);
        }
    }

    #[test]
    fn redeliveries_are_recognised_by_id_and_content() {
        let mut r = Redeliveries::new();
        assert!(!r.is_redelivery(1, false, 1, "t", b"a"));
        assert!(!r.is_redelivery(1, false, 2, "t", b"b"));
        // Reconnected: the broker resends what it had not seen acknowledged.
        assert!(r.is_redelivery(2, true, 1, "t", b"a"));
        assert!(r.is_redelivery(2, true, 2, "t", b"b"));
        // Then one that never arrived (same id as an old one, other content): new.
        assert!(!r.is_redelivery(2, true, 3, "t", b"c"));
        // Not flagged: always new (a reused id).
        assert!(!r.is_redelivery(2, false, 1, "t", b"a"));
        // Flagged, with the id and content of the last message with that id, but after a
        // message that was not a resend: the resends are over (a repeated value), new.
        assert!(!r.is_redelivery(2, true, 2, "t", b"b"));
        // Same content, other id: new.
        assert!(!r.is_redelivery(3, true, 9, "t", b"a"));
    }

    /// A new message whose payload differs from the last one with its packet id in two words
    /// is not taken for a resend (the hand-written digest this replaced gave both payloads the
    /// same digest whatever its seed: bit 63 of one word, bit 28 of the next).
    #[test]
    fn payloads_differing_in_two_words_are_not_taken_for_resends() {
        let a = [0u8; 16];
        let mut b = a;
        b[7] ^= 0x80;
        b[11] ^= 0x10;
        for _ in 0..100 {
            let mut r = Redeliveries::new();
            assert!(!r.is_redelivery(1, false, 1, "t", &a));
            assert!(!r.is_redelivery(2, true, 1, "t", &b));
        }
    }

    /// Whatever the broker's in-flight window, a resend is recognised: the filter keeps the
    /// last message of every packet id, not the last N messages.
    #[test]
    fn redeliveries_are_recognised_across_the_whole_packet_id_space() {
        let mut r = Redeliveries::new();
        // 200,000 messages: ids 1..=65,535 three times over and then some.
        let id = |n: u32| (n % 65_535 + 1) as u16;
        for n in 0..200_000u32 {
            assert!(!r.is_redelivery(1, false, id(n), "t", &n.to_le_bytes()));
        }
        // The broker had the last 60,000 in flight when the connection closed.
        for n in 140_000..200_000u32 {
            assert!(
                r.is_redelivery(2, true, id(n), "t", &n.to_le_bytes()),
                "{n}"
            );
        }
        // A message replayed from the journal is known too.
        r.remember(7, "j", b"x");
        assert!(r.is_redelivery(3, true, 7, "j", b"x"));
        assert!(r.last.len() <= 65_536);
    }

    #[test]
    fn client_ids_are_stable_and_clean() {
        assert_eq!(client_id("ab12", "f", "n", None), "fb-ab12-f-n");
        assert_eq!(client_id("ab12", "f", "n", Some(2)), "fb-ab12-f-n-2");
    }
}
