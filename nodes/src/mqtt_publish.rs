//! `MQTTPublish`: publishes `Root.Body` and propagates to `Out` once the broker has
//! acknowledged it (QoS 1/2), with `LocalEnvironment.WrittenDestination.MQTT.{ClientId, Topic,
//! QoS, MessageId}`. Topic, QoS, retain and URL can be overridden per message by
//! `LocalEnvironment.Destination.MQTT.Output.{TopicName, qos, retained, URL}` (and
//! `UserProperties` on MQTT v5), read strictly: a value of the wrong type, an unknown key or a
//! value MQTT cannot carry is an exception, never a silent fallback to the node's own topic or
//! a corrupt packet. A node with `"overrides": false` ignores them (a dead-letter node must
//! not fail the way the message it catches did).
//!
//! The IIB contract: wait up to `ack_timeout` for the ack; if none, reconnect and retry once;
//! if still none, exception BIP12099 → `Failure` when connected, otherwise thrown back to the
//! input node. Publishing while disconnected waits for the connection within the same timeout
//! and then fails through the same path. QoS 1/2 use a persistent session with Paho file
//! persistence under the data directory, so publications in flight survive a reconnect or a
//! restart.
//!
//! Ordering: the enqueue (wait for the connection, hand the message to paho) happens under a
//! FIFO lock, so messages go out in the order they reach the node; only the ack wait overlaps.
//!
//! A connection made for a `URL` override lives while messages use it: it is closed when no
//! message has used it for `[mqtt] override_idle`, and at once when the last message using it
//! leaves and it is not connected, so a broker that one message named is not retried for
//! nobody.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flowbus_runtime::activity::Severity;
use flowbus_runtime::config::Config;
use flowbus_runtime::engine::{NodeHandle, Outputs};
use flowbus_runtime::flow::{did_you_mean, FlowErrorKind};
use flowbus_runtime::message::{Exception, ExceptionKind, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, PropKind, PropSpec, ValidateCtx,
};
use flowbus_runtime::services::Services;
use flowbus_runtime::stats::{add, inc};
use paho_mqtt as paho;
use rhai::Dynamic;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::mqtt::{
    bip, check_common, check_topic, client_id, instance_id, max_payload, normalise_url,
    resolve_endpoint, Backoff, Conn, ConnSpec, Endpoint, PolicyGate, Sampler, COMMON_PROPS,
    MAX_PAYLOAD_PROP,
};
use crate::mqtt_limits::{self, LimitError};
use crate::qos_policy::Decision;

static SPEC: NodeSpec = NodeSpec {
    type_name: "MQTTPublish",
    inputs: &["In"],
    outputs: &["Out", "Failure"],
    props: &[
        COMMON_PROPS[0],
        COMMON_PROPS[1],
        COMMON_PROPS[2],
        COMMON_PROPS[3],
        COMMON_PROPS[4],
        COMMON_PROPS[5],
        PropSpec::opt("topic", PropKind::Str),
        PropSpec::opt("retain", PropKind::Bool),
        PropSpec::opt("ack_timeout", PropKind::Duration),
        MAX_PAYLOAD_PROP,
        PropSpec::opt("overrides", PropKind::Bool),
        PropSpec::opt("allow_dollar_topics", PropKind::Bool),
    ],
};

/// The MQTTPublish node kind.
pub struct PublishKind;

impl NodeKind for PublishKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn check(&self, node: &NodeDecl, ctx: &ValidateCtx) -> Vec<Problem> {
        let mut p = check_common(node, ctx);
        let bad = |property: &str, message: String| {
            Problem::at(
                property,
                FlowErrorKind::BadValue {
                    property: property.into(),
                    message,
                },
            )
        };
        match node.str("topic") {
            Some(t) => {
                let allow_dollar = node.bool("allow_dollar_topics").unwrap_or(false);
                if let Err(m) = check_topic(t, false).and_then(|()| {
                    mqtt_limits::check_dollar("topic", t, allow_dollar).map_err(|e| e.to_string())
                }) {
                    p.push(bad("topic", m));
                }
            }
            // Nothing else can name a topic then.
            None if node.bool("overrides") == Some(false) => p.push(bad(
                "overrides",
                "a node with \"overrides\": false publishes to its own \"topic\" only, so it needs one".into(),
            )),
            None => {}
        }
        if node.duration("ack_timeout").is_some_and(|d| d.is_zero()) {
            p.push(bad("ack_timeout", "must be longer than zero".into()));
        }
        p
    }

    fn build(&self, node: &NodeDecl, ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        let endpoint = resolve_endpoint(node, &ctx.config)?;
        let qos = node.int("qos").map(|q| q as u8);
        let endpoint_policy = endpoint.policy.clone();
        let (closer, closing) = mpsc::unbounded_channel();
        Ok(BuiltNode::Processing(Arc::new(Publish {
            endpoint,
            topic: node.str("topic").map(str::to_string),
            qos,
            retain: node.bool("retain").unwrap_or(false),
            ack_timeout: node
                .duration("ack_timeout")
                .unwrap_or(ctx.config.mqtt.ack_timeout.0),
            // Persistent unless the node publishes at QoS 0 only (a rule or an override may
            // still ask for more, so only an explicit qos 0 makes the session clean).
            clean_session: node.bool("clean_session").unwrap_or(qos == Some(0)),
            client_id: node.str("client_id").map(str::to_string),
            max_payload: max_payload(node, &ctx.config),
            overrides: node.bool("overrides").unwrap_or(true),
            allow_dollar: node.bool("allow_dollar_topics").unwrap_or(false),
            override_idle: ctx.config.mqtt.override_idle.0,
            config: ctx.config.clone(),
            services: ctx.services.clone(),
            flow: ctx.flow.clone(),
            node: node.id.clone(),
            conns: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
            closer,
            closing: Mutex::new(Some(closing)),
            gate: tokio::sync::Mutex::new(()),
            sampler: Sampler::new(10),
            seq: AtomicU64::new(0),
            policy: PolicyGate::new(endpoint_policy),
            flow_handle: OnceLock::new(),
            clients: Mutex::default(),
        })))
    }
}

struct Publish {
    endpoint: Endpoint,
    topic: Option<String>,
    qos: Option<u8>,
    retain: bool,
    ack_timeout: Duration,
    clean_session: bool,
    client_id: Option<String>,
    /// The largest payload this node publishes.
    max_payload: usize,
    /// Whether `LocalEnvironment.Destination.MQTT.Output` is read at all.
    overrides: bool,
    /// Whether topics starting with `$` may be published to.
    allow_dollar: bool,
    /// How long a connection made for a URL override stays open without a message for it.
    override_idle: Duration,
    config: Arc<Config>,
    services: Arc<Services>,
    flow: String,
    node: String,
    /// Connections by URL: the node's own, and those made for URL overrides.
    conns: Mutex<HashMap<String, Slot>>,
    /// Held while a connection is opened or an override's connection closed, so a connection
    /// for a URL is never opened while the last one for it (same client id, same in-flight
    /// log) is still being closed.
    opening: tokio::sync::Mutex<()>,
    /// URLs whose override connection the last message using it left while it was not
    /// connected: closed at once by the node's housekeeping task.
    closer: mpsc::UnboundedSender<String>,
    closing: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    gate: tokio::sync::Mutex<()>,
    sampler: Sampler,
    seq: AtomicU64,
    policy: PolicyGate,
    /// Set when the flow starts: a connection that gives up for good fails the flow.
    flow_handle: OnceLock<NodeHandle>,
    /// Every client the node has made (its own, and one per `URL` override), by client id:
    /// what removing the flow must end.
    clients: Mutex<BTreeMap<String, Endpoint>>,
}

/// One connection of the node and, for one made for a URL override, who uses it.
struct Slot {
    conn: Arc<Conn>,
    /// Messages publishing through it now (override connections only).
    users: usize,
    /// When a message last used it.
    last_used: Instant,
}

/// A message's use of an override connection: while it lives the connection is not closed.
struct InUse<'a> {
    node: &'a Publish,
    url: String,
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        let mut conns = self.node.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = conns.get_mut(&self.url) {
            slot.users = slot.users.saturating_sub(1);
            slot.last_used = Instant::now();
            // Connecting (or reconnecting) is only worth it while a message waits.
            if slot.users == 0 && !slot.conn.is_connected() {
                let _ = self.node.closer.send(self.url.clone());
            }
        }
    }
}

/// Why an override connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// No message used it for `override_idle`.
    Idle,
    /// Not connected, and no message waits for it.
    Unwanted,
}

/// Whether an override connection should be closed now, and why (a pure decision: the
/// housekeeping task asks it once a second and when the last message leaves).
fn close_reason(
    users: usize,
    connected: bool,
    idle_for: Duration,
    idle_limit: Duration,
) -> Option<Close> {
    match (users, connected) {
        (0, false) => Some(Close::Unwanted),
        (0, true) if idle_for >= idle_limit => Some(Close::Idle),
        _ => None,
    }
}

/// Where and how one message is published, after overrides.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    topic: String,
    /// Requested by an override or the node; `None` lets a QoS rule choose.
    qos: Option<u8>,
    retained: bool,
    url: String,
    user_properties: Vec<(String, String)>,
}

/// Where the overrides live, for messages.
const OUTPUT: &str = "LocalEnvironment.Destination.MQTT.Output";
/// The topic override's full name (a constant: it is named for every message that carries one,
/// and formatting it each time cost more than reading the override).
const TOPIC_NAME: &str = "LocalEnvironment.Destination.MQTT.Output.TopicName";
/// The user properties' full name.
const USER_PROPERTIES: &str = "LocalEnvironment.Destination.MQTT.Output.UserProperties";

/// The overrides MQTTPublish takes, in the spelling it takes them (case matters).
const OVERRIDE_KEYS: [&str; 5] = ["TopicName", "qos", "retained", "URL", "UserProperties"];

/// Names IIB's MQTTPublish also read, which flowbus refuses with a pointer to its one
/// spelling (two spellings of one field would need rules for when both are set).
const IIB_NAMES: [(&str, &str); 4] = [
    ("topicName", "TopicName"),
    ("qualityOfService", "qos"),
    ("QualityOfService", "qos"),
    ("connectionUrl", "URL"),
];

/// The overrides one message carries.
#[derive(Debug, Default, Clone, PartialEq)]
struct Overrides {
    topic: Option<String>,
    qos: Option<u8>,
    retained: Option<bool>,
    url: Option<String>,
    user_properties: Option<Vec<(String, String)>>,
}

/// What is wrong with a message's overrides. Each names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum OverrideError {
    /// `Destination`, `Destination.MQTT` or `Destination.MQTT.Output` is not a map.
    #[error("LocalEnvironment.{path} must be a map (an object) when it is set, found {found}")]
    NotAMap {
        /// The path below `LocalEnvironment`.
        path: &'static str,
        /// What it holds.
        found: String,
    },
    /// A key MQTTPublish does not know.
    #[error("LocalEnvironment.Destination.MQTT.Output.{key} is not an MQTTPublish override{hint}; the overrides are TopicName, qos, retained, URL and UserProperties")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// ` (did you mean 'X'?)`, or empty.
        hint: String,
    },
    /// A value of the wrong type.
    #[error("LocalEnvironment.Destination.MQTT.Output.{field} must be {expected}, found {found}")]
    WrongType {
        /// The field below `Output`.
        field: String,
        /// What it must be.
        expected: &'static str,
        /// What it holds.
        found: String,
    },
    /// A value of the right type that is not usable.
    #[error("LocalEnvironment.Destination.MQTT.Output.{field}: {message}")]
    BadValue {
        /// The field below `Output`.
        field: String,
        /// Why.
        message: String,
    },
    /// A value MQTT cannot carry, or a topic the node may not publish to.
    #[error(transparent)]
    Limit(#[from] LimitError),
}

impl OverrideError {
    /// The field the error is about, as the exception's first insert.
    fn field(&self) -> String {
        match self {
            OverrideError::NotAMap { path, .. } => format!("LocalEnvironment.{path}"),
            OverrideError::UnknownKey { key, .. } => format!("{OUTPUT}.{}", short(key)),
            OverrideError::WrongType { field, .. } | OverrideError::BadValue { field, .. } => {
                format!("{OUTPUT}.{field}")
            }
            OverrideError::Limit(
                LimitError::TooLong { field, .. }
                | LimitError::Nul { field, .. }
                | LimitError::DollarTopic { field, .. }
                | LimitError::PayloadTooLarge { field, .. },
            ) => field.clone(),
            OverrideError::Limit(LimitError::PacketTooLarge { .. }) => OUTPUT.to_string(),
        }
    }

    /// The exception (BIP4311) routed to `Failure`, with the field as its first insert.
    fn exception(&self) -> Exception {
        Exception::new(
            ExceptionKind::Recoverable,
            bip::PUBLISH_ERROR,
            self.to_string(),
        )
        .insert(self.field())
    }
}

/// A key as it may appear in a message: whole when short, else its beginning.
fn short(key: &str) -> String {
    if key.len() <= 64 {
        key.to_string()
    } else {
        mqtt_limits::preview(key)
    }
}

/// A Rhai value in words, for messages (bounded: a string is shown only in part).
fn describe(d: &Dynamic) -> String {
    if let Some(s) = d.read_lock::<rhai::ImmutableString>() {
        return format!("the string {}", mqtt_limits::preview(&s));
    }
    if let Ok(i) = d.as_int() {
        return format!("the integer {i}");
    }
    if let Ok(f) = d.as_float() {
        return format!("the number {f}");
    }
    if let Ok(b) = d.as_bool() {
        return format!("{b}");
    }
    if d.is_unit() {
        return "()".into();
    }
    if d.is_map() {
        return "a map".into();
    }
    if d.is_array() {
        return "an array".into();
    }
    format!("a value of type {}", d.type_name())
}

/// The string in `v`, or the error for `field`.
fn string_of(v: &Dynamic, field: &str, expected: &'static str) -> Result<String, OverrideError> {
    match v.read_lock::<rhai::ImmutableString>() {
        Some(s) => Ok(s.to_string()),
        None => Err(OverrideError::WrongType {
            field: field.into(),
            expected,
            found: describe(v),
        }),
    }
}

/// Reads the overrides under `LocalEnvironment.Destination` (given here), strictly: every
/// level must be a map when it is set; `()` anywhere means "not set".
fn read_overrides(
    destination: Option<&Dynamic>,
    allow_dollar: bool,
) -> Result<Overrides, OverrideError> {
    let Some(d) = destination.filter(|d| !d.is_unit()) else {
        return Ok(Overrides::default());
    };
    let Some(d) = d.read_lock::<rhai::Map>() else {
        return Err(OverrideError::NotAMap {
            path: "Destination",
            found: describe(d),
        });
    };
    let Some(mqtt) = d.get("MQTT").filter(|m| !m.is_unit()) else {
        return Ok(Overrides::default());
    };
    let Some(mqtt_map) = mqtt.read_lock::<rhai::Map>() else {
        return Err(OverrideError::NotAMap {
            path: "Destination.MQTT",
            found: describe(mqtt),
        });
    };
    let Some(output) = mqtt_map.get("Output").filter(|o| !o.is_unit()) else {
        return Ok(Overrides::default());
    };
    let Some(output_map) = output.read_lock::<rhai::Map>() else {
        return Err(OverrideError::NotAMap {
            path: "Destination.MQTT.Output",
            found: describe(output),
        });
    };
    parse_overrides(&output_map, allow_dollar)
}

/// The overrides in an `Output` map. This runs for every message that carries overrides, so
/// it reads each value in place and copies only what it keeps.
fn parse_overrides(o: &rhai::Map, allow_dollar: bool) -> Result<Overrides, OverrideError> {
    let mut out = Overrides::default();
    for (key, v) in o {
        let key = key.as_str();
        if !OVERRIDE_KEYS.contains(&key) {
            let hint = match IIB_NAMES.iter().find(|(iib, _)| *iib == key) {
                Some((_, ours)) => format!(
                    " (did you mean '{ours}'? IIB also read '{key}'; flowbus takes only '{ours}')"
                ),
                None => did_you_mean(key, OVERRIDE_KEYS),
            };
            return Err(OverrideError::UnknownKey {
                key: key.to_string(),
                hint,
            });
        }
        if v.is_unit() {
            continue;
        }
        match key {
            "TopicName" => {
                let t = string_of(v, "TopicName", "a string (a topic name)")?;
                check_topic(&t, false).map_err(|message| OverrideError::BadValue {
                    field: "TopicName".into(),
                    message,
                })?;
                mqtt_limits::check_dollar(TOPIC_NAME, &t, allow_dollar)?;
                out.topic = Some(t);
            }
            "qos" => {
                out.qos = Some(match v.as_int() {
                    Ok(q @ 0..=2) => q as u8,
                    Ok(q) => {
                        return Err(OverrideError::BadValue {
                            field: "qos".into(),
                            message: format!("must be 0, 1 or 2, found {q}"),
                        })
                    }
                    Err(_) => {
                        return Err(OverrideError::WrongType {
                            field: "qos".into(),
                            expected: "the integer 0, 1 or 2",
                            found: describe(v),
                        })
                    }
                });
            }
            "retained" => {
                out.retained = Some(v.as_bool().map_err(|_| OverrideError::WrongType {
                    field: "retained".into(),
                    expected: "true or false",
                    found: describe(v),
                })?);
            }
            "URL" => {
                let u = string_of(v, "URL", "a string (tcp://host:port or ssl://host:port)")?;
                out.url = Some(
                    normalise_url(&u).map_err(|message| OverrideError::BadValue {
                        field: "URL".into(),
                        message,
                    })?,
                );
            }
            "UserProperties" => {
                let Some(m) = v.read_lock::<rhai::Map>() else {
                    return Err(OverrideError::WrongType {
                        field: "UserProperties".into(),
                        expected: "a map of strings",
                        found: describe(v),
                    });
                };
                let mut props = Vec::with_capacity(m.len());
                for (k, pv) in m.iter() {
                    let value = string_of(
                        pv,
                        &format!("UserProperties.{}", short(k)),
                        "a string (user property values are strings)",
                    )?;
                    props.push((k.to_string(), value));
                }
                mqtt_limits::check_user_properties(USER_PROPERTIES, &props)?;
                out.user_properties = Some(props);
            }
            // Every known key has its arm above.
            _ => {}
        }
    }
    Ok(out)
}

fn no_topic() -> Exception {
    Exception::new(
        ExceptionKind::Recoverable,
        bip::PUBLISH_ERROR,
        format!("no topic: set the node's \"topic\" or {TOPIC_NAME}"),
    )
    .insert(TOPIC_NAME)
}

/// A payload over the limit (or a packet MQTT cannot carry): BIP12119, never retried.
fn too_large(e: &LimitError) -> Exception {
    let mut x = Exception::new(
        ExceptionKind::Recoverable,
        bip::PAYLOAD_TOO_LARGE,
        e.to_string(),
    );
    match e {
        LimitError::PayloadTooLarge { len, max, .. } => {
            x = x.insert(len.to_string()).insert(max.to_string());
        }
        LimitError::PacketTooLarge { len } => x = x.insert(len.to_string()),
        _ => {}
    }
    x
}

impl Publish {
    /// Applies `LocalEnvironment.Destination.MQTT.Output` (unless the node ignores overrides)
    /// to the node's properties.
    fn target(&self, msg: &Message) -> Result<Target, Exception> {
        let o = if self.overrides {
            // Read in place; only the fields present are copied out.
            msg.with_local(&["Destination"], |d| read_overrides(d, self.allow_dollar))
                .map_err(|e| e.exception())?
        } else {
            Overrides::default()
        };
        self.resolve(o)
    }

    /// The node's properties with `o` applied.
    fn resolve(&self, o: Overrides) -> Result<Target, Exception> {
        let topic = match o.topic {
            Some(t) => t,
            None => self.topic.clone().ok_or_else(no_topic)?,
        };
        Ok(Target {
            topic,
            qos: o.qos.or(self.qos),
            retained: o.retained.unwrap_or(self.retain),
            url: o.url.unwrap_or_else(|| self.endpoint.url.clone()),
            user_properties: o.user_properties.unwrap_or_default(),
        })
    }

    /// The payload against `max_payload`, and the whole packet against what MQTT can carry
    /// (counted at QoS 2 and with the user properties: the most it can take).
    fn check_size(&self, t: &Target, payload: &[u8]) -> Result<(), Exception> {
        mqtt_limits::check_payload("Root.Body (serialised)", payload.len(), self.max_payload)
            .and_then(|()| {
                mqtt_limits::check_packet(&t.topic, 2, Some(&t.user_properties), payload.len())
            })
            .map_err(|e| too_large(&e))
    }

    /// The QoS a publication to `t` goes out at as far as it is known now: what the node or
    /// the message asks for, else the rule's, within the policy and the broker's limit as
    /// learnt so far. Log entries and exceptions show it rather than "by rule".
    fn planned_qos(&self, conn: &Conn, t: &Target) -> u8 {
        match self
            .policy
            .policy()
            .decide(&t.topic, t.qos, conn.broker_limit())
        {
            Decision::Use { qos, .. } => qos,
            Decision::Downgrade { allowed, .. } => allowed,
            Decision::Fail { requested, .. } => requested,
        }
    }

    /// The connection for `url`: the node's own (no [`InUse`]), or the one made for an
    /// override, counted as used until the returned [`InUse`] is dropped.
    async fn conn_for(&self, url: &str) -> Result<(Arc<Conn>, Option<InUse<'_>>), Exception> {
        if let Some(found) = self.use_conn(url) {
            return Ok(found);
        }
        // Not open: one being closed for this URL finishes first (it has the same client id
        // and in-flight log).
        let _opening = self.opening.lock().await;
        if let Some(found) = self.use_conn(url) {
            return Ok(found);
        }
        let conn = self.open(url)?;
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            url.to_string(),
            Slot {
                conn,
                users: 0,
                last_used: Instant::now(),
            },
        );
        self.use_conn(url).ok_or_else(|| {
            Exception::new(
                ExceptionKind::Socket,
                bip::PUBLISH_ERROR,
                format!("the connection to {url} was closed as it was opened"),
            )
        })
    }

    /// An open connection for `url`, counted as used when it is an override's.
    fn use_conn(&self, url: &str) -> Option<(Arc<Conn>, Option<InUse<'_>>)> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let slot = conns.get_mut(url)?;
        if url == self.endpoint.url {
            return Some((slot.conn.clone(), None));
        }
        slot.users += 1;
        slot.last_used = Instant::now();
        Some((
            slot.conn.clone(),
            Some(InUse {
                node: self,
                url: url.to_string(),
            }),
        ))
    }

    /// Closes the override connection for `url` if [`close_reason`] says so (its users and
    /// state are looked at again here, under the lock that opening takes).
    async fn close_override(&self, url: &str) {
        let _opening = self.opening.lock().await;
        let (conn, why) = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let why = conns.get(url).and_then(|s| {
                close_reason(
                    s.users,
                    s.conn.is_connected(),
                    s.last_used.elapsed(),
                    self.override_idle,
                )
            });
            match why {
                Some(why) if url != self.endpoint.url => match conns.remove(url) {
                    Some(s) => (s.conn, why),
                    None => return,
                },
                _ => return,
            }
        };
        let log = &conn.log;
        let text = match why {
            Close::Idle => format!(
                "Closing the connection to {url} that a URL override opened: no message for it in {}",
                flowbus_runtime::time::human(self.override_idle)
            ),
            Close::Unwanted => format!(
                "Closing the connection to {url} that a URL override opened: it is not connected and no message waits for it, so it is not retried (the next message for {url} connects again)"
            ),
        };
        log.record(log.entry(Severity::Info, bip::DISCONNECTED, text));
        conn.shutdown(self.ack_timeout.min(Duration::from_secs(10)))
            .await;
        // The last reference once the supervisor has ended: the client is retired (destroyed
        // off Paho's thread, `CLOSED_CLIENTS`) and its in-flight log released before the
        // opening lock lets another connection for this URL be made.
        drop(conn);
    }

    /// The override connections that should be closed now (a look once a second).
    fn idle_overrides(&self) -> Vec<String> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .iter()
            .filter(|(url, s)| {
                *url != &self.endpoint.url
                    && close_reason(
                        s.users,
                        s.conn.is_connected(),
                        s.last_used.elapsed(),
                        self.override_idle,
                    )
                    .is_some()
            })
            .map(|(url, _)| url.clone())
            .collect()
    }

    /// Creates the connection for a URL (the node's own, or one for an override) and starts
    /// its supervisor.
    fn open(&self, url: &str) -> Result<Arc<Conn>, Exception> {
        let own = url == self.endpoint.url;
        let endpoint = if own {
            self.endpoint.clone()
        } else {
            self.endpoint.elsewhere(url)
        };
        let base = match &self.client_id {
            Some(id) => id.clone(),
            None => client_id(
                &instance_id(&self.config.data_dir),
                &self.flow,
                &self.node,
                None,
            ),
        };
        let cid = if own {
            base
        } else {
            override_client_id(&base, url)
        };
        // Paho keeps publications in flight in memory anyway; file persistence makes them
        // survive a restart too.
        let persist_dir = (!self.clean_session && endpoint.file_persistence)
            .then(|| self.config.data_dir.join("mqtt").join(&cid));
        if let (false, Some(dir)) = (own, &persist_dir) {
            // So that removing the flow after a restart can still end this client's session
            // (its id alone does not say where it connects).
            remember_override_url(dir, url);
        }
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cid.clone(), endpoint.clone());
        let conn = Conn::new(ConnSpec {
            endpoint: &endpoint,
            client_id: cid,
            persistent_session: !self.clean_session,
            persist_dir,
            connect_timeout: self.ack_timeout,
            backoff: Backoff::from_config(&self.config),
            services: self.services.clone(),
            flow: &self.flow,
            node: &self.node,
        })
        .map_err(|m| Exception::new(ExceptionKind::Socket, bip::PUBLISH_ERROR, m))?;
        // MQTT 3.1.1 has no CONNACK property for the broker's QoS limit: probe it on each
        // connect, before the node publishes, so a publish above it is caught here instead of
        // getting the connection dropped by the broker (mosquitto's max_qos).
        let weak = Arc::downgrade(&conn);
        conn.spawn(Box::new(move |_| {
            let weak = weak.clone();
            Box::pin(async move {
                if let Some(c) = weak.upgrade() {
                    if !c.v5 {
                        c.probe_qos().await;
                    }
                }
            })
        }));
        // A connection whose persistence failed never publishes again: the flow fails
        // (shown `failed` with the reason) instead of staying `running`.
        if let Some(flow) = self.flow_handle.get().cloned() {
            let fatal = conn.fatal();
            tokio::spawn(async move { flow.fail_flow(fatal.await) });
        }
        Ok(conn)
    }

    fn paho_message(&self, t: &Target, qos: u8, payload: &[u8], v5: bool) -> paho::Message {
        let mut b = paho::MessageBuilder::new()
            .topic(t.topic.as_str())
            .payload(payload)
            .qos(i32::from(qos))
            .retained(t.retained);
        if v5 && !t.user_properties.is_empty() {
            let mut props = paho::Properties::new();
            for (k, v) in &t.user_properties {
                // Checked as MQTT strings (no NUL, at most 65,535 bytes) when the override
                // was read, so paho has nothing to refuse here.
                let _ = props.push_string_pair(paho::PropertyCode::UserProperty, k, v);
            }
            b = b.properties(props);
        }
        b.finalize()
    }

    /// One attempt: under the FIFO gate, wait for the connection, apply the QoS policy (the
    /// broker's limit is known once connected) and hand the message to paho; then wait for
    /// the ack (QoS 1/2) or the write (QoS 0) outside the gate. Returns the QoS used.
    async fn attempt(&self, conn: &Arc<Conn>, t: &Target, payload: &[u8]) -> Result<u8, Attempt> {
        let (qos, _permit, token) = {
            let _turn = self.gate.lock().await;
            if !conn.wait_connected(self.ack_timeout).await {
                return Err(Attempt::Failed(format!(
                    "not connected to {} within {}",
                    conn.log.url,
                    flowbus_runtime::time::human(self.ack_timeout)
                )));
            }
            let qos = self
                .policy
                .apply(conn, &t.topic, t.qos)
                .map_err(Attempt::Policy)?;
            // Paho fails a publish over the client's in-flight limit instead of waiting, so the
            // node waits for a permit — inside the gate, which keeps the order of those behind.
            let permit = if qos > 0 {
                conn.inflight.clone().acquire_owned().await.ok()
            } else {
                None
            };
            // Queued for paho in order (the connection's outbox batches hand-overs).
            let token = conn.send(self.paho_message(t, qos, payload, conn.v5), qos > 0);
            (qos, permit, token)
        };
        let Some(token) = token else {
            // QoS 0: no acknowledgement is awaited (IIB). The outbox hands the message to
            // paho, which writes it in order; waiting for the write would only cost a thread
            // hand-off per message.
            return Ok(0);
        };
        let acked = async {
            match token.await {
                Ok(t) => t.await.map_err(|e| match e {
                    // Paho fails what it has in flight this way when it drops its session
                    // state: on a reconnect the broker answered with no session (then the
                    // connection is up again), or when the client closes.
                    paho::Error::OperationIncomplete => Attempt::SessionLost(format!(
                        "the MQTT client dropped the publication: the broker at {} had no session for it when it reconnected (or the client was closing)",
                        conn.log.url
                    )),
                    e => Attempt::Failed(format!("publish failed: {e}")),
                }),
                Err(_) => Err(Attempt::Failed(
                    "the connection was closed before the publication reached it".into(),
                )),
            }
        };
        match tokio::time::timeout(self.ack_timeout, acked).await {
            Ok(Ok(())) => Ok(qos),
            Ok(Err(why)) => Err(why),
            Err(_) => Err(Attempt::Failed(format!(
                "no acknowledgement within {}",
                flowbus_runtime::time::human(self.ack_timeout)
            ))),
        }
    }

    /// Publishes with the IIB contract: one retry after a reconnect, then BIP12099.
    async fn publish(&self, conn: &Arc<Conn>, t: &Target, payload: &[u8]) -> Result<u8, Exception> {
        let log = &conn.log;
        let (first, reconnect) = match self.attempt(conn, t, payload).await {
            Ok(q) => return Ok(q),
            Err(Attempt::Policy(text)) => return Err(policy_exception(text)),
            Err(Attempt::Failed(why)) => (why, true),
            // Connected again already: retry on this connection.
            Err(Attempt::SessionLost(why)) => (why, false),
        };
        // The QoS as far as it is known (a rule's, within the policy and the broker's limit):
        // what an operator reading the entry needs, not how it was chosen.
        let qos = self.planned_qos(conn, t);
        log.record(
            log.entry(
                Severity::Warning,
                bip::PUBLISH_ERROR,
                format!(
                    "Publish to '{}' (QoS {qos}) failed: {first}; {}retrying once",
                    t.topic,
                    if reconnect { "reconnecting and " } else { "" }
                ),
            )
            .tag("topic", t.topic.clone())
            .tag("qos", qos),
        );
        if reconnect {
            conn.request_reconnect();
        }
        let second = match self.attempt(conn, t, payload).await {
            Ok(q) => return Ok(q),
            Err(Attempt::Policy(text)) => return Err(policy_exception(text)),
            Err(Attempt::Failed(why) | Attempt::SessionLost(why)) => why,
        };
        let qos = self.planned_qos(conn, t);
        log.record(
            log.entry(
                Severity::Error,
                bip::NOT_ACKNOWLEDGED,
                format!(
                    "Publish to '{}' (QoS {qos}) failed after the retry: {second}",
                    t.topic
                ),
            )
            .tag("topic", t.topic.clone())
            .tag("qos", qos),
        );
        Err(Exception::new(
            ExceptionKind::SocketTimeout,
            bip::NOT_ACKNOWLEDGED,
            format!(
                "the publication to '{}' at QoS {qos} on {} was not acknowledged: first attempt: {first}; retry: {second}",
                t.topic, t.url
            ),
        )
        .insert(t.topic.clone())
        .insert(qos.to_string())
        .insert(t.url.clone()))
    }
}

/// The client id of the connection a node makes for a URL override: the node's id and a
/// digest of the URL. The same URL gets the same id every time, so a connection closed when
/// idle and opened again resumes its session and in-flight log, and two URLs never share one
/// (numbering them in order of first use gave a reopened URL the id of another).
fn override_client_id(base: &str, url: &str) -> String {
    // FNV-1a: stable across restarts and builds, unlike the std hasher.
    let digest = url.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{base}-{digest:08x}")
}

/// The file in an override client's directory that holds the URL it connects to.
const OVERRIDE_URL_FILE: &str = "override-url";

/// Writes an override client's URL into its directory (private, as everything there); a
/// failure costs only the clean-up at removal, so it is not an error of the message.
fn remember_override_url(dir: &std::path::Path, url: &str) {
    use std::io::Write;
    let file = dir.join(OVERRIDE_URL_FILE);
    if std::fs::read_to_string(&file).is_ok_and(|u| u == url) {
        return;
    }
    let written = flowbus_runtime::datadir::create_private_dir_all(dir).and_then(|()| {
        flowbus_runtime::datadir::private_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&file)?
            .write_all(url.as_bytes())
    });
    if let Err(e) = written {
        tracing::warn!(
            "could not record the URL of override client directory {}: {e}",
            dir.display()
        );
    }
}

/// The override clients of a node (ids `<base>-<8 hex digits>`) that have a directory under
/// `mqtt_dir` with their URL: (client id, URL).
fn earlier_override_clients(mqtt_dir: &std::path::Path, base: &str) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(mqtt_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let digest = name.strip_prefix(base)?.strip_prefix('-')?;
            if digest.len() != 8 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let url = std::fs::read_to_string(e.path().join(OVERRIDE_URL_FILE)).ok()?;
            (override_client_id(base, &url) == name).then_some((name, url))
        })
        .collect()
}

/// Why an attempt did not succeed.
enum Attempt {
    /// The QoS policy refused the publish (never retried: it would fail the same way).
    Policy(String),
    /// Not connected, not acknowledged, or an error from paho.
    Failed(String),
    /// The client dropped the publication with its session state (the broker had lost the
    /// session on a reconnect): the connection is up again, so no reconnect is asked for.
    SessionLost(String),
}

fn policy_exception(text: String) -> Exception {
    Exception::new(ExceptionKind::Configuration, bip::QOS_MISMATCH, text)
}

impl ProcessingNode for Publish {
    fn process<'a>(
        &'a self,
        mut msg: Message,
        out: Outputs<'a>,
    ) -> BoxFut<'a, Result<(), NodeFailure>> {
        Box::pin(async move {
            let t = self.target(&msg)?;
            let payload = msg.root.body.to_bytes();
            self.check_size(&t, &payload)?;
            // `_in_use` keeps an override's connection open while this message needs it.
            let (conn, _in_use) = self.conn_for(&t.url).await?;
            let qos = self.publish(&conn, &t, &payload).await?;
            let log = &conn.log;
            if qos > 0 {
                // QoS 0 is counted when the outbox hands it to the client (`Outbox`).
                inc(&log.stats.messages_sent);
                add(&log.stats.bytes_sent, payload.len() as u64);
            }
            let (admit, summary) = self.sampler.admit();
            if let Some(n) = summary {
                published_summary(log, n);
            }
            if admit {
                let mut e = log
                    .entry(
                        Severity::Info,
                        bip::PUBLISHED,
                        format!(
                            "Published to '{}' (QoS {qos}, {} bytes)",
                            t.topic,
                            payload.len()
                        ),
                    )
                    .tag("topic", t.topic.clone())
                    .tag("qos", qos);
                if let Some(rule) = self.policy.policy().rule_for(&t.topic) {
                    e = e.tag("rule", rule.topic.clone());
                }
                log.record(e);
            }
            let id = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            if !out.is_connected("Out") {
                // Nothing reads WrittenDestination on an unconnected terminal: skip building it
                // (and the copy of LocalEnvironment that setting it would make).
                out.propagate("Out", msg).await?;
                return Ok(());
            }
            let mut w = serde_json::Map::new();
            w.insert("ClientId".into(), Value::from(log.client_id.clone()));
            w.insert("Topic".into(), Value::from(t.topic));
            w.insert("QoS".into(), Value::from(qos));
            w.insert("Retained".into(), Value::from(t.retained));
            w.insert("URL".into(), Value::from(t.url));
            w.insert("MessageId".into(), Value::from(id));
            msg.set_local(&["WrittenDestination", "MQTT"], Value::Object(w));
            out.propagate("Out", msg).await?;
            Ok(())
        })
    }

    fn start(self: Arc<Self>, flow: NodeHandle) {
        let _ = self.flow_handle.set(flow.clone());
        // Housekeeping, until the node is dropped: summaries of sampled "Published" entries are
        // due once a second, even when no further message comes to trigger one; override
        // connections are closed when idle (looked at once a second) or when the last message
        // using one left while it was not connected (told through `closing`, at once).
        let weak = Arc::downgrade(&self);
        let mut closing = self
            .closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let told = tokio::select! {
                    _ = tick.tick() => None,
                    url = async {
                        match closing.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    } => match url {
                        Some(url) => Some(url),
                        // The node is gone.
                        None => break,
                    },
                };
                let Some(node) = weak.upgrade() else { break };
                match told {
                    Some(url) => node.close_override(&url).await,
                    None => {
                        if let Some(n) = node.sampler.overdue() {
                            node.summarise(n);
                        }
                        for url in node.idle_overrides() {
                            node.close_override(&url).await;
                        }
                    }
                }
            }
        });
        // Connect now, so the first message does not wait for it. A node whose client cannot
        // even be created (its in-flight log cannot be opened, say) cannot publish at all:
        // the flow fails with the reason rather than show `running`.
        let url = self.endpoint.url.clone();
        match self.open(&url) {
            Ok(conn) => {
                self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    url,
                    Slot {
                        conn,
                        users: 0,
                        last_used: Instant::now(),
                    },
                );
            }
            Err(e) => {
                self.services
                    .activity
                    .record(flowbus_runtime::activity::NewEntry::new(
                        Severity::Error,
                        bip::CONNECTION_FAILURE,
                        "MQTT",
                        &self.flow,
                        &self.node,
                        e.text.clone(),
                    ));
                flow.fail_flow(e.text);
            }
        }
    }

    fn stop(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if let Some(n) = self.sampler.flush() {
                self.summarise(n);
            }
            let conns: Vec<Arc<Conn>> = self
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .map(|(_, s)| s.conn)
                .collect();
            for c in conns {
                c.shutdown(self.ack_timeout.min(Duration::from_secs(10)))
                    .await;
            }
        })
    }

    /// The flow is removed: every client the node made is retired (see
    /// [`Publish::retire_client`]). The stop before has already waited for outstanding
    /// acknowledgements, within its deadline; what is still owed is kept and reported.
    fn retire(&self, deadline: Duration) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let mut clients = self
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // Also when the flow never ran in this process (deployed while stopped), and the
            // override clients of earlier runs, which left their URL in their directory.
            clients
                .entry(self.own_client_id())
                .or_insert_with(|| self.endpoint.clone());
            for (cid, url) in
                earlier_override_clients(&self.config.data_dir.join("mqtt"), &self.own_client_id())
            {
                clients
                    .entry(cid)
                    .or_insert_with(|| self.endpoint.elsewhere(&url));
            }
            futures::future::join_all(
                clients
                    .into_iter()
                    .map(|(cid, endpoint)| self.retire_client(cid, endpoint, deadline)),
            )
            .await;
        })
    }
}

impl Publish {
    /// The id of the node's own client (overrides add `-<n>`).
    fn own_client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| {
            client_id(
                &instance_id(&self.config.data_dir),
                &self.flow,
                &self.node,
                None,
            )
        })
    }

    /// Retires one client of a removed flow: when its in-flight log owes nothing, ends its
    /// persistent session and deletes its directory under the data directory; otherwise keeps
    /// both, so the publications are sent when a flow with this client id starts again, and
    /// says how many (an error: they are not dropped silently). One entry says what was done.
    async fn retire_client(&self, cid: String, endpoint: Endpoint, deadline: Duration) {
        let dir = self.config.data_dir.join("mqtt").join(&cid);
        let entry = |severity, number, message: String| {
            flowbus_runtime::activity::NewEntry::new(
                severity, number, "MQTT", &self.flow, &self.node, message,
            )
            .tag("url", endpoint.url.clone())
            .tag("client_id", cid.clone())
        };
        let keep = match crate::mqtt_store::owed(&dir) {
            Ok(0) => None,
            Ok(n) => Some((
                format!(
                    "{n} publication(s) of client id '{cid}' to {} were not acknowledged by the broker when the flow was removed",
                    endpoint.url
                ),
                n,
            )),
            Err(e) => Some((
                format!(
                    "what the in-flight log of client id '{cid}' still owes cannot be told ({e})"
                ),
                0,
            )),
        };
        if let Some((what, n)) = keep {
            self.services.activity.record(
                entry(
                    Severity::Error,
                    bip::OWED_AT_REMOVAL,
                    format!(
                        "{what}. The in-flight log in {} is kept, and the client's session at the broker with it: what it holds is published when a flow with client id '{cid}' starts again; delete that directory to drop it",
                        dir.display()
                    ),
                )
                .tag("count", n)
                .tag("dir", dir.display().to_string()),
            );
            return;
        }
        let mut done = Vec::new();
        let mut failed = false;
        if !self.clean_session {
            match crate::mqtt::end_session(ConnSpec {
                endpoint: &endpoint,
                client_id: cid.clone(),
                persistent_session: false,
                persist_dir: None,
                connect_timeout: self.ack_timeout.min(deadline),
                backoff: Backoff::from_config(&self.config),
                services: self.services.clone(),
                flow: &self.flow,
                node: &self.node,
            })
            .await
            {
                Ok(()) => done.push(format!("ended its session at {}", endpoint.url)),
                Err(why) => {
                    failed = true;
                    done.push(format!(
                        "could not end its session at {}: {why} (the broker keeps it until it expires, MQTT v5, or a client with this id connects with a clean session)",
                        endpoint.url
                    ));
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => done.push(format!("deleted {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                failed = true;
                done.push(format!("could not delete {}: {e}", dir.display()));
            }
        }
        if done.is_empty() {
            return;
        }
        self.services.activity.record(entry(
            if failed {
                Severity::Error
            } else {
                Severity::Info
            },
            bip::RETIRED,
            format!(
                "Client id '{cid}' of a removed flow, with nothing left to publish: {}",
                done.join("; ")
            ),
        ));
    }
}

/// The text of the once-a-second summary of "Published" entries the sampler held back.
fn summary_text(n: u64) -> String {
    format!("{n} further messages published in the last second (not logged one by one)")
}

/// That summary, with a connection's log context.
fn published_summary(log: &crate::mqtt::LogCtx, n: u64) {
    log.record(log.entry(Severity::Info, bip::SUMMARY, summary_text(n)));
}

impl Publish {
    /// Records a summary with the log context of the node's own connection (or, before it has
    /// one, of the node).
    fn summarise(&self, n: u64) {
        let conn = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.endpoint.url)
            .map(|s| s.conn.clone());
        match conn {
            Some(c) => published_summary(&c.log, n),
            None => self
                .services
                .activity
                .record(flowbus_runtime::activity::NewEntry::new(
                    Severity::Info,
                    bip::SUMMARY,
                    "MQTT",
                    &self.flow,
                    &self.node,
                    summary_text(n),
                )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowbus_runtime::message::Body;
    use serde_json::json;

    fn node() -> Publish {
        let config = Arc::new(Config::default());
        let (closer, closing) = mpsc::unbounded_channel();
        Publish {
            endpoint: resolve_endpoint(
                &NodeDecl {
                    id: "p".into(),
                    type_name: "MQTTPublish".into(),
                    props: json!({"url": "tcp://127.0.0.1:1883"})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    pointer: String::new(),
                },
                &config,
            )
            .unwrap_or_else(|_| panic!("resolves")),
            topic: Some("out/t".into()),
            qos: Some(1),
            retain: false,
            ack_timeout: Duration::from_secs(1),
            clean_session: false,
            client_id: None,
            max_payload: 16,
            overrides: true,
            allow_dollar: false,
            override_idle: Duration::from_secs(60),
            config,
            services: Arc::new(Services::default()),
            flow: "f".into(),
            node: "p".into(),
            conns: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
            closer,
            closing: Mutex::new(Some(closing)),
            gate: tokio::sync::Mutex::new(()),
            sampler: Sampler::new(1),
            seq: AtomicU64::new(0),
            policy: PolicyGate::new(crate::qos_policy::Policy::open("tcp://127.0.0.1:1883")),
            flow_handle: OnceLock::new(),
            clients: Mutex::default(),
        }
    }

    /// A message whose `LocalEnvironment.Destination.MQTT.Output` is `output`.
    fn with_output(output: Value) -> Message {
        let mut m = Message::new(Body::Json(json!({})));
        m.set_local(&["Destination", "MQTT", "Output"], output);
        m
    }

    /// The error the overrides in `output` give (panics if they are accepted).
    fn refused(output: Value) -> OverrideError {
        let m = with_output(output);
        m.with_local(&["Destination"], |d| read_overrides(d, false))
            .expect_err("refused")
    }

    #[test]
    fn overrides_take_effect() {
        let p = node();
        let mut m = Message::new(Body::Json(json!({})));
        assert_eq!(p.target(&m).unwrap().topic, "out/t");
        m.set_local(
            &["Destination", "MQTT", "Output"],
            json!({"TopicName": "x/y", "qos": 2, "retained": true, "URL": "mqtt://h:1884", "UserProperties": {"a": "b"}}),
        );
        assert_eq!(
            p.target(&m).unwrap(),
            Target {
                topic: "x/y".into(),
                qos: Some(2),
                retained: true,
                url: "tcp://h:1884".into(),
                user_properties: vec![("a".into(), "b".into())],
            }
        );
        // `()` (JSON null) means "not set": the node's own values apply.
        let m = with_output(json!({"TopicName": null, "qos": null}));
        let t = p.target(&m).unwrap();
        assert_eq!((t.topic.as_str(), t.qos), ("out/t", Some(1)));
        // Other destinations beside MQTT, and other MQTT entries beside Output, are not ours.
        let mut m = Message::new(Body::Json(json!({})));
        m.set_local(&["Destination"], json!({"HTTP": "x", "MQTT": {"Input": 1}}));
        assert_eq!(p.target(&m).unwrap().topic, "out/t");
    }

    #[test]
    fn a_destination_that_is_not_a_map_is_refused_naming_the_level() {
        for (path, value) in [
            (vec!["Destination", "MQTT", "Output"], json!("not-a-map")),
            (vec!["Destination", "MQTT"], json!(["a"])),
            (vec!["Destination"], json!(7)),
        ] {
            let mut m = Message::new(Body::Json(json!({})));
            m.set_local(&path, value);
            let e = m
                .with_local(&["Destination"], |d| read_overrides(d, false))
                .unwrap_err();
            let at = path.join(".");
            assert!(
                matches!(&e, OverrideError::NotAMap { path, .. } if *path == at),
                "{e:?}"
            );
            assert!(
                e.to_string()
                    .starts_with(&format!("LocalEnvironment.{at} must be a map")),
                "{e}"
            );
        }
        assert_eq!(
            refused(json!("not-a-map")).to_string(),
            "LocalEnvironment.Destination.MQTT.Output must be a map (an object) when it is set, found the string \"not-a-map\""
        );
        // The exception names the field first among its inserts.
        let x = node().target(&with_output(json!("x"))).unwrap_err();
        assert_eq!(x.number, 4311);
        assert_eq!(x.inserts[0], "LocalEnvironment.Destination.MQTT.Output");
    }

    #[test]
    fn unknown_keys_are_refused_with_a_did_you_mean() {
        let e = refused(json!({"topicName": "a/b"}));
        assert_eq!(
            e,
            OverrideError::UnknownKey {
                key: "topicName".into(),
                hint: " (did you mean 'TopicName'? IIB also read 'topicName'; flowbus takes only 'TopicName')".into(),
            }
        );
        assert!(
            e.to_string().starts_with(
                "LocalEnvironment.Destination.MQTT.Output.topicName is not an MQTTPublish override (did you mean 'TopicName'?"
            ),
            "{e}"
        );
        let e = refused(json!({"Retained": true}));
        assert!(
            matches!(&e, OverrideError::UnknownKey { hint, .. } if hint == " (did you mean 'retained'?)"),
            "{e:?}"
        );
        let e = refused(json!({"qualityOfService": 1}));
        assert!(e.to_string().contains("did you mean 'qos'?"), "{e}");
        let e = refused(json!({"Bogus": 1, "TopicName": "fine"}));
        assert_eq!(
            e.to_string(),
            "LocalEnvironment.Destination.MQTT.Output.Bogus is not an MQTTPublish override; the overrides are TopicName, qos, retained, URL and UserProperties"
        );
        // Even set to (): a misspelt key is a mistake whatever it holds.
        assert!(matches!(
            refused(json!({"Topic": null})),
            OverrideError::UnknownKey { .. }
        ));
    }

    #[test]
    fn values_of_the_wrong_type_are_refused_naming_field_and_value() {
        let cases = [
            (json!({"qos": "1"}), "qos must be the integer 0, 1 or 2, found the string \"1\""),
            (json!({"qos": 1.0}), "qos must be the integer 0, 1 or 2, found the number 1"),
            (json!({"qos": 3}), "qos: must be 0, 1 or 2, found 3"),
            (json!({"retained": "yes"}), "retained must be true or false, found the string \"yes\""),
            (json!({"retained": 1}), "retained must be true or false, found the integer 1"),
            (json!({"TopicName": 5}), "TopicName must be a string (a topic name), found the integer 5"),
            (json!({"TopicName": "a/+"}), "TopicName: topic \"a/+\" contains a wildcard"),
            (json!({"TopicName": ""}), "TopicName: a topic must not be empty"),
            (json!({"URL": 1883}), "URL must be a string (tcp://host:port or ssl://host:port), found the integer 1883"),
            (json!({"URL": "http://h:1"}), "URL: scheme 'http' in 'http://h:1' is not supported"),
            (json!({"UserProperties": "a=b"}), "UserProperties must be a map of strings, found the string \"a=b\""),
            (json!({"UserProperties": {"n": 1}}), "UserProperties.n must be a string (user property values are strings), found the integer 1"),
        ];
        for (output, says) in cases {
            let e = refused(output.clone()).to_string();
            assert_eq!(
                e.strip_prefix("LocalEnvironment.Destination.MQTT.Output.")
                    .map(|rest| rest.starts_with(says)),
                Some(true),
                "{output}: {e}"
            );
        }
    }

    #[test]
    fn values_mqtt_cannot_carry_are_refused_before_paho_sees_them() {
        let e = refused(json!({"TopicName": "a".repeat(70_000)})).to_string();
        assert!(
            e.starts_with(
                "LocalEnvironment.Destination.MQTT.Output.TopicName: topic is 70000 bytes long"
            ) && e.len() < 300,
            "{e}"
        );
        let e = refused(json!({"UserProperties": {"k": "v".repeat(65_536)}}));
        assert_eq!(
            e.field(),
            "LocalEnvironment.Destination.MQTT.Output.UserProperties.k"
        );
        let e = refused(json!({"UserProperties": {"k".repeat(65_536): "v"}}));
        assert!(
            e.to_string()
                .starts_with("LocalEnvironment.Destination.MQTT.Output.UserProperties key \"kkk"),
            "{e}"
        );
        // The broker's topics, unless the node allows them.
        let e = refused(json!({"TopicName": "$SYS/broker/uptime"}));
        assert!(matches!(
            e,
            OverrideError::Limit(LimitError::DollarTopic { .. })
        ));
        assert_eq!(
            e.field(),
            "LocalEnvironment.Destination.MQTT.Output.TopicName"
        );
        let m = with_output(json!({"TopicName": "$SYS/broker/uptime"}));
        let allowed = m.with_local(&["Destination"], |d| read_overrides(d, true));
        assert_eq!(
            allowed.unwrap().topic.as_deref(),
            Some("$SYS/broker/uptime")
        );
    }

    #[test]
    fn a_node_without_overrides_ignores_whatever_the_message_carries() {
        let mut p = node();
        p.overrides = false;
        for output in [
            json!("not-a-map"),
            json!({"TopicName": "a/+", "URL": "tcp://unreachable:1"}),
        ] {
            let t = p.target(&with_output(output)).unwrap();
            assert_eq!(
                (t.topic.as_str(), t.url.as_str()),
                ("out/t", "tcp://127.0.0.1:1883")
            );
        }
    }

    #[test]
    fn payloads_over_max_payload_are_refused_with_size_and_limit() {
        let p = node();
        let t = p.target(&Message::new(Body::Json(json!({})))).unwrap();
        assert!(p.check_size(&t, &[b'x'; 16]).is_ok());
        let e = p.check_size(&t, &[b'x'; 17]).unwrap_err();
        assert_eq!(
            (e.number, &e.inserts[..]),
            (12119, &["17".to_string(), "16".to_string()][..])
        );
        assert_eq!(
            e.text,
            "Root.Body (serialised) is 17 bytes, more than max_payload (16 bytes)"
        );
    }

    #[test]
    fn override_connections_close_when_unused() {
        let limit = Duration::from_secs(60);
        // In use: never, whatever its state.
        assert_eq!(close_reason(1, false, limit * 2, limit), None);
        assert_eq!(close_reason(2, true, limit * 2, limit), None);
        // Unused and connected: after the idle period.
        assert_eq!(close_reason(0, true, limit / 2, limit), None);
        assert_eq!(close_reason(0, true, limit, limit), Some(Close::Idle));
        // Unused and not connected: at once (no reconnecting for nobody).
        assert_eq!(
            close_reason(0, false, Duration::ZERO, limit),
            Some(Close::Unwanted)
        );
    }

    #[test]
    fn an_override_client_id_is_the_nodes_with_a_stable_digest_of_the_url() {
        let a = override_client_id("fb-1-f-p", "tcp://a:1883");
        assert_eq!(a, override_client_id("fb-1-f-p", "tcp://a:1883"));
        assert_ne!(a, override_client_id("fb-1-f-p", "tcp://b:1883"));
        assert!(
            a.starts_with("fb-1-f-p-") && a.len() == "fb-1-f-p-".len() + 8,
            "{a}"
        );
        // FNV-1a of the empty string: the digest does not depend on the build or the process.
        assert_eq!(override_client_id("x", ""), "x-811c9dc5");
    }
}
