//! Plain words for the Rhai errors a missing field causes. Reading a field a message does not
//! have gives `()`, and Rhai then reports what it could not do with it (for example
//! `Function not found: * ((), i64)` or `Unknown property 'MQTT' - a getter is not registered
//! for type '()'`). Here the dotted path on the failing line is looked up in the script's trees
//! as they were when it failed, and the error names the field that is missing — and, for an
//! assignment below a missing parent, shows the map literal that works.

use rhai::{Dynamic, EvalAltResult, Map, Scope};

/// An explanation of `e`, raised at `(line, column)` of `code` run with `scope`, if it comes
/// from a missing field.
pub fn explain(
    e: &EvalAltResult,
    (line, column): (usize, usize),
    code: &str,
    scope: &Scope,
) -> Option<String> {
    let text = code.lines().nth(line.checked_sub(1)?)?;
    let paths = paths_on(text);
    match e {
        EvalAltResult::ErrorFunctionNotFound(signature, _) if signature.contains("()") => {
            // The path nearest the error's column that reads a missing field.
            let mut found: Vec<_> = paths
                .iter()
                .filter_map(|p| missing(p, scope).map(|n| (p, n)))
                .collect();
            found.sort_by_key(|(p, _)| p.start.abs_diff(column));
            let &(p, n) = found.first()?;
            Some(format!(
                "{} is () — the field is missing (Rhai: Function not found: {signature})",
                p.segments[..=n].join(".")
            ))
        }
        EvalAltResult::ErrorDotExpr(message, _) if message.contains("type '()'") => {
            let (p, n) = paths
                .iter()
                .filter(|p| p.start <= column)
                .filter_map(|p| missing(p, scope).map(|n| (p, n)))
                .find(|(p, n)| n + 1 < p.segments.len())?;
            let parent = p.segments[..=n].join(".");
            let whole = p.segments.join(".");
            let value = assigned_value(text, p).unwrap_or("…");
            let literal = p.segments[n + 1..]
                .iter()
                .rev()
                .fold(value.to_string(), |inner, key| {
                    format!("#{{{key}: {inner}}}")
                });
            Some(format!(
                "{parent} is () — the field is missing, so {whole} cannot be set below it; create the missing parents with a map literal: {parent} = {literal};"
            ))
        }
        _ => None,
    }
}

/// A dotted path `a.b.c` on a line of script: its names and the 1-based column it starts at.
#[derive(Debug, PartialEq)]
struct Path<'a> {
    segments: Vec<&'a str>,
    start: usize,
    /// The byte offset just after its last name.
    end: usize,
}

/// The dotted paths of at least two names on `line`, outside string literals and comments; a
/// name followed by `(` (a method call) ends a path before it.
fn paths_on(line: &str) -> Vec<Path<'_>> {
    crate::script_paths::dotted_paths(line)
        .into_iter()
        .filter(|p| p.names.len() >= 2)
        .map(|p| Path {
            segments: p.names,
            start: p.column,
            end: p.end,
        })
        .collect()
}

/// The index of the first name of `p` (after the variable) that its tree lacks or holds as
/// `()`, if the variable is in `scope` and every parent before it is a map.
fn missing(p: &Path, scope: &Scope) -> Option<usize> {
    fn walk(d: &Dynamic, names: &[&str], at: usize) -> Option<usize> {
        let name = names.first()?;
        let map = d.read_lock::<Map>()?;
        match map.get(*name) {
            None => Some(at),
            Some(v) if v.is_unit() => Some(at),
            Some(v) => walk(v, &names[1..], at + 1),
        }
    }
    walk(scope.get(p.segments[0])?, &p.segments[1..], 1)
}

/// The right-hand side of `path = value;` when the line assigns to `p`.
fn assigned_value<'a>(line: &'a str, p: &Path) -> Option<&'a str> {
    let rest = line[p.end..].trim_start().strip_prefix('=')?;
    if rest.starts_with('=') {
        return None;
    }
    let value = rest.split(';').next()?.trim();
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhai::Engine;

    /// The explanation of the error `code` raises with a `Root` of `{"Body": {"n": 1}}` and an
    /// empty `LocalEnvironment`.
    fn explained(code: &str) -> Option<String> {
        let engine = Engine::new();
        let mut scope = Scope::new();
        let mut body = Map::new();
        body.insert("n".into(), Dynamic::from_int(1));
        let mut root = Map::new();
        root.insert("Body".into(), Dynamic::from_map(body));
        scope.push_dynamic("Root", Dynamic::from_map(root));
        scope.push_dynamic("LocalEnvironment", Dynamic::from_map(Map::new()));
        let e = engine
            .eval_with_scope::<Dynamic>(&mut scope, code)
            .expect_err("the script fails");
        let p = e.position();
        explain(&e, (p.line()?, p.position()?), code, &scope)
    }

    #[test]
    fn a_missing_field_in_arithmetic_is_named() {
        let e = explained("let x = Root.Body.n;\nlet y = Root.Body.price * 2;").unwrap();
        assert!(
            e.starts_with("Root.Body.price is () — the field is missing"),
            "{e}"
        );
        assert!(e.contains("* ((), i64)"), "{e}");
    }

    #[test]
    fn a_missing_field_before_a_method_is_named() {
        let e = explained("let s = Root.Body.name.len();").unwrap();
        assert!(e.starts_with("Root.Body.name is ()"), "{e}");
    }

    #[test]
    fn the_nearest_missing_path_is_named() {
        let e = explained("let a = Root.Body.n + 1; let b = Root.Body.price + 1;").unwrap();
        assert!(e.starts_with("Root.Body.price is ()"), "{e}");
    }

    #[test]
    fn setting_below_a_missing_parent_shows_the_literal_that_works() {
        let e = explained("LocalEnvironment.Destination.MQTT.Output.TopicName = \"x\";").unwrap();
        assert_eq!(
            e,
            "LocalEnvironment.Destination is () — the field is missing, so \
             LocalEnvironment.Destination.MQTT.Output.TopicName cannot be set below it; create \
             the missing parents with a map literal: LocalEnvironment.Destination = \
             #{MQTT: #{Output: #{TopicName: \"x\"}}};"
        );
        let e = explained("Root.Body.a.b = Root.Body.n + 1;").unwrap();
        assert!(e.ends_with("Root.Body.a = #{b: Root.Body.n + 1};"), "{e}");
    }

    #[test]
    fn other_errors_are_left_as_they_are() {
        assert_eq!(explained("throw \"no\";"), None);
        assert_eq!(explained("let x = \"a\" * 2;"), None);
        // The field exists: nothing to explain about it.
        assert_eq!(explained("let x = Root.Body.n * \"a\";"), None);
    }

    #[test]
    fn paths_skip_strings_comments_and_calls() {
        let names = |l| {
            paths_on(l)
                .into_iter()
                .map(|p| p.segments.join("."))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names("x = \"Root.Body.a\" + Root.Body.b; // Root.c.d"),
            ["Root.Body.b"]
        );
        assert_eq!(
            names("Root.Body.s.len() + a.b.f(1)"),
            ["Root.Body.s", "a.b"]
        );
        assert_eq!(names("let x = 1.5 + a.b;"), ["a.b"]);
        assert_eq!(paths_on("  Root.Body.x = 1")[0].start, 3);
    }
}
