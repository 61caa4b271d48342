//! The activity log: structured entries (seq, time, severity, BIP number, resource, flow, node,
//! message, tags) kept per flow in memory, mirrored to `tracing`, written to rotating JSON-lines
//! files under the data directory, and broadcast to live subscribers (the SSE stream).
//!
//! ## Keeping connection events
//! Each flow has two rings of `buffer_entries` each: one for *events* (connections,
//! subscriptions, flow lifecycle, anything not tied to one message) and one for *per-message*
//! entries (received, published, errors routed or discarded, traces). A flood of messages can
//! only push older per-message entries out; the connection history stays. Per-message entries
//! are also rate-limited at the source by [`Sampler`] (a few per node per second, the rest
//! counted in one summary entry per second), which bounds what reaches the files.
//!
//! ## Files
//! `<dir>/activity.jsonl` is the current file; when the next line would take it past
//! `file_size` it becomes `activity.1.jsonl` (older ones move up, the oldest of `files` is
//! deleted). On start the files are read back, oldest first, so the query view and the
//! sequence numbers survive a restart. A line that cannot be read back (not UTF-8, not an
//! entry, a sequence number beyond [`MAX_SEQ`]) is skipped and counted, and one entry
//! (BIP1011) says how many per file; the lines after it are read as usual.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

/// Entry severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Normal operation.
    Info,
    /// Something an operator should look at.
    Warning,
    /// A failure: a message or a connection was affected.
    Error,
}

impl Severity {
    /// Parses `info`, `warning` or `error`.
    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" | "warn" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }

    /// `info`, `warning` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One activity-log entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Daemon-wide sequence number (continues across restarts).
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Severity.
    pub severity: Severity,
    /// `BIP12095` etc.
    pub number: String,
    /// `MQTT`, `Flow`, `Script`, ...
    pub resource: String,
    /// The flow.
    pub flow: String,
    /// The node (empty for flow-level entries).
    pub node: String,
    /// What happened.
    pub message: String,
    /// Structured details (topic, qos, url, client_id, ...).
    #[serde(default)]
    pub tags: Map<String, Value>,
}

/// An entry before it gets its sequence number and time.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// Severity.
    pub severity: Severity,
    /// The message number.
    pub number: u32,
    /// The resource.
    pub resource: &'static str,
    /// The flow.
    pub flow: String,
    /// The node.
    pub node: String,
    /// The text.
    pub message: String,
    /// Tags.
    pub tags: Map<String, Value>,
    /// About one message (kept in the flow's per-message ring) rather than an event.
    pub per_message: bool,
}

impl NewEntry {
    /// A new entry.
    pub fn new(
        severity: Severity,
        number: u32,
        resource: &'static str,
        flow: &str,
        node: &str,
        message: impl Into<String>,
    ) -> NewEntry {
        NewEntry {
            severity,
            number,
            resource,
            flow: flow.to_string(),
            node: node.to_string(),
            message: message.into(),
            tags: Map::new(),
            per_message: false,
        }
    }

    /// Adds a tag.
    pub fn tag(mut self, key: &str, value: impl Into<Value>) -> NewEntry {
        self.tags.insert(key.to_string(), value.into());
        self
    }

    /// Marks the entry as being about one message, so it can never push an event out of the
    /// in-memory buffer.
    pub fn per_message(mut self) -> NewEntry {
        self.per_message = true;
        self
    }

    /// Whether the entry is about one message: marked so, or one of the numbers that only
    /// per-message events carry (received, published, publish errors, summaries, traces,
    /// errors routed or discarded).
    pub fn is_per_message(&self) -> bool {
        self.per_message || PER_MESSAGE_NUMBERS.contains(&self.number)
    }
}

/// Numbers that are always about one message (see [`NewEntry::is_per_message`]).
pub const PER_MESSAGE_NUMBERS: &[u32] = &[
    12065, // MQTT message received
    12097, // MQTT message published
    12099, // publish not acknowledged
    12102, // per-message entries summarised
    4311,  // publish error
    1003,  // Trace output
    2230,  // node error routed to Failure
    2488,  // script error
    2628,  // rolled back and discarded
    2629,  // TryCatch discarded
    2630,  // TryCatch caught
    2631,  // rolled back to the input's Catch
    2632,  // error entries summarised
    3001,  // user exception (Throw)
    5705,  // JSON parser error
    5706,  // TEXT parser error
];

/// A query over the in-memory log.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this flow.
    pub flow: Option<String>,
    /// Only this node.
    pub node: Option<String>,
    /// At least this severity.
    pub severity: Option<Severity>,
    /// Only this number (`BIP12096`).
    pub number: Option<String>,
    /// Only entries with a larger sequence number.
    pub after_seq: Option<u64>,
    /// Only entries at or after this time (RFC 3339 as written by [`crate::time`]).
    pub since: Option<String>,
    /// At most this many (the newest).
    pub limit: Option<usize>,
}

impl Filter {
    /// Whether an entry passes the filter.
    pub fn matches(&self, e: &Entry) -> bool {
        self.flow.as_ref().is_none_or(|f| *f == e.flow)
            && self.node.as_ref().is_none_or(|n| *n == e.node)
            && self.severity.is_none_or(|s| e.severity >= s)
            && self.number.as_ref().is_none_or(|n| *n == e.number)
            && self.after_seq.is_none_or(|s| e.seq > s)
            && self
                .since
                .as_ref()
                .is_none_or(|t| e.time.as_str() >= t.as_str())
    }
}

/// Limits per-message entries (received, published, errors) to a few per second per node; the rest
/// are counted and summarised in one entry per second, so high rates neither flood the log nor
/// evict connection events.
pub struct Sampler {
    state: Mutex<(Instant, u32, u64)>,
    per_second: u32,
}

impl Sampler {
    /// Allows `per_second` individual entries per second.
    pub fn new(per_second: u32) -> Sampler {
        Sampler {
            state: Mutex::new((Instant::now(), 0, 0)),
            per_second,
        }
    }

    /// Whether this event gets its own entry; `Some(n)` in `.1` when a summary of `n`
    /// suppressed events is due first.
    pub fn admit(&self) -> (bool, Option<u64>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut summary = None;
        if st.0.elapsed() >= Duration::from_secs(1) {
            if st.2 > 0 {
                summary = Some(st.2);
            }
            *st = (Instant::now(), 0, 0);
        }
        if st.1 < self.per_second {
            st.1 += 1;
            (true, summary)
        } else {
            st.2 += 1;
            (false, summary)
        }
    }

    /// The summary of a second that has ended with suppressed events, for a node to check now
    /// and then: otherwise the last busy second before a quiet spell is never summarised.
    pub fn overdue(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.2 > 0 && st.0.elapsed() >= Duration::from_secs(1) {
            let n = st.2;
            *st = (Instant::now(), 0, 0);
            return Some(n);
        }
        None
    }

    /// The events suppressed so far in the current second (when a node stops).
    pub fn flush(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = std::mem::take(&mut st.2);
        (n > 0).then_some(n)
    }
}

/// Where and how much the log writes to disk.
#[derive(Debug, Clone)]
pub struct FileSettings {
    /// The directory (created when missing).
    pub dir: PathBuf,
    /// Size of one file before it rotates, in bytes.
    pub file_size: u64,
    /// Number of files kept, the current one included.
    pub files: u32,
}

/// The current file name; rotated ones are `activity.N.jsonl`.
pub const FILE_NAME: &str = "activity.jsonl";

/// The largest sequence number the log uses: 2^53 - 1, the largest integer every JSON reader
/// (JavaScript's numbers, so a browser on the event stream) holds exactly. At a million
/// entries a second a daemon would take 285 years to get there, so a larger number read back
/// from a file can only be damage; taking it would leave the counter nowhere to go (at
/// `u64::MAX` the next entry wrapped to 0, and `--follow` and the stream, which ask for
/// larger numbers, saw nothing more), so such a line is skipped and counted like any other
/// unreadable one.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// The activity-log number of the entry that reports lines of the files that could not be
/// read back.
pub const UNREADABLE_LINES: u32 = 1011;

fn rotated_name(n: u32) -> String {
    if n == 0 {
        FILE_NAME.to_string()
    } else {
        format!("activity.{n}.jsonl")
    }
}

/// An activity-log problem (only opening the files can fail; later write errors are
/// counted and reported through `tracing`, never lost silently and never fatal).
#[derive(Debug, thiserror::Error)]
pub enum ActivityLogError {
    /// The directory or the current file could not be opened.
    #[error("activity log {path}: {message}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
}

struct FileSink {
    settings: FileSettings,
    file: File,
    size: u64,
}

impl FileSink {
    fn open(settings: FileSettings) -> Result<FileSink, ActivityLogError> {
        let err = |path: &Path, e: std::io::Error| ActivityLogError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        crate::datadir::create_private_dir_all(&settings.dir).map_err(|e| err(&settings.dir, e))?;
        let path = settings.dir.join(FILE_NAME);
        let file = crate::datadir::private_options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| err(&path, e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(FileSink {
            settings,
            file,
            size,
        })
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.settings.file_size {
            self.rotate()?;
        }
        // One write per line: an entry is never split between two files, and a crash loses
        // at most the entry being written.
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let dir = &self.settings.dir;
        let last = self.settings.files.saturating_sub(1);
        if last == 0 {
            let _ = std::fs::remove_file(dir.join(FILE_NAME));
        } else {
            let _ = std::fs::remove_file(dir.join(rotated_name(last)));
            for n in (0..last).rev() {
                let from = dir.join(rotated_name(n));
                if from.exists() {
                    std::fs::rename(&from, dir.join(rotated_name(n + 1)))?;
                }
            }
        }
        self.file = crate::datadir::private_options()
            .create(true)
            .append(true)
            .open(dir.join(FILE_NAME))?;
        self.size = 0;
        Ok(())
    }

    /// The entries in the files, oldest first, and what could not be read.
    fn read_back(settings: &FileSettings) -> ReadBack {
        let mut back = ReadBack::default();
        for n in (0..settings.files).rev() {
            let name = rotated_name(n);
            let Ok(f) = File::open(settings.dir.join(&name)) else {
                continue;
            };
            let mut bad = Unreadable::default();
            // Lines as bytes: one that is not UTF-8 (damage, or something else wrote to the
            // file) is one bad line, not the end of the file.
            for line in BufReader::new(f).split(b'\n') {
                let line = match line {
                    Ok(l) => l,
                    Err(e) => {
                        bad.error = Some(e.to_string());
                        break;
                    }
                };
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match std::str::from_utf8(&line) {
                    Err(_) => bad.not_utf8 += 1,
                    // A line cut short by a crash, or written by something else.
                    Ok(text) => match serde_json::from_str::<Entry>(text) {
                        Err(_) => bad.not_entries += 1,
                        Ok(e) if e.seq > MAX_SEQ => bad.seq_out_of_range += 1,
                        Ok(e) => back.entries.push(e),
                    },
                }
            }
            if bad.lines() > 0 || bad.error.is_some() {
                back.unreadable.push((name, bad));
            }
        }
        back
    }
}

/// What [`FileSink::read_back`] found.
#[derive(Debug, Default)]
struct ReadBack {
    entries: Vec<Entry>,
    /// Per file name, the lines it skipped.
    unreadable: Vec<(String, Unreadable)>,
}

/// The lines of one file that could not be read back, by reason.
#[derive(Debug, Default, PartialEq, Eq)]
struct Unreadable {
    not_utf8: usize,
    not_entries: usize,
    seq_out_of_range: usize,
    /// A read error that ended the file early.
    error: Option<String>,
}

impl Unreadable {
    fn lines(&self) -> usize {
        self.not_utf8 + self.not_entries + self.seq_out_of_range
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (n, what) in [
            (self.not_utf8, "not UTF-8"),
            (
                self.not_entries,
                "not an activity-log entry (cut short, or not JSON)",
            ),
            (self.seq_out_of_range, "a sequence number beyond 2^53 - 1"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        if let Some(e) = &self.error {
            parts.push(format!("a read error ended it early: {e}"));
        }
        parts.join(", ")
    }
}

impl ReadBack {
    /// The entry that says what could not be read, if anything could not.
    fn report(&self) -> Option<NewEntry> {
        if self.unreadable.is_empty() {
            return None;
        }
        let count: usize = self.unreadable.iter().map(|(_, u)| u.lines()).sum();
        let files: Map<String, Value> = self
            .unreadable
            .iter()
            .map(|(name, u)| (name.clone(), Value::from(u.lines())))
            .collect();
        let detail = self
            .unreadable
            .iter()
            .map(|(name, u)| format!("{name}: {}", u.describe()))
            .collect::<Vec<_>>()
            .join("; ");
        Some(
            NewEntry::new(
                Severity::Error,
                UNREADABLE_LINES,
                "Daemon",
                "",
                "",
                format!(
                    "{count} line(s) of the activity-log files could not be read back and were skipped ({detail}); the {} entries around them were read back",
                    self.entries.len()
                ),
            )
            .tag("count", count)
            .tag("files", files),
        )
    }
}

/// An entry as the rings keep it: its JSON line (the files' format) and the fields a query
/// tests before parsing it. A quarter of the memory of an [`Entry`] with its strings and tags
/// (one allocation instead of about fifteen), so a full ring of per-message entries costs a
/// few hundred kilobytes; queries are rare and parse what they return.
struct Kept {
    seq: u64,
    severity: Severity,
    line: Box<str>,
}

impl Kept {
    fn new(entry: &Entry) -> serde_json::Result<Kept> {
        Ok(Kept {
            seq: entry.seq,
            severity: entry.severity,
            line: serde_json::to_string(entry)?.into_boxed_str(),
        })
    }

    fn entry(&self) -> Option<Entry> {
        serde_json::from_str(&self.line).ok()
    }
}

#[derive(Default)]
struct Rings {
    events: VecDeque<Kept>,
    messages: VecDeque<Kept>,
}

struct State {
    seq: u64,
    flows: HashMap<String, Rings>,
    sink: Option<FileSink>,
    write_failed: bool,
}

/// Counters of the log itself.
#[derive(Debug, Default)]
pub struct LogCounters {
    /// Entries recorded, by severity (info, warning, error).
    pub recorded: [AtomicU64; 3],
    /// Entries that could not be written to the files.
    pub write_errors: AtomicU64,
}

/// The daemon's activity log.
pub struct ActivityLog {
    state: Mutex<State>,
    capacity: usize,
    min_severity: Severity,
    live: broadcast::Sender<Arc<Entry>>,
    counters: LogCounters,
    /// Whether per-message entries below warning also go to the console (`tracing`).
    console_per_message: bool,
}

impl ActivityLog {
    /// A log in memory only, keeping `capacity` events and `capacity` per-message entries per
    /// flow and dropping entries below `min_severity`.
    pub fn new(capacity: usize, min_severity: Severity) -> ActivityLog {
        let (live, _) = broadcast::channel(1024);
        ActivityLog {
            state: Mutex::new(State {
                seq: 0,
                flows: HashMap::new(),
                sink: None,
                write_failed: false,
            }),
            capacity: capacity.max(1),
            min_severity,
            live,
            counters: LogCounters::default(),
            console_per_message: false,
        }
    }

    /// A log that also writes rotating JSON-lines files, starting with what the files
    /// already hold (so the query view and the sequence survive a restart).
    pub fn with_files(
        capacity: usize,
        min_severity: Severity,
        files: FileSettings,
    ) -> Result<ActivityLog, ActivityLogError> {
        let log = ActivityLog::new(capacity, min_severity);
        let back = FileSink::read_back(&files);
        let report = back.report();
        let sink = FileSink::open(files)?;
        {
            let mut st = log.state.lock().unwrap_or_else(|p| p.into_inner());
            for e in back.entries {
                st.seq = st.seq.max(e.seq);
                let per_message = e
                    .number
                    .strip_prefix("BIP")
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| PER_MESSAGE_NUMBERS.contains(&n));
                if let Ok(kept) = Kept::new(&e) {
                    log.push(&mut st, e.flow, kept, per_message);
                }
            }
            st.sink = Some(sink);
        }
        if let Some(report) = report {
            log.record(report);
        }
        Ok(log)
    }

    fn push(&self, st: &mut State, flow: String, entry: Kept, per_message: bool) {
        let rings = st.flows.entry(flow).or_default();
        let ring = if per_message {
            &mut rings.messages
        } else {
            &mut rings.events
        };
        if ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(entry);
    }

    /// Sends per-message entries (received, published, Trace output, their summaries) below
    /// warning to the console too; by default only events, warnings and errors go there.
    pub fn with_console_per_message(mut self, on: bool) -> ActivityLog {
        self.console_per_message = on;
        self
    }

    /// Records an entry (and writes the matching file line, and the `tracing` line unless it
    /// is a per-message entry kept off the console).
    pub fn record(&self, e: NewEntry) {
        if e.severity < self.min_severity {
            return;
        }
        let per_message = e.is_per_message();
        let message = redact(&e.message);
        let tags = e
            .tags
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, Value::String(redact(&s))),
                v => (k, v),
            })
            .collect();
        // The console is for people: a line per message makes it unreadable at any rate.
        let quiet = per_message && e.severity == Severity::Info && !self.console_per_message;
        match e.severity {
            Severity::Info if quiet => {}
            Severity::Info => {
                tracing::info!(flow = %e.flow, node = %e.node, "BIP{} {}", e.number, message)
            }
            Severity::Warning => {
                tracing::warn!(flow = %e.flow, node = %e.node, "BIP{} {}", e.number, message)
            }
            Severity::Error => {
                tracing::error!(flow = %e.flow, node = %e.node, "BIP{} {}", e.number, message)
            }
        }
        self.counters.recorded[e.severity as usize].fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Read-back keeps the counter at most MAX_SEQ, so this cannot run out in practice;
        // should it, the number stays at the largest rather than wrap to 0 (below everything
        // a follower has seen).
        st.seq = match st.seq.checked_add(1) {
            Some(next) => next,
            None => {
                tracing::error!("the activity log's sequence numbers are exhausted");
                u64::MAX
            }
        };
        let entry = Arc::new(Entry {
            seq: st.seq,
            time: crate::time::now_rfc3339(),
            severity: e.severity,
            number: format!("BIP{}", e.number),
            resource: e.resource.to_string(),
            flow: e.flow,
            node: e.node,
            message,
            tags,
        });
        let st = &mut *st;
        // The line is both the file's and the ring's copy. Serialising an entry (string keys,
        // JSON values) cannot fail; were it to, the entry still reaches `tracing` and the live
        // stream, and the failure is counted.
        match Kept::new(&entry) {
            Ok(kept) => {
                if let Some(sink) = st.sink.as_mut() {
                    let mut line = Vec::with_capacity(kept.line.len() + 1);
                    line.extend_from_slice(kept.line.as_bytes());
                    line.push(b'\n');
                    match sink.write(&line) {
                        Ok(()) => st.write_failed = false,
                        Err(err) => {
                            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                            // Once per run of failures, so a full disk does not become a flood.
                            if !st.write_failed {
                                st.write_failed = true;
                                tracing::error!(
                                    "cannot write the activity log file in {}: {err}; entries stay in memory",
                                    sink.settings.dir.display()
                                );
                            }
                        }
                    }
                }
                self.push(st, entry.flow.clone(), kept, per_message);
            }
            Err(_) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // No subscribers is fine.
        let _ = self.live.send(entry);
    }

    /// Entries matching the filter, oldest first.
    pub fn query(&self, f: &Filter) -> Vec<Arc<Entry>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept: Vec<&Kept> = st
            .flows
            .iter()
            .filter(|(flow, _)| f.flow.as_ref().is_none_or(|x| x == *flow))
            .flat_map(|(_, r)| r.events.iter().chain(r.messages.iter()))
            .filter(|k| f.after_seq.is_none_or(|s| k.seq > s))
            .filter(|k| f.severity.is_none_or(|s| k.severity >= s))
            .collect();
        kept.sort_unstable_by_key(|k| std::cmp::Reverse(k.seq));
        // Newest first, so a limit stops the parsing early.
        let mut out: Vec<Arc<Entry>> = kept
            .into_iter()
            .filter_map(Kept::entry)
            .filter(|e| f.matches(e))
            .take(f.limit.unwrap_or(usize::MAX))
            .map(Arc::new)
            .collect();
        out.reverse();
        out
    }

    /// The sequence number of the newest entry.
    pub fn last_seq(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).seq
    }

    /// A live stream of new entries.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Entry>> {
        self.live.subscribe()
    }

    /// Counters of the log itself.
    pub fn counters(&self) -> &LogCounters {
        &self.counters
    }

    /// Flushes the current file to disk (on shutdown).
    pub fn flush(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = st.sink.as_mut() {
            let _ = sink.file.flush();
            let _ = sink.file.sync_data();
        }
    }
}

impl Default for ActivityLog {
    fn default() -> Self {
        ActivityLog::new(1000, Severity::Info)
    }
}

/// Hides the user-info part of URLs (`tcp://user:secret@host` → `tcp://***@host`), so a
/// credential written into a URL never reaches the log, the files or the API.
pub fn redact(s: &str) -> String {
    if !s.contains("://") {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let authority_end = rest
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            out.push_str("***");
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_is_per_flow_and_filters_work() {
        let log = ActivityLog::new(2, Severity::Info);
        for i in 0..3 {
            log.record(NewEntry::new(
                Severity::Info,
                12065,
                "MQTT",
                "a",
                "n",
                format!("m{i}"),
            ));
        }
        log.record(
            NewEntry::new(Severity::Error, 12096, "MQTT", "b", "n", "down").tag("url", "tcp://x"),
        );
        let all = log.query(&Filter::default());
        assert_eq!(
            all.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["m1", "m2", "down"]
        );
        let errs = log.query(&Filter {
            severity: Some(Severity::Warning),
            ..Filter::default()
        });
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].number, "BIP12096");
        assert_eq!(errs[0].tags["url"], "tcp://x");
        let last = log.query(&Filter {
            flow: Some("a".into()),
            limit: Some(1),
            ..Filter::default()
        });
        assert_eq!(last[0].message, "m2");
    }

    #[test]
    fn sampler_admits_a_few_then_summarises() {
        let s = Sampler::new(2);
        assert_eq!(s.admit(), (true, None));
        assert_eq!(s.admit(), (true, None));
        assert_eq!(s.admit(), (false, None));
        assert_eq!(s.admit(), (false, None));
        {
            let mut st = s.state.lock().unwrap();
            st.0 -= Duration::from_secs(2);
        }
        assert_eq!(s.admit(), (true, Some(2)));
    }

    #[test]
    fn a_quiet_spell_still_gets_the_last_seconds_summary() {
        let s = Sampler::new(1);
        assert_eq!(s.admit(), (true, None));
        assert_eq!(s.admit(), (false, None));
        assert_eq!(s.admit(), (false, None));
        // Still inside the second: nothing due yet.
        assert_eq!(s.overdue(), None);
        s.state.lock().unwrap().0 -= Duration::from_secs(1);
        assert_eq!(s.overdue(), Some(2));
        assert_eq!(s.overdue(), None);
        // A new second starts fresh; a stop reports what is pending at once.
        assert_eq!(s.admit(), (true, None));
        assert_eq!(s.admit(), (false, None));
        assert_eq!(s.flush(), Some(1));
        assert_eq!(s.flush(), None);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("flowbus-activity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_flood_of_per_message_entries_never_evicts_connection_events() {
        let log = ActivityLog::new(5, Severity::Info);
        log.record(NewEntry::new(
            Severity::Info,
            12063,
            "MQTT",
            "f",
            "in",
            "Connected",
        ));
        log.record(NewEntry::new(
            Severity::Error,
            12096,
            "MQTT",
            "f",
            "in",
            "Connection failed",
        ));
        for i in 0..1000 {
            log.record(NewEntry::new(
                Severity::Info,
                12065,
                "MQTT",
                "f",
                "in",
                format!("received {i}"),
            ));
            // Marked by the engine rather than by number.
            log.record(
                NewEntry::new(
                    Severity::Warning,
                    9999,
                    "Flow",
                    "f",
                    "x",
                    format!("routed {i}"),
                )
                .per_message(),
            );
        }
        let all = log.query(&Filter::default());
        let numbers: Vec<&str> = all.iter().map(|e| e.number.as_str()).collect();
        assert_eq!(&numbers[..2], ["BIP12063", "BIP12096"], "{numbers:?}");
        // The per-message ring holds the newest `capacity` of those.
        assert_eq!(all.len(), 2 + 5);
        assert_eq!(all.last().map(|e| e.message.as_str()), Some("routed 999"));
        // Without the split, the same flood in one ring would have pushed both out.
        assert!(!NewEntry::new(Severity::Info, 12095, "MQTT", "f", "n", "").is_per_message());
    }

    #[test]
    fn files_rotate_by_size_keep_the_count_and_are_read_back_after_a_restart() {
        let dir = temp_dir("rotate");
        let settings = FileSettings {
            dir: dir.clone(),
            file_size: 4096,
            files: 3,
        };
        let log = ActivityLog::with_files(1000, Severity::Info, settings.clone()).unwrap();
        log.record(
            NewEntry::new(Severity::Error, 12096, "MQTT", "f", "in", "down")
                .tag("url", "tcp://h:1"),
        );
        for i in 0..200 {
            log.record(NewEntry::new(
                Severity::Info,
                12065,
                "MQTT",
                "f",
                "in",
                format!("message number {i} with some padding text"),
            ));
        }
        log.flush();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["activity.1.jsonl", "activity.2.jsonl", "activity.jsonl"]
        );
        for n in &names {
            let len = std::fs::metadata(dir.join(n)).unwrap().len();
            assert!(len <= 4096, "{n} is {len} bytes");
        }
        // Every line is a whole entry, in sequence order across the files.
        let back = FileSink::read_back(&settings);
        assert!(back.unreadable.is_empty(), "{:?}", back.unreadable);
        let back = back.entries;
        assert!(!back.is_empty());
        assert!(back.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(
            back.last().unwrap().message,
            "message number 199 with some padding text"
        );
        // The oldest lines went with the deleted file.
        assert!(back[0].seq > 1);
        drop(log);

        // A restart: the query view and the sequence go on from the files.
        let log = ActivityLog::with_files(1000, Severity::Info, settings).unwrap();
        let before = log.query(&Filter::default());
        assert_eq!(before.len(), back.len());
        assert_eq!(log.last_seq(), 201);
        log.record(NewEntry::new(
            Severity::Info,
            12063,
            "MQTT",
            "f",
            "in",
            "up again",
        ));
        let last = log.query(&Filter {
            limit: Some(1),
            ..Filter::default()
        });
        assert_eq!((last[0].seq, last[0].message.as_str()), (202, "up again"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 18: one non-UTF-8 line dropped the rest of its file at read-back, and an entry
    /// with `seq = u64::MAX` wrapped the counter to 0.
    #[test]
    fn bad_lines_are_skipped_and_counted_and_the_sequence_never_wraps() {
        let dir = temp_dir("badlines");
        std::fs::create_dir_all(&dir).unwrap();
        let line = |seq: u64, msg: &str| {
            let mut l = serde_json::to_string(&Entry {
                seq,
                time: "2026-01-01T00:00:00.000Z".into(),
                severity: Severity::Info,
                number: "BIP1001".into(),
                resource: "Flow".into(),
                flow: "f".into(),
                node: String::new(),
                message: msg.into(),
                tags: Map::new(),
            })
            .unwrap()
            .into_bytes();
            l.push(b'\n');
            l
        };
        let mut older = line(1, "one");
        older.extend_from_slice(b"\xff\xfe not UTF-8\n");
        older.extend(line(2, "two"));
        older.extend_from_slice(b"{\"not\": \"an entry\"}\n");
        older.extend(line(3, "three"));
        std::fs::write(dir.join("activity.1.jsonl"), older).unwrap();
        let mut current = line(4, "four");
        current.extend(line(u64::MAX, "damaged"));
        current.extend(line(MAX_SEQ + 1, "damaged too"));
        current.extend(line(5, "five"));
        // The last line cut short by a crash.
        current.extend_from_slice(&line(6, "six")[..20]);
        std::fs::write(dir.join(FILE_NAME), current).unwrap();

        let settings = FileSettings {
            dir: dir.clone(),
            file_size: 1 << 20,
            files: 3,
        };
        let log = ActivityLog::with_files(100, Severity::Info, settings).unwrap();
        let all = log.query(&Filter::default());
        let messages: Vec<&str> = all.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(&messages[..5], ["one", "two", "three", "four", "five"]);
        // One entry says what was skipped, where, and why.
        let report = &all[5];
        assert_eq!(
            (report.number.as_str(), report.severity, report.seq),
            ("BIP1011", Severity::Error, 6)
        );
        assert_eq!(report.tags["count"], 5, "{report:?}");
        assert_eq!(report.tags["files"]["activity.1.jsonl"], 2);
        assert_eq!(report.tags["files"][FILE_NAME], 3);
        assert!(
            report
                .message
                .contains("activity.1.jsonl: 1 not UTF-8, 1 not an activity-log entry")
                && report
                    .message
                    .contains("2 a sequence number beyond 2^53 - 1"),
            "{}",
            report.message
        );
        assert_eq!(all.len(), 6);
        // The counter goes on from the largest number that was read, not from 0.
        log.record(NewEntry::new(Severity::Info, 1, "Flow", "f", "", "next"));
        assert_eq!(log.last_seq(), 7);
        // Files that read back cleanly make no report.
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
        let log = ActivityLog::with_files(
            100,
            Severity::Info,
            FileSettings {
                dir: dir.clone(),
                file_size: 1 << 20,
                files: 3,
            },
        )
        .unwrap();
        assert!(log.query(&Filter::default()).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn credentials_in_urls_are_hidden() {
        assert_eq!(redact("tcp://user:s3cret@host:1883"), "tcp://***@host:1883");
        assert_eq!(
            redact("failed to connect to 'ssl://u:p@h:8883/x' and tcp://h:1"),
            "failed to connect to 'ssl://***@h:8883/x' and tcp://h:1"
        );
        assert_eq!(redact("no url here: a@b"), "no url here: a@b");
        let log = ActivityLog::new(10, Severity::Info);
        log.record(
            NewEntry::new(
                Severity::Error,
                12096,
                "MQTT",
                "f",
                "n",
                "to tcp://a:pw@h:1 failed",
            )
            .tag("url", "tcp://a:pw@h:1"),
        );
        let e = &log.query(&Filter::default())[0];
        assert!(
            !e.message.contains("pw") && e.tags["url"] == "tcp://***@h:1",
            "{e:?}"
        );
    }

    #[test]
    fn since_filters_by_time() {
        let log = ActivityLog::new(10, Severity::Info);
        log.record(NewEntry::new(Severity::Info, 1, "Flow", "a", "", "x"));
        let f = |since: &str| Filter {
            since: Some(since.to_string()),
            ..Filter::default()
        };
        assert_eq!(log.query(&f("2000-01-01T00:00:00.000Z")).len(), 1);
        assert_eq!(log.query(&f("2999-01-01T00:00:00.000Z")).len(), 0);
    }

    #[test]
    fn min_severity_drops_lower_entries() {
        let log = ActivityLog::new(10, Severity::Warning);
        log.record(NewEntry::new(Severity::Info, 1, "Flow", "a", "", "x"));
        assert!(log.query(&Filter::default()).is_empty());
    }
}
