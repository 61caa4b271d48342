//! Statistics kept by the runtime: per MQTT server (IIB's MQTT resource statistics) and per
//! node (messages per terminal, errors, processing time). Counters are atomics, so they can be
//! read as JSON at any time; [`crate::telemetry`] exposes them in the Prometheus format under
//! the names in [`names`] (the server statistics are collected at render time by
//! [`Stats::collect`]; the node counters are registered with the telemetry registry when a flow
//! starts).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Metric names (Prometheus style), in one place.
pub mod names {
    /// Connections to a server that are open now.
    pub const MQTT_OPEN_CONNECTIONS: &str = "flowbus_mqtt_open_connections";
    /// Connections closed since start.
    pub const MQTT_CLOSED_CONNECTIONS: &str = "flowbus_mqtt_closed_connections_total";
    /// Messages received from a server.
    pub const MQTT_MESSAGES_RECEIVED: &str = "flowbus_mqtt_messages_received_total";
    /// Messages published to a server.
    pub const MQTT_MESSAGES_SENT: &str = "flowbus_mqtt_messages_sent_total";
    /// Payload bytes received.
    pub const MQTT_BYTES_RECEIVED: &str = "flowbus_mqtt_bytes_received_total";
    /// Payload bytes published.
    pub const MQTT_BYTES_SENT: &str = "flowbus_mqtt_bytes_sent_total";
    /// Failed connection attempts.
    pub const MQTT_FAILED_CONNECTIONS: &str = "flowbus_mqtt_failed_connections_total";
    /// QoS downgrades applied by policy.
    pub const MQTT_QOS_DOWNGRADES: &str = "flowbus_mqtt_qos_downgrades_total";
    /// Subscriptions and publications refused by the QoS policy.
    pub const MQTT_QOS_MISMATCHES: &str = "flowbus_mqtt_qos_mismatches_total";
    /// Messages propagated through a node terminal.
    pub const NODE_MESSAGES: &str = "flowbus_node_messages_total";
    /// Errors raised in a node.
    pub const NODE_ERRORS: &str = "flowbus_node_errors_total";
    /// Times a processing node was called; for an input node, the messages it received.
    pub const NODE_INVOCATIONS: &str = "flowbus_node_invocations_total";
    /// Messages discarded at an input node after an exception nothing handled.
    pub const NODE_DISCARDS: &str = "flowbus_node_discards_total";
    /// Time in a node, downstream included (for an input node: the whole propagation).
    pub const NODE_PROCESSING_SECONDS: &str = "flowbus_node_processing_seconds";
    /// QoS 1 redeliveries recognised and skipped.
    pub const MQTT_REDELIVERIES_SKIPPED: &str = "flowbus_mqtt_redeliveries_skipped_total";
    /// Pauses of a subscriber's receipt at its queue budget.
    pub const MQTT_RECEIPT_PAUSES: &str = "flowbus_mqtt_receipt_pauses_total";
    /// Flows by state (`running`, `stopped`, `failed`).
    pub const FLOWS: &str = "flowbus_flows";
    /// Whether a flow is running (1) or not (0).
    pub const FLOW_UP: &str = "flowbus_flow_up";
    /// Activity-log entries recorded, by severity.
    pub const ACTIVITY_LOG_ENTRIES: &str = "flowbus_activity_log_entries_total";
    /// Activity-log entries that could not be written to the files.
    pub const ACTIVITY_LOG_WRITE_ERRORS: &str = "flowbus_activity_log_write_errors_total";
    /// Seconds since the daemon started.
    pub const UPTIME_SECONDS: &str = "flowbus_uptime_seconds";
}

/// IIB's MQTT resource statistics for one server URL.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// `OpenConnections`.
    pub open_connections: AtomicI64,
    /// `ClosedConnections`.
    pub closed_connections: AtomicU64,
    /// `MessagesReceived`.
    pub messages_received: AtomicU64,
    /// `MessagesSent`.
    pub messages_sent: AtomicU64,
    /// `BytesReceived`.
    pub bytes_received: AtomicU64,
    /// `BytesSent`.
    pub bytes_sent: AtomicU64,
    /// `FailedConnections`.
    pub failed_connections: AtomicU64,
    /// `QosDowngrades`.
    pub qos_downgrades: AtomicU64,
    /// `QosMismatches`: subscriptions and publications refused by the QoS policy.
    pub qos_mismatches: AtomicU64,
    /// `RedeliveriesSkipped`: QoS 1 messages the broker sent again after a reconnect that had
    /// already been received and processed.
    pub redeliveries_skipped: AtomicU64,
    /// `ReceiptPauses`: times a subscriber paused receipt because its queue budget was spent;
    /// the broker holds (or, beyond its own limit, drops) what arrives meanwhile.
    pub receipt_pauses: AtomicU64,
}

/// A snapshot of [`ServerStats`], with IIB's names.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ServerSnapshot {
    /// Open now.
    pub open_connections: i64,
    /// Closed since start.
    pub closed_connections: u64,
    /// Received since start.
    pub messages_received: u64,
    /// Sent since start.
    pub messages_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Failed connection attempts.
    pub failed_connections: u64,
    /// QoS downgrades.
    pub qos_downgrades: u64,
    /// QoS mismatches refused.
    pub qos_mismatches: u64,
    /// Redeliveries recognised and skipped.
    pub redeliveries_skipped: u64,
    /// Pauses of receipt at a full queue budget.
    pub receipt_pauses: u64,
}

impl ServerStats {
    /// Reads all counters.
    pub fn snapshot(&self) -> ServerSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerSnapshot {
            open_connections: self.open_connections.load(Ordering::Relaxed),
            closed_connections: r(&self.closed_connections),
            messages_received: r(&self.messages_received),
            messages_sent: r(&self.messages_sent),
            bytes_received: r(&self.bytes_received),
            bytes_sent: r(&self.bytes_sent),
            failed_connections: r(&self.failed_connections),
            qos_downgrades: r(&self.qos_downgrades),
            qos_mismatches: r(&self.qos_mismatches),
            redeliveries_skipped: r(&self.redeliveries_skipped),
            receipt_pauses: r(&self.receipt_pauses),
        }
    }
}

/// Adds one to a counter.
pub fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The daemon-wide statistics registry.
#[derive(Default)]
pub struct Stats {
    servers: Mutex<BTreeMap<String, Arc<ServerStats>>>,
}

impl Stats {
    /// The counters of a server URL (created on first use).
    pub fn server(&self, url: &str) -> Arc<ServerStats> {
        let mut m = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(url.to_string()).or_default().clone()
    }

    /// The server statistics as Prometheus families (label `server` = the URL).
    pub fn collect(&self) -> Vec<crate::telemetry::Collected> {
        use crate::telemetry::Collected;
        let servers = self.servers();
        let family = |name: &'static str,
                      kind: &'static str,
                      help: &'static str,
                      get: fn(&ServerSnapshot) -> f64| Collected {
            name,
            kind,
            help,
            samples: servers
                .iter()
                .map(|(url, s)| (vec![("server", crate::activity::redact(url))], get(s)))
                .collect(),
        };
        vec![
            family(
                names::MQTT_OPEN_CONNECTIONS,
                "gauge",
                "MQTT connections open now (IIB OpenConnections).",
                |s| s.open_connections as f64,
            ),
            family(
                names::MQTT_CLOSED_CONNECTIONS,
                "counter",
                "MQTT connections closed since start (IIB ClosedConnections).",
                |s| s.closed_connections as f64,
            ),
            family(
                names::MQTT_MESSAGES_RECEIVED,
                "counter",
                "Messages received from the server (IIB MessagesReceived).",
                |s| s.messages_received as f64,
            ),
            family(
                names::MQTT_MESSAGES_SENT,
                "counter",
                "Messages published to the server (IIB MessagesSent).",
                |s| s.messages_sent as f64,
            ),
            family(
                names::MQTT_BYTES_RECEIVED,
                "counter",
                "Payload bytes received (IIB BytesReceived).",
                |s| s.bytes_received as f64,
            ),
            family(
                names::MQTT_BYTES_SENT,
                "counter",
                "Payload bytes published (IIB BytesSent).",
                |s| s.bytes_sent as f64,
            ),
            family(
                names::MQTT_FAILED_CONNECTIONS,
                "counter",
                "Failed connection attempts (IIB FailedConnections).",
                |s| s.failed_connections as f64,
            ),
            family(
                names::MQTT_QOS_DOWNGRADES,
                "counter",
                "Subscriptions or publications downgraded by the QoS policy.",
                |s| s.qos_downgrades as f64,
            ),
            family(
                names::MQTT_QOS_MISMATCHES,
                "counter",
                "Subscriptions or publications refused by the QoS policy (on_qos_mismatch = fail).",
                |s| s.qos_mismatches as f64,
            ),
            family(
                names::MQTT_REDELIVERIES_SKIPPED,
                "counter",
                "QoS 1 redeliveries recognised and not processed again.",
                |s| s.redeliveries_skipped as f64,
            ),
            family(
                names::MQTT_RECEIPT_PAUSES,
                "counter",
                "Times a subscriber paused receipt at its queue budget (the broker holds the backlog meanwhile).",
                |s| s.receipt_pauses as f64,
            ),
        ]
    }

    /// A snapshot of every server's counters, by URL.
    pub fn servers(&self) -> BTreeMap<String, ServerSnapshot> {
        let m = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.snapshot())).collect()
    }
}
