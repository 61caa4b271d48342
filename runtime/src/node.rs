//! What a node kind is: its spec (terminals and properties, checked generically by validation),
//! its pure checks, its builder, and the two runtime shapes a built node takes — a
//! [`ProcessingNode`] that the engine calls with one message, or an [`InputNode`] that owns its
//! loop and hands messages to the engine through an [`InputCtx`](crate::engine::InputCtx).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::Config;
use crate::engine::{InputCtx, NodeHandle, Outputs};
use crate::flow::FlowErrorKind;
use crate::message::{Exception, Message};
use crate::services::Services;

/// A boxed, sendable future (the engine's async calls are dynamic, and recursive).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An exception travelling back upstream (not handled by a Failure terminal).
#[derive(Debug, Clone)]
pub struct Thrown(pub Exception);

/// Why a processing node did not finish normally.
#[derive(Debug)]
pub enum NodeFailure {
    /// An error inside the node: goes to its `Failure` terminal when connected, otherwise is
    /// thrown upstream.
    Error(Exception),
    /// An exception from further downstream passing through this node.
    Thrown(Thrown),
}

impl From<Thrown> for NodeFailure {
    fn from(t: Thrown) -> Self {
        NodeFailure::Thrown(t)
    }
}

impl From<Exception> for NodeFailure {
    fn from(e: Exception) -> Self {
        NodeFailure::Error(e)
    }
}

/// A node with an `In` terminal: the engine calls it once per message.
pub trait ProcessingNode: Send + Sync + 'static {
    /// Processes one message, handing results to terminals through `out` (depth-first: each
    /// `propagate` returns when that branch has finished).
    fn process<'a>(&'a self, msg: Message, out: Outputs<'a>)
        -> BoxFut<'a, Result<(), NodeFailure>>;

    /// Called when the flow starts, before any input node runs (inside the tokio runtime):
    /// a node that holds a connection starts connecting here. `flow` lets what the node does
    /// outside `process` fail the flow when the node cannot work at all.
    fn start(self: Arc<Self>, _flow: NodeHandle) {}

    /// Called when the flow stops, after every input node has finished: release connections.
    fn stop(&self) -> BoxFut<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Called when the flow is removed (see [`crate::engine::Flow::retire`]), after it has
    /// stopped: end what the node keeps beyond a stop. `deadline` bounds it.
    fn retire(&self, _deadline: Duration) -> BoxFut<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// A node without input terminals: it owns its loop (a timer, a subscription).
pub trait InputNode: Send + Sync + 'static {
    /// Runs until `ctx.cancel` fires, then finishes what it holds and returns.
    fn run(self: Arc<Self>, ctx: InputCtx) -> BoxFut<'static, ()>;

    /// Called when the flow is removed (see [`crate::engine::Flow::retire`]), after it has
    /// stopped: end what the node keeps beyond a stop (a persistent session at the broker).
    /// `deadline` bounds it.
    fn retire(&self, _deadline: Duration) -> BoxFut<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// A built node, ready to run.
pub enum BuiltNode {
    /// Called by the engine.
    Processing(Arc<dyn ProcessingNode>),
    /// Runs its own loop.
    Input(Arc<dyn InputNode>),
}

/// The type of a property value, checked by validation.
#[derive(Debug, Clone, Copy)]
pub enum PropKind {
    /// A string.
    Str,
    /// A non-empty string or a non-empty array of them.
    StrOrList,
    /// `true` or `false`.
    Bool,
    /// An integer in a range.
    Int {
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
    /// A duration: `"30s"`, `"1m 30s"`, `"250ms"`, or a number of milliseconds.
    Duration,
    /// A [`PropKind::Duration`] in a range.
    DurationIn {
        /// Shortest allowed value.
        min: std::time::Duration,
        /// Longest allowed value.
        max: std::time::Duration,
    },
    /// A size in bytes: a number, or a string with a unit (`"16MiB"`, `"512KiB"`), from 1 to
    /// `max`.
    Size {
        /// Largest allowed value.
        max: u64,
    },
    /// One of a set of strings.
    Enum(&'static [&'static str]),
    /// Any JSON value.
    Any,
}

/// One property of a node kind.
#[derive(Debug, Clone, Copy)]
pub struct PropSpec {
    /// The JSON name.
    pub name: &'static str,
    /// Its type.
    pub kind: PropKind,
    /// Whether it must be given.
    pub required: bool,
}

impl PropSpec {
    /// An optional property.
    pub const fn opt(name: &'static str, kind: PropKind) -> PropSpec {
        PropSpec {
            name,
            kind,
            required: false,
        }
    }

    /// A required property.
    pub const fn req(name: &'static str, kind: PropKind) -> PropSpec {
        PropSpec {
            name,
            kind,
            required: true,
        }
    }
}

/// The static description of a node kind.
#[derive(Debug)]
pub struct NodeSpec {
    /// The `type` name in flow files.
    pub type_name: &'static str,
    /// Input terminals (empty for input nodes).
    pub inputs: &'static [&'static str],
    /// Output terminals.
    pub outputs: &'static [&'static str],
    /// Properties besides `id`, `type` and `description`.
    pub props: &'static [PropSpec],
}

/// A node as declared in a flow file (after the generic checks).
#[derive(Debug, Clone)]
pub struct NodeDecl {
    /// The node id.
    pub id: String,
    /// The node type.
    pub type_name: String,
    /// Its properties (everything but `id`, `type`, `description`).
    pub props: Map<String, Value>,
    /// JSON pointer of the node object in its file (`/nodes/3`).
    pub pointer: String,
}

impl NodeDecl {
    /// A string property.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.props.get(name).and_then(Value::as_str)
    }

    /// An integer property.
    pub fn int(&self, name: &str) -> Option<i64> {
        self.props.get(name).and_then(Value::as_i64)
    }

    /// A boolean property.
    pub fn bool(&self, name: &str) -> Option<bool> {
        self.props.get(name).and_then(Value::as_bool)
    }

    /// A duration property (validated already; `None` when absent).
    pub fn duration(&self, name: &str) -> Option<std::time::Duration> {
        self.props
            .get(name)
            .and_then(|v| parse_duration_value(v).ok())
    }

    /// A size property in bytes (validated already; `None` when absent).
    pub fn size(&self, name: &str) -> Option<u64> {
        self.props.get(name).and_then(|v| parse_size_value(v).ok())
    }

    /// A string-or-list property as a list.
    pub fn str_list(&self, name: &str) -> Vec<String> {
        match self.props.get(name) {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Parses a duration given as a humantime string or a number of milliseconds.
pub fn parse_duration_value(v: &Value) -> Result<std::time::Duration, String> {
    match v {
        Value::String(s) => humantime::parse_duration(s).map_err(|e| {
            format!("'{s}' is not a duration ({e}); write e.g. \"500ms\", \"30s\", \"2m\"")
        }),
        Value::Number(n) => n
            .as_u64()
            .map(std::time::Duration::from_millis)
            .ok_or_else(|| format!("{n} is not a whole, non-negative number of milliseconds")),
        other => Err(format!(
            "expected a duration such as \"30s\" or a number of milliseconds, found {}",
            json_type(other)
        )),
    }
}

/// Parses a size given as a number of bytes or a string such as `"16MiB"`.
pub fn parse_size_value(v: &Value) -> Result<u64, String> {
    match v {
        Value::String(s) => crate::config::parse_size(s).ok_or_else(|| {
            format!("'{s}' is not a size; write e.g. \"16MiB\", \"512KiB\" or a number of bytes")
        }),
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a whole, non-negative number of bytes")),
        other => Err(format!(
            "expected a size such as \"16MiB\" or a number of bytes, found {}",
            json_type(other)
        )),
    }
}

/// The JSON type name of a value, for error messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A problem a node kind found with a declaration, relative to the node.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The property it concerns (for the error position), if any.
    pub property: Option<String>,
    /// What is wrong.
    pub kind: FlowErrorKind,
}

impl Problem {
    /// A problem with a property.
    pub fn at(property: &str, kind: FlowErrorKind) -> Problem {
        Problem {
            property: Some(property.to_string()),
            kind,
        }
    }

    /// A problem with the node as a whole.
    pub fn node(kind: FlowErrorKind) -> Problem {
        Problem {
            property: None,
            kind,
        }
    }
}

/// What validation may look at besides the flow file (no I/O).
#[derive(Debug, Clone, Default)]
pub struct ValidateCtx {
    /// Server names defined in the runtime configuration.
    pub servers: BTreeSet<String>,
}

/// Script texts deployed together with a flow, by the path its nodes name them with
/// (`"script": "lib/enrich.rhai"`): building uses them instead of the files on disk, which
/// are written only once the flow has proved valid.
pub type ShippedScripts = BTreeMap<String, String>;

/// What building may use: the flow's location (scripts are relative to it), the runtime
/// configuration and the daemon's services.
#[derive(Clone)]
pub struct BuildCtx {
    /// The flow's name.
    pub flow: String,
    /// The flow file.
    pub file: PathBuf,
    /// The runtime configuration.
    pub config: Arc<Config>,
    /// Activity log and statistics.
    pub services: Arc<Services>,
    /// Scripts that came with the flow (an API deploy), consulted before the disk.
    pub shipped: Arc<ShippedScripts>,
}

impl BuildCtx {
    /// The directory script paths are relative to.
    pub fn flow_dir(&self) -> &Path {
        self.file.parent().unwrap_or_else(|| Path::new("."))
    }

    /// The real path of a file the node names in `property`, when it lies inside the flow's
    /// directory or a directory of `[daemon] allowed_paths` (see [`crate::paths`]); otherwise
    /// the problem naming the property and the rule (as a list, like [`NodeKind::build`]'s).
    pub fn resolve(&self, property: &str, written: &str) -> Result<PathBuf, Vec<Problem>> {
        let allowed = &self.config.daemon.allowed_paths;
        crate::paths::confine(self.flow_dir(), allowed, written).map_err(|refusal| {
            vec![Problem::at(
                property,
                FlowErrorKind::Path {
                    property: property.to_string(),
                    path: written.to_string(),
                    refusal,
                },
            )]
        })
    }

    /// The text shipped with the flow for the script it names `written`, if any.
    pub fn shipped(&self, written: &str) -> Option<&str> {
        self.shipped.get(written).map(String::as_str)
    }
}

/// A node kind: spec, pure checks, builder.
pub trait NodeKind: Send + Sync + 'static {
    /// Terminals and properties.
    fn spec(&self) -> &'static NodeSpec;

    /// Checks beyond the property table (e.g. "either `script` or `code`"). Pure.
    fn check(&self, _node: &NodeDecl, _ctx: &ValidateCtx) -> Vec<Problem> {
        Vec::new()
    }

    /// Builds the runtime node: may read files and compile scripts, but connects nothing and
    /// spawns nothing.
    fn build(&self, node: &NodeDecl, ctx: &BuildCtx) -> Result<BuiltNode, Vec<Problem>>;
}

/// Maps type names to node kinds.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn NodeKind>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a kind (replacing one of the same name).
    pub fn register(&mut self, kind: impl NodeKind) -> &mut Registry {
        self.kinds.insert(kind.spec().type_name, Arc::new(kind));
        self
    }

    /// Looks a kind up by type name.
    pub fn get(&self, type_name: &str) -> Option<&Arc<dyn NodeKind>> {
        self.kinds.get(type_name)
    }

    /// The registered type names, sorted.
    pub fn type_names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}
