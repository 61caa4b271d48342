//! The services every flow shares: the activity log and the statistics.

use crate::activity::{ActivityLog, Severity};
use crate::config::Config;
use crate::stats::Stats;

/// Shared by all flows of a daemon (or a test harness).
#[derive(Default)]
pub struct Services {
    /// The activity log.
    pub activity: ActivityLog,
    /// Statistics.
    pub stats: Stats,
}

impl Services {
    /// Services sized by the configuration.
    pub fn from_config(config: &Config) -> Services {
        Services {
            activity: ActivityLog::new(
                config.activity_log.buffer_entries,
                Severity::parse(&config.activity_log.min_severity).unwrap_or(Severity::Info),
            ),
            stats: Stats::default(),
        }
    }
}
