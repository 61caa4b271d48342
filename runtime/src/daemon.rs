//! The daemon lifecycle: load every flow under the configured paths (an invalid flow is
//! reported and skipped; the others run), start them, and stop them in reverse order on
//! shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::activity::{NewEntry, Severity};
use crate::config::Config;
use crate::engine::{Flow, NodeStatsSnapshot, RunningFlow};
use crate::flow::{flow_files, load_flow, FlowErrors};
use crate::node::Registry;
use crate::services::Services;
use crate::stats::ServerSnapshot;

/// A running daemon.
pub struct Daemon {
    config: Arc<Config>,
    registry: Registry,
    services: Arc<Services>,
    running: Vec<RunningFlow>,
    stopped: Vec<Flow>,
}

/// A statistics report: servers and flows.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// Per MQTT server URL.
    pub servers: BTreeMap<String, ServerSnapshot>,
    /// Per flow, per node.
    pub flows: BTreeMap<String, Vec<NodeStatsSnapshot>>,
}

impl Daemon {
    /// A daemon with no flows yet.
    pub fn new(config: Config, registry: Registry) -> Daemon {
        let services = Arc::new(Services::from_config(&config));
        Daemon {
            config: Arc::new(config),
            registry,
            services,
            running: Vec::new(),
            stopped: Vec::new(),
        }
    }

    /// The shared services.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Loads and starts every flow under the configured paths. Returns the errors of the flows
    /// that could not be loaded (each is also in the activity log); the others are running.
    pub fn start_all(&mut self) -> Vec<FlowErrors> {
        let mut failed = Vec::new();
        let files = match flow_files(&self.config.flows) {
            Ok(f) => f,
            Err(e) => return vec![e],
        };
        for file in files {
            match self.start_file(file) {
                Ok(()) => {}
                Err(e) => failed.push(e),
            }
        }
        failed
    }

    /// Loads and starts one flow file.
    pub fn start_file(&mut self, file: PathBuf) -> Result<(), FlowErrors> {
        match load_flow(
            &file,
            &self.registry,
            self.config.clone(),
            self.services.clone(),
        ) {
            Ok(flow) => {
                self.running.push(flow.start());
                Ok(())
            }
            Err(errors) => {
                let name = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                self.services.activity.record(NewEntry::new(
                    Severity::Error,
                    1004,
                    "Flow",
                    &name,
                    "",
                    format!(
                        "flow file {} is invalid and was not started:\n{errors}",
                        file.display()
                    ),
                ));
                Err(errors)
            }
        }
    }

    /// The running flows.
    pub fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.running.iter().map(|r| r.flow())
    }

    /// Every flow started since the daemon began, running or stopped.
    pub fn all_flows(&self) -> impl Iterator<Item = &Flow> {
        self.flows().chain(self.stopped.iter())
    }

    /// Current statistics.
    pub fn stats(&self) -> StatsReport {
        StatsReport {
            servers: self.services.stats.servers(),
            flows: self
                .all_flows()
                .map(|f| (f.name().to_string(), f.node_stats()))
                .collect(),
        }
    }

    /// Stops every flow (the last started first), each bounded by `deadline`.
    pub async fn shutdown(&mut self, deadline: Duration) {
        while let Some(r) = self.running.pop() {
            let flow = r.flow().clone();
            r.stop(deadline).await;
            self.stopped.push(flow);
        }
    }
}
