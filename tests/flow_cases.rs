//! Flows run through the test harness, one folder each under `tests/flows/<case>/`:
//!
//! - `flow.json` (+ scripts): the flow. Its input node is never started; messages are
//!   injected at it.
//! - `input.json`: the messages, injected one after the other, each after the previous one's
//!   propagation has finished:
//!   `[{"node": "in", "body": <JSON>, "domain": "JSON"|"TEXT", "LocalEnvironment": {..}}]`
//!   (`domain` defaults to JSON; `LocalEnvironment` members are set over the default
//!   `{"Variables": {}}`).
//! - `expected.json`:
//!   - `dispositions`: what became of each input, in order: `Completed`, `Caught`,
//!     `Discarded`.
//!   - `events`: *every* propagation of the whole run, in order, each
//!     `{"at": "node.Terminal", ...}` — so both the terminals reached and their order are
//!     exact. Optional members compared per event: `body` (`Root.Body`, exact), `domain`
//!     (`JSON`, `TEXT` or `BLOB`: how the body is held, which `body` alone cannot tell),
//!     `Properties`, `LocalEnvironment`, `ExceptionList` (patterns, below) and `Environment`
//!     (a pattern against the shared tree as it is at the end of the run: it is one tree per
//!     input message and never rolled back; copy it into the body in a script to see it at a
//!     point in time).
//!   - `discards`: every discarded message, `{"node": <input node>, "exception": <pattern
//!     against the ExceptionList tree>}` (default: none).
//!   - `activity`: every activity-log entry, in order, each a BIP number (`"BIP2628"`) or a
//!     pattern against the entry's JSON (`number`, `severity`, `resource`, `flow`, `node`,
//!     `message`, `tags`) (default: none).
//!   - `stats` (optional): `{"<node id>": <pattern against its statistics>}`, with
//!     `invocations`, `errors` and `terminals` (`{"Out": 1}`).
//!
//! Patterns: an object matches an object that has at least its members (each matching); an
//! array matches an array of the same length, element by element; anything else must be
//! equal. Three markers: `"$absent"` as a member value means the member must not exist;
//! `{"$exact": v}` must equal `v` exactly (no subset); `{"$contains": "text"}` matches a string
//! containing the text.
//!
//! Every folder needs a line in `cases!` below; `every_case_folder_has_a_test` fails otherwise.

use std::path::{Path, PathBuf};

use flowbus_runtime::harness::Harness;
use flowbus_runtime::{Body, Disposition, Message};
use serde::Deserialize;
use serde_json::{Map, Value};

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_case(stringify!($name));
            }
        )*
        /// The case folders that have a test.
        const CASES: &[&str] = &[$(stringify!($name)),*];
    };
}

cases! {
    catch_path_throws,
    compute_enrich,
    compute_error_to_failure,
    compute_error_to_trycatch,
    depth_first_order,
    environment_shared_not_rolled_back,
    infinite_loop_to_failure,
    sibling_isolation,
    text_domain,
    throw_custom_in_catch,
    trace_pattern_to_log,
    exception_to_input_catch,
    uncaught_exception_discarded,
    trycatch_catch_unconnected,
    filter_routing,
    propagate_out1_return_false,
    propagate_several_in_order,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    node: String,
    body: Value,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default, rename = "LocalEnvironment")]
    local_environment: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expected {
    dispositions: Vec<String>,
    events: Vec<Map<String, Value>>,
    #[serde(default)]
    discards: Vec<ExpectedDiscard>,
    #[serde(default)]
    activity: Vec<Value>,
    #[serde(default)]
    stats: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedDiscard {
    node: String,
    exception: Value,
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flows")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn message(input: &Input) -> Message {
    let body = match input.domain.as_deref() {
        None | Some("JSON") => Body::Json(input.body.clone()),
        Some("TEXT") => match &input.body {
            Value::String(s) => Body::Text(s.clone()),
            other => panic!("a TEXT body must be a string, not {other}"),
        },
        Some(other) => panic!("unknown domain {other} in input.json"),
    };
    let mut msg = Message::new(body);
    if let Some(le) = &input.local_environment {
        for (k, v) in le {
            msg.set_local(&[k], v.clone());
        }
    }
    msg
}

fn disposition_name(d: &Disposition) -> &'static str {
    match d {
        Disposition::Completed => "Completed",
        Disposition::Caught => "Caught",
        Disposition::Discarded(_) => "Discarded",
    }
}

/// Where `actual` fails to match the pattern `expected` (empty when it matches).
fn mismatches(expected: &Value, actual: Option<&Value>, path: &str, out: &mut Vec<String>) {
    if expected.as_str() == Some("$absent") {
        if let Some(a) = actual {
            out.push(format!("{path}: must be absent, found {a}"));
        }
        return;
    }
    let Some(actual) = actual else {
        out.push(format!("{path}: missing, expected {expected}"));
        return;
    };
    match expected {
        Value::Object(e) if e.len() == 1 && e.contains_key("$exact") => {
            if &e["$exact"] != actual {
                out.push(format!(
                    "{path}: expected exactly {}, found {actual}",
                    e["$exact"]
                ));
            }
        }
        Value::Object(e) if e.len() == 1 && e.contains_key("$contains") => {
            let needle = e["$contains"].as_str().expect("$contains takes a string");
            if !actual.as_str().is_some_and(|s| s.contains(needle)) {
                out.push(format!(
                    "{path}: expected a string containing {needle:?}, found {actual}"
                ));
            }
        }
        Value::Object(e) => match actual {
            Value::Object(a) => {
                for (k, v) in e {
                    mismatches(v, a.get(k), &format!("{path}.{k}"), out);
                }
            }
            _ => out.push(format!("{path}: expected an object, found {actual}")),
        },
        Value::Array(e) => match actual {
            Value::Array(a) if a.len() == e.len() => {
                for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                    mismatches(ev, Some(av), &format!("{path}[{i}]"), out);
                }
            }
            _ => out.push(format!(
                "{path}: expected an array of {} elements, found {actual}",
                e.len()
            )),
        },
        _ => {
            if expected != actual {
                out.push(format!("{path}: expected {expected}, found {actual}"));
            }
        }
    }
}

fn check_event(i: usize, expected: &Map<String, Value>, at: &str, msg: &Message) -> Vec<String> {
    let mut out = Vec::new();
    let trees = msg.trees_json();
    let where_ = format!("events[{i}] ({at})");
    for (k, v) in expected {
        match k.as_str() {
            "at" => {
                if v.as_str() != Some(at) {
                    out.push(format!("{where_}: expected at {v}"));
                }
            }
            "body" => {
                let body = msg.root.body.to_value();
                if &body != v {
                    out.push(format!("{where_}.body: expected exactly {v}, found {body}"));
                }
            }
            "domain" => {
                let domain = msg.root.body.domain().name();
                if v.as_str() != Some(domain) {
                    out.push(format!("{where_}.domain: expected {v}, found {domain}"));
                }
            }
            "Properties" => mismatches(
                v,
                trees["Root"].get("Properties"),
                &format!("{where_}.Properties"),
                &mut out,
            ),
            "LocalEnvironment" | "Environment" | "ExceptionList" => {
                mismatches(v, trees.get(k), &format!("{where_}.{k}"), &mut out)
            }
            other => panic!("events[{i}]: unknown member '{other}' in expected.json"),
        }
    }
    out
}

fn run_case(case: &str) {
    let dir = cases_dir().join(case);
    let inputs: Vec<Input> = read_json(&dir.join("input.json"));
    let expected: Expected = read_json(&dir.join("expected.json"));
    assert!(!inputs.is_empty(), "{case}: input.json lists no message");
    let registry = flowbus_nodes::registry();
    let h = Harness::load(&dir.join("flow.json"), &registry)
        .unwrap_or_else(|e| panic!("{case}: the flow does not load:\n{e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dispositions: Vec<&str> = inputs
        .iter()
        .map(|input| disposition_name(&rt.block_on(h.inject(&input.node, message(input)))))
        .collect();

    let mut problems = Vec::new();
    if dispositions != expected.dispositions {
        problems.push(format!(
            "dispositions: expected {:?}, found {dispositions:?}",
            expected.dispositions
        ));
    }

    let events = h.events();
    let ats: Vec<&str> = events.iter().map(|(at, _)| at.as_str()).collect();
    let expected_ats: Vec<&str> = expected
        .events
        .iter()
        .map(|e| {
            e.get("at")
                .and_then(Value::as_str)
                .expect("every event has \"at\"")
        })
        .collect();
    if ats != expected_ats {
        problems.push(format!(
            "events: expected the propagations\n  {expected_ats:?}\nfound\n  {ats:?}"
        ));
    } else {
        for (i, (e, (at, msg))) in expected.events.iter().zip(&events).enumerate() {
            problems.extend(check_event(i, e, at, msg));
        }
    }

    let discards = h.discards();
    if discards.len() != expected.discards.len() {
        problems.push(format!(
            "discards: expected {}, found {}: {:?}",
            expected.discards.len(),
            discards.len(),
            discards
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect::<Vec<_>>()
        ));
    } else {
        for (i, (e, (node, exception))) in expected.discards.iter().zip(&discards).enumerate() {
            if &e.node != node {
                problems.push(format!(
                    "discards[{i}]: expected at node {}, found {node}",
                    e.node
                ));
            }
            mismatches(
                &e.exception,
                Some(&exception.to_tree()),
                &format!("discards[{i}].exception"),
                &mut problems,
            );
        }
    }

    let activity: Vec<Value> = h
        .activity()
        .iter()
        .map(|e| serde_json::to_value(&**e).expect("entries serialise"))
        .collect();
    if activity.len() != expected.activity.len() {
        problems.push(format!(
            "activity: expected {} entries, found {}",
            expected.activity.len(),
            activity.len()
        ));
    } else {
        for (i, (e, a)) in expected.activity.iter().zip(&activity).enumerate() {
            let pattern = match e {
                Value::String(number) => serde_json::json!({ "number": number }),
                other => other.clone(),
            };
            mismatches(&pattern, Some(a), &format!("activity[{i}]"), &mut problems);
        }
    }

    if let Some(stats) = &expected.stats {
        let actual: Map<String, Value> = h
            .flow()
            .node_stats()
            .into_iter()
            .map(|s| {
                (
                    s.node.clone(),
                    serde_json::to_value(&s).expect("stats serialise"),
                )
            })
            .collect();
        mismatches(
            &Value::Object(stats.clone()),
            Some(&Value::Object(actual)),
            "stats",
            &mut problems,
        );
    }

    if !problems.is_empty() {
        let shown: Vec<Value> = events
            .iter()
            .map(|(at, m)| {
                let mut t = m.trees_json();
                t["at"] = Value::from(at.as_str());
                t
            })
            .collect();
        panic!(
            "\n{case}: {} problem(s):\n- {}\n\nwhat happened:\nevents = {}\ndiscards = {:?}\nactivity = {}\n",
            problems.len(),
            problems.join("\n- "),
            serde_json::to_string_pretty(&shown).unwrap_or_default(),
            discards.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>(),
            serde_json::to_string_pretty(&activity).unwrap_or_default(),
        );
    }
}

#[test]
fn every_case_folder_has_a_test() {
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(cases_dir()).expect("tests/flows exists") {
        let entry = entry.expect("readable directory entry");
        if entry.path().is_dir() {
            folders.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    folders.sort();
    let missing: Vec<&String> = folders
        .iter()
        .filter(|f| !CASES.contains(&f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "folders under tests/flows without a test (add them to `cases!`): {missing:?}"
    );
    let mut listed: Vec<&str> = CASES.to_vec();
    listed.sort_unstable();
    assert_eq!(
        listed, folders,
        "`cases!` names folders that do not exist, or names one twice"
    );
}

/// The matcher itself: a pattern that should not match must not.
#[test]
fn patterns_match_only_what_they_state() {
    let actual = serde_json::json!({"a": 1, "b": {"c": [1, 2], "d": "hello"}});
    let check = |p: Value| {
        let mut out = Vec::new();
        mismatches(&p, Some(&actual), "x", &mut out);
        out.is_empty()
    };
    assert!(check(serde_json::json!({"a": 1})));
    assert!(check(
        serde_json::json!({"b": {"d": {"$contains": "ell"}}, "z": "$absent"})
    ));
    assert!(check(serde_json::json!({"b": {"c": [1, 2]}})));
    assert!(!check(serde_json::json!({"a": 2})));
    assert!(!check(serde_json::json!({"a": "$absent"})));
    assert!(!check(serde_json::json!({"z": 1})));
    assert!(!check(serde_json::json!({"b": {"c": [1]}})));
    assert!(!check(serde_json::json!({"b": {"$exact": {"d": "hello"}}})));
    assert!(!check(
        serde_json::json!({"b": {"d": {"$contains": "bye"}}})
    ));
    assert!(!check(serde_json::json!({"a": 1.0})));
}
