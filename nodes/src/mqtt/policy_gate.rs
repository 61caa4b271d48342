//! The QoS policy of a server applied to one node's topics: decided, logged once per topic,
//! counted.

use super::{conn::Conn, log::bip};
use std::collections::BTreeSet;
use std::sync::Mutex;

use flowbus_runtime::activity::Severity;

use crate::qos_policy::{mismatch_head, mismatch_text, Decision, Policy, Source};
use flowbus_runtime::stats::inc;

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
