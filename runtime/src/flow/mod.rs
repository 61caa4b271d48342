//! Flow files: raw JSON → validated graph → built flow.
//!
//! - [`spans`] records where each JSON value starts, so errors can name line:column.
//! - [`validate`] is pure: it turns a file's text into a [`ValidatedFlow`] (a petgraph graph
//!   whose edges name their terminals) or returns *every* problem at once.
//! - [`build`] makes runtime nodes from a validated flow (compiles scripts; connects nothing).

pub mod build;
pub mod spans;
pub mod validate;

use std::fmt;
use std::path::PathBuf;

pub use build::{
    build_flow, build_flow_with, flow_files, load_flow, load_flow_bundle, load_flow_text,
};
pub use spans::Pos;
pub use validate::{validate, validate_all, ValidatedFlow};

/// One problem with a flow file.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowError {
    /// The flow file.
    pub file: PathBuf,
    /// Where in the file, when it applies.
    pub pos: Option<Pos>,
    /// The node concerned, if any.
    pub node: Option<String>,
    /// The terminal concerned, if any.
    pub terminal: Option<String>,
    /// What is wrong.
    pub kind: FlowErrorKind,
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = self.file.display().to_string();
        if let Some(p) = self.pos {
            s.push_str(&format!(":{}:{}", p.line, p.column));
        }
        s.push_str(": ");
        if let Some(n) = &self.node {
            s.push_str(&format!("node '{n}': "));
        }
        if let Some(t) = &self.terminal {
            s.push_str(&format!("terminal '{t}': "));
        }
        s.push_str(&self.kind.to_string());
        // Names come from the file: never let a control character break the line or reach
        // the terminal.
        for c in s.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for FlowError {}

/// What is wrong with a flow file. Each variant's text says what to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlowErrorKind {
    /// The file could not be read.
    #[error("cannot read the flow file: {0}")]
    Io(String),
    /// The file is not valid JSON.
    #[error("malformed JSON: {0}")]
    Syntax(String),
    /// A value has the wrong JSON type.
    #[error("'{field}' must be {expected}, found {found}")]
    WrongType {
        /// The field.
        field: String,
        /// What it must be.
        expected: String,
        /// What it is.
        found: String,
    },
    /// A field the format does not know.
    #[error("unknown field '{field}'{hint} (allowed: {allowed})")]
    UnknownField {
        /// The field.
        field: String,
        /// ` (did you mean 'x'?)` or empty.
        hint: String,
        /// The allowed names.
        allowed: String,
    },
    /// A node type no kind is registered for.
    #[error("unknown node type '{type_name}'{hint} (known types: {known})")]
    UnknownNodeType {
        /// The type.
        type_name: String,
        /// ` (did you mean 'x'?)` or empty.
        hint: String,
        /// The registered types.
        known: String,
    },
    /// Two nodes share an id.
    #[error("duplicate node id '{id}' (first defined at line {first_line}); node ids must be unique within a flow")]
    DuplicateId {
        /// The id.
        id: String,
        /// Line of the first definition.
        first_line: u32,
    },
    /// A required property is missing.
    #[error("missing required property '{0}'")]
    MissingProperty(String),
    /// One of several alternative properties must be given.
    #[error("missing property: give {0}")]
    MissingOneOf(String),
    /// The same key appears twice in one JSON object (JSON parsers keep only one of them).
    #[error("duplicate key '{key}' (first at line {first_line}, column {first_column}); a JSON object keeps only one of them, so remove the other")]
    DuplicateKey {
        /// The key.
        key: String,
        /// Line of the first occurrence.
        first_line: u32,
        /// Column of the first occurrence.
        first_column: u32,
    },
    /// A property value is invalid or out of range.
    #[error("invalid value for '{property}': {message}")]
    BadValue {
        /// The property.
        property: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A connection names a node that does not exist.
    #[error("connection {end} '{endpoint}' names no node of this flow{hint}")]
    DanglingConnection {
        /// `from` or `to`.
        end: &'static str,
        /// The endpoint as written.
        endpoint: String,
        /// ` (did you mean 'x'?)` or empty.
        hint: String,
    },
    /// A connection names a terminal the node does not have.
    #[error("node '{node}' ({type_name}) has no {direction} terminal '{terminal}' (its {direction} terminals: {available})")]
    UnknownTerminal {
        /// The node.
        node: String,
        /// Its type.
        type_name: String,
        /// `output` or `input`.
        direction: &'static str,
        /// The terminal as written.
        terminal: String,
        /// The terminals it has.
        available: String,
    },
    /// A connection leads into an input node, which has no input terminal.
    #[error("connection into '{node}': {type_name} is an input node and has no input terminal")]
    ConnectionIntoInput {
        /// The node.
        node: String,
        /// Its type.
        type_name: String,
    },
    /// The connections form a cycle.
    #[error("connections form a cycle: {0}; a message would loop forever")]
    Cycle(String),
    /// A node names a server the configuration does not define.
    #[error("unknown server '{name}' (servers in the configuration: {known}); define [servers.{name}] in flowbus.toml or give \"url\" instead")]
    UnknownServer {
        /// The name.
        name: String,
        /// The defined names.
        known: String,
    },
    /// A script failed to compile.
    #[error("Rhai compile error in {script} at line {line}, column {column}: {message}")]
    Script {
        /// The script file, or `inline code`.
        script: String,
        /// Line in the script.
        line: u32,
        /// Column in the script.
        column: u32,
        /// The compiler's message.
        message: String,
    },
    /// A referenced file (a script) could not be read.
    #[error("cannot read {what} '{path}': {message}")]
    MissingFile {
        /// What the file is for.
        what: &'static str,
        /// The path, as resolved.
        path: String,
        /// The OS error.
        message: String,
    },
    /// A path the flow names (a `script`, a Trace `file`) breaks a rule of
    /// [`paths`](crate::paths): outside the flow's directory, or not a file name.
    #[error("\"{property}\" '{path}' {refusal}")]
    Path {
        /// The property naming the path.
        property: String,
        /// The path as the flow writes it.
        path: String,
        /// The rule it breaks.
        refusal: crate::paths::Refusal,
    },
    /// A flow without nodes, or without an input node.
    #[error("{0}")]
    Structure(String),
}

/// A list of flow errors, displayed one per line.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowErrors(pub Vec<FlowError>);

impl fmt::Display for FlowErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FlowErrors {}

/// ` (did you mean 'x'?)` when one candidate is close to `word`, else empty.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let best = candidates
        .into_iter()
        .map(|c| (edit_distance(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(1))
        // Ties go to the alphabetically first name, so the hint is the same on every run.
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    match best {
        Some((_, c)) => format!(" (did you mean '{c}'?)"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("scrpt", ["script", "code"]),
            " (did you mean 'script'?)"
        );
        assert_eq!(did_you_mean("zzzz", ["script", "code"]), "");
        assert_eq!(
            did_you_mean("compute", ["Compute", "Filter"]),
            " (did you mean 'Compute'?)"
        );
    }
}
