//! `Timer`: an input node that produces a message every `interval` (the first one interval
//! after the start) (at most `count` of them;
//! 0 means no limit) with `payload` as its body — for demos and tests without a broker.
//! `LocalEnvironment.Timer.Input.Count` holds the message's number, from 1.

use std::sync::Arc;
use std::time::Duration;

use flowbus_runtime::engine::{Dispatcher, InputCtx};
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::message::{Body, Domain, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, InputNode, NodeDecl, NodeKind, NodeSpec, Problem, PropKind,
    PropSpec, ValidateCtx,
};
use serde_json::Value;

static SPEC: NodeSpec = NodeSpec {
    type_name: "Timer",
    inputs: &[],
    outputs: &["Out", "Catch"],
    props: &[
        PropSpec::opt("interval", PropKind::Duration),
        PropSpec::opt(
            "count",
            PropKind::Int {
                min: 0,
                max: i64::MAX,
            },
        ),
        PropSpec::opt("payload", PropKind::Any),
        PropSpec::opt("domain", PropKind::Enum(&["JSON", "TEXT"])),
    ],
};

/// The Timer node kind.
pub struct TimerKind;

impl NodeKind for TimerKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn check(&self, node: &NodeDecl, _ctx: &ValidateCtx) -> Vec<Problem> {
        if node.duration("interval").is_some_and(|d| d.is_zero()) {
            return vec![Problem::at(
                "interval",
                FlowErrorKind::BadValue {
                    property: "interval".into(),
                    message: "must be longer than zero, e.g. \"100ms\"".into(),
                },
            )];
        }
        let text = node.str("domain") == Some("TEXT");
        match node.props.get("payload") {
            Some(v) if text && !v.is_string() => vec![Problem::at(
                "payload",
                FlowErrorKind::BadValue {
                    property: "payload".into(),
                    message: "with domain TEXT the payload must be a string".into(),
                },
            )],
            _ => Vec::new(),
        }
    }

    fn build(&self, node: &NodeDecl, _ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        let payload = node
            .props
            .get("payload")
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        let domain = node
            .str("domain")
            .and_then(Domain::parse)
            .unwrap_or(Domain::Json);
        let body = match (domain, payload) {
            (Domain::Text, Value::String(s)) => Body::Text(s),
            (_, v) => Body::Json(v),
        };
        Ok(BuiltNode::Input(Arc::new(Timer {
            interval: node.duration("interval").unwrap_or(Duration::from_secs(1)),
            count: node.int("count").unwrap_or(0) as u64,
            body,
        })))
    }
}

struct Timer {
    interval: Duration,
    count: u64,
    body: Body,
}

impl InputNode for Timer {
    fn run(self: Arc<Self>, ctx: InputCtx) -> BoxFut<'static, ()> {
        Box::pin(async move {
            let mut dispatcher = Dispatcher::new(ctx.clone(), 1, 1);
            // The first message comes one interval after the start, as with IIB's timer nodes
            // (and so that the flows it feeds have subscribed by then).
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + self.interval,
                self.interval,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while self.count == 0 || n < self.count {
                tokio::select! {
                    biased;
                    _ = ctx.cancel().cancelled() => break,
                    _ = tick.tick() => {}
                }
                n += 1;
                let mut msg = Message::new(self.body.clone());
                msg.set_local(&["Timer", "Input", "Count"], Value::from(n));
                dispatcher.submit(msg).await;
            }
            dispatcher.drain().await;
        })
    }
}
