//! The services every flow shares: the activity log, the statistics, the metrics registry
//! and the daemon-wide budget of received messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::activity::{ActivityLog, ActivityLogError, FileSettings, Severity};
use crate::config::Config;
use crate::stats::Stats;
use crate::telemetry::Telemetry;

/// Shared by all flows of a daemon (or a test harness).
#[derive(Default)]
pub struct Services {
    /// The activity log.
    pub activity: ActivityLog,
    /// MQTT server statistics.
    pub stats: Stats,
    /// The metrics registry (node counters and histograms).
    pub telemetry: Arc<Telemetry>,
    /// What the MQTTSubscribe nodes hold of received messages, together.
    pub input: Arc<InputBudget>,
}

/// The bytes all input nodes of a daemon hold of received messages (queued, or in their
/// flows), against `[mqtt] input_budget`: each node also has its own budget, and pauses
/// receipt when either is spent.
#[derive(Debug)]
pub struct InputBudget {
    held: AtomicUsize,
    limit: usize,
}

impl Default for InputBudget {
    fn default() -> Self {
        InputBudget::new(crate::config::DEFAULT_INPUT_BUDGET as usize)
    }
}

impl InputBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> InputBudget {
        InputBudget {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Counts `n` bytes in; returns the total held now.
    pub fn take(&self, n: usize) -> usize {
        self.held.fetch_add(n, Ordering::SeqCst) + n
    }

    /// Gives `n` bytes back.
    pub fn give(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::SeqCst);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The budget.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the budget is spent.
    pub fn spent(&self) -> bool {
        self.held() >= self.limit
    }

    /// Whether a node paused by the shared budget may resume: down to half of it.
    pub fn has_room(&self) -> bool {
        self.held() <= self.limit / 2
    }
}

impl Services {
    /// Services sized by the configuration, with the activity log in memory only (for
    /// validation and tests).
    pub fn from_config(config: &Config) -> Services {
        Services {
            activity: ActivityLog::new(config.activity_log.buffer_entries, min_severity(config))
                .with_console_per_message(config.activity_log.console_per_message),
            stats: Stats::default(),
            telemetry: Arc::new(Telemetry::new()),
            input: Arc::new(InputBudget::new(config.mqtt.input_budget.0 as usize)),
        }
    }

    /// The daemon's services: the activity log also writes (and reads back) its rotating
    /// files under `<data_dir>/activity-log`.
    pub fn open(config: &Config) -> Result<Services, ActivityLogError> {
        let files = FileSettings {
            dir: config.data_dir.join("activity-log"),
            file_size: config.activity_log.file_size.0,
            files: config.activity_log.files,
        };
        Ok(Services {
            activity: ActivityLog::with_files(
                config.activity_log.buffer_entries,
                min_severity(config),
                files,
            )?
            .with_console_per_message(config.activity_log.console_per_message),
            stats: Stats::default(),
            telemetry: Arc::new(Telemetry::new()),
            input: Arc::new(InputBudget::new(config.mqtt.input_budget.0 as usize)),
        })
    }
}

fn min_severity(config: &Config) -> Severity {
    // Config::parse has checked it.
    Severity::parse(&config.activity_log.min_severity).unwrap_or(Severity::Info)
}
