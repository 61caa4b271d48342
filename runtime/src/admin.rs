//! The admin HTTP API (axum): flows, activity log (query and live server-sent events),
//! statistics as JSON, `/metrics` in the Prometheus text format, `/healthz`.
//!
//! Every answer is JSON except `/metrics` and the event stream; every error is
//! `{"error": "...", "details": [...]}` with a 4xx status that says whose fault it is, and a
//! refused request changes nothing.
//!
//! Secure by default, in the order a request meets the checks ([`guard`]):
//! - **Host**: only loopback names (`localhost`, `127.0.0.1`, `[::1]`, any port), the listen
//!   address itself and `[admin] allowed_hosts` — a web page that rebinds its own name to
//!   127.0.0.1 gets 421 and changes nothing.
//! - **Token**: every endpoint but `/healthz` needs `Authorization: Bearer <token>` (generated
//!   into `<data_dir>/admin.token` unless `token_env` names one; `auth = "none"` only on
//!   loopback), compared in constant time, before any body is read; a refused caller learns
//!   nothing (no flow names, no paths).
//! - **Content type**: `PUT` and `POST` need `Content-Type: application/json` (so a
//!   cross-origin form or `text/plain` post cannot reach them without a CORS preflight, which
//!   this API never answers); `DELETE` may have no body, but not another type.
//! - **Bounds**: bodies up to [`BODY_LIMIT`] read within `request_timeout`; at most
//!   `max_connections` connections (more are answered 503 and closed, the listener never
//!   waits), headers within `header_timeout`, a response the client does not read for
//!   `request_timeout` ends its connection; at most `max_event_streams` event streams.
//!
//! Neither the token nor any server password is ever part of an answer or a log line.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;

use crate::activity::{redact, Entry, Filter, Severity};
use crate::config::{AdminAuth, AdminConfig, Config};
use crate::daemon::{Daemon, DaemonError};
use crate::datadir::{DataDir, DataDirError};
use crate::flow::FlowErrors;
use crate::time::Every;

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// `token_env` names a variable that is not set (or empty).
    #[error("admin.token_env names the environment variable {0}, which is not set or empty; set it or remove token_env")]
    TokenMissing(String),
    /// The generated token cannot be read or written.
    #[error("the admin token: {0}")]
    TokenFile(#[from] DataDirError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr} for the admin API: {message}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        message: String,
    },
}

/// How callers authenticate.
#[derive(Clone)]
pub enum Auth {
    /// `Authorization: Bearer <token>` on every endpoint but `/healthz`.
    Token(Arc<str>),
    /// Nothing (`[admin] auth = "none"`, loopback only).
    None,
}

impl std::fmt::Debug for Auth {
    // Never the token itself: it must not reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Token(..)"),
            Auth::None => f.write_str("None"),
        }
    }
}

impl Auth {
    /// A bearer token.
    pub fn token(t: impl Into<String>) -> Auth {
        Auth::Token(Arc::from(t.into()))
    }
}

/// Where the token comes from, as [`auth_from_config`] found it (for the start-up log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// The variable `admin.token_env` names.
    Env,
    /// `<data_dir>/admin.token`, as it was.
    File,
    /// `<data_dir>/admin.token`, generated at this start.
    Generated,
    /// No authentication (`auth = "none"`).
    Off,
}

/// The authentication the configuration asks for: the token from `admin.token_env`, else the
/// one in the data directory (generated on first start), or none when `auth = "none"`.
pub fn auth_from_config(
    config: &Config,
    data: &DataDir,
) -> Result<(Auth, TokenSource), AdminError> {
    if config.admin.auth == AdminAuth::None {
        return Ok((Auth::None, TokenSource::Off));
    }
    match &config.admin.token_env {
        Some(var) => match std::env::var(var) {
            Ok(t) if !t.trim().is_empty() => Ok((Auth::token(t.trim()), TokenSource::Env)),
            _ => Err(AdminError::TokenMissing(var.clone())),
        },
        None => {
            let (t, generated) = data.admin_token()?;
            let source = if generated {
                TokenSource::Generated
            } else {
                TokenSource::File
            };
            Ok((Auth::Token(Arc::from(t)), source))
        }
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

/// What the router checks and bounds (from `[admin]`).
#[derive(Debug, Clone)]
pub struct Options {
    /// How callers authenticate.
    pub auth: Auth,
    /// Host names answered besides the loopback ones (lower case; IPv6 in brackets).
    pub allowed_hosts: Vec<String>,
    /// Event streams open at once.
    pub max_event_streams: usize,
    /// How long a request body may take to arrive.
    pub request_timeout: Duration,
}

impl Options {
    /// From `[admin]`, with the authentication already resolved.
    pub fn new(admin: &AdminConfig, auth: Auth) -> Options {
        let mut allowed_hosts: Vec<String> = admin
            .allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        // The address the API listens on answers to its own name, unless it is the wildcard.
        if let Ok(addr) = admin.listen.parse::<std::net::SocketAddr>() {
            if !addr.ip().is_unspecified() {
                allowed_hosts.push(match addr {
                    std::net::SocketAddr::V4(a) => a.ip().to_string(),
                    std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
                });
            }
        }
        Options {
            auth,
            allowed_hosts,
            max_event_streams: admin.max_event_streams,
            request_timeout: admin.request_timeout.0,
        }
    }

    /// Defaults (`[admin]` as shipped) with the given authentication: for tests.
    pub fn with_auth(auth: Auth) -> Options {
        Options::new(&AdminConfig::default(), auth)
    }
}

#[derive(Clone)]
struct AppState {
    daemon: Daemon,
    guard: Arc<Guard>,
    streams: Arc<Semaphore>,
}

struct Guard {
    auth: Auth,
    hosts: BTreeSet<String>,
    request_timeout: Duration,
    max_event_streams: usize,
}

/// Loopback names every configuration answers to.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// The API's routes.
pub fn router(daemon: Daemon, opts: Options) -> Router {
    let hosts = LOOPBACK_HOSTS
        .iter()
        .map(|h| h.to_string())
        .chain(opts.allowed_hosts)
        .collect();
    let state = AppState {
        daemon,
        guard: Arc::new(Guard {
            auth: opts.auth,
            hosts,
            request_timeout: opts.request_timeout,
            max_event_streams: opts.max_event_streams,
        }),
        streams: Arc::new(Semaphore::new(opts.max_event_streams)),
    };
    Router::new()
        .route("/healthz", get(healthz))
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The largest request body the API takes.
pub const BODY_LIMIT: u64 = 2 << 20;
/// How much of a body declared over [`BODY_LIMIT`] is read and thrown away before the 413.
const DRAIN_LIMIT: u64 = 16 << 20;

/// Every request passes here first: Host, then the token, then the content type, then the
/// body (bounded in size and time) — each refusal before anything later is looked at.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let g = &s.guard;
    if !g.host_allowed(&req) {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this API does not answer to that host name; use localhost, 127.0.0.1 or [::1], or list the name in [admin] allowed_hosts",
        )
        .into_response();
    }
    let open = req.method() == Method::GET && req.uri().path() == "/healthz";
    if !open {
        if let Some(refusal) = g.refuse(req.headers()) {
            return refusal;
        }
    }
    let mutating = matches!(*req.method(), Method::PUT | Method::POST | Method::PATCH);
    if mutating || req.method() == Method::DELETE {
        let ctype = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or(""));
        let json = ctype.is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json && (mutating || ctype.is_some()) {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "this request needs 'Content-Type: application/json'",
            )
            .into_response();
        }
    }
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|len| *len > BODY_LIMIT) {
        // Read what was sent (bounded) before answering: closing with the body unread makes
        // the kernel reset the connection, and a client that writes its whole body before
        // it reads (most scripts and HTTP libraries) would see "connection reset" instead.
        if len <= DRAIN_LIMIT {
            let mut stream = body.into_data_stream();
            let drain =
                async { while let Some(Ok(_)) = futures::StreamExt::next(&mut stream).await {} };
            let _ = tokio::time::timeout(g.request_timeout, drain).await;
        }
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body ({len} bytes) is over the length limit of {BODY_LIMIT} bytes"
            ),
        )
        .into_response();
    }
    // The body is read here, within the time limit, so no handler waits on a slow client.
    let bytes = match tokio::time::timeout(
        g.request_timeout,
        axum::body::to_bytes(body, BODY_LIMIT as usize),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over the length limit of {BODY_LIMIT} bytes"),
            )
            .into_response()
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    crate::time::human(g.request_timeout)
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

impl Guard {
    /// Whether the `Host` header (and the authority of an absolute request target) names a
    /// host this API answers to. A request without a `Host` is refused: HTTP/1.1 requires it,
    /// and every browser sends it.
    fn host_allowed(&self, req: &Request) -> bool {
        let header_host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        let Some(h) = header_host.or_else(|| req.uri().authority().map(|a| a.as_str())) else {
            return false;
        };
        let ok = |h: &str| {
            let name = host_name(h).to_ascii_lowercase();
            self.hosts.contains(&name)
        };
        ok(h) && req.uri().authority().is_none_or(|a| ok(a.as_str()))
    }

    /// The 401 for a caller without the right token; `None` lets the request in.
    fn refuse(&self, headers: &HeaderMap) -> Option<Response> {
        let Auth::Token(token) = &self.auth else {
            return None;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return None;
        }
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            if given.is_none() {
                "this endpoint needs an 'Authorization: Bearer <token>' header; the token is in admin.token in the daemon's data directory, or in the variable [admin] token_env names"
            } else {
                "the bearer token is wrong"
            },
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"flowbus\""),
        );
        Some(r)
    }
}

/// The host part of a `Host` value: `name`, `1.2.3.4` or `[v6]`, without the port.
fn host_name(h: &str) -> &str {
    if h.starts_with('[') {
        return h.find(']').map_or(h, |i| &h[..=i]);
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => h,
    }
}

/// Compares a presented token with the real one in time that depends only on the real one's
/// length: no early return on the first difference or on a length mismatch.
fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
    let mut diff = given.len() ^ token.len();
    for (i, t) in token.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ t);
    }
    std::hint::black_box(diff) == 0
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

/// How the listener bounds its connections (from `[admin]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time to send a request's headers (also bounds an idle kept-alive connection).
    pub header_timeout: Duration,
    /// Time a response may wait for the client to read it.
    pub write_timeout: Duration,
}

impl Limits {
    /// From `[admin]`.
    pub fn new(admin: &AdminConfig) -> Limits {
        Limits {
            max_connections: admin.max_connections,
            header_timeout: admin.header_timeout.0,
            write_timeout: admin.request_timeout.0,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(&AdminConfig::default())
    }
}

/// What a connection over the cap is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 88\r\nConnection: close\r\n\r\n{\"error\":\"too many admin connections are open (admin.max_connections); try again later\"}";

/// Serves the API until `shutdown` resolves. The accept loop never waits for a connection:
/// one over `max_connections` is answered 503 and closed at once, and an accept error (out
/// of file descriptors) is logged, at most every 10 s, and retried after a pause.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let conns = Arc::new(Semaphore::new(limits.max_connections));
    let (close_tx, close_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_errors = Every::new(Duration::from_secs(10));
    let mut refused = Every::new(Duration::from_secs(10));
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if let Some(n) = accept_errors.tick() {
                        tracing::warn!("the admin API cannot accept connections: {e} ({n} time(s) since the last report)");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            // Read what already came (so the close is a FIN, not a reset that could overtake
            // the answer), say why, close.
            let _ = stream.try_read(&mut [0u8; 2048]);
            let _ = stream.try_write(BUSY);
            drop(stream);
            if let Some(n) = refused.tick() {
                tracing::warn!(
                    "the admin API refused {n} connection(s): {} are open (admin.max_connections)",
                    limits.max_connections
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut close = close_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(StallGuard::new(stream, limits.write_timeout));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(io, service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = close.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = close_tx.send(true);
    // Connections finish what they are answering; event streams end with the daemon's
    // activity log, or when the caller gives up waiting.
    let _ = conns.acquire_many(limits.max_connections as u32).await;
    Ok(())
}

/// A connection whose writes fail once one has waited longer than `limit` for the client to
/// read: a client that stops reading its answer (or its event stream) frees its connection.
struct StallGuard<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    fn new(inner: T, limit: Duration) -> StallGuard<T> {
        StallGuard {
            inner,
            limit,
            stalled: None,
        }
    }

    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its answer",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
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
    let d = s.daemon.clone();
    let deployed = match bundle(text) {
        Ok(Some((flow, scripts))) => {
            detached(async move { d.deploy_with_scripts(&name, &flow, scripts).await }).await
        }
        Ok(None) => {
            let text = text.to_string();
            detached(async move { d.deploy_text(&name, &text).await }).await
        }
        Err(e) => return e.into_response(),
    };
    match deployed {
        Ok(view) => Json(json!({ "deployed": view })).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Runs a change of the daemon's flows on a task of its own, so that a caller who hangs up
/// (or a connection closed by a limit) cannot cancel it half-way.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, DaemonError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the change failed inside the daemon: {e}"),
            )
        })?
        .map_err(ApiError::from)
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
    let d = s.daemon.clone();
    let n = name.clone();
    match detached(async move { d.remove_flow(&n).await }).await {
        Ok(()) => Json(json!({ "removed": name })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn start_flow(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let d = s.daemon.clone();
    match detached(async move { d.start_flow(&name).await }).await {
        Ok(view) => Json(json!({ "flow": view })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn stop_flow(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let d = s.daemon.clone();
    match detached(async move { d.stop_flow(&name).await }).await {
        Ok(view) => Json(json!({ "flow": view })).into_response(),
        Err(e) => e.into_response(),
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
    let Ok(permit) = s.streams.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many event streams are open ({}, admin.max_event_streams); close one and try again",
                s.guard.max_event_streams
            ),
        )
        .into_response();
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
    // The permit lives as long as the stream: dropped when the client goes away.
    let stream = futures::StreamExt::map(entry_stream(rx, replay, filter, last), move |e| {
        let _held = &permit;
        e
    });
    Sse::new(stream)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_their_port_only() {
        assert_eq!(host_name("localhost:4880"), "localhost");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("[::1]:4880"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("evil.example:x"), "evil.example:x");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        for wrong in [&b"abcdeF"[..], b"abcde", b"abcdefg", b"", b"Abcdef"] {
            assert!(!constant_time_eq(wrong, b"abcdef"), "{wrong:?}");
        }
    }

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        serde_json::from_str::<Value>(body).unwrap();
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let a = Auth::token("s3cret-t0ken");
        assert!(!format!("{a:?}").contains("s3cret"));
        let o = Options::with_auth(a);
        assert!(!format!("{o:?}").contains("s3cret"));
    }
}
