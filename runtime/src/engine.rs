//! The propagation engine: a built [`Flow`] is a vector of node slots, each with its output
//! terminals and the slots they lead to. Propagation is depth-first in connection order; the
//! engine (not the nodes) counts messages, routes errors to `Failure`, throws exceptions
//! upstream, and handles them at the input node (`Catch`, or log and discard).
//!
//! Concurrency: an input node hands each message to a [`Dispatcher`], which runs up to
//! `window` propagations of that input node at once inside the input node's task (or, with
//! `instances > 1`, on up to `instances` spawned tasks). Each new propagation is polled once
//! as soon as it is submitted, so everything a flow does before its first await (all the
//! synchronous nodes, and the *enqueueing* of a publish) happens in arrival order; only the
//! waiting (for acks) overlaps. See `docs/ARCHITECTURE.md`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::activity::{NewEntry, Sampler, Severity};
use crate::message::{numbers, Exception, ExceptionKind, Message};
use crate::node::{BoxFut, BuiltNode, InputNode, NodeFailure, ProcessingNode, Thrown};
use crate::services::Services;
use crate::stats::{inc, names};
use crate::telemetry::{Hist, HistSnapshot};

/// Cancellation: a flow's token fires when the flow stops or fails, and each node's is a
/// child of it.
pub use tokio_util::sync::CancellationToken;

/// Watches propagation (the test harness records what reaches each terminal).
pub trait Observer: Send + Sync {
    /// A message leaves `node` through `terminal` (connected or not).
    fn on_propagate(&self, node: &str, terminal: &str, msg: &Message);
    /// A message was discarded after an exception that nothing caught.
    fn on_discard(&self, _node: &str, _exception: &Exception) {}
}

/// One output terminal of a slot.
pub(crate) struct Terminal {
    pub(crate) name: &'static str,
    pub(crate) targets: Vec<usize>,
    pub(crate) count: Arc<AtomicU64>,
}

/// Counters of one node.
/// Shared with the telemetry registry (see [`Flow::start`]), so the Prometheus view and the
/// JSON view read the same atomics.
#[derive(Default)]
pub(crate) struct NodeCounters {
    pub(crate) invocations: Arc<AtomicU64>,
    pub(crate) errors: Arc<AtomicU64>,
    pub(crate) discards: Arc<AtomicU64>,
    pub(crate) busy_nanos: AtomicU64,
    /// Time in the node, downstream included; for an input node, the whole propagation.
    pub(crate) processing: Arc<Hist>,
}

pub(crate) enum Imp {
    Processing(Arc<dyn ProcessingNode>),
    Input(Arc<dyn InputNode>),
}

pub(crate) struct Slot {
    pub(crate) id: String,
    pub(crate) type_name: &'static str,
    pub(crate) imp: Imp,
    pub(crate) outputs: Vec<Terminal>,
    pub(crate) counters: NodeCounters,
    /// A child of the flow's token.
    pub(crate) cancel: CancellationToken,
    /// Rate limit for this node's per-message error entries.
    pub(crate) error_log: Sampler,
}

/// The shared state of a built flow.
pub struct FlowInner {
    pub(crate) name: String,
    pub(crate) file: PathBuf,
    pub(crate) slots: Vec<Slot>,
    pub(crate) services: Arc<Services>,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    /// Fires when the flow stops or fails; the nodes' tokens are its children.
    pub(crate) cancel: CancellationToken,
    pub(crate) failure: Mutex<Option<String>>,
    /// Fires when `failure` is set.
    pub(crate) failed: CancellationToken,
}

impl FlowInner {
    fn terminal(&self, node: usize, terminal: &str) -> Option<&Terminal> {
        self.slots[node].outputs.iter().find(|t| t.name == terminal)
    }

    fn is_connected(&self, node: usize, terminal: &str) -> bool {
        self.terminal(node, terminal)
            .is_some_and(|t| !t.targets.is_empty())
    }

    /// Hands `msg` to every node connected to `node.terminal`, depth-first in connection order.
    /// Each branch gets its own copy-on-write view of the trees.
    fn propagate<'a>(
        &'a self,
        node: usize,
        terminal: &str,
        msg: Message,
    ) -> BoxFut<'a, Result<(), Thrown>> {
        let Some(t) = self.terminal(node, terminal) else {
            // Nodes only name terminals from their spec; an unknown one is a node bug, which we
            // report rather than lose the message.
            let e = Exception::new(
                ExceptionKind::Fatal,
                numbers::NODE_EXCEPTION,
                format!("node propagated to terminal '{terminal}', which its type does not have"),
            )
            .locate(&self.name, &self.slots[node].id, self.slots[node].type_name);
            return Box::pin(std::future::ready(Err(Thrown(e))));
        };
        inc(&t.count);
        if let Some(o) = &self.observer {
            o.on_propagate(&self.slots[node].id, t.name, &msg);
        }
        Box::pin(async move {
            match t.targets.as_slice() {
                [] => Ok(()),
                [only] => self.invoke(*only, msg).await,
                many => {
                    for &to in many {
                        self.invoke(to, msg.clone()).await?;
                    }
                    Ok(())
                }
            }
        })
    }

    /// Calls a processing node and routes its failure.
    async fn invoke(&self, node: usize, msg: Message) -> Result<(), Thrown> {
        let slot = &self.slots[node];
        let Imp::Processing(p) = &slot.imp else {
            // Validation refuses connections into input nodes.
            return Ok(());
        };
        inc(&slot.counters.invocations);
        // The message as it arrived: what goes to Failure (the node's own changes are undone).
        let arrived = msg.clone();
        let started = std::time::Instant::now();
        // A panic is caught where it happens, so the failure names the node that panicked.
        let result = match AssertUnwindSafe(p.process(msg, Outputs { flow: self, node }))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(panic) => {
                let e = Exception::new(
                    ExceptionKind::Fatal,
                    numbers::NODE_PANIC,
                    format!(
                        "node '{}' panicked: {}; the flow is stopped",
                        slot.id,
                        panic_text(&panic)
                    ),
                )
                .locate(&self.name, &slot.id, slot.type_name);
                inc(&slot.counters.errors);
                self.fail(e.to_string());
                return Err(Thrown(e));
            }
        };
        let took = started.elapsed();
        slot.counters
            .busy_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        slot.counters.processing.observe_duration(took);
        match result {
            Ok(()) => Ok(()),
            Err(NodeFailure::Thrown(t)) => Err(t),
            Err(NodeFailure::Error(e)) => {
                inc(&slot.counters.errors);
                let e = e.locate(&self.name, &slot.id, slot.type_name);
                if self.is_connected(node, "Failure") {
                    self.log_error(
                        node,
                        NewEntry::new(
                            Severity::Warning,
                            numbers::NODE_EXCEPTION,
                            "Flow",
                            &self.name,
                            &slot.id,
                            format!(
                                "error in node '{}', message routed to its Failure terminal: {e}",
                                slot.id
                            ),
                        )
                        .tag("exception", e.to_tree()),
                    );
                    self.propagate(node, "Failure", arrived.with_exception(e))
                        .await
                } else {
                    Err(Thrown(e))
                }
            }
        }
    }

    fn log(&self, e: NewEntry) {
        self.services.activity.record(e);
    }

    /// Records a per-message error entry of `node`, at most a few per second; the rest are
    /// counted and summarised.
    pub(crate) fn log_error(&self, node: usize, e: NewEntry) {
        let slot = &self.slots[node];
        let (admit, summary) = slot.error_log.admit();
        if let Some(n) = summary {
            self.summarise_errors(node, n);
        }
        if admit {
            self.log(e.per_message());
        }
    }

    fn summarise_errors(&self, node: usize, n: u64) {
        let slot = &self.slots[node];
        self.log(NewEntry::new(
            Severity::Warning,
            numbers::ERRORS_SUMMARISED,
            "Flow",
            &self.name,
            &slot.id,
            format!("{n} further error entries of node '{}' in the last second were not logged one by one (see the statistics)", slot.id),
        ).per_message());
    }

    /// Summaries that are due (`final_`: everything still counted, when the flow stops).
    fn summarise_due_errors(&self, final_: bool) {
        for (node, slot) in self.slots.iter().enumerate() {
            let due = if final_ {
                slot.error_log.flush()
            } else {
                slot.error_log.overdue()
            };
            if let Some(n) = due {
                self.summarise_errors(node, n);
            }
        }
    }
}

/// What a processing node uses to hand results on.
#[derive(Clone, Copy)]
pub struct Outputs<'a> {
    flow: &'a FlowInner,
    node: usize,
}

impl<'a> Outputs<'a> {
    /// Propagates to `terminal` and returns when that branch has finished (or thrown).
    pub fn propagate(&self, terminal: &str, msg: Message) -> BoxFut<'a, Result<(), Thrown>> {
        self.flow.propagate(self.node, terminal, msg)
    }

    /// Whether anything is connected to `terminal`.
    pub fn is_connected(&self, terminal: &str) -> bool {
        self.flow.is_connected(self.node, terminal)
    }

    /// The node's cancellation token (a child of its flow's): fires when the flow stops or
    /// fails, so that work that cannot yield (a running script) can end early.
    pub fn cancel(&self) -> &'a CancellationToken {
        &self.flow.slots[self.node].cancel
    }

    /// The flow name.
    pub fn flow_name(&self) -> &'a str {
        &self.flow.name
    }

    /// This node's id.
    pub fn node_id(&self) -> &'a str {
        &self.flow.slots[self.node].id
    }

    /// Activity log and statistics.
    pub fn services(&self) -> &'a Arc<Services> {
        &self.flow.services
    }

    /// Records a per-message error entry for this node, rate-limited like the engine's own.
    pub fn record_error(&self, e: NewEntry) {
        self.flow.log_error(self.node, e);
    }
}

/// A processing node's handle on its flow, given to [`ProcessingNode::start`] for what the node
/// does outside `process` (a connection's supervisor, say). It holds the flow weakly, so a task
/// that keeps it does not keep a stopped flow alive.
#[derive(Clone)]
pub struct NodeHandle {
    flow: Weak<FlowInner>,
    node: usize,
}

impl NodeHandle {
    /// Stops the flow because this node cannot work at all (its MQTT client could not be
    /// created, its persistence failed): as [`InputCtx::fail_flow`] for an input node, the
    /// flow is marked failed with `reason`, naming the node, and its inputs are cancelled; the
    /// daemon then stops it and shows it `failed` with the reason. Other flows go on.
    pub fn fail_flow(&self, reason: impl Into<String>) {
        if let Some(flow) = self.flow.upgrade() {
            let slot = &flow.slots[self.node];
            flow.fail(format!(
                "node '{}' ({}) failed: {}",
                slot.id,
                slot.type_name,
                reason.into()
            ));
        }
    }
}

/// What became of one input message.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Propagation finished normally.
    Completed,
    /// An exception was handled by the input node's `Catch` (or `Failure`) path.
    Caught,
    /// Nothing handled the exception: it was written to the activity log and the message
    /// discarded.
    Discarded(Exception),
}

/// An input node's handle on its flow.
#[derive(Clone)]
pub struct InputCtx {
    flow: Arc<FlowInner>,
    node: usize,
}

impl InputCtx {
    /// The node's cancellation token, a child of its flow's (fires on stop, or when the flow
    /// fails).
    pub fn cancel(&self) -> &CancellationToken {
        &self.flow.slots[self.node].cancel
    }

    /// The flow name.
    pub fn flow_name(&self) -> &str {
        &self.flow.name
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.flow.slots[self.node].id
    }

    /// Activity log and statistics.
    pub fn services(&self) -> &Arc<Services> {
        &self.flow.services
    }

    /// Whether anything is connected to `terminal`.
    pub fn is_connected(&self, terminal: &str) -> bool {
        self.flow.is_connected(self.node, terminal)
    }

    /// Propagates a received message to `Out`; an exception that comes back goes to `Catch`
    /// (with the original message) or, with nothing there, to the activity log.
    pub fn dispatch(&self, msg: Message) -> impl Future<Output = Disposition> + Send + 'static {
        let flow = self.flow.clone();
        let node = self.node;
        self.received(async move {
            let original = msg.clone();
            match flow.propagate(node, "Out", msg).await {
                Ok(()) => Disposition::Completed,
                Err(Thrown(e)) => catch_or_discard(&flow, node, original, e).await,
            }
        })
    }

    /// Wraps the handling of one received message, whichever path it takes (`Out`, `Catch`,
    /// `Failure`, discarded): the one place where an input node's invocations are counted and
    /// its processing time measured, so the JSON statistics, the Prometheus counters and the
    /// `flowbus stats` table all count every message the node received. Counted at once, when
    /// the message is handed over, so a message whose processing is later abandoned (a stop
    /// deadline) is counted too.
    fn received(
        &self,
        handling: impl Future<Output = Disposition> + Send + 'static,
    ) -> impl Future<Output = Disposition> + Send + 'static {
        let flow = self.flow.clone();
        let node = self.node;
        inc(&flow.slots[node].counters.invocations);
        guarded(flow.clone(), node, async move {
            let started = std::time::Instant::now();
            let d = handling.await;
            let took = started.elapsed();
            let counters = &flow.slots[node].counters;
            counters
                .busy_nanos
                .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            counters.processing.observe_duration(took);
            d
        })
    }

    /// Stops the flow because this input node cannot work at all (e.g. its client could not
    /// be created): the flow is marked failed with `reason` and its inputs are cancelled; the
    /// daemon then stops it and shows the reason. Other flows are not affected.
    pub fn fail_flow(&self, reason: impl Into<String>) {
        let slot = &self.flow.slots[self.node];
        let reason = format!(
            "input node '{}' ({}) failed: {}",
            slot.id,
            slot.type_name,
            reason.into()
        );
        self.flow.fail(reason);
    }

    /// A message the input node could not produce normally (e.g. a payload that does not
    /// parse): to `Failure` when connected, otherwise logged and discarded.
    pub fn fail(
        &self,
        msg: Message,
        exception: Exception,
    ) -> impl Future<Output = Disposition> + Send + 'static {
        let flow = self.flow.clone();
        let node = self.node;
        self.received(async move {
            let slot = &flow.slots[node];
            inc(&slot.counters.errors);
            let e = exception.locate(&flow.name, &slot.id, slot.type_name);
            if flow.is_connected(node, "Failure") {
                flow.log_error(
                    node,
                    NewEntry::new(
                        Severity::Warning,
                        numbers::NODE_EXCEPTION,
                        "Flow",
                        &flow.name,
                        &slot.id,
                        format!("input node '{}' could not take a message; routed to its Failure terminal: {e}", slot.id),
                    )
                    .tag("exception", e.to_tree()),
                );
                match flow
                    .propagate(node, "Failure", msg.with_exception(e.clone()))
                    .await
                {
                    Ok(()) => Disposition::Caught,
                    Err(Thrown(e2)) => discard(&flow, node, e2, Some(&e)),
                }
            } else {
                discard(&flow, node, e, None)
            }
        })
    }
}

async fn catch_or_discard(
    flow: &FlowInner,
    node: usize,
    original: Message,
    e: Exception,
) -> Disposition {
    let slot = &flow.slots[node];
    if !flow.is_connected(node, "Catch") {
        return discard(flow, node, e, None);
    }
    flow.log_error(
        node,
        NewEntry::new(
            Severity::Warning,
            numbers::INPUT_CAUGHT,
            "Flow",
            &flow.name,
            &slot.id,
            format!(
                "message rolled back to input node '{}' and routed to its Catch terminal: {e}",
                slot.id
            ),
        )
        .tag("exception", e.to_tree()),
    );
    match flow
        .propagate(node, "Catch", original.with_exception(e.clone()))
        .await
    {
        Ok(()) => Disposition::Caught,
        // An exception on the Catch path: nothing left to catch it.
        Err(Thrown(e2)) => discard(flow, node, e2, Some(&e)),
    }
}

/// Logs an exception nothing handled and counts the discarded message. `original` is the
/// exception a failing Catch (or Failure) path was handling.
fn discard(
    flow: &FlowInner,
    node: usize,
    e: Exception,
    original: Option<&Exception>,
) -> Disposition {
    let slot = &flow.slots[node];
    inc(&slot.counters.discards);
    if let Some(o) = &flow.observer {
        o.on_discard(&slot.id, &e);
    }
    let message = match original {
        None => format!(
            "message rolled back to input node '{}' and discarded (its Catch terminal is not connected): {e}",
            slot.id
        ),
        Some(first) => format!(
            "message rolled back to input node '{}' and discarded: its error path failed too: {e}; the exception it was handling: {first}",
            slot.id
        ),
    };
    let mut entry = NewEntry::new(
        Severity::Error,
        numbers::ROLLED_BACK_DISCARDED,
        "Flow",
        &flow.name,
        &slot.id,
        message,
    )
    .tag("exception", e.to_tree());
    if let Some(first) = original {
        entry = entry.tag("original_exception", first.to_tree());
    }
    flow.log_error(node, entry);
    Disposition::Discarded(e)
}

/// Runs a propagation, turning a panic into a fatal error that stops the flow (one failure
/// domain per flow).
fn guarded(
    flow: Arc<FlowInner>,
    node: usize,
    fut: impl Future<Output = Disposition> + Send + 'static,
) -> impl Future<Output = Disposition> + Send + 'static {
    AssertUnwindSafe(fut).catch_unwind().map(move |r| match r {
        Ok(d) => d,
        Err(panic) => {
            let what = panic_text(&panic);
            let e = Exception::new(
                ExceptionKind::Fatal,
                numbers::NODE_PANIC,
                format!("a node panicked: {what}; the flow is stopped"),
            )
            .locate(&flow.name, &flow.slots[node].id, flow.slots[node].type_name);
            flow.fail(e.to_string());
            discard(&flow, node, e, None)
        }
    })
}

/// The text of a panic payload.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl FlowInner {
    /// Marks the flow failed and stops its inputs.
    pub(crate) fn fail(&self, reason: String) {
        {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            // The first reason is the one that matters; later ones are consequences.
            if f.is_none() {
                *f = Some(reason);
            }
        }
        self.cancel.cancel();
        self.failed.cancel();
    }
}

/// What an input node keeps with a message while the flow has it
/// ([`Dispatcher::submit_holding`]).
pub trait Hold: Send + 'static {
    /// The message's propagation ended, whatever its disposition (delivered, routed to
    /// Failure or Catch, rolled back and discarded). Not called when it was abandoned.
    fn finished(self);
}

impl Hold for () {
    fn finished(self) {}
}

/// Runs an input node's propagations: up to `window` at once in the caller's task, or on up
/// to `instances` tasks. Submitting blocks (asynchronously) when the window is full — that is
/// the back-pressure an input node passes on to its source.
pub struct Dispatcher {
    ctx: InputCtx,
    window: usize,
    local: FuturesUnordered<BoxFut<'static, Disposition>>,
    spawned: Option<(Arc<Semaphore>, JoinSet<Disposition>)>,
}

impl Dispatcher {
    /// `instances` > 1 runs propagations in parallel on tasks (no order guarantee); otherwise
    /// up to `window` overlap in this task with effects in arrival order.
    pub fn new(ctx: InputCtx, instances: usize, window: usize) -> Dispatcher {
        let spawned =
            (instances > 1).then(|| (Arc::new(Semaphore::new(instances)), JoinSet::new()));
        Dispatcher {
            ctx,
            window: window.max(1),
            local: FuturesUnordered::new(),
            spawned,
        }
    }

    /// Starts a message through the flow; waits while the window is full.
    pub async fn submit(&mut self, msg: Message) {
        let fut = self.ctx.dispatch(msg);
        self.run(Box::pin(fut)).await;
    }

    /// Like [`submit`](Self::submit) for a message the input node failed to produce.
    pub async fn submit_failure(&mut self, msg: Message, e: Exception) {
        let fut = self.ctx.fail(msg, e);
        self.run(Box::pin(fut)).await;
    }

    /// Like [`submit`](Self::submit) (or [`submit_failure`](Self::submit_failure) with
    /// `failure`), keeping `hold` until the message's propagation has finished — then
    /// [`Hold::finished`] is called — or is abandoned (the task aborted at a stop deadline:
    /// then it is only dropped). An input node that budgets what it holds — MQTTSubscribe
    /// counts bytes — learns this way when a message stops costing memory (a propagation
    /// waiting for an ack still holds its trees), and one that journals what it received
    /// learns when a message is done with. Costs a second, small allocation per message.
    pub async fn submit_holding<H: Hold>(
        &mut self,
        msg: Message,
        failure: Option<Exception>,
        hold: H,
    ) {
        // The propagation is boxed on its own, as `submit` boxes it, and the guard goes in a
        // second, small box around it. An async block around the unboxed propagation (512
        // bytes in a release build) keeps it twice, captured and awaited: 1,056 bytes, past
        // the 1,032 that glibc serves from its per-thread cache, and that one allocation cost
        // 1,400 instructions a message instead of 50 (callgrind), 2 % of the daemon at QoS 0.
        let fut: BoxFut<'static, Disposition> = match failure {
            None => Box::pin(self.ctx.dispatch(msg)),
            Some(e) => Box::pin(self.ctx.fail(msg, e)),
        };
        self.run(Box::pin(async move {
            let d = fut.await;
            hold.finished();
            d
        }))
        .await;
    }

    async fn run(&mut self, mut fut: BoxFut<'static, Disposition>) {
        if let Some((sem, set)) = &mut self.spawned {
            // Closed never: the semaphore lives in self.
            if let Ok(permit) = sem.clone().acquire_owned().await {
                set.spawn(async move {
                    let d = fut.await;
                    drop(permit);
                    d
                });
            }
            while set.try_join_next().is_some() {}
            return;
        }
        // Run it up to its first await now, so synchronous effects keep arrival order.
        if futures::poll!(&mut fut).is_pending() {
            self.local.push(fut);
        }
        while self.local.len() >= self.window {
            self.local.next().await;
        }
    }

    /// Number of propagations not yet finished.
    pub fn in_flight(&self) -> usize {
        self.local.len() + self.spawned.as_ref().map_or(0, |(_, s)| s.len())
    }

    /// Drives in-flight propagations; resolves when one finishes, never when none is in
    /// flight (use it in `select!` next to the node's source).
    pub async fn progress(&mut self) {
        if let Some((_, set)) = &mut self.spawned {
            if set.join_next().await.is_none() {
                futures::future::pending::<()>().await;
            }
        } else if self.local.next().await.is_none() {
            futures::future::pending::<()>().await;
        }
    }

    /// Waits for every in-flight propagation.
    pub async fn drain(&mut self) {
        while self.local.next().await.is_some() {}
        if let Some((_, set)) = &mut self.spawned {
            while set.join_next().await.is_some() {}
        }
    }
}

/// Dropped with messages still in the flow, the dispatcher was aborted mid-way (a stop deadline
/// ran out): say how many were abandoned, where an operator looks.
impl Drop for Dispatcher {
    fn drop(&mut self) {
        // Spawned propagations that finished are not abandoned.
        if let Some((_, set)) = &mut self.spawned {
            while set.try_join_next().is_some() {}
        }
        let n = self.in_flight();
        if n > 0 {
            let flow = &self.ctx.flow;
            flow.log(NewEntry::new(
                Severity::Error,
                crate::daemon::bip::ABANDONED_AT_STOP,
                "Flow",
                &flow.name,
                self.ctx.node_id(),
                format!(
                    "{n} message(s) from input node '{}' were still in the flow when it was stopped at its deadline; their processing was abandoned, and they are lost unless their source sends them again. Raise [daemon] shutdown_timeout if the flow needs longer to finish",
                    self.ctx.node_id()
                ),
            ).tag("count", n));
        }
    }
}

/// Per-terminal and per-node counters of one flow.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeStatsSnapshot {
    /// Node id.
    pub node: String,
    /// Node type.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Times the node was called; for an input node, the messages it received, whichever
    /// terminal they left by (`Out`, `Failure`, `Catch`) or whether they were discarded.
    pub invocations: u64,
    /// Errors raised in the node.
    pub errors: u64,
    /// Messages discarded at this (input) node after an exception nothing handled.
    pub discards: u64,
    /// Total time in the node, downstream included, in microseconds.
    pub busy_micros: u64,
    /// Processing-time histogram (seconds); for an input node, whole propagations.
    pub processing: HistSnapshot,
    /// Messages per output terminal.
    pub terminals: std::collections::BTreeMap<String, u64>,
}

/// A built flow.
#[derive(Clone)]
pub struct Flow {
    pub(crate) inner: Arc<FlowInner>,
}

impl Flow {
    /// The flow name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The file it was loaded from.
    pub fn file(&self) -> &std::path::Path {
        &self.inner.file
    }

    /// Installs an observer (only before the flow is started or shared).
    pub fn set_observer(&mut self, o: Arc<dyn Observer>) -> bool {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.observer = Some(o);
                true
            }
            None => false,
        }
    }

    /// An input context for the node with this id, if it is an input node.
    pub fn input_ctx(&self, node_id: &str) -> Option<InputCtx> {
        let node = self.inner.slots.iter().position(|s| s.id == node_id)?;
        matches!(self.inner.slots[node].imp, Imp::Input(_)).then(|| InputCtx {
            flow: self.inner.clone(),
            node,
        })
    }

    /// Whether two handles are the same built flow.
    pub fn same(&self, other: &Flow) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Resolves when the flow fails (a node panicked, or an input node could not work).
    pub async fn failed(&self) {
        self.inner.failed.cancelled().await;
    }

    /// The number of nodes.
    pub fn node_count(&self) -> usize {
        self.inner.slots.len()
    }

    /// Why the flow failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Per-node counters.
    pub fn node_stats(&self) -> Vec<NodeStatsSnapshot> {
        self.inner
            .slots
            .iter()
            .map(|s| NodeStatsSnapshot {
                node: s.id.clone(),
                type_name: s.type_name.to_string(),
                invocations: s.counters.invocations.load(Ordering::Relaxed),
                errors: s.counters.errors.load(Ordering::Relaxed),
                discards: s.counters.discards.load(Ordering::Relaxed),
                busy_micros: s.counters.busy_nanos.load(Ordering::Relaxed) / 1000,
                processing: s.counters.processing.snapshot(),
                terminals: s
                    .outputs
                    .iter()
                    .map(|t| (t.name.to_string(), t.count.load(Ordering::Relaxed)))
                    .collect(),
            })
            .collect()
    }

    /// Puts this flow's counters and histograms into the telemetry registry, replacing the
    /// series of an earlier version of the flow.
    fn register_series(&self) {
        let t = &self.inner.services.telemetry;
        let flow = self.inner.name.as_str();
        t.remove_labelled("flow", flow);
        for s in &self.inner.slots {
            let node = s.id.as_str();
            let labels = [("flow", flow), ("node", node)];
            t.attach_counter(names::NODE_ERRORS, &labels, s.counters.errors.clone());
            t.attach_counter(
                names::NODE_INVOCATIONS,
                &labels,
                s.counters.invocations.clone(),
            );
            // Only input nodes discard (an exception that nothing caught ends there).
            if matches!(s.imp, Imp::Input(_)) {
                t.attach_counter(names::NODE_DISCARDS, &labels, s.counters.discards.clone());
            }
            t.attach_histogram(
                names::NODE_PROCESSING_SECONDS,
                &labels,
                s.counters.processing.clone(),
            );
            for term in &s.outputs {
                t.attach_counter(
                    names::NODE_MESSAGES,
                    &[("flow", flow), ("node", node), ("terminal", term.name)],
                    term.count.clone(),
                );
            }
        }
    }

    /// Ends what the flow's nodes keep beyond a stop — persistent sessions at brokers, files
    /// under the data directory — because the flow is being removed (through the API, or its
    /// file deleted). Never called on a stop or a redeploy, whose sessions go on (the broker
    /// keeps queuing for the next start, as IIB does). Call it once the flow has stopped (or
    /// never ran); the nodes retire at once, each within `deadline`. Returns the ids of the
    /// nodes that did not finish in time (they are abandoned).
    pub async fn retire(&self, deadline: Duration) -> Vec<String> {
        // A node bounds its own work by `deadline` and then says what it did; the grace lets
        // it finish saying so.
        let until = tokio::time::Instant::now() + deadline + Duration::from_secs(1);
        let retiring = self.inner.slots.iter().map(|slot| async move {
            let fut = match &slot.imp {
                Imp::Processing(p) => p.retire(deadline),
                Imp::Input(i) => i.retire(deadline),
            };
            tokio::time::timeout_at(until, fut)
                .await
                .is_err()
                .then(|| slot.id.clone())
        });
        futures::future::join_all(retiring)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Starts every input node on a task and a thread of its own (`input_task`). Must be
    /// called inside a tokio runtime.
    pub fn start(&self) -> RunningFlow {
        self.register_series();
        // Outputs before inputs: processing nodes get ready (connect) first.
        for (node, slot) in self.inner.slots.iter().enumerate() {
            if let Imp::Processing(p) = &slot.imp {
                p.clone().start(NodeHandle {
                    flow: Arc::downgrade(&self.inner),
                    node,
                });
            }
        }
        // Error summaries are due once a second, even when no further error comes to trigger
        // one.
        let weak = Arc::downgrade(&self.inner);
        let stopped = self.inner.cancel.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(flow) = weak.upgrade() else { break };
                flow.summarise_due_errors(false);
            }
        });
        let mut tasks = Vec::new();
        for (node, slot) in self.inner.slots.iter().enumerate() {
            if let Imp::Input(i) = &slot.imp {
                let ctx = InputCtx {
                    flow: self.inner.clone(),
                    node,
                };
                let fut = guarded(
                    self.inner.clone(),
                    node,
                    i.clone().run(ctx).map(|()| Disposition::Completed),
                );
                tasks.push((slot.id.clone(), crate::input_task::spawn(fut)));
            }
        }
        self.inner.log(NewEntry::new(
            Severity::Info,
            1001,
            "Flow",
            &self.inner.name,
            "",
            format!(
                "flow '{}' started ({} nodes)",
                self.inner.name,
                self.inner.slots.len()
            ),
        ));
        RunningFlow {
            flow: self.clone(),
            tasks,
        }
    }
}

/// A started flow.
pub struct RunningFlow {
    flow: Flow,
    tasks: Vec<(String, tokio::task::JoinHandle<Disposition>)>,
}

impl RunningFlow {
    /// The flow.
    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// Resolves when every input node has finished (a Timer that reached its count, a flow
    /// that failed or was stopped).
    pub async fn finished(&mut self) {
        for (_, t) in &mut self.tasks {
            let _ = t.await;
        }
        self.tasks.clear();
    }

    /// How long [`RunningFlow::stop`] waits for an input task it aborted to be dropped.
    pub const ABORT_GRACE: Duration = Duration::from_secs(2);

    /// Stops the inputs, lets them finish what they hold, and waits up to `deadline`. Returns
    /// the ids of input nodes that did not stop in time (they are aborted).
    pub async fn stop(mut self, deadline: Duration) -> Vec<String> {
        self.flow.inner.cancel.cancel();
        let until = tokio::time::Instant::now() + deadline;
        let mut late = Vec::new();
        for (id, mut t) in self.tasks.drain(..) {
            if tokio::time::timeout_at(until, &mut t).await.is_err() {
                t.abort();
                // An aborted task is dropped at its next yield (after the node it is running,
                // a script say, returns): wait for that, briefly, so what it drops reports
                // what it abandoned before the processing nodes stop and the daemon counts.
                let _ = tokio::time::timeout(Self::ABORT_GRACE, &mut t).await;
                late.push(id);
            }
        }
        let inner = &self.flow.inner;
        // Then the processing nodes, in reverse order, within what is left of the deadline.
        for slot in inner.slots.iter().rev() {
            if let Imp::Processing(p) = &slot.imp {
                if tokio::time::timeout_at(until, p.stop()).await.is_err() {
                    late.push(slot.id.clone());
                }
            }
        }
        inner.summarise_due_errors(true);
        let msg = if late.is_empty() {
            format!("flow '{}' stopped", inner.name)
        } else {
            format!(
                "flow '{}' stopped; nodes {} did not finish within {} and were aborted",
                inner.name,
                late.join(", "),
                crate::time::human(deadline)
            )
        };
        inner.log(NewEntry::new(
            if late.is_empty() {
                Severity::Info
            } else {
                Severity::Warning
            },
            1002,
            "Flow",
            &inner.name,
            "",
            msg,
        ));
        late
    }
}

/// Assembles a flow from built nodes (used by [`crate::flow::build_flow`]).
pub(crate) fn assemble(
    name: String,
    file: PathBuf,
    nodes: Vec<(String, &'static str, BuiltNode, &'static [&'static str])>,
    edges: Vec<(usize, String, usize)>,
    services: Arc<Services>,
) -> Flow {
    let cancel = CancellationToken::new();
    let mut slots: Vec<Slot> = nodes
        .into_iter()
        .map(|(id, type_name, built, outputs)| Slot {
            id,
            type_name,
            imp: match built {
                BuiltNode::Processing(p) => Imp::Processing(p),
                BuiltNode::Input(i) => Imp::Input(i),
            },
            outputs: outputs
                .iter()
                .map(|name| Terminal {
                    name,
                    targets: Vec::new(),
                    count: Arc::new(AtomicU64::new(0)),
                })
                .collect(),
            counters: NodeCounters::default(),
            cancel: cancel.child_token(),
            error_log: Sampler::new(10),
        })
        .collect();
    for (from, terminal, to) in edges {
        if let Some(t) = slots[from].outputs.iter_mut().find(|t| t.name == terminal) {
            t.targets.push(to);
        }
    }
    Flow {
        inner: Arc::new(FlowInner {
            name,
            file,
            slots,
            services,
            observer: None,
            cancel,
            failure: Mutex::new(None),
            failed: CancellationToken::new(),
        }),
    }
}
