//! Where a QoS 1/2 publisher keeps its publications in flight so that they survive a restart
//! (`persistence = "file"`, the default): an append-only log in a memory-mapped file that Paho
//! uses as its user persistence.
//!
//! Paho's own file persistence creates, writes, closes and later unlinks one file per
//! publication (and per PUBREL at QoS 2): about a fifth of flowbus's CPU at QoS 1/2 in the
//! bridge benchmark (docs/PERFORMANCE.md). Paho stores and removes four records per QoS 1
//! message (the command, then the sent packet) and six at QoS 2; this store copies each into a
//! shared mapping of one file (no system call), keeps the live records in memory for Paho's
//! `get`/`keys`, and starts a new file from the live records when the mapping is full. A copy
//! into a shared mapping is in the kernel's page cache at once, so a record survives a crash
//! of the daemon exactly as a `write` would (neither this store nor Paho's calls `fsync`; a
//! power loss can lose the last records of either).
//!
//! File format: the 8-byte header [`MAGIC`], then records
//! `op (1) | key length (u16 LE) | data length (u32 LE) | key | data | checksum of all before (u32 LE)`,
//! then zeros up to the file's size. A record cut short or failing its checksum ends the
//! replay.
//!
//! A log that is not entirely sound when it is opened — a header that is not [`MAGIC`],
//! bytes after the last good record, or a live record Paho could not restore (see
//! [`check_record`]: one such record made Paho refuse to create the client, and the
//! publisher never published again) — is renamed aside (`inflight.log.corrupt-<time>`), and
//! a new log starts from the records that were sound; [`LogStore::recovery`] says what was
//! kept and lost, for the connection to report.

use crate::checksum::checksum;
use flowbus_runtime::datadir::{create_private_dir_all, private_options};
use memmap2::MmapMut;
use paho_mqtt as paho;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"FBINFL02";
/// The smallest mapping (the file's size); a new file is started from the live records when
/// it is full.
pub const MIN_MAP: usize = 1 << 20;
/// The log's name inside the client's persistence directory.
pub const FILE_NAME: &str = "inflight.log";

/// The log is written front to back and never read through the mapping (the live records are
/// also kept in memory), so every `RELEASE_STEP` bytes the pages behind the write point are
/// dropped from the process (`MADV_DONTNEED`; for a shared file mapping they stay in the page
/// cache and the file). Otherwise a file's whole mapping, 1 MiB or more, would become resident
/// before each rewrite, and the daemon's memory would saw up and down by that much.
const RELEASE_STEP: usize = 64 << 10;

const PUT: u8 = 1;
const REMOVE: u8 = 2;
const HEAD: usize = 7;

/// Paho persistence on an append-only log in one directory (one client).
pub struct LogStore {
    dir: PathBuf,
    /// `dir`/[`FILE_NAME`].
    file: PathBuf,
    inner: Arc<Mutex<Inner>>,
    unacknowledged: Arc<AtomicUsize>,
    restored: Restored,
    /// Whether the client speaks MQTT v5 (Paho cannot restore v5 records otherwise).
    v5: bool,
    recovery: Arc<Mutex<Option<Recovery>>>,
}

/// What opening a log that was not sound did: the log was renamed aside and a new one started
/// from the records that were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The log.
    pub file: PathBuf,
    /// Where the unsound log was moved.
    pub aside: PathBuf,
    /// Live records that were sound and are in the new log.
    pub kept: usize,
    /// Live records Paho could not have restored, dropped from the new log.
    pub invalid: usize,
    /// Why, for the first few of those (`key: reason`).
    pub reasons: Vec<String>,
    /// Bytes after the last good record (a record cut short or damaged: how many records
    /// they held cannot be told); the whole file when its header was wrong.
    pub unreadable_bytes: usize,
    /// The file did not start with [`MAGIC`]: nothing in it could be read.
    pub bad_header: bool,
}

impl Recovery {
    /// What was found and done, in a sentence for the activity log.
    pub fn describe(&self) -> String {
        let mut found = Vec::new();
        if self.bad_header {
            found.push(format!(
                "it does not start with the header {} ({} byte(s), none of which could be read)",
                String::from_utf8_lossy(MAGIC),
                self.unreadable_bytes
            ));
        } else if self.unreadable_bytes > 0 {
            found.push(format!(
                "{} byte(s) after the last good record are cut short or damaged (how many records they held cannot be told)",
                self.unreadable_bytes
            ));
        }
        if self.invalid > 0 {
            found.push(format!(
                "{} record(s) the MQTT client could not restore ({})",
                self.invalid,
                self.reasons.join("; ")
            ));
        }
        format!(
            "The in-flight log {} is corrupt: {}. It was renamed {}; a new log was started with the {} sound record(s), and {} record(s) were lost",
            self.file.display(),
            found.join(", and "),
            self.aside.display(),
            self.kept,
            self.invalid
        )
    }
}

/// How many reasons a [`Recovery`] quotes.
const REASONS: usize = 5;

/// Checks a record before the log hands it to Paho: a key Paho writes — `c-` (a command: a
/// publication handed to the client and not yet sent), `s-` (a sent QoS 1/2 PUBLISH), `sc-`
/// (a sent PUBREL), `r-` (a received QoS 2 PUBLISH), `q-` (a received message queued), each
/// also in its MQTT v5 form (`c5-`, ...), with a number — and data of the kind the key says.
/// Paho drops some bad records itself, but a v5 record for an MQTT 3.1.1 client makes it
/// refuse to create the client (`Persistence error`), and a damaged command would be sent
/// as whatever it decodes to; so each is checked here first.
pub fn check_record(key: &str, data: &[u8], v5_client: bool) -> Result<(), String> {
    let (kind, number) = key
        .split_once('-')
        .ok_or_else(|| "not a key the MQTT client writes".to_string())?;
    let number: u32 = number
        .parse()
        .map_err(|_| "not a key the MQTT client writes".to_string())?;
    let v5 = kind.ends_with('5');
    if v5 && !v5_client {
        return Err(
            "an MQTT v5 record in the log of an MQTT 3.1.1 client (was the server's version changed while publications were in flight?)".into(),
        );
    }
    match kind {
        "s" | "s5" | "r" | "r5" => {
            let p = parse_publish(data, v5)?;
            if u32::from(p.msgid) != number {
                return Err(format!(
                    "a PUBLISH with packet id {} under its key",
                    p.msgid
                ));
            }
            Ok(())
        }
        "sc" | "sc5" => check_pubrel(data, number),
        "c" | "c5" => check_command(data, v5),
        "q" | "q5" if !data.is_empty() => Ok(()),
        "q" | "q5" => Err("empty".into()),
        _ => Err("not a key the MQTT client writes".into()),
    }
}

/// A PUBREL packet as Paho stores it: fixed header 0x62, remaining length, packet id.
fn check_pubrel(data: &[u8], number: u32) -> Result<(), String> {
    let [0x62, len, rest @ ..] = data else {
        return Err("not a PUBREL packet".into());
    };
    if usize::from(*len) != rest.len() || rest.len() < 2 || *len > 127 {
        return Err(format!(
            "a PUBREL of remaining length {len} with {} byte(s)",
            rest.len()
        ));
    }
    let id = u16::from_be_bytes([rest[0], rest[1]]);
    if u32::from(id) != number {
        return Err(format!("a PUBREL with packet id {id} under its key"));
    }
    Ok(())
}

/// A command as Paho's asynchronous client stores it (`MQTTAsync_persistCommand`, native byte
/// order): type, token, then for a PUBLISH the topic (NUL-terminated), payload length,
/// payload, QoS and retained flag, and in MQTT v5 the properties (a length, then as many
/// bytes). A SUBSCRIBE or UNSUBSCRIBE (the QoS probe's) is checked as far as its count.
fn check_command(data: &[u8], v5: bool) -> Result<(), String> {
    const PUBLISH: i32 = 3;
    const SUBSCRIBE: i32 = 8;
    const UNSUBSCRIBE: i32 = 10;
    let int = |at: usize| -> Result<i32, String> {
        data.get(at..at + 4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("a command cut short ({} byte(s))", data.len()))
    };
    match int(0)? {
        PUBLISH => {}
        SUBSCRIBE | UNSUBSCRIBE => {
            return match int(8)? {
                n if n >= 1 => Ok(()),
                n => Err(format!("a (un)subscribe command for {n} topic(s)")),
            }
        }
        t => return Err(format!("a command of unknown type {t}")),
    }
    let mut at = 8;
    let nul = data[at..]
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| "a publish command whose topic never ends".to_string())?;
    std::str::from_utf8(&data[at..at + nul])
        .map_err(|_| "a publish command whose topic is not UTF-8".to_string())?;
    at += nul + 1;
    let len = usize::try_from(int(at)?)
        .map_err(|_| "a publish command with a negative payload length".to_string())?;
    at += 4;
    if data.len() < at + len {
        return Err(format!(
            "a publish command of {len} payload byte(s) cut short"
        ));
    }
    at += len;
    let qos = int(at)?;
    let retained = int(at + 4)?;
    at += 8;
    if !(0..=2).contains(&qos) || !(0..=1).contains(&retained) {
        return Err(format!(
            "a publish command with QoS {qos} and retained flag {retained}"
        ));
    }
    let props = if v5 {
        let mut n = 0usize;
        let mut i = 0;
        loop {
            let b = *data
                .get(at + i)
                .ok_or_else(|| "a publish command without its properties".to_string())?;
            n |= usize::from(b & 0x7f) << (7 * i);
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i == 4 {
                return Err("a publish command with a bad properties length".into());
            }
        }
        i + n
    } else {
        0
    };
    if data.len() != at + props {
        return Err(format!(
            "a publish command of {} byte(s) where {} were expected",
            data.len(),
            at + props
        ));
    }
    Ok(())
}

/// The sent, unacknowledged publications a store found in its log when it was opened — from
/// before a restart: no MQTTPublish node waits for them — by key, until Paho removes them
/// (acknowledged, or dropped for a lost session).
pub type Restored = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// A QoS 1/2 publication read back from its record: the PUBLISH packet as Paho wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The packet id it had.
    pub msgid: u16,
    /// Topic.
    pub topic: String,
    /// 1 or 2.
    pub qos: u8,
    /// Retained flag.
    pub retained: bool,
    /// Payload.
    pub payload: Vec<u8>,
    /// MQTT v5 properties worth sending again (a topic alias is not: it belonged to the old
    /// connection).
    pub properties: Vec<Property>,
}

/// An MQTT v5 PUBLISH property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    /// Payload format indicator (0x01).
    PayloadFormat(u8),
    /// Message expiry interval in seconds (0x02).
    MessageExpiry(u32),
    /// Content type (0x03).
    ContentType(String),
    /// Response topic (0x08).
    ResponseTopic(String),
    /// Correlation data (0x09).
    CorrelationData(Vec<u8>),
    /// A user property (0x26).
    User(String, String),
}

/// Reads a PUBLISH packet as Paho stores it for a sent publication (key `s-`/`s5-`): fixed
/// header, remaining length, topic, packet id, v5 properties, payload.
pub fn parse_publish(rec: &[u8], v5: bool) -> Result<Publication, String> {
    struct Rd<'a>(&'a [u8]);
    impl<'a> Rd<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err(format!(
                    "cut short: {n} byte(s) wanted, {} left",
                    self.0.len()
                ));
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn u8(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }
        fn u16(&mut self) -> Result<u16, String> {
            let b = self.take(2)?;
            Ok(u16::from_be_bytes([b[0], b[1]]))
        }
        fn u32(&mut self) -> Result<u32, String> {
            let b = self.take(4)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        fn varint(&mut self) -> Result<usize, String> {
            let mut n = 0usize;
            for i in 0..4 {
                let b = self.u8()?;
                n |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    return Ok(n);
                }
            }
            Err("a variable-length integer longer than 4 bytes".into())
        }
        fn bin(&mut self) -> Result<&'a [u8], String> {
            let n = self.u16()?;
            self.take(usize::from(n))
        }
        fn text(&mut self) -> Result<String, String> {
            let b = self.bin()?;
            String::from_utf8(b.to_vec()).map_err(|_| "a string that is not UTF-8".to_string())
        }
    }
    let mut r = Rd(rec);
    let head = r.u8()?;
    if head >> 4 != 3 {
        return Err(format!("not a PUBLISH packet (type {})", head >> 4));
    }
    let qos = (head >> 1) & 3;
    if qos == 0 || qos == 3 {
        return Err(format!("QoS {qos} in a record of a sent publication"));
    }
    let len = r.varint()?;
    if r.0.len() != len {
        return Err(format!(
            "remaining length {len}, but {} byte(s) follow",
            r.0.len()
        ));
    }
    let topic = r.text()?;
    let msgid = r.u16()?;
    let mut properties = Vec::new();
    if v5 {
        let n = r.varint()?;
        let mut p = Rd(r.take(n)?);
        while !p.0.is_empty() {
            match p.u8()? {
                0x01 => properties.push(Property::PayloadFormat(p.u8()?)),
                0x02 => properties.push(Property::MessageExpiry(p.u32()?)),
                0x03 => properties.push(Property::ContentType(p.text()?)),
                0x08 => properties.push(Property::ResponseTopic(p.text()?)),
                0x09 => properties.push(Property::CorrelationData(p.bin()?.to_vec())),
                0x26 => {
                    let k = p.text()?;
                    properties.push(Property::User(k, p.text()?));
                }
                0x23 => {
                    p.u16()?;
                }
                0x0b => {
                    p.varint()?;
                }
                other => return Err(format!("unknown PUBLISH property 0x{other:02x}")),
            }
        }
    }
    if topic.is_empty() {
        return Err("no topic name (it was sent with a topic alias)".into());
    }
    Ok(Publication {
        msgid,
        topic,
        qos,
        retained: head & 1 == 1,
        payload: r.0.to_vec(),
        properties,
    })
}

/// How many publications the in-flight log in `dir` still owes, read from the file (the
/// client must be closed): commands of publications handed to the client and not yet sent
/// (`c-`), publications sent and not acknowledged (`s-`), and QoS 2 releases not yet completed
/// whose publication record is gone (`sc-`). `Ok(0)` when there is no log. A log that cannot be
/// read whole (a bad header, bytes that are not records) is an error: what it owes cannot be
/// told.
pub fn owed(dir: &Path) -> std::io::Result<usize> {
    let bytes = match std::fs::read(dir.join(FILE_NAME)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let r = replay(&bytes);
    if r.dropped > 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} byte(s) of the log cannot be read as records", r.dropped),
        ));
    }
    let sent = |n: &str| {
        ["s-", "s5-"]
            .iter()
            .any(|p| r.live.contains_key(&format!("{p}{n}")))
    };
    Ok(r.live
        .iter()
        .filter(|(k, v)| match k.split_once('-') {
            Some(("c" | "c5", _)) => v.get(..4) == Some(&3i32.to_ne_bytes()[..]),
            Some(("s" | "s5", _)) => true,
            Some(("sc" | "sc5", n)) => !sent(n),
            _ => false,
        })
        .count())
}

/// Lets the connection release a store at once: Paho closes it only when it destroys the
/// client, which flowbus does minutes after the connection closed (see `CLOSED_CLIENTS` in
/// `mqtt::reaper`); until then a closed publisher would keep its mapping and open file, and a
/// new connection with the same id would share them.
#[derive(Clone)]
pub struct Release(Arc<Mutex<Inner>>);

impl Release {
    /// Unmaps the log and forgets the live records (the file keeps them for the next client
    /// with this id). Anything Paho still asks of the store afterwards fails.
    pub fn release(&self) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.map = None;
        inner.live = foldhash::HashMap::default();
        inner.buf = Vec::new();
        inner.end = 0;
        inner.released = 0;
    }
}

/// Whether a Paho persistence key is a QoS 1/2 publish that was sent and not yet acknowledged
/// (`s-`, `s5-`): the broker may not have it. (A QoS 2 release, `sc-`, means it does.)
fn unacknowledged(key: &str) -> bool {
    key.starts_with("s-") || key.starts_with("s5-")
}

#[derive(Default)]
struct Inner {
    map: Option<MmapMut>,
    /// Where the next record goes.
    end: usize,
    /// The mapping's pages before this offset have been handed back (see [`RELEASE_STEP`]).
    released: usize,
    live: foldhash::HashMap<String, Vec<u8>>,
    buf: Vec<u8>,
}

fn encode(buf: &mut Vec<u8>, op: u8, key: &str, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    buf.clear();
    buf.push(op);
    buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
    let sum = checksum(buf);
    buf.extend_from_slice(&sum.to_le_bytes());
}

/// What a replay found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Live records.
    pub live: foldhash::HashMap<String, Vec<u8>>,
    /// Bytes of valid log.
    pub good: usize,
    /// Bytes after the last valid record (a record cut short or corrupt).
    pub dropped: usize,
}

/// Reads a log's records.
pub fn replay(bytes: &[u8]) -> Replay {
    let mut r = Replay::default();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        r.dropped = bytes.len();
        return r;
    }
    let mut at = MAGIC.len();
    while at + HEAD <= bytes.len() {
        let op = bytes[at];
        if op == 0 {
            break;
        }
        let klen = u16::from_le_bytes([bytes[at + 1], bytes[at + 2]]) as usize;
        let dlen = u32::from_le_bytes(bytes[at + 3..at + 7].try_into().expect("4 bytes")) as usize;
        let end = at + HEAD + klen + dlen;
        if end + 4 > bytes.len() {
            break;
        }
        let sum = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
        let key = std::str::from_utf8(&bytes[at + HEAD..at + HEAD + klen]);
        let (true, Ok(key)) = (sum == checksum(&bytes[at..end]), key) else {
            break;
        };
        match op {
            PUT => {
                r.live
                    .insert(key.to_owned(), bytes[at + HEAD + klen..end].to_vec());
            }
            REMOVE => {
                r.live.remove(key);
            }
            _ => break,
        }
        at = end + 4;
    }
    r.good = at;
    // The unused end of the file is zeros; anything else there is a record that was cut short
    // or damaged.
    r.dropped = match bytes[at..].iter().rposition(|b| *b != 0) {
        Some(last) => last + 1,
        None => 0,
    };
    r
}

impl LogStore {
    /// A store whose log lives in `dir` (created on open), for an MQTT 3.1.1 client.
    pub fn new(dir: PathBuf) -> LogStore {
        LogStore {
            file: dir.join(FILE_NAME),
            dir,
            inner: Arc::default(),
            unacknowledged: Arc::default(),
            restored: Arc::default(),
            v5: false,
            recovery: Arc::default(),
        }
    }

    /// For a client that speaks MQTT v5 (`true`) or 3.1.1: which records Paho can restore.
    pub fn mqtt_v5(mut self, v5: bool) -> LogStore {
        self.v5 = v5;
        self
    }

    /// Where opening the log puts what it did with a log that was not sound (see
    /// [`Recovery`]); empty until then, and when the log was sound.
    pub fn recovery(&self) -> Arc<Mutex<Option<Recovery>>> {
        self.recovery.clone()
    }

    /// The sent publications restored from the log at open and not removed since (see
    /// [`Restored`]). Paho drops them, as all it has in flight, when the broker answers a
    /// connect with no session; the connection reads them before it connects, to send them
    /// again then.
    pub fn restored(&self) -> Restored {
        self.restored.clone()
    }

    fn restored_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.restored.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle that releases the store's memory and file (see [`Release`]).
    pub fn releaser(&self) -> Release {
        Release(self.inner.clone())
    }

    /// How many sent publications the store holds that the broker has not acknowledged.
    /// When the broker answers a reconnect with no session for the client (`sessionPresent`
    /// 0), Paho removes exactly these without a word to anyone: the connection reads this
    /// before it connects, to report them.
    pub fn unacknowledged(&self) -> Arc<AtomicUsize> {
        self.unacknowledged.clone()
    }

    fn count(&self, live: &foldhash::HashMap<String, Vec<u8>>) {
        let n = live.keys().filter(|k| unacknowledged(k)).count();
        self.unacknowledged.store(n, Ordering::Relaxed);
    }

    fn path(&self) -> &Path {
        &self.file
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> paho::Error {
    tracing::error!("MQTT persistence: cannot {what} {}: {e}", path.display());
    paho::Error::PersistenceError
}

impl Inner {
    /// Appends the record in `buf`, or starts a new file from the live records (which the
    /// caller has already updated) when it does not fit.
    fn append(&mut self, path: &Path) -> paho::Result<()> {
        let Some(map) = self.map.as_mut() else {
            tracing::error!("MQTT persistence {}: used before open", path.display());
            return Err(paho::Error::PersistenceError);
        };
        let n = self.buf.len();
        if self.end + n <= map.len() {
            map[self.end..self.end + n].copy_from_slice(&self.buf);
            self.end += n;
            let behind = self.end - self.end % RELEASE_STEP;
            if behind > self.released {
                // SAFETY: nothing holds a reference into the range (the mapping is only
                // copied into, under the lock), and for a shared file mapping the pages'
                // contents stay in the file: a later access would read them back.
                let dropped = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        self.released,
                        behind - self.released,
                    )
                };
                // Only memory is at stake: on failure the pages stay until the next rewrite.
                if dropped.is_ok() {
                    self.released = behind;
                }
            }
            return Ok(());
        }
        self.rewrite(path)
    }

    /// Writes the live records to a new file, puts it in place of the old one and maps it.
    fn rewrite(&mut self, path: &Path) -> paho::Result<()> {
        let tmp = path.with_extension("log.tmp");
        let mut out = MAGIC.to_vec();
        for (k, v) in &self.live {
            encode(&mut self.buf, PUT, k, &[v]);
            out.extend_from_slice(&self.buf);
        }
        // Room for at least as much again as is live.
        let size = (out.len() * 2).max(MIN_MAP).next_multiple_of(64 << 10);
        let write = || -> std::io::Result<MmapMut> {
            let f = private_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            (&f).write_all(&out)?;
            allocate(&f, size)?;
            std::fs::rename(&tmp, path)?;
            // SAFETY: the file is ours (a private directory per client) and is only changed
            // through this mapping while the store is open.
            unsafe { MmapMut::map_mut(&f) }
        };
        let map = write().map_err(|e| io_err("start a new log at", path, e))?;
        if let Some(old) = self.map.replace(map) {
            unmap_later(old);
        }
        self.end = out.len();
        self.released = 0;
        Ok(())
    }
}

/// Unmaps a replaced log on a thread of its own. The old file was just renamed over, so the
/// unmap is its last reference: the kernel frees its pages and blocks then, about half a
/// millisecond for a 1 MiB log — and `put` runs under Paho's lock, which every publication of
/// the client waits for. The old mapping is not read or written again; if the thread cannot be
/// had, it is unmapped here. At most eight wait for the thread (one per MiB of records, per
/// client): beyond that the caller waits. The input journal hands it its full segments too.
pub(crate) fn unmap_later(old: MmapMut) {
    static UNMAPPER: Mutex<Option<std::sync::mpsc::SyncSender<MmapMut>>> = Mutex::new(None);
    let mut tx = UNMAPPER.lock().unwrap_or_else(|e| e.into_inner());
    if tx.is_none() {
        let (send, recv) = std::sync::mpsc::sync_channel::<MmapMut>(8);
        let started = std::thread::Builder::new()
            .name("flowbus-unmap".into())
            .spawn(move || recv.into_iter().for_each(drop));
        if started.is_ok() {
            *tx = Some(send);
        }
    }
    match tx.as_ref() {
        // A send fails only if the thread is gone; the mapping comes back and is dropped here.
        Some(t) => drop(t.send(old)),
        None => drop(old),
    }
}

/// Gives the file `size` bytes of disk now. A store into a shared mapping of a file that has
/// no room on disk kills the process (SIGBUS); allocating up front turns a full disk into an
/// error here instead, which fails the publication that needed the space, visibly.
pub(crate) fn allocate(f: &std::fs::File, size: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a file descriptor we own for its duration.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    Err(std::io::Error::from_raw_os_error(rc))
}

/// Paho's own file store kept publications in `<dir>/<client id>-<server URI, ':' → '-'>/`,
/// one `<key>.msg` file each: what flowbus used before this store. Reads them in so nothing in
/// flight is lost on an upgrade.
fn import_paho_files(dir: &Path, client_id: &str, server_uri: &str) -> Vec<(String, Vec<u8>)> {
    let old = dir.join(format!("{client_id}-{}", server_uri.replace(':', "-")));
    let Ok(entries) = std::fs::read_dir(&old) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let Some(key) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".msg"))
        else {
            continue;
        };
        match std::fs::read(&p) {
            Ok(data) => found.push((key.to_owned(), data)),
            Err(e) => tracing::error!(
                "MQTT persistence: cannot read {} (left in place): {e}",
                p.display()
            ),
        }
    }
    found
}

impl paho::ClientPersistence for LogStore {
    fn open(&mut self, client_id: &str, server_uri: &str) -> paho::Result<()> {
        let path = self.path();
        create_private_dir_all(&self.dir).map_err(|e| io_err("create", &self.dir, e))?;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("read", path, e)),
        };
        let mut r = replay(&bytes);
        let bad_header = !bytes.is_empty() && !bytes.starts_with(MAGIC);
        let mut reasons = Vec::new();
        let v5 = self.v5;
        r.live.retain(|k, v| match check_record(k, v, v5) {
            Ok(()) => true,
            Err(why) => {
                reasons.push(format!("{k}: {why}"));
                false
            }
        });
        if bad_header || r.dropped > 0 || !reasons.is_empty() {
            // Kept for whoever wants to look; the client goes on with what was sound.
            let stamp = flowbus_runtime::time::now_rfc3339().replace([':', '.'], "-");
            let mut aside = self.dir.join(format!("{FILE_NAME}.corrupt-{stamp}"));
            // Never over one put aside before (the directory is this client's alone).
            for n in 2.. {
                if !aside.exists() {
                    break;
                }
                aside = self.dir.join(format!("{FILE_NAME}.corrupt-{stamp}-{n}"));
            }
            std::fs::rename(path, &aside)
                .map_err(|e| io_err("rename aside the corrupt log", path, e))?;
            reasons.sort();
            let invalid = reasons.len();
            reasons.truncate(REASONS);
            if invalid > REASONS {
                reasons.push(format!("{} more", invalid - REASONS));
            }
            *self.recovery.lock().unwrap_or_else(|e| e.into_inner()) = Some(Recovery {
                file: path.to_path_buf(),
                aside,
                kept: r.live.len(),
                invalid,
                reasons,
                unreadable_bytes: r.dropped,
                bad_header,
            });
        }
        let imported = import_paho_files(&self.dir, client_id, server_uri);
        let mut inner = self.lock();
        inner.live = r.live;
        for (k, v) in &imported {
            inner.live.insert(k.clone(), v.clone());
        }
        // Start from a compact log holding exactly the live records.
        inner.rewrite(path)?;
        self.count(&inner.live);
        *self.restored_lock() = inner
            .live
            .iter()
            .filter(|(k, _)| unacknowledged(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        drop(inner);
        if !imported.is_empty() {
            let old = self
                .dir
                .join(format!("{client_id}-{}", server_uri.replace(':', "-")));
            tracing::info!(
                "MQTT persistence {}: took over {} publication record(s) from Paho's file store \
                 in {}",
                path.display(),
                imported.len(),
                old.display()
            );
            for (k, _) in &imported {
                let _ = std::fs::remove_file(old.join(format!("{k}.msg")));
            }
        }
        Ok(())
    }

    fn close(&mut self) -> paho::Result<()> {
        let mut inner = self.lock();
        if let Some(map) = inner.map.take() {
            if inner.live.is_empty() {
                // Nothing in flight: leave just the header behind.
                drop(map);
                let _ = OpenOptions::new()
                    .write(true)
                    .open(self.path())
                    .and_then(|f| f.set_len(MAGIC.len() as u64));
            }
        }
        inner.live.clear();
        inner.end = 0;
        self.unacknowledged.store(0, Ordering::Relaxed);
        self.restored_lock().clear();
        Ok(())
    }

    fn put(&mut self, key: &str, buffers: Vec<&[u8]>) -> paho::Result<()> {
        let path = self.path();
        let mut inner = self.lock();
        let inner = &mut *inner;
        encode(&mut inner.buf, PUT, key, &buffers);
        let old = inner.live.insert(key.to_owned(), buffers.concat());
        if let Err(e) = inner.append(path) {
            // Not stored: Paho fails the publish, and the store stays as it was.
            match old {
                Some(v) => inner.live.insert(key.to_owned(), v),
                None => inner.live.remove(key),
            };
            return Err(e);
        }
        if old.is_none() && unacknowledged(key) {
            self.unacknowledged.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn get(&mut self, key: &str) -> paho::Result<Vec<u8>> {
        self.lock()
            .live
            .get(key)
            .cloned()
            .ok_or(paho::Error::PersistenceError)
    }

    fn remove(&mut self, key: &str) -> paho::Result<()> {
        let path = self.path();
        let mut inner = self.lock();
        if inner.live.remove(key).is_none() {
            return Ok(());
        }
        if unacknowledged(key) {
            self.unacknowledged.fetch_sub(1, Ordering::Relaxed);
            self.restored_lock().remove(key);
        }
        encode(&mut inner.buf, REMOVE, key, &[]);
        inner.append(path)
    }

    fn keys(&mut self) -> paho::Result<Vec<String>> {
        Ok(self.lock().live.keys().cloned().collect())
    }

    fn clear(&mut self) -> paho::Result<()> {
        let path = self.path();
        let mut inner = self.lock();
        inner.live.clear();
        self.unacknowledged.store(0, Ordering::Relaxed);
        self.restored_lock().clear();
        if inner.map.is_some() {
            inner.rewrite(path)?;
        }
        Ok(())
    }

    fn contains_key(&mut self, key: &str) -> bool {
        self.lock().live.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paho::ClientPersistence;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowbus-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A QoS 1 PUBLISH command as Paho's asynchronous client stores it (MQTT 3.1.1): type,
    /// token, topic, payload length, payload, QoS, retained flag.
    fn command(topic: &str, payload: &[u8]) -> Vec<u8> {
        let mut c = 3i32.to_ne_bytes().to_vec();
        c.extend_from_slice(&1i32.to_ne_bytes());
        c.extend_from_slice(topic.as_bytes());
        c.push(0);
        c.extend_from_slice(&(payload.len() as i32).to_ne_bytes());
        c.extend_from_slice(payload);
        c.extend_from_slice(&1i32.to_ne_bytes());
        c.extend_from_slice(&0i32.to_ne_bytes());
        c
    }

    /// A sent QoS 1 PUBLISH with this packet id.
    fn sent(msgid: u16, payload: &[u8]) -> Vec<u8> {
        packet(0x32, "t", msgid, None, payload)
    }

    /// Puts `n` publication commands `c-0`, `c-1`, ..., removing each once 20 newer ones are
    /// in; each carries `data`.
    fn through_a_window(s: &mut LogStore, n: u32, data: &[u8]) {
        let data = command("t", data);
        for i in 0..n {
            s.put(&format!("c-{i}"), vec![&data]).unwrap();
            if i >= 20 {
                s.remove(&format!("c-{}", i - 20)).unwrap();
            }
        }
    }

    fn opened(d: &Path) -> LogStore {
        let mut s = LogStore::new(d.to_path_buf());
        s.open("cid", "tcp://127.0.0.1:1883").unwrap();
        s
    }

    #[test]
    fn survives_reopen_with_puts_and_removes() {
        let d = dir("reopen");
        let mut s = opened(&d);
        let c1 = command("t", b"abcd");
        s.put("c-1", vec![&c1[..10], &c1[10..]]).unwrap();
        s.put("c-2", vec![&command("t", b"xyz")]).unwrap();
        s.put("s-3", vec![&sent(3, b"123")]).unwrap();
        s.remove("c-2").unwrap();
        s.remove("nothing").unwrap();
        assert_eq!(s.get("c-1").unwrap(), c1);
        assert!(s.get("c-2").is_err());
        // A crash: the store is not closed.
        let mut again = opened(&d);
        let mut keys = again.keys().unwrap();
        keys.sort();
        assert_eq!(keys, ["c-1", "s-3"]);
        assert_eq!(again.get("c-1").unwrap(), c1);
        assert_eq!(*again.recovery().lock().unwrap(), None);
        assert!(again.contains_key("s-3") && !again.contains_key("c-2"));
        // Reopening compacts: only the two live records are left in the file.
        let r = replay(&std::fs::read(d.join(FILE_NAME)).unwrap());
        assert_eq!(r.live.len(), 2);
        assert_eq!(r.dropped, 0);
        again.clear().unwrap();
        assert!(opened(&d).keys().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The logs put aside in `d`, oldest first.
    fn asides(d: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("inflight.log.corrupt-"))
            })
            .collect();
        found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        found
    }

    fn recovery(s: &LogStore) -> Option<Recovery> {
        s.recovery().lock().unwrap().clone()
    }

    #[test]
    fn a_log_that_is_not_sound_is_put_aside_and_its_sound_records_kept() {
        let d = dir("corrupt");
        let path = d.join(FILE_NAME);
        let mut s = opened(&d);
        s.put("s-1", vec![&sent(1, b"first")]).unwrap();
        s.put("s-2", vec![&sent(2, b"second")]).unwrap();
        drop(s);
        let full = std::fs::read(&path).unwrap();
        let used = replay(&full).good;

        // The last record cut short (a crash in the middle of copying it): the first is kept.
        let mut torn = full.clone();
        torn[used - 3..].fill(0);
        std::fs::write(&path, &torn).unwrap();
        let s = &mut opened(&d);
        assert_eq!(s.keys().unwrap(), ["s-1"]);
        let r = recovery(s).expect("a recovery");
        assert_eq!((r.kept, r.invalid, r.bad_header), (1, 0, false), "{r:?}");
        assert!(r.unreadable_bytes > 0);
        assert!(
            r.describe().contains("cut short or damaged"),
            "{}",
            r.describe()
        );
        assert_eq!(asides(&d).len(), 1);
        assert_eq!(
            std::fs::read(&asides(&d)[0]).unwrap(),
            torn,
            "kept as it was"
        );
        assert_eq!(r.aside, asides(&d)[0]);

        // A byte of the first record's data flipped: its checksum fails, nothing is trusted.
        let mut bad = std::fs::read(&path).unwrap();
        bad[MAGIC.len() + HEAD + 3 + 1] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let s = &mut opened(&d);
        assert!(s.keys().unwrap().is_empty());
        assert_eq!(recovery(s).map(|r| r.kept), Some(0));
        assert_eq!(asides(&d).len(), 2);

        // Not a log at all.
        std::fs::write(&path, b"PK\x03\x04 something else").unwrap();
        let s = &mut opened(&d);
        assert!(s.keys().unwrap().is_empty());
        let r = recovery(s).expect("a recovery");
        assert!(r.bad_header && r.unreadable_bytes == 19, "{r:?}");
        assert!(
            r.describe()
                .contains("does not start with the header FBINFL02"),
            "{}",
            r.describe()
        );
        assert_eq!(asides(&d).len(), 3);

        // Records whose checksums are right but which the client could not restore: three
        // bytes of nothing, and an MQTT v5 record in a 3.1.1 client's log (Paho refused to
        // create the client for that one, and the publisher never published again).
        let mut s = opened(&d);
        s.put("s-1", vec![&sent(1, b"kept")]).unwrap();
        s.put("s-2", vec![b"abc"]).unwrap();
        s.put("s5-3", vec![&packet(0x32, "t", 3, Some(&[]), b"v5")])
            .unwrap();
        drop(s);
        let s = &mut opened(&d);
        assert_eq!(s.keys().unwrap(), ["s-1"]);
        let r = recovery(s).expect("a recovery");
        assert_eq!((r.kept, r.invalid, r.unreadable_bytes), (1, 2, 0), "{r:?}");
        assert!(
            r.reasons[0].starts_with("s-2: ")
                && r.reasons[1].starts_with("s5-3: an MQTT v5 record"),
            "{:?}",
            r.reasons
        );
        assert!(r
            .describe()
            .contains("2 record(s) the MQTT client could not restore"));
        assert_eq!(asides(&d).len(), 4);
        // A v5 client keeps v5 records.
        let mut s = LogStore::new(d.clone()).mqtt_v5(true);
        s.put("s5-3", vec![]).unwrap_err();
        s.open("cid", "tcp://127.0.0.1:1883").unwrap();
        s.put("s5-3", vec![&packet(0x32, "t", 3, Some(&[]), b"v5")])
            .unwrap();
        drop(s);
        let mut s = LogStore::new(d.clone()).mqtt_v5(true);
        s.open("cid", "tcp://127.0.0.1:1883").unwrap();
        assert_eq!(s.keys().unwrap().len(), 2);
        assert_eq!(recovery(&s), None);
        // A sound log is left alone; so is a file of the header and zeros (an empty log).
        let r = replay(&std::fs::read(&path).unwrap());
        assert_eq!(r.dropped, 0);
        assert_eq!(asides(&d).len(), 4);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn records_are_checked_for_what_their_key_says() {
        let ok = |k: &str, d: &[u8]| check_record(k, d, false);
        let no = |k: &str, d: &[u8]| check_record(k, d, false).unwrap_err();
        assert_eq!(ok("s-7", &sent(7, b"x")), Ok(()));
        assert!(no("s-8", &sent(7, b"x")).contains("packet id 7"));
        assert!(no("s-7", b"abc").contains("not a PUBLISH"));
        assert!(no("s-7", &[0x32, 5, 0]).contains("remaining length 5"));
        assert_eq!(ok("r-4", &packet(0x34, "t", 4, None, b"")), Ok(()));
        assert_eq!(ok("sc-5", &[0x62, 2, 0, 5]), Ok(()));
        assert!(no("sc-5", &[0x62, 2, 0, 6]).contains("packet id 6"));
        assert!(no("sc-5", &[0x60, 2, 0, 5]).contains("not a PUBREL"));
        assert!(no("sc-5", &[0x62, 3, 0, 5]).contains("remaining length 3"));
        assert_eq!(ok("c-1", &command("a/b", b"payload")), Ok(()));
        assert!(no("c-1", b"abc").contains("cut short"));
        let mut c = command("a/b", b"payload");
        c[0] = 99;
        assert!(no("c-1", &c).contains("unknown type 99"));
        let mut c = command("a/b", b"payload");
        let at = c.len() - 8;
        c[at] = 3;
        assert!(no("c-1", &c).contains("QoS 3"));
        let mut c = command("a/b", b"payload");
        c.push(0);
        assert!(no("c-1", &c).contains("expected"));
        // In MQTT v5 a command ends with its properties.
        let mut c5 = command("a/b", b"p");
        assert!(check_record("c5-1", &c5, true)
            .unwrap_err()
            .contains("without its properties"));
        c5.extend_from_slice(&[3, 1, 2, 3]);
        assert_eq!(check_record("c5-1", &c5, true), Ok(()));
        assert!(no("c5-1", &c5).contains("MQTT v5 record"));
        assert!(no("zz-1", b"x").contains("not a key"));
        assert!(no("s-x", b"x").contains("not a key"));
        assert!(no("q-1", b"").contains("empty"));
        assert_eq!(ok("q-1", b"x"), Ok(()));
    }

    #[test]
    fn what_a_log_still_owes_is_counted_from_the_file() {
        let d = dir("owed");
        assert_eq!(owed(&d).unwrap(), 0, "no log, nothing owed");
        let mut s = opened(&d);
        assert_eq!(owed(&d).unwrap(), 0);
        s.put("c-1", vec![&command("t", b"queued")]).unwrap();
        s.put("s-2", vec![&sent(2, b"sent")]).unwrap();
        // A QoS 2 publication whose release was sent: one publication, not two.
        s.put("s-3", vec![&sent(3, b"released")]).unwrap();
        s.put("sc-3", vec![&[0x62, 2, 0, 3]]).unwrap();
        // A release whose publication record is gone: still owed its completion.
        s.put("sc-4", vec![&[0x62, 2, 0, 4]]).unwrap();
        // Not publications: a probe subscription's command, a received QoS 2 message.
        let mut subscribe = 8i32.to_ne_bytes().to_vec();
        subscribe.extend_from_slice(&[0; 4]);
        subscribe.extend_from_slice(&1i32.to_ne_bytes());
        s.put("c-5", vec![&subscribe]).unwrap();
        s.put("r-6", vec![&packet(0x34, "t", 6, None, b"in")])
            .unwrap();
        assert_eq!(owed(&d).unwrap(), 4);
        for k in ["c-1", "s-2", "s-3", "sc-3", "sc-4"] {
            s.remove(k).unwrap();
        }
        assert_eq!(owed(&d).unwrap(), 0);
        drop(s);
        std::fs::write(d.join(FILE_NAME), b"damaged").unwrap();
        assert!(
            owed(&d).is_err(),
            "a log that cannot be read owes what cannot be told"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The checks agree with what Paho writes: a client that never connects, publishing while
    /// disconnected, stores its commands in the log.
    #[test]
    fn the_records_paho_writes_pass_the_checks() {
        for v5 in [false, true] {
            let d = dir(&format!("paho-{v5}"));
            let create = paho::CreateOptionsBuilder::new()
                .server_uri("tcp://127.0.0.1:1")
                .client_id("cid")
                .user_persistence(LogStore::new(d.clone()).mqtt_v5(v5))
                .send_while_disconnected(true)
                .allow_disconnected_send_at_anytime(true)
                .mqtt_version(if v5 { 5 } else { 4 })
                .finalize();
            let client = paho::AsyncClient::new(create).unwrap();
            let mut m = paho::MessageBuilder::new()
                .topic("a/b")
                .payload(b"hello".to_vec())
                .qos(1)
                .retained(true);
            if v5 {
                let mut p = paho::Properties::new();
                p.push_string_pair(paho::PropertyCode::UserProperty, "k", "v")
                    .unwrap();
                m = m.properties(p);
            }
            drop(client.publish(m.finalize()));
            drop(client.publish(paho::Message::new("x", Vec::new(), 2)));
            let live = replay(&std::fs::read(d.join(FILE_NAME)).unwrap()).live;
            assert_eq!(live.len(), 2, "{live:?}");
            for (k, v) in &live {
                assert!(k.starts_with(if v5 { "c5-" } else { "c-" }), "{k}");
                assert_eq!(check_record(k, v, v5), Ok(()), "{k}: {v:?}");
            }
            drop(client);
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    #[test]
    fn the_log_stays_small_under_steady_traffic() {
        let d = dir("compact");
        let mut s = opened(&d);
        let data = vec![7u8; 300];
        // A window of 20 in flight, 40,000 publications through it (~13 MB of records).
        through_a_window(&mut s, 40_000, &data);
        let len = std::fs::metadata(d.join(FILE_NAME)).unwrap().len();
        assert_eq!(len, MIN_MAP as u64, "the log keeps its size");
        let again = &mut opened(&d);
        assert_eq!(again.keys().unwrap().len(), 20);
        assert_eq!(again.get("c-39999").unwrap(), command("t", &data));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The resident size of this process's mapping of `path` (from /proc/self/smaps).
    fn resident_kib(path: &Path) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_str().unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            if line.ends_with(name) {
                let rss = lines.find(|l| l.starts_with("Rss:"))?;
                return rss.split_whitespace().nth(1)?.parse().ok();
            }
        }
        None
    }

    #[test]
    fn pages_behind_the_write_point_leave_the_process() {
        let d = dir("resident");
        let mut s = opened(&d);
        let data = vec![7u8; 300];
        // ~900 KiB of records through a window of 20: most of the 1 MiB file, no rewrite.
        through_a_window(&mut s, 2_800, &data);
        let path = d.join(FILE_NAME);
        let written = replay(&std::fs::read(&path).unwrap()).good;
        assert!(written > 800 << 10, "{written} bytes written");
        let kib = resident_kib(&path).expect("the log is mapped");
        assert!(
            kib <= (RELEASE_STEP as u64 >> 10) + 4,
            "{kib} KiB of the log resident after {} KiB written",
            written >> 10
        );
        // What left memory is still in the file.
        let again = &mut opened(&d);
        assert_eq!(again.keys().unwrap().len(), 20);
        assert_eq!(again.get("c-2799").unwrap(), command("t", &data));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn replaced_logs_are_unmapped_by_a_thread_of_their_own() {
        let d = dir("unmap");
        let mut s = opened(&d);
        // ~2.6 MiB of records through a window of 20: two or three new files.
        through_a_window(&mut s, 9_000, &[3u8; 300]);
        let name = d.join(FILE_NAME).to_str().unwrap().to_owned();
        let mappings = || {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&name))
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while mappings() > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(mappings(), 1, "replaced logs still mapped");
        let unmapper = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "flowbus-unmap")
            });
        assert!(
            unmapper,
            "no flowbus-unmap thread: the old logs were unmapped inline"
        );
        let again = &mut opened(&d);
        assert_eq!(again.keys().unwrap().len(), 20);
        assert_eq!(again.get("c-8999").unwrap(), command("t", &[3u8; 300]));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn sent_publications_found_at_open_are_restored_until_removed() {
        let d = dir("restored");
        let v5 = |d: &Path| {
            let mut s = LogStore::new(d.to_path_buf()).mqtt_v5(true);
            s.open("cid", "tcp://127.0.0.1:1883").unwrap();
            s
        };
        let mut s = v5(&d);
        s.put("c-1", vec![&command("t", b"command")]).unwrap();
        s.put("s-1", vec![&sent(1, b"one")]).unwrap();
        s.put("s5-2", vec![&packet(0x32, "t", 2, Some(&[]), b"two")])
            .unwrap();
        s.put("sc-3", vec![&[0x62, 2, 0, 3]]).unwrap();
        assert!(
            s.restored().lock().unwrap().is_empty(),
            "nothing from before"
        );
        drop(s);
        let mut again = v5(&d);
        let restored = again.restored();
        let keys = |r: &Restored| r.lock().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&restored), ["s-1", "s5-2"]);
        assert_eq!(restored.lock().unwrap()["s-1"], sent(1, b"one"));
        again.put("s-4", vec![&sent(4, b"new")]).unwrap();
        again.remove("s-1").unwrap();
        assert_eq!(keys(&restored), ["s5-2"]);
        again.clear().unwrap();
        assert!(keys(&restored).is_empty());
    }

    /// A PUBLISH packet as Paho writes it: fixed header, remaining length, topic, packet id,
    /// (v5) properties, payload.
    fn packet(head: u8, topic: &str, msgid: u16, props: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&msgid.to_be_bytes());
        if let Some(p) = props {
            body.push(p.len() as u8);
            body.extend_from_slice(p);
        }
        body.extend_from_slice(payload);
        assert!(body.len() < 128);
        let mut v = vec![head, body.len() as u8];
        v.extend(body);
        v
    }

    #[test]
    fn sent_publications_read_back_from_their_records() {
        let p = parse_publish(&packet(0x33, "a/b", 7, None, b"hi"), false).unwrap();
        assert_eq!(
            p,
            Publication {
                msgid: 7,
                topic: "a/b".into(),
                qos: 1,
                retained: true,
                payload: b"hi".to_vec(),
                properties: vec![],
            }
        );
        let mut props = vec![0x01, 1, 0x02, 0, 0, 0, 60, 0x23, 0, 3];
        for (id, text) in [(0x03u8, "application/json"), (0x08, "r/t")] {
            props.push(id);
            props.extend_from_slice(&(text.len() as u16).to_be_bytes());
            props.extend_from_slice(text.as_bytes());
        }
        props.extend_from_slice(&[0x09, 0, 2, 1, 2, 0x26, 0, 1, b'k', 0, 1, b'v']);
        let p = parse_publish(&packet(0x3c, "x", 9, Some(&props), b"{}"), true).unwrap();
        assert_eq!(
            (p.qos, p.retained, p.msgid, p.payload.as_slice()),
            (2, false, 9, &b"{}"[..])
        );
        assert_eq!(
            p.properties,
            [
                Property::PayloadFormat(1),
                Property::MessageExpiry(60),
                Property::ContentType("application/json".into()),
                Property::ResponseTopic("r/t".into()),
                Property::CorrelationData(vec![1, 2]),
                Property::User("k".into(), "v".into()),
            ]
        );
        let err = |rec: &[u8], v5| parse_publish(rec, v5).unwrap_err();
        assert!(err(&[0x62, 2, 0, 1], false).contains("not a PUBLISH"));
        assert!(err(&packet(0x30, "a", 1, None, b""), false).contains("QoS 0"));
        let mut short = packet(0x32, "a/b", 7, None, b"hi");
        short.pop();
        assert!(err(&short, false).contains("remaining length"));
        assert!(err(&packet(0x32, "", 1, Some(&[0x23, 0, 3]), b""), true).contains("topic alias"));
    }

    #[test]
    fn counts_sent_publications_not_yet_acknowledged() {
        let d = dir("unacked");
        let mut s = opened(&d);
        let n = s.unacknowledged();
        let now = || n.load(Ordering::SeqCst);
        s.put("c-1", vec![&command("t", b"command")]).unwrap();
        assert_eq!(now(), 0);
        s.put("s-1", vec![&sent(1, b"sent")]).unwrap();
        s.remove("c-1").unwrap();
        s.put("s-2", vec![&sent(2, b"sent")]).unwrap();
        s.put("s-2", vec![&sent(2, b"sent again")]).unwrap();
        s.put("sc-3", vec![&[0x62, 2, 0, 3]]).unwrap();
        s.put("r-4", vec![&packet(0x34, "t", 4, None, b"received")])
            .unwrap();
        assert_eq!(now(), 2);
        s.remove("s-1").unwrap();
        s.remove("s-1").unwrap();
        assert_eq!(now(), 1);
        // After a restart the count comes from the log.
        let again = opened(&d);
        assert_eq!(again.unacknowledged().load(Ordering::SeqCst), 1);
        s.clear().unwrap();
        assert_eq!(now(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_released_store_holds_no_mapping_and_refuses_work() {
        let d = dir("release");
        let mut s = opened(&d);
        s.put("s-1", vec![&sent(1, b"in flight")]).unwrap();
        let r = s.releaser();
        r.release();
        assert!(s.lock().map.is_none() && s.lock().live.is_empty());
        assert!(s.put("s-2", vec![&sent(2, b"late")]).is_err());
        // The file keeps what was in flight for the next client with this id.
        assert_eq!(opened(&d).get("s-1").unwrap(), sent(1, b"in flight"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn takes_over_pahos_file_store() {
        let d = dir("import");
        let old = d.join("cid-tcp-//127.0.0.1-1883");
        std::fs::create_dir_all(&old).unwrap();
        let old_publication = command("t", b"old publication");
        std::fs::write(old.join("c-7.msg"), &old_publication).unwrap();
        let s = &mut opened(&d);
        assert_eq!(s.get("c-7").unwrap(), old_publication);
        assert!(!old.join("c-7.msg").exists());
        assert_eq!(opened(&d).get("c-7").unwrap(), old_publication);
        let _ = std::fs::remove_dir_all(&d);
    }
}
