//! Invalid flows, one folder each under `tests/flow_errors/<case>/`:
//!
//! - `flow.json`: the invalid flow (plus any `.rhai` script it names);
//! - `flowbus.toml` (optional): the runtime configuration to validate against;
//! - `expected.txt`: the exact error lines, in the order the validator prints them.
//!
//! Paths in the error lines are relative to the case folder: the library is given the
//! absolute path of `flow.json` and the test strips `<case folder>/` from what it prints, which
//! is exactly what `flowbus validate flow.json` prints when run inside the case folder (the
//! binary tests below check that it does).
//!
//! Every folder needs a line in `cases!` below; `every_case_folder_has_a_test` fails otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use flowbus_runtime::config::Config;
use flowbus_runtime::flow::load_flow;
use flowbus_runtime::services::Services;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_case(stringify!($name));
            }
        )*
        /// The case folders that have a test.
        const CASES: &[&str] = &[$(stringify!($name)),*];
    };
}

cases! {
    bad_duration,
    bad_trace_pattern,
    connection_into_input_node,
    cycle,
    dangling_connection,
    duplicate_id,
    empty_nodes,
    malformed_json_trailing_comma,
    malformed_json_truncated,
    missing_required_property,
    missing_script_file,
    mqtt_limits,
    mqtt_qos_out_of_range,
    no_input_node,
    not_an_object,
    rhai_error_in_inline_code,
    rhai_error_in_script_file,
    script_and_code,
    script_limits_out_of_range,
    several_problems,
    unknown_input_terminal,
    unknown_node_property,
    unknown_node_type,
    unknown_output_terminal,
    unknown_server,
    unknown_top_level_field,
    value_out_of_range,
    wrong_type,
    duplicate_json_key,
    zero_timer_interval,
    script_error_beside_other_errors,
    cycle_path_is_followed,
    control_characters_escaped,
    script_path_with_dot_dot,
    script_path_absolute,
    script_symlink_outside,
    script_not_rhai,
    trace_file_outside,
    trace_file_json,
    client_id_dot_dot,
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/flow_errors")
}

fn expected_lines(dir: &Path) -> Vec<String> {
    let path = dir.join("expected.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| !l.trim().is_empty()),
        "{}: expected.txt must list at least one error line and no blank lines",
        path.display()
    );
    lines
}

fn config_of(dir: &Path) -> Config {
    let path = dir.join("flowbus.toml");
    if path.is_file() {
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    } else {
        Config::default()
    }
}

/// Loads the case's flow through the library and returns the error lines, paths made
/// relative to the case folder.
fn library_errors(dir: &Path) -> Vec<String> {
    let file = dir.join("flow.json");
    let registry = flowbus_nodes::registry();
    let services = Arc::new(Services::default());
    let errors = match load_flow(&file, &registry, Arc::new(config_of(dir)), services) {
        Ok(flow) => panic!(
            "{}: loaded as flow '{}', but the case must be invalid",
            file.display(),
            flow.name()
        ),
        Err(errors) => errors,
    };
    for e in &errors.0 {
        assert_eq!(e.file, file, "every error names the flow file: {e}");
    }
    let prefix = format!("{}/", dir.display());
    errors
        .to_string()
        .replace(&prefix, "")
        .lines()
        .map(str::to_string)
        .collect()
}

fn check_case(case: &str) {
    let dir = cases_dir().join(case);
    let expected = expected_lines(&dir);
    let actual = library_errors(&dir);
    assert_eq!(
        actual,
        expected,
        "\n{case}: the validator's errors differ from expected.txt; it printed:\n{}\n",
        actual.join("\n")
    );
}

#[test]
fn every_case_folder_has_a_test() {
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(cases_dir()).expect("tests/flow_errors exists") {
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
        "folders under tests/flow_errors without a test (add them to `cases!`): {missing:?}"
    );
    let mut listed: Vec<&str> = CASES.to_vec();
    listed.sort_unstable();
    assert_eq!(
        listed, folders,
        "`cases!` names folders that do not exist, or names one twice"
    );
    assert!(CASES.len() >= 14, "at least 14 invalid flows");
}

// ---- the `flowbus validate` binary ----

fn flowbus(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowbus"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the flowbus binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `flowbus validate flow.json` inside the case folder prints expected.txt on stderr, then the
/// summary, and exits 1.
fn check_binary(case: &str) {
    let dir = cases_dir().join(case);
    let out = flowbus(&dir, &["validate", "flow.json"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{case}: stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    let mut expected = expected_lines(&dir);
    expected.push("1 of 1 flow file(s) invalid".into());
    let actual: Vec<String> = stderr.lines().map(str::to_string).collect();
    assert_eq!(
        actual, expected,
        "{case}: flowbus validate printed:\n{stderr}"
    );
    assert_eq!(text(&out.stdout), "", "{case}: nothing on stdout");
}

#[test]
fn binary_reports_several_problems() {
    check_binary("several_problems");
}

#[test]
fn binary_reports_rhai_compile_error_with_script_position() {
    check_binary("rhai_error_in_script_file");
}

#[test]
fn binary_reads_flowbus_toml_of_the_working_directory() {
    check_binary("unknown_server");
}

#[test]
fn binary_accepts_a_valid_flow() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = flowbus(root, &["validate", "flows/telemetry.json"]);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ok: flows/telemetry.json (flow 'telemetry')\n"
    );
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn binary_reports_each_invalid_file_among_valid_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = flowbus(
        root,
        &[
            "validate",
            "flows/telemetry.json",
            "tests/flow_errors/duplicate_id/flow.json",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert_eq!(
        text(&out.stdout),
        "ok: flows/telemetry.json (flow 'telemetry')\n"
    );
    let dir = cases_dir().join("duplicate_id");
    let mut expected: Vec<String> = expected_lines(&dir)
        .into_iter()
        .map(|l| format!("tests/flow_errors/duplicate_id/{l}"))
        .collect();
    expected.push("1 of 2 flow file(s) invalid".into());
    assert_eq!(stderr.lines().collect::<Vec<_>>(), expected);
}
