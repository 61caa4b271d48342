//! The services every flow shares: the activity log, the statistics and the metrics registry.

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
    /// The metrics registry (node counters and histograms; anything recorded through the
    /// `metrics` crate when it is the global recorder).
    pub telemetry: Arc<Telemetry>,
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
        })
    }
}

fn min_severity(config: &Config) -> Severity {
    // Config::parse has checked it.
    Severity::parse(&config.activity_log.min_severity).unwrap_or(Severity::Info)
}
