//! `MQTTSubscribe`: an input node that subscribes to topic filters and propagates each
//! received message to `Out` with `LocalEnvironment.MQTT.Input.{Topic, QualityOfService,
//! Duplicate, Retained, UserProperties}`. A payload that does not parse in the node's domain
//! goes to `Failure` (as a BLOB, with a ParserException).
//!
//! Back-pressure: the paho callback runs on the Paho C library's single thread, shared by
//! every client in the process, so it must never block. It only appends to an unbounded
//! channel and counts the queue depth and the payload bytes the node holds (queued, or in the
//! flow until their propagation ends). When the depth reaches `queue_high` or the bytes
//! `queue_high_bytes`, the node pauses: it disconnects, keeping its persistent session, so
//! the broker holds the backlog; when the flow has worked both down (to `queue_low` and a
//! quarter of `queue_high_bytes`), it reconnects and the broker resumes. What the node holds
//! is therefore bounded by the marks plus what was already on the wire (the broker's
//! in-flight window and socket buffers); receipt never blocks the library thread, and nothing
//! is dropped here.
//!
//! A payload over `max_payload` is not parsed (a JSON payload becomes several times its size
//! in trees): it goes to `Failure` with an empty body and exception BIP12119.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowbus_runtime::activity::Severity;
use flowbus_runtime::config::Config;
use flowbus_runtime::engine::{Dispatcher, InputCtx};
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::message::{Body, Domain, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, InputNode, NodeDecl, NodeKind, NodeSpec, Problem, PropKind,
    PropSpec, ValidateCtx,
};
use flowbus_runtime::services::Services;
use flowbus_runtime::stats::{add, inc};
use paho_mqtt as paho;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use crate::mqtt_client::{
    bip, check_common, check_topic, client_id, instance_id, max_payload, resolve_endpoint, topics,
    user_properties, wire_info, Backoff, Conn, ConnSpec, Endpoint, LogCtx, OnConnected, PolicyGate,
    Redeliveries, Sampler, Want, COMMON_PROPS, MAX_PAYLOAD_PROP,
};
use crate::mqtt_limits::{self, DEFAULT_QUEUE_HIGH_BYTES};
use flowbus_runtime::message::{Exception, ExceptionKind};

static SPEC: NodeSpec = NodeSpec {
    type_name: "MQTTSubscribe",
    inputs: &[],
    outputs: &["Out", "Failure", "Catch"],
    props: &[
        COMMON_PROPS[0],
        COMMON_PROPS[1],
        COMMON_PROPS[2],
        COMMON_PROPS[3],
        COMMON_PROPS[4],
        COMMON_PROPS[5],
        PropSpec::req("topic", PropKind::StrOrList),
        PropSpec::opt("domain", PropKind::Enum(&["JSON", "TEXT", "BLOB"])),
        PropSpec::opt("instances", PropKind::Int { min: 1, max: 256 }),
        PropSpec::opt("in_flight", PropKind::Int { min: 1, max: 1024 }),
        PropSpec::opt(
            "queue_high",
            PropKind::Int {
                min: 1,
                max: 1_000_000,
            },
        ),
        PropSpec::opt(
            "queue_low",
            PropKind::Int {
                min: 0,
                max: 1_000_000,
            },
        ),
        PropSpec::opt("queue_high_bytes", PropKind::Size { max: 1 << 40 }),
        MAX_PAYLOAD_PROP,
    ],
};

/// The MQTTSubscribe node kind.
pub struct SubscribeKind;

impl NodeKind for SubscribeKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn check(&self, node: &NodeDecl, ctx: &ValidateCtx) -> Vec<Problem> {
        let mut p = check_common(node, ctx);
        for t in topics(node) {
            if let Err(m) = check_topic(&t, true) {
                p.push(Problem::at(
                    "topic",
                    FlowErrorKind::BadValue {
                        property: "topic".into(),
                        message: m,
                    },
                ));
            }
        }
        let high = node.int("queue_high").unwrap_or(DEFAULT_HIGH as i64);
        if let Some(low) = node.int("queue_low") {
            if low >= high {
                p.push(Problem::at(
                    "queue_low",
                    FlowErrorKind::BadValue {
                        property: "queue_low".into(),
                        message: format!("{low} must be below queue_high ({high})"),
                    },
                ));
            }
        }
        p
    }

    fn build(&self, node: &NodeDecl, ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        let endpoint = resolve_endpoint(node, &ctx.config)?;
        let qos = node.int("qos").map(|q| q as u8);
        let topics = topics(node);
        // A rule may choose QoS 1/2 for a topic the node leaves unspecified.
        let any_qos = topics.iter().any(|t| {
            qos.or(endpoint.policy.rule_for(t).map(|r| r.qos))
                .unwrap_or(0)
                > 0
        });
        let high = node.int("queue_high").map_or(DEFAULT_HIGH, |n| n as usize);
        let high_bytes = usize::try_from(
            node.size("queue_high_bytes")
                .unwrap_or(DEFAULT_QUEUE_HIGH_BYTES),
        )
        .unwrap_or(usize::MAX);
        Ok(BuiltNode::Input(Arc::new(Subscribe {
            endpoint,
            topics,
            qos,
            domain: node
                .str("domain")
                .and_then(Domain::parse)
                .unwrap_or(Domain::Json),
            instances: node.int("instances").unwrap_or(1) as usize,
            in_flight: node
                .int("in_flight")
                .map_or(DEFAULT_IN_FLIGHT, |n| n as usize),
            marks: Marks {
                high,
                low: node.int("queue_low").map_or(high / 4, |n| n as usize),
                high_bytes,
                low_bytes: high_bytes / 4,
            },
            max_payload: max_payload(node, &ctx.config),
            // Persistent sessions for QoS 1/2, so a pause (or a reconnect) loses nothing.
            clean_session: node.bool("clean_session").unwrap_or(!any_qos),
            client_id: node.str("client_id").map(str::to_string),
            config: ctx.config.clone(),
            services: ctx.services.clone(),
            flow: ctx.flow.clone(),
            node: node.id.clone(),
        })))
    }
}

const DEFAULT_HIGH: usize = 1000;

/// Whether receipt is paused, changed together with the connection's wish, and decided on the
/// counts as they are when the lock is held: a pause decided on paho's thread (the message
/// callback) and a resume decided by the node's task cannot interleave. Two ways a subscriber
/// stayed paused for ever (about one whole run of `tests/daemon_mqtt.rs` in four, under load):
/// a resume between the callback's flag and its `Paused` (the wish paused, the flag clear);
/// and a pause decided on the count the callback had just made, after the node's task had
/// emptied the queue meanwhile (paused with nothing queued, so nothing ever resumed it).
struct Receipt {
    paused: Mutex<bool>,
    want: tokio::sync::watch::Sender<Want>,
}

impl Receipt {
    fn new(want: tokio::sync::watch::Sender<Want>) -> Receipt {
        Receipt {
            paused: Mutex::new(false),
            want,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_paused(&self) -> bool {
        *self.lock()
    }

    /// Pauses receipt if the counts are over a mark now; false if it did not (not over, or
    /// already paused).
    fn pause_if_over(&self, marks: &Marks, depth: &AtomicUsize, bytes: &AtomicUsize) -> bool {
        let mut p = self.lock();
        if *p || !marks.over(depth.load(Ordering::SeqCst), bytes.load(Ordering::SeqCst)) {
            return false;
        }
        *p = true;
        self.want.send_replace(Want::Paused);
        true
    }

    /// Resumes receipt if it is paused and the counts are down to the low marks now; returns
    /// them if it did.
    fn resume_if_under(
        &self,
        marks: &Marks,
        depth: &AtomicUsize,
        bytes: &AtomicUsize,
    ) -> Option<(usize, usize)> {
        let mut p = self.lock();
        let counts = (depth.load(Ordering::SeqCst), bytes.load(Ordering::SeqCst));
        if !*p || !marks.under(counts.0, counts.1) {
            return None;
        }
        *p = false;
        self.want.send_replace(Want::Up);
        Some(counts)
    }
}

/// When a subscriber pauses receipt and when it resumes: messages queued (received, not yet
/// handed to the flow) and payload bytes held (queued, or in the flow until their propagation
/// ends: a message waiting for an ack still holds its trees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marks {
    /// Pause at this many queued messages (`queue_high`).
    high: usize,
    /// Resume at this many (`queue_low`).
    low: usize,
    /// Pause at this many payload bytes held (`queue_high_bytes`).
    high_bytes: usize,
    /// Resume at this many (a quarter of `queue_high_bytes`).
    low_bytes: usize,
}

impl Marks {
    /// Whether receipt should pause: either mark reached.
    fn over(&self, queued: usize, bytes: usize) -> bool {
        queued >= self.high || bytes >= self.high_bytes
    }

    /// Whether a paused receipt may resume: both down to their low marks.
    fn under(&self, queued: usize, bytes: usize) -> bool {
        queued <= self.low && bytes <= self.low_bytes
    }
}

/// Payload bytes a received message holds, given back when it is dropped: at the end of its
/// propagation, or at once for one the node skips.
struct Held {
    bytes: Arc<AtomicUsize>,
    n: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.bytes.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// Propagations of one input node that may wait for acks at once (with `instances: 1`):
/// enough to keep the publishers' in-flight windows (mosquitto's default is 20) full.
const DEFAULT_IN_FLIGHT: usize = 64;

struct Subscribe {
    endpoint: Endpoint,
    topics: Vec<String>,
    qos: Option<u8>,
    domain: Domain,
    instances: usize,
    in_flight: usize,
    marks: Marks,
    /// The largest payload the node parses; a larger one goes to `Failure` unparsed.
    max_payload: usize,
    clean_session: bool,
    client_id: Option<String>,
    config: Arc<Config>,
    services: Arc<Services>,
    flow: String,
    node: String,
}

impl InputNode for Subscribe {
    fn run(self: Arc<Self>, ctx: InputCtx) -> BoxFut<'static, ()> {
        Box::pin(async move { self.run_loop(ctx).await })
    }

    /// The flow is removed: a persistent session would keep the subscription at the broker,
    /// which would queue for it for ever (MQTT 3.1.1) and hand the backlog to whatever flow
    /// next uses the client id. So it is ended; a clean session ended with its connection.
    fn retire(&self, deadline: Duration) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if self.clean_session {
                return;
            }
            let cid = self.client_id();
            let result = crate::mqtt_client::end_session(ConnSpec {
                endpoint: &self.endpoint,
                client_id: cid.clone(),
                persistent_session: false,
                persist_dir: None,
                connect_timeout: self.config.mqtt.ack_timeout.0.min(deadline),
                backoff: Backoff::from_config(&self.config),
                services: self.services.clone(),
                flow: &self.flow,
                node: &self.node,
            })
            .await;
            let topics = self
                .topics
                .iter()
                .map(|t| format!("'{t}'"))
                .collect::<Vec<_>>()
                .join(", ");
            let (severity, message) = match result {
                Ok(()) => (
                    Severity::Info,
                    format!(
                        "Ended the session of client id '{cid}' at {} (the flow was removed): the broker no longer keeps its subscription to {topics} or messages for it",
                        self.endpoint.url
                    ),
                ),
                Err(why) => (
                    Severity::Error,
                    format!(
                        "Could not end the session of client id '{cid}' at {} (the flow was removed): {why}. The broker keeps its subscription to {topics} and queues messages for it until the session expires (MQTT v5) or a client with this id connects with a clean session",
                        self.endpoint.url
                    ),
                ),
            };
            self.services.activity.record(
                flowbus_runtime::activity::NewEntry::new(
                    severity,
                    bip::RETIRED,
                    "MQTT",
                    &self.flow,
                    &self.node,
                    message,
                )
                .tag("url", self.endpoint.url.clone())
                .tag("client_id", cid),
            );
        })
    }
}

impl Subscribe {
    /// The node's client id: as given, else made from the installation, flow and node.
    fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| {
            client_id(
                &instance_id(&self.config.data_dir),
                &self.flow,
                &self.node,
                None,
            )
        })
    }

    async fn run_loop(&self, ctx: InputCtx) {
        let cid = self.client_id();
        // No file persistence for a subscriber: paho would restore (and deliver again) the
        // received messages of its queue at every reconnect. Receipt is acknowledged on
        // arrival, so the session alone keeps what the broker has not sent yet.
        let conn = match Conn::new(ConnSpec {
            endpoint: &self.endpoint,
            client_id: cid,
            persistent_session: !self.clean_session,
            persist_dir: None,
            connect_timeout: self.config.mqtt.ack_timeout.0,
            backoff: Backoff::from_config(&self.config),
            services: self.services.clone(),
            flow: &self.flow,
            node: &self.node,
        }) {
            Ok(c) => c,
            Err(m) => {
                self.services
                    .activity
                    .record(flowbus_runtime::activity::NewEntry::new(
                        Severity::Error,
                        bip::CONNECTION_FAILURE,
                        "MQTT",
                        &self.flow,
                        &self.node,
                        m.clone(),
                    ));
                ctx.fail_flow(m);
                return;
            }
        };
        let log = conn.log.clone();
        // Aborted at a stop deadline, this task is dropped mid-way: the connection must not
        // stay subscribed behind it.
        let _abandon = crate::mqtt_client::AbandonOnDrop(conn.clone());

        let (tx, mut rx) = mpsc::unbounded_channel::<paho::Message>();
        let depth = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let _queued = QueuedAtAbort {
            depth: depth.clone(),
            log: log.clone(),
        };
        let high_water = Arc::new(Notify::new());
        // Paused by the callback at a mark; resumed by the loop.
        let paused = Arc::new(Receipt::new(conn.want_handle()));
        {
            let depth = depth.clone();
            let bytes = bytes.clone();
            let high_water = high_water.clone();
            let paused = paused.clone();
            let stats = log.stats.clone();
            let marks = self.marks;
            // Runs on the Paho library thread: never block here.
            conn.client.set_message_callback(move |_, m| {
                if let Some(m) = m {
                    let len = m.payload().len();
                    inc(&stats.messages_received);
                    add(&stats.bytes_received, len as u64);
                    let d = depth.fetch_add(1, Ordering::SeqCst) + 1;
                    let b = bytes.fetch_add(len, Ordering::SeqCst) + len;
                    let _ = tx.send(m);
                    // Paused from here, not by the node's task: that task may be inside a
                    // slow propagation, and the client acknowledges on receipt, so the broker
                    // streams on until the connection closes (a burst of 1 MiB messages was
                    // 30 MiB past a 4 MiB mark when the task got to it). The task logs it.
                    // The counts just made are a cheap first look; the decision takes them as
                    // they are under the lock.
                    if marks.over(d, b) && paused.pause_if_over(&marks, &depth, &bytes) {
                        high_water.notify_one();
                    }
                }
            });
        }
        conn.spawn(subscriber(
            conn.clone(),
            self.topics.clone(),
            self.qos,
            !self.clean_session,
            Arc::new(PolicyGate::new(self.endpoint.policy.clone())),
        ));

        let fatal = conn.fatal();
        tokio::pin!(fatal);
        let sampler = Sampler::new(10);
        let mut redeliveries = Redeliveries::new((self.marks.high * 8).max(8192));
        let mut dispatcher = Dispatcher::new(ctx.clone(), self.instances, self.in_flight);
        // Summaries of sampled "Received" entries are due once a second, even when no further
        // message comes to trigger one.
        let mut summaries = tokio::time::interval(Duration::from_secs(1));
        summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = ctx.cancel().cancelled() => break,
                reason = &mut fatal => {
                    ctx.fail_flow(reason);
                    break;
                }
                _ = high_water.notified() => {
                    // The callback paused receipt; say so (unless the flow caught up and
                    // resumed in the meantime).
                    if !paused.is_paused() {
                        continue;
                    }
                    let (queued, held) = (depth.load(Ordering::SeqCst), bytes.load(Ordering::SeqCst));
                    let m = &self.marks;
                    let mut msg = format!(
                        "The flow is behind: {queued} messages queued (queue_high {}), {held} payload bytes held (queue_high_bytes {}); pausing receipt until they are down to {} and {}",
                        m.high, m.high_bytes, m.low, m.low_bytes
                    );
                    if self.clean_session {
                        msg.push_str("; this subscriber uses a clean session, so messages published while it is paused are not kept by the broker");
                    }
                    log.record(log.entry(if self.clean_session { Severity::Warning } else { Severity::Info }, bip::FLOW_CONTROL, msg));
                }
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    // Not counted here once `deliver` has it: nothing awaits before it is in
                    // the dispatcher (which counts it until it is done). Its bytes stay
                    // counted until its propagation ends.
                    depth.fetch_sub(1, Ordering::SeqCst);
                    let held = Held { bytes: bytes.clone(), n: m.payload().len() };
                    self.deliver(&m, held, &log, &sampler, &mut redeliveries, &mut dispatcher).await;
                    self.resume_if_caught_up(&paused, &depth, &bytes, &log);
                }
                // A propagation that ends gives back its bytes: that may be what lets a pause
                // end (the queue may have been empty for a while).
                _ = dispatcher.progress() => {
                    self.resume_if_caught_up(&paused, &depth, &bytes, &log);
                }
                _ = summaries.tick() => {
                    if let Some(n) = sampler.overdue() {
                        received_summary(&log, n);
                    }
                }
            }
        }

        // Shutdown: stop new deliveries, then finish everything already received (paho has
        // acknowledged it to the broker, so it is ours to deliver).
        let deadline = self.config.mqtt.ack_timeout.0.min(Duration::from_secs(10));
        if self.clean_session {
            if conn.is_connected() {
                let unsub = conn.client.unsubscribe_many(&self.topics);
                if let Ok(Ok(_)) = tokio::time::timeout(deadline, unsub).await {
                    for t in &self.topics {
                        log.record(
                            log.entry(
                                Severity::Info,
                                bip::SUBSCRIBED,
                                format!("Unsubscribed from '{t}'"),
                            )
                            .tag("topic", t.clone()),
                        );
                    }
                }
            }
        } else {
            // A persistent session keeps its subscription, so what is published while the
            // flow or the daemon is stopped waits at the broker for the next start instead of
            // being lost. (Removing the flow ends the session: `retire`.)
            log.record(log.entry(
                Severity::Info,
                bip::FLOW_CONTROL,
                format!(
                    "Stopping receipt; the broker keeps the subscription to {} and its messages for client id '{}' until the flow starts again (removing the flow ends the session)",
                    self.topics.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", "),
                    log.client_id
                ),
            ));
        }
        conn.shutdown(deadline).await;
        conn.client.remove_message_callback();
        while let Ok(m) = rx.try_recv() {
            depth.fetch_sub(1, Ordering::SeqCst);
            let held = Held {
                bytes: bytes.clone(),
                n: m.payload().len(),
            };
            self.deliver(&m, held, &log, &sampler, &mut redeliveries, &mut dispatcher)
                .await;
        }
        dispatcher.drain().await;
        if let Some(n) = sampler.flush() {
            received_summary(&log, n);
        }
    }

    /// Ends a pause once the flow has worked what the node holds down to the low marks.
    fn resume_if_caught_up(
        &self,
        paused: &Receipt,
        depth: &AtomicUsize,
        bytes: &AtomicUsize,
        log: &LogCtx,
    ) {
        if let Some((queued, held)) = paused.resume_if_under(&self.marks, depth, bytes) {
            log.record(log.entry(
                Severity::Info,
                bip::FLOW_CONTROL,
                format!("The flow caught up ({queued} queued, {held} payload bytes held); resuming receipt"),
            ));
        }
    }

    /// Hands one received message to the flow; `held` counts its payload bytes until its
    /// propagation ends.
    async fn deliver(
        &self,
        m: &paho::Message,
        held: Held,
        log: &LogCtx,
        sampler: &Sampler,
        redeliveries: &mut Redeliveries,
        dispatcher: &mut Dispatcher,
    ) {
        let qos = m.qos() as i32;
        let (dup, msgid) = if qos > 0 { wire_info(m) } else { (false, 0) };
        if qos > 0 && redeliveries.is_redelivery(dup, msgid, m.topic(), m.payload()) {
            // Already received and processed before a pause or reconnect: the broker sent it
            // again because our acknowledgement had not reached it.
            inc(&log.stats.redeliveries_skipped);
            return;
        }
        let (admit, summary) = sampler.admit();
        if let Some(n) = summary {
            received_summary(log, n);
        }
        if admit {
            log.record(
                log.entry(
                    Severity::Info,
                    bip::RECEIVED,
                    format!(
                        "Received a message on '{}' (QoS {qos}, {} bytes)",
                        m.topic(),
                        m.payload().len()
                    ),
                )
                .tag("topic", m.topic())
                .tag("qos", qos),
            );
        }
        if let Err(e) =
            mqtt_limits::check_payload("the payload", m.payload().len(), self.max_payload)
        {
            // Not parsed: a JSON payload becomes many times its size in trees. The body is
            // left empty, so the Failure path holds nothing of it (and `held` is given back
            // when this returns, the payload with it).
            let msg = received_message(
                Body::Blob(Vec::new()),
                m.topic(),
                qos,
                dup,
                m.retained(),
                user_properties(m.properties()),
            );
            dispatcher
                .submit_holding(msg, Some(oversized(&e, m.topic())), ())
                .await;
            return;
        }
        let (body, error) = match Body::parse(self.domain, m.payload()) {
            Ok(b) => (b, None),
            Err(e) => (Body::Blob(m.payload().to_vec()), Some(*e)),
        };
        let msg = received_message(
            body,
            m.topic(),
            qos,
            dup,
            m.retained(),
            user_properties(m.properties()),
        );
        dispatcher.submit_holding(msg, error, held).await;
    }
}

/// The exception for a received payload over `max_payload` (BIP12119): its size, the limit
/// and the topic as inserts.
fn oversized(e: &mqtt_limits::LimitError, topic: &str) -> Exception {
    let mut x = Exception::new(
        ExceptionKind::Recoverable,
        bip::PAYLOAD_TOO_LARGE,
        format!(
            "{e}, received on '{topic}': not parsed; the message goes on with an empty body (raise max_payload on the node or its server to take it)"
        ),
    );
    if let mqtt_limits::LimitError::PayloadTooLarge { len, max, .. } = e {
        x = x.insert(len.to_string()).insert(max.to_string());
    }
    x.insert(topic)
}

/// Whether a connect lost a persistent session: a reconnect within this run (the first
/// connect of a run cannot tell a lost session from a new one) that the broker answered with
/// no session.
fn session_lost(persistent: bool, first: bool, session_present: bool) -> bool {
    persistent && !first && !session_present
}

/// What to do on each connect: subscribe; on a reconnect within this run (after a pause or
/// a lost connection), only when the broker did not keep our session — and then, for a
/// persistent session, say that what the broker had queued for us is gone (BIP12118). Each
/// topic's QoS goes through the server's QoS policy first.
fn subscriber(
    conn: Arc<Conn>,
    topics: Vec<String>,
    qos: Option<u8>,
    persistent: bool,
    gate: Arc<PolicyGate>,
) -> OnConnected {
    let weak = Arc::downgrade(&conn);
    drop(conn);
    let subscribed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    Box::new(move |session_present| {
        let topics = topics.clone();
        let weak = weak.clone();
        let gate = gate.clone();
        let first = !subscribed_once.swap(true, Ordering::SeqCst);
        let resumed = session_present && !first;
        Box::pin(async move {
            let Some(conn) = weak.upgrade() else { return };
            let log = &conn.log;
            if session_lost(persistent, first, session_present) {
                log.record(
                    log.entry(
                        Severity::Warning,
                        bip::SESSION_LOST,
                        format!(
                            "The broker at {} had no session for '{}' when it reconnected \
                             (restarted without persistence, or the session expired): whatever \
                             it had queued for this subscriber while it was away is gone. \
                             Subscribing again; run the broker with persistence to keep \
                             sessions across its restarts",
                            log.url, log.client_id
                        ),
                    )
                    .tag("client_id", log.client_id.clone()),
                );
            }
            for t in &topics {
                let want = match gate.apply(&conn, t, qos) {
                    Ok(q) => q,
                    Err(text) => {
                        log.record(
                            log.entry(
                                Severity::Error,
                                bip::QOS_MISMATCH,
                                format!("{text}; not subscribed"),
                            )
                            .tag("topic", t.clone())
                            .tag("requested_qos", qos.map_or(Value::Null, Value::from)),
                        );
                        continue;
                    }
                };
                if resumed {
                    // Re-subscribing would make the broker send retained messages again.
                    log.record(
                        log.entry(
                            Severity::Info,
                            bip::SUBSCRIBED,
                            format!("Subscription to '{t}' resumed with the session (QoS {want})"),
                        )
                        .tag("topic", t.clone())
                        .tag("qos", want),
                    );
                    continue;
                }
                match conn.client.subscribe(t.as_str(), i32::from(want)).await {
                    Ok(resp) => {
                        let granted = resp.subscribe_response().unwrap_or(i32::from(want));
                        if !(0..=2).contains(&granted) {
                            log.record(
                                log.entry(
                                    Severity::Error,
                                    bip::SUBSCRIBE_FAILED,
                                    format!("The broker refused the subscription to '{t}' (requested QoS {want}, reason code 0x{granted:02x}); check the broker's ACL and QoS policy"),
                                )
                                .tag("topic", t.clone())
                                .tag("qos", want),
                            );
                            continue;
                        }
                        let granted = granted as u8;
                        if granted < want {
                            // The broker granted less than we asked: the policy decides
                            // whether that is acceptable.
                            if let Err(text) =
                                gate.apply_granted(&conn, t, Some(want), Some(granted))
                            {
                                log.record(
                                    log.entry(
                                        Severity::Error,
                                        bip::QOS_MISMATCH,
                                        format!("{text}; unsubscribed"),
                                    )
                                    .tag("topic", t.clone())
                                    .tag("requested_qos", want)
                                    .tag("granted_qos", granted),
                                );
                                let _ = conn.client.unsubscribe(t.as_str()).await;
                                continue;
                            }
                        }
                        let sev = if granted < want {
                            Severity::Warning
                        } else {
                            Severity::Info
                        };
                        let mut e = log
                            .entry(
                                sev,
                                bip::SUBSCRIBED,
                                format!(
                                    "Subscribed to '{t}' (requested QoS {want}, granted {granted})"
                                ),
                            )
                            .tag("topic", t.clone())
                            .tag("qos", want)
                            .tag("granted_qos", granted);
                        if let Some(rule) = gate.policy().rule_for(t) {
                            e = e.tag("rule", rule.topic.clone());
                        }
                        log.record(e);
                    }
                    Err(e) => log.record(
                        log.entry(
                            Severity::Error,
                            bip::SUBSCRIBE_FAILED,
                            format!("Subscribing to '{t}' (QoS {want}) failed: {e}"),
                        )
                        .tag("topic", t.clone())
                        .tag("qos", want),
                    ),
                }
            }
        })
    })
}

/// Received messages not yet handed to the flow when the node's task is dropped: it was
/// aborted at a stop deadline. Paho acknowledged them to the broker on receipt, so they are
/// lost; the activity log says how many (the flow's dispatcher reports those it had started).
struct QueuedAtAbort {
    depth: Arc<AtomicUsize>,
    log: LogCtx,
}

impl Drop for QueuedAtAbort {
    fn drop(&mut self) {
        let n = self.depth.load(Ordering::SeqCst);
        if n > 0 {
            let log = &self.log;
            log.record(
                log.entry(
                    Severity::Error,
                    flowbus_runtime::daemon::bip::ABANDONED_AT_STOP,
                    format!(
                        "{n} received message(s) were still queued when the flow was stopped at its deadline; the MQTT client had acknowledged them to {}, so they are lost. Raise [daemon] shutdown_timeout if the flow needs longer to finish what it received",
                        log.url
                    ),
                )
                .tag("count", n),
            );
        }
    }
}

/// The once-a-second summary of "Received" entries the sampler held back.
fn received_summary(log: &LogCtx, n: u64) {
    log.record(log.entry(
        Severity::Info,
        bip::SUMMARY,
        format!("{n} further messages received in the last second (not logged one by one)"),
    ));
}

/// The message an MQTTSubscribe node dispatches for a received one: `body` with
/// `LocalEnvironment.MQTT.Input` (`Topic`, `QualityOfService`, `Duplicate`, `Retained`, and
/// `UserProperties` when the publication had any), built in Rhai's form directly.
pub fn received_message(
    body: Body,
    topic: &str,
    qos: i32,
    duplicate: bool,
    retained: bool,
    user_properties: Option<Value>,
) -> Message {
    let mut input = rhai::Map::new();
    input.insert(
        "Topic".into(),
        rhai::Dynamic::from(rhai::ImmutableString::from(topic)),
    );
    input.insert(
        "QualityOfService".into(),
        rhai::Dynamic::from_int(qos.into()),
    );
    input.insert("Duplicate".into(), rhai::Dynamic::from_bool(duplicate));
    input.insert("Retained".into(), rhai::Dynamic::from_bool(retained));
    if let Some(up) = user_properties {
        input.insert(
            "UserProperties".into(),
            flowbus_runtime::tree::to_dynamic(&up),
        );
    }
    let mut msg = Message::new(body);
    msg.set_local_rhai(&["MQTT", "Input"], rhai::Dynamic::from_map(input));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn marks() -> Marks {
        Marks {
            high: 10,
            low: 2,
            high_bytes: 1000,
            low_bytes: 250,
        }
    }

    /// The callback pauses on paho's thread while the node's task resumes: whatever the
    /// interleaving, whoever holds the state sees the connection's wish as the flag says (a
    /// flag clear with the wish `Paused` is a subscriber that never resumes).
    #[test]
    fn pauses_and_resumes_on_two_threads_leave_the_wish_as_the_flag_says() {
        let (tx, rx) = tokio::sync::watch::channel(Want::Up);
        let r = Arc::new(Receipt::new(tx));
        // Each thread pauses (or resumes) 20,000 times while this one looks; the counts are
        // over the high mark for one and under the low marks for the other.
        let busy = |queued: usize, pause: bool| {
            let r = r.clone();
            let calls = Arc::new(AtomicUsize::new(0));
            let counted = calls.clone();
            let t = std::thread::spawn(move || {
                let (depth, bytes) = (AtomicUsize::new(queued), AtomicUsize::new(0));
                for _ in 0..20_000 {
                    if pause {
                        let _ = r.pause_if_over(&marks(), &depth, &bytes);
                    } else {
                        let _ = r.resume_if_under(&marks(), &depth, &bytes);
                    }
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            });
            (t, calls)
        };
        let (pauser, pauses) = busy(50, true);
        let (resumer, resumes) = busy(0, false);
        let mut looks = 0;
        while pauses.load(Ordering::Relaxed) < 20_000 || resumes.load(Ordering::Relaxed) < 20_000 {
            let flag = r.lock();
            assert_eq!(*flag, *rx.borrow() == Want::Paused, "after {looks} looks");
            looks += 1;
        }
        pauser.join().unwrap();
        resumer.join().unwrap();
    }

    /// The callback counts a message in, and by the time it decides the node's task may have
    /// emptied the queue: a pause then would never be resumed, since nothing is left to
    /// deliver. The decision takes the counts as they are.
    #[test]
    fn a_pause_is_decided_on_the_counts_as_they_are_not_as_they_were() {
        let (tx, rx) = tokio::sync::watch::channel(Want::Up);
        let r = Receipt::new(tx);
        let (depth, bytes) = (AtomicUsize::new(0), AtomicUsize::new(0));
        // The callback saw 11 queued; the task has taken them all since.
        assert!(marks().over(11, 0));
        assert!(!r.pause_if_over(&marks(), &depth, &bytes));
        assert_eq!(*rx.borrow(), Want::Up);
        // Over now: paused; a second pause does nothing; resumed once down to the low marks.
        depth.store(11, Ordering::SeqCst);
        assert!(r.pause_if_over(&marks(), &depth, &bytes));
        assert!(!r.pause_if_over(&marks(), &depth, &bytes));
        assert_eq!(*rx.borrow(), Want::Paused);
        depth.store(3, Ordering::SeqCst);
        assert_eq!(r.resume_if_under(&marks(), &depth, &bytes), None);
        depth.store(2, Ordering::SeqCst);
        assert_eq!(r.resume_if_under(&marks(), &depth, &bytes), Some((2, 0)));
        assert_eq!(*rx.borrow(), Want::Up);
        assert!(!r.is_paused());
    }

    #[test]
    fn only_a_persistent_subscriber_reconnecting_without_its_session_lost_it() {
        assert!(session_lost(true, false, false));
        assert!(!session_lost(true, false, true));
        // The first connect of a run cannot tell a lost session from a new one.
        assert!(!session_lost(true, true, false));
        // A clean session has nothing to lose.
        assert!(!session_lost(false, false, false));
    }

    #[test]
    fn receipt_pauses_at_either_mark_and_resumes_below_both() {
        let m = Marks {
            high: 100,
            low: 25,
            high_bytes: 4096,
            low_bytes: 1024,
        };
        assert!(!m.over(99, 4095));
        // A burst of large messages reaches the byte mark long before the message mark.
        assert!(m.over(3, 4096));
        assert!(m.over(100, 0));
        // Resuming needs both: few messages that still hold many bytes keep it paused.
        assert!(!m.under(0, 1025));
        assert!(!m.under(26, 0));
        assert!(m.under(25, 1024));
    }

    #[test]
    fn held_bytes_are_given_back_when_the_message_is_dropped() {
        let bytes = Arc::new(AtomicUsize::new(300));
        let held = Held {
            bytes: bytes.clone(),
            n: 200,
        };
        assert_eq!(bytes.load(Ordering::SeqCst), 300);
        drop(held);
        assert_eq!(bytes.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn an_oversized_payload_says_size_limit_and_topic() {
        let e = mqtt_limits::check_payload("the payload", 70, 64).unwrap_err();
        let x = oversized(&e, "in/big");
        assert_eq!(x.number, 12119);
        assert_eq!(x.inserts, ["70", "64", "in/big"]);
        assert!(
            x.text.starts_with(
                "the payload is 70 bytes, more than max_payload (64 bytes), received on 'in/big': not parsed"
            ),
            "{}",
            x.text
        );
    }

    #[test]
    fn a_received_message_carries_mqtt_input() {
        let msg = received_message(
            Body::Json(json!({"a": 1})),
            "plant/7",
            1,
            true,
            false,
            Some(json!({"k": "v"})),
        );
        assert_eq!(
            msg.local(&["MQTT", "Input"]),
            Some(json!({
                "Topic": "plant/7", "QualityOfService": 1, "Duplicate": true,
                "Retained": false, "UserProperties": {"k": "v"}
            }))
        );
        assert_eq!(msg.local(&["Variables"]), Some(json!({})));
        let plain = received_message(Body::Text("t".into()), "t", 0, false, true, None);
        assert_eq!(plain.local(&["MQTT", "Input", "UserProperties"]), None);
    }
}
