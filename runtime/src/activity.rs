//! The activity log: structured entries (seq, time, severity, BIP number, resource, flow, node,
//! message, tags) kept per flow in a ring buffer, mirrored to `tracing`, and broadcast to live
//! subscribers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// Entry severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Normal operation.
    Info,
    /// Something an operator should look at.
    Warning,
    /// A failure: a message or a connection was affected.
    Error,
}

impl Severity {
    /// Parses `info`, `warning` or `error`.
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" | "warn" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }
}

/// One activity-log entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Entry {
    /// Daemon-wide sequence number.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Severity.
    pub severity: Severity,
    /// `BIP12095` etc.
    pub number: String,
    /// `MQTT`, `Flow`, `Script`, ...
    pub resource: String,
    /// The flow.
    pub flow: String,
    /// The node (empty for flow-level entries).
    pub node: String,
    /// What happened.
    pub message: String,
    /// Structured details (topic, qos, url, client_id, ...).
    pub tags: Map<String, Value>,
}

/// An entry before it gets its sequence number and time.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// Severity.
    pub severity: Severity,
    /// The message number.
    pub number: u32,
    /// The resource.
    pub resource: &'static str,
    /// The flow.
    pub flow: String,
    /// The node.
    pub node: String,
    /// The text.
    pub message: String,
    /// Tags.
    pub tags: Map<String, Value>,
}

impl NewEntry {
    /// A new entry.
    pub fn new(
        severity: Severity,
        number: u32,
        resource: &'static str,
        flow: &str,
        node: &str,
        message: impl Into<String>,
    ) -> NewEntry {
        NewEntry {
            severity,
            number,
            resource,
            flow: flow.to_string(),
            node: node.to_string(),
            message: message.into(),
            tags: Map::new(),
        }
    }

    /// Adds a tag.
    pub fn tag(mut self, key: &str, value: impl Into<Value>) -> NewEntry {
        self.tags.insert(key.to_string(), value.into());
        self
    }
}

/// A query over the in-memory log.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only this node.
    pub node: Option<String>,
    /// At least this severity.
    pub severity: Option<Severity>,
    /// Only this number (`BIP12096`).
    pub number: Option<String>,
    /// Only entries with a larger sequence number.
    pub after_seq: Option<u64>,
    /// At most this many (the newest).
    pub limit: Option<usize>,
}

impl Filter {
    /// Whether an entry passes the filter.
    pub fn matches(&self, e: &Entry) -> bool {
        self.flow.as_ref().is_none_or(|f| *f == e.flow)
            && self.node.as_ref().is_none_or(|n| *n == e.node)
            && self.severity.is_none_or(|s| e.severity >= s)
            && self.number.as_ref().is_none_or(|n| *n == e.number)
            && self.after_seq.is_none_or(|s| e.seq > s)
    }
}

/// Limits per-message entries (received, published, errors) to a few per second per node; the rest
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

struct State {
    seq: u64,
    flows: HashMap<String, VecDeque<Arc<Entry>>>,
}

/// The daemon's activity log.
pub struct ActivityLog {
    state: Mutex<State>,
    capacity: usize,
    min_severity: Severity,
    live: broadcast::Sender<Arc<Entry>>,
}

impl ActivityLog {
    /// A log keeping `capacity` entries per flow and dropping entries below `min_severity`.
    pub fn new(capacity: usize, min_severity: Severity) -> ActivityLog {
        let (live, _) = broadcast::channel(1024);
        ActivityLog {
            state: Mutex::new(State {
                seq: 0,
                flows: HashMap::new(),
            }),
            capacity: capacity.max(1),
            min_severity,
            live,
        }
    }

    /// Records an entry (and writes the matching `tracing` line).
    pub fn record(&self, e: NewEntry) {
        if e.severity < self.min_severity {
            return;
        }
        match e.severity {
            Severity::Info => {
                tracing::info!(flow = %e.flow, node = %e.node, "BIP{} {}", e.number, e.message)
            }
            Severity::Warning => {
                tracing::warn!(flow = %e.flow, node = %e.node, "BIP{} {}", e.number, e.message)
            }
            Severity::Error => {
                tracing::error!(flow = %e.flow, node = %e.node, "BIP{} {}", e.number, e.message)
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.seq += 1;
        let entry = Arc::new(Entry {
            seq: st.seq,
            time: crate::time::now_rfc3339(),
            severity: e.severity,
            number: format!("BIP{}", e.number),
            resource: e.resource.to_string(),
            flow: e.flow,
            node: e.node,
            message: e.message,
            tags: e.tags,
        });
        let ring = st.flows.entry(entry.flow.clone()).or_default();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(entry.clone());
        drop(st);
        // No subscribers is fine.
        let _ = self.live.send(entry);
    }

    /// Entries matching the filter, oldest first.
    pub fn query(&self, f: &Filter) -> Vec<Arc<Entry>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<Entry>> = st
            .flows
            .iter()
            .filter(|(flow, _)| f.flow.as_ref().is_none_or(|x| x == *flow))
            .flat_map(|(_, ring)| ring.iter().filter(|e| f.matches(e)).cloned())
            .collect();
        out.sort_by_key(|e| e.seq);
        if let Some(limit) = f.limit {
            let skip = out.len().saturating_sub(limit);
            out.drain(..skip);
        }
        out
    }

    /// A live stream of new entries.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Entry>> {
        self.live.subscribe()
    }
}

impl Default for ActivityLog {
    fn default() -> Self {
        ActivityLog::new(1000, Severity::Info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_is_per_flow_and_filters_work() {
        let log = ActivityLog::new(2, Severity::Info);
        for i in 0..3 {
            log.record(NewEntry::new(
                Severity::Info,
                12065,
                "MQTT",
                "a",
                "n",
                format!("m{i}"),
            ));
        }
        log.record(
            NewEntry::new(Severity::Error, 12096, "MQTT", "b", "n", "down").tag("url", "tcp://x"),
        );
        let all = log.query(&Filter::default());
        assert_eq!(
            all.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["m1", "m2", "down"]
        );
        let errs = log.query(&Filter {
            severity: Some(Severity::Warning),
            ..Filter::default()
        });
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].number, "BIP12096");
        assert_eq!(errs[0].tags["url"], "tcp://x");
        let last = log.query(&Filter {
            flow: Some("a".into()),
            limit: Some(1),
            ..Filter::default()
        });
        assert_eq!(last[0].message, "m2");
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
    fn min_severity_drops_lower_entries() {
        let log = ActivityLog::new(10, Severity::Warning);
        log.record(NewEntry::new(Severity::Info, 1, "Flow", "a", "", "x"));
        assert!(log.query(&Filter::default()).is_empty());
    }
}
