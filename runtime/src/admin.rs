//! The admin HTTP API (axum): flows, activity log (query and live server-sent events),
//! statistics as JSON, `/metrics` in the Prometheus text format, `/healthz`.
//!
//! Every answer is JSON except `/metrics` and the event stream; every error is
//! `{"error": "...", "details": [...]}` with a 4xx status that says whose fault it is, and a
//! refused request changes nothing. With a token configured (`admin.token_env`), every
//! endpoint but `/healthz` needs `Authorization: Bearer <token>`. Neither the token nor any
//! server password is ever part of an answer or a log line.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::activity::{redact, Entry, Filter, Severity};
use crate::config::Config;
use crate::daemon::{Daemon, DaemonError};
use crate::flow::FlowErrors;

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// `token_env` names a variable that is not set (or empty).
    #[error("admin.token_env names the environment variable {0}, which is not set or empty; set it or remove token_env")]
    TokenMissing(String),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr} for the admin API: {message}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        message: String,
    },
}

/// The bearer token the configuration asks for, read from its environment variable.
pub fn token_from_config(config: &Config) -> Result<Option<String>, AdminError> {
    match &config.admin.token_env {
        None => Ok(None),
        Some(var) => match std::env::var(var) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
            _ => Err(AdminError::TokenMissing(var.clone())),
        },
    }
}

/// Binds the admin listener.
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener, AdminError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AdminError::Bind {
            addr: addr.to_string(),
            message: e.to_string(),
        })
}

#[derive(Clone)]
struct AppState {
    daemon: Daemon,
    token: Option<Arc<str>>,
}

/// The API's routes.
pub fn router(daemon: Daemon, token: Option<String>) -> Router {
    let state = AppState {
        daemon,
        token: token.map(Arc::from),
    };
    let api = Router::new()
        .route("/api/v1/flows", get(list_flows))
        .route(
            "/api/v1/flows/{name}",
            get(get_flow).put(put_flow).delete(delete_flow),
        )
        .route("/api/v1/flows/{name}/start", post(start_flow))
        .route("/api/v1/flows/{name}/stop", post(stop_flow))
        .route("/api/v1/activity-log", get(activity_log))
        .route("/api/v1/activity-log/stream", get(activity_stream))
        .route("/api/v1/statistics", get(statistics))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT as usize))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The largest request body the API takes: what its extractors apply, and what
/// [`refuse_oversized`] refuses by `Content-Length` before them.
const BODY_LIMIT: u64 = 2 << 20;
/// How much of a body declared over [`BODY_LIMIT`] is read and thrown away before the 413.
const DRAIN_LIMIT: u64 = 16 << 20;

/// Refuses a body whose `Content-Length` is over the limit, after reading it (up to
/// [`DRAIN_LIMIT`]). Answering at once and closing with the body unread makes the kernel reset
/// the connection, and a client that writes its whole body before it reads (most scripts and
/// HTTP libraries) then sees "connection reset" instead of the answer.
async fn refuse_oversized(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(len) = declared.filter(|len| *len > BODY_LIMIT) else {
        return next.run(req).await;
    };
    if len <= DRAIN_LIMIT {
        let mut body = req.into_body().into_data_stream();
        while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {}
    }
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body ({len} bytes) is over the length limit of {BODY_LIMIT} bytes"),
    )
    .into_response()
}

/// Errors axum produces itself (a body over the size limit, a path that does not decode) are
/// plain text: make them JSON like ours.
async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    ApiError::new(status, error).into_response()
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// An error answer.
struct ApiError {
    status: StatusCode,
    error: String,
    details: Vec<Value>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            details: Vec::new(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if !self.details.is_empty() {
            body["details"] = Value::Array(self.details);
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> ApiError {
        match e {
            DaemonError::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            DaemonError::Invalid(errors) => ApiError {
                status: StatusCode::BAD_REQUEST,
                error: format!(
                    "the flow is invalid and was not deployed ({} problem{}); nothing was changed",
                    errors.0.len(),
                    if errors.0.len() == 1 { "" } else { "s" }
                ),
                details: flow_errors_json(&errors),
            },
            DaemonError::BadScripts(problems) => ApiError {
                status: StatusCode::BAD_REQUEST,
                error: format!(
                    "the scripts sent with the flow were refused ({} problem{}); nothing was changed",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                ),
                details: problems
                    .into_iter()
                    .map(|p| json!({ "message": p, "text": p }))
                    .collect(),
            },
            DaemonError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            DaemonError::Io(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            DaemonError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }
}

/// Flow errors as JSON: each with its line and column (when known), node, terminal, text.
fn flow_errors_json(errors: &FlowErrors) -> Vec<Value> {
    errors
        .0
        .iter()
        .map(|e| {
            let mut v = json!({
                "message": redact(&e.kind.to_string()),
                "text": redact(&e.to_string()),
            });
            if let Some(p) = e.pos {
                v["line"] = json!(p.line);
                v["column"] = json!(p.column);
            }
            if let Some(n) = &e.node {
                v["node"] = json!(n);
            }
            if let Some(t) = &e.terminal {
                v["terminal"] = json!(t);
            }
            v
        })
        .collect()
}

async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
        if !ok {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                if given.is_none() {
                    "this endpoint needs an 'Authorization: Bearer <token>' header (the token is in the environment variable named by admin.token_env)"
                } else {
                    "the bearer token is wrong"
                },
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"flowbus\""),
            );
            return r;
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; see docs/operations.md for the API",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint does not take that method; see docs/operations.md for the API",
    )
}

async fn list_flows(State(s): State<AppState>) -> Json<Value> {
    Json(json!({ "flows": s.daemon.flows() }))
}

async fn get_flow(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.daemon.detail(&name) {
        Ok(d) => Json(d).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn put_flow(State(s): State<AppState>, Path(name): Path<String>, body: Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request body must be the flow's JSON, in UTF-8",
        )
        .into_response();
    };
    if text.trim().is_empty() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request body is empty; send the flow's JSON",
        )
        .into_response();
    }
    let deployed = match bundle(text) {
        Ok(Some((flow, scripts))) => s.daemon.deploy_with_scripts(&name, &flow, scripts).await,
        Ok(None) => s.daemon.deploy_text(&name, text).await,
        Err(e) => return e.into_response(),
    };
    match deployed {
        Ok(view) => Json(json!({ "deployed": view })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// A deploy body that carries scripts: `{"flow": <the flow as a JSON string or object>,
/// "scripts": {"enrich.rhai": "...", ...}}` (an object with `flow` and no `nodes`). `None`
/// for anything else, which is a plain flow document (and validated as one).
fn bundle(text: &str) -> Result<Option<(String, crate::node::ShippedScripts)>, ApiError> {
    let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    if !body.contains_key("flow") || body.contains_key("nodes") {
        return Ok(None);
    }
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    if let Some(k) = body.keys().find(|k| *k != "flow" && *k != "scripts") {
        return Err(bad(format!(
            "unknown key '{k}' in a deploy with scripts (allowed: \"flow\", \"scripts\")"
        )));
    }
    // Sent as a string, the flow keeps its own lines and columns for the error positions.
    let flow = match body.remove("flow") {
        Some(Value::String(s)) => s,
        Some(v @ Value::Object(_)) => serde_json::to_string_pretty(&v)
            .map_err(|e| bad(format!("\"flow\" cannot be read: {e}")))?,
        _ => {
            return Err(bad(
                "\"flow\" must be the flow, as a JSON object or as a string holding its JSON"
                    .into(),
            ))
        }
    };
    let mut scripts = crate::node::ShippedScripts::new();
    match body.remove("scripts") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let Value::String(t) = v else {
                    return Err(bad(format!(
                        "\"scripts\": the value of '{k}' must be the script's text, a string"
                    )));
                };
                scripts.insert(k, t);
            }
        }
        Some(_) => {
            return Err(bad(
                "\"scripts\" must be an object mapping each script path the flow names to its text"
                    .into(),
            ))
        }
    }
    Ok(Some((flow, scripts)))
}

async fn delete_flow(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.daemon.remove_flow(&name).await {
        Ok(()) => Json(json!({ "removed": name })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn start_flow(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.daemon.start_flow(&name).await {
        Ok(view) => Json(json!({ "flow": view })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn stop_flow(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match s.daemon.stop_flow(&name).await {
        Ok(view) => Json(json!({ "flow": view })).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Query parameters of the activity log (unknown ones are refused).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    flow: Option<String>,
    node: Option<String>,
    severity: Option<String>,
    number: Option<String>,
    /// RFC 3339 time, or a duration back from now (`10m`).
    since: Option<String>,
    /// Only entries after this sequence number.
    after: Option<u64>,
    limit: Option<usize>,
}

/// The most entries one query returns.
const MAX_LIMIT: usize = 10_000;

impl LogQuery {
    fn filter(self) -> Result<Filter, ApiError> {
        let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
        let severity = match self.severity.as_deref() {
            None | Some("") => None,
            Some(s) => Some(Severity::parse(s).ok_or_else(|| {
                bad(format!("severity '{s}' is not one of info, warning, error"))
            })?),
        };
        let since = match self.since.as_deref() {
            None | Some("") => None,
            Some(s) => Some(parse_since(s).ok_or_else(|| {
                bad(format!("since '{s}' is neither an RFC 3339 time (2026-11-22T10:00:00Z) nor a duration back from now (10m)"))
            })?),
        };
        if let Some(l) = self.limit {
            if l == 0 || l > MAX_LIMIT {
                return Err(bad(format!("limit must be from 1 to {MAX_LIMIT}")));
            }
        }
        let number = self.number.filter(|n| !n.is_empty()).map(|n| {
            if n.chars().all(|c| c.is_ascii_digit()) {
                format!("BIP{n}")
            } else {
                n.to_uppercase()
            }
        });
        Ok(Filter {
            flow: self.flow.filter(|f| !f.is_empty()),
            node: self.node.filter(|n| !n.is_empty()),
            severity,
            number,
            after_seq: self.after,
            since,
            limit: Some(self.limit.unwrap_or(1000)),
        })
    }
}

fn parse_since(s: &str) -> Option<String> {
    let t = crate::time::parse_rfc3339(s).or_else(|| {
        humantime::parse_duration(s)
            .ok()
            .and_then(|d| SystemTime::now().checked_sub(d))
    })?;
    Some(crate::time::format_rfc3339(t))
}

fn query_error(e: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!(
            "bad query parameters: {}; allowed: flow, node, severity, number, since, after, limit",
            e.body_text()
        ),
    )
}

async fn activity_log(
    State(s): State<AppState>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    let filter = match q.map_err(query_error).and_then(|Query(q)| q.filter()) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let entries = s.daemon.services().activity.query(&filter);
    let entries: Vec<&Entry> = entries.iter().map(|e| &**e).collect();
    Json(json!({
        "entries": entries,
        "last_seq": s.daemon.services().activity.last_seq(),
    }))
    .into_response()
}

async fn activity_stream(
    State(s): State<AppState>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    let mut filter = match q.map_err(query_error).and_then(|Query(q)| q.filter()) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    // Subscribe before reading the buffer, so nothing falls between the two.
    let rx = s.daemon.services().activity.subscribe();
    let replay: Vec<Arc<Entry>> = if filter.after_seq.is_some() || filter.since.is_some() {
        s.daemon.services().activity.query(&filter)
    } else {
        Vec::new()
    };
    filter.limit = None;
    filter.since = None;
    let last = replay
        .last()
        .map(|e| e.seq)
        .or(filter.after_seq)
        .unwrap_or(0);
    Sse::new(entry_stream(rx, replay, filter, last))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn entry_event(e: &Entry) -> Event {
    Event::default()
        .event("entry")
        .id(e.seq.to_string())
        .data(serde_json::to_string(e).unwrap_or_default())
}

fn entry_stream(
    rx: tokio::sync::broadcast::Receiver<Arc<Entry>>,
    replay: Vec<Arc<Entry>>,
    filter: Filter,
    last: u64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    use tokio::sync::broadcast::error::RecvError;
    let replayed = futures::stream::iter(
        replay
            .into_iter()
            .map(|e| Ok::<_, Infallible>(entry_event(&e)))
            .collect::<Vec<_>>(),
    );
    let live = futures::stream::unfold((rx, filter, last), |(mut rx, filter, last)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if e.seq > last && filter.matches(&e) => {
                    let ev = entry_event(&e);
                    return Some((Ok(ev), (rx, filter, e.seq)));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    // The client reads slower than entries come: say so, and go on.
                    let ev = Event::default()
                        .event("lagged")
                        .data(json!({ "skipped": n }).to_string());
                    return Some((Ok(ev), (rx, filter, last)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    futures::StreamExt::chain(replayed, live)
}

async fn statistics(State(s): State<AppState>) -> Response {
    Json(s.daemon.stats()).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    (headers, s.daemon.prometheus()).into_response()
}
