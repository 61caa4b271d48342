//! `Throw`: raises a `UserException` with the configured number and text. Terminal: `In`.

use std::sync::Arc;

use flowbus_runtime::engine::Outputs;
use flowbus_runtime::message::{numbers, Exception, ExceptionKind, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, PropKind, PropSpec,
};

static SPEC: NodeSpec = NodeSpec {
    type_name: "Throw",
    inputs: &["In"],
    outputs: &[],
    props: &[
        PropSpec::opt(
            "number",
            PropKind::Int {
                min: 1,
                max: 99_999,
            },
        ),
        PropSpec::opt("text", PropKind::Str),
    ],
};

/// The Throw node kind.
pub struct ThrowKind;

impl NodeKind for ThrowKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn build(&self, node: &NodeDecl, _ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        Ok(BuiltNode::Processing(Arc::new(Throw {
            number: node
                .int("number")
                .map_or(numbers::USER_EXCEPTION, |n| n as u32),
            text: node.str("text").map_or_else(
                || format!("Throw node '{}' threw an exception", node.id),
                str::to_string,
            ),
        })))
    }
}

struct Throw {
    number: u32,
    text: String,
}

impl ProcessingNode for Throw {
    fn process<'a>(
        &'a self,
        _msg: Message,
        _out: Outputs<'a>,
    ) -> BoxFut<'a, Result<(), NodeFailure>> {
        let e = Exception::new(ExceptionKind::User, self.number, self.text.clone());
        Box::pin(std::future::ready(Err(NodeFailure::Error(e))))
    }
}
