//! Shared pieces of the flowbus bridge benchmark.
//!
//! - [`payload`]: the 200-byte JSON test message and a scanner that reads its numbers back
//!   without a JSON parser (the consumer must stay cheaper than the systems it measures).
//! - [`procfs`]: CPU seconds and peak RSS (`VmHWM`) of a process, from `/proc`.
//! - [`stats`]: percentiles and medians.
//! - [`args`]: a tiny `--key value` parser (the binaries take a handful of options).

pub mod args;
pub mod payload;
pub mod procfs;
pub mod stats;
