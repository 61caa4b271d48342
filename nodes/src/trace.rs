//! `Trace`: writes what a message holds — the whole trees, or a `pattern` template with
//! `${Root.Body.temp}`-style references — to the activity log (default), standard output, or
//! a file, then propagates the message unchanged to `Out`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use flowbus_runtime::activity::{NewEntry, Severity};
use flowbus_runtime::engine::Outputs;
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::message::{numbers, Exception, ExceptionKind, Message};
use flowbus_runtime::node::{
    BoxFut, BuildCtx, BuiltNode, NodeDecl, NodeFailure, NodeKind, NodeSpec, Problem,
    ProcessingNode, PropKind, PropSpec, ValidateCtx,
};
use serde_json::Value;

static SPEC: NodeSpec = NodeSpec {
    type_name: "Trace",
    inputs: &["In"],
    outputs: &["Out"],
    props: &[
        PropSpec::opt("pattern", PropKind::Str),
        PropSpec::opt("destination", PropKind::Enum(&["log", "stdout", "file"])),
        PropSpec::opt("file", PropKind::Str),
    ],
};

/// Activity-log number of a Trace entry.
pub const TRACE_ENTRY: u32 = 1003;

/// The Trace node kind.
pub struct TraceKind;

impl NodeKind for TraceKind {
    fn spec(&self) -> &'static NodeSpec {
        &SPEC
    }

    fn check(&self, node: &NodeDecl, _ctx: &ValidateCtx) -> Vec<Problem> {
        let mut p = Vec::new();
        match (node.str("destination"), node.str("file")) {
            (Some("file"), None) => p.push(Problem::node(FlowErrorKind::MissingOneOf(
                "\"file\" (the trace file, since \"destination\" is \"file\")".into(),
            ))),
            (Some("log" | "stdout") | None, Some(_)) => p.push(Problem::at(
                "file",
                FlowErrorKind::BadValue {
                    property: "file".into(),
                    message: "only used with \"destination\": \"file\"".into(),
                },
            )),
            _ => {}
        }
        if let Some(file) = node.str("file") {
            let lower = file.to_ascii_lowercase();
            if lower.ends_with(".json") || lower.ends_with(".rhai") {
                p.push(Problem::at(
                    "file",
                    FlowErrorKind::BadValue {
                        property: "file".into(),
                        message: "must not end in .json or .rhai: the daemon would take a trace file in a flow directory for a flow, or for a script".into(),
                    },
                ));
            }
        }
        if let Some(pattern) = node.str("pattern") {
            if let Err(m) = Template::parse(pattern) {
                p.push(Problem::at(
                    "pattern",
                    FlowErrorKind::BadValue {
                        property: "pattern".into(),
                        message: m,
                    },
                ));
            }
        }
        p
    }

    fn build(&self, node: &NodeDecl, ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>> {
        let template = match node.str("pattern") {
            Some(p) => Some(Template::parse(p).map_err(|m| {
                vec![Problem::at(
                    "pattern",
                    FlowErrorKind::BadValue {
                        property: "pattern".into(),
                        message: m,
                    },
                )]
            })?),
            None => None,
        };
        let dest = match node.str("destination").unwrap_or("log") {
            "stdout" => Dest::Stdout,
            "file" => Dest::File(
                ctx.resolve("file", node.str("file").unwrap_or("trace.log"))?,
                Mutex::new(()),
            ),
            _ => Dest::Log,
        };
        Ok(BuiltNode::Processing(Arc::new(Trace { template, dest })))
    }
}

enum Dest {
    Log,
    Stdout,
    File(PathBuf, Mutex<()>),
}

/// A pattern: literal text and `${Tree.path}` references.
#[derive(Debug, PartialEq)]
pub struct Template(Vec<Part>);

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    Ref(Vec<String>),
}

const TREES: &[&str] = &["Root", "LocalEnvironment", "Environment", "ExceptionList"];

impl Template {
    /// Parses a pattern; `${...}` must name a path starting at one of the four trees.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| {
                format!(
                    "'${{' at character {} is not closed with '}}'",
                    s.len() - rest.len() + start + 1
                )
            })?;
            let path: Vec<String> = after[..end]
                .split('.')
                .map(|p| p.trim().to_string())
                .collect();
            if !TREES.contains(&path[0].as_str()) || path.iter().any(String::is_empty) {
                return Err(format!(
                    "'${{{}}}' must be a path starting with {}, e.g. ${{Root.Body.temp}}",
                    &after[..end],
                    TREES.join(", ")
                ));
            }
            parts.push(Part::Ref(path));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// Renders the pattern against a message's trees. Strings are written as they are, other
    /// values as compact JSON; a missing path renders as nothing.
    pub fn render(&self, trees: &Value) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Ref(path) => {
                    let v = path.iter().try_fold(trees, |v, k| v.get(k.as_str()));
                    match v {
                        Some(Value::String(s)) => out.push_str(s),
                        Some(v) => out.push_str(&v.to_string()),
                        None => {}
                    }
                }
            }
        }
        out
    }
}

struct Trace {
    template: Option<Template>,
    dest: Dest,
}

impl ProcessingNode for Trace {
    fn process<'a>(
        &'a self,
        msg: Message,
        out: Outputs<'a>,
    ) -> BoxFut<'a, Result<(), NodeFailure>> {
        Box::pin(async move {
            let trees = msg.trees_json();
            let text = match &self.template {
                Some(t) => t.render(&trees),
                None => trees.to_string(),
            };
            match &self.dest {
                Dest::Log => out.services().activity.record(NewEntry::new(
                    Severity::Info,
                    TRACE_ENTRY,
                    "Trace",
                    out.flow_name(),
                    out.node_id(),
                    text,
                )),
                Dest::Stdout => {
                    let mut so = std::io::stdout().lock();
                    let _ = writeln!(so, "{text}");
                }
                Dest::File(path, lock) => {
                    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
                    // The path was resolved inside the flow's directory at deploy; a symbolic
                    // link put in its place since is not followed.
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(path)
                        .and_then(|mut f| writeln!(f, "{text}"))
                        .map_err(|e| {
                            Exception::new(
                                ExceptionKind::Recoverable,
                                numbers::NODE_EXCEPTION,
                                format!("cannot write the trace file {}: {e}", path.display()),
                            )
                        })?;
                }
            }
            out.propagate("Out", msg).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_references() {
        let t = Template::parse("t=${Root.Body.t} le=${LocalEnvironment.X} none=${Environment.y}!")
            .unwrap();
        let trees = json!({"Root": {"Body": {"t": 21.5}}, "LocalEnvironment": {"X": "a"}, "Environment": {}});
        assert_eq!(t.render(&trees), "t=21.5 le=a none=!");
    }

    #[test]
    fn rejects_bad_references() {
        assert!(Template::parse("${Body.t}")
            .unwrap_err()
            .contains("must be a path starting with Root"));
        assert!(Template::parse("x ${Root.Body")
            .unwrap_err()
            .contains("not closed"));
    }
}
