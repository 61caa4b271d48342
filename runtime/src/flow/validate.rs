//! Validation: a flow file's text → a [`ValidatedFlow`], or every problem at once. Pure: reads
//! nothing but its arguments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde_json::{Map, Value};

use super::spans::{escape, Pos, Spans};
use super::{did_you_mean, FlowError, FlowErrorKind};
use crate::node::{
    json_type, parse_duration_value, parse_size_value, NodeDecl, PropKind, Registry, ValidateCtx,
};

/// A connection between two terminals (an edge of the flow graph).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// The output terminal of the source node.
    pub from_terminal: String,
    /// The input terminal of the target node.
    pub to_terminal: String,
}

/// A flow that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedFlow {
    /// The flow name (the file stem unless `name` is given).
    pub name: String,
    /// The description, if any.
    pub description: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Nodes and connections. Edges are added in file order, which is the propagation order.
    pub graph: DiGraph<NodeDecl, Edge>,
    /// Positions in the file, for errors found when building.
    pub spans: Spans,
    /// Ids of nodes that failed validation (only in a partial result of [`validate_all`]);
    /// building skips them.
    pub invalid: std::collections::HashSet<String>,
}

impl ValidatedFlow {
    /// The node with the given id.
    pub fn node(&self, id: &str) -> Option<(NodeIndex, &NodeDecl)> {
        self.graph
            .node_indices()
            .map(|i| (i, &self.graph[i]))
            .find(|(_, n)| n.id == id)
    }

    /// A [`FlowError`] located at `property` of `node` (or at the node).
    pub fn error_at(
        &self,
        node: &NodeDecl,
        property: Option<&str>,
        kind: FlowErrorKind,
    ) -> FlowError {
        let pos = match property {
            Some(p) => self
                .spans
                .key_or_value(&format!("{}/{}", node.pointer, escape(p))),
            None => self.spans.value(&node.pointer),
        };
        FlowError {
            file: self.file.clone(),
            pos,
            node: Some(node.id.clone()),
            terminal: None,
            kind,
        }
    }
}

const FLOW_FIELDS: &[&str] = &["name", "description", "nodes", "connections"];
const CONNECTION_FIELDS: &[&str] = &["from", "to"];
const NODE_COMMON: &[&str] = &["id", "type", "description"];

struct Checker<'a> {
    file: &'a Path,
    spans: Spans,
    errors: Vec<FlowError>,
    /// Every well-formed node id, including nodes that failed validation, so a connection to
    /// such a node does not add a second, misleading error.
    declared: std::collections::HashSet<String>,
}

impl Checker<'_> {
    fn push(
        &mut self,
        pointer: &str,
        node: Option<&str>,
        terminal: Option<&str>,
        kind: FlowErrorKind,
    ) {
        self.errors.push(FlowError {
            file: self.file.to_path_buf(),
            pos: self.spans.key_or_value(pointer),
            node: node.map(str::to_string),
            terminal: terminal.map(str::to_string),
            kind,
        });
    }

    fn unknown_fields(
        &mut self,
        obj: &Map<String, Value>,
        pointer: &str,
        node: Option<&str>,
        allowed: &[&str],
    ) {
        for k in obj.keys() {
            if !allowed.contains(&k.as_str()) {
                self.push(
                    &format!("{pointer}/{}", escape(k)),
                    node,
                    None,
                    FlowErrorKind::UnknownField {
                        field: k.clone(),
                        hint: did_you_mean(k, allowed.iter().copied()),
                        allowed: allowed.join(", "),
                    },
                );
            }
        }
    }

    fn wrong_type(
        &mut self,
        pointer: &str,
        node: Option<&str>,
        field: &str,
        expected: &str,
        v: &Value,
    ) {
        self.push(
            pointer,
            node,
            None,
            FlowErrorKind::WrongType {
                field: field.to_string(),
                expected: expected.to_string(),
                found: json_type(v).to_string(),
            },
        );
    }
}

/// Validates a flow file's text. `file` is used in messages and for the default name.
pub fn validate(
    file: &Path,
    text: &str,
    registry: &Registry,
    ctx: &ValidateCtx,
) -> Result<ValidatedFlow, Vec<FlowError>> {
    match validate_all(file, text, registry, ctx) {
        (Some(v), errors) if errors.is_empty() => Ok(v),
        (_, errors) => Err(errors),
    }
}

/// Like [`validate`], but also returns the part of the flow that is valid (the nodes that
/// passed, and the connections between them) next to the errors, so that those nodes can
/// still be built and their script errors reported in the same run. `None` when the text is
/// not a JSON object.
pub fn validate_all(
    file: &Path,
    text: &str,
    registry: &Registry,
    ctx: &ValidateCtx,
) -> (Option<ValidatedFlow>, Vec<FlowError>) {
    let root: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let error = FlowError {
                file: file.to_path_buf(),
                // serde_json says column 0 at the start of a line (e.g. at the end of input).
                pos: Some(Pos {
                    line: (e.line() as u32).max(1),
                    column: (e.column() as u32).max(1),
                }),
                node: None,
                terminal: None,
                kind: FlowErrorKind::Syntax(syntax_message(&e)),
            };
            return (None, vec![error]);
        }
    };
    let mut c = Checker {
        file,
        spans: Spans::index(text),
        errors: Vec::new(),
        declared: Default::default(),
    };
    let Value::Object(top) = &root else {
        c.wrong_type(
            "",
            None,
            "the flow",
            "a JSON object with \"nodes\" and \"connections\"",
            &root,
        );
        return (None, c.errors);
    };
    for (pointer, first, second) in c.spans.duplicates().to_vec() {
        let key = pointer
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .replace("~1", "/")
            .replace("~0", "~");
        c.errors.push(FlowError {
            file: file.to_path_buf(),
            pos: Some(second),
            node: None,
            terminal: None,
            kind: FlowErrorKind::DuplicateKey {
                key,
                first_line: first.line,
                first_column: first.column,
            },
        });
    }
    c.unknown_fields(top, "", None, FLOW_FIELDS);

    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flow".into());
    let name = match top.get("name") {
        None => stem,
        Some(Value::String(s)) if valid_name(s) => s.clone(),
        Some(Value::String(s)) => {
            c.push(
                "/name",
                None,
                None,
                FlowErrorKind::BadValue {
                    property: "name".into(),
                    message: format!(
                        "'{s}' must be 1-64 characters of letters, digits, '-', '_' or '.'"
                    ),
                },
            );
            stem
        }
        Some(v) => {
            c.wrong_type("/name", None, "name", "a string", v);
            stem
        }
    };
    let description = match top.get("description") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            c.wrong_type("/description", None, "description", "a string", v);
            String::new()
        }
        None => String::new(),
    };

    let mut graph: DiGraph<NodeDecl, Edge> = DiGraph::new();
    let mut ids: HashMap<String, (NodeIndex, u32)> = HashMap::new();
    match top.get("nodes") {
        None => c.push(
            "",
            None,
            None,
            FlowErrorKind::MissingProperty("nodes".into()),
        ),
        Some(Value::Array(nodes)) => {
            if nodes.is_empty() {
                c.push(
                    "/nodes",
                    None,
                    None,
                    FlowErrorKind::Structure(
                        "\"nodes\" is empty: a flow needs at least one input node".into(),
                    ),
                );
            }
            for (i, n) in nodes.iter().enumerate() {
                let pointer = format!("/nodes/{i}");
                if let Some(decl) = check_node(&mut c, &pointer, n, registry, ctx) {
                    let line = c.spans.value(&pointer).map_or(0, |p| p.line);
                    if let Some((_, first_line)) = ids.get(&decl.id) {
                        let kind = FlowErrorKind::DuplicateId {
                            id: decl.id.clone(),
                            first_line: *first_line,
                        };
                        let id = decl.id.clone();
                        c.push(&format!("{pointer}/id"), Some(&id), None, kind);
                    } else {
                        let id = decl.id.clone();
                        let ix = graph.add_node(decl);
                        ids.insert(id, (ix, line));
                    }
                }
            }
        }
        Some(v) => c.wrong_type("/nodes", None, "nodes", "an array of node objects", v),
    }

    match top.get("connections") {
        None => {}
        Some(Value::Array(conns)) => {
            for (i, conn) in conns.iter().enumerate() {
                check_connection(
                    &mut c,
                    &format!("/connections/{i}"),
                    conn,
                    registry,
                    &ids,
                    &mut graph,
                );
            }
        }
        Some(v) => c.wrong_type(
            "/connections",
            None,
            "connections",
            "an array of {\"from\", \"to\"} objects",
            v,
        ),
    }

    // Cycles: any strongly connected component with more than one node, or a self-loop. The
    // message shows one real cycle through the component, from its alphabetically first node.
    for scc in petgraph::algo::tarjan_scc(&graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() > 1 || self_loop {
            let Some(&start) = scc.iter().min_by(|a, b| graph[**a].id.cmp(&graph[**b].id)) else {
                continue;
            };
            let path = cycle_through(&graph, start, &scc);
            let shown = path
                .iter()
                .chain(std::iter::once(&start))
                .map(|i| graph[*i].id.as_str())
                .collect::<Vec<_>>()
                .join(" → ");
            let (id, pointer) = (graph[start].id.clone(), graph[start].pointer.clone());
            c.push(&pointer, Some(&id), None, FlowErrorKind::Cycle(shown));
        }
    }

    let has_input = graph.node_weights().any(|n| {
        registry
            .get(&n.type_name)
            .is_some_and(|k| k.spec().inputs.is_empty())
    });
    if graph.node_count() > 0 && !has_input && c.errors.is_empty() {
        c.push(
            "/nodes",
            None,
            None,
            FlowErrorKind::Structure(
                "the flow has no input node (MQTTSubscribe or Timer), so no message would ever enter it".into(),
            ),
        );
    }

    c.errors.sort_by_key(|e| e.pos.map(|p| (p.line, p.column)));
    let invalid = c.errors.iter().filter_map(|e| e.node.clone()).collect();
    let v = ValidatedFlow {
        name,
        description,
        file: file.to_path_buf(),
        graph,
        spans: c.spans,
        invalid,
    };
    (Some(v), c.errors)
}

/// The nodes of a shortest cycle from `start` back to itself inside `scc` (breadth-first,
/// following connections in file order).
fn cycle_through(
    graph: &DiGraph<NodeDecl, Edge>,
    start: NodeIndex,
    scc: &[NodeIndex],
) -> Vec<NodeIndex> {
    let mut prev: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        let mut next: Vec<_> = graph.edges(n).map(|e| (e.id(), e.target())).collect();
        next.sort_by_key(|(e, _)| *e);
        for (_, t) in next {
            if t == start {
                let mut path = vec![n];
                let mut cur = n;
                while cur != start {
                    cur = prev[&cur];
                    path.push(cur);
                }
                path.reverse();
                return path;
            }
            if scc.contains(&t) && !prev.contains_key(&t) {
                prev.insert(t, n);
                queue.push_back(t);
            }
        }
    }
    vec![start]
}

fn syntax_message(e: &serde_json::Error) -> String {
    let mut s = e.to_string();
    // serde_json appends " at line L column C"; the position is printed in front already.
    if let Some(cut) = s.rfind(" at line ") {
        s.truncate(cut);
    }
    s
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_node(
    c: &mut Checker<'_>,
    pointer: &str,
    n: &Value,
    registry: &Registry,
    ctx: &ValidateCtx,
) -> Option<NodeDecl> {
    let Value::Object(obj) = n else {
        c.wrong_type(
            pointer,
            None,
            "a node",
            "an object with \"id\" and \"type\"",
            n,
        );
        return None;
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) if valid_name(s) => Some(s.clone()),
        Some(Value::String(s)) => {
            c.push(
                &format!("{pointer}/id"),
                None,
                None,
                FlowErrorKind::BadValue {
                    property: "id".into(),
                    message: format!(
                        "'{s}' must be 1-64 characters of letters, digits, '-', '_' or '.'"
                    ),
                },
            );
            None
        }
        Some(v) => {
            c.wrong_type(&format!("{pointer}/id"), None, "id", "a string", v);
            None
        }
        None => {
            c.push(
                pointer,
                None,
                None,
                FlowErrorKind::MissingProperty("id".into()),
            );
            None
        }
    };
    let node = id.as_deref();
    if let Some(i) = &id {
        c.declared.insert(i.clone());
    }
    let kind = match obj.get("type") {
        Some(Value::String(t)) => match registry.get(t) {
            Some(k) => Some(k.clone()),
            None => {
                let known = registry.type_names();
                c.push(
                    &format!("{pointer}/type"),
                    node,
                    None,
                    FlowErrorKind::UnknownNodeType {
                        type_name: t.clone(),
                        hint: did_you_mean(t, known.iter().copied()),
                        known: known.join(", "),
                    },
                );
                None
            }
        },
        Some(v) => {
            c.wrong_type(&format!("{pointer}/type"), node, "type", "a string", v);
            None
        }
        None => {
            c.push(
                pointer,
                node,
                None,
                FlowErrorKind::MissingProperty("type".into()),
            );
            None
        }
    };
    if let Some(Value::String(_)) | None = obj.get("description") {
    } else if let Some(v) = obj.get("description") {
        c.wrong_type(
            &format!("{pointer}/description"),
            node,
            "description",
            "a string",
            v,
        );
    }
    let kind = kind?;
    let spec = kind.spec();
    let mut allowed: Vec<&str> = NODE_COMMON.to_vec();
    allowed.extend(spec.props.iter().map(|p| p.name));
    c.unknown_fields(obj, pointer, node, &allowed);

    let before = c.errors.len();
    for p in spec.props {
        let vp = format!("{pointer}/{}", escape(p.name));
        match obj.get(p.name) {
            None if p.required => c.push(
                pointer,
                node,
                None,
                FlowErrorKind::MissingProperty(p.name.into()),
            ),
            None => {}
            Some(v) => {
                if let Err(kind) = check_prop(p.name, p.kind, v) {
                    c.push(&vp, node, None, kind);
                }
            }
        }
    }
    if let Some(Value::String(server)) = obj.get("server") {
        if !ctx.servers.contains(server) {
            let known = if ctx.servers.is_empty() {
                "none".to_string()
            } else {
                ctx.servers.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            c.push(
                &format!("{pointer}/server"),
                node,
                None,
                FlowErrorKind::UnknownServer {
                    name: server.clone(),
                    known,
                },
            );
        }
    }
    let id = id?;
    let props: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !NODE_COMMON.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let decl = NodeDecl {
        id: id.clone(),
        type_name: spec.type_name.to_string(),
        props,
        pointer: pointer.to_string(),
    };
    // The kind's own checks assume the property table held.
    if c.errors.len() == before {
        for problem in kind.check(&decl, ctx) {
            let at = match &problem.property {
                Some(p) => format!("{pointer}/{}", escape(p)),
                None => pointer.to_string(),
            };
            c.push(&at, Some(&id), None, problem.kind);
        }
    }
    Some(decl)
}

fn check_prop(name: &str, kind: PropKind, v: &Value) -> Result<(), FlowErrorKind> {
    let wrong = |expected: &str| FlowErrorKind::WrongType {
        field: name.to_string(),
        expected: expected.to_string(),
        found: json_type(v).to_string(),
    };
    let bad = |message: String| FlowErrorKind::BadValue {
        property: name.to_string(),
        message,
    };
    match kind {
        PropKind::Str => match v {
            Value::String(s) if s.is_empty() => Err(bad("must not be empty".into())),
            Value::String(_) => Ok(()),
            _ => Err(wrong("a string")),
        },
        PropKind::StrOrList => match v {
            Value::String(s) if !s.is_empty() => Ok(()),
            Value::Array(a)
                if !a.is_empty() && a.iter().all(|x| x.as_str().is_some_and(|s| !s.is_empty())) =>
            {
                Ok(())
            }
            Value::String(_) | Value::Array(_) => Err(bad(
                "must be a non-empty string or a non-empty array of non-empty strings".into(),
            )),
            _ => Err(wrong("a string or an array of strings")),
        },
        PropKind::Bool => v
            .as_bool()
            .map(|_| ())
            .ok_or_else(|| wrong("true or false")),
        PropKind::Int { min, max } => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            Some(n) => Err(bad(format!(
                "{n} is out of range (allowed: {min} to {max})"
            ))),
            None if v.is_number() => Err(bad(format!(
                "{v} is not a whole number (allowed: {min} to {max})"
            ))),
            None => Err(wrong(&format!("a whole number from {min} to {max}"))),
        },
        PropKind::Duration => parse_duration_value(v).map(|_| ()).map_err(bad),
        PropKind::DurationIn { min, max } => match parse_duration_value(v).map_err(bad)? {
            d if (min..=max).contains(&d) => Ok(()),
            _ => Err(bad(format!(
                "{} is out of range (allowed: {} to {})",
                match v {
                    Value::String(s) => format!("'{s}'"),
                    other => format!("{other} ms"),
                },
                humantime::format_duration(min),
                humantime::format_duration(max)
            ))),
        },
        PropKind::Size { max } => match parse_size_value(v).map_err(bad)? {
            n if (1..=max).contains(&n) => Ok(()),
            n => Err(bad(format!(
                "{n} bytes is out of range (allowed: 1 to {max} bytes)"
            ))),
        },
        PropKind::Enum(options) => match v {
            Value::String(s) if options.contains(&s.as_str()) => Ok(()),
            Value::String(s) => Err(bad(format!(
                "'{s}' is not one of {}{}",
                options.join(", "),
                did_you_mean(s, options.iter().copied())
            ))),
            _ => Err(wrong(&format!("one of {}", options.join(", ")))),
        },
        PropKind::Any => Ok(()),
    }
}

fn check_connection(
    c: &mut Checker<'_>,
    pointer: &str,
    conn: &Value,
    registry: &Registry,
    ids: &HashMap<String, (NodeIndex, u32)>,
    graph: &mut DiGraph<NodeDecl, Edge>,
) {
    let Value::Object(obj) = conn else {
        c.wrong_type(
            pointer,
            None,
            "a connection",
            "an object {\"from\": \"node.Terminal\", \"to\": \"node\"}",
            conn,
        );
        return;
    };
    c.unknown_fields(obj, pointer, None, CONNECTION_FIELDS);
    let mut ends = Vec::new();
    for end in ["from", "to"] {
        match obj.get(end) {
            Some(Value::String(s)) => ends.push(s.as_str()),
            Some(v) => c.wrong_type(
                &format!("{pointer}/{end}"),
                None,
                end,
                "a string \"node\" or \"node.Terminal\"",
                v,
            ),
            None => c.push(
                pointer,
                None,
                None,
                FlowErrorKind::MissingProperty(end.into()),
            ),
        }
    }
    let [from, to] = ends[..] else { return };
    let from_ep = resolve(
        c,
        &format!("{pointer}/from"),
        "from",
        from,
        ids,
        graph,
        registry,
    );
    let to_ep = resolve(c, &format!("{pointer}/to"), "to", to, ids, graph, registry);
    let (Some((fi, fk, fterm)), Some((ti, tk, tterm))) = (from_ep, to_ep) else {
        return;
    };
    let from_id = graph[fi].id.clone();
    let to_id = graph[ti].id.clone();
    let fspec = fk.spec();
    let tspec = tk.spec();
    let from_term = fterm.unwrap_or("Out");
    let mut ok = true;
    if !fspec.outputs.contains(&from_term) {
        ok = false;
        c.push(
            &format!("{pointer}/from"),
            Some(&from_id),
            Some(from_term),
            FlowErrorKind::UnknownTerminal {
                node: from_id.clone(),
                type_name: fspec.type_name.into(),
                direction: "output",
                terminal: from_term.into(),
                available: list_or_none(fspec.outputs),
            },
        );
    }
    let to_term = if tspec.inputs.is_empty() {
        ok = false;
        c.push(
            &format!("{pointer}/to"),
            Some(&to_id),
            tterm,
            FlowErrorKind::ConnectionIntoInput {
                node: to_id.clone(),
                type_name: tspec.type_name.into(),
            },
        );
        ""
    } else {
        let t = tterm.unwrap_or(tspec.inputs[0]);
        if !tspec.inputs.contains(&t) {
            ok = false;
            c.push(
                &format!("{pointer}/to"),
                Some(&to_id),
                Some(t),
                FlowErrorKind::UnknownTerminal {
                    node: to_id.clone(),
                    type_name: tspec.type_name.into(),
                    direction: "input",
                    terminal: t.into(),
                    available: list_or_none(tspec.inputs),
                },
            );
        }
        t
    };
    if ok {
        graph.add_edge(
            fi,
            ti,
            Edge {
                from_terminal: from_term.to_string(),
                to_terminal: to_term.to_string(),
            },
        );
    }
}

type Endpoint<'s> = (
    NodeIndex,
    std::sync::Arc<dyn crate::node::NodeKind>,
    Option<&'s str>,
);

fn resolve<'s>(
    c: &mut Checker<'_>,
    pointer: &str,
    end: &'static str,
    s: &'s str,
    ids: &HashMap<String, (NodeIndex, u32)>,
    graph: &DiGraph<NodeDecl, Edge>,
    registry: &Registry,
) -> Option<Endpoint<'s>> {
    // Node ids may contain '.', so try the whole string as an id before splitting off a
    // terminal at the last dot.
    let (id, term) = if ids.contains_key(s) {
        (s, None)
    } else {
        match s.rsplit_once('.') {
            Some((id, t)) => (id, Some(t)),
            None => (s, None),
        }
    };
    match ids.get(id) {
        Some((ix, _)) => {
            let kind = registry.get(&graph[*ix].type_name)?.clone();
            Some((*ix, kind, term))
        }
        // The node exists but has errors of its own, reported already.
        None if c.declared.contains(id) || c.declared.contains(s) => None,
        None => {
            c.push(
                pointer,
                None,
                None,
                FlowErrorKind::DanglingConnection {
                    end,
                    endpoint: s.to_string(),
                    hint: did_you_mean(id, ids.keys().map(String::as_str)),
                },
            );
            None
        }
    }
}

fn list_or_none(list: &[&str]) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}
