//! `MQTTPublish`: publishes `Root.Body` and propagates to `Out` once the broker has
//! acknowledged it (QoS 1/2), with `LocalEnvironment.WrittenDestination.MQTT.{ClientId, Topic,
//! QoS, MessageId}`. Topic, QoS, retain and URL can be overridden per message by
//! `LocalEnvironment.Destination.MQTT.Output.{TopicName, qos, retained, URL}` (and
//! `UserProperties` on MQTT v5).
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use flowbus_runtime::activity::Severity;
use flowbus_runtime::config::Config;
use flowbus_runtime::engine::{NodeHandle, Outputs};
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::message::{Exception, ExceptionKind, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, PropKind, PropSpec, ValidateCtx,
};
use flowbus_runtime::services::Services;
use flowbus_runtime::stats::{add, inc};
use flowbus_runtime::tree;
use paho_mqtt as paho;
use serde_json::Value;

use crate::mqtt_client::{
    bip, check_common, check_topic, client_id, instance_id, normalise_url, resolve_endpoint,
    Backoff, Conn, ConnSpec, Endpoint, PolicyGate, Sampler, COMMON_PROPS,
};

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
        if let Some(t) = node.str("topic") {
            if let Err(m) = check_topic(t, false) {
                p.push(Problem::at(
                    "topic",
                    FlowErrorKind::BadValue {
                        property: "topic".into(),
                        message: m,
                    },
                ));
            }
        }
        if node.duration("ack_timeout").is_some_and(|d| d.is_zero()) {
            p.push(Problem::at(
                "ack_timeout",
                FlowErrorKind::BadValue {
                    property: "ack_timeout".into(),
                    message: "must be longer than zero".into(),
                },
            ));
        }
        p
    }

    fn build(&self, node: &NodeDecl, ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        let endpoint = resolve_endpoint(node, &ctx.config)?;
        let qos = node.int("qos").map(|q| q as u8);
        let endpoint_policy = endpoint.policy.clone();
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
            config: ctx.config.clone(),
            services: ctx.services.clone(),
            flow: ctx.flow.clone(),
            node: node.id.clone(),
            conns: Mutex::new(HashMap::new()),
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
    config: Arc<Config>,
    services: Arc<Services>,
    flow: String,
    node: String,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
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

fn bad_override(what: String) -> Exception {
    Exception::new(ExceptionKind::Recoverable, bip::PUBLISH_ERROR, what)
}

impl Publish {
    /// Applies `LocalEnvironment.Destination.MQTT.Output` to the node's properties.
    fn target(&self, msg: &Message) -> Result<Target, Exception> {
        // Read in place; only the fields present are copied out.
        msg.with_local(&["Destination", "MQTT", "Output"], |o| {
            let o = o.and_then(|d| d.read_lock::<rhai::Map>());
            let get = |k: &str| {
                o.as_ref()
                    .and_then(|o| o.get(k))
                    .filter(|v| !v.is_unit())
                    .map(tree::to_value)
            };
            self.target_from(get)
        })
    }

    fn target_from(&self, get: impl Fn(&str) -> Option<Value>) -> Result<Target, Exception> {
        let topic = match get("TopicName") {
            Some(Value::String(t)) => t,
            Some(v) => return Err(bad_override(format!("LocalEnvironment.Destination.MQTT.Output.TopicName must be a string, found {v}"))),
            None => self.topic.clone().ok_or_else(|| {
                bad_override("no topic: set the node's \"topic\" or LocalEnvironment.Destination.MQTT.Output.TopicName".into())
            })?,
        };
        check_topic(&topic, false).map_err(bad_override)?;
        let qos = match get("qos") {
            Some(v) => match v.as_i64() {
                Some(q @ 0..=2) => Some(q as u8),
                _ => {
                    return Err(bad_override(format!(
                        "LocalEnvironment.Destination.MQTT.Output.qos must be 0, 1 or 2, found {v}"
                    )))
                }
            },
            None => self.qos,
        };
        let retained = match get("retained") {
            Some(Value::Bool(b)) => b,
            Some(v) => return Err(bad_override(format!("LocalEnvironment.Destination.MQTT.Output.retained must be true or false, found {v}"))),
            None => self.retain,
        };
        let url = match get("URL") {
            Some(Value::String(u)) => normalise_url(&u).map_err(|m| {
                bad_override(format!("LocalEnvironment.Destination.MQTT.Output.URL: {m}"))
            })?,
            Some(v) => {
                return Err(bad_override(format!(
                    "LocalEnvironment.Destination.MQTT.Output.URL must be a string, found {v}"
                )))
            }
            None => self.endpoint.url.clone(),
        };
        let user_properties = match get("UserProperties") {
            Some(Value::Object(m)) => m
                .into_iter()
                .map(|(k, v)| {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    (k, v)
                })
                .collect(),
            Some(v) => return Err(bad_override(format!("LocalEnvironment.Destination.MQTT.Output.UserProperties must be an object, found {v}"))),
            None => Vec::new(),
        };
        Ok(Target {
            topic,
            qos,
            retained,
            url,
            user_properties,
        })
    }

    /// The connection for a URL (the node's own, or one made for an override).
    fn conn_for(&self, url: &str) -> Result<Arc<Conn>, Exception> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conns.get(url) {
            return Ok(c.clone());
        }
        let endpoint = if url == self.endpoint.url {
            self.endpoint.clone()
        } else {
            self.endpoint.elsewhere(url)
        };
        let suffix = (!conns.is_empty()).then_some(conns.len());
        let cid = match &self.client_id {
            Some(id) => match suffix {
                Some(n) => format!("{id}-{n}"),
                None => id.clone(),
            },
            None => client_id(
                &instance_id(&self.config.data_dir),
                &self.flow,
                &self.node,
                suffix,
            ),
        };
        // Paho keeps publications in flight in memory anyway; file persistence makes them
        // survive a restart too.
        let persist_dir = (!self.clean_session && endpoint.file_persistence)
            .then(|| self.config.data_dir.join("mqtt").join(&cid));
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
        conns.insert(url.to_string(), conn.clone());
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
                    humantime::format_duration(self.ack_timeout)
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
                humantime::format_duration(self.ack_timeout)
            ))),
        }
    }

    /// Publishes with the IIB contract: one retry after a reconnect, then BIP12099.
    async fn publish(&self, conn: &Arc<Conn>, t: &Target, payload: &[u8]) -> Result<u8, Exception> {
        let log = &conn.log;
        let requested = t
            .qos
            .map_or_else(|| "by rule".to_string(), |q| q.to_string());
        let (first, reconnect) = match self.attempt(conn, t, payload).await {
            Ok(q) => return Ok(q),
            Err(Attempt::Policy(text)) => return Err(policy_exception(text)),
            Err(Attempt::Failed(why)) => (why, true),
            // Connected again already: retry on this connection.
            Err(Attempt::SessionLost(why)) => (why, false),
        };
        log.record(
            log.entry(
                Severity::Warning,
                bip::PUBLISH_ERROR,
                format!(
                    "Publish to '{}' (QoS {requested}) failed: {first}; {}retrying once",
                    t.topic,
                    if reconnect { "reconnecting and " } else { "" }
                ),
            )
            .tag("topic", t.topic.clone())
            .tag("qos", t.qos.map_or(Value::Null, Value::from)),
        );
        if reconnect {
            conn.request_reconnect();
        }
        let second = match self.attempt(conn, t, payload).await {
            Ok(q) => return Ok(q),
            Err(Attempt::Policy(text)) => return Err(policy_exception(text)),
            Err(Attempt::Failed(why) | Attempt::SessionLost(why)) => why,
        };
        log.record(
            log.entry(
                Severity::Error,
                bip::NOT_ACKNOWLEDGED,
                format!(
                    "Publish to '{}' (QoS {requested}) failed after the retry: {second}",
                    t.topic
                ),
            )
            .tag("topic", t.topic.clone())
            .tag("qos", t.qos.map_or(Value::Null, Value::from)),
        );
        Err(Exception::new(
            ExceptionKind::SocketTimeout,
            bip::NOT_ACKNOWLEDGED,
            format!(
                "the publication to '{}' at QoS {requested} on {} was not acknowledged: first attempt: {first}; retry: {second}",
                t.topic, t.url
            ),
        )
        .insert(t.topic.clone())
        .insert(requested)
        .insert(t.url.clone()))
    }
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
            let conn = self.conn_for(&t.url)?;
            let payload = msg.root.body.to_bytes();
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
        // Summaries of sampled "Published" entries are due once a second, even when no further
        // message comes to trigger one; the task ends with the node.
        let weak = Arc::downgrade(&self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { break };
                if let Some(n) = node.sampler.overdue() {
                    node.summarise(n);
                }
            }
        });
        // Connect now, so the first message does not wait for it. A node whose client cannot
        // even be created (its in-flight log cannot be opened, say) cannot publish at all:
        // the flow fails with the reason rather than show `running`.
        if let Err(e) = self.conn_for(&self.endpoint.url.clone()) {
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
                .map(|(_, c)| c)
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
            // Also when the flow never ran in this process (deployed while stopped).
            clients
                .entry(self.own_client_id())
                .or_insert_with(|| self.endpoint.clone());
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
            match crate::mqtt_client::end_session(ConnSpec {
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
fn published_summary(log: &crate::mqtt_client::LogCtx, n: u64) {
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
            .cloned();
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
            config,
            services: Arc::new(Services::default()),
            flow: "f".into(),
            node: "p".into(),
            conns: Mutex::new(HashMap::new()),
            gate: tokio::sync::Mutex::new(()),
            sampler: Sampler::new(1),
            seq: AtomicU64::new(0),
            policy: PolicyGate::new(crate::qos_policy::Policy::open("tcp://127.0.0.1:1883")),
            flow_handle: OnceLock::new(),
            clients: Mutex::default(),
        }
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
    }

    #[test]
    fn bad_overrides_are_exceptions_that_say_what_is_wrong() {
        let p = node();
        let mut m = Message::new(Body::Json(json!({})));
        m.set_local(&["Destination", "MQTT", "Output", "qos"], json!(3));
        assert!(p
            .target(&m)
            .unwrap_err()
            .text
            .contains("qos must be 0, 1 or 2, found 3"));
        let mut m = Message::new(Body::Json(json!({})));
        m.set_local(
            &["Destination", "MQTT", "Output", "TopicName"],
            json!("a/+"),
        );
        assert!(p.target(&m).unwrap_err().text.contains("wildcard"));
    }
}
