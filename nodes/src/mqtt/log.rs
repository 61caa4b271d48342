//! How a connection speaks to the activity log: the BIP numbers of MQTT events and the
//! context ([`LogCtx`]) that tags every entry with its URL and client id.

use std::sync::Arc;

use flowbus_runtime::activity::{NewEntry, Severity};

use flowbus_runtime::services::Services;
use flowbus_runtime::stats::ServerStats;

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
