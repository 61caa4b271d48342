//! `Compute`: runs a Rhai script that may change `Root` and `LocalEnvironment`.
//! Terminals: `In` → `Out`, `Out1`..`Out4`, `Failure`.

use flowbus_runtime::engine::Outputs;
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::message::Message;
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, PropKind, PropSpec, ValidateCtx,
};
use std::sync::Arc;

use crate::script::{self, Script, LIMIT_PROPS};

const TERMINALS: &[&str] = &["Out", "Out1", "Out2", "Out3", "Out4", "Failure"];
const PROPAGATE_TO: &[&str] = &["Out", "Out1", "Out2", "Out3", "Out4"];

static SPEC: NodeSpec = NodeSpec {
    type_name: "Compute",
    inputs: &["In"],
    outputs: TERMINALS,
    props: &[
        PropSpec::opt("script", PropKind::Str),
        PropSpec::opt("code", PropKind::Str),
        LIMIT_PROPS[0],
        LIMIT_PROPS[1],
        LIMIT_PROPS[2],
        LIMIT_PROPS[3],
        LIMIT_PROPS[4],
        LIMIT_PROPS[5],
        LIMIT_PROPS[6],
    ],
};

/// The Compute node kind.
pub struct ComputeKind;

impl NodeKind for ComputeKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn check(&self, node: &NodeDecl, _ctx: &ValidateCtx) -> Vec<Problem> {
        let mut p = exactly_one_of(node, "script", "code");
        p.extend(script::check_script(node));
        p
    }

    fn build(&self, node: &NodeDecl, ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        let script = script::load(node, ctx, &["code"])?;
        Ok(BuiltNode::Processing(Arc::new(Compute { script })))
    }
}

/// "Exactly one of `a` and `b`" as problems.
pub(crate) fn exactly_one_of(node: &NodeDecl, a: &str, b: &str) -> Vec<Problem> {
    match (node.props.contains_key(a), node.props.contains_key(b)) {
        (true, true) => vec![Problem::at(
            b,
            FlowErrorKind::BadValue {
                property: b.into(),
                message: format!("give either \"{a}\" or \"{b}\", not both"),
            },
        )],
        (false, false) => vec![Problem::node(FlowErrorKind::MissingOneOf(format!(
            "\"{a}\" or \"{b}\""
        )))],
        _ => Vec::new(),
    }
}

struct Compute {
    script: Script,
}

impl ProcessingNode for Compute {
    fn process<'a>(
        &'a self,
        msg: Message,
        out: Outputs<'a>,
    ) -> BoxFut<'a, Result<(), NodeFailure>> {
        Box::pin(async move {
            let outcome = self
                .script
                .run_until(&msg, PROPAGATE_TO, Some(out.cancel()))?;
            for (terminal, m) in outcome.propagated {
                out.propagate(&terminal, m).await?;
            }
            if outcome.value.as_bool().ok() != Some(false) {
                out.propagate("Out", outcome.message).await?;
            }
            Ok(())
        })
    }
}
