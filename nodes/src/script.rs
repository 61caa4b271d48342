//! The Rhai support shared by Compute and Filter: a sandboxed engine per node (its limits; the
//! standard packages and flowbus's functions built once and shared by all), scripts compiled
//! once at deploy, the trees exposed under IIB's names, and script failures turned into
//! exceptions that carry the script's line and column.
//!
//! The sandbox: between every two operations a run is checked against its memory budget
//! (`flowbus_runtime::memory`), its deadline and its flow's cancellation (`Guard`); what it
//! leaves nested deeper than `max_depth` is an error and is taken apart without recursion
//! (`truncate_deeper`).
//!
//! Inside a script, `Root`, `LocalEnvironment`, `Environment` and `ExceptionList` are maps.
//! `propagate("Out1")` records a copy of the current `Root` and `LocalEnvironment` for that
//! terminal; the engine hands the copies on, in call order, when the script has finished (a
//! script is synchronous; propagation is not).

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::script_paths;
use flowbus_runtime::engine::CancellationToken;
use flowbus_runtime::flow::FlowErrorKind;
use flowbus_runtime::memory::Mark;
use flowbus_runtime::message::{numbers, Body, Exception, ExceptionKind, Message, Root};
use flowbus_runtime::node::{BuildCtx, NodeDecl, Problem, PropKind, PropSpec};
use flowbus_runtime::time::human;
use flowbus_runtime::tree::{map_to_dynamic, to_dynamic};
use rhai::{Dynamic, Engine, EvalAltResult, Map as RMap, Position, Scope, AST};
use serde_json::{Map, Value};

/// Largest `max_operations`.
pub const MAX_OPERATIONS_CEILING: i64 = 1_000_000_000;
/// Largest `max_depth`.
pub const MAX_DEPTH_CEILING: i64 = 1024;
/// Largest `max_memory`, in bytes.
pub const MAX_MEMORY_CEILING: u64 = 256 << 20;
/// Shortest and longest `timeout`.
pub const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(60));

/// The limit properties shared by Compute and Filter.
pub const LIMIT_PROPS: [PropSpec; 7] = [
    PropSpec::opt(
        "max_operations",
        PropKind::Int {
            min: 1,
            max: MAX_OPERATIONS_CEILING,
        },
    ),
    PropSpec::opt(
        "max_string_size",
        PropKind::Int {
            min: 1,
            max: 1 << 30,
        },
    ),
    PropSpec::opt(
        "max_array_size",
        PropKind::Int {
            min: 1,
            max: 1 << 28,
        },
    ),
    PropSpec::opt(
        "max_map_size",
        PropKind::Int {
            min: 1,
            max: 1 << 28,
        },
    ),
    PropSpec::opt(
        "timeout",
        PropKind::DurationIn {
            min: TIMEOUT_RANGE.0,
            max: TIMEOUT_RANGE.1,
        },
    ),
    PropSpec::opt(
        "max_depth",
        PropKind::Int {
            min: 1,
            max: MAX_DEPTH_CEILING,
        },
    ),
    PropSpec::opt(
        "max_memory",
        PropKind::Size {
            max: MAX_MEMORY_CEILING,
        },
    ),
];

/// Sandbox limits of one node's scripts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Rhai operations per run (an endless loop hits this).
    pub max_operations: u64,
    /// Longest string, in bytes.
    pub max_string_size: usize,
    /// Largest array.
    pub max_array_size: usize,
    /// Largest map.
    pub max_map_size: usize,
    /// Wall-clock time per run.
    pub timeout: Duration,
    /// Deepest nesting of arrays and maps in a value a run leaves (in a tree, a variable, or
    /// its result).
    pub max_depth: usize,
    /// Bytes a run may hold beyond what it was given.
    pub max_memory: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 1_000_000,
            max_string_size: 16 * 1024 * 1024,
            max_array_size: 1_000_000,
            max_map_size: 100_000,
            timeout: Duration::from_secs(10),
            max_depth: 128,
            max_memory: 64 << 20,
        }
    }
}

impl Limits {
    /// The limits a node declares (defaults for what it leaves out).
    pub fn from_decl(decl: &NodeDecl) -> Limits {
        let d = Limits::default();
        let size = |name: &str, def: usize| decl.int(name).map_or(def, |n| n as usize);
        Limits {
            max_operations: decl
                .int("max_operations")
                .map_or(d.max_operations, |n| n as u64),
            max_string_size: size("max_string_size", d.max_string_size),
            max_array_size: size("max_array_size", d.max_array_size),
            max_map_size: size("max_map_size", d.max_map_size),
            timeout: decl.duration("timeout").unwrap_or(d.timeout),
            max_depth: size("max_depth", d.max_depth),
            max_memory: decl.size("max_memory").map_or(d.max_memory, |n| n as usize),
        }
    }
}

/// Per-run state reachable from native functions (`propagate`): scripts run synchronously on
/// one thread, so a thread-local is exact.
struct RunState {
    root: Dynamic,
    local_env: Dynamic,
    propagated: Vec<(String, Dynamic, Dynamic)>,
    terminals: &'static [&'static str],
}

/// What the progress callback checks, between every two operations of the running script.
struct Guard {
    /// When the run started and its deadline.
    started: Instant,
    deadline: Instant,
    /// On the coarse clock: from here on, the precise one is read (see [`coarse_now`]).
    check_precisely_from: Duration,
    timeout: Duration,
    memory: Mark,
    max_memory: usize,
    max_depth: usize,
    /// The flow's: fires when the flow stops or fails.
    stop: Option<CancellationToken>,
    /// When this run first saw `stop` fired: it may go on for [`STOP_GRACE`] after that.
    stop_seen: std::cell::Cell<Option<Instant>>,
}

/// How long a script run goes on once its flow is stopping. A stop lets a flow finish what it
/// received (within `[daemon] shutdown_timeout`), so a script is not cut short at once; but a
/// runaway one ends within this, whatever its own timeout, and its thread with it.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// How many operations a script runs between two looks at its flow's stop (microseconds; a
/// power of two).
const STOP_CHECK_OPS: u64 = 256;

impl Guard {
    fn new(limits: &Limits, stop: Option<&CancellationToken>) -> Guard {
        let started = Instant::now();
        Guard {
            started,
            deadline: started + limits.timeout,
            check_precisely_from: coarse_now()
                + limits.timeout.saturating_sub(2 * coarse_resolution()),
            timeout: limits.timeout,
            memory: Mark::now(),
            max_memory: limits.max_memory,
            max_depth: limits.max_depth,
            stop: stop.cloned(),
            stop_seen: std::cell::Cell::new(None),
        }
    }

    /// Why the script must end now, if it must, after `ops` operations. Runs between every two
    /// operations: a thread-local read and one read of the coarse clock (no system call); the
    /// stop is looked at every [`STOP_CHECK_OPS`] operations, since a token's state is behind
    /// a mutex.
    #[inline]
    fn breach(&self, ops: u64) -> Option<Dynamic> {
        if ops & (STOP_CHECK_OPS - 1) == 0
            && self
                .stop
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled)
        {
            let now = Instant::now();
            let seen = *self.stop_seen.get().get_or_insert(now);
            self.stop_seen.set(Some(seen));
            if now.duration_since(seen) >= STOP_GRACE {
                return Some(Dynamic::from(format!(
                    "the flow is stopping: the script was interrupted {} after the stop",
                    human(STOP_GRACE)
                )));
            }
        }
        let used = self.memory.grown();
        if used > self.max_memory {
            return Some(Dynamic::from(format!(
                "the script used more than its memory budget ({}): raise the node's \"max_memory\" (at most {}) or process less at once",
                mib(self.max_memory),
                mib(MAX_MEMORY_CEILING as usize)
            )));
        }
        if coarse_now() >= self.check_precisely_from && Instant::now() >= self.deadline {
            return Some(Dynamic::from(format!(
                "the script ran longer than its timeout ({}, stopped after {}): raise the node's \"timeout\" (at most {}) or process less at once",
                human(self.timeout),
                human(self.started.elapsed()),
                human(TIMEOUT_RANGE.1)
            )));
        }
        None
    }
}

/// A byte count for messages: `64 MiB`, or bytes when not whole mebibytes.
fn mib(n: usize) -> String {
    if (n >> 20) << 20 == n {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// A monotonic clock that is cheap enough to read between every two script operations:
/// `CLOCK_MONOTONIC_COARSE` (a few nanoseconds from the vDSO, no system call), which lags by
/// up to [`coarse_resolution`]; the precise clock is read only near a deadline.
#[cfg(target_os = "linux")]
fn coarse_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(target_os = "linux")]
fn coarse_resolution() -> Duration {
    static RES: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *RES.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write to.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } == 0;
        if ok {
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        } else {
            // Unknown: read the precise clock from the start.
            Duration::from_secs(3600)
        }
    })
}

/// Elsewhere the precise clock is read every time.
#[cfg(not(target_os = "linux"))]
fn coarse_now() -> Duration {
    Duration::MAX
}

#[cfg(not(target_os = "linux"))]
fn coarse_resolution() -> Duration {
    Duration::ZERO
}

thread_local! {
    static RUN: RefCell<Option<RunState>> = const { RefCell::new(None) };
    /// The running script's limits (for the progress callback and our functions).
    static GUARD: RefCell<Option<Guard>> = const { RefCell::new(None) };
}

/// The standard packages and flowbus's own functions, built once: every node's engine shares
/// them instead of building its own (a quarter of a megabyte each).
fn shared_modules() -> &'static [rhai::Shared<rhai::Module>; 2] {
    static SHARED: OnceLock<[rhai::Shared<rhai::Module>; 2]> = OnceLock::new();
    SHARED.get_or_init(|| {
        use rhai::packages::Package;
        [
            rhai::packages::StandardPackage::new().as_shared_module(),
            flowbus_functions().into(),
        ]
    })
}

/// Creates the sandboxed engine for a node.
pub fn engine(limits: &Limits) -> Engine {
    let mut e = Engine::new_raw();
    for m in shared_modules() {
        e.register_global_module(m.clone());
    }
    e.set_max_operations(limits.max_operations);
    e.set_max_string_size(limits.max_string_size);
    e.set_max_array_size(limits.max_array_size);
    e.set_max_map_size(limits.max_map_size);
    e.set_max_call_levels(64);
    e.set_max_expr_depths(128, 64);
    // `eval` would compile code at run time, outside the deploy-time checks.
    e.disable_symbol("eval");
    e.on_print(|s| tracing::info!(target: "flowbus::script", "{s}"));
    e.on_debug(|s, src, pos| tracing::debug!(target: "flowbus::script", "{} {pos:?}: {s}", src.unwrap_or("")));
    e.on_progress(|ops| GUARD.with(|g| g.borrow().as_ref().and_then(|g| g.breach(ops))));
    e
}

/// The functions flowbus adds to Rhai's standard ones.
fn flowbus_functions() -> rhai::Module {
    use rhai::FuncRegistration as F;
    let mut m = rhai::Module::new();
    F::new("propagate").set_into_module(
        &mut m,
        |terminal: &str| -> Result<(), Box<EvalAltResult>> {
            RUN.with(|r| {
                let mut r = r.borrow_mut();
                let st = r.as_mut().ok_or_else(|| {
                    fn_error("propagate() is only available while a Compute script runs".into())
                })?;
                if !st.terminals.contains(&terminal) {
                    return Err(fn_error(format!(
                        "propagate(\"{terminal}\"): no such terminal (use one of {})",
                        st.terminals.join(", ")
                    )));
                }
                let root = st.root.flatten_clone();
                let le = st.local_env.flatten_clone();
                st.propagated.push((terminal.to_string(), root, le));
                Ok(())
            })
        },
    );
    F::new(script_paths::PARENTS_FN).set_into_module(&mut m, script_paths::make_parents);
    F::new("now").set_into_module(&mut m, flowbus_runtime::time::now_rfc3339);
    F::new("now_micros").set_into_module(&mut m, || -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64)
    });
    F::new("json_encode").set_into_module(
        &mut m,
        |v: Dynamic| -> Result<String, Box<EvalAltResult>> {
            // serde writes nested values recursively: refuse what is nested too deep first.
            let max_depth = GUARD.with(|g| {
                g.borrow()
                    .as_ref()
                    .map_or(Limits::default().max_depth, |g| g.max_depth)
            });
            if !depth_within(&v, max_depth) {
                return Err(fn_error(format!(
                    "json_encode: the value is nested more than {max_depth} levels deep (the node's \"max_depth\")"
                )));
            }
            serde_json::to_string(&v).map_err(|e| fn_error(format!("json_encode: {e}")))
        },
    );
    F::new("json_decode").set_into_module(
        &mut m,
        |s: &str| -> Result<Dynamic, Box<EvalAltResult>> {
            serde_json::from_str::<Dynamic>(s).map_err(|e| fn_error(format!("json_decode: {e}")))
        },
    );
    m.build_index();
    m
}

/// An error from one of our functions: shown as what it is, not as something the script threw,
/// at the position of the call (Rhai fills it in).
fn fn_error(message: String) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(FnError(message)),
        Position::NONE,
    ))
}

/// What [`fn_error`] carries, to tell it from a value the script threw.
#[derive(Debug, Clone)]
struct FnError(String);

/// Where a script came from (for messages).
#[derive(Debug, Clone)]
pub struct Source {
    /// `enrich.rhai` or `inline code`.
    pub name: String,
}

/// A compiled script with its engine.
pub struct Script {
    engine: Engine,
    ast: AST,
    source: Source,
    limits: Limits,
    uses: Uses,
    /// The script's text, to name the field a runtime error comes from (`script_hints`).
    code: Arc<str>,
    /// Where the compiled text differs from `code` (`script_paths`), to map positions back.
    rewritten: script_paths::Rewritten,
}

/// Which trees (and `propagate`) a script names at all. A tree it never names is not converted
/// to Rhai and back: the message keeps its own (shared, copy-on-write) tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Uses {
    root: bool,
    /// `Root.Properties`: a script that never names them gets a `Root` without them, and the
    /// message keeps its own.
    properties: bool,
    local_env: bool,
    environment: bool,
    exception_list: bool,
    propagate: bool,
}

impl Uses {
    fn of(text: &str) -> Uses {
        // Whole identifiers only (`Environment` inside `LocalEnvironment` does not count).
        // Conservative: a name in a comment or a string counts too.
        let words: std::collections::HashSet<&str> = text
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .collect();
        Uses {
            root: words.contains("Root"),
            properties: words.contains("Properties"),
            local_env: words.contains("LocalEnvironment"),
            environment: words.contains("Environment"),
            exception_list: words.contains("ExceptionList"),
            propagate: words.contains("propagate"),
        }
    }
}

/// The pure check of a node's `script` property (validation, no I/O): it must name a Rhai
/// script file, so a flow cannot have the daemon compile (and quote errors from) any file.
pub fn check_script(decl: &NodeDecl) -> Vec<Problem> {
    match decl.str("script") {
        Some(path) if !path.ends_with(".rhai") => vec![Problem::at(
            "script",
            FlowErrorKind::BadValue {
                property: "script".into(),
                message: "must name a Rhai script file ending in .rhai".into(),
            },
        )],
        _ => Vec::new(),
    }
}

/// Reads (`script`) or takes (`code`/`expression`) a node's script and compiles it. A script
/// file must lie inside the flow's directory or an allowed path ([`BuildCtx::resolve`]); a
/// script shipped with the flow is taken from `ctx` rather than the disk. Problems name the
/// property and, for compile errors, the script line and column.
pub fn load(decl: &NodeDecl, ctx: &BuildCtx, code_props: &[&str]) -> Result<Script, Vec<Problem>> {
    let limits = Limits::from_decl(decl);
    let (text, source, prop) = if let Some(path) = decl.str("script") {
        let full = ctx.resolve("script", path)?;
        let text = match ctx.shipped(path) {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(&full).map_err(|e| {
                vec![Problem::at(
                    "script",
                    FlowErrorKind::MissingFile {
                        what: "script",
                        // As written, joined to the flow's directory: the resolved path
                        // could show where a symbolic link inside the directory points.
                        path: ctx.flow_dir().join(path).display().to_string(),
                        message: e.to_string(),
                    },
                )]
            })?,
        };
        (
            text,
            Source {
                name: path.to_string(),
            },
            "script",
        )
    } else if let Some((p, code)) = code_props.iter().find_map(|p| decl.str(p).map(|c| (*p, c))) {
        (
            code.to_string(),
            Source {
                name: format!("inline {p}"),
            },
            p,
        )
    } else {
        return Err(vec![Problem::node(FlowErrorKind::MissingOneOf(format!(
            "\"script\" or {}",
            code_props
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join(" or ")
        )))]);
    };
    compile(text, source, prop, limits)
}

/// Compiles inline code (a `code` or `expression` property) outside a flow (benchmarks).
pub fn compile_inline(decl: &NodeDecl, code_prop: &str) -> Result<Script, Vec<Problem>> {
    let code = decl.str(code_prop).ok_or_else(|| {
        vec![Problem::node(FlowErrorKind::MissingProperty(
            code_prop.to_string(),
        ))]
    })?;
    let source = Source {
        name: format!("inline {code_prop}"),
    };
    compile(code.to_string(), source, code_prop, Limits::from_decl(decl))
}

fn compile(
    text: String,
    source: Source,
    prop: &str,
    limits: Limits,
) -> Result<Script, Vec<Problem>> {
    let engine = engine(&limits);
    match engine.compile(&text) {
        Ok(ast) => {
            // Errors are the text's as written; the rewrite only adds what creates parents
            // (and is not used if it would not compile, which would be a bug of ours).
            let rewritten = script_paths::rewrite(&text);
            let (ast, rewritten) = match rewritten.changed() {
                true => match engine.compile(&rewritten.text) {
                    Ok(ast) => (ast, rewritten),
                    Err(_) => (ast, script_paths::Rewritten::default()),
                },
                false => (ast, rewritten),
            };
            Ok(Script {
                engine,
                ast,
                source,
                limits,
                uses: Uses::of(&text),
                code: text.into(),
                rewritten,
            })
        }
        Err(e) => {
            let (line, column) = line_col(e.position());
            // Inline code is in the flow itself: Rhai's whole message may quote it. A file
            // may be anything the flow named, so its message quotes nothing of it.
            let message = if prop == "script" {
                file_safe_message(e.err_type())
            } else {
                e.err_type().to_string()
            };
            Err(vec![Problem::at(
                prop,
                FlowErrorKind::Script {
                    script: source.name,
                    line,
                    column,
                    message,
                },
            )])
        }
    }
}

/// Rhai's reserved words: the only words of a script file a compile error may repeat.
const RHAI_KEYWORDS: &[&str] = &[
    "Fn",
    "as",
    "async",
    "await",
    "break",
    "call",
    "case",
    "catch",
    "const",
    "continue",
    "curry",
    "debug",
    "default",
    "do",
    "else",
    "eval",
    "exit",
    "export",
    "false",
    "fn",
    "for",
    "global",
    "go",
    "goto",
    "if",
    "import",
    "in",
    "is",
    "is_def_fn",
    "is_def_var",
    "is_shared",
    "let",
    "loop",
    "match",
    "module",
    "new",
    "nil",
    "null",
    "package",
    "print",
    "private",
    "protected",
    "public",
    "return",
    "shared",
    "spawn",
    "static",
    "super",
    "switch",
    "sync",
    "this",
    "thread",
    "throw",
    "true",
    "try",
    "type_of",
    "until",
    "use",
    "var",
    "void",
    "while",
    "with",
    "yield",
];

/// Whether text taken from a script file may appear in an error: a Rhai keyword or a single
/// punctuation character, which say nothing about a file that is not a script.
fn quotable(s: &str) -> bool {
    RHAI_KEYWORDS.contains(&s) || (s.len() == 1 && s.bytes().all(|b| b.is_ascii_punctuation()))
}

/// Whether a quoted piece of Rhai's own prose (a token it expected, a keyword) may stay: a
/// keyword, or a short operator such as `==`. Identifiers from the file never pass.
fn quotable_in_prose(s: &str) -> bool {
    RHAI_KEYWORDS.contains(&s)
        || (!s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_punctuation()))
}

/// Rhai's prose with every quoted piece that is not a keyword or an operator left out
/// (`... of this function call 'lookup_password'` loses the name).
fn scrub(prose: &str) -> String {
    let mut out = String::new();
    let mut rest = prose;
    while let Some(open) = rest.find('\'') {
        let Some(len) = rest[open + 1..].find('\'') else {
            break;
        };
        let inner = &rest[open + 1..open + 1 + len];
        if quotable_in_prose(inner) {
            out.push_str(&rest[..open + len + 2]);
        } else {
            out.push_str(rest[..open].trim_end());
        }
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// `text` when the prose is empty after scrubbing, else the scrubbed prose.
fn scrub_or(prose: &str, text: &str) -> String {
    let s = scrub(prose);
    if s.is_empty() {
        text.to_string()
    } else {
        s
    }
}

/// A compile error of a script file, built from the error's type so that nothing taken from
/// the file (identifiers, numbers, strings, operators) is repeated but Rhai's keywords and
/// single punctuation symbols: a file named as a script may be any file, and its content must
/// not come back in a message. The line and column say where to look.
fn file_safe_message(e: &rhai::ParseErrorType) -> String {
    use rhai::ParseErrorType as P;
    match e {
        P::BadInput(lex) => lex_safe_message(lex),
        P::UnknownOperator(s) if quotable(s) => e.to_string(),
        P::UnknownOperator(_) => "Unknown operator".into(),
        P::MissingToken(token, prose) => {
            let token = if quotable_in_prose(token) {
                format!(" '{token}'")
            } else {
                String::new()
            };
            format!("Expecting{token} {}", scrub(prose))
                .trim_end()
                .to_string()
        }
        P::MissingSymbol(s) => scrub_or(s, "Expecting a symbol"),
        P::MalformedIndexExpr(s) => scrub_or(s, "Invalid index in indexing expression"),
        P::MalformedCapture(s) => scrub_or(s, "Invalid capturing"),
        P::AssignmentToInvalidLHS(s) => scrub_or(s, "Expression cannot be assigned to"),
        P::DuplicatedProperty(_) => "Duplicated property in an object map literal".into(),
        P::DuplicatedVariable(_) => "Duplicated variable name".into(),
        P::VariableExists(_) => "Variable already defined".into(),
        P::VariableUndefined(_) => "Undefined variable".into(),
        P::ModuleUndefined(_) => "Undefined module".into(),
        P::ForbiddenVariable(_) => "Forbidden variable name".into(),
        P::FnDuplicatedDefinition(_, n) => format!(
            "A function of that name with {n} parameter{} already exists",
            if *n == 1 { "" } else { "s" }
        ),
        P::FnMissingParams(_) => "Expecting parameters for the function".into(),
        P::FnDuplicatedParam(..) => "Duplicated parameter of the function".into(),
        P::FnMissingBody(_) => "Expecting body statement block for the function".into(),
        P::AssignmentToConstant(_) => "Cannot assign to a constant".into(),
        P::Reserved(s) if quotable(s) => e.to_string(),
        P::Reserved(_) => "A reserved keyword or symbol is used".into(),
        // Rhai's own words: type names, descriptions, limits.
        P::UnexpectedEOF
        | P::MismatchedType(..)
        | P::ExprExpected(_)
        | P::WrongSwitchIntegerCase
        | P::WrongSwitchDefaultCase
        | P::WrongSwitchCaseCondition
        | P::PropertyExpected
        | P::VariableExpected
        | P::WrongDocComment
        | P::WrongFnDefinition
        | P::FnMissingName
        | P::WrongExport
        | P::ExprTooDeep
        | P::TooManyFunctions
        | P::LiteralTooLarge(..)
        | P::LoopBreak => e.to_string(),
        _ => "Syntax error".into(),
    }
}

/// [`file_safe_message`] for errors of the tokenizer.
fn lex_safe_message(e: &rhai::LexError) -> String {
    use rhai::LexError as L;
    match e {
        L::UnexpectedInput(s) if quotable(s) => e.to_string(),
        L::UnexpectedInput(_) => "Unexpected input".into(),
        L::UnterminatedString | L::StringTooLong(_) => e.to_string(),
        L::MalformedEscapeSequence(_) => "Invalid escape sequence".into(),
        L::MalformedNumber(_) => "Invalid number".into(),
        L::MalformedChar(_) => "Invalid character literal".into(),
        L::MalformedIdentifier(_) => "Variable name is not proper".into(),
        L::ImproperSymbol(s, prose) if prose.is_empty() => {
            if quotable(s) {
                e.to_string()
            } else {
                "Invalid symbol encountered".into()
            }
        }
        L::ImproperSymbol(_, prose) => scrub_or(prose, "Invalid symbol encountered"),
        _ => "Invalid input".into(),
    }
}

fn line_col(p: Position) -> (u32, u32) {
    (
        p.line().unwrap_or(0) as u32,
        p.position().unwrap_or(0) as u32,
    )
}

/// What a script run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The script's value.
    pub value: Dynamic,
    /// The message with the script's changes to `Root` and `LocalEnvironment`.
    pub message: Message,
    /// `propagate(...)` calls, in order: terminal and message.
    pub propagated: Vec<(String, Message)>,
}

impl Script {
    /// Runs the script against a message. Changes to `Environment` are written back to the
    /// shared tree; changes to `ExceptionList` are ignored.
    pub fn run(
        &self,
        msg: &Message,
        terminals: &'static [&'static str],
    ) -> Result<Outcome, Exception> {
        self.run_until(msg, terminals, None)
    }

    /// [`Script::run`], interrupted when `stop` fires (the flow stops or fails).
    pub fn run_until(
        &self,
        msg: &Message,
        terminals: &'static [&'static str],
        stop: Option<&CancellationToken>,
    ) -> Result<Outcome, Exception> {
        let u = self.uses;
        // `propagate` reads the current Root and LocalEnvironment from a native function, so
        // those two must be shared values then; otherwise plain values are cheaper.
        let share = |d: Dynamic| if u.propagate { d.into_shared() } else { d };
        let mut scope = Scope::new();
        if u.root || u.propagate {
            scope.push_dynamic("Root", share(root_to_dynamic(&msg.root, u.properties)));
        }
        if u.local_env || u.propagate {
            // Already in Rhai's form: a copy of the maps, the strings shared.
            scope.push_dynamic("LocalEnvironment", share((*msg.local_env).clone()));
        }
        if u.environment {
            scope.push_dynamic("Environment", to_dynamic(&msg.environment.snapshot()));
        }
        if u.exception_list {
            let el = msg.exception_list.as_ref().map_or_else(
                || Dynamic::from_map(RMap::new()),
                |e| to_dynamic(&e.to_tree()),
            );
            scope.push_constant_dynamic("ExceptionList", el);
        }
        let prev = u.propagate.then(|| {
            let handle = |name: &str| scope.get(name).cloned().unwrap_or(Dynamic::UNIT);
            let state = RunState {
                root: handle("Root"),
                local_env: handle("LocalEnvironment"),
                propagated: Vec::new(),
                terminals,
            };
            RUN.with(|r| r.borrow_mut().replace(state))
        });
        // The memory budget counts from here: what the script is given is not its doing.
        let result = GUARD.with(|g| {
            let outer = g.replace(Some(Guard::new(&self.limits, stop)));
            let r = self
                .engine
                .eval_ast_with_scope::<Dynamic>(&mut scope, &self.ast);
            g.replace(outer);
            r
        });
        // Named while the trees are as the script left them (the scope is taken apart below).
        let hint = result
            .as_ref()
            .err()
            .and_then(|e| crate::script_hints::explain(e, self.position_of(e), &self.code, &scope));
        let state = match prev {
            Some(prev) => RUN.with(|r| std::mem::replace(&mut *r.borrow_mut(), prev)),
            None => None,
        };
        let propagated_raw = state.map(|s| s.propagated).unwrap_or_default();
        // Nothing the script leaves may be nested deeper than `max_depth`. What is, is taken
        // apart without recursion ([`truncate_deeper`]): dropping it would recurse once per
        // level. The trees are checked as they are taken back (one walk, see `fit`); every
        // other value here, and the trees on a way out that skips that, are checked in `Kept`.
        let max_depth = self.limits.max_depth;
        // The trees come out of the scope by name; what is left is checked in place and only
        // taken apart when something in it is too deep (collecting the scope into a list made
        // a `String` of every name, about 2,000 instructions a message).
        let mut take = |name: &str| scope.remove::<Dynamic>(name).map(Dynamic::flatten);
        let root = if u.root || u.propagate {
            take("Root")
        } else {
            None
        };
        let le = if u.local_env || u.propagate {
            take("LocalEnvironment")
        } else {
            None
        };
        let env = if u.environment {
            take("Environment")
        } else {
            None
        };
        let mut too_deep = None;
        if !scope.iter_raw().all(|(_, _, v)| depth_within(v, max_depth)) {
            for (name, mut v, _) in scope {
                if !truncate_deeper(&mut v, max_depth) && too_deep.is_none() {
                    too_deep = Some(format!("the variable {name}"));
                }
            }
        } else {
            drop(scope);
        }
        let value = match result {
            Ok(mut v) => {
                if !truncate_deeper(&mut v, max_depth) {
                    too_deep.get_or_insert_with(|| "its result".into());
                }
                Ok(v)
            }
            Err(mut e) => {
                if let EvalAltResult::ErrorRuntime(v, _) = &mut *e {
                    truncate_deeper(v, max_depth);
                }
                Err(e)
            }
        };
        // Root and LocalEnvironment, then each propagated pair, by index in `kept`.
        let mut kept = Kept::new(max_depth);
        kept.values.push(root.unwrap_or(Dynamic::UNIT));
        kept.values.push(le.unwrap_or(Dynamic::UNIT));
        let mut terminals_used = Vec::with_capacity(propagated_raw.len());
        for (t, r, l) in propagated_raw {
            terminals_used.push(t);
            kept.values.push(r);
            kept.values.push(l);
        }
        // Environment is never rolled back: what the script wrote stays, even if it then
        // failed.
        let env_written = match env {
            Some(mut env) => {
                if truncate_deeper(&mut env, max_depth) {
                    from_dynamic(env, "Environment", None, max_depth)
                        .map(|v| *msg.environment.lock() = v)
                } else {
                    too_deep.get_or_insert_with(|| "Environment".into());
                    Ok(())
                }
            }
            None => Ok(()),
        };
        let value = value.map_err(|e| self.exception(&e, hint))?;
        env_written?;
        let domain = msg.root.body.domain();
        let build = |root: Option<Dynamic>, le: Option<Dynamic>| -> Result<Message, Exception> {
            let mut m = msg.clone();
            if let Some(r) = root {
                m.root = Arc::new(self.root_from_dynamic(r, domain, &msg.root)?);
            }
            if let Some(l) = le {
                m.local_env = Arc::new(self.fit_tree(l, "LocalEnvironment")?);
            }
            Ok(m)
        };
        let mut propagated = Vec::with_capacity(terminals_used.len());
        for (i, t) in terminals_used.into_iter().enumerate() {
            let r = kept.take(2 + 2 * i);
            let l = kept.take(3 + 2 * i);
            propagated.push((t, build(Some(r), Some(l))?));
        }
        // The scope's trees are taken, not copied: nothing else holds them any more.
        let root = (u.root || u.propagate).then(|| kept.take(0));
        let le = (u.local_env || u.propagate).then(|| kept.take(1));
        let message = build(root, le)?;
        // Told after the trees' own errors: a tree that holds a copy of a variable too deep
        // is the more useful place to name.
        if let Some(what) = too_deep {
            return Err(self.too_deep(&what));
        }
        Ok(Outcome {
            value,
            message,
            propagated,
        })
    }

    /// The error of a value nested deeper than `max_depth` (`what` names where it was).
    fn too_deep(&self, what: &str) -> Exception {
        Exception::new(
            ExceptionKind::Recoverable,
            numbers::SCRIPT_ERROR,
            format!(
                "Rhai error in {}: {}",
                self.source.name,
                too_deep_text(what, self.limits.max_depth)
            ),
        )
        .insert(self.source.name.clone())
    }

    /// Where in the script as written an error happened: (line, column), 0 if unknown.
    fn position_of(&self, e: &EvalAltResult) -> (usize, usize) {
        match line_col(e.position()) {
            (0, _) => (0, 0),
            (line, column) => self.rewritten.original(line as usize, column as usize),
        }
    }

    /// The exception of a script error; `hint` says what a missing field had to do with it
    /// (`script_hints`, worked out while the script's scope was still there).
    fn exception(&self, e: &EvalAltResult, hint: Option<String>) -> Exception {
        let (line, column) = self.position_of(e);
        let what = hint.unwrap_or_else(|| match e {
            EvalAltResult::ErrorTooManyOperations(_) => format!(
                "the script exceeded max_operations ({}): an endless loop? If the work is legitimate, raise the node's \"max_operations\" (at most {MAX_OPERATIONS_CEILING})",
                self.limits.max_operations
            ),
            EvalAltResult::ErrorDataTooLarge(kind, _) => format!(
                "{kind} exceeded the node's limit (max_string_size {}, max_array_size {}, max_map_size {})",
                self.limits.max_string_size, self.limits.max_array_size, self.limits.max_map_size
            ),
            EvalAltResult::ErrorTerminated(reason, _) => reason.to_string(),
            EvalAltResult::ErrorRuntime(v, _) => match v.read_lock::<FnError>() {
                Some(f) => f.0.clone(),
                None => format!("script threw: {v}"),
            },
            EvalAltResult::ErrorSystem(m, _) => m.clone(),
            other => other.to_string(),
        });
        let mut what = what;
        // Rhai appends " (line L, position C)" to some messages; we print the position once.
        if let Some(cut) = what.find(" (line ") {
            what.truncate(cut);
        }
        Exception::new(
            ExceptionKind::Recoverable,
            numbers::SCRIPT_ERROR,
            format!(
                "Rhai error in {} at line {line}, column {column}: {what}",
                self.source.name
            ),
        )
        .insert(self.source.name.clone())
        .insert(line.to_string())
        .insert(column.to_string())
    }
}

/// Why a tree a script left could not be taken back.
#[derive(Debug)]
enum Unfit {
    /// A map or array over the node's limits. Rhai checks `max_map_size` only on values an
    /// operation returns, so a map grown key by key is caught here (its memory is bounded
    /// meanwhile by `max_memory`).
    TooLarge(String),
    /// Arrays and maps nested deeper than `max_depth`.
    TooDeep,
    /// A value with no JSON form.
    Unrepresentable(String),
}

/// Values a run left that are yet to be taken back: whatever is still here when it is dropped
/// (a way out on an error) is taken apart without recursion first.
struct Kept {
    values: Vec<Dynamic>,
    max_depth: usize,
}

impl Kept {
    fn new(max_depth: usize) -> Kept {
        Kept {
            values: Vec::with_capacity(2),
            max_depth,
        }
    }

    fn take(&mut self, i: usize) -> Dynamic {
        self.values
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        for v in &mut self.values {
            truncate_deeper(v, self.max_depth);
        }
    }
}

/// Whether `d` nests arrays and maps at most `max` levels deep (a scalar: 0 levels). Recurses
/// at most `max + 1` levels.
fn depth_within(d: &Dynamic, max: usize) -> bool {
    if let Some(m) = d.read_lock::<RMap>() {
        return max > 0 && m.values().all(|v| depth_within(v, max - 1));
    }
    if let Some(a) = d.read_lock::<rhai::Array>() {
        return max > 0 && a.iter().all(|v| depth_within(v, max - 1));
    }
    true
}

/// Replaces every array or map of `d` nested deeper than `max` levels with `()`, taking it
/// apart without recursion ([`dispose`]); returns whether there was none. Recurses at most
/// `max + 1` levels.
fn truncate_deeper(d: &mut Dynamic, max: usize) -> bool {
    if !(d.is_map() || d.is_array() || d.is_shared()) {
        return true;
    }
    if max == 0 {
        if d.is_map() || d.is_array() || is_shared_container(d) {
            dispose(std::mem::take(d));
            return false;
        }
        return true;
    }
    if let Some(mut m) = d.write_lock::<RMap>() {
        // Not `all`: every part too deep is taken apart, not just the first.
        let mut ok = true;
        for v in m.values_mut() {
            ok &= truncate_deeper(v, max - 1);
        }
        return ok;
    }
    if let Some(mut a) = d.write_lock::<rhai::Array>() {
        let mut ok = true;
        for v in a.iter_mut() {
            ok &= truncate_deeper(v, max - 1);
        }
        return ok;
    }
    true
}

fn is_shared_container(d: &Dynamic) -> bool {
    d.read_lock::<RMap>().is_some() || d.read_lock::<rhai::Array>().is_some()
}

/// Drops a value of any depth without recursion: the children of each array and map are
/// moved out before it is dropped.
fn dispose(d: Dynamic) {
    let mut stack = vec![d];
    while let Some(mut d) = stack.pop() {
        if let Some(mut m) = d.write_lock::<RMap>() {
            stack.extend(std::mem::take(&mut *m).into_values());
            continue;
        }
        if let Some(mut a) = d.write_lock::<rhai::Array>() {
            stack.append(&mut a);
        }
    }
}

/// Takes a tree back from a script; `checked` holds it to the node's size limits (the trees a
/// message carries on; not `Environment`, which grows across messages by design).
fn from_dynamic(
    d: Dynamic,
    tree: &str,
    checked: Option<(&Limits, &Source)>,
    max_depth: usize,
) -> Result<Value, Exception> {
    let mut d = d;
    match fit(&mut d, checked.map(|(l, _)| l), max_depth, tree) {
        Ok(()) => Ok(flowbus_runtime::tree::to_value(&d)),
        Err(e) => {
            truncate_deeper(&mut d, max_depth);
            Err(unfit_exception(e, tree, checked.map(|(_, s)| s), max_depth))
        }
    }
}

fn unfit_exception(e: Unfit, tree: &str, source: Option<&Source>, max_depth: usize) -> Exception {
    let name = source.map_or("", |s| s.name.as_str());
    match e {
        Unfit::TooLarge(m) => Exception::new(
            ExceptionKind::Recoverable,
            numbers::SCRIPT_ERROR,
            format!("Rhai error in {name}: {m}"),
        ),
        Unfit::TooDeep => Exception::new(
            ExceptionKind::Recoverable,
            numbers::SCRIPT_ERROR,
            format!("Rhai error in {name}: {}", too_deep_text(tree, max_depth)),
        ),
        Unfit::Unrepresentable(e) => Exception::new(
            ExceptionKind::Conversion,
            numbers::SCRIPT_ERROR,
            format!("the script left {tree} with a value that cannot be represented: {e}"),
        ),
    }
}

/// What a value nested too deep in `what` is told as.
fn too_deep_text(what: &str, max: usize) -> String {
    format!(
        "the script left {what} with a value nested more than {max} levels deep: raise the node's \"max_depth\" (at most {MAX_DEPTH_CEILING}) or nest less"
    )
}

/// Makes a tree the script left fit to be kept in Rhai's form, in place (one walk, no copy:
/// this runs for every message): maps and arrays are held to `limits` and to `depth` levels of
/// nesting, shared values are unshared, and a value without a JSON twin (a char; a blob inside
/// the tree) is converted as Rhai's serde support converts it to JSON, or refused. What is
/// left serialises exactly as its serde_json twin does. `limits`: `None` for `Environment`,
/// which grows across messages by design. Recurses at most `depth + 1` levels.
fn fit(d: &mut Dynamic, limits: Option<&Limits>, depth: usize, tree: &str) -> Result<(), Unfit> {
    if d.is_shared() {
        *d = std::mem::take(d).flatten();
    }
    if d.is_string() || d.is_int() || d.is_bool() || d.is_float() || d.is_unit() {
        return Ok(());
    }
    if let Some(mut m) = d.write_lock::<RMap>() {
        if depth == 0 {
            return Err(Unfit::TooDeep);
        }
        if let Some(l) = limits {
            map_fits(m.len(), l, tree)?;
        }
        return m
            .values_mut()
            .try_for_each(|v| fit(v, limits, depth - 1, tree));
    }
    if let Some(mut a) = d.write_lock::<rhai::Array>() {
        if depth == 0 {
            return Err(Unfit::TooDeep);
        }
        if let Some(l) = limits {
            array_fits(a.len(), l, tree)?;
        }
        return a
            .iter_mut()
            .try_for_each(|v| fit(v, limits, depth - 1, tree));
    }
    let v =
        rhai::serde::from_dynamic::<Value>(d).map_err(|e| Unfit::Unrepresentable(e.to_string()))?;
    *d = to_dynamic(&v);
    Ok(())
}

fn map_fits(len: usize, limits: &Limits, tree: &str) -> Result<(), Unfit> {
    if len <= limits.max_map_size {
        return Ok(());
    }
    Err(Unfit::TooLarge(format!(
        "a map in {tree} has {len} entries, over the node's max_map_size ({})",
        limits.max_map_size
    )))
}

fn array_fits(len: usize, limits: &Limits, tree: &str) -> Result<(), Unfit> {
    if len <= limits.max_array_size {
        return Ok(());
    }
    Err(Unfit::TooLarge(format!(
        "an array in {tree} has {len} items, over the node's max_array_size ({})",
        limits.max_array_size
    )))
}

fn root_to_dynamic(root: &Root, properties: bool) -> Dynamic {
    let body = match &root.body {
        Body::Json(v) => to_dynamic(v),
        Body::Rhai(d) => d.clone(),
        Body::Text(s) => Dynamic::from(s.clone()),
        Body::Blob(b) => Dynamic::from_blob(b.clone()),
    };
    let mut m = RMap::new();
    m.insert("Body".into(), body);
    if properties {
        m.insert("Properties".into(), map_to_dynamic(&root.properties));
    }
    Dynamic::from_map(m)
}

impl Script {
    /// A message tree back from the script, held to the node's size limits.
    fn tree_from_dynamic(&self, d: Dynamic, tree: &str) -> Result<Value, Exception> {
        from_dynamic(
            d,
            tree,
            Some((&self.limits, &self.source)),
            self.limits.max_depth,
        )
    }

    /// A message tree back from the script in Rhai's form, held to the node's size limits and
    /// left with JSON twins only (see [`fit`]).
    fn fit_tree(&self, mut d: Dynamic, tree: &str) -> Result<Dynamic, Exception> {
        let max_depth = self.limits.max_depth;
        match fit(&mut d, Some(&self.limits), max_depth, tree) {
            Ok(()) => Ok(d),
            Err(e) => {
                truncate_deeper(&mut d, max_depth);
                Err(unfit_exception(e, tree, Some(&self.source), max_depth))
            }
        }
    }

    /// `Root` back from the script; `arrived` is the message's own, whose properties stay when
    /// the script never names them.
    fn root_from_dynamic(
        &self,
        mut d: Dynamic,
        domain: flowbus_runtime::Domain,
        arrived: &Root,
    ) -> Result<Root, Exception> {
        let max_depth = self.limits.max_depth;
        if !d.is_map() {
            truncate_deeper(&mut d, max_depth);
            return Err(Exception::new(
                ExceptionKind::Conversion,
                numbers::SCRIPT_ERROR,
                "the script replaced Root with something that is not a map; set Root.Body instead",
            ));
        }
        let mut map = d.cast::<RMap>();
        let root = self.root_parts(&mut map, domain, arrived);
        // Whatever else the script put in Root goes (all of it, on an error).
        if !map.is_empty() {
            let mut rest = Dynamic::from_map(map);
            if !truncate_deeper(&mut rest, max_depth + 1) && root.is_ok() {
                return Err(self.too_deep("Root"));
            }
        }
        root
    }

    /// [`Script::root_from_dynamic`] once `Root` is known to be a map: takes its parts out.
    fn root_parts(
        &self,
        map: &mut RMap,
        domain: flowbus_runtime::Domain,
        arrived: &Root,
    ) -> Result<Root, Exception> {
        let bad =
            |what: String| Exception::new(ExceptionKind::Conversion, numbers::SCRIPT_ERROR, what);
        let properties = if !self.uses.properties {
            // Never handed to the script (see `Uses`).
            arrived.properties.clone()
        } else {
            match map.remove("Properties") {
                Some(p) => match self.tree_from_dynamic(p, "Root.Properties")? {
                    Value::Object(o) => Arc::new(o),
                    _ => return Err(bad("Root.Properties must stay a map".into())),
                },
                None => Arc::new(Map::new()),
            }
        };
        let body = match map.remove("Body") {
            None => Body::Json(Value::Null),
            Some(b) if b.is_blob() => Body::Blob(b.cast::<rhai::Blob>()),
            Some(b) if domain == flowbus_runtime::Domain::Text && b.is_string() => {
                Body::Text(b.cast::<String>())
            }
            // Kept in Rhai's form: not converted back (see `flowbus_runtime::tree`).
            Some(b) => Body::Rhai(self.fit_tree(b, "Root.Body")?),
        };
        Ok(Root { properties, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decl(props: Value) -> NodeDecl {
        NodeDecl {
            id: "c".into(),
            type_name: "Compute".into(),
            props: props.as_object().cloned().unwrap_or_default(),
            pointer: "/nodes/0".into(),
        }
    }

    const T: &[&str] = &["Out", "Out1"];

    /// A Compute script from inline `code` and limits, compiled (the test fails if it does not).
    fn compiled(props: Value) -> Script {
        compile_inline(&decl(props), "code").unwrap_or_else(|p| panic!("compiles: {p:?}"))
    }

    /// What building a flow whose file is in `dir` sees.
    fn ctx_in(dir: &std::path::Path) -> BuildCtx {
        BuildCtx {
            flow: "f".into(),
            file: dir.join("flow.json"),
            config: Arc::new(flowbus_runtime::config::Config::default()),
            services: Arc::new(flowbus_runtime::services::Services::default()),
            shipped: Arc::default(),
        }
    }

    #[test]
    fn reads_and_writes_the_trees() {
        let s = compiled(
            json!({"code": "Root.Body.f = Root.Body.c * 9 / 5 + 32; LocalEnvironment.Variables.x = 1; Environment.seen = true;"}),
        );
        let msg = Message::new(Body::Json(json!({"c": 100})));
        let out = s.run(&msg, T).unwrap();
        assert_eq!(
            out.message.root.body,
            Body::Json(json!({"c": 100, "f": 212}))
        );
        assert_eq!(out.message.local(&["Variables", "x"]), Some(json!(1)));
        assert_eq!(msg.environment.snapshot(), json!({"seen": true}));
        // The input message is untouched.
        assert_eq!(msg.root.body, Body::Json(json!({"c": 100})));
    }

    #[test]
    fn trees_convert_to_rhai_and_back_as_rhais_serde_support_does() {
        let v = json!({
            "i": -5, "big": 18_446_744_073_709_551_615u64, "f": 1.5, "s": "é\"", "n": null,
            "b": true, "a": [1, [2], {"k": "v"}], "o": {}
        });
        let direct = to_dynamic(&v);
        let via_serde = rhai::serde::to_dynamic(&v).unwrap();
        assert_eq!(format!("{direct:?}"), format!("{via_serde:?}"));
        let back = from_dynamic(direct.clone(), "test", None, 128).unwrap();
        assert_eq!(
            back,
            rhai::serde::from_dynamic::<Value>(&via_serde).unwrap()
        );
        let mut expect = v.clone();
        expect["big"] = json!(18_446_744_073_709_551_615u64 as f64);
        assert_eq!(back, expect);
    }

    #[test]
    fn script_values_without_a_json_twin_convert_as_before() {
        let s = compiled(
            json!({"code": "Root.Body.nan = 0.0 / 0.0; Root.Body.c = 'x'; Root.Body.copy = Root.Body.list; Root.Body.list.push(3);"}),
        );
        let out = s
            .run(&Message::new(Body::Json(json!({"list": [1]}))), T)
            .unwrap();
        assert_eq!(
            out.message.root.body,
            Body::Json(json!({"list": [1, 3], "copy": [1], "nan": null, "c": "x"}))
        );
    }

    #[test]
    fn trees_a_script_leaves_serialise_as_their_json_and_feed_the_next_script() {
        // Root.Body and LocalEnvironment stay in Rhai's form between scripts and are
        // serialised from it: the bytes must be those of the JSON value.
        let first = compiled(json!({"code": r#"
            Root.Body.c = 'x'; Root.Body.nan = 0.0 / 0.0; Root.Body.i = 9007199254740993;
            Root.Body.f = 1.0; Root.Body.s = "é\"\n"; Root.Body.nested = #{ a: [1, #{ b: () }] };
            LocalEnvironment.Variables.k = Root.Body.c;
        "#}));
        let out = first
            .run(&Message::new(Body::Json(json!({"keep": true}))), T)
            .unwrap()
            .message;
        let expect = json!({
            "keep": true, "c": "x", "nan": null, "i": 9007199254740993_i64, "f": 1.0,
            "s": "é\"\n", "nested": {"a": [1, {"b": null}]}
        });
        assert_eq!(out.root.body.to_value(), expect);
        assert_eq!(
            out.root.body.to_bytes(),
            serde_json::to_vec(&expect).unwrap()
        );
        assert_eq!(out.local(&["Variables", "k"]), Some(json!("x")));
        let second = compiled(json!({
            "code": "Root.Body.n = Root.Body.nested.a[0] + 1; LocalEnvironment.Variables.k += \"y\";"
        }));
        let out = second.run(&out, T).unwrap().message;
        assert_eq!(out.root.body.to_value()["n"], json!(2));
        assert_eq!(out.root.body.to_value()["keep"], json!(true));
        assert_eq!(out.local(&["Variables", "k"]), Some(json!("xy")));
        // A blob has a JSON form only as the whole body.
        let e = compiled(json!({"code": "Root.Body.b = #{ bytes: blob(2, 7) };"}))
            .run(&out, T)
            .unwrap_err();
        assert_eq!(e.kind, ExceptionKind::Conversion, "{}", e.text);
    }

    #[test]
    fn propagate_copies_the_current_state() {
        let s = compiled(
            json!({"code": "Root.Body.n = 1; propagate(\"Out1\"); Root.Body.n = 2; false"}),
        );
        let out = s.run(&Message::new(Body::Json(json!({}))), T).unwrap();
        assert_eq!(out.value.as_bool().ok(), Some(false));
        assert_eq!(out.propagated.len(), 1);
        assert_eq!(out.propagated[0].0, "Out1");
        assert_eq!(out.propagated[0].1.root.body, Body::Json(json!({"n": 1})));
        assert_eq!(out.message.root.body, Body::Json(json!({"n": 2})));
    }

    #[test]
    fn endless_loop_and_huge_allocation_become_exceptions() {
        let s = compiled(json!({"code": "loop { }", "max_operations": 10000}));
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text.contains("exceeded max_operations (10000)"),
            "{}",
            e.text
        );
        let s = compiled(json!({"code": "let s = \"xx\";\nloop { s += s; }"}));
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text
                .contains("Length of string exceeded the node's limit"),
            "{}",
            e.text
        );
        assert!(e.text.contains("line 2"), "{}", e.text);
    }

    #[test]
    fn compile_errors_carry_line_and_column() {
        let Err(p) = load(
            &decl(json!({"code": "let x = 1;\nlet = 2;"})),
            &ctx_in(std::path::Path::new(".")),
            &["code"],
        ) else {
            panic!("must not compile")
        };
        match &p[0].kind {
            FlowErrorKind::Script { line, column, .. } => assert_eq!((*line, *column), (2, 5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn runtime_errors_name_script_line_and_column() {
        let s = compiled(json!({"code": "let a = 1;\nlet b = a + \"x\" * 2;"}));
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text
                .starts_with("Rhai error in inline code at line 2, column"),
            "{}",
            e.text
        );
    }

    #[test]
    fn environment_writes_survive_a_failing_script() {
        let s = compiled(json!({"code": "Environment.seen = true;\nthrow \"fail\";"}));
        let msg = Message::new(Body::Json(json!({})));
        let e = s.run(&msg, T).unwrap_err();
        assert!(e.text.contains("script threw: fail"), "{}", e.text);
        assert_eq!(msg.environment.snapshot(), json!({"seen": true}));
    }

    #[test]
    fn maps_grown_key_by_key_are_held_to_max_map_size() {
        let s = compiled(
            json!({"code": "for i in 0..100 { Root.Body[`k${i}`] = i; }", "max_map_size": 10}),
        );
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text
                .contains("has 100 entries, over the node's max_map_size (10)"),
            "{}",
            e.text
        );
    }

    #[test]
    fn maps_grown_key_by_key_are_held_to_max_map_size_in_every_output_tree() {
        let s = compiled(json!({
            "code": "LocalEnvironment.Variables.m = #{}; for i in 0..30 { LocalEnvironment.Variables.m[`k${i}`] = i; }",
            "max_map_size": 10
        }));
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text.contains(
                "a map in LocalEnvironment has 30 entries, over the node's max_map_size (10)"
            ),
            "{}",
            e.text
        );
        // A copy handed to propagate() is held to the same limits.
        let s = compiled(json!({
            "code": "Root.Body[\"m\"] = #{}; for i in 0..30 { Root.Body.m[`k${i}`] = i; } propagate(\"Out1\"); Root.Body[\"m\"] = #{}; ",
            "max_map_size": 10
        }));
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text
                .contains("has 30 entries, over the node's max_map_size (10)"),
            "{}",
            e.text
        );
    }

    #[test]
    fn strings_the_script_shares_between_trees_come_back_whole() {
        let s = compiled(json!({
            "code": "let t = Root.Body.s; LocalEnvironment.Variables.t = t; Root.Body.u = t; Root.Body.s += \"!\";"
        }));
        let out = s
            .run(&Message::new(Body::Json(json!({"s": "x".repeat(40)}))), T)
            .unwrap();
        let x = "x".repeat(40);
        assert_eq!(
            out.message.root.body,
            Body::Json(json!({"s": format!("{x}!"), "u": x}))
        );
        assert_eq!(out.message.local(&["Variables", "t"]), Some(json!(x)));
    }

    #[test]
    fn properties_pass_through_untouched_unless_the_script_names_them() {
        let msg = Message::new(Body::Json(json!({"a": 1})));
        // Never named: not converted, shared with the arriving message, kept even when the
        // script replaces Root whole.
        for code in ["Root.Body.b = 2;", "Root = #{ Body: #{ b: 2 } };"] {
            let out = compiled(json!({ "code": code })).run(&msg, T).unwrap();
            assert!(
                Arc::ptr_eq(&out.message.root.properties, &msg.root.properties),
                "{code}"
            );
            assert_eq!(out.message.root.body.to_value()["b"], json!(2), "{code}");
        }
        // Named: converted, and changes come back.
        let out = compiled(json!({
            "code": "Root.Properties.ContentType = \"application/json\"; Root.Body.f = Root.Properties.MessageFormat;"
        }))
        .run(&msg, T)
        .unwrap();
        assert_eq!(
            out.message.root.properties["ContentType"],
            json!("application/json")
        );
        assert_eq!(
            out.message.root.properties["MessageFormat"],
            msg.root.properties["MessageFormat"]
        );
        assert_eq!(
            out.message.root.body.to_value()["f"],
            msg.root.properties["MessageFormat"]
        );
        // Named and dropped: gone, as before.
        let out = compiled(json!({ "code": "Root = #{ Body: 1 }; // Properties dropped" }))
            .run(&msg, T)
            .unwrap();
        assert!(out.message.root.properties.is_empty());
    }

    #[test]
    fn errors_of_helper_functions_are_not_called_throws() {
        let s = compiled(json!({"code": "json_decode(\"{oops\")"}));
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(e.text.contains(": json_decode: "), "{}", e.text);
        assert!(!e.text.contains("threw"), "{}", e.text);
        // Where in the script, and where in the JSON text.
        let s = compiled(
            json!({"code": "let a = 1;\nlet b = json_decode(\"{\\\"a\\\": 1,\\n oops}\");"}),
        );
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text.contains(
                "at line 2, column 9: json_decode: key must be a string at line 2 column 2"
            ),
            "{}",
            e.text
        );
    }

    #[test]
    fn a_missing_field_is_named_in_the_error() {
        let s = compiled(json!({"code": "Root.Body.total = Root.Body.price * Root.Body.n;"}));
        let e = s
            .run(&Message::new(Body::Json(json!({"n": 2}))), T)
            .unwrap_err();
        assert!(
            e.text
                .contains("column 35: Root.Body.price is () — the field is missing"),
            "{}",
            e.text
        );
    }

    /// As ESQL's `SET`: assigning below parents that do not exist creates them; a parent that
    /// holds something else stays, and the error says so where the script wrote it.
    #[test]
    fn assigning_below_missing_parents_creates_them() {
        let s = compiled(
            json!({"code": "let t = \"a/b\";\n  LocalEnvironment.Destination.MQTT.Output.TopicName = t; Root.Body.x.y.z = 1;"}),
        );
        let out = s
            .run(&Message::new(Body::Json(json!({"x": null}))), T)
            .unwrap();
        assert_eq!(
            out.message
                .local(&["Destination", "MQTT", "Output", "TopicName"]),
            Some(json!("a/b"))
        );
        assert_eq!(
            out.message.root.body,
            Body::Json(json!({"x": {"y": {"z": 1}}}))
        );
        let s = compiled(json!({"code": "let n = 1;\n  Root.Body.x.y = 1; Root.Body.s.t = 2;"}));
        let e = s
            .run(&Message::new(Body::Json(json!({"s": "text"}))), T)
            .unwrap_err();
        assert!(
            e.text
                .contains("at line 2, column 34: No writable property"),
            "{}",
            e.text
        );
    }

    #[test]
    fn timeout_stops_a_slow_script_at_its_deadline() {
        let s = compiled(
            json!({"code": "let i = 0; loop { i += 1; }", "max_operations": 1_000_000_000, "timeout": "50ms"}),
        );
        let started = Instant::now();
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        let took = started.elapsed();
        assert!(
            e.text.contains("ran longer than its timeout (50ms"),
            "{}",
            e.text
        );
        // A correctness bound (the deadline is checked between every two operations), not a
        // speed target: generous for a loaded machine.
        assert!(took < Duration::from_millis(250), "{took:?}");
    }

    /// Runs `f` on a thread with the stack the daemon gives every thread that runs scripts.
    fn on_script_stack<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        std::thread::Builder::new()
            .stack_size(flowbus_runtime::input_task::STACK_SIZE)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    /// `levels` nested arrays in `a` (without the copy `a = [a]` makes of `a` each time).
    fn nest(levels: u32, then: &str) -> Script {
        compiled(json!({
            "code": format!("let a = []; for i in 1..{levels} {{ a = [a.take()]; }} {then}"),
            "max_operations": 10_000_000
        }))
    }

    #[test]
    fn values_nested_deeper_than_max_depth_are_errors_wherever_they_are_left() {
        on_script_stack(|| {
            let msg = Message::new(Body::Json(json!({})));
            // 128 levels is the default limit: allowed; one more is not.
            let out = nest(128, "Root.Body = a;").run(&msg, T).unwrap();
            assert_eq!(out.message.root.body.to_value().to_string().len(), 256);
            for (levels, then, left) in [
                (129, "Root.Body = a.take();", "Root.Body"),
                (5_000, "Root.Body.x = a.take();", "Root.Body"),
                (
                    2_000,
                    "LocalEnvironment.Variables.a = a.take();",
                    "LocalEnvironment",
                ),
                (2_000, "Environment.a = a.take();", "Environment"),
                (
                    2_000,
                    "Root.Body.x = a.take(); propagate(\"Out1\"); Root.Body = 1;",
                    "Root.Body",
                ),
                (2_000, "1", "the variable a"),
                (2_000, "a.take()", "its result"),
                (2_000, "Root.X = a.take();", "Root"),
            ] {
                let e = nest(levels, then).run(&msg, T).unwrap_err();
                assert!(
                    e.text.contains(&format!(
                        "the script left {left} with a value nested more than 128 levels deep: raise the node's \"max_depth\" (at most 1024)"
                    )),
                    "{then}: {}",
                    e.text
                );
                assert_eq!(e.number, numbers::SCRIPT_ERROR);
            }
            // A deep value thrown: an error that shows it cut short.
            let e = nest(2_000, "throw a.take();").run(&msg, T).unwrap_err();
            assert!(e.text.contains("script threw: [[[["), "{}", e.text);
            // json_encode refuses it.
            let e = nest(2_000, "let j = json_encode(a); a = 1; j")
                .run(&msg, T)
                .unwrap_err();
            assert!(e.text.contains("nested more than 128 levels"), "{}", e.text);
            // Built and dropped by the script itself: no error, and no crash on this stack.
            let out = nest(5_000, "a = 1; Root.Body.ok = true;")
                .run(&msg, T)
                .unwrap();
            assert_eq!(out.message.root.body.to_value(), json!({"ok": true}));
            // The limit is the node's.
            let s = compiled(json!({
                "code": "let a = []; for i in 1..300 { a = [a.take()]; } Root.Body = a;",
                "max_depth": 300
            }));
            assert!(s.run(&msg, T).is_ok());
        });
    }

    #[test]
    fn a_script_over_its_memory_budget_ends_with_a_clear_error() {
        let s = compiled(json!({
            "code": "let m = #{}; for i in 0..1000 { m[`k${i}`] = blob(500000, i); }",
            "max_memory": "8MiB"
        }));
        let e = s.run(&Message::new(Body::Json(json!({}))), T).unwrap_err();
        assert!(
            e.text.contains(
                "the script used more than its memory budget (8 MiB): raise the node's \"max_memory\" (at most 256 MiB) or process less at once"
            ),
            "{}",
            e.text
        );
        assert!(e.text.contains("line 1"), "{}", e.text);
        // The budget is per run: the same script within it, run again and again, passes.
        let s = compiled(json!({
            "code": "let m = #{}; for i in 0..4 { m[`k${i}`] = blob(200000, i); } Root.Body.n = m.len();",
            "max_memory": "8MiB"
        }));
        for _ in 0..5 {
            s.run(&Message::new(Body::Json(json!({}))), T).unwrap();
        }
        // What the script is given does not count against it.
        let big = "x".repeat(16 << 20);
        let s = compiled(json!({"code": "Root.Body.n = Root.Body.s.len();", "max_memory": "1MiB"}));
        s.run(&Message::new(Body::Json(json!({ "s": big }))), T)
            .unwrap();
    }

    #[test]
    fn a_stopping_flow_interrupts_its_running_script() {
        let s = compiled(
            json!({"code": "loop { }", "max_operations": 1_000_000_000, "timeout": "60s"}),
        );
        let stop = CancellationToken::new();
        let fire = stop.clone();
        let started = Instant::now();
        let t = std::thread::spawn(move || {
            s.run_until(&Message::new(Body::Json(json!({}))), T, Some(&stop))
                .unwrap_err()
        });
        std::thread::sleep(Duration::from_millis(50));
        fire.cancel();
        let fired = Instant::now();
        let e = t.join().unwrap();
        assert!(
            e.text
                .contains("the flow is stopping: the script was interrupted 1s after the stop"),
            "{}",
            e.text
        );
        // The grace, then at once.
        assert!(fired.elapsed() >= STOP_GRACE, "{:?}", fired.elapsed());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    /// A stop lets the flow finish what it received: a script that runs after the stop (or
    /// is running when it comes) and ends within the grace is not cut short.
    #[test]
    fn a_stopping_flow_lets_short_scripts_finish() {
        let s = compiled(
            json!({"code": "let i = 0; while i < 1000 { i += 1; } Root.Body.done = true;"}),
        );
        let stop = CancellationToken::new();
        stop.cancel();
        for _ in 0..3 {
            let out = s
                .run_until(&Message::new(Body::Json(json!({}))), T, Some(&stop))
                .unwrap();
            assert_eq!(out.message.root.body, Body::Json(json!({"done": true})));
        }
    }

    #[test]
    fn every_engine_shares_the_standard_packages() {
        let a = compiled(json!({"code": "[3, 1, 2].sort(); \"x\".to_upper()"}));
        let b = compiled(json!({"code": "1"}));
        let (ma, mb) = (shared_modules(), shared_modules());
        assert!(Arc::ptr_eq(&ma[0], &mb[0]));
        assert_eq!(
            a.run(&Message::new(Body::Json(json!({}))), T)
                .unwrap()
                .value
                .into_string()
                .unwrap(),
            "X"
        );
        assert!(b.run(&Message::new(Body::Json(json!({}))), T).is_ok());
    }

    /// Files that are not scripts, holding secrets, each named as a script: no compile error
    /// may repeat a secret. The same text given inline (it is the flow's own) keeps Rhai's
    /// whole message, which for most of them does quote the secret: that is what the file's
    /// message must not do.
    #[test]
    fn compile_errors_of_a_script_file_quote_nothing_of_the_file() {
        let dir =
            std::env::temp_dir().join(format!("flowbus-script-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases = [
            (
                "password = Hunter2Secret\nHunter2Secret\napi_key: \"s3cr3t-value\"\n",
                false,
            ),
            ("api_key: \"s3cr3t-value\"\n", false),
            ("lookup_Hunter2Secret(1, 2", true),
            ("fn Hunter2Secret() {} fn Hunter2Secret() {}", true),
            ("#{Hunter2Secret: 1, Hunter2Secret: 2}", true),
            ("x = 'Hunter2Secret'", true),
            ("const Hunter2Secret = 2; Hunter2Secret = 3;", true),
            ("fn f(Hunter2Secret, Hunter2Secret) {}", true),
            ("\"\\qs3cr3t\"", false),
            ("token \u{20ac} s3cr3t", false),
            ("-----BEGIN PRIVATE KEY-----\nMIIEHunter2Secret\n", false),
        ];
        let ctx = ctx_in(&dir);
        for (i, (text, inline_quotes_it)) in cases.iter().enumerate() {
            let name = format!("secret-{i}.rhai");
            std::fs::write(dir.join(&name), text).unwrap();
            let Err(p) = load(&decl(json!({ "script": name })), &ctx, &["code"]) else {
                panic!("{text:?} compiled")
            };
            let shown = p[0].kind.to_string();
            assert!(
                shown.starts_with(&format!("Rhai compile error in {name} at line ")),
                "{shown}"
            );
            for secret in ["Hunter2", "s3cr3t", "\\q", "\u{20ac}", "MIIE", "BEGIN"] {
                assert!(!shown.contains(secret), "{text:?} gave: {shown}");
            }
            let Err(p) = load(&decl(json!({ "code": text })), &ctx, &["code"]) else {
                panic!("{text:?} compiled inline")
            };
            let inline = p[0].kind.to_string();
            assert_eq!(
                inline.contains("Hunter2Secret"),
                *inline_quotes_it,
                "inline: {inline}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn compile_errors_of_a_script_file_keep_keywords_and_single_symbols() {
        let dir = std::env::temp_dir().join(format!("flowbus-script-kw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ctx = ctx_in(&dir);
        for (text, says) in [
            ("let f = 1 + ;", "Unexpected ';'"),
            (
                "let x = eval(\"1\");",
                "reserved keyword 'eval' is disabled",
            ),
            ("import \"x\" as y;", "'import' is a reserved keyword"),
            (
                "f(1, 2",
                "Expecting ')' to close the arguments list of this function call",
            ),
            ("let x = 1 € 2;", "Unexpected input"),
        ] {
            std::fs::write(dir.join("s.rhai"), text).unwrap();
            let Err(p) = load(&decl(json!({ "script": "s.rhai" })), &ctx, &["code"]) else {
                panic!("{text:?} compiled")
            };
            let shown = p[0].kind.to_string();
            assert!(
                shown.ends_with(&format!(": {says}")),
                "{text:?} gave: {shown}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_script_shipped_with_the_flow_is_used_instead_of_the_disk() {
        let dir =
            std::env::temp_dir().join(format!("flowbus-script-shipped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ctx = ctx_in(&dir);
        let shipped: flowbus_runtime::node::ShippedScripts = [(
            "lib/x.rhai".to_string(),
            "Root.Body.shipped = true;".to_string(),
        )]
        .into();
        ctx.shipped = Arc::new(shipped);
        let s = load(&decl(json!({ "script": "lib/x.rhai" })), &ctx, &["code"])
            .unwrap_or_else(|p| panic!("{p:?}"));
        let out = s.run(&Message::new(Body::Json(json!({}))), T).unwrap();
        assert_eq!(out.message.root.body, Body::Json(json!({"shipped": true})));
        // Still confined: a shipped text does not make a path outside acceptable.
        let mut outside = ctx.clone();
        outside.shipped = Arc::new([("../x.rhai".to_string(), "1".to_string())].into());
        let Err(p) = load(&decl(json!({ "script": "../x.rhai" })), &outside, &["code"]) else {
            panic!("a path outside was accepted")
        };
        assert!(
            p[0].kind
                .to_string()
                .contains("must be inside the flow directory"),
            "{:?}",
            p[0].kind
        );
    }
}
