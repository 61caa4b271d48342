//! Runtime configuration (`flowbus.toml`). Every key has a default; unknown keys and bad
//! values are errors that name the file and line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as `"30s"`, `"2m"`, `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "'{s}' is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"2m\""
            ))
        })
    }
}

/// A size written as `"10MiB"`, `"512KiB"`, `"1000"` (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_size(&s).map(Size).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "'{s}' is not a size; write e.g. \"10MiB\", \"512KiB\" or a number of bytes"
            ))
        })
    }
}

/// Parses a size: a number of bytes, optionally with a unit (`B`, `KiB`/`K`/`KB`, `MiB`/`M`/`MB`,
/// `GiB`/`G`/`GB`, all powers of 1024): `"16MiB"`, `"512KiB"`, `"1000"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1024,
        "MiB" | "M" | "MB" => 1024 * 1024,
        "GiB" | "G" | "GB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistence and activity-log files.
    pub data_dir: PathBuf,
    /// Flow files or directories.
    pub flows: Vec<PathBuf>,
    /// The admin API.
    pub admin: AdminConfig,
    /// The activity log.
    pub activity_log: ActivityLogConfig,
    /// MQTT timings.
    pub mqtt: MqttConfig,
    /// The daemon: shutdown deadline, flow-file watching.
    pub daemon: DaemonConfig,
    /// Named servers.
    pub servers: BTreeMap<String, ServerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(".flowbus"),
            flows: vec![PathBuf::from("flows")],
            admin: AdminConfig::default(),
            activity_log: ActivityLogConfig::default(),
            mqtt: MqttConfig::default(),
            daemon: DaemonConfig::default(),
            servers: BTreeMap::new(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address (loopback by default).
    pub listen: String,
    /// Environment variable holding the bearer token; none: the token generated into
    /// `<data_dir>/admin.token`.
    pub token_env: Option<String>,
    /// Whether the API needs the bearer token (the default) or not (loopback only).
    pub auth: AdminAuth,
    /// `Host` names the API answers besides `localhost`, `127.0.0.1` and `[::1]` (any port).
    pub allowed_hosts: Vec<String>,
    /// Admin connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// Event streams (`/api/v1/activity-log/stream`) open at once; more get 503.
    pub max_event_streams: usize,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Dur,
    /// How long a client may take to send a request's body, and how long a response may
    /// wait for the client to read it.
    pub request_timeout: Dur,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:4880".into(),
            token_env: None,
            auth: AdminAuth::Token,
            allowed_hosts: Vec::new(),
            max_connections: 64,
            max_event_streams: 16,
            header_timeout: Dur(Duration::from_secs(10)),
            request_timeout: Dur(Duration::from_secs(30)),
        }
    }
}

/// `[admin] auth`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AdminAuth {
    /// Every endpoint but `/healthz` needs `Authorization: Bearer <token>`.
    Token,
    /// No authentication: accepted on a loopback listen address only, with a warning at
    /// every start.
    None,
}

impl AdminConfig {
    /// Whether the listen address is a loopback address (checked by [`Config::parse`] to
    /// be an address).
    pub fn listens_on_loopback(&self) -> bool {
        self.listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }

    /// Why this admin configuration is refused, if it is: no authentication on an address
    /// other machines can reach.
    pub fn refusal(&self) -> Option<String> {
        (self.auth == AdminAuth::None && !self.listens_on_loopback()).then(|| {
            format!(
                "admin.auth = \"none\" is only accepted on a loopback listen address (127.0.0.1 or [::1]), not {}; remove auth = \"none\" to use the token",
                self.listen
            )
        })
    }
}

/// `[daemon]`: how the daemon stops and how it watches its flow files.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// How long a graceful shutdown (SIGTERM/SIGINT) may take in all: inputs stopped,
    /// in-flight messages finished, acks awaited, connections closed.
    pub shutdown_timeout: Dur,
    /// Whether the daemon watches its flow paths and redeploys changed files.
    pub watch: bool,
    /// How often the flow paths are checked for changes.
    pub watch_interval: Dur,
    /// Threads of the shared runtime (the admin API, connection supervisors, timers, and the
    /// propagations of inputs with `instances > 1`); none set: one per core. Each input node
    /// runs its own propagations on a thread of its own (`input_task`).
    pub worker_threads: Option<usize>,
    /// Directories, besides a flow's own, whose files flows may name (a `script`, a Trace
    /// `file`); relative entries are relative to the configuration file.
    pub allowed_paths: Vec<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            shutdown_timeout: Dur(Duration::from_secs(10)),
            watch: true,
            watch_interval: Dur(Duration::from_secs(1)),
            worker_threads: None,
            allowed_paths: Vec::new(),
        }
    }
}

/// `[activity_log]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ActivityLogConfig {
    /// Entries kept in memory per flow.
    pub buffer_entries: usize,
    /// Rotated files kept.
    pub files: u32,
    /// Size of one file before it rotates.
    pub file_size: Size,
    /// `info`, `warning` or `error`.
    pub min_severity: String,
    /// Whether per-message entries (received, published, Trace output) below warning are
    /// also printed on the console (stderr); they are always in the log itself.
    pub console_per_message: bool,
}

impl Default for ActivityLogConfig {
    fn default() -> Self {
        ActivityLogConfig {
            buffer_entries: 1000,
            files: 4,
            file_size: Size(10 * 1024 * 1024),
            min_severity: "info".into(),
            console_per_message: false,
        }
    }
}

/// `[mqtt]`: reconnect schedule and ack timeout (the IIB contract's values by default), the
/// payload limit, and how long a connection made for a per-message `URL` override may idle.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// First reconnect delay.
    pub reconnect_initial: Dur,
    /// Added to the delay after each failed attempt.
    pub reconnect_step: Dur,
    /// Largest delay.
    pub reconnect_max: Dur,
    /// How long a QoS 1/2 publish waits for its acknowledgement.
    pub ack_timeout: Dur,
    /// The largest payload an MQTT node receives or publishes, unless its server or the node
    /// says otherwise.
    pub max_payload: Size,
    /// How long a connection an MQTTPublish node made for a per-message `URL` override stays
    /// open without a message for it.
    pub override_idle: Dur,
    /// What all MQTTSubscribe nodes of the daemon together may hold of received messages
    /// (queued, or in their flows) before each pauses receipt: the daemon-wide cap next to
    /// each node's `queue_high_bytes`.
    pub input_budget: Size,
    /// How many messages a broker queues for a disconnected persistent session before it
    /// drops them (mosquitto's `max_queued_messages`, 1000 by default), when known: a
    /// subscriber that pauses says how much of its backlog the broker can keep, and `flowbus
    /// doctor` warns when it is below a node's queue budget. `[servers.NAME]` may set its own.
    pub broker_queue_limit: Option<u64>,
}

/// The default `[mqtt] input_budget`: four subscribers' default `queue_high_bytes`.
pub const DEFAULT_INPUT_BUDGET: u64 = 256 * 1024 * 1024;

/// The default `max_payload`: mosquitto takes up to 256 MiB, which a flow parsing JSON holds
/// many times over; 16 MiB is far above what MQTT is used for and bounds that.
pub const DEFAULT_MAX_PAYLOAD: u64 = 16 * 1024 * 1024;

/// The largest payload MQTT can carry at all: the packet's remaining length is at most
/// 268,435,455 bytes (topic and header included).
pub const MQTT_MAX_PAYLOAD: u64 = 268_435_455;

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            reconnect_initial: Dur(Duration::from_secs(5)),
            reconnect_step: Dur(Duration::from_secs(5)),
            reconnect_max: Dur(Duration::from_secs(120)),
            ack_timeout: Dur(Duration::from_secs(30)),
            max_payload: Size(DEFAULT_MAX_PAYLOAD),
            override_idle: Dur(Duration::from_secs(60)),
            input_budget: Size(DEFAULT_INPUT_BUDGET),
            broker_queue_limit: None,
        }
    }
}

/// `[servers.NAME]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `tcp://host:port` or `ssl://host:port` (`mqtt://`/`mqtts://` also accepted).
    pub url: String,
    /// MQTT protocol version: 3 (3.1.1) or 5.
    #[serde(default)]
    pub version: Option<u8>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The QoS policy: the highest QoS this server allows.
    #[serde(default)]
    pub max_qos: Option<u8>,
    /// `fail` or `downgrade`.
    #[serde(default)]
    pub on_qos_mismatch: Option<String>,
    /// Keep-alive interval.
    #[serde(default)]
    pub keep_alive: Option<Dur>,
    /// CA certificates for TLS.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Verify the server's certificate and host name (default true).
    #[serde(default)]
    pub verify_server: Option<bool>,
    /// MQTT v5 session expiry for persistent sessions (default one day).
    #[serde(default)]
    pub session_expiry: Option<Dur>,
    /// Last will, published by the broker if the connection drops.
    #[serde(default)]
    pub will: Option<WillConfig>,
    /// Per-topic QoS rules (the "hybrid QoS" strategy), first match wins.
    #[serde(default)]
    pub qos_rules: Vec<QosRule>,
    /// QoS 1/2 publications a client may have unacknowledged at once (default 20, mosquitto's
    /// `max_inflight_messages`; a 3.1.1 client that exceeds the broker's limit can lose QoS 2
    /// publications).
    #[serde(default)]
    pub max_inflight: Option<u16>,
    /// Where QoS 1/2 publishers keep publications in flight: `file` (default; an append-only
    /// log under the data directory, survives a restart) or `memory` (survives a reconnect,
    /// not a crash of the daemon).
    #[serde(default)]
    pub persistence: Option<String>,
    /// The largest payload nodes using this server receive or publish (default: `[mqtt]
    /// max_payload`).
    #[serde(default)]
    pub max_payload: Option<Size>,
    /// How many messages this broker queues for a disconnected session before it drops them
    /// (default: `[mqtt] broker_queue_limit`); 0 means no limit.
    #[serde(default)]
    pub broker_queue_limit: Option<u64>,
}

/// `[servers.NAME.will]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WillConfig {
    /// Topic of the will message.
    pub topic: String,
    /// Payload (text).
    #[serde(default)]
    pub payload: String,
    /// QoS 0, 1 or 2.
    #[serde(default)]
    pub qos: u8,
    /// Retained.
    #[serde(default)]
    pub retain: bool,
}

/// `[[servers.NAME.qos_rules]]`: the QoS to use for topics matching a filter.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QosRule {
    /// A topic filter (`devices/+/provision`, `telemetry/#`).
    pub topic: String,
    /// The QoS for matching topics.
    pub qos: u8,
}

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the configuration: {message}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The OS error.
        message: String,
    },
    /// The file is not valid, or has unknown keys or bad values.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Config::parse(path, &text)
    }

    /// Parses configuration text; `path` is used in messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Invalid {
                file: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        cfg.check(path, text)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            cfg.data_dir = dir.join(&cfg.data_dir);
            cfg.flows = cfg.flows.iter().map(|f| dir.join(f)).collect();
            cfg.daemon.allowed_paths = cfg
                .daemon
                .allowed_paths
                .iter()
                .map(|p| dir.join(p))
                .collect();
            // Files a server names are relative to the configuration file, too.
            for server in cfg.servers.values_mut() {
                for f in [
                    &mut server.ca_file,
                    &mut server.cert_file,
                    &mut server.key_file,
                    &mut server.password_file,
                ]
                .into_iter()
                .flatten()
                {
                    *f = dir.join(&*f);
                }
            }
        }
        Ok(cfg)
    }

    fn check(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let fail = |needle: &str, message: String| {
            let (line, column) = text
                .find(needle)
                .map(|i| line_col(text, i))
                .unwrap_or((1, 1));
            Err(ConfigError::Invalid {
                file: path.to_path_buf(),
                line,
                column,
                message,
            })
        };
        if self.admin.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(
                "listen",
                format!(
                    "admin.listen '{}' must be an address and port, e.g. \"127.0.0.1:4880\"",
                    self.admin.listen
                ),
            );
        }
        if let Some(var) = &self.admin.token_env {
            if var.is_empty() || var.contains(['=', '\0']) {
                return fail(
                    "token_env",
                    format!("admin.token_env '{var}' must name an environment variable"),
                );
            }
            if self.admin.auth == AdminAuth::None {
                return fail(
                    "token_env",
                    "admin.token_env and admin.auth = \"none\" contradict each other; remove one"
                        .into(),
                );
            }
        }
        if let Some(why) = self.admin.refusal() {
            return fail("auth", why);
        }
        if let Some(h) = self.admin.allowed_hosts.iter().find(|h| !host_entry_ok(h)) {
            return fail(
                "allowed_hosts",
                format!("admin.allowed_hosts: '{h}' must be a host name or an IP address (IPv6 in brackets), without a port or wildcard"),
            );
        }
        if self.admin.max_connections == 0 {
            return fail(
                "max_connections",
                "admin.max_connections must be at least 1".into(),
            );
        }
        if self.admin.max_event_streams == 0 {
            return fail(
                "max_event_streams",
                "admin.max_event_streams must be at least 1".into(),
            );
        }
        if self.admin.header_timeout.0.is_zero() {
            return fail(
                "header_timeout",
                "admin.header_timeout must be more than 0".into(),
            );
        }
        if self.admin.request_timeout.0.is_zero() {
            return fail(
                "request_timeout",
                "admin.request_timeout must be more than 0".into(),
            );
        }
        if self.activity_log.buffer_entries == 0 {
            return fail(
                "buffer_entries",
                "activity_log.buffer_entries must be at least 1".into(),
            );
        }
        if self.activity_log.files == 0 {
            return fail("files", "activity_log.files must be at least 1".into());
        }
        if self.activity_log.file_size.0 < 4096 {
            return fail(
                "file_size",
                "activity_log.file_size must be at least 4KiB".into(),
            );
        }
        if self.daemon.watch_interval.0 < Duration::from_millis(10) {
            return fail(
                "watch_interval",
                "daemon.watch_interval must be at least 10ms".into(),
            );
        }
        if let Some(n) = self.daemon.worker_threads {
            if !(1..=256).contains(&n) {
                return fail(
                    "worker_threads",
                    format!("daemon.worker_threads must be between 1 and 256 (is {n})"),
                );
            }
        }
        if self
            .daemon
            .allowed_paths
            .iter()
            .any(|p| p.as_os_str().is_empty())
        {
            return fail(
                "allowed_paths",
                "daemon.allowed_paths entries must name directories (an empty one would mean the configuration file's directory)".into(),
            );
        }
        let payload_ok = |s: Size| (1..=MQTT_MAX_PAYLOAD).contains(&s.0);
        if !payload_ok(self.mqtt.max_payload) {
            return fail(
                "max_payload",
                format!("mqtt.max_payload must be from 1 byte to {MQTT_MAX_PAYLOAD} bytes (MQTT's largest packet)"),
            );
        }
        if self.mqtt.input_budget.0 < 1024 * 1024 {
            return fail(
                "input_budget",
                "mqtt.input_budget must be at least 1MiB".into(),
            );
        }
        if self.mqtt.override_idle.0.is_zero() {
            return fail(
                "override_idle",
                "mqtt.override_idle must be more than 0".into(),
            );
        }
        if Severity::parse(&self.activity_log.min_severity).is_none() {
            return fail(
                "min_severity",
                format!(
                    "min_severity '{}' must be info, warning or error",
                    self.activity_log.min_severity
                ),
            );
        }
        for (name, s) in &self.servers {
            if !(s.url.starts_with("tcp://")
                || s.url.starts_with("ssl://")
                || s.url.starts_with("mqtt://")
                || s.url.starts_with("mqtts://"))
            {
                return fail(
                    &format!("[servers.{name}]"),
                    format!(
                        "servers.{name}.url '{}' must start with tcp:// or ssl://",
                        s.url
                    ),
                );
            }
            if s.max_qos.is_some_and(|q| q > 2) {
                return fail(
                    &format!("[servers.{name}]"),
                    format!("servers.{name}.max_qos must be 0, 1 or 2"),
                );
            }
            if s.will.as_ref().is_some_and(|w| w.qos > 2) {
                return fail(
                    &format!("[servers.{name}"),
                    format!("servers.{name}.will.qos must be 0, 1 or 2"),
                );
            }
            if let Some(r) = s.qos_rules.iter().find(|r| r.qos > 2) {
                return fail(
                    &r.topic,
                    format!(
                        "servers.{name}.qos_rules: qos {} for '{}' must be 0, 1 or 2",
                        r.qos, r.topic
                    ),
                );
            }
            if s.cert_file.is_some() != s.key_file.is_some() {
                return fail(
                    &format!("[servers.{name}"),
                    format!("servers.{name}: mutual TLS needs both cert_file and key_file"),
                );
            }
            if let Some(p) = &s.persistence {
                if p != "file" && p != "memory" {
                    return fail(
                        &format!("[servers.{name}"),
                        format!("servers.{name}.persistence '{p}' must be \"file\" or \"memory\""),
                    );
                }
            }
            if s.max_payload.is_some_and(|p| !payload_ok(p)) {
                return fail(
                    &format!("[servers.{name}"),
                    format!("servers.{name}.max_payload must be from 1 byte to {MQTT_MAX_PAYLOAD} bytes (MQTT's largest packet)"),
                );
            }
            if s.will.as_ref().is_some_and(|w| {
                w.topic.is_empty() || w.topic.len() > 65_535 || w.topic.contains(['+', '#', '\0'])
            }) {
                return fail(
                    &format!("[servers.{name}"),
                    format!("servers.{name}.will.topic must be a topic name of 1 to 65535 bytes (UTF-8) without wildcards or NUL"),
                );
            }
            if s.max_inflight == Some(0) {
                return fail(
                    &format!("[servers.{name}"),
                    format!("servers.{name}.max_inflight must be at least 1"),
                );
            }
            if s.version.is_some_and(|v| v != 3 && v != 5) {
                return fail(
                    &format!("[servers.{name}]"),
                    format!("servers.{name}.version must be 3 (MQTT 3.1.1) or 5"),
                );
            }
            if let Some(p) = &s.on_qos_mismatch {
                if p != "fail" && p != "downgrade" {
                    return fail(
                        &format!("[servers.{name}]"),
                        format!("servers.{name}.on_qos_mismatch '{p}' must be \"fail\" or \"downgrade\""),
                    );
                }
            }
        }
        Ok(())
    }
}

use crate::activity::Severity;

/// An `allowed_hosts` entry: a host name or an IP address (IPv6 in brackets), no port.
fn host_entry_ok(h: &str) -> bool {
    if let Some(v6) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data_dir={} flows={:?}",
            self.data_dir.display(),
            self.flows
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::parse(Path::new("flowbus.toml"), "").unwrap();
        assert_eq!(c.mqtt.reconnect_initial.0, Duration::from_secs(5));
        assert_eq!(c.mqtt.reconnect_max.0, Duration::from_secs(120));
        assert_eq!(c.mqtt.ack_timeout.0, Duration::from_secs(30));
        assert_eq!(c.mqtt.max_payload.0, 16 * 1024 * 1024);
        assert_eq!(c.mqtt.override_idle.0, Duration::from_secs(60));
        assert_eq!(c.admin.listen, "127.0.0.1:4880");
        assert_eq!(c.activity_log.file_size.0, 10 * 1024 * 1024);
        assert_eq!(c.activity_log.files, 4);
        assert_eq!(c.activity_log.buffer_entries, 1000);
        assert_eq!(c.activity_log.min_severity, "info");
        assert_eq!(c.admin.token_env, None);
        assert_eq!(c.daemon.shutdown_timeout.0, Duration::from_secs(10));
        assert!(c.daemon.watch);
        assert_eq!(c.daemon.watch_interval.0, Duration::from_secs(1));
        assert_eq!(c.flows, [PathBuf::from("flows")]);
        assert_eq!(c.data_dir, PathBuf::from(".flowbus"));
        assert!(c.daemon.allowed_paths.is_empty());
    }

    #[test]
    fn allowed_paths_are_relative_to_the_configuration_file() {
        let c = Config::parse(
            Path::new("/etc/flowbus/flowbus.toml"),
            "[daemon]\nallowed_paths = [\"shared\", \"/srv/scripts\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.daemon.allowed_paths,
            [
                PathBuf::from("/etc/flowbus/shared"),
                PathBuf::from("/srv/scripts")
            ]
        );
        let e = Config::parse(Path::new("f.toml"), "[daemon]\nallowed_paths = [\"\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.toml:2:1:") && e.contains("must name directories"),
            "{e}"
        );
    }

    #[test]
    fn daemon_admin_and_activity_log_values_are_checked_with_their_line() {
        let cases = [
            (
                "[admin]\nlisten = \"localhost\"\n",
                "f.toml:2:1:",
                "admin.listen 'localhost' must be an address and port",
            ),
            (
                "[admin]\ntoken_env = \"\"\n",
                "f.toml:2:1:",
                "must name an environment variable",
            ),
            (
                "\n[activity_log]\nfiles = 0\n",
                "f.toml:3:1:",
                "activity_log.files must be at least 1",
            ),
            (
                "[activity_log]\nfile_size = \"1KiB\"\n",
                "f.toml:2:1:",
                "at least 4KiB",
            ),
            (
                "[activity_log]\nfile_size = \"big\"\n",
                "f.toml:2:",
                "'big' is not a size",
            ),
            (
                "[admin]\nlisten = \"0.0.0.0:4880\"\nauth = \"none\"\n",
                "f.toml:3:1:",
                "admin.auth = \"none\" is only accepted on a loopback listen address",
            ),
            (
                "[admin]\nauth = \"off\"\n",
                "f.toml:2:",
                "unknown variant `off`",
            ),
            (
                "[admin]\ntoken_env = \"T\"\nauth = \"none\"\n",
                "f.toml:2:1:",
                "contradict each other",
            ),
            (
                "[admin]\nallowed_hosts = [\"gw.example:8080\"]\n",
                "f.toml:2:1:",
                "'gw.example:8080' must be a host name or an IP address",
            ),
            (
                "[admin]\nallowed_hosts = [\"*.example\"]\n",
                "f.toml:2:1:",
                "without a port or wildcard",
            ),
            (
                "[admin]\nmax_connections = 0\n",
                "f.toml:2:1:",
                "admin.max_connections must be at least 1",
            ),
            (
                "[admin]\nheader_timeout = \"0s\"\n",
                "f.toml:2:1:",
                "admin.header_timeout must be more than 0",
            ),
            (
                "[activity_log]\nbuffer_entries = 0\n",
                "f.toml:2:1:",
                "buffer_entries must be at least 1",
            ),
            (
                "[activity_log]\nmin_severity = \"debug\"\n",
                "f.toml:2:1:",
                "must be info, warning or error",
            ),
            (
                "[daemon]\nshutdown_timeout = \"soon\"\n",
                "f.toml:2:",
                "'soon' is not a duration",
            ),
            (
                "[daemon]\nwatch_interval = \"1ms\"\n",
                "f.toml:2:1:",
                "at least 10ms",
            ),
            (
                "[daemon]\nworker_threads = 0\n",
                "f.toml:2:1:",
                "daemon.worker_threads must be between 1 and 256 (is 0)",
            ),
            (
                "[daemon]\nwatch = \"yes\"\n",
                "f.toml:2:",
                "expected a boolean",
            ),
            (
                "[daemon]\nreload = true\n",
                "f.toml:2:1:",
                "unknown field `reload`",
            ),
        ];
        for (text, at, says) in cases {
            let e = Config::parse(Path::new("f.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(at) && e.contains(says), "{text:?}: {e}");
        }
        let c = Config::parse(
            Path::new("f.toml"),
            "[daemon]\nshutdown_timeout = \"3s\"\nwatch = false\n[admin]\nlisten = \"0.0.0.0:9000\"\ntoken_env = \"T\"\n",
        )
        .unwrap();
        assert_eq!(c.daemon.shutdown_timeout.0, Duration::from_secs(3));
        assert!(!c.daemon.watch);
        assert_eq!(c.admin.token_env.as_deref(), Some("T"));
        let c = Config::parse(
            Path::new("f.toml"),
            "[admin]\nlisten = \"[::1]:9000\"\nauth = \"none\"\nallowed_hosts = [\"gw.example\", \"10.0.0.5\", \"[fd00::5]\"]\n",
        )
        .unwrap();
        assert_eq!(c.admin.auth, AdminAuth::None);
        assert_eq!(c.admin.allowed_hosts.len(), 3);
    }

    #[test]
    fn payload_limits_are_sizes_within_what_mqtt_can_carry() {
        let c = Config::parse(
            Path::new("f.toml"),
            "[mqtt]\nmax_payload = \"1MiB\"\noverride_idle = \"2s\"\n[servers.a]\nurl = \"tcp://h:1\"\nmax_payload = \"2048\"\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.max_payload.0, 1024 * 1024);
        assert_eq!(c.mqtt.override_idle.0, Duration::from_secs(2));
        assert_eq!(c.servers["a"].max_payload, Some(Size(2048)));
        let cases = [
            (
                "[mqtt]\nmax_payload = \"0\"\n",
                "f.toml:2:1:",
                "mqtt.max_payload must be from 1 byte to 268435455 bytes",
            ),
            (
                "[mqtt]\nmax_payload = \"1GiB\"\n",
                "f.toml:2:1:",
                "MQTT's largest packet",
            ),
            (
                "[mqtt]\noverride_idle = \"0s\"\n",
                "f.toml:2:1:",
                "mqtt.override_idle must be more than 0",
            ),
            (
                "[servers.a]\nurl = \"tcp://h:1\"\nmax_payload = \"300MiB\"\n",
                "f.toml:1:1:",
                "servers.a.max_payload must be from 1 byte",
            ),
            (
                "[servers.a]\nurl = \"tcp://h:1\"\n[servers.a.will]\ntopic = \"gone/#\"\n",
                "f.toml:1:1:",
                "servers.a.will.topic must be a topic name of 1 to 65535 bytes",
            ),
        ];
        for (text, at, says) in cases {
            let e = Config::parse(Path::new("f.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(at) && e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_admin_api_is_guarded_by_default() {
        let c = Config::parse(Path::new("flowbus.toml"), "").unwrap();
        assert_eq!(c.admin.auth, AdminAuth::Token);
        assert!(c.admin.listens_on_loopback());
        assert_eq!(c.admin.header_timeout.0, Duration::from_secs(10));
        assert!(c.admin.max_connections >= 1 && c.admin.max_event_streams >= 1);
        // A later override of the address (--admin) is checked again by the daemon.
        let mut a = c.admin.clone();
        a.auth = AdminAuth::None;
        assert!(a.refusal().is_none());
        a.listen = "0.0.0.0:1".into();
        assert!(a.refusal().is_some());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let e = Config::parse(
            Path::new("f.toml"),
            "data_dir = \"x\"\n[mqtt]\nack_timeot = \"1s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("f.toml:3:1: unknown field `ack_timeot`"),
            "{e}"
        );
        let e = Config::parse(Path::new("f.toml"), "[mqtt]\nack_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("f.toml:2:") && e.contains("'soon' is not a duration"),
            "{e}"
        );
        let e = Config::parse(
            Path::new("f.toml"),
            "[servers.a]\nurl = \"tcp://x:1\"\npersistence = \"disk\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("persistence 'disk' must be \"file\" or \"memory\""),
            "{e}"
        );
        let e = Config::parse(Path::new("f.toml"), "[servers.a]\nurl = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("f.toml:1:1:") && e.contains("tcp://"), "{e}");
    }
}
