//! Assigning to a path whose parents do not exist creates them, as ESQL's `SET` does:
//! `LocalEnvironment.Destination.MQTT.Output.TopicName = "x";` works on a message without
//! `Destination`. Rhai has no hook for it (a missing map property reads as `()`, and setting a
//! property of `()` is an error), so the script is rewritten before it is compiled: a
//! statement that assigns to a dotted path of three names or more is preceded, on the same
//! line, by a call that creates the missing parents as empty maps —
//! `LocalEnvironment.__flowbus_parents("Destination.MQTT.Output"); LocalEnvironment.…`. The
//! call leaves an existing value alone (a parent that is a string stays a string, and the
//! assignment then fails as before). Positions in errors are mapped back to the text as
//! written.

use rhai::Dynamic;

/// The function the rewrite calls.
pub const PARENTS_FN: &str = "__flowbus_parents";

/// Creates the maps of `path` (dot-separated names) below `target` that are missing or `()`;
/// stops at a parent that holds anything else.
pub fn make_parents(target: &mut Dynamic, path: &str) {
    fn make(d: &mut Dynamic, names: &[&str]) {
        let Some((first, rest)) = names.split_first() else {
            return;
        };
        let Some(mut map) = d.write_lock::<rhai::Map>() else {
            return;
        };
        let child = map
            .entry((*first).into())
            .or_insert_with(|| Dynamic::from_map(rhai::Map::new()));
        if child.is_unit() {
            *child = Dynamic::from_map(rhai::Map::new());
        }
        make(child, rest);
    }
    let names: Vec<&str> = path.split('.').collect();
    make(target, &names);
}

/// A script as compiled: its text with the calls inserted, and where they went.
#[derive(Debug, Default, PartialEq)]
pub struct Rewritten {
    pub text: String,
    /// (line, column, length) of each insertion, 1-based, in the order of the text.
    inserts: Vec<(usize, usize, usize)>,
}

impl Rewritten {
    /// Whether anything was inserted.
    pub fn changed(&self) -> bool {
        !self.inserts.is_empty()
    }

    /// The position in the text as written of `(line, column)` in the rewritten text.
    pub fn original(&self, line: usize, column: usize) -> (usize, usize) {
        let mut shift = 0;
        for &(l, c, len) in &self.inserts {
            if l != line || c + shift > column {
                continue;
            }
            if column < c + shift + len {
                // Inside an inserted call: the statement it precedes.
                return (line, c);
            }
            shift += len;
        }
        (line, column - shift)
    }
}

/// Parents every message has: a statement that sets a field directly below them needs no call
/// (`Root.Body.bridged = true;` costs what it did).
const ALWAYS_THERE: &[&[&str]] = &[
    &["Root", "Body"],
    &["Root", "Properties"],
    &["LocalEnvironment", "Variables"],
];

/// Inserts the parent-creating calls before each statement of `code` that assigns (`=`) to
/// a dotted path of three names or more (a variable and two properties at least), outside
/// strings and comments. `ExceptionList` (a constant) is left alone.
pub fn rewrite(code: &str) -> Rewritten {
    let b = code.as_bytes();
    let mut out = Rewritten::default();
    let mut text = String::with_capacity(code.len());
    let mut copied = 0;
    for p in dotted_paths(code) {
        let names = &p.names;
        let mut j = p.end;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        let assigns = b.get(j) == Some(&b'=') && b.get(j + 1) != Some(&b'=');
        let parents = &names[..names.len().saturating_sub(1)];
        if p.at_statement
            && assigns
            && names.len() >= 3
            && !ALWAYS_THERE.contains(&parents)
            && names[0] != "ExceptionList"
        {
            let call = format!(
                "{}.{PARENTS_FN}(\"{}\"); ",
                names[0],
                parents[1..].join(".")
            );
            out.inserts.push((p.line, p.column, call.len()));
            text.push_str(&code[copied..p.start]);
            text.push_str(&call);
            copied = p.start;
        }
    }
    text.push_str(&code[copied..]);
    out.text = text;
    out
}

/// A dotted path in a script (`Root.Body.x`, or a lone name).
#[derive(Debug, PartialEq)]
pub struct PathAt<'a> {
    pub names: Vec<&'a str>,
    /// 1-based line and column (in characters) of its first name.
    pub line: usize,
    pub column: usize,
    /// Byte offsets of its first character and just after its last name.
    pub start: usize,
    pub end: usize,
    /// Whether it begins a statement (first in the text, or after `;`, `{` or `}`).
    pub at_statement: bool,
}

/// The dotted paths of `code`, outside strings and comments, in order. A name followed by `(`
/// (a call) is not part of a path, nor is a path that follows a `.` (`x[0].a.b`, `f().a`).
pub fn dotted_paths(code: &str) -> Vec<PathAt<'_>> {
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let (mut line, mut line_start) = (1, 0);
    let mut at_statement = true;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                line_start = i + 1;
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] == b'\n' {
                        line += 1;
                        line_start = i + 1;
                    }
                    i += 1;
                }
                i += 2;
            }
            b'"' | b'`' | b'\'' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    if b[i] == b'\\' {
                        i += 1;
                    } else if b[i] == b'\n' {
                        line += 1;
                        line_start = i + 1;
                    }
                    i += 1;
                }
                i += 1;
                at_statement = false;
            }
            b';' | b'{' | b'}' => {
                at_statement = true;
                i += 1;
            }
            c if ident(c) && !c.is_ascii_digit() && (i == 0 || b[i - 1] != b'.') => {
                let start = i;
                let mut names = Vec::new();
                let mut end = i;
                loop {
                    let s = i;
                    while i < b.len() && ident(b[i]) {
                        i += 1;
                    }
                    if b.get(i) == Some(&b'(') {
                        break;
                    }
                    names.push(&code[s..i]);
                    end = i;
                    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(|&c| ident(c)) {
                        i += 1;
                    } else {
                        break;
                    }
                }
                if !names.is_empty() {
                    out.push(PathAt {
                        names,
                        line,
                        column: code[line_start..start].chars().count() + 1,
                        start,
                        end,
                        at_statement,
                    });
                }
                at_statement = false;
            }
            _ => {
                at_statement = false;
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_set_deep_paths_get_their_parents_first() {
        let r = rewrite("let t = 1;\nLocalEnvironment.Destination.MQTT.Output.TopicName = \"x\";");
        assert_eq!(
            r.text,
            "let t = 1;\nLocalEnvironment.__flowbus_parents(\"Destination.MQTT.Output\"); LocalEnvironment.Destination.MQTT.Output.TopicName = \"x\";"
        );
        let r = rewrite("if a { Root.Body.x.y = 1; } else { m.a.b = 2 }");
        assert_eq!(
            r.text,
            "if a { Root.__flowbus_parents(\"Body.x\"); Root.Body.x.y = 1; } else { m.__flowbus_parents(\"a\"); m.a.b = 2 }"
        );
    }

    #[test]
    fn reads_comparisons_strings_comments_and_short_paths_are_left_alone() {
        for code in [
            "let x = Root.Body.a.b;",
            "if Root.Body.a.b == 1 { }",
            "Root.Body = 1; Root.x = 2;",
            "let s = \"Root.Body.a.b = 1\";",
            "// Root.Body.a.b = 1\n/* Root.Body.a.b = 1 */",
            "let s = `a ${Root.Body.a.b = 1}`;",
            "ExceptionList.a.b = 1;",
            "f(Root.Body.a.b = 1);",
            "Root.Body.a.b += 1;",
            "Root.Body.a = 1; LocalEnvironment.Variables.x = 2;",
        ] {
            assert!(!rewrite(code).changed(), "{code}");
        }
    }

    #[test]
    fn positions_map_back_to_the_text_as_written() {
        let r = rewrite("x = 1;\n  Root.Body.a.b = 1; Root.Body.c.d = 2;");
        let (first, second) = (
            "Root.__flowbus_parents(\"Body.a\"); ".len(),
            "Root.__flowbus_parents(\"Body.c\"); ".len(),
        );
        assert_eq!(r.original(1, 3), (1, 3));
        assert_eq!(r.original(2, 1), (2, 1));
        // Inside the first call: the statement it precedes.
        assert_eq!(r.original(2, 5), (2, 3));
        // `=` of the first statement.
        assert_eq!(r.original(2, 17 + first), (2, 17));
        // `Root` of the second statement, then inside the second call.
        assert_eq!(r.original(2, 22 + first + second), (2, 22));
        assert_eq!(r.original(2, 22 + first + 3), (2, 22));
    }

    #[test]
    fn parents_are_created_and_values_kept() {
        let mut m = Dynamic::from_map(rhai::Map::new());
        make_parents(&mut m, "Destination.MQTT.Output");
        assert_eq!(
            m.to_string(),
            "#{\"Destination\": #{\"MQTT\": #{\"Output\": #{}}}}"
        );
        let mut m: Dynamic =
            serde_json::from_str::<Dynamic>(r#"{"a": "text", "b": null}"#).unwrap();
        make_parents(&mut m, "a.x");
        make_parents(&mut m, "b.y");
        assert_eq!(m.to_string(), "#{\"a\": \"text\", \"b\": #{\"y\": #{}}}");
    }
}
