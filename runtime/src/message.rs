//! The message assembly: IIB's four trees (`Root`, `LocalEnvironment`, `Environment`,
//! `ExceptionList`).
//!
//! `Root` and `LocalEnvironment` are copy-on-write (`Arc` + `make_mut`): handing a message to
//! a sibling branch is a pointer copy, and a node that changes a tree changes its own copy, so
//! changes never leak into siblings and are "rolled back" for free when an exception travels
//! upstream (the upstream node still holds the tree as it sent it). `Environment` is one shared
//! scratchpad per input message and is never rolled back.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use rhai::{Dynamic, Map as RMap};
use serde_json::{Map, Value};

use crate::tree;

/// How an input node parses the payload into `Root.Body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Domain {
    /// The payload is a JSON document; `Root.Body` is its value.
    #[default]
    Json,
    /// The payload is UTF-8 text; `Root.Body` is a string.
    Text,
    /// The payload is opaque bytes; `Root.Body` is a byte array.
    Blob,
}

impl Domain {
    /// Parses a domain name as written in flow files (`JSON`, `TEXT`, `BLOB`).
    pub fn parse(name: &str) -> Option<Domain> {
        match name {
            "JSON" => Some(Domain::Json),
            "TEXT" => Some(Domain::Text),
            "BLOB" => Some(Domain::Blob),
            _ => None,
        }
    }

    /// The name used in flow files and in `Root.Properties.MessageFormat`.
    pub fn name(self) -> &'static str {
        match self {
            Domain::Json => "JSON",
            Domain::Text => "TEXT",
            Domain::Blob => "BLOB",
        }
    }
}

/// `Root.Body`: the parsed payload.
#[derive(Debug, Clone)]
pub enum Body {
    /// A JSON value (domain `JSON`) as serde_json holds it: a payload with a number Rhai cannot
    /// hold exactly (an integer above `i64::MAX`), or a body the daemon built (a Timer's).
    Json(Value),
    /// A JSON value (domain `JSON`) in Rhai's form (see [`tree`]): as an input node parsed it,
    /// or as a script left it. A script takes it as it is, and it is serialised directly.
    /// Equal to the `Json` body with the same value.
    Rhai(Dynamic),
    /// Text (domain `TEXT`).
    Text(String),
    /// Bytes (domain `BLOB`).
    Blob(Vec<u8>),
}

impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        match (self, other) {
            (Body::Json(a), Body::Json(b)) => a == b,
            (Body::Text(a), Body::Text(b)) => a == b,
            (Body::Blob(a), Body::Blob(b)) => a == b,
            (Body::Rhai(_), Body::Json(_) | Body::Rhai(_)) | (Body::Json(_), Body::Rhai(_)) => {
                self.to_value() == other.to_value()
            }
            _ => false,
        }
    }
}

impl Body {
    /// Parses a payload in the given domain. A payload that is not valid JSON (or not UTF-8
    /// for `TEXT`) is a `ParserException` (BIP5705) that names the byte offset.
    pub fn parse(domain: Domain, payload: &[u8]) -> Result<Body, Box<Exception>> {
        match domain {
            // Straight into Rhai's form; serde_json's `Value` keeps what Rhai cannot hold
            // exactly (an integer above i64::MAX), and gives the precise error.
            Domain::Json => match tree::from_json_slice(payload) {
                Ok(d) => Ok(Body::Rhai(d)),
                Err(_) => serde_json::from_slice(payload).map(Body::Json),
            }
            .map_err(|e| {
                Box::new(Exception::new(
                    ExceptionKind::Parser,
                    numbers::JSON_PARSER_ERROR,
                    format!(
                        "payload is not valid JSON (line {} column {}: {}); {} bytes, starts with {:?}",
                        e.line(),
                        e.column(),
                        e,
                        payload.len(),
                        preview(payload)
                    ),
                ))
            }),
            Domain::Text => String::from_utf8(payload.to_vec()).map(Body::Text).map_err(|e| {
                Box::new(Exception::new(
                    ExceptionKind::Parser,
                    numbers::TEXT_PARSER_ERROR,
                    format!(
                        "payload is not valid UTF-8 text (byte {}); use domain BLOB for binary payloads",
                        e.utf8_error().valid_up_to()
                    ),
                ))
            }),
            Domain::Blob => Ok(Body::Blob(payload.to_vec())),
        }
    }

    /// Serialises the body for the wire: JSON is written compactly, text as UTF-8, bytes as is.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            // Serialising a `Value` cannot fail: all its keys are strings.
            Body::Json(v) => serde_json::to_vec(v).unwrap_or_default(),
            // As for `Json`: a tree holds only JSON twins, and its map keys are strings.
            Body::Rhai(d) => serde_json::to_vec(d).unwrap_or_default(),
            Body::Text(s) => s.as_bytes().to_vec(),
            Body::Blob(b) => b.clone(),
        }
    }

    /// The domain this body belongs to.
    pub fn domain(&self) -> Domain {
        match self {
            Body::Json(_) | Body::Rhai(_) => Domain::Json,
            Body::Text(_) => Domain::Text,
            Body::Blob(_) => Domain::Blob,
        }
    }

    /// The body as a JSON value (bytes become an array of numbers), for traces and tests.
    pub fn to_value(&self) -> Value {
        match self {
            Body::Json(v) => v.clone(),
            Body::Rhai(d) => tree::to_value(d),
            Body::Text(s) => Value::String(s.clone()),
            Body::Blob(b) => Value::Array(b.iter().map(|x| Value::from(*x)).collect()),
        }
    }
}

fn preview(payload: &[u8]) -> String {
    let cut = &payload[..payload.len().min(32)];
    String::from_utf8_lossy(cut).into_owned()
}

/// The `Root` tree: `Properties` and `Body`.
#[derive(Debug, Clone, PartialEq)]
pub struct Root {
    /// `Root.Properties` (`MessageFormat`, `CreationTime`, `ContentType`, ...); shared, since
    /// most nodes pass it on unchanged (copy with `Arc::make_mut` to change it).
    pub properties: Arc<Map<String, Value>>,
    /// `Root.Body`.
    pub body: Body,
}

impl Root {
    /// A root with the standard properties for the body's domain.
    pub fn new(body: Body) -> Root {
        let mut properties = Map::new();
        properties.insert("MessageFormat".into(), Value::from(body.domain().name()));
        properties.insert(
            "CreationTime".into(),
            Value::from(crate::time::now_rfc3339()),
        );
        Root {
            properties: Arc::new(properties),
            body,
        }
    }
}

/// One message travelling through a flow.
#[derive(Debug, Clone)]
pub struct Message {
    /// `Root` (copy-on-write).
    pub root: Arc<Root>,
    /// `LocalEnvironment` (copy-on-write, always a map), in Rhai's form (see [`tree`]): read
    /// it with [`Message::local`], write it with [`Message::set_local`].
    pub local_env: Arc<Dynamic>,
    /// `Environment`: shared by every copy of this message; not rolled back.
    pub environment: Environment,
    /// `ExceptionList`: empty (`None`) unless the message is on a Failure or Catch path.
    pub exception_list: Option<Arc<Exception>>,
}

impl Message {
    /// A new message with the given body, an empty `LocalEnvironment` (with `Variables`),
    /// a fresh `Environment` and no exception.
    pub fn new(body: Body) -> Message {
        let mut le = RMap::new();
        le.insert("Variables".into(), Dynamic::from_map(RMap::new()));
        Message {
            root: Arc::new(Root::new(body)),
            local_env: Arc::new(Dynamic::from_map(le)),
            environment: Environment::default(),
            exception_list: None,
        }
    }

    /// Mutable access to `Root` (copies it first if another branch shares it).
    pub fn root_mut(&mut self) -> &mut Root {
        Arc::make_mut(&mut self.root)
    }

    /// Sets `LocalEnvironment.<path...>` to `value`, creating intermediate maps (copies the
    /// tree first if another branch shares it).
    pub fn set_local(&mut self, path: &[&str], value: Value) {
        self.set_local_rhai(path, tree::to_dynamic(&value));
    }

    /// [`Message::set_local`] with a value already in Rhai's form (it must be a JSON twin: see
    /// [`tree`]).
    pub fn set_local_rhai(&mut self, path: &[&str], value: Dynamic) {
        tree::set_path(Arc::make_mut(&mut self.local_env), path, value);
    }

    /// Reads `LocalEnvironment.<path...>` (a copy).
    pub fn local(&self, path: &[&str]) -> Option<Value> {
        tree::get_path(&self.local_env, path)
    }

    /// Calls `f` with `LocalEnvironment.<path...>` in Rhai's form, borrowed (no copy).
    pub fn with_local<R>(&self, path: &[&str], f: impl FnOnce(Option<&Dynamic>) -> R) -> R {
        tree::with_path(&self.local_env, path, f)
    }

    /// All four trees as one JSON object (`Root`, `LocalEnvironment`, `Environment`,
    /// `ExceptionList`), as Trace writes them and tests compare them.
    pub fn trees_json(&self) -> Value {
        let mut root = Map::new();
        root.insert(
            "Properties".into(),
            Value::Object((*self.root.properties).clone()),
        );
        root.insert("Body".into(), self.root.body.to_value());
        let mut m = Map::new();
        m.insert("Root".into(), Value::Object(root));
        m.insert("LocalEnvironment".into(), tree::to_value(&self.local_env));
        m.insert("Environment".into(), self.environment.snapshot());
        m.insert(
            "ExceptionList".into(),
            self.exception_list
                .as_ref()
                .map_or_else(|| Value::Object(Map::new()), |e| e.to_tree()),
        );
        Value::Object(m)
    }

    /// This message with `ExceptionList` set (for Failure and Catch paths).
    pub fn with_exception(mut self, exception: Exception) -> Message {
        self.exception_list = Some(Arc::new(exception));
        self
    }
}

/// The `Environment` tree: one per input message, shared by all its copies.
#[derive(Debug, Clone, Default)]
pub struct Environment(Arc<Mutex<Value>>);

impl Environment {
    /// Locks the tree for reading or writing. A poisoned lock (a panic while it was held) is
    /// recovered: the tree is plain data and stays usable.
    pub fn lock(&self) -> MutexGuard<'_, Value> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current contents (an empty object when nothing was written).
    pub fn snapshot(&self) -> Value {
        let g = self.lock();
        if g.is_null() {
            Value::Object(Map::new())
        } else {
            g.clone()
        }
    }
}

/// IIB's exception types (the child element names of `ExceptionList`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionKind {
    /// A recoverable error in a node (the common case).
    Recoverable,
    /// A payload could not be parsed in the input node's domain.
    Parser,
    /// Thrown on purpose by a flow (Throw node).
    User,
    /// A value could not be converted.
    Conversion,
    /// A network-level error (connection, publish).
    Socket,
    /// A network operation timed out (publish not acknowledged).
    SocketTimeout,
    /// A configuration problem found at run time (e.g. a QoS policy mismatch).
    Configuration,
    /// A security problem (authentication, TLS).
    Security,
    /// A fatal error (a panic inside a node).
    Fatal,
}

impl ExceptionKind {
    /// The element name as in IIB (`RecoverableException`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ExceptionKind::Recoverable => "RecoverableException",
            ExceptionKind::Parser => "ParserException",
            ExceptionKind::User => "UserException",
            ExceptionKind::Conversion => "ConversionException",
            ExceptionKind::Socket => "SocketException",
            ExceptionKind::SocketTimeout => "SocketTimeoutException",
            ExceptionKind::Configuration => "ConfigurationException",
            ExceptionKind::Security => "SecurityException",
            ExceptionKind::Fatal => "FatalException",
        }
    }
}

/// Severity as in IIB exception entries: 1 information, 2 warning, 3 error.
pub const SEVERITY_ERROR: u8 = 3;

/// One exception of the `ExceptionList` chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Exception {
    /// The IIB exception type.
    pub kind: ExceptionKind,
    /// The message number (`BIP<number>`).
    pub number: u32,
    /// What went wrong, in words.
    pub text: String,
    /// 1 information, 2 warning, 3 error.
    pub severity: u8,
    /// The flow the exception was raised in (filled by the engine).
    pub flow: Arc<str>,
    /// The node id the exception was raised in (filled by the engine).
    pub node: Arc<str>,
    /// The node's type (filled by the engine).
    pub node_type: &'static str,
    /// Message inserts (values the text refers to).
    pub inserts: Vec<String>,
    /// The nested, more detailed cause.
    pub cause: Option<Box<Exception>>,
}

impl Exception {
    /// A new exception with severity error and no location (the engine fills flow and node).
    pub fn new(kind: ExceptionKind, number: u32, text: impl Into<String>) -> Exception {
        Exception {
            kind,
            number,
            text: text.into(),
            severity: SEVERITY_ERROR,
            flow: Arc::from(""),
            node: Arc::from(""),
            node_type: "",
            inserts: Vec::new(),
            cause: None,
        }
    }

    /// Adds a message insert.
    pub fn insert(mut self, value: impl Into<String>) -> Exception {
        self.inserts.push(value.into());
        self
    }

    /// Wraps `cause` as the nested cause of this exception.
    pub fn caused_by(mut self, cause: Exception) -> Exception {
        self.cause = Some(Box::new(cause));
        self
    }

    /// Sets the location where it is still empty (the innermost-first rule: an exception keeps
    /// the node that raised it).
    pub fn locate(mut self, flow: &str, node: &str, node_type: &'static str) -> Exception {
        if self.flow.is_empty() {
            self.flow = Arc::from(flow);
        }
        if self.node.is_empty() {
            self.node = Arc::from(node);
            self.node_type = node_type;
        }
        if let Some(c) = self.cause.take() {
            self.cause = Some(Box::new(c.locate(flow, node, node_type)));
        }
        self
    }

    /// `BIP<number>`.
    pub fn bip(&self) -> String {
        format!("BIP{}", self.number)
    }

    /// The chain from this exception to the innermost cause.
    pub fn chain(&self) -> impl Iterator<Item = &Exception> {
        std::iter::successors(Some(self), |e| e.cause.as_deref())
    }

    /// The tree as IIB shows it: `{ "RecoverableException": { "Number": .., "Text": ..,
    /// ..., "<CauseType>": { ... } } }`.
    pub fn to_tree(&self) -> Value {
        let mut m = Map::new();
        m.insert("Number".into(), Value::from(self.number));
        m.insert("Text".into(), Value::from(self.text.clone()));
        m.insert("Severity".into(), Value::from(self.severity));
        m.insert("Flow".into(), Value::from(&*self.flow));
        m.insert("Node".into(), Value::from(&*self.node));
        m.insert("Type".into(), Value::from(self.node_type));
        m.insert(
            "Label".into(),
            Value::from(format!("{}.{}", self.flow, self.node)),
        );
        m.insert(
            "Insert".into(),
            Value::Array(
                self.inserts
                    .iter()
                    .map(|s| Value::from(s.clone()))
                    .collect(),
            ),
        );
        if let Some(c) = &self.cause {
            if let Value::Object(cm) = c.to_tree() {
                m.extend(cm);
            }
        }
        let mut root = Map::new();
        root.insert(self.kind.name().into(), Value::Object(m));
        Value::Object(root)
    }
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.chain().enumerate() {
            if i > 0 {
                f.write_str("; caused by: ")?;
            }
            write!(f, "{} {}", e.bip(), e.kind.name())?;
            if !e.node.is_empty() {
                write!(f, " in {}.{}", e.flow, e.node)?;
            }
            write!(f, ": {}", e.text)?;
        }
        Ok(())
    }
}

impl std::error::Error for Exception {}

/// Message numbers raised by the engine and the built-in nodes (documented in
/// `docs/nodes.md`).
pub mod numbers {
    /// A node raised an exception; with its Failure terminal connected, the message was routed
    /// there (IIB's BIP2230).
    pub const NODE_EXCEPTION: u32 = 2230;
    /// A Rhai script failed at run time (error, limit, or bad value).
    pub const SCRIPT_ERROR: u32 = 2488;
    /// An exception reached the input node and no Catch terminal handled it: the message was
    /// discarded (IIB's BIP2628).
    pub const ROLLED_BACK_DISCARDED: u32 = 2628;
    /// An exception reached a TryCatch node whose Catch terminal is not connected.
    pub const TRYCATCH_DISCARDED: u32 = 2629;
    /// An exception was caught by a TryCatch node and the message routed to its Catch terminal.
    pub const TRYCATCH_CAUGHT: u32 = 2630;
    /// An exception reached the input node and the message was routed to its Catch terminal.
    pub const INPUT_CAUGHT: u32 = 2631;
    /// Per-message error entries of a node were summarised (rate limit).
    pub const ERRORS_SUMMARISED: u32 = 2632;
    /// A Throw node's default number (IIB's BIP3001).
    pub const USER_EXCEPTION: u32 = 3001;
    /// The payload is not valid JSON.
    pub const JSON_PARSER_ERROR: u32 = 5705;
    /// The payload is not valid UTF-8 text.
    pub const TEXT_PARSER_ERROR: u32 = 5706;
    /// A node panicked; its flow is stopped.
    pub const NODE_PANIC: u32 = 2111;
    /// A message could not be serialised for output.
    pub const SERIALISE_ERROR: u32 = 5707;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn local_env_changes_do_not_leak_into_copies() {
        let a = Message::new(Body::Json(json!({"x": 1})));
        let mut b = a.clone();
        b.set_local(&["Destination", "MQTT", "Output", "TopicName"], json!("t"));
        b.root_mut().body = Body::Json(json!({"x": 2}));
        assert_eq!(a.local(&["Destination"]), None);
        assert_eq!(a.root.body, Body::Json(json!({"x": 1})));
        assert_eq!(
            b.local(&["Destination", "MQTT", "Output", "TopicName"]),
            Some(json!("t"))
        );
    }

    #[test]
    fn json_payloads_parse_into_rhais_form_unless_a_number_would_change() {
        let b = Body::parse(Domain::Json, br#"{"a": [1, 2.5, "x"]}"#).unwrap();
        assert!(matches!(b, Body::Rhai(_)), "{b:?}");
        assert_eq!(b, Body::Json(json!({"a": [1, 2.5, "x"]})));
        let big = br#"{"id":18446744073709551615}"#;
        let b = Body::parse(Domain::Json, big).unwrap();
        assert!(matches!(b, Body::Json(_)), "{b:?}");
        assert_eq!(b.to_bytes(), big);
    }

    #[test]
    fn a_body_in_rhais_form_equals_and_serialises_as_the_json_body() {
        let v = json!({"b": [1, 2.5, null, "s"], "a": {"z": true, "y": -1}});
        let rhai = Body::Rhai(tree::to_dynamic(&v));
        assert_eq!(rhai, Body::Json(v.clone()));
        assert_ne!(rhai, Body::Json(json!({})));
        assert_ne!(rhai, Body::Text(v.to_string()));
        assert_eq!(rhai.domain(), Domain::Json);
        assert_eq!(rhai.to_bytes(), Body::Json(v).to_bytes());
        assert_eq!(
            Body::Rhai(Dynamic::from_float(f64::NAN)).to_bytes(),
            b"null"
        );
    }

    #[test]
    fn environment_is_shared_between_copies() {
        let a = Message::new(Body::Text("t".into()));
        let b = a.clone();
        *b.environment.lock() = json!({"seen": true});
        assert_eq!(a.environment.snapshot(), json!({"seen": true}));
    }

    #[test]
    fn bad_json_is_a_parser_exception_with_position() {
        let e = Body::parse(Domain::Json, b"{\"a\": 1,").unwrap_err();
        assert_eq!(e.kind, ExceptionKind::Parser);
        assert_eq!(e.number, numbers::JSON_PARSER_ERROR);
        assert!(e.text.contains("line 1 column 8"), "{}", e.text);
    }

    #[test]
    fn exception_tree_nests_causes_like_iib() {
        let e = Exception::new(ExceptionKind::Recoverable, 2230, "node failed")
            .caused_by(Exception::new(ExceptionKind::User, 3001, "boom").insert("42"))
            .locate("f", "n", "Compute");
        let t = e.to_tree();
        assert_eq!(t["RecoverableException"]["Number"], json!(2230));
        assert_eq!(t["RecoverableException"]["Label"], json!("f.n"));
        assert_eq!(
            t["RecoverableException"]["UserException"]["Text"],
            json!("boom")
        );
        assert_eq!(
            t["RecoverableException"]["UserException"]["Insert"],
            json!(["42"])
        );
        assert_eq!(
            e.to_string(),
            "BIP2230 RecoverableException in f.n: node failed; caused by: BIP3001 UserException in f.n: boom"
        );
    }
}
