//! `TryCatch`: propagates to `Try`; an exception thrown on that path comes back here and the
//! message *as it arrived* (the try path's changes undone) goes to `Catch` with the new
//! `ExceptionList`. With `Catch` unconnected the message is discarded, and the activity log
//! says so (IIB discards silently; we never do).

use std::sync::Arc;

use flowbus_runtime::activity::{NewEntry, Severity};
use flowbus_runtime::engine::Outputs;
use flowbus_runtime::message::{numbers, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, Thrown,
};

static SPEC: NodeSpec = NodeSpec {
    type_name: "TryCatch",
    inputs: &["In"],
    outputs: &["Try", "Catch"],
    props: &[],
};

/// The TryCatch node kind.
pub struct TryCatchKind;

impl NodeKind for TryCatchKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn build(&self, _node: &NodeDecl, _ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        Ok(BuiltNode::Processing(Arc::new(TryCatch)))
    }
}

struct TryCatch;

impl ProcessingNode for TryCatch {
    fn process<'a>(
        &'a self,
        msg: Message,
        out: Outputs<'a>,
    ) -> BoxFut<'a, Result<(), NodeFailure>> {
        Box::pin(async move {
            let arrived = msg.clone();
            let Err(Thrown(e)) = out.propagate("Try", msg).await else {
                return Ok(());
            };
            if out.is_connected("Catch") {
                out.record_error(
                    NewEntry::new(
                        Severity::Warning,
                        numbers::TRYCATCH_CAUGHT,
                        "Flow",
                        out.flow_name(),
                        out.node_id(),
                        format!("exception caught by TryCatch '{}', message routed to its Catch terminal: {e}", out.node_id()),
                    )
                    .tag("exception", e.to_tree()),
                );
                out.propagate("Catch", arrived.with_exception(e)).await?;
            } else {
                out.record_error(
                    NewEntry::new(
                        Severity::Error,
                        numbers::TRYCATCH_DISCARDED,
                        "Flow",
                        out.flow_name(),
                        out.node_id(),
                        format!("exception caught by TryCatch '{}' whose Catch terminal is not connected; message discarded: {e}", out.node_id()),
                    )
                    .tag("exception", e.to_tree()),
                );
            }
            Ok(())
        })
    }
}
