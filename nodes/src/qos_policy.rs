//! QoS policy alignment (the "Client requested: QoS 2, Gateway policy: QoS 1" problem): what
//! QoS a node may use on a topic, given what it asks for, the server's configured policy
//! (`max_qos`, per-topic `qos_rules`) and what the broker itself told us (MQTT v5 CONNACK
//! `Maximum QoS`, SUBACK granted QoS). Pure decisions, unit-tested; the MQTT nodes act on them.

use flowbus_runtime::config::{QosRule, ServerConfig};

/// What to do when a node asks for more than is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMismatch {
    /// An error that names node, topic, requested and allowed QoS, server and the fix.
    Fail,
    /// Use the allowed QoS, warn once per node and topic, count it.
    Downgrade,
}

/// Where a limit comes from (shown in messages, so the operator knows what to change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `max_qos` of the server in flowbus.toml.
    ServerPolicy(String),
    /// A `qos_rules` entry of the server.
    Rule(String),
    /// The broker's CONNACK (MQTT v5 `Maximum QoS`).
    Connack,
    /// The broker granted less in a SUBACK (our probe subscription, or the subscription).
    Suback,
}

impl Source {
    /// Words for messages.
    pub fn describe(&self) -> String {
        match self {
            Source::ServerPolicy(s) => format!("max_qos of [servers.{s}] in flowbus.toml"),
            Source::Rule(t) => format!("the QoS rule for '{t}'"),
            Source::Connack => "the broker's Maximum QoS (MQTT v5 CONNACK)".to_string(),
            Source::Suback => "the QoS the broker granted to a subscription".to_string(),
        }
    }

    /// What to change so that `requested` is allowed.
    pub fn raise(&self, requested: u8) -> String {
        match self {
            Source::ServerPolicy(s) => format!("raise max_qos of [servers.{s}] to {requested}"),
            Source::Rule(t) => format!("change the QoS rule for '{t}'"),
            Source::Connack | Source::Suback => format!(
                "allow QoS {requested} on the broker (mosquitto: max_qos {requested} on the listener; an IoT gateway: its maxQoS setting)"
            ),
        }
    }

    /// What an operator can change: the node, the limit, or the policy.
    pub fn fix(&self, requested: u8, allowed: u8) -> String {
        let policy = match self {
            Source::Connack | Source::Suback => {
                "or set on_qos_mismatch = \"downgrade\" on the server"
            }
            _ => "or set on_qos_mismatch = \"downgrade\"",
        };
        format!(
            "lower the node's qos to {allowed}, {}, {policy}",
            self.raise(requested)
        )
    }
}

/// A server's QoS policy plus what the broker has told us.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The server name (for messages), or the URL for inline servers.
    pub server: String,
    /// `max_qos` from the configuration.
    pub max_qos: Option<u8>,
    /// Per-topic rules, first match wins.
    pub rules: Vec<QosRule>,
    /// `on_qos_mismatch`.
    pub on_mismatch: OnMismatch,
}

/// The outcome for one (node, topic, requested QoS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Use this QoS. `rule` names the QoS rule that applied, if any.
    Use {
        /// The QoS to use.
        qos: u8,
        /// The rule that chose or capped it.
        rule: Option<String>,
    },
    /// Use a lower QoS than requested (policy `downgrade`).
    Downgrade {
        /// Asked for.
        requested: u8,
        /// Used.
        allowed: u8,
        /// What limits it.
        source: Source,
    },
    /// Refuse (policy `fail`).
    Fail {
        /// Asked for.
        requested: u8,
        /// The limit.
        allowed: u8,
        /// What limits it.
        source: Source,
    },
}

impl Policy {
    /// The policy of a configured server.
    pub fn from_server(name: &str, s: &ServerConfig) -> Policy {
        Policy {
            server: name.to_string(),
            max_qos: s.max_qos,
            rules: s.qos_rules.clone(),
            on_mismatch: if s.on_qos_mismatch.as_deref() == Some("downgrade") {
                OnMismatch::Downgrade
            } else {
                OnMismatch::Fail
            },
        }
    }

    /// No policy (an inline `url`): only what the broker says limits.
    pub fn open(url: &str) -> Policy {
        Policy {
            server: url.to_string(),
            max_qos: None,
            rules: Vec::new(),
            on_mismatch: OnMismatch::Fail,
        }
    }

    /// The first rule whose filter covers `topic` (a topic name, or a subscription filter
    /// that the rule's filter contains).
    pub fn rule_for(&self, topic: &str) -> Option<&QosRule> {
        self.rules.iter().find(|r| filter_covers(&r.topic, topic))
    }

    /// Decides the QoS for `topic`. `requested` is what the node (or a message override) asks
    /// for; `None` lets a matching rule choose (else 0). `broker` is the broker's limit and
    /// how we learnt it, when known.
    pub fn decide(
        &self,
        topic: &str,
        requested: Option<u8>,
        broker: Option<(u8, Source)>,
    ) -> Decision {
        let rule = self.rule_for(topic);
        let requested_qos = requested.or(rule.map(|r| r.qos)).unwrap_or(0);
        // The tightest limit wins; on a tie the configured one is named (it is what the
        // operator wrote).
        let mut limit: Option<(u8, Source)> = None;
        let mut tighten = |q: u8, s: Source| {
            if limit.as_ref().is_none_or(|(l, _)| q < *l) {
                limit = Some((q, s));
            }
        };
        if let Some(q) = self.max_qos {
            tighten(q, Source::ServerPolicy(self.server.clone()));
        }
        if let Some(r) = rule {
            tighten(r.qos, Source::Rule(r.topic.clone()));
        }
        if let Some((q, s)) = broker {
            tighten(q, s);
        }
        match limit {
            Some((allowed, source)) if requested_qos > allowed => match self.on_mismatch {
                OnMismatch::Fail => Decision::Fail {
                    requested: requested_qos,
                    allowed,
                    source,
                },
                OnMismatch::Downgrade => Decision::Downgrade {
                    requested: requested_qos,
                    allowed,
                    source,
                },
            },
            _ => Decision::Use {
                qos: requested_qos,
                rule: rule.map(|r| r.topic.clone()),
            },
        }
    }
}

/// Whether MQTT filter `filter` matches every topic that `topic` (a name or a filter) can
/// name: `telemetry/#` covers `telemetry/a/b` and `telemetry/+/x`; `a/+` covers `a/b` but not
/// `a/#`.
pub fn filter_covers(filter: &str, topic: &str) -> bool {
    let topic = topic
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/').map(|(_, t)| t))
        .unwrap_or(topic);
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(tl)) => {
                if tl == "#" {
                    return false;
                }
            }
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The problem statement in the words of the seed's error.
pub fn mismatch_head(
    node: &str,
    topic: &str,
    requested: u8,
    allowed: u8,
    server: &str,
    source: &Source,
) -> String {
    format!(
        "QoS policy mismatch on node '{node}', topic '{topic}': requested QoS {requested}, allowed QoS {allowed} on server {server} (limited by {})",
        source.describe()
    )
}

/// The problem statement with the fix (policy `fail`).
pub fn mismatch_text(
    node: &str,
    topic: &str,
    requested: u8,
    allowed: u8,
    server: &str,
    source: &Source,
) -> String {
    format!(
        "{}; fix: {}",
        mismatch_head(node, topic, requested, allowed, server, source),
        source.fix(requested, allowed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hybrid(on: OnMismatch) -> Policy {
        Policy {
            server: "gateway".into(),
            max_qos: Some(2),
            rules: vec![
                QosRule {
                    topic: "devices/+/provision".into(),
                    qos: 2,
                },
                QosRule {
                    topic: "telemetry/#".into(),
                    qos: 1,
                },
                QosRule {
                    topic: "diag/#".into(),
                    qos: 0,
                },
            ],
            on_mismatch: on,
        }
    }

    #[test]
    fn filters_cover_topics_and_narrower_filters() {
        assert!(filter_covers("telemetry/#", "telemetry/a/b"));
        assert!(filter_covers("telemetry/#", "telemetry/+/x"));
        assert!(filter_covers("devices/+/provision", "devices/d1/provision"));
        assert!(!filter_covers("devices/+/provision", "devices/d1/other"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(filter_covers("a/+", "$share/g/a/b"));
        assert!(filter_covers("#", "x"));
        assert!(!filter_covers("a/b", "a"));
    }

    #[test]
    fn rules_choose_and_cap_the_qos() {
        let p = hybrid(OnMismatch::Fail);
        assert_eq!(
            p.decide("devices/d1/provision", None, None),
            Decision::Use {
                qos: 2,
                rule: Some("devices/+/provision".into())
            }
        );
        assert_eq!(
            p.decide("telemetry/t", None, None),
            Decision::Use {
                qos: 1,
                rule: Some("telemetry/#".into())
            }
        );
        assert_eq!(
            p.decide("telemetry/t", Some(0), None),
            Decision::Use {
                qos: 0,
                rule: Some("telemetry/#".into())
            }
        );
        assert_eq!(
            p.decide("diag/x", Some(1), None),
            Decision::Fail {
                requested: 1,
                allowed: 0,
                source: Source::Rule("diag/#".into())
            }
        );
        assert_eq!(
            p.decide("other", None, None),
            Decision::Use { qos: 0, rule: None }
        );
    }

    #[test]
    fn the_broker_limit_applies_and_downgrade_uses_it() {
        let p = hybrid(OnMismatch::Downgrade);
        assert_eq!(
            p.decide("devices/d1/provision", None, Some((1, Source::Connack))),
            Decision::Downgrade {
                requested: 2,
                allowed: 1,
                source: Source::Connack
            }
        );
        let strict = Policy {
            max_qos: Some(1),
            ..hybrid(OnMismatch::Fail)
        };
        // The configured limit is named when it is as tight as the broker's.
        assert_eq!(
            strict.decide("devices/d1/provision", Some(2), Some((1, Source::Suback))),
            Decision::Fail {
                requested: 2,
                allowed: 1,
                source: Source::ServerPolicy("gateway".into())
            }
        );
    }

    #[test]
    fn the_message_names_everything_and_the_fix() {
        let t = mismatch_text(
            "provision",
            "devices/+/provision",
            2,
            1,
            "gateway",
            &Source::Connack,
        );
        assert_eq!(
            t,
            "QoS policy mismatch on node 'provision', topic 'devices/+/provision': requested QoS 2, allowed QoS 1 on server gateway (limited by the broker's Maximum QoS (MQTT v5 CONNACK)); fix: lower the node's qos to 1, allow QoS 2 on the broker (mosquitto: max_qos 2 on the listener; an IoT gateway: its maxQoS setting), or set on_qos_mismatch = \"downgrade\" on the server"
        );
    }
}
