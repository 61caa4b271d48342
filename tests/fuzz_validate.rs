//! Robustness of validation and building: every flow file of the project (`flows/`,
//! `tests/flows/*/flow.json`, `tests/flow_errors/*/flow.json`) is mutated with a small
//! deterministic PRNG — truncated, bytes deleted, inserted or replaced with JSON-significant
//! characters, keys dropped, duplicated or renamed, values swapped for other JSON types, huge
//! numbers, deep nesting — and each variant is validated and, when valid, built. Nothing may
//! panic, and every error must carry a message and name the file, at a position inside it.
//!
//! A failure prints the variant's seed file, mutation and text, and writes the text under
//! `target/tmp/fuzz_validate/` so `flowbus validate` can reproduce it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use flowbus_runtime::config::Config;
use flowbus_runtime::flow::{build_flow, validate, FlowError, FlowErrorKind};
use flowbus_runtime::node::{Registry, ValidateCtx};
use flowbus_runtime::services::Services;
use serde_json::Value;

/// xorshift64* (Vigna): small, fast, deterministic; good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Text spliced into documents: JSON's structural characters and some troublemakers.
const TOKENS: &[&str] = &[
    "{", "}", "[", "]", "\"", ",", ":", "\\", " ", "\n", "\t", "0", "-", ".", "e", "true", "null",
    "é", "→", "\\u0000", "\\ud800", "/", "~", "${", "\u{feff}",
];

/// Values swapped in for others.
const VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1.5",
    "3",
    "65536",
    "\"\"",
    "\"x\"",
    "\"Out\"",
    "\"in.Out\"",
    "\"0s\"",
    "[]",
    "{}",
    "[\"a\"]",
    "{\"a\": 1}",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "-1e308",
    "1e-320",
    "-0",
];

/// Number literals that do not fit, or barely fit, the usual types (spliced as text).
const HUGE_NUMBERS: &[&str] = &[
    "1e400",
    "-1e400",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "0.000000000000000000000000000001",
    "1E+999999999999",
    "18446744073709551616",
];

/// Names used when renaming keys.
const KEYS: &[&str] = &[
    "",
    " ",
    "id",
    "type",
    "nodes",
    "connections",
    "from",
    "to",
    "script",
    "code",
    "a/b",
    "~1",
    "~",
    "é",
    "Nodes",
    "count ",
    "__proto__",
];

struct Variant {
    seed: String,
    how: String,
    text: String,
}

/// JSON pointers of every value in `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                pointers(
                    x,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn parent_and_key(pointer: &str) -> Option<(&str, String)> {
    let (parent, key) = pointer.rsplit_once('/')?;
    Some((parent, key.replace("~1", "/").replace("~0", "~")))
}

fn char_floor(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    let mut s = open.repeat(depth);
    s.push_str(inner);
    s.push_str(&close.repeat(depth));
    s
}

/// One variant of `text`.
fn mutate(rng: &mut Rng, text: &str) -> (String, String) {
    let len = text.len().max(1);
    match rng.below(12) {
        0 => {
            let at = char_floor(text, rng.below(len));
            (format!("truncate at byte {at}"), text[..at].to_string())
        }
        1 => {
            let at = char_floor(text, rng.below(len));
            let end = char_floor(text, at + 1 + rng.below(8)).max(at);
            let mut t = text.to_string();
            t.replace_range(at..end, "");
            (format!("delete bytes {at}..{end}"), t)
        }
        2 => {
            let mut t = text.to_string();
            let mut how = String::from("insert");
            for _ in 0..1 + rng.below(3) {
                let at = char_floor(&t, rng.below(t.len().max(1)));
                let tok = rng.pick(TOKENS);
                t.insert_str(at, tok);
                how.push_str(&format!(" {tok:?}@{at}"));
            }
            (how, t)
        }
        3 => {
            let at = char_floor(text, rng.below(len));
            let end = char_floor(text, at + 1).max(at);
            let tok = rng.pick(TOKENS);
            let mut t = text.to_string();
            t.replace_range(at..end, tok);
            (format!("replace byte {at} with {tok:?}"), t)
        }
        4 => {
            // Duplicate a line holding a member, so a key appears twice in one object.
            let lines: Vec<&str> = text.lines().collect();
            let members: Vec<usize> = (0..lines.len())
                .filter(|i| lines[*i].contains("\":"))
                .collect();
            if members.is_empty() {
                return (String::from("unchanged"), text.to_string());
            }
            let i = *rng.pick(&members);
            let mut out: Vec<&str> = lines.clone();
            out.insert(i, lines[i]);
            (format!("duplicate line {}", i + 1), out.join("\n"))
        }
        5 => {
            // Replace a number literal with one that does not fit.
            let digits: Vec<usize> = text
                .char_indices()
                .filter(|(i, c)| {
                    c.is_ascii_digit()
                        && (*i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric())
                })
                .map(|(i, _)| i)
                .collect();
            if digits.is_empty() {
                return (String::from("unchanged"), text.to_string());
            }
            let at = *rng.pick(&digits);
            let end = text[at..]
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .map_or(text.len(), |n| at + n);
            let n = rng.pick(HUGE_NUMBERS);
            let mut t = text.to_string();
            t.replace_range(at..end, n);
            (format!("number at byte {at} -> {n}"), t)
        }
        _ => structural(rng, text),
    }
}

/// Mutations of the parsed document, written back as pretty JSON.
fn structural(rng: &mut Rng, text: &str) -> (String, String) {
    let Ok(mut doc) = serde_json::from_str::<Value>(text) else {
        // An invalid seed: splice a whole value somewhere instead.
        let at = char_floor(text, rng.below(text.len().max(1)));
        let v = rng.pick(VALUES);
        let mut t = text.to_string();
        t.insert_str(at, v);
        return (format!("insert {v} at {at}"), t);
    };
    let mut all = Vec::new();
    pointers(&doc, String::new(), &mut all);
    let target = rng.pick(&all).clone();
    let how = match rng.below(6) {
        0 => {
            // Drop a member or element.
            if let Some((parent, key)) = parent_and_key(&target) {
                match doc.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.remove(&key);
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = key.parse::<usize>() {
                            if i < a.len() {
                                a.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
            format!("drop {target}")
        }
        1 => {
            let v = rng.pick(VALUES);
            if let Some(slot) = doc.pointer_mut(&target) {
                *slot = serde_json::from_str(v).unwrap_or(Value::Null);
            }
            format!("{target} = {v}")
        }
        2 => {
            // Rename a member.
            let new = rng.pick(KEYS).to_string();
            if let Some((parent, key)) = parent_and_key(&target) {
                if let Some(Value::Object(m)) = doc.pointer_mut(parent) {
                    if let Some(v) = m.remove(&key) {
                        m.insert(new.clone(), v);
                    }
                }
            }
            format!("rename {target} to {new:?}")
        }
        3 => {
            // Copy one part of the document over another (a node into a connection, ...).
            let source = rng.pick(&all).clone();
            let v = doc.pointer(&source).cloned().unwrap_or(Value::Null);
            if let Some(slot) = doc.pointer_mut(&target) {
                *slot = v;
            }
            format!("{target} = copy of {source}")
        }
        4 => {
            // Nest deeply: within serde_json's limit (128) or just beyond it.
            let depth = 60 + rng.below(100);
            let inner = nested(depth, "[", "]", "1");
            let v: Value =
                serde_json::from_str(&nested(depth.min(120), "[", "]", "1")).unwrap_or(Value::Null);
            if let Some(slot) = doc.pointer_mut(&target) {
                *slot = v;
            }
            let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
            if depth > 120 {
                // Beyond what a Value round-trip keeps: splice the text itself.
                let at = char_floor(&text, rng.below(text.len().max(1)));
                let mut t = text.clone();
                t.insert_str(at, &inner);
                return (format!("splice {depth} nested arrays at byte {at}"), t);
            }
            return (format!("{target} = {depth} nested arrays"), text);
        }
        _ => {
            // Long or odd strings.
            let s = match rng.below(4) {
                0 => "x".repeat(10_000 + rng.below(10_000)),
                1 => "é→\u{1F600}".repeat(50),
                2 => String::from("a.b.c.d"),
                _ => String::from("in.Out.Out"),
            };
            let shown = s.chars().take(12).collect::<String>();
            if let Some(slot) = doc.pointer_mut(&target) {
                *slot = Value::String(s);
            }
            format!("{target} = string {shown:?}...")
        }
    };
    (how, serde_json::to_string_pretty(&doc).unwrap_or_default())
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every flow file of the project: `flows/*.json` and the `flow.json` of each test case.
fn seed_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let json_in = |dir: PathBuf, files: &mut Vec<PathBuf>| {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "json") && p.is_file() {
                    files.push(p);
                }
            }
        }
    };
    json_in(root().join("flows"), &mut files);
    for dir in ["tests/flows", "tests/flow_errors"] {
        let rd = std::fs::read_dir(root().join(dir)).expect("test case folders exist");
        for e in rd.flatten() {
            let p = e.path().join("flow.json");
            if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Inputs no mutation of the seeds would reach.
fn special_inputs() -> Vec<(String, String)> {
    let flow =
        |nodes: &str| format!("{{\"nodes\": [{{\"id\": \"in\", \"type\": \"Timer\"}}{nodes}]}}");
    vec![
        ("empty".into(), String::new()),
        ("spaces".into(), "   \n\t ".into()),
        ("null".into(), "null".into()),
        ("number".into(), "12".into()),
        ("string".into(), "\"flow\"".into()),
        ("byte order mark".into(), "\u{feff}{\"nodes\": []}".into()),
        ("10,000 [".into(), "[".repeat(10_000)),
        ("10,000 [ closed".into(), nested(10_000, "[", "]", "")),
        ("10,000 {\"a\":".into(), "{\"a\":".repeat(10_000)),
        (
            "nodes nested 10,000 deep".into(),
            format!("{{\"nodes\": {}}}", nested(10_000, "[", "]", "")),
        ),
        (
            "payload nested 120 deep".into(),
            flow(&format!(
                ", {{\"id\": \"t\", \"type\": \"Timer\", \"payload\": {}}}",
                nested(120, "{\"a\":", "}", "1")
            )),
        ),
        ("100,000-digit number".into(), format!("{{\"nodes\": {}}}", "9".repeat(100_000))),
        ("nodes is an object".into(), "{\"nodes\": {}}".into()),
        ("odd node entries".into(), "{\"nodes\": [null, 1, \"x\", [], {}]}".into()),
        (
            "odd connections".into(),
            format!(
                "{{\"nodes\": [{{\"id\": \"in\", \"type\": \"Timer\"}}], \"connections\": [{}]}}",
                "null, 1, {}, {\"from\": \"\", \"to\": \"\"}, {\"from\": \".\", \"to\": \"..\"}, {\"from\": \"in.\", \"to\": \"in..Out\"}, {\"from\": \"in.Out\", \"to\": \"in.Out\"}"
            ),
        ),
        (
            "keys that need JSON-pointer escaping".into(),
            flow(", {\"id\": \"t\", \"type\": \"Trace\", \"a/b\": 1, \"~0\": 2, \"~1\": 3, \"\": 4, \"\\u00e9\\\"\": 5}"),
        ),
        (
            "deeply nested Rhai".into(),
            flow(&format!(
                ", {{\"id\": \"c\", \"type\": \"Compute\", \"code\": \"{}\"}}",
                nested(5_000, "(", ")", "1")
            )),
        ),
        (
            "Rhai with a very long line".into(),
            flow(&format!(
                ", {{\"id\": \"c\", \"type\": \"Compute\", \"code\": \"let x = {};\"}}",
                vec!["1"; 20_000].join(" + ")
            )),
        ),
        (
            "script path outside the folder".into(),
            flow(", {\"id\": \"c\", \"type\": \"Compute\", \"script\": \"../../../../../../../../nonexistent/x.rhai\"}"),
        ),
        (
            "script path is a directory".into(),
            flow(", {\"id\": \"c\", \"type\": \"Compute\", \"script\": \".\"}"),
        ),
        ("10,000 nodes".into(), {
            let nodes: Vec<String> = (0..10_000)
                .map(|i| format!("{{\"id\": \"n{i}\", \"type\": \"Trace\"}}"))
                .collect();
            flow(&format!(", {}", nodes.join(", ")))
        }),
    ]
}

fn registry_and_ctx() -> (Registry, ValidateCtx, Arc<Config>) {
    let config = Config::parse(
        Path::new("flowbus.toml"),
        "[servers.plant]\nurl = \"tcp://127.0.0.1:1883\"\n[servers.cloud]\nurl = \"tcp://127.0.0.1:1884\"\n",
    )
    .expect("the fuzz configuration parses");
    let ctx = ValidateCtx {
        servers: config.servers.keys().cloned().collect(),
    };
    (flowbus_nodes::registry(), ctx, Arc::new(config))
}

/// What is wrong with one error of a variant (empty when nothing is).
fn error_problems(e: &FlowError, file: &Path, text: &str) -> Vec<String> {
    let mut p = Vec::new();
    let shown = e.to_string();
    if e.file != file {
        p.push(format!("names the file {:?}, not {:?}", e.file, file));
    }
    if !shown.starts_with(&file.display().to_string()) {
        p.push(format!("does not start with the file name: {shown}"));
    }
    if e.kind.to_string().trim().is_empty() {
        p.push(format!("has an empty message: {shown:?}"));
    }
    // Names and values from the flow file are escaped, so one error is always one line.
    if shown.chars().any(char::is_control) {
        p.push(format!("holds a control character: {shown:?}"));
    }
    if let Some(pos) = e.pos {
        let lines: Vec<&str> = text.split('\n').collect();
        if pos.line == 0 || pos.column == 0 {
            p.push(format!(
                "position {}:{} is not 1-based: {shown}",
                pos.line, pos.column
            ));
        } else if pos.line as usize > lines.len() {
            p.push(format!(
                "line {} is past the end ({} lines): {shown}",
                pos.line,
                lines.len()
            ));
        } else {
            let width = lines[pos.line as usize - 1].chars().count();
            if pos.column as usize > width + 1 {
                p.push(format!(
                    "column {} is past the end of line {} ({width} characters): {shown}",
                    pos.column, pos.line
                ));
            }
        }
    }
    p
}

/// Validates and builds one variant; returns whether it was rejected and what is wrong.
fn check(
    file: &Path,
    text: &str,
    registry: &Registry,
    ctx: &ValidateCtx,
    config: &Arc<Config>,
) -> (bool, Vec<String>) {
    let run = catch_unwind(AssertUnwindSafe(|| {
        let errors = match validate(file, text, registry, ctx) {
            Ok(v) => {
                let services = Arc::new(Services::default());
                match build_flow(&v, registry, config.clone(), services) {
                    Ok(_) => return (false, Vec::new()),
                    Err(errors) => errors,
                }
            }
            Err(errors) => errors,
        };
        let mut p = Vec::new();
        if errors.is_empty() {
            p.push("rejected with an empty error list".to_string());
        }
        for e in &errors {
            p.extend(error_problems(e, file, text));
        }
        (true, p)
    }));
    match run {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            (true, vec![format!("PANIC: {what}")])
        }
    }
}

fn failures_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_validate")
}

fn report(failures: &[(Variant, Vec<String>)]) -> String {
    let dir = failures_dir();
    let _ = std::fs::create_dir_all(&dir);
    let mut out = format!("{} variant(s) failed:\n", failures.len());
    for (i, (v, problems)) in failures.iter().enumerate().take(10) {
        let saved = dir.join(format!("failure-{i}.json"));
        let _ = std::fs::write(&saved, &v.text);
        let preview: String = v.text.chars().take(600).collect();
        out.push_str(&format!(
            "\n[{i}] {} — {}\n  saved as {}\n  {}\n  text: {preview}\n",
            v.seed,
            v.how,
            saved.display(),
            problems.join("\n  ")
        ));
    }
    out
}

const VARIANTS_PER_SEED: usize = 80;

#[test]
fn mutated_flows_never_panic_and_errors_name_the_file() {
    let (registry, ctx, config) = registry_and_ctx();
    let seeds = seed_files();
    assert!(seeds.len() >= 20, "found only {} seed flows", seeds.len());
    let mut rng = Rng::new(0x5EED_F10B_u64);
    let mut variants = Vec::new();
    for seed in &seeds {
        let text = std::fs::read_to_string(seed).expect("seed flows are UTF-8");
        for _ in 0..VARIANTS_PER_SEED {
            let (how, t) = mutate(&mut rng, &text);
            variants.push((
                seed.clone(),
                Variant {
                    seed: seed
                        .strip_prefix(root())
                        .unwrap_or(seed)
                        .display()
                        .to_string(),
                    how,
                    text: t,
                },
            ));
        }
    }
    // The specials go through one of the seed paths, so scripts resolve somewhere real.
    for (how, text) in special_inputs() {
        variants.push((
            seeds[0].clone(),
            Variant {
                seed: String::from("special"),
                how,
                text,
            },
        ));
    }
    assert!(variants.len() >= 3000, "only {} variants", variants.len());

    // Keep panic messages of caught panics out of the test output; they are reported below.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut rejected = 0usize;
    for (path, v) in variants {
        let (was_rejected, problems) = check(&path, &v.text, &registry, &ctx, &config);
        rejected += usize::from(was_rejected);
        if !problems.is_empty() {
            failures.push((v, problems));
        }
    }
    std::panic::set_hook(hook);
    assert!(failures.is_empty(), "{}", report(&failures));
    // The mutations must mostly produce invalid flows, or they test nothing.
    assert!(rejected > 2000, "only {rejected} variants were rejected");
}

/// The checks themselves: a message that breaks the rules must be reported.
#[test]
fn the_error_checks_can_fail() {
    let file = Path::new("/x/flow.json");
    let err = |pos: Option<(u32, u32)>, kind: FlowErrorKind| FlowError {
        file: file.to_path_buf(),
        pos: pos.map(|(line, column)| flowbus_runtime::flow::Pos { line, column }),
        node: None,
        terminal: None,
        kind,
    };
    let text = "{\n  \"a\": 1\n}";
    let good = err(Some((2, 3)), FlowErrorKind::MissingProperty("x".into()));
    assert!(error_problems(&good, file, text).is_empty());
    let bad = [
        err(Some((4, 1)), FlowErrorKind::MissingProperty("x".into())),
        err(Some((2, 20)), FlowErrorKind::MissingProperty("x".into())),
        err(Some((0, 1)), FlowErrorKind::MissingProperty("x".into())),
        err(Some((2, 0)), FlowErrorKind::MissingProperty("x".into())),
        err(None, FlowErrorKind::Structure(String::new())),
        FlowError {
            file: PathBuf::from("other.json"),
            ..good.clone()
        },
    ];
    // Control characters from the file are shown escaped, never raw.
    let shown = err(None, FlowErrorKind::MissingProperty("a\nb\u{1b}[2J".into())).to_string();
    assert!(shown.ends_with("'a\\nb\\u{1b}[2J'"), "{shown}");
    assert!(!shown.chars().any(char::is_control), "{shown:?}");
    for e in &bad {
        assert!(
            !error_problems(e, file, text).is_empty(),
            "{e:?} passed the checks"
        );
    }
}

#[test]
fn mutated_flows_through_the_binary_exit_0_or_1_without_panicking() {
    let dir = failures_dir().join("binary");
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    let seeds = seed_files();
    let mut rng = Rng::new(0xB1A2_u64);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for _ in 0..9 {
        let seed = &seeds[rng.below(seeds.len())];
        let text = std::fs::read_to_string(seed).expect("seed flows are UTF-8");
        let (how, t) = mutate(&mut rng, &text);
        files.push((format!("{} — {how}", seed.display()), t.into_bytes()));
    }
    files.push(("10,000 [".into(), "[".repeat(10_000).into_bytes()));
    files.push((
        "not UTF-8".into(),
        b"{\"nodes\": [{\"id\": \"\xff\xfe\"}]}".to_vec(),
    ));
    files.push(("empty".into(), Vec::new()));
    files.push((
        "valid".into(),
        std::fs::read(root().join("flows/telemetry.json")).expect("the demo flow"),
    ));
    std::fs::copy(
        root().join("flows/telemetry.rhai"),
        dir.join("telemetry.rhai"),
    )
    .expect("copy the demo script");
    // The demo flows name the server defined in the project's flowbus.toml.
    std::fs::copy(root().join("flowbus.toml"), dir.join("flowbus.toml"))
        .expect("copy the demo configuration");
    let mut exit_codes = Vec::new();
    for (i, (how, bytes)) in files.iter().enumerate() {
        let name = if how == "valid" {
            String::from("telemetry.json")
        } else {
            format!("variant-{i}.json")
        };
        std::fs::write(dir.join(&name), bytes).expect("write the variant");
        let out = Command::new(env!("CARGO_BIN_EXE_flowbus"))
            .args(["validate", &name])
            .current_dir(&dir)
            .output()
            .expect("the flowbus binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let code = out.status.code();
        assert!(
            matches!(code, Some(0 | 1)),
            "{how}: exit status {:?} (a signal?)\nstderr: {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{how}: {stderr}");
        if code == Some(1) {
            assert!(
                stderr.starts_with(&name) && stderr.ends_with("1 of 1 flow file(s) invalid\n"),
                "{how}: stderr names the file and ends with the summary:\n{stderr}"
            );
        } else {
            assert!(
                stdout.starts_with(&format!("ok: {name} (flow '")) && stderr.is_empty(),
                "{how}: a valid flow says ok on stdout and nothing on stderr:\n{stdout}{stderr}"
            );
        }
        exit_codes.push(code);
    }
    assert!(exit_codes.len() >= 12);
    assert_eq!(
        exit_codes.last(),
        Some(&Some(0)),
        "the unchanged demo flow is valid"
    );
    assert!(exit_codes.iter().filter(|c| **c == Some(1)).count() >= 4);
}
