//! `MQTTSubscribe`: an input node that subscribes to topic filters and propagates each
//! received message to `Out` with `LocalEnvironment.MQTT.Input.{Topic, QualityOfService,
//! Duplicate, Retained, UserProperties}`. A payload that does not parse in the node's domain
//! goes to `Failure` (as a BLOB, with a ParserException).
//!
//! Receipt and bursts: the paho callback runs on the Paho C library's single thread, shared
//! by every client in the process, so it must never block. It appends each QoS 1/2 message to
//! the node's input journal (before it returns, i.e. before paho acknowledges the message to
//! the broker), then to an unbounded channel, and counts what the node holds: messages queued,
//! and bytes of messages received and not yet done with (queued, or in the flow until their
//! propagation ends), against the node's budget (`queue_high`, `queue_high_bytes`, the
//! journal's files) and the daemon's (`[mqtt] input_budget`). A burst within the budget is
//! taken at the client library's speed while the flow works through the queue. Only when a
//! budget is spent does the node pause — it disconnects, keeping its persistent session, so
//! the broker holds the backlog — saying so in the activity log with what the broker can keep;
//! when the flow has worked it down (to `queue_low` and a quarter of the bytes) it reconnects.
//! Nothing is dropped here, and what the journal holds is processed at the next start if the
//! daemon dies first.
//!
//! A payload over `max_payload` is not parsed (a JSON payload becomes several times its size
//! in trees): it goes to `Failure` with an empty body and exception BIP12119.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowbus_runtime::activity::Severity;
use flowbus_runtime::config::Config;
use flowbus_runtime::engine::{Dispatcher, Hold, InputCtx};
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::message::{Body, Domain, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, InputNode, NodeDecl, NodeKind, NodeSpec, Problem, PropKind,
    PropSpec, ValidateCtx,
};
use flowbus_runtime::services::{InputBudget, Services};
use flowbus_runtime::stats::{add, inc};
use paho_mqtt as paho;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use crate::input_journal::{Incoming, Journal, Received};
use crate::mqtt::{
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
        PropSpec::opt("journal", PropKind::Bool),
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
            marks: Marks::new(
                high,
                node.int("queue_low").map_or(high / 4, |n| n as usize),
                high_bytes,
            ),
            max_payload: max_payload(node, &ctx.config),
            // Persistent sessions for QoS 1/2, so a pause (or a reconnect) loses nothing.
            clean_session: node.bool("clean_session").unwrap_or(!any_qos),
            any_qos,
            journal: node.bool("journal").unwrap_or(true),
            broker_queue_limit: node
                .str("server")
                .and_then(|n| ctx.config.servers.get(n))
                .and_then(|s| s.broker_queue_limit)
                .or(ctx.config.mqtt.broker_queue_limit),
            client_id: node.str("client_id").map(str::to_string),
            config: ctx.config.clone(),
            services: ctx.services.clone(),
            flow: ctx.flow.clone(),
            node: node.id.clone(),
        })))
    }
}

/// The default `queue_high`: as many messages as the PropSpec allows. The byte budget is the
/// real bound (every message costs at least [`MESSAGE_OVERHEAD`], so the default 64 MiB holds at
/// most about 260,000); the count is there for an operator who wants a smaller queue.
pub const DEFAULT_HIGH: usize = 1_000_000;

/// What a received message costs beyond its payload and topic while the node holds it:
/// paho's message and its properties, the channel's slot, the journal's record header and
/// the allocator's headers. Measured: a burst of 100,000 200-byte messages on a 10-byte topic
/// held in the queue raised the daemon's peak RSS by 42 MiB, 442 bytes a message
/// (docs/PERFORMANCE.md, "Memory"), where they count 466.
pub const MESSAGE_OVERHEAD: usize = 256;

/// What a received message counts against the budgets.
pub fn message_cost(topic: &str, payload: &[u8]) -> usize {
    payload.len() + topic.len() + MESSAGE_OVERHEAD
}

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

    /// Pauses receipt if a budget is spent now; false if it did not (none spent, or already
    /// paused).
    fn pause_if_over(&self, marks: &Marks, load: &Load) -> bool {
        let mut p = self.lock();
        if *p || !load.over(marks) {
            return false;
        }
        *p = true;
        self.want.send_replace(Want::Paused);
        true
    }

    /// Resumes receipt if it is paused and what the node holds is down to the low marks now
    /// (and the daemon's budget has room again); returns the counts if it did.
    fn resume_if_under(&self, marks: &Marks, load: &Load) -> Option<(usize, usize)> {
        let mut p = self.lock();
        if !*p || !load.under(marks) {
            return None;
        }
        *p = false;
        self.want.send_replace(Want::Up);
        Some((load.queued(), load.bytes()))
    }
}

/// When a subscriber pauses receipt and when it resumes: messages queued (received, not yet
/// handed to the flow) and bytes held (queued, or in the flow until their propagation ends:
/// a message waiting for an ack still holds its trees; or in the input journal's files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marks {
    /// Pause at this many queued messages (`queue_high`).
    high: usize,
    /// Resume at this many (`queue_low`).
    low: usize,
    /// Pause at this many bytes held (`queue_high_bytes`).
    high_bytes: usize,
    /// Resume at this many (a quarter of `queue_high_bytes`).
    low_bytes: usize,
    /// Pause when the journal's files take this many bytes: `queue_high_bytes`, but at least
    /// eight segments (the journal frees its files a segment at a time, and the newest one
    /// stays).
    journal_high: u64,
    /// Resume at this many (a quarter: at least two segments).
    journal_low: u64,
}

impl Marks {
    /// The marks for `queue_high` messages and `queue_high_bytes` bytes.
    fn new(high: usize, low: usize, high_bytes: usize) -> Marks {
        let journal_high = (high_bytes as u64).max(8 * crate::input_journal::SEGMENT_SIZE as u64);
        Marks {
            high,
            low,
            high_bytes,
            low_bytes: high_bytes / 4,
            journal_high,
            journal_low: journal_high / 4,
        }
    }

    /// Whether receipt should pause: either mark reached.
    fn over(&self, queued: usize, bytes: usize) -> bool {
        queued >= self.high || bytes >= self.high_bytes
    }

    /// Whether a paused receipt may resume: both down to their low marks.
    fn under(&self, queued: usize, bytes: usize) -> bool {
        queued <= self.low && bytes <= self.low_bytes
    }
}

/// What a subscriber holds now, shared by paho's callback and the node's task.
struct Load {
    /// Messages received and not yet handed to the flow.
    depth: AtomicUsize,
    /// Of those, the ones in the journal (processed at the next start if the daemon dies).
    journaled: AtomicUsize,
    /// Bytes ([`message_cost`]) of messages received and not done with.
    bytes: AtomicUsize,
    /// Bytes of the input journal's files.
    journal_bytes: AtomicU64,
    /// The daemon's budget, which every subscriber's bytes also count against.
    shared: Arc<InputBudget>,
}

impl Load {
    fn new(shared: Arc<InputBudget>) -> Load {
        Load {
            depth: AtomicUsize::new(0),
            journaled: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            journal_bytes: AtomicU64::new(0),
            shared,
        }
    }

    fn queued(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Bytes held in memory.
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }

    fn journal(&self) -> u64 {
        self.journal_bytes.load(Ordering::SeqCst)
    }

    fn over(&self, marks: &Marks) -> bool {
        marks.over(self.queued(), self.bytes())
            || self.journal() >= marks.journal_high
            || self.shared.spent()
    }

    fn under(&self, marks: &Marks) -> bool {
        marks.under(self.queued(), self.bytes())
            && self.journal() <= marks.journal_low
            && self.shared.has_room()
    }

    /// Counts a received message in; returns the queue's depth and the bytes held now.
    fn take(&self, cost: usize, journaled: bool) -> (usize, usize) {
        self.shared.take(cost);
        if journaled {
            self.journaled.fetch_add(1, Ordering::SeqCst);
        }
        let b = self.bytes.fetch_add(cost, Ordering::SeqCst) + cost;
        (self.depth.fetch_add(1, Ordering::SeqCst) + 1, b)
    }

    /// A queued message was handed on (to the flow, or skipped).
    fn dequeued(&self, journaled: bool) {
        self.depth.fetch_sub(1, Ordering::SeqCst);
        if journaled {
            self.journaled.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A message is done with: its bytes are free.
    fn give(&self, cost: usize) {
        self.bytes.fetch_sub(cost, Ordering::SeqCst);
        self.shared.give(cost);
    }
}

/// A received message on its way from paho's callback (or the journal) to the node's task.
struct Inbound {
    source: Source,
    /// Its record in the input journal.
    seq: Option<u64>,
    /// What it counts against the budgets ([`message_cost`]).
    cost: usize,
    /// The connection it came on (counted up at each connect; 0 for a replayed one).
    connection: u64,
}

enum Source {
    Live(paho::Message),
    /// Received by an earlier run and not finished then.
    Replayed(Received),
}

impl Source {
    fn topic(&self) -> &str {
        match self {
            Source::Live(m) => m.topic(),
            Source::Replayed(r) => &r.topic,
        }
    }

    fn payload(&self) -> &[u8] {
        match self {
            Source::Live(m) => m.payload(),
            Source::Replayed(r) => &r.payload,
        }
    }

    fn qos(&self) -> i32 {
        match self {
            Source::Live(m) => m.qos() as i32,
            Source::Replayed(r) => i32::from(r.qos),
        }
    }

    fn retained(&self) -> bool {
        match self {
            Source::Live(m) => m.retained(),
            Source::Replayed(r) => r.retained,
        }
    }

    /// The `Duplicate` flag and the packet id. A replayed message is flagged: the flow may
    /// have seen it before the daemon stopped.
    fn wire(&self) -> (bool, u16) {
        match self {
            Source::Live(m) if m.qos() as i32 > 0 => {
                let (dup, id) = wire_info(m);
                (dup, id as u16)
            }
            Source::Live(_) => (false, 0),
            Source::Replayed(r) => (true, r.msgid),
        }
    }

    fn user_properties(&self) -> Option<Value> {
        match self {
            Source::Live(m) => user_properties(m.properties()),
            Source::Replayed(r) if r.user_properties.is_empty() => None,
            Source::Replayed(r) => Some(Value::Object(
                r.user_properties
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            )),
        }
    }
}

/// A message the node holds until its propagation ends: then its journal record is marked
/// done and its bytes given back. Dropped without finishing (the task aborted at a stop
/// deadline), it gives back its bytes but leaves the record, to be processed at the next
/// start.
struct Held {
    load: Arc<Load>,
    journal: Option<Arc<Journal>>,
    seq: Option<u64>,
    cost: usize,
}

impl Held {
    /// The message is done with (processed, or skipped as a redelivery).
    fn done(mut self) {
        if let (Some(j), Some(seq)) = (&self.journal, self.seq.take()) {
            j.done(seq);
            self.load.journal_bytes.store(j.bytes(), Ordering::SeqCst);
        }
    }
}

impl Hold for Held {
    fn finished(self) {
        self.done();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.load.give(self.cost);
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
    /// Whether any topic is subscribed at QoS 1 or 2.
    any_qos: bool,
    /// Whether QoS 1/2 messages go to the input journal.
    journal: bool,
    /// What the broker queues for a disconnected session, when known (0: no limit).
    broker_queue_limit: Option<u64>,
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
            self.retire_journal();
            if self.clean_session {
                return;
            }
            let cid = self.client_id();
            let result = crate::mqtt::end_session(ConnSpec {
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
                self.entry(severity, bip::RETIRED, message)
                    .tag("url", self.endpoint.url.clone())
                    .tag("client_id", cid),
            );
        })
    }
}

impl Subscribe {
    /// An activity-log entry of this node, before it has a connection to tag it with.
    fn entry(
        &self,
        severity: Severity,
        number: u32,
        message: String,
    ) -> flowbus_runtime::activity::NewEntry {
        flowbus_runtime::activity::NewEntry::new(
            severity, number, "MQTT", &self.flow, &self.node, message,
        )
    }

    /// The flow is removed: its input journal goes with it, saying what it still held.
    fn retire_journal(&self) {
        let cid = self.client_id();
        let dir = journal_dir(&self.config.data_dir, &cid);
        if !dir.exists() {
            return;
        }
        let (severity, message) = match Journal::open(&dir) {
            Ok(o) => {
                let n = o.unfinished.len();
                match o.journal.destroy() {
                    Ok(()) if n == 0 => return,
                    Ok(()) => (
                        Severity::Warning,
                        format!("The flow was removed with {n} received message(s) in its input journal {} not processed: deleted with it", dir.display()),
                    ),
                    Err(e) => (
                        Severity::Error,
                        format!("The flow was removed; its input journal {} could not be deleted: {e}", dir.display()),
                    ),
                }
            }
            Err(e) => (
                Severity::Error,
                format!("The flow was removed; its input journal {} could not be opened to delete it: {e}", dir.display()),
            ),
        };
        self.services.activity.record(
            self.entry(severity, bip::JOURNAL_ERROR, message)
                .tag("client_id", cid)
                .tag("dir", dir.display().to_string()),
        );
    }

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
                self.services.activity.record(self.entry(
                    Severity::Error,
                    bip::CONNECTION_FAILURE,
                    m.clone(),
                ));
                ctx.fail_flow(m);
                return;
            }
        };
        let log = conn.log.clone();
        // Aborted at a stop deadline, this task is dropped mid-way: the connection must not
        // stay subscribed behind it.
        let _abandon = crate::mqtt::AbandonOnDrop(conn.clone());

        let (tx, mut rx) = mpsc::unbounded_channel::<Inbound>();
        let load = Arc::new(Load::new(self.services.input.clone()));
        let _queued = QueuedAtAbort {
            load: load.clone(),
            log: log.clone(),
        };
        let mut redeliveries = Redeliveries::new();
        let journal = self.open_journal(&log, &tx, &load, &mut redeliveries);
        let high_water = Arc::new(Notify::new());
        // Paused by the callback at a mark; resumed by the loop.
        let paused = Arc::new(Receipt::new(conn.want_handle()));
        // Counted up at each connect, on paho's thread before the connection's first message:
        // a broker's resends come first on a new connection.
        let connection = Arc::new(AtomicU64::new(0));
        {
            let connection = connection.clone();
            conn.client.set_connected_callback(move |_| {
                connection.fetch_add(1, Ordering::SeqCst);
            });
        }
        {
            let load = load.clone();
            let high_water = high_water.clone();
            let paused = paused.clone();
            let stats = log.stats.clone();
            let marks = self.marks;
            let journal = journal.clone();
            let log = log.clone();
            let journal_failed = std::sync::atomic::AtomicBool::new(false);
            // Runs on the Paho library thread: never block here.
            conn.client.set_message_callback(move |_, m| {
                let Some(m) = m else { return };
                let len = m.payload().len();
                inc(&stats.messages_received);
                add(&stats.bytes_received, len as u64);
                let cost = message_cost(m.topic(), m.payload());
                // Written before this returns, so before paho acknowledges the message: the
                // broker forgets it only once the journal has it.
                let seq = match (&journal, m.qos()) {
                    (Some(j), q) if q as i32 > 0 => {
                        journal_append(j, &m, &load, &log, &journal_failed)
                    }
                    _ => None,
                };
                let (d, b) = load.take(cost, seq.is_some());
                let _ = tx.send(Inbound {
                    source: Source::Live(m),
                    seq,
                    cost,
                    connection: connection.load(Ordering::SeqCst),
                });
                // Paused from here, not by the node's task: that task may be inside a slow
                // propagation, and the client acknowledges on receipt, so the broker streams
                // on until the connection closes (a burst of 1 MiB messages was 30 MiB past a
                // 4 MiB mark when the task got to it). The task logs it. The counts just made
                // are a cheap first look; the decision takes them as they are under the lock.
                let first_look =
                    marks.over(d, b) || load.shared.spent() || load.journal() >= marks.journal_high;
                if first_look && paused.pause_if_over(&marks, &load) {
                    high_water.notify_one();
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
        let mut dispatcher = Dispatcher::new(ctx.clone(), self.instances, self.in_flight);
        // Summaries of sampled "Received" entries are due once a second, even when no further
        // message comes to trigger one; a pause for the daemon's budget is looked at as often.
        let mut summaries = tokio::time::interval(Duration::from_secs(1));
        summaries.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let rx_ref = &mut rx;
        // Made once: each select! below only polls it (no waiter registered per message).
        let stopped = ctx.cancel().cancelled();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                reason = &mut fatal => {
                    ctx.fail_flow(reason);
                    break;
                }
                _ = high_water.notified() => {
                    // The callback paused receipt; say so (unless the flow caught up and
                    // resumed in the meantime).
                    if paused.is_paused() {
                        inc(&log.stats.receipt_pauses);
                        log.record(self.pause_entry(&log, &load));
                    }
                }
                m = rx_ref.recv() => {
                    let Some(m) = m else { break };
                    self.deliver(m, &load, &journal, &log, &sampler, &mut redeliveries, &mut dispatcher).await;
                    self.resume_if_caught_up(&paused, &load, &log);
                }
                // A propagation that ends gives back its bytes: that may be what lets a pause
                // end (the queue may have been empty for a while).
                _ = dispatcher.progress() => {
                    self.resume_if_caught_up(&paused, &load, &log);
                }
                _ = summaries.tick() => {
                    if let Some(n) = sampler.overdue() {
                        received_summary(&log, n);
                    }
                    self.resume_if_caught_up(&paused, &load, &log);
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
        conn.client.remove_connected_callback();
        while let Ok(m) = rx.try_recv() {
            self.deliver(
                m,
                &load,
                &journal,
                &log,
                &sampler,
                &mut redeliveries,
                &mut dispatcher,
            )
            .await;
        }
        dispatcher.drain().await;
        if let Some(n) = sampler.flush() {
            received_summary(&log, n);
        }
    }

    /// Opens the node's input journal (unless it is off, or the node receives at QoS 0 only)
    /// and queues what an earlier run received and did not finish, first, in order.
    fn open_journal(
        &self,
        log: &LogCtx,
        tx: &mpsc::UnboundedSender<Inbound>,
        load: &Arc<Load>,
        redeliveries: &mut Redeliveries,
    ) -> Option<Arc<Journal>> {
        if !self.journal || !self.any_qos {
            return None;
        }
        let dir = journal_dir(&self.config.data_dir, &log.client_id);
        let opened = match Journal::open(&dir) {
            Ok(o) => o,
            Err(e) => {
                log.record(
                    log.entry(
                        Severity::Error,
                        bip::JOURNAL_ERROR,
                        format!(
                            "Cannot open the input journal {}: {e}. Receiving without it: a QoS 1/2 message is acknowledged to the broker on receipt, so what the daemon holds is lost if it dies before processing it",
                            dir.display()
                        ),
                    )
                    .tag("dir", dir.display().to_string()),
                );
                return None;
            }
        };
        for d in &opened.damage {
            log.record(
                log.entry(Severity::Error, bip::JOURNAL_ERROR, format!("The input journal is damaged: {d}; the records before the damage are processed"))
                    .tag("dir", dir.display().to_string()),
            );
        }
        let journal = Arc::new(opened.journal);
        let n = opened.unfinished.len();
        if n > 0 {
            log.record(
                log.entry(
                    Severity::Warning,
                    bip::JOURNAL_REPLAY,
                    format!(
                        "{n} message(s) received before the daemon last stopped were not finished; processing them first, in the order received, flagged Duplicate (the flow may have handled some of them already)"
                    ),
                )
                .tag("count", n)
                .tag("dir", dir.display().to_string()),
            );
        }
        for (seq, r) in opened.unfinished {
            let cost = message_cost(&r.topic, &r.payload);
            // The broker may send it again too, if the acknowledgement did not get out.
            redeliveries.remember(r.msgid, &r.topic, &r.payload);
            load.take(cost, true);
            let _ = tx.send(Inbound {
                source: Source::Replayed(r),
                seq: Some(seq),
                cost,
                connection: 0,
            });
        }
        load.journal_bytes.store(journal.bytes(), Ordering::SeqCst);
        Some(journal)
    }

    /// The BIP12101 warning for a pause: what is held against which budget, and what the
    /// broker will do with the backlog.
    fn pause_entry(&self, log: &LogCtx, load: &Load) -> flowbus_runtime::activity::NewEntry {
        let m = &self.marks;
        let (queued, held) = (load.queued(), load.bytes());
        let shared = &load.shared;
        let mut msg = format!(
            "The flow is behind: {queued} messages queued (queue_high {}), {held} bytes held (queue_high_bytes {}; input journal {} of {}; all subscribers {} of [mqtt] input_budget {}); pausing receipt until they are down to {} and {}",
            m.high,
            m.high_bytes,
            load.journal(),
            m.journal_high,
            shared.held(),
            shared.limit(),
            m.low,
            m.low_bytes
        );
        let qos0 = !self.any_qos;
        if self.clean_session || qos0 {
            msg.push_str(if qos0 {
                ". It subscribes at QoS 0, so messages published while it is paused are not kept by the broker: they are lost"
            } else {
                ". It uses a clean session, so messages published while it is paused are not kept by the broker: they are lost"
            });
        } else {
            match self.broker_queue_limit {
                Some(0) => msg.push_str(&format!(
                    ". The broker at {} keeps what arrives meanwhile for client id '{}' (broker_queue_limit 0: no limit)",
                    log.url, log.client_id
                )),
                Some(n) => msg.push_str(&format!(
                    ". The broker at {} keeps what arrives meanwhile for client id '{}' up to {n} messages (broker_queue_limit) and drops the rest: raise its limit (mosquitto: max_queued_messages) or this node's queue_high_bytes",
                    log.url, log.client_id
                )),
                None => msg.push_str(&format!(
                    ". The broker at {} keeps what arrives meanwhile for client id '{}' up to its own limit and drops the rest (mosquitto keeps 1000 by default: max_queued_messages); set broker_queue_limit for this server to have flowbus doctor check it",
                    log.url, log.client_id
                )),
            }
        }
        let mut e = log
            .entry(Severity::Warning, bip::FLOW_CONTROL, msg)
            .tag("queued", queued)
            .tag("held_bytes", held);
        if let Some(n) = self.broker_queue_limit {
            e = e.tag("broker_queue_limit", n);
        }
        e
    }

    /// Ends a pause once the flow has worked what the node holds down to the low marks.
    fn resume_if_caught_up(&self, paused: &Receipt, load: &Load, log: &LogCtx) {
        if let Some((queued, held)) = paused.resume_if_under(&self.marks, load) {
            log.record(log.entry(
                Severity::Info,
                bip::FLOW_CONTROL,
                format!(
                    "The flow caught up ({queued} queued, {held} bytes held); resuming receipt"
                ),
            ));
        }
    }

    /// Hands one received message to the flow; what the node holds of it is given back when
    /// its propagation ends.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        m: Inbound,
        load: &Arc<Load>,
        journal: &Option<Arc<Journal>>,
        log: &LogCtx,
        sampler: &Sampler,
        redeliveries: &mut Redeliveries,
        dispatcher: &mut Dispatcher,
    ) {
        // Not counted as queued once here: nothing awaits before it is in the dispatcher
        // (which counts it until it is done). Its bytes stay counted until its propagation
        // ends.
        load.dequeued(m.seq.is_some());
        let held = Held {
            load: load.clone(),
            journal: journal.clone(),
            seq: m.seq,
            cost: m.cost,
        };
        let src = &m.source;
        let qos = src.qos();
        let (dup, msgid) = src.wire();
        let replayed = matches!(src, Source::Replayed(_));
        if qos > 0
            && !replayed
            && redeliveries.is_redelivery(m.connection, dup, msgid, src.topic(), src.payload())
        {
            // Already received before a pause or reconnect: the broker sent it again because
            // our acknowledgement had not reached it.
            inc(&log.stats.redeliveries_skipped);
            held.done();
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
                        src.topic(),
                        src.payload().len()
                    ),
                )
                .tag("topic", src.topic())
                .tag("qos", qos),
            );
        }
        if let Err(e) =
            mqtt_limits::check_payload("the payload", src.payload().len(), self.max_payload)
        {
            // Not parsed: a JSON payload becomes many times its size in trees. The body is
            // left empty, so the Failure path holds nothing of it.
            let msg = received_message(
                Body::Blob(Vec::new()),
                src.topic(),
                qos,
                dup,
                src.retained(),
                src.user_properties(),
            );
            let x = oversized(&e, src.topic());
            drop(m);
            dispatcher.submit_holding(msg, Some(x), held).await;
            return;
        }
        let (body, error) = match Body::parse(self.domain, src.payload()) {
            Ok(b) => (b, None),
            Err(e) => (Body::Blob(src.payload().to_vec()), Some(*e)),
        };
        let msg = received_message(
            body,
            src.topic(),
            qos,
            dup,
            src.retained(),
            src.user_properties(),
        );
        drop(m);
        dispatcher.submit_holding(msg, error, held).await;
    }
}

/// Appends a received QoS 1/2 message to the journal; on failure says so once (until it works
/// again) and lets the message go on unjournaled.
fn journal_append(
    j: &Journal,
    m: &paho::Message,
    load: &Load,
    log: &LogCtx,
    failed: &std::sync::atomic::AtomicBool,
) -> Option<u64> {
    let props: Vec<(String, String)> = if m.properties().is_empty() {
        Vec::new()
    } else {
        m.properties().user_iter().collect()
    };
    let (dup, msgid) = wire_info(m);
    let r = j.append(&Incoming {
        topic: m.topic(),
        payload: m.payload(),
        qos: m.qos() as u8,
        retained: m.retained(),
        dup,
        msgid: msgid as u16,
        user_properties: &props,
    });
    match r {
        Ok(seq) => {
            load.journal_bytes.store(j.bytes(), Ordering::SeqCst);
            if failed.swap(false, Ordering::SeqCst) {
                log.record(log.entry(
                    Severity::Info,
                    bip::JOURNAL_ERROR,
                    "The input journal is written again".to_string(),
                ));
            }
            Some(seq)
        }
        Err(e) => {
            if !failed.swap(true, Ordering::SeqCst) {
                log.record(log.entry(
                    Severity::Error,
                    bip::JOURNAL_ERROR,
                    format!(
                        "Cannot write the input journal: {e}. Received messages are held in memory only until it can be written again (free disk space under the data directory): what is held is lost if the daemon dies"
                    ),
                ));
            }
            None
        }
    }
}

/// Where a subscriber's input journal lives: `<data_dir>/input/<client id>` (client ids are
/// checked to make a file name: see `check_common`).
pub fn journal_dir(data_dir: &std::path::Path, client_id: &str) -> std::path::PathBuf {
    data_dir.join("input").join(client_id)
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
/// aborted at a stop deadline. Paho acknowledged them to the broker on receipt: those in the
/// journal are processed at the next start, the others (QoS 0, or no journal) are lost; the
/// activity log says how many (the flow's dispatcher reports those it had started).
struct QueuedAtAbort {
    load: Arc<Load>,
    log: LogCtx,
}

impl Drop for QueuedAtAbort {
    fn drop(&mut self) {
        let n = self.load.queued();
        let journaled = self.load.journaled.load(Ordering::SeqCst).min(n);
        let lost = n - journaled;
        let log = &self.log;
        if lost > 0 {
            log.record(
                log.entry(
                    Severity::Error,
                    flowbus_runtime::daemon::bip::ABANDONED_AT_STOP,
                    format!(
                        "{lost} received message(s) were still queued when the flow was stopped at its deadline and are not in the input journal (QoS 0, or no journal); the MQTT client had acknowledged them to {}, so they are lost. Raise [daemon] shutdown_timeout if the flow needs longer to finish what it received",
                        log.url
                    ),
                )
                .tag("count", lost),
            );
        }
        if journaled > 0 {
            log.record(
                log.entry(
                    Severity::Warning,
                    flowbus_runtime::daemon::bip::ABANDONED_AT_STOP,
                    format!(
                        "{journaled} received message(s) were still queued when the flow was stopped at its deadline; they are in the input journal and are processed when the flow starts again"
                    ),
                )
                .tag("count", journaled),
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
            journal_high: 4000,
            journal_low: 1000,
        }
    }

    fn load(queued: usize, bytes: usize) -> Load {
        let l = Load::new(Arc::new(InputBudget::new(1 << 30)));
        l.depth.store(queued, Ordering::SeqCst);
        l.bytes.store(bytes, Ordering::SeqCst);
        l
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
                let l = load(queued, 0);
                for _ in 0..20_000 {
                    if pause {
                        let _ = r.pause_if_over(&marks(), &l);
                    } else {
                        let _ = r.resume_if_under(&marks(), &l);
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
        let l = load(0, 0);
        // The callback saw 11 queued; the task has taken them all since.
        assert!(marks().over(11, 0));
        assert!(!r.pause_if_over(&marks(), &l));
        assert_eq!(*rx.borrow(), Want::Up);
        // Over now: paused; a second pause does nothing; resumed once down to the low marks.
        l.depth.store(11, Ordering::SeqCst);
        assert!(r.pause_if_over(&marks(), &l));
        assert!(!r.pause_if_over(&marks(), &l));
        assert_eq!(*rx.borrow(), Want::Paused);
        l.depth.store(3, Ordering::SeqCst);
        assert_eq!(r.resume_if_under(&marks(), &l), None);
        l.depth.store(2, Ordering::SeqCst);
        assert_eq!(r.resume_if_under(&marks(), &l), Some((2, 0)));
        assert_eq!(*rx.borrow(), Want::Up);
        assert!(!r.is_paused());
    }

    /// The journal's files count as held bytes, and the daemon's budget pauses a node that is
    /// itself within its own; it resumes once both have room.
    #[test]
    fn the_journal_and_the_daemons_budget_pause_receipt_too() {
        let (tx, rx) = tokio::sync::watch::channel(Want::Up);
        let r = Receipt::new(tx);
        let l = load(0, 100);
        l.journal_bytes.store(3999, Ordering::SeqCst);
        assert!(!r.pause_if_over(&marks(), &l));
        l.journal_bytes.store(4000, Ordering::SeqCst);
        assert!(r.pause_if_over(&marks(), &l));
        l.journal_bytes.store(1001, Ordering::SeqCst);
        assert_eq!(r.resume_if_under(&marks(), &l), None);
        l.journal_bytes.store(1000, Ordering::SeqCst);
        assert_eq!(r.resume_if_under(&marks(), &l), Some((0, 100)));
        // The journal frees its files a segment at a time and keeps the newest: its marks are
        // never below eight and two segments, whatever queue_high_bytes says.
        let m = Marks::new(10, 2, 256 << 10);
        let seg = crate::input_journal::SEGMENT_SIZE as u64;
        assert_eq!((m.journal_high, m.journal_low), (8 * seg, 2 * seg));
        assert_eq!(Marks::new(10, 2, 1 << 30).journal_high, 1 << 30);
        // Another subscriber spent the daemon's budget.
        let shared = Arc::new(InputBudget::new(1000));
        let l = Load::new(shared.clone());
        shared.take(1000);
        assert!(r.pause_if_over(&marks(), &l));
        assert_eq!(*rx.borrow(), Want::Paused);
        shared.give(400);
        assert_eq!(r.resume_if_under(&marks(), &l), None, "not below half yet");
        shared.give(100);
        assert_eq!(r.resume_if_under(&marks(), &l), Some((0, 0)));
        // A message counts against both, and is given back to both.
        l.take(300, true);
        assert_eq!((l.queued(), l.bytes(), shared.held()), (1, 300, 800));
        l.dequeued(true);
        l.give(300);
        assert_eq!((l.queued(), l.bytes(), shared.held()), (0, 0, 500));
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
        let m = Marks::new(100, 25, 4096);
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
        let l = Arc::new(load(0, 0));
        l.take(200, false);
        l.dequeued(false);
        let held = Held {
            load: l.clone(),
            journal: None,
            seq: None,
            cost: 200,
        };
        assert_eq!(l.bytes(), 200);
        drop(held);
        assert_eq!(l.bytes(), 0);
        assert_eq!(l.shared.held(), 0);
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
