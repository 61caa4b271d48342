//! The daemon lifecycle: every flow under the configured paths is loaded and started (an
//! invalid one is reported and skipped; the others run); flows are deployed, started, stopped
//! and removed one at a time through one path, whether the request comes from the file
//! watcher or the admin API; a flow that fails is stopped on its own; shutdown stops the flows
//! in reverse order within one deadline.
//!
//! Concurrency: mutations take the async `ops` lock, so two deploys of a flow can never
//! overlap (the old version is stopped before the new one starts: never two subscriptions at
//! once). The flow table itself sits behind a short synchronous lock, so reads (the flows
//! list, statistics) never wait for a slow stop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::activity::{NewEntry, Severity};
use crate::config::Config;
use crate::engine::{CancellationToken, Flow, NodeStatsSnapshot, RunningFlow};
use crate::flow::{
    flow_files, load_flow_bundle, load_flow_text, FlowError, FlowErrorKind, FlowErrors,
};
use crate::node::{Registry, ShippedScripts};
use crate::services::Services;
use crate::stats::{names, ServerSnapshot};
use crate::telemetry::Collected;

/// Activity-log numbers of daemon events.
pub mod bip {
    /// A flow started (logged by the engine).
    pub const FLOW_STARTED: u32 = 1001;
    /// A flow stopped (logged by the engine).
    pub const FLOW_STOPPED: u32 = 1002;
    /// A flow file is invalid: not started, or the running version kept.
    pub const FLOW_INVALID: u32 = 1004;
    /// A flow was deployed or redeployed.
    pub const FLOW_DEPLOYED: u32 = 1005;
    /// A flow was removed.
    pub const FLOW_REMOVED: u32 = 1006;
    /// A flow failed (a node panicked or could not work) and was stopped.
    pub const FLOW_FAILED: u32 = 1007;
    /// The daemon started or is stopping.
    pub const DAEMON: u32 = 1008;
    /// Messages an input node had accepted were abandoned when the stop deadline aborted it.
    pub const ABANDONED_AT_STOP: u32 = 1009;
    /// The watcher could not read a flow directory or file: nothing was changed.
    pub const WATCH_FAILED: u32 = 1010;
    /// Lines of the activity-log files could not be read back at start (logged by the
    /// activity log).
    pub const ACTIVITY_LOG_UNREADABLE: u32 = crate::activity::UNREADABLE_LINES;
}

/// What the daemon refuses, and why. Each variant's text says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No flow has that name.
    #[error("no flow named '{name}' (flows: {known})")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The flow is invalid; nothing was changed.
    #[error("the flow is invalid and was not deployed:\n{0}")]
    Invalid(FlowErrors),
    /// A request that does not fit the flow (a name that differs from the path, a name taken
    /// by another file).
    #[error("{0}")]
    Conflict(String),
    /// Scripts sent with a flow break a rule: each names the script and the rule. Nothing was
    /// changed.
    #[error("the scripts sent with the flow were refused; nothing was changed:\n{}", .0.join("\n"))]
    BadScripts(Vec<String>),
    /// A file could not be written or moved.
    #[error("{0}")]
    Io(String),
    /// The daemon is shutting down and takes no more changes.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// A flow's state as the flows list shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowState {
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped by an operator (it is still deployed and can be started).
    Stopped,
    /// Stopped because a node failed; `reason` says why.
    Failed,
    /// Its file is invalid and no version of it runs.
    Invalid,
}

/// One flow in the flows list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowView {
    /// The flow name.
    pub name: String,
    /// Its state.
    pub state: FlowState,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The flow file.
    pub file: PathBuf,
    /// Nodes in the deployed version (0 when invalid).
    pub nodes: usize,
    /// Deployments of this flow since the daemon started (1 = as loaded at start).
    pub version: u64,
    /// When the current version was deployed.
    pub deployed_at: String,
    /// When it last started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// The problems of the file's newest version when it could not be deployed (the
    /// previous version, if any, keeps running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

enum Run {
    Running {
        running: RunningFlow,
        order: u64,
        monitor: Monitor,
    },
    Stopping,
    Stopped,
    Failed(String),
    Invalid,
}

/// The task that stops a flow when it fails.
struct Monitor {
    /// A child of the daemon's shutdown token.
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    /// Ends the monitor and waits for it, so it no longer holds the flow.
    async fn end(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Stops a flow and lets go of it: when this returns, its clients are released, so a new
/// version can create clients with the same ids and persistence directories.
async fn stop_and_release(running: RunningFlow, monitor: Option<Monitor>, deadline: Duration) {
    if let Some(m) = monitor {
        m.end().await;
    }
    running.stop(deadline).await;
}

struct Slot {
    name: String,
    file: PathBuf,
    fingerprint: u64,
    source: String,
    flow: Option<Flow>,
    run: Run,
    version: u64,
    deployed_at: String,
    started_at: Option<String>,
    rejected: Option<String>,
}

impl Slot {
    fn view(&self) -> FlowView {
        let (state, reason) = match &self.run {
            Run::Running { .. } => (FlowState::Running, None),
            Run::Stopping => (FlowState::Stopping, None),
            Run::Stopped => (FlowState::Stopped, None),
            Run::Failed(r) => (FlowState::Failed, Some(r.clone())),
            Run::Invalid => (FlowState::Invalid, None),
        };
        FlowView {
            name: self.name.clone(),
            state,
            reason,
            file: self.file.clone(),
            nodes: self.flow.as_ref().map_or(0, |f| f.node_count()),
            version: self.version,
            deployed_at: self.deployed_at.clone(),
            started_at: self.started_at.clone(),
            rejected: self.rejected.as_deref().map(crate::activity::redact),
        }
    }
}

#[derive(Default)]
struct Table {
    flows: BTreeMap<String, Slot>,
    /// Fingerprints of files seen by the watcher that are not (yet) a flow: invalid files
    /// whose name could not be told, so the same error is not logged on every check.
    unnamed: HashMap<PathBuf, u64>,
}

struct Inner {
    config: Arc<Config>,
    registry: Registry,
    services: Arc<Services>,
    ops: tokio::sync::Mutex<()>,
    table: Mutex<Table>,
    order: AtomicU64,
    started: Instant,
    started_at: String,
    shutting_down: AtomicBool,
    /// Fires when shutdown begins: ends the watcher and, its children, the flows' monitors.
    /// The flows' own tokens are not its children: shutdown stops them one by one, the last
    /// started first, each within the deadline.
    shutdown: CancellationToken,
    /// Where API deploys write new flow files.
    deploy_dir: PathBuf,
    /// The watched paths (the configured ones plus `deploy_dir`).
    paths: Vec<PathBuf>,
    /// When the watcher last said that it could not look.
    watch_errors: Mutex<crate::time::Every>,
}

/// A running daemon (a cheap handle; clones share it).
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

/// A statistics report: servers and flows.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// When the daemon started.
    pub since: String,
    /// Per MQTT server URL.
    pub servers: BTreeMap<String, ServerSnapshot>,
    /// Per flow, per node.
    pub flows: BTreeMap<String, Vec<NodeStatsSnapshot>>,
}

/// A flow with its definition and statistics (`GET /api/v1/flows/{name}`).
#[derive(Debug, Serialize)]
pub struct FlowDetail {
    /// The list entry.
    #[serde(flatten)]
    pub view: FlowView,
    /// The flow file as deployed (parsed JSON; URL credentials hidden).
    pub definition: Value,
    /// Per-node statistics of the deployed version.
    pub statistics: Vec<NodeStatsSnapshot>,
}

impl Daemon {
    /// A daemon with no flows yet, using the given services (see [`Services::open`]).
    pub fn with_services(config: Config, registry: Registry, services: Arc<Services>) -> Daemon {
        let deploy_dir = config
            .flows
            .iter()
            .find(|p| p.is_dir())
            .cloned()
            .unwrap_or_else(|| config.data_dir.join("flows"));
        let mut paths = config.flows.clone();
        if !paths.contains(&deploy_dir) {
            paths.push(deploy_dir.clone());
        }
        Daemon {
            inner: Arc::new(Inner {
                config: Arc::new(config),
                registry,
                services,
                ops: tokio::sync::Mutex::new(()),
                table: Mutex::new(Table::default()),
                order: AtomicU64::new(0),
                started: Instant::now(),
                started_at: crate::time::now_rfc3339(),
                shutting_down: AtomicBool::new(false),
                shutdown: CancellationToken::new(),
                deploy_dir,
                paths,
                watch_errors: Mutex::new(crate::time::Every::new(Duration::from_secs(60))),
            }),
        }
    }

    /// A daemon with in-memory services (tests).
    pub fn new(config: Config, registry: Registry) -> Daemon {
        let services = Arc::new(Services::from_config(&config));
        Daemon::with_services(config, registry, services)
    }

    /// The shared services.
    pub fn services(&self) -> &Arc<Services> {
        &self.inner.services
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    /// Where API deploys put new flow files.
    pub fn deploy_dir(&self) -> &Path {
        &self.inner.deploy_dir
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log(&self, severity: Severity, number: u32, flow: &str, message: String) {
        self.inner
            .services
            .activity
            .record(NewEntry::new(severity, number, "Flow", flow, "", message));
    }

    /// Loads and starts every flow under the configured paths. Returns the errors of the flows
    /// that could not be loaded (each is also in the activity log); the others are running.
    pub async fn start_all(&self) -> Vec<FlowErrors> {
        let _ops = self.inner.ops.lock().await;
        let mut failed = Vec::new();
        let files = match flow_files(&self.existing_paths()) {
            Ok(f) => f,
            Err(e) => return vec![e],
        };
        for file in files {
            if let Err(DaemonError::Invalid(e)) = self.deploy_file_locked(&file).await {
                failed.push(e);
            }
        }
        failed
    }

    /// The paths to scan: the configured ones (a missing one is reported when it is read)
    /// and the deploy directory once it exists.
    fn existing_paths(&self) -> Vec<PathBuf> {
        self.inner
            .paths
            .iter()
            .filter(|p| p.exists() || self.inner.config.flows.contains(p))
            .cloned()
            .collect()
    }

    /// Loads and starts (or redeploys) one flow file. Used at start and by the watcher.
    pub async fn deploy_file(&self, file: &Path) -> Result<FlowView, DaemonError> {
        let _ops = self.inner.ops.lock().await;
        self.deploy_file_locked(file).await
    }

    async fn deploy_file_locked(&self, file: &Path) -> Result<FlowView, DaemonError> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                let errors = FlowErrors(vec![FlowError {
                    file: file.to_path_buf(),
                    pos: None,
                    node: None,
                    terminal: None,
                    kind: FlowErrorKind::Io(e.to_string()),
                }]);
                self.reject(file, None, self.fingerprint(file, ""), &errors);
                return Err(DaemonError::Invalid(errors));
            }
        };
        self.deploy_read_locked(file, text).await
    }

    /// Deploys a flow file whose text has been read.
    async fn deploy_read_locked(&self, file: &Path, text: String) -> Result<FlowView, DaemonError> {
        let fp = self.fingerprint(file, &text);
        match load_flow_text(
            file,
            &text,
            &self.inner.registry,
            self.inner.config.clone(),
            self.inner.services.clone(),
        ) {
            Ok(flow) => {
                let conflict = self
                    .table()
                    .flows
                    .get(flow.name())
                    .filter(|s| s.file != file)
                    .map(|s| s.file.clone());
                if let Some(other) = conflict {
                    let m = format!(
                        "{}: flow name '{}' is already used by {}; flow names must be unique",
                        file.display(),
                        flow.name(),
                        other.display()
                    );
                    self.log(Severity::Error, bip::FLOW_INVALID, flow.name(), m.clone());
                    self.table().unnamed.insert(file.to_path_buf(), fp);
                    return Err(DaemonError::Conflict(m));
                }
                self.table().unnamed.remove(file);
                // The file held a flow of another name (renamed in the file, or an invalid
                // version listed under its file name): that one goes first.
                let renamed: Vec<String> = self
                    .table()
                    .flows
                    .values()
                    .filter(|s| s.file == file && s.name != flow.name())
                    .map(|s| s.name.clone())
                    .collect();
                for old in renamed {
                    if self.stop_locked(&old).await.is_ok() {
                        // The old name is gone for good, and so are the client ids made from
                        // it: end their sessions as for any removal.
                        let late = self.retire_locked(&old).await;
                        self.forget(
                            &old,
                            &format!(
                                "stopped and removed: {} now holds flow '{}'{late}",
                                file.display(),
                                flow.name()
                            ),
                        );
                    }
                }
                Ok(self.install(flow, file.to_path_buf(), text, fp).await)
            }
            Err(errors) => {
                let name = self.name_of(file, &text);
                self.reject(file, name.as_deref(), fp, &errors);
                Err(DaemonError::Invalid(errors))
            }
        }
    }

    /// The flow name a file would have (its `name`, else its stem), when that flow exists.
    fn name_of(&self, file: &Path, text: &str) -> Option<String> {
        let t = self.table();
        if let Some(s) = t.flows.values().find(|s| s.file == file) {
            return Some(s.name.clone());
        }
        let declared = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string));
        declared.or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()))
    }

    /// Records an invalid file: logged; the running version (if any) keeps running.
    fn reject(&self, file: &Path, name: Option<&str>, fp: u64, errors: &FlowErrors) {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = name.unwrap_or(&stem).to_string();
        let mut t = self.table();
        // Whether a deployed version stays, and whether it runs.
        let kept = match t.flows.get_mut(&name) {
            Some(slot) if slot.file == file && slot.flow.is_some() => {
                slot.fingerprint = fp;
                slot.rejected = Some(errors.to_string());
                Some(matches!(slot.run, Run::Running { .. }))
            }
            Some(slot) if slot.file == file => {
                slot.fingerprint = fp;
                slot.rejected = Some(errors.to_string());
                None
            }
            Some(_) => {
                t.unnamed.insert(file.to_path_buf(), fp);
                None
            }
            None => {
                t.flows.insert(
                    name.clone(),
                    Slot {
                        name: name.clone(),
                        file: file.to_path_buf(),
                        fingerprint: fp,
                        source: String::new(),
                        flow: None,
                        run: Run::Invalid,
                        version: 0,
                        deployed_at: crate::time::now_rfc3339(),
                        started_at: None,
                        rejected: Some(errors.to_string()),
                    },
                );
                None
            }
        };
        drop(t);
        let message = if let Some(running) = kept {
            format!(
                "the new version of flow '{name}' in {} is invalid and was not deployed; {}:\n{errors}",
                file.display(),
                if running {
                    "the running version keeps running"
                } else {
                    "the deployed version stays (not running)"
                }
            )
        } else {
            format!(
                "flow file {} is invalid and was not started:\n{errors}",
                file.display()
            )
        };
        self.log(Severity::Error, bip::FLOW_INVALID, &name, message);
    }

    /// Replaces (or adds) a flow: the old version is stopped first, then the new one started
    /// through the same path as at daemon start. A flow an operator stopped stays stopped.
    async fn install(&self, flow: Flow, file: PathBuf, source: String, fp: u64) -> FlowView {
        let name = flow.name().to_string();
        let (old_running, old_flow, keep_stopped, version) = {
            let mut t = self.table();
            match t.flows.get_mut(&name) {
                Some(slot) => {
                    let keep_stopped = matches!(slot.run, Run::Stopped);
                    let old = match std::mem::replace(&mut slot.run, Run::Stopping) {
                        Run::Running {
                            running, monitor, ..
                        } => Some((running, monitor)),
                        _ => None,
                    };
                    (old, slot.flow.take(), keep_stopped, slot.version + 1)
                }
                None => (None, None, false, 1),
            }
        };
        let redeploy = old_running.is_some();
        if let Some((running, monitor)) = old_running {
            stop_and_release(
                running,
                Some(monitor),
                self.inner.config.daemon.shutdown_timeout.0,
            )
            .await;
        }
        // The old version is gone before the new one connects: never two subscriptions.
        drop(old_flow);
        let now = crate::time::now_rfc3339();
        let (run, started_at) = if keep_stopped {
            (Run::Stopped, None)
        } else {
            (self.run(&flow), Some(now.clone()))
        };
        let slot = Slot {
            name: name.clone(),
            file: file.clone(),
            fingerprint: fp,
            source,
            flow: Some(flow),
            run,
            version,
            deployed_at: now,
            started_at,
            rejected: None,
        };
        let view = slot.view();
        self.table().flows.insert(name.clone(), slot);
        self.log(
            Severity::Info,
            bip::FLOW_DEPLOYED,
            &name,
            format!(
                "flow '{name}' {} from {} (version {version}){}",
                if redeploy || version > 1 {
                    "redeployed"
                } else {
                    "deployed"
                },
                file.display(),
                if keep_stopped {
                    "; it stays stopped until started"
                } else {
                    ""
                }
            ),
        );
        view
    }

    /// Starts a built flow and a monitor that stops it if it fails.
    fn run(&self, flow: &Flow) -> Run {
        let running = flow.start();
        let stop = self.inner.shutdown.child_token();
        let me = self.clone();
        let watched = flow.clone();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                // Handled on a task of its own: it takes the ops lock, which whoever ends
                // this monitor may hold.
                _ = watched.failed() => {
                    tokio::spawn(async move { me.on_failed(watched).await });
                }
                _ = stopped.cancelled() => {}
            }
        });
        Run::Running {
            running,
            order: self.inner.order.fetch_add(1, Ordering::SeqCst),
            monitor: Monitor { stop, task },
        }
    }

    /// One failure domain per flow: the failed flow is stopped (its inputs are already
    /// cancelled; this releases its connections) and shown as failed with its reason.
    async fn on_failed(&self, flow: Flow) {
        let _ops = self.inner.ops.lock().await;
        let reason = flow
            .failure()
            .unwrap_or_else(|| "unknown failure".to_string());
        let running = {
            let mut t = self.table();
            let Some(slot) = t.flows.get_mut(flow.name()) else {
                return;
            };
            if !slot.flow.as_ref().is_some_and(|f| f.same(&flow)) {
                return;
            }
            match std::mem::replace(&mut slot.run, Run::Stopping) {
                Run::Running { running, .. } => running,
                other => {
                    slot.run = other;
                    return;
                }
            }
        };
        self.log(
            Severity::Error,
            bip::FLOW_FAILED,
            flow.name(),
            format!(
                "flow '{}' failed and is being stopped; the daemon and the other flows keep running: {reason}",
                flow.name()
            ),
        );
        running
            .stop(self.inner.config.daemon.shutdown_timeout.0)
            .await;
        if let Some(slot) = self.table().flows.get_mut(flow.name()) {
            if slot.flow.as_ref().is_some_and(|f| f.same(&flow)) {
                slot.run = Run::Failed(reason);
            }
        }
    }

    /// Deploys a flow from its JSON text (the admin API's PUT): validated and built first
    /// (nothing changes when it is invalid), then written to its file and started through the
    /// same path as a changed file.
    pub async fn deploy_text(&self, name: &str, text: &str) -> Result<FlowView, DaemonError> {
        self.deploy_with_scripts(name, text, ShippedScripts::new())
            .await
    }

    /// Deploys a flow together with the scripts it names (`"script": "lib/x.rhai"` → the text
    /// of `lib/x.rhai`). Each script must be named by the flow, be a relative `.rhai` path of
    /// plain names, and lie inside the flow's directory (see [`crate::paths`]). The flow is
    /// validated and built with these scripts; only then are they written (each atomically,
    /// missing directories created), then the flow file, and the flow is started like a
    /// changed file. A refused request writes nothing.
    pub async fn deploy_with_scripts(
        &self,
        name: &str,
        text: &str,
        scripts: ShippedScripts,
    ) -> Result<FlowView, DaemonError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        check_name(name)?;
        let _ops = self.inner.ops.lock().await;
        let existing = self.table().flows.get(name).map(|s| s.file.clone());
        let file = existing.unwrap_or_else(|| self.inner.deploy_dir.join(format!("{name}.json")));
        let scripts = Arc::new(scripts);
        let targets = self.script_targets(&file, text, &scripts)?;
        let flow = load_flow_bundle(
            &file,
            text,
            scripts.clone(),
            &self.inner.registry,
            self.inner.config.clone(),
            self.inner.services.clone(),
        )
        .map_err(DaemonError::Invalid)?;
        if flow.name() != name {
            return Err(DaemonError::Conflict(format!(
                "the flow in the request body is named '{}' but the request is for '{name}'; make them the same (or leave \"name\" out)",
                flow.name()
            )));
        }
        if let Some(other) = self
            .table()
            .flows
            .values()
            .find(|s| s.file == file && s.name != name)
        {
            return Err(DaemonError::Conflict(format!(
                "{} holds flow '{}'; remove that flow first or deploy under its name",
                file.display(),
                other.name
            )));
        }
        write_scripts(&targets)?;
        write_atomically(&file, text)?;
        let fp = self.fingerprint(&file, text);
        self.table().unnamed.remove(&file);
        Ok(self.install(flow, file, text.to_string(), fp).await)
    }

    /// Where each script sent with the flow to be stored in `file` goes, with its text; or
    /// every rule the scripts break.
    fn script_targets<'s>(
        &self,
        file: &Path,
        text: &str,
        scripts: &'s ShippedScripts,
    ) -> Result<Vec<(PathBuf, &'s str)>, DaemonError> {
        if scripts.is_empty() {
            return Ok(Vec::new());
        }
        let dir = file.parent().unwrap_or_else(|| Path::new("."));
        // A flow that is not JSON names nothing; validation then says what is wrong with it.
        let named = serde_json::from_str::<Value>(text)
            .ok()
            .map(|v| script_names(&v));
        let mut targets = Vec::new();
        let mut problems = Vec::new();
        for (key, script) in scripts {
            let plain = Path::new(key)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            let problem = if !plain || !key.ends_with(".rhai") || key.contains('\0') {
                Some("must be a relative path of plain names ending in .rhai (no leading '/', no '.' or '..')".to_string())
            } else if named.as_ref().is_some_and(|n| !n.contains(key)) {
                Some("is not named by any node of the flow; send only the scripts its nodes name as \"script\" (written the same way)".to_string())
            } else {
                match crate::paths::confine(dir, &self.inner.config.daemon.allowed_paths, key) {
                    Ok(target) => {
                        targets.push((target, script.as_str()));
                        None
                    }
                    Err(refusal) => Some(refusal.to_string()),
                }
            };
            if let Some(p) = problem {
                problems.push(format!("script '{key}' {p}"));
            }
        }
        if problems.is_empty() {
            Ok(targets)
        } else {
            Err(DaemonError::BadScripts(problems))
        }
    }

    /// [`fingerprint`] with this daemon's allowed paths.
    fn fingerprint(&self, file: &Path, text: &str) -> u64 {
        fingerprint(file, text, &self.inner.config.daemon.allowed_paths)
            .unwrap_or_else(|(_, fp)| fp)
    }

    /// Starts a stopped or failed flow (rebuilt from its file). Starting a running flow does
    /// nothing.
    pub async fn start_flow(&self, name: &str) -> Result<FlowView, DaemonError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        let _ops = self.inner.ops.lock().await;
        let (file, source, running) = {
            let t = self.table();
            let slot = self.find(&t, name)?;
            (
                slot.file.clone(),
                slot.source.clone(),
                matches!(slot.run, Run::Running { .. }),
            )
        };
        if running {
            return self.view(name);
        }
        if source.is_empty() {
            // Never deployed: the file is invalid. Try it again as it is now.
            drop(_ops);
            return self.deploy_file(&file).await;
        }
        // A stopped flow cannot be resumed: its inputs' cancellation has fired. Build the
        // deployed version again and start that.
        let flow = load_flow_text(
            &file,
            &source,
            &self.inner.registry,
            self.inner.config.clone(),
            self.inner.services.clone(),
        )
        .map_err(DaemonError::Invalid)?;
        let run = self.run(&flow);
        let mut t = self.table();
        let slot = t.flows.get_mut(name).ok_or_else(|| DaemonError::NotFound {
            name: name.into(),
            known: String::new(),
        })?;
        slot.flow = Some(flow);
        slot.run = run;
        slot.started_at = Some(crate::time::now_rfc3339());
        Ok(slot.view())
    }

    /// Stops a running flow (it stays deployed). Stopping a stopped flow does nothing.
    pub async fn stop_flow(&self, name: &str) -> Result<FlowView, DaemonError> {
        let _ops = self.inner.ops.lock().await;
        self.stop_locked(name).await?;
        self.view(name)
    }

    async fn stop_locked(&self, name: &str) -> Result<(), DaemonError> {
        let running = {
            let mut t = self.table();
            self.find(&t, name)?;
            let slot = t
                .flows
                .get_mut(name)
                .ok_or_else(|| DaemonError::Conflict(name.into()))?;
            match std::mem::replace(&mut slot.run, Run::Stopping) {
                Run::Running {
                    running, monitor, ..
                } => Some((running, monitor)),
                other => {
                    slot.run = other;
                    None
                }
            }
        };
        if let Some((r, monitor)) = running {
            stop_and_release(
                r,
                Some(monitor),
                self.inner.config.daemon.shutdown_timeout.0,
            )
            .await;
            if let Some(slot) = self.table().flows.get_mut(name) {
                slot.run = Run::Stopped;
            }
        }
        Ok(())
    }

    /// Ends what a stopped flow keeps beyond a stop, because it is being removed (see
    /// [`Flow::retire`]): its nodes end their persistent sessions and delete their files under
    /// the data directory. Returns a note for the removal entry naming nodes that did not
    /// finish within `shutdown_timeout` (empty when all did).
    async fn retire_locked(&self, name: &str) -> String {
        let flow = self.table().flows.get(name).and_then(|s| s.flow.clone());
        let Some(flow) = flow else {
            return String::new();
        };
        let deadline = self.inner.config.daemon.shutdown_timeout.0;
        let late = flow.retire(deadline).await;
        if late.is_empty() {
            String::new()
        } else {
            format!(
                "; nodes {} did not finish ending their sessions within {}",
                late.join(", "),
                crate::time::human(deadline)
            )
        }
    }

    /// Stops and removes a flow; its file is moved to `<data_dir>/removed/` so it does not
    /// come back at the next start. Unlike a stop, a removal ends the flow's persistent
    /// sessions at the brokers and deletes its files under the data directory (see
    /// [`Flow::retire`]).
    pub async fn remove_flow(&self, name: &str) -> Result<(), DaemonError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        let _ops = self.inner.ops.lock().await;
        self.stop_locked(name).await?;
        let file = self.table().flows.get(name).map(|s| s.file.clone());
        if let Some(file) = file {
            if file.exists() {
                let dir = self.inner.config.data_dir.join("removed");
                let stamp = crate::time::now_rfc3339().replace([':', '.'], "-");
                let to = dir.join(format!("{name}-{stamp}.json"));
                crate::datadir::create_private_dir_all(&dir)
                    .and_then(|()| {
                        std::fs::rename(&file, &to).or_else(|_| {
                            std::fs::copy(&file, &to).and_then(|_| std::fs::remove_file(&file))
                        })
                    })
                    .map_err(|e| {
                        DaemonError::Io(format!(
                            "flow '{name}' was stopped but its file {} could not be moved to {}: {e}",
                            file.display(),
                            dir.display()
                        ))
                    })?;
            }
        }
        // Only once the file is out of the way (a flow whose file could not be moved stays,
        // stopped, with its sessions).
        let late = self.retire_locked(name).await;
        self.forget(name, &format!("removed through the admin API{late}"));
        Ok(())
    }

    fn forget(&self, name: &str, why: &str) {
        let slot = self.table().flows.remove(name);
        self.inner.services.telemetry.remove_labelled("flow", name);
        if let Some(slot) = slot {
            self.log(
                Severity::Info,
                bip::FLOW_REMOVED,
                name,
                format!("flow '{name}' ({}) {why}", slot.file.display()),
            );
            drop(slot);
            crate::memory::give_back();
        }
    }

    fn find<'t>(&self, t: &'t Table, name: &str) -> Result<&'t Slot, DaemonError> {
        t.flows.get(name).ok_or_else(|| DaemonError::NotFound {
            name: name.to_string(),
            known: if t.flows.is_empty() {
                "none".to_string()
            } else {
                t.flows.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }

    /// One flow's list entry.
    pub fn view(&self, name: &str) -> Result<FlowView, DaemonError> {
        let t = self.table();
        Ok(self.find(&t, name)?.view())
    }

    /// Every flow, by name.
    pub fn flows(&self) -> Vec<FlowView> {
        self.table().flows.values().map(Slot::view).collect()
    }

    /// A flow with its definition and statistics.
    pub fn detail(&self, name: &str) -> Result<FlowDetail, DaemonError> {
        let t = self.table();
        let slot = self.find(&t, name)?;
        let mut definition = serde_json::from_str(&slot.source).unwrap_or(Value::Null);
        redact_json(&mut definition);
        Ok(FlowDetail {
            view: slot.view(),
            definition,
            statistics: slot.flow.as_ref().map(Flow::node_stats).unwrap_or_default(),
        })
    }

    /// The running flows.
    pub fn running(&self) -> Vec<Flow> {
        self.table()
            .flows
            .values()
            .filter(|s| matches!(s.run, Run::Running { .. }))
            .filter_map(|s| s.flow.clone())
            .collect()
    }

    /// Current statistics.
    pub fn stats(&self) -> StatsReport {
        StatsReport {
            since: self.inner.started_at.clone(),
            servers: self
                .inner
                .services
                .stats
                .servers()
                .into_iter()
                .map(|(url, st)| (crate::activity::redact(&url), st))
                .collect(),
            flows: self
                .table()
                .flows
                .values()
                .filter_map(|s| s.flow.as_ref().map(|f| (s.name.clone(), f.node_stats())))
                .collect(),
        }
    }

    /// Every metric in the Prometheus text format.
    pub fn prometheus(&self) -> String {
        let s = &self.inner.services;
        let mut collected = s.stats.collect();
        let flows = self.flows();
        let mut by_state: BTreeMap<&'static str, f64> = [
            ("running", 0.0),
            ("stopped", 0.0),
            ("failed", 0.0),
            ("invalid", 0.0),
        ]
        .into_iter()
        .collect();
        for f in &flows {
            let k = match f.state {
                FlowState::Running => "running",
                FlowState::Stopped | FlowState::Stopping => "stopped",
                FlowState::Failed => "failed",
                FlowState::Invalid => "invalid",
            };
            *by_state.entry(k).or_default() += 1.0;
        }
        collected.push(Collected {
            name: names::FLOWS,
            kind: "gauge",
            help: "Flows by state.",
            samples: by_state
                .into_iter()
                .map(|(k, v)| (vec![("state", k.to_string())], v))
                .collect(),
        });
        collected.push(Collected {
            name: names::FLOW_UP,
            kind: "gauge",
            help: "1 when the flow is running, 0 otherwise.",
            samples: flows
                .iter()
                .map(|f| {
                    (
                        vec![("flow", f.name.clone())],
                        if f.state == FlowState::Running {
                            1.0
                        } else {
                            0.0
                        },
                    )
                })
                .collect(),
        });
        let c = s.activity.counters();
        collected.push(Collected {
            name: names::ACTIVITY_LOG_ENTRIES,
            kind: "counter",
            help: "Activity-log entries recorded, by severity.",
            samples: [Severity::Info, Severity::Warning, Severity::Error]
                .into_iter()
                .map(|sev| {
                    (
                        vec![("severity", sev.as_str().to_string())],
                        c.recorded[sev as usize].load(Ordering::Relaxed) as f64,
                    )
                })
                .collect(),
        });
        collected.push(Collected {
            name: names::ACTIVITY_LOG_WRITE_ERRORS,
            kind: "counter",
            help: "Activity-log entries that could not be written to the files.",
            samples: vec![(vec![], c.write_errors.load(Ordering::Relaxed) as f64)],
        });
        collected.push(Collected {
            name: names::UPTIME_SECONDS,
            kind: "gauge",
            help: "Seconds since the daemon started.",
            samples: vec![(vec![], self.inner.started.elapsed().as_secs_f64().floor())],
        });
        s.telemetry.render_prometheus(&collected)
    }

    /// Watches the flow paths every `watch_interval` until shutdown: a new or changed file
    /// (or a script it uses) is deployed, a removed file stops and removes its flow. Returns
    /// at once when watching is off.
    pub async fn watch(&self) {
        if !self.inner.config.daemon.watch {
            return;
        }
        let mut tick = tokio::time::interval(self.inner.config.daemon.watch_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.check_files().await;
        }
    }

    /// One pass of the watcher.
    pub async fn check_files(&self) {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let _ops = self.inner.ops.lock().await;
        let files: BTreeSet<PathBuf> = match flow_files(&self.existing_paths()) {
            Ok(f) => f.into_iter().filter(|f| f.is_file()).collect(),
            // Not being able to look (out of file descriptors, permissions) says nothing
            // about the flows: change nothing. A flow directory that was removed is no error:
            // it is not among the existing paths, and its flows are gone.
            Err(e) => {
                self.watch_failed(&e.to_string());
                return;
            }
        };
        let known: HashMap<PathBuf, u64> = {
            let t = self.table();
            t.flows
                .values()
                .map(|s| (s.file.clone(), s.fingerprint))
                .chain(t.unnamed.iter().map(|(f, fp)| (f.clone(), *fp)))
                .collect()
        };
        for file in &files {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                // Unreadable for now (or gone since the listing): looked at again next time.
                Err(e) => {
                    self.watch_failed(&format!("cannot read {}: {e}", file.display()));
                    continue;
                }
            };
            let fp = match fingerprint(file, &text, &self.inner.config.daemon.allowed_paths) {
                Ok(fp) => fp,
                Err((why, _)) => {
                    self.watch_failed(&why);
                    continue;
                }
            };
            if known.get(file) != Some(&fp) {
                let _ = self.deploy_read_locked(file, text).await;
            }
        }
        let gone: Vec<(String, PathBuf)> = {
            let mut t = self.table();
            t.unnamed.retain(|f, _| files.contains(f));
            t.flows
                .values()
                .filter(|s| !files.contains(&s.file))
                .map(|s| (s.name.clone(), s.file.clone()))
                .collect()
        };
        for (name, file) in gone {
            if self.stop_locked(&name).await.is_ok() {
                let late = self.retire_locked(&name).await;
                self.forget(
                    &name,
                    &format!(
                        "stopped and removed: its file {} is gone{late}",
                        file.display()
                    ),
                );
            }
        }
    }

    /// Logs that the watcher could not look, at most once a minute (with how many times it
    /// could not since the last entry).
    fn watch_failed(&self, why: &str) {
        let due = self
            .inner
            .watch_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tick();
        if let Some(n) = due {
            self.inner.services.activity.record(NewEntry::new(
                Severity::Warning,
                bip::WATCH_FAILED,
                "Daemon",
                "",
                "",
                format!(
                    "the flow watcher could not look at its files ({why}); every flow keeps running as it is and the files are checked again ({n} time(s) since the last such entry)"
                ),
            ));
        }
    }

    /// Graceful shutdown: no more changes, the watcher stops, then every running flow stops
    /// (the last started first): inputs first, in-flight messages finished, outstanding acks
    /// awaited, connections closed. All of it within `deadline`; returns the flows that did
    /// not stop in time.
    pub async fn shutdown(&self, deadline: Duration) -> Vec<String> {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.shutdown.cancel();
        let until = tokio::time::Instant::now() + deadline;
        let _ops = tokio::time::timeout_at(until, self.inner.ops.lock())
            .await
            .ok();
        let mut running: Vec<(u64, String, RunningFlow)> = {
            let mut t = self.table();
            t.flows
                .values_mut()
                .filter_map(
                    |slot| match std::mem::replace(&mut slot.run, Run::Stopping) {
                        Run::Running {
                            running,
                            order,
                            monitor,
                        } => {
                            monitor.stop.cancel();
                            Some((order, slot.name.clone(), running))
                        }
                        other => {
                            slot.run = other;
                            None
                        }
                    },
                )
                .collect()
        };
        running.sort_by_key(|(order, _, _)| std::cmp::Reverse(*order));
        let mut late = Vec::new();
        for (_, name, r) in running {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if !r.stop(left).await.is_empty() {
                late.push(name.clone());
            }
            if let Some(slot) = self.table().flows.get_mut(&name) {
                slot.run = Run::Stopped;
            }
        }
        self.inner.services.activity.flush();
        late
    }
}

fn check_name(name: &str) -> Result<(), DaemonError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(DaemonError::Conflict(format!(
            "'{name}' is not a usable flow name: use letters, digits, '-', '_' and '.' (not first), at most 200 characters"
        )))
    }
}

fn write_atomically(file: &Path, text: &str) -> Result<(), DaemonError> {
    let io = |e: std::io::Error| DaemonError::Io(format!("cannot write {}: {e}", file.display()));
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = file.with_extension(format!("json.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)
}

/// The `script` values a flow's nodes name.
fn script_names(flow: &Value) -> BTreeSet<String> {
    flow.get("nodes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|n| n.get("script").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

/// Writes each script to its path atomically: every text goes to a temporary file beside its
/// target first (missing directories created), and only when all are written are they renamed
/// into place, so a failed write leaves every script as it was.
fn write_scripts(targets: &[(PathBuf, &str)]) -> Result<(), DaemonError> {
    let mut written: Vec<(PathBuf, &Path)> = Vec::new();
    let mut result = Ok(());
    for (target, text) in targets {
        let tmp = target.with_file_name(format!(
            ".{}.flowbus-tmp-{}",
            target
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let io = |e: std::io::Error| {
            DaemonError::Io(format!("cannot write the script {}: {e}", target.display()))
        };
        let step = target
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .map_err(io);
        if let Err(e) = step {
            let _ = std::fs::remove_file(&tmp);
            result = Err(e);
            break;
        }
        written.push((tmp, target));
    }
    if result.is_err() {
        for (tmp, _) in &written {
            let _ = std::fs::remove_file(tmp);
        }
        return result;
    }
    for (tmp, target) in &written {
        std::fs::rename(tmp, target).map_err(|e| {
            DaemonError::Io(format!("cannot write the script {}: {e}", target.display()))
        })?;
    }
    Ok(())
}

/// What the watcher compares: the flow file's text and the text of every script file it
/// names, so editing a script redeploys its flow too. A script path that is not a `.rhai` file
/// inside the flow's directory or an allowed path is never read (the flow is refused for it
/// anyway): it adds only its name.
///
/// A script that exists but cannot be read now (out of descriptors, say) makes it an error,
/// with the fingerprint as if the script were empty: the watcher then looks again later rather
/// than take it for a change.
fn fingerprint(file: &Path, text: &str, allowed: &[PathBuf]) -> Result<u64, (String, u64)> {
    let mut unreadable = None;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let dir = file.parent().unwrap_or_else(|| Path::new("."));
        let nodes = v.get("nodes").and_then(Value::as_array);
        for script in nodes
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("script").and_then(Value::as_str))
        {
            script.hash(&mut h);
            let path = script
                .ends_with(".rhai")
                .then(|| crate::paths::confine(dir, allowed, script).ok())
                .flatten();
            let content = match path.map(|p| (std::fs::read(&p), p)) {
                Some((Ok(c), _)) => c,
                Some((Err(e), p)) if e.kind() != std::io::ErrorKind::NotFound => {
                    unreadable = Some(format!("cannot read {}: {e}", p.display()));
                    Vec::new()
                }
                _ => Vec::new(),
            };
            content.hash(&mut h);
        }
    }
    match unreadable {
        None => Ok(h.finish()),
        Some(why) => Err((why, h.finish())),
    }
}

fn redact_json(v: &mut Value) {
    match v {
        Value::String(s) => *s = crate::activity::redact(s),
        Value::Array(a) => a.iter_mut().for_each(redact_json),
        Value::Object(o) => o.values_mut().for_each(redact_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_that_cannot_be_read_now_is_no_change_but_a_missing_one_is() {
        let dir = std::env::temp_dir().join(format!("flowbus-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let flow = dir.join("f.json");
        let text = r#"{"nodes": [{"id": "c", "type": "Compute", "script": "s.rhai"}]}"#;
        let missing = fingerprint(&flow, text, &[]).expect("a missing script is a state");
        std::fs::write(dir.join("s.rhai"), "1").unwrap();
        let present = fingerprint(&flow, text, &[]).unwrap();
        assert_ne!(missing, present);
        // A script the daemon cannot read (here: a directory by that name) is not taken for
        // an empty or missing one.
        std::fs::remove_file(dir.join("s.rhai")).unwrap();
        std::fs::create_dir(dir.join("s.rhai")).unwrap();
        let (why, _) = fingerprint(&flow, text, &[]).unwrap_err();
        assert!(why.contains("s.rhai"), "{why}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
