//! The commands that talk to a running daemon over its admin API (`flowbus flows`, `log`,
//! `stats`): a small blocking HTTP client (ureq) and the tables they print.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Where the daemon is and how to authenticate.
pub struct Admin {
    base: String,
    token: Option<String>,
    /// Where the token came from, or why none is sent: said with a 401.
    token_note: String,
}

/// The token variable used when the configuration names none.
pub const DEFAULT_TOKEN_ENV: &str = "FLOWBUS_ADMIN_TOKEN";

impl Admin {
    /// From `--admin` (a URL or `host:port`), else the configuration's `admin.listen`. The
    /// token: from the variable `admin.token_env` names when it is set; else from
    /// `FLOWBUS_ADMIN_TOKEN` when that is set; else from `<data_dir>/admin.token`, where the
    /// daemon generated it (none when `admin.auth = "none"`).
    pub fn new(admin: Option<&str>, config: &flowbus_runtime::config::Config) -> Admin {
        let base = match admin {
            Some(a) if a.starts_with("http://") || a.starts_with("https://") => a.to_string(),
            Some(a) => format!("http://{a}"),
            None => {
                let listen = config.admin.listen.replace("0.0.0.0", "127.0.0.1");
                let listen = listen.replace("[::]", "[::1]");
                format!("http://{listen}")
            }
        };
        let from_env = |var: &str| {
            std::env::var(var)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        };
        let file = config.data_dir.join(flowbus_runtime::datadir::TOKEN_FILE);
        let hint = format!("run this command as the daemon's user from its directory (or with its --config or --data-dir), or set {DEFAULT_TOKEN_ENV}");
        let (token, note) = if let Some(var) = &config.admin.token_env {
            match from_env(var) {
                Some(t) => (
                    Some(t),
                    format!("the token sent is the variable {var} (admin.token_env)"),
                ),
                None => (
                    None,
                    format!("the variable {var} (admin.token_env) is not set"),
                ),
            }
        } else if let Some(t) = from_env(DEFAULT_TOKEN_ENV) {
            (
                Some(t),
                format!("the token sent is the variable {DEFAULT_TOKEN_ENV}"),
            )
        } else if config.admin.auth == flowbus_runtime::config::AdminAuth::None {
            (
                None,
                "admin.auth = \"none\" in the configuration: no token sent".to_string(),
            )
        } else {
            match flowbus_runtime::datadir::read_token(&config.data_dir) {
                Ok(t) => (
                    Some(t),
                    format!("the token sent was read from {}; {hint}", file.display()),
                ),
                Err(e) => (
                    None,
                    format!(
                        "flowbus looked for the token in {}: {e}; {hint}",
                        file.display()
                    ),
                ),
            }
        };
        Admin {
            base: base.trim_end_matches('/').to_string(),
            token,
            token_note: note,
        }
    }

    fn agent(timeout: Option<Duration>) -> ureq::Agent {
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(timeout)
                .build(),
        )
    }

    fn auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => r.header("Authorization", format!("Bearer {t}")),
            None => r,
        }
    }

    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the flowbus daemon at {}: {e} (is `flowbus run` running? point --admin at it)",
            self.base
        )
    }

    /// Sends a request; returns the JSON body of a 2xx answer, or an error made of the
    /// API's `error` and `details`.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<Value> {
        self.call_with(method, path, body, None)
    }

    /// Like [`call`](Self::call); the problems of a refused flow are shown against `local`
    /// (the file the user deployed) instead of the daemon's copy.
    fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        local: Option<&Path>,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let agent = Admin::agent(Some(Duration::from_secs(60)));
        let resp = match (method, body) {
            ("GET", _) => self.auth(agent.get(&url)).call(),
            ("DELETE", _) => self.auth(agent.delete(&url)).call(),
            ("PUT", Some(b)) => self
                .auth(agent.put(&url))
                .header("Content-Type", "application/json")
                .send(b),
            ("POST", _) => self
                .auth(agent.post(&url))
                .header("Content-Type", "application/json")
                .send_empty(),
            _ => bail!("unsupported request {method} {path}"),
        };
        let mut resp = resp.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let mut msg = json
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| json.to_string());
        msg.push_str(&format!(" (HTTP {status})"));
        if status == 401 {
            {
                let why = &self.token_note;
                msg.push_str(&format!("\n  {why}"));
            }
        }
        for d in json
            .get("details")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let line = match (local, d.get("message").and_then(Value::as_str)) {
                (Some(file), Some(m)) => {
                    let mut l = file.display().to_string();
                    if let (Some(line), Some(col)) = (d["line"].as_u64(), d["column"].as_u64()) {
                        l.push_str(&format!(":{line}:{col}"));
                    }
                    l.push_str(": ");
                    if let Some(n) = d["node"].as_str() {
                        l.push_str(&format!("node '{n}': "));
                    }
                    if let Some(t) = d["terminal"].as_str() {
                        l.push_str(&format!("terminal '{t}': "));
                    }
                    l.push_str(m);
                    l
                }
                _ => d
                    .get("text")
                    .or_else(|| d.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            };
            msg.push_str("\n  ");
            msg.push_str(&line);
        }
        bail!("{msg}")
    }
}

fn query_string(params: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Everything but RFC 3986's unreserved characters is escaped, in a path segment or a query.
const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, ESCAPED).to_string()
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Whether to colour: standard output is a terminal and NO_COLOR is not set.
fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn paint(on: bool, code: &str, text: &str) -> String {
    if on {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// Prints rows as aligned columns (the last column is not padded).
fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut l = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            l.push_str(c);
            if i + 1 < n {
                l.push_str(&" ".repeat(widths[i].saturating_sub(c.chars().count()) + 2));
            }
        }
        l.trim_end().to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// `flowbus flows list`.
pub fn flows_list(admin: &Admin, json: bool) -> Result<ExitCode> {
    let v = admin.call("GET", "/api/v1/flows", None)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v["flows"])?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let flows = v["flows"].as_array().cloned().unwrap_or_default();
    if flows.is_empty() {
        writeln!(out, "no flows deployed")?;
        return Ok(ExitCode::SUCCESS);
    }
    let c = colour();
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            let state = s(f, "state");
            let painted = match state.as_str() {
                "running" => paint(c, "32", &state),
                "failed" | "invalid" => paint(c, "31;1", &state),
                _ => paint(c, "33", &state),
            };
            // Pad by the visible width: colour codes do not take room.
            let pad = " ".repeat(8usize.saturating_sub(state.len()));
            let mut note = s(f, "reason");
            if let Some(r) = f.get("rejected").and_then(Value::as_str) {
                let first = r.lines().next().unwrap_or_default();
                note = if note.is_empty() {
                    format!("newest file version rejected: {first}")
                } else {
                    format!("{note}; newest file version rejected: {first}")
                };
            }
            vec![
                s(f, "name"),
                format!("{painted}{pad}"),
                s(f, "nodes"),
                s(f, "version"),
                s(f, "file"),
                note,
            ]
        })
        .collect();
    table(
        &mut out,
        &["NAME", "STATE   ", "NODES", "VERSION", "FILE", "REASON"],
        &rows,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `flowbus flows deploy FILE`.
pub fn flows_deploy(admin: &Admin, file: &Path, name: Option<&str>) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = match name {
        Some(n) => n.to_string(),
        None => serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string))
            .or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .ok_or_else(|| anyhow!("cannot tell the flow's name; give --name"))?,
    };
    let body = deploy_body(file, &text)?;
    let v = admin
        .call_with(
            "PUT",
            &format!("/api/v1/flows/{}", encode(&name)),
            Some(&body),
            Some(file),
        )
        .with_context(|| format!("deploying {} as flow '{name}'", file.display()))?;
    let d = &v["deployed"];
    println!(
        "deployed flow '{}' (version {}, {}) to {}",
        s(d, "name"),
        s(d, "version"),
        s(d, "state"),
        s(d, "file")
    );
    Ok(ExitCode::SUCCESS)
}

/// The body of a deploy: the flow alone when it names no script file, else the flow (as a
/// string, so the daemon's line:column match the file) with the text of every `.rhai` script
/// it names, read relative to the flow file as `flowbus validate` reads them. A script path
/// that leaves the flow's directory is refused here, before anything is sent.
fn deploy_body(file: &Path, text: &str) -> Result<String> {
    // A file that is not JSON goes as it is: the daemon says what is wrong with it.
    let Ok(flow) = serde_json::from_str::<Value>(text) else {
        return Ok(text.to_string());
    };
    let dir = file.parent().unwrap_or_else(|| Path::new("."));
    let mut scripts = serde_json::Map::new();
    let nodes = flow.get("nodes").and_then(Value::as_array);
    for node in nodes.into_iter().flatten() {
        let Some(script) = node.get("script").and_then(Value::as_str) else {
            continue;
        };
        // Only Rhai scripts travel: the daemon refuses any other `script` with its position
        // in the flow, and no other file of the user's goes out.
        if scripts.contains_key(script) || !script.ends_with(".rhai") {
            continue;
        }
        let id = node.get("id").and_then(Value::as_str).unwrap_or("?");
        let plain = !script.is_empty()
            && Path::new(script)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            bail!(
                "{}: node '{id}': \"script\" '{script}' must be a path relative to the flow file, inside its directory (no leading '/', '.' or '..'), to be deployed with the flow; move the script next to the flow, or write its path as \"lib/x.rhai\"",
                file.display()
            );
        }
        let path = dir.join(script);
        let code = match std::fs::read_to_string(&path) {
            Ok(code) => code,
            // The daemon may have it already (a flow redeployed from a copy of its file): it
            // uses its own, or says that it has none.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "note: node '{id}': no script {} here; the daemon uses its own copy of '{script}', if it has one",
                    path.display()
                );
                continue;
            }
            Err(e) => {
                return Err(anyhow!(
                    "{}: node '{id}': cannot read its script {}: {e}",
                    file.display(),
                    path.display()
                ))
            }
        };
        scripts.insert(script.to_string(), Value::String(code));
    }
    if scripts.is_empty() {
        return Ok(text.to_string());
    }
    Ok(serde_json::json!({ "flow": text, "scripts": scripts }).to_string())
}

/// `flowbus flows start|stop NAME`.
pub fn flows_action(admin: &Admin, action: &str, name: &str) -> Result<ExitCode> {
    let v = admin.call(
        "POST",
        &format!("/api/v1/flows/{}/{action}", encode(name)),
        None,
    )?;
    println!(
        "flow '{}' is {}",
        s(&v["flow"], "name"),
        s(&v["flow"], "state")
    );
    Ok(ExitCode::SUCCESS)
}

/// `flowbus flows remove NAME`.
pub fn flows_remove(admin: &Admin, name: &str) -> Result<ExitCode> {
    admin.call("DELETE", &format!("/api/v1/flows/{}", encode(name)), None)?;
    println!("flow '{name}' stopped and removed");
    Ok(ExitCode::SUCCESS)
}

/// What `flowbus log` asks for.
pub struct LogArgs {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only this node.
    pub node: Option<String>,
    /// At least this severity.
    pub severity: Option<String>,
    /// Only this number.
    pub number: Option<String>,
    /// Since a time or a duration back.
    pub since: Option<String>,
    /// At most this many past entries.
    pub limit: usize,
    /// Keep printing new entries.
    pub follow: bool,
    /// JSON lines instead of a table.
    pub json: bool,
}

struct LogPrinter {
    json: bool,
    colour: bool,
    flow_w: usize,
    node_w: usize,
}

impl LogPrinter {
    fn row(&self, e: &Value, out: &mut impl Write) -> std::io::Result<()> {
        if self.json {
            return writeln!(out, "{e}");
        }
        let sev = s(e, "severity");
        let sev_cell = format!("{sev:<8}");
        let sev_cell = match sev.as_str() {
            "error" => paint(self.colour, "31;1", &sev_cell),
            "warning" => paint(self.colour, "33", &sev_cell),
            _ => sev_cell,
        };
        let time = paint(self.colour, "2", &format!("{:<24}", s(e, "time")));
        let prefix = format!(
            "{time} {sev_cell} {:<9} {:<fw$} {:<nw$} ",
            s(e, "number"),
            s(e, "flow"),
            s(e, "node"),
            fw = self.flow_w,
            nw = self.node_w
        );
        let indent = 24 + 1 + 8 + 1 + 9 + 1 + self.flow_w + 1 + self.node_w + 1;
        let msg = s(e, "message");
        let mut lines = msg.lines();
        writeln!(out, "{prefix}{}", lines.next().unwrap_or_default())?;
        for l in lines {
            writeln!(out, "{}{l}", " ".repeat(indent))?;
        }
        Ok(())
    }

    fn header(&self, out: &mut impl Write) -> std::io::Result<()> {
        if self.json {
            return Ok(());
        }
        writeln!(
            out,
            "{:<24} {:<8} {:<9} {:<fw$} {:<nw$} MESSAGE",
            "TIME",
            "SEVERITY",
            "NUMBER",
            "FLOW",
            "NODE",
            fw = self.flow_w,
            nw = self.node_w
        )
    }
}

/// `flowbus log`.
pub fn log(admin: &Admin, a: LogArgs) -> Result<ExitCode> {
    let filters = [
        ("flow", a.flow.clone()),
        ("node", a.node.clone()),
        ("severity", a.severity.clone()),
        ("number", a.number.clone()),
    ];
    let mut params = filters.to_vec();
    params.push(("since", a.since.clone()));
    params.push(("limit", Some(a.limit.to_string())));
    let v = admin.call(
        "GET",
        &format!("/api/v1/activity-log{}", query_string(&params)),
        None,
    )?;
    let entries = v["entries"].as_array().cloned().unwrap_or_default();
    let width = |k: &str, min: usize| {
        entries
            .iter()
            .map(|e| s(e, k).chars().count())
            .max()
            .unwrap_or(0)
            .max(min)
    };
    let p = LogPrinter {
        json: a.json,
        colour: colour(),
        flow_w: width("flow", if a.follow { 12 } else { 4 }),
        node_w: width("node", if a.follow { 12 } else { 4 }),
    };
    let mut out = std::io::stdout().lock();
    if !entries.is_empty() || a.follow {
        p.header(&mut out)?;
    }
    for e in &entries {
        p.row(e, &mut out)?;
    }
    out.flush()?;
    if !a.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let last = entries
        .last()
        .and_then(|e| e["seq"].as_u64())
        .or_else(|| v["last_seq"].as_u64())
        .unwrap_or(0);
    let mut params = filters.to_vec();
    params.push(("after", Some(last.to_string())));
    let url = format!(
        "{}/api/v1/activity-log/stream{}",
        admin.base,
        query_string(&params)
    );
    let agent = Admin::agent(None);
    let mut resp = admin
        .auth(agent.get(&url))
        .header("Accept", "text/event-stream")
        .call()
        .map_err(|e| admin.unreachable(e))?;
    if resp.status().as_u16() != 200 {
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        bail!("the daemon refused the stream: {text}");
    }
    let reader = BufReader::new(resp.into_body().into_reader());
    let mut event = String::new();
    for line in reader.lines() {
        let line = line.context("the stream ended")?;
        if let Some(d) = line.strip_prefix("event:") {
            event = d.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            let v: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
            if event == "lagged" {
                eprintln!(
                    "(the terminal fell behind: {} entries skipped)",
                    s(&v, "skipped")
                );
            } else {
                p.row(&v, &mut out)?;
                out.flush()?;
            }
        } else if line.is_empty() {
            event.clear();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `flowbus stats`.
pub fn stats(admin: &Admin, json: bool) -> Result<ExitCode> {
    let v = admin.call("GET", "/api/v1/statistics", None)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "since {}", s(&v, "since"))?;
    let servers = v["servers"].as_object().cloned().unwrap_or_default();
    if !servers.is_empty() {
        writeln!(out, "\nMQTT servers")?;
        let cols = [
            "OpenConnections",
            "ClosedConnections",
            "FailedConnections",
            "MessagesReceived",
            "MessagesSent",
            "BytesReceived",
            "BytesSent",
        ];
        let rows: Vec<Vec<String>> = servers
            .iter()
            .map(|(url, st)| {
                std::iter::once(url.clone())
                    .chain(cols.iter().map(|c| s(st, c)))
                    .collect()
            })
            .collect();
        table(
            &mut out,
            &[
                "SERVER",
                "OPEN",
                "CLOSED",
                "FAILED",
                "RECEIVED",
                "SENT",
                "BYTES IN",
                "BYTES OUT",
            ],
            &rows,
        )?;
    }
    let flows = v["flows"].as_object().cloned().unwrap_or_default();
    if !flows.is_empty() {
        writeln!(out, "\nFlows")?;
        let mut rows = Vec::new();
        for (flow, nodes) in &flows {
            for n in nodes.as_array().into_iter().flatten() {
                let terminals = n["terminals"]
                    .as_object()
                    .map(|t| {
                        t.iter()
                            .filter(|(_, c)| c.as_u64() != Some(0))
                            .map(|(k, c)| format!("{k}={c}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                let count = n["processing"]["count"].as_u64().unwrap_or(0);
                let sum = n["processing"]["sum_seconds"].as_f64().unwrap_or(0.0);
                let avg = if count > 0 {
                    format!("{:.3}", sum * 1000.0 / count as f64)
                } else {
                    "-".to_string()
                };
                // For an input node the engine counts every message it received, whichever
                // terminal it left by, so this is the same number as in the JSON and Prometheus.
                let calls = n["invocations"].as_u64().unwrap_or(0);
                rows.push(vec![
                    flow.clone(),
                    s(n, "node"),
                    s(n, "type"),
                    calls.to_string(),
                    s(n, "errors"),
                    s(n, "discards"),
                    avg,
                    terminals,
                ]);
            }
        }
        table(
            &mut out,
            &[
                "FLOW",
                "NODE",
                "TYPE",
                "CALLS",
                "ERRORS",
                "DISCARDS",
                "AVG MS",
                "TERMINALS",
            ],
            &rows,
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_queries_encode() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["A", "BB"],
            &[
                vec!["long".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A     BB\nlong  x\ns     y\n"
        );
        assert_eq!(
            query_string(&[("flow", Some("a b&c".into())), ("node", None)]),
            "?flow=a%20b%26c"
        );
        assert_eq!(encode("flow/ü~x.y-z_1"), "flow%2F%C3%BC~x.y-z_1");
    }
}
