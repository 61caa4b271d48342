//! `Filter`: evaluates a Rhai expression and routes the message unchanged to `True`, `False`
//! or `Unknown` (the expression gave `()`). Terminals: `In` → `True`, `False`, `Unknown`,
//! `Failure`. Changes the expression makes to `LocalEnvironment` and `Environment` are kept;
//! `Root` is passed on as it arrived.

use std::sync::Arc;

use flowbus_runtime::engine::Outputs;
use flowbus_runtime::message::{numbers, Exception, ExceptionKind, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, PropKind, PropSpec, ValidateCtx,
};

use crate::compute::exactly_one_of;
use crate::script::{self, Script, LIMIT_PROPS};

static SPEC: NodeSpec = NodeSpec {
    type_name: "Filter",
    inputs: &["In"],
    outputs: &["True", "False", "Unknown", "Failure"],
    props: &[
        PropSpec::opt("expression", PropKind::Str),
        PropSpec::opt("script", PropKind::Str),
        LIMIT_PROPS[0],
        LIMIT_PROPS[1],
        LIMIT_PROPS[2],
        LIMIT_PROPS[3],
        LIMIT_PROPS[4],
        LIMIT_PROPS[5],
        LIMIT_PROPS[6],
    ],
};

/// The Filter node kind.
pub struct FilterKind;

impl NodeKind for FilterKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn check(&self, node: &NodeDecl, _ctx: &ValidateCtx) -> Vec<Problem> {
        let mut p = exactly_one_of(node, "expression", "script");
        p.extend(script::check_script(node));
        p
    }

    fn build(&self, node: &NodeDecl, ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        let script = script::load(node, ctx, &["expression"])?;
        Ok(BuiltNode::Processing(Arc::new(Filter { script })))
    }
}

struct Filter {
    script: Script,
}

impl ProcessingNode for Filter {
    fn process<'a>(
        &'a self,
        msg: Message,
        out: Outputs<'a>,
    ) -> BoxFut<'a, Result<(), NodeFailure>> {
        Box::pin(async move {
            let outcome = self.script.run_until(&msg, &[], Some(out.cancel()))?;
            let terminal = if outcome.value.is_unit() {
                "Unknown"
            } else {
                match outcome.value.as_bool() {
                    Ok(true) => "True",
                    Ok(false) => "False",
                    Err(type_name) => {
                        return Err(NodeFailure::Error(Exception::new(
                            ExceptionKind::Recoverable,
                            numbers::SCRIPT_ERROR,
                            format!("the Filter expression gave a {type_name}; it must give true, false or () (unknown)"),
                        )))
                    }
                }
            };
            let mut m = msg;
            m.local_env = outcome.message.local_env;
            out.propagate(terminal, m).await?;
            Ok(())
        })
    }
}
