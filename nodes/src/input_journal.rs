//! The input journal: what an MQTT subscriber received at QoS 1/2 and has not finished with,
//! on disk, so that a SIGKILL of the daemon loses none of it.
//!
//! Paho acknowledges a received message to the broker when the message callback returns; from
//! then on the broker will not send it again. So the callback appends the message here first
//! ([`Journal::append`]), the node marks it done when the flow has finished with it
//! ([`Journal::done`]), and at the next start [`Journal::open`] gives back every message that
//! was not marked done, in the order received, to be processed again. A message can therefore
//! be processed twice (killed after its processing ended and before its mark was written, or
//! journaled and then delivered again by the broker because the kill came before the
//! acknowledgement), never lost.
//!
//! An append copies the record into a shared mapping of a preallocated file: no system call,
//! and the record is in the kernel's page cache at once, so it survives a crash of the daemon
//! exactly as a `write` would. Like the in-flight store ([`crate::mqtt_store`]) nothing calls
//! `fsync`: a power loss or kernel crash can lose the last records.
//!
//! # Files
//!
//! A directory (0700) of segments (0600), each named `<its first sequence number as 16 hex
//! digits>.journal` and preallocated to [`SEGMENT_SIZE`] (a record too big for that gets a
//! segment of its own, rounded up to 64 KiB). A segment is the 8-byte header [`MAGIC`], then
//! records `op (1) | body length (u32 LE) | body | checksum of op, length and body (u32 LE)`,
//! then zeros. Two kinds of record:
//!
//! - RECV (op 1): sequence number (u64), QoS (u8), flags (u8: bit 0 retained, bit 1 dup),
//!   packet id (u16), topic (u16 length + UTF-8), user properties (u32 count, then each key
//!   and value as u16 length + UTF-8), payload (u32 length + bytes). Integers little-endian.
//! - DONE (op 2): the sequence number (u64) of a RECV whose processing ended.
//!
//! Reading a segment stops at zeros, or at the first record that is cut short or fails its
//! checksum; anything non-zero after that is damage, reported by [`Opened::damage`] and
//! otherwise ignored.
//!
//! # Which segments are deleted
//!
//! A DONE is always written after its RECV, so it lies in the RECV's segment or a later one.
//! Deleting a segment whose RECVs are all done therefore loses nothing only if no earlier
//! segment is still on disk: a segment in the middle may hold the DONE marks of an earlier
//! one's records. So segments are deleted from the front only: the oldest, once every RECV
//! in it is done and it is not the segment being written. One message that is never marked
//! done keeps every later segment on disk.
//!
//! After an open, appends go to a new segment (created with the first record, so a start
//! that receives nothing adds no file); segments found at open are never written again, so a
//! damaged tail stays as it was and reads the same at every open. A segment with no records
//! at all is deleted at open wherever it is (it holds no marks for others). A file named like
//! a segment that cannot be read, or does not start with [`MAGIC`], is reported at every open
//! and otherwise left alone; sequence numbers and new segments' names stay clear of it.

use crate::checksum::checksum;
use crate::mqtt_store::{allocate, unmap_later};
use flowbus_runtime::datadir::{create_private_dir_all, private_options};
use memmap2::MmapMut;
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A segment's first bytes.
pub const MAGIC: &[u8; 8] = b"FBJRNL01";
/// The size of a segment (the disk it takes from its creation).
pub const SEGMENT_SIZE: usize = 4 << 20;
/// What a segment's size is rounded up to.
const ROUND: usize = 64 << 10;
/// Every `RELEASE_STEP` bytes written, the pages of the mapping behind the write point are
/// dropped from the process (`MADV_DONTNEED`; the data stays in the page cache and the file):
/// nothing reads them through the mapping again, and otherwise the whole segment would become
/// resident before it is replaced (see `RELEASE_STEP` in [`crate::mqtt_store`]).
const RELEASE_STEP: usize = 64 << 10;
/// The suffix of a segment's name.
const SUFFIX: &str = ".journal";

const RECV: u8 = 1;
const DONE: u8 = 2;
/// Op and body length.
const HEAD: usize = 5;
/// The checksum.
const SUM: usize = 4;
/// A DONE record.
const DONE_LEN: usize = HEAD + 8 + SUM;
/// A RECV body without its topic, user properties and payload: sequence number, QoS, flags,
/// packet id, topic length, user property count, payload length.
const RECV_FIXED: usize = 8 + 1 + 1 + 2 + 2 + 4 + 4;
/// The smallest RECV record: what bounds the number of RECVs in a segment.
const MIN_RECV: usize = HEAD + RECV_FIXED + SUM;

/// What the journal keeps of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS it was received at.
    pub qos: u8,
    /// Retained flag.
    pub retained: bool,
    /// Duplicate-delivery flag.
    pub dup: bool,
    /// MQTT packet id (0 for QoS 0).
    pub msgid: u16,
    /// MQTT v5 user properties in order (may be empty).
    pub user_properties: Vec<(String, String)>,
}

/// A borrowed view of a received message, for appending without copying it first.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// Topic (at most 65,535 bytes, as MQTT allows).
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// QoS it was received at.
    pub qos: u8,
    /// Retained flag.
    pub retained: bool,
    /// Duplicate-delivery flag.
    pub dup: bool,
    /// MQTT packet id (0 for QoS 0).
    pub msgid: u16,
    /// MQTT v5 user properties in order (each key and value at most 65,535 bytes).
    pub user_properties: &'a [(String, String)],
}

impl<'a> From<&'a Received> for Incoming<'a> {
    fn from(r: &'a Received) -> Incoming<'a> {
        Incoming {
            topic: &r.topic,
            payload: &r.payload,
            qos: r.qos,
            retained: r.retained,
            dup: r.dup,
            msgid: r.msgid,
            user_properties: &r.user_properties,
        }
    }
}

impl Incoming<'_> {
    /// The length of its RECV body; an error for a field longer than the format holds (which
    /// MQTT cannot deliver).
    fn body_len(&self) -> io::Result<usize> {
        fn too_long(what: &str, n: usize) -> io::Error {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} of {n} byte(s) is too long for the input journal"),
            )
        }
        let short = usize::from(u16::MAX);
        if self.topic.len() > short {
            return Err(too_long("a topic", self.topic.len()));
        }
        let mut n = RECV_FIXED + self.topic.len() + self.payload.len();
        for (k, v) in self.user_properties {
            if k.len() > short || v.len() > short {
                return Err(too_long("a user property", k.len().max(v.len())));
            }
            n += 4 + k.len() + v.len();
        }
        if n > u32::MAX as usize - HEAD - SUM {
            return Err(too_long("a message", n));
        }
        Ok(n)
    }
}

/// An append-only journal of received messages in a directory of segments (see the module
/// documentation). [`Journal::append`] and [`Journal::done`] may be called from different
/// threads.
pub struct Journal {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// The segment files' sizes.
    bytes: AtomicU64,
    /// RECVs not done.
    unfinished: AtomicUsize,
}

/// What opening found.
pub struct Opened {
    /// The journal, ready for appends (which go to a new segment).
    pub journal: Journal,
    /// Records not marked done, in append order, with their sequence numbers: process each
    /// again, then mark it [`Journal::done`].
    pub unfinished: Vec<(u64, Received)>,
    /// Damage found, one sentence each naming the file and how many bytes could not be read,
    /// for the activity log; empty when everything was sound. Opening goes on regardless with
    /// what could be read.
    pub damage: Vec<String>,
}

struct Inner {
    /// On disk, oldest first; the last is the one being written when `current` is set.
    segments: VecDeque<Segment>,
    /// The mapping of the last segment, where records go; none after an open until the
    /// first record.
    current: Option<Current>,
    /// The next RECV's sequence number.
    next: u64,
    segment_size: usize,
}

struct Current {
    map: MmapMut,
    /// Where the next record goes.
    end: usize,
    /// The mapping's pages before this offset have been dropped (see [`RELEASE_STEP`]).
    released: usize,
}

/// A segment on disk and which of its RECVs are done.
struct Segment {
    path: PathBuf,
    /// The file's size.
    size: u64,
    /// The smallest sequence number it may hold (for finding a segment by sequence number:
    /// ascending from segment to segment).
    first: u64,
    /// One past the largest sequence number it holds.
    end: u64,
    /// For a segment found at open: the sequence numbers of its RECVs that were not done then,
    /// ascending. `None` for a segment of this run, whose RECVs are exactly `first..end`.
    listed: Option<Vec<u64>>,
    /// One bit per RECV (per `listed` entry, or per sequence number from `first`): set when
    /// done.
    done: Vec<u64>,
    /// RECVs not done.
    pending: usize,
}

impl Segment {
    /// A new, empty segment for the RECVs from `first`, with room for the bits of as many as
    /// `size` bytes can hold (so appends do not allocate).
    fn new(path: PathBuf, size: usize, first: u64) -> Segment {
        Segment {
            path,
            size: size as u64,
            first,
            end: first,
            listed: None,
            done: Vec::with_capacity(size / MIN_RECV / 64 + 1),
            pending: 0,
        }
    }

    /// A segment found at open named `name`, with the RECVs `pending` not done.
    fn found(path: PathBuf, size: u64, name: u64, pending: Vec<u64>) -> Segment {
        let first = pending.first().copied().unwrap_or(name);
        Segment {
            path,
            size,
            first,
            end: pending.last().map_or(first, |s| s + 1),
            done: vec![0; pending.len().div_ceil(64)],
            pending: pending.len(),
            listed: Some(pending),
        }
    }

    /// The bit of `seq`, if this segment holds its RECV.
    fn bit(&self, seq: u64) -> Option<usize> {
        match &self.listed {
            Some(seqs) => seqs.binary_search(&seq).ok(),
            None => (self.first..self.end)
                .contains(&seq)
                .then(|| (seq - self.first) as usize),
        }
    }

    /// Marks `seq` done; whether it was pending.
    fn mark(&mut self, seq: u64) -> bool {
        let Some(bit) = self.bit(seq) else {
            return false;
        };
        let (word, mask) = (bit / 64, 1u64 << (bit % 64));
        if self.done[word] & mask != 0 {
            return false;
        }
        self.done[word] |= mask;
        self.pending -= 1;
        true
    }

    /// Counts the RECV of `seq` (the next sequence number) in this segment of this run.
    fn add(&mut self, seq: u64) {
        debug_assert!(self.listed.is_none() && seq == self.end);
        if (self.end - self.first).is_multiple_of(64) {
            self.done.push(0);
        }
        self.end = seq + 1;
        self.pending += 1;
    }
}

impl Current {
    /// Drops the pages behind the write point from the process, every [`RELEASE_STEP`] bytes.
    fn release(&mut self) {
        let behind = self.end - self.end % RELEASE_STEP;
        if behind > self.released {
            // SAFETY: nothing holds a reference into the range (the mapping is only copied
            // into, under the lock, ahead of this range), and for a shared file mapping the
            // pages' contents stay in the file: a later access would read them back.
            let dropped = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    self.released,
                    behind - self.released,
                )
            };
            // Only memory is at stake: on failure the pages stay until the segment is full.
            if dropped.is_ok() {
                self.released = behind;
            }
        }
    }
}

impl Inner {
    /// The one segment that may hold the RECV of `seq` (whose bits say whether it does).
    fn find(&mut self, seq: u64) -> Option<&mut Segment> {
        let i = self.segments.partition_point(|s| s.first <= seq);
        self.segments.get_mut(i.checked_sub(1)?)
    }

    /// Takes the segments that can go from the front: every RECV done, not being written.
    fn deletable(&mut self) -> Vec<(PathBuf, u64)> {
        let keep = usize::from(self.current.is_some());
        let mut gone = Vec::new();
        while self.segments.len() > keep && self.segments.front().is_some_and(|s| s.pending == 0) {
            if let Some(s) = self.segments.pop_front() {
                gone.push((s.path, s.size));
            }
        }
        gone
    }
}

/// The sequence number a segment's file name says it starts at, if it is a segment's name.
fn segment_name_seq(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SUFFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn segment_name(first: u64) -> String {
    format!("{first:016x}{SUFFIX}")
}

/// Writes into a slice front to back.
struct Cursor<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.at + bytes.len();
        self.out[self.at..end].copy_from_slice(bytes);
        self.at = end;
    }

    fn text(&mut self, s: &str) {
        // Lengths were checked by `Incoming::body_len`.
        self.put(&(s.len() as u16).to_le_bytes());
        self.put(s.as_bytes());
    }
}

/// Writes the RECV record of `m` (body length `body`) into `out`, which is exactly its size.
fn encode_recv(out: &mut [u8], seq: u64, m: &Incoming<'_>, body: usize) {
    let mut c = Cursor { out, at: 0 };
    c.put(&[RECV]);
    c.put(&(body as u32).to_le_bytes());
    c.put(&seq.to_le_bytes());
    c.put(&[m.qos, u8::from(m.retained) | (u8::from(m.dup) << 1)]);
    c.put(&m.msgid.to_le_bytes());
    c.text(m.topic);
    c.put(&(m.user_properties.len() as u32).to_le_bytes());
    for (k, v) in m.user_properties {
        c.text(k);
        c.text(v);
    }
    c.put(&(m.payload.len() as u32).to_le_bytes());
    c.put(m.payload);
    seal(c.out);
}

fn encode_done(out: &mut [u8], seq: u64) {
    out[0] = DONE;
    out[1..HEAD].copy_from_slice(&8u32.to_le_bytes());
    out[HEAD..HEAD + 8].copy_from_slice(&seq.to_le_bytes());
    seal(out);
}

/// Writes the checksum of a record into its last four bytes.
fn seal(rec: &mut [u8]) {
    let n = rec.len() - SUM;
    let sum = checksum(&rec[..n]);
    rec[n..].copy_from_slice(&sum.to_le_bytes());
}

/// A record read back.
enum Record {
    Recv(u64, Received),
    Done(u64),
}

/// Reads a slice front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn text(&mut self) -> Option<String> {
        let n = u16::from_le_bytes(self.array()?);
        String::from_utf8(self.take(usize::from(n))?.to_vec()).ok()
    }
}

fn decode_recv(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    let seq = u64::from_le_bytes(r.array()?);
    let [qos, flags] = r.array()?;
    let msgid = u16::from_le_bytes(r.array()?);
    let topic = r.text()?;
    let count = u32::from_le_bytes(r.array()?) as usize;
    // Each property takes at least four bytes: a damaged count cannot reserve much.
    let mut user_properties = Vec::with_capacity(count.min(r.0.len() / 4));
    for _ in 0..count {
        let k = r.text()?;
        user_properties.push((k, r.text()?));
    }
    let n = u32::from_le_bytes(r.array()?) as usize;
    let payload = r.take(n)?.to_vec();
    if !r.0.is_empty() {
        return None;
    }
    Some(Record::Recv(
        seq,
        Received {
            topic,
            payload,
            qos,
            retained: flags & 1 != 0,
            dup: flags & 2 != 0,
            msgid,
            user_properties,
        },
    ))
}

/// The record at the start of `bytes` and its length, unless it is zeros, cut short or
/// damaged.
fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
    let mut r = Reader(bytes);
    let [op] = r.array()?;
    let len = u32::from_le_bytes(r.array()?) as usize;
    let body = r.take(len)?;
    let sum = u32::from_le_bytes(r.array()?);
    let total = HEAD + len + SUM;
    if sum != checksum(&bytes[..total - SUM]) {
        return None;
    }
    let record = match op {
        RECV => decode_recv(body)?,
        DONE => Record::Done(u64::from_le_bytes(body.try_into().ok()?)),
        _ => return None,
    };
    Some((record, total))
}

/// What reading a segment found.
struct Scan {
    /// Good records.
    records: usize,
    /// Non-zero bytes after the last good record (to the last non-zero one).
    unreadable: usize,
}

/// Reads a segment's records in order; `None` when it does not start with [`MAGIC`].
fn scan(bytes: &[u8], mut each: impl FnMut(Record)) -> Option<Scan> {
    if !bytes.starts_with(MAGIC) {
        return None;
    }
    let mut at = MAGIC.len();
    let mut records = 0;
    while let Some((record, len)) = decode(&bytes[at..]) {
        each(record);
        records += 1;
        at += len;
    }
    let unreadable = bytes[at..]
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |p| p + 1);
    Some(Scan {
        records,
        unreadable,
    })
}

/// Creates a segment file of `size` bytes, allocated on disk, and maps it.
fn create_segment(path: &Path, size: usize) -> io::Result<MmapMut> {
    let f = private_options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let made = (|| {
        // The header first: a file cut short by a kill here is empty, never all zeros.
        (&f).write_all(MAGIC)?;
        // A store into a shared mapping of a file with no room on disk kills the process
        // (SIGBUS); allocating now makes a full disk an error here instead.
        allocate(&f, size)?;
        // SAFETY: the file is ours (a private directory per journal) and is only changed
        // through this mapping.
        unsafe { MmapMut::map_mut(&f) }
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

impl Journal {
    /// Opens the journal in `dir` (created 0700 if missing; files 0600), with segments of
    /// [`SEGMENT_SIZE`].
    ///
    /// Reads every segment; segments whose RECVs are all done are deleted from the front.
    /// Damage is reported in [`Opened::damage`], not as an error. Errors: the directory cannot
    /// be created or listed.
    pub fn open(dir: &Path) -> io::Result<Opened> {
        Journal::open_sized(dir, SEGMENT_SIZE)
    }

    /// [`Journal::open`] with segments of `segment_size` bytes (rounded up to 64 KiB), for
    /// tests that want many segments.
    pub fn open_sized(dir: &Path, segment_size: usize) -> io::Result<Opened> {
        create_private_dir_all(dir)?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(first) = entry.file_name().to_str().and_then(segment_name_seq) {
                files.push((first, entry.path()));
            }
        }
        files.sort_unstable_by_key(|(first, _)| *first);

        struct Found {
            path: PathBuf,
            size: u64,
            name: u64,
            records: usize,
            damaged: bool,
        }
        let mut found: Vec<Found> = Vec::new();
        let mut damage = Vec::new();
        let mut gone = Vec::new();
        // RECVs without a DONE so far: DONEs come after their RECVs, in this order of files.
        let mut pending: BTreeMap<u64, (usize, Received)> = BTreeMap::new();
        // Sequence numbers start at 1, and after every one found; and a new segment's name
        // never meets an old one's.
        let mut next = 1u64;
        for (name, path) in files {
            next = next.max(name.saturating_add(1));
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                    // It may hold sequence numbers up to about one per byte past its name.
                    next = next.max(name.saturating_add(len).saturating_add(1));
                    damage.push(format!(
                        "The input journal segment {} could not be read ({e}): its {len} byte(s) were left in place and ignored",
                        path.display()
                    ));
                    continue;
                }
            };
            let size = bytes.len() as u64;
            if bytes.is_empty() {
                // Created, and the process ended before its header was written.
                gone.push((path, 0));
                continue;
            }
            let at = found.len();
            let mut last = 0;
            let read = scan(&bytes, |record| match record {
                Record::Recv(seq, m) => {
                    last = last.max(seq);
                    pending.insert(seq, (at, m));
                }
                Record::Done(seq) => {
                    last = last.max(seq);
                    pending.remove(&seq);
                }
            });
            let Some(read) = read else {
                next = next.max(name.saturating_add(size).saturating_add(1));
                damage.push(format!(
                    "The input journal segment {} does not start with the header {}: none of its {size} byte(s) could be read; it was left in place and ignored",
                    path.display(),
                    String::from_utf8_lossy(MAGIC)
                ));
                continue;
            };
            next = next.max(last.saturating_add(1));
            if read.unreadable > 0 {
                damage.push(format!(
                    "The input journal segment {}: {} byte(s) after its last good record could not be read (a record cut short, as a kill while it was being written leaves one, or damaged; how many messages they held cannot be told); the {} record(s) before them were read",
                    path.display(),
                    read.unreadable,
                    read.records
                ));
            }
            found.push(Found {
                path,
                size,
                name,
                records: read.records,
                damaged: read.unreadable > 0,
            });
        }

        let mut listed = vec![Vec::new(); found.len()];
        for (seq, (at, _)) in &pending {
            listed[*at].push(*seq);
        }
        let mut segments = VecDeque::with_capacity(found.len());
        for (f, seqs) in found.into_iter().zip(listed) {
            if f.records == 0 && !f.damaged {
                // No records, so no DONE marks for earlier segments either: it can go from
                // anywhere. (A damaged one stays until it is at the front, as evidence.)
                gone.push((f.path, f.size));
            } else {
                segments.push_back(Segment::found(f.path, f.size, f.name, seqs));
            }
        }
        let mut inner = Inner {
            segments,
            current: None,
            next,
            segment_size: segment_size.max(1).next_multiple_of(ROUND),
        };
        gone.extend(inner.deletable());
        let bytes = inner.segments.iter().map(|s| s.size).sum::<u64>()
            + gone.iter().map(|(_, size)| size).sum::<u64>();
        let journal = Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(inner),
            bytes: AtomicU64::new(bytes),
            unfinished: AtomicUsize::new(pending.len()),
        };
        journal.delete(gone);
        Ok(Opened {
            journal,
            unfinished: pending.into_iter().map(|(seq, (_, m))| (seq, m)).collect(),
            damage,
        })
    }

    /// Appends a received message; returns its sequence number (from 1, increasing,
    /// continuing after those found at open). Never refuses for size: a budget is the
    /// caller's (see [`Journal::bytes`]).
    ///
    /// A copy into a mapped file: no allocation, and no system call except when a segment
    /// is full and the next one is created (and every 64 KiB, to drop written pages from
    /// memory). Errors: a new segment could not be created (a full disk, say), or a topic or
    /// user property longer than MQTT allows (`InvalidInput`).
    pub fn append(&self, m: &Incoming<'_>) -> io::Result<u64> {
        let body = m.body_len()?;
        let len = HEAD + body + SUM;
        let mut inner = self.lock();
        let seq = inner.next;
        self.put(&mut inner, len, |out| encode_recv(out, seq, m, body))?;
        inner.next += 1;
        if let Some(s) = inner.segments.back_mut() {
            s.add(seq);
        }
        self.unfinished.fetch_add(1, Ordering::Relaxed);
        // Starting a segment may have left the one before it with nothing to do.
        let gone = inner.deletable();
        drop(inner);
        self.delete(gone);
        Ok(seq)
    }

    /// Marks the record `seq` done (its processing ended): it is not given back at the next
    /// open. Idempotent; an unknown `seq` is ignored. Deletes the oldest segments when this
    /// was the last of their records not done.
    ///
    /// Failing to write the mark (no room for a new segment) is logged: the message will be
    /// processed again after a restart, as if the mark had come a moment too late.
    pub fn done(&self, seq: u64) {
        let mut inner = self.lock();
        if !inner.find(seq).is_some_and(|s| s.mark(seq)) {
            return;
        }
        self.unfinished.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = self.put(&mut inner, DONE_LEN, |out| encode_done(out, seq)) {
            tracing::warn!(
                "input journal {}: cannot mark message {seq} done ({e}): it will be processed again after a restart",
                self.dir.display()
            );
        }
        let gone = inner.deletable();
        drop(inner);
        self.delete(gone);
    }

    /// Bytes the journal's segments take on disk now (whole segments: they are allocated when
    /// created), for the caller's budget.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Records appended or found at open and not done yet.
    pub fn unfinished(&self) -> usize {
        self.unfinished.load(Ordering::Relaxed)
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes everything (the node was removed for good): the directory and all in it.
    pub fn destroy(self) -> io::Result<()> {
        let Journal { dir, inner, .. } = self;
        drop(inner);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a record of `len` bytes, which `fill` writes into the slice it is given, at the
    /// end of the current segment, starting a new segment first when there is none or the
    /// record does not fit.
    fn put(&self, inner: &mut Inner, len: usize, fill: impl FnOnce(&mut [u8])) -> io::Result<()> {
        if inner
            .current
            .as_ref()
            .is_none_or(|c| c.end + len > c.map.len())
        {
            self.start_segment(inner, len)?;
        }
        let Some(c) = inner.current.as_mut() else {
            return Err(io::Error::other("the input journal has no segment"));
        };
        fill(&mut c.map[c.end..c.end + len]);
        c.end += len;
        c.release();
        Ok(())
    }

    /// Creates, allocates and maps a new segment with room for a record of `len` bytes, and
    /// makes it the current one. The full one is unmapped on another thread.
    fn start_segment(&self, inner: &mut Inner, len: usize) -> io::Result<()> {
        if inner.segments.back().is_some_and(|s| s.first == inner.next) {
            // The last segment holds no RECV (only DONE marks) and is named after `next`:
            // skip a number so that the new one has a name of its own.
            inner.next += 1;
        }
        let size = inner
            .segment_size
            .max((MAGIC.len() + len).next_multiple_of(ROUND));
        let path = self.dir.join(segment_name(inner.next));
        let map = create_segment(&path, size).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot create the input journal segment {}: {e}",
                    path.display()
                ),
            )
        })?;
        self.bytes.fetch_add(size as u64, Ordering::Relaxed);
        inner
            .segments
            .push_back(Segment::new(path, size, inner.next));
        let new = Current {
            map,
            end: MAGIC.len(),
            released: 0,
        };
        if let Some(old) = inner.current.replace(new) {
            unmap_later(old.map);
        }
        Ok(())
    }

    /// Unlinks segments taken by [`Inner::deletable`] (outside the lock: the other thread's
    /// appends need not wait for the file system).
    fn delete(&self, gone: Vec<(PathBuf, u64)>) {
        for (path, size) in gone {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    // Left on disk, its records come back at the next open once the segments
                    // with their DONE marks are gone: processed twice, not lost.
                    tracing::error!(
                        "input journal: cannot delete {}, whose messages are all done: {e}",
                        path.display()
                    );
                }
                _ => {
                    self.bytes.fetch_sub(size, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory for a test, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let d =
                std::env::temp_dir().join(format!("flowbus-journal-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn msg(topic: &str, payload: &[u8]) -> Received {
        Received {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: 1,
            retained: false,
            dup: false,
            msgid: 1,
            user_properties: Vec::new(),
        }
    }

    fn open(d: &Path) -> Opened {
        Journal::open(d).unwrap()
    }

    fn open_small(d: &Path) -> Opened {
        Journal::open_sized(d, 64 << 10).unwrap()
    }

    /// The segment files in `d`, by name.
    fn segments(d: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| segment_name_seq(n).is_some())
            .collect();
        names.sort();
        names
    }

    fn disk_bytes(d: &Path) -> u64 {
        segments(d)
            .iter()
            .map(|n| std::fs::metadata(d.join(n)).unwrap().len())
            .sum()
    }

    #[test]
    fn gives_back_exactly_the_records_not_done_in_order_with_every_field() {
        let d = TempDir::new("reopen");
        let Opened {
            journal,
            unfinished,
            damage,
        } = open(&d);
        assert!(unfinished.is_empty() && damage.is_empty());
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = [
            Received {
                topic: "a/b".into(),
                payload: b"hello".to_vec(),
                qos: 2,
                retained: true,
                dup: false,
                msgid: 65_535,
                user_properties: vec![
                    ("k".into(), "v".into()),
                    ("k".into(), "second, same key".into()),
                    (String::new(), "ü".into()),
                ],
            },
            msg("done/1", b"x"),
            Received {
                topic: "empty".into(),
                payload: Vec::new(),
                qos: 1,
                retained: false,
                dup: true,
                msgid: 7,
                user_properties: Vec::new(),
            },
            msg("done/2", b"y"),
            Received {
                topic: "big".into(),
                payload: big,
                qos: 0,
                retained: true,
                dup: true,
                msgid: 0,
                user_properties: vec![("trace".into(), "1".into())],
            },
        ];
        let seqs: Vec<u64> = sent
            .iter()
            .map(|m| journal.append(&m.into()).unwrap())
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        journal.done(seqs[1]);
        journal.done(seqs[3]);
        journal.done(seqs[3]);
        journal.done(999);
        assert_eq!(journal.unfinished(), 3);
        // A crash: nothing is closed, unmapped or flushed.
        std::mem::forget(journal);

        let again = open(&d);
        assert!(again.damage.is_empty(), "{:?}", again.damage);
        let want: Vec<(u64, Received)> = [0, 2, 4].map(|i| (seqs[i], sent[i].clone())).into();
        assert_eq!(again.unfinished, want);
        assert_eq!(again.journal.unfinished(), 3);
        // Numbers continue, in a new segment.
        let before = segments(&d);
        assert_eq!(again.journal.append(&(&sent[1]).into()).unwrap(), 6);
        assert_eq!(segments(&d).len(), before.len() + 1);
        assert_eq!(segments(&d).last().unwrap(), &segment_name(6));
        // Marking the ones from before done is remembered too.
        again.journal.done(seqs[0]);
        again.journal.done(seqs[4]);
        drop(again);
        let third = open(&d);
        let left: Vec<u64> = third.unfinished.iter().map(|(s, _)| *s).collect();
        assert_eq!(left, [3, 6]);
        assert_eq!(third.unfinished[0].1, sent[2]);
        assert_eq!(third.journal.append(&(&sent[0]).into()).unwrap(), 7);
    }

    #[test]
    fn numbers_continue_when_everything_was_done() {
        let d = TempDir::new("numbers");
        let j = open(&d).journal;
        for _ in 0..3 {
            let seq = j.append(&(&msg("t", b"p")).into()).unwrap();
            j.done(seq);
        }
        drop(j);
        let again = open(&d);
        assert!(again.unfinished.is_empty());
        // Everything was done: the segment was deleted at open.
        assert!(segments(&d).is_empty());
        assert_eq!(again.journal.bytes(), 0);
        assert_eq!(again.journal.append(&(&msg("t", b"p")).into()).unwrap(), 4);
    }

    #[test]
    fn a_record_bigger_than_a_segment_gets_a_segment_of_its_own() {
        let d = TempDir::new("big");
        let j = open_small(&d).journal;
        j.append(&(&msg("small", b"1")).into()).unwrap();
        let big = msg("big", &vec![9u8; 200_000]);
        assert_eq!(j.append(&(&big).into()).unwrap(), 2);
        j.append(&(&msg("small", b"3")).into()).unwrap();
        let names = segments(&d);
        assert_eq!(names, [segment_name(1), segment_name(2)]);
        let size = std::fs::metadata(d.join(&names[1])).unwrap().len();
        assert_eq!(size, (200_000 + 200u64).next_multiple_of(64 << 10));
        assert_eq!(j.bytes(), (64 << 10) + size);
        drop(j);
        let again = open_small(&d);
        assert_eq!(again.unfinished.len(), 3);
        assert_eq!(again.unfinished[1], (2, big));
        assert!(again.damage.is_empty());
    }

    #[test]
    fn segments_go_from_the_front_once_done_and_not_before() {
        let d = TempDir::new("front");
        let j = open_small(&d).journal;
        let payload = vec![5u8; 1000];
        // About 60 records a segment: 10 segments.
        let seqs: Vec<u64> = (0..600)
            .map(|_| j.append(&(&msg("t", &payload)).into()).unwrap())
            .collect();
        let n = segments(&d).len();
        assert!(n >= 9, "{n} segments");
        assert_eq!(j.bytes(), disk_bytes(&d));
        assert_eq!(j.bytes(), n as u64 * (64 << 10));
        // Everything done but the first: every segment stays, and their DONE marks with them.
        for s in &seqs[1..] {
            j.done(*s);
        }
        assert_eq!(j.unfinished(), 1);
        let n = segments(&d).len();
        assert!(n >= 10, "{n} segments");
        assert_eq!(j.bytes(), disk_bytes(&d));
        drop(j);

        let again = open_small(&d);
        let left: Vec<u64> = again.unfinished.iter().map(|(s, _)| *s).collect();
        assert_eq!(left, [seqs[0]], "the DONE marks in later segments apply");
        assert_eq!(segments(&d).len(), n, "nothing deleted at open");
        let j = again.journal;
        assert_eq!(j.bytes(), disk_bytes(&d));
        let before = j.bytes();
        // The first done: the front segment goes, and every one after it that is done — all
        // but the new one holding that DONE mark.
        j.done(seqs[0]);
        assert_eq!(segments(&d).len(), 1);
        assert_eq!(j.bytes(), 64 << 10);
        assert!(j.bytes() < before);
        assert_eq!(j.unfinished(), 0);
        drop(j);
        let again = open_small(&d);
        assert!(again.unfinished.is_empty());
        assert!(
            segments(&d).is_empty(),
            "a segment of done marks goes at open"
        );
    }

    #[test]
    fn the_oldest_segment_goes_as_soon_as_it_is_done() {
        let d = TempDir::new("steady");
        let j = open_small(&d).journal;
        let payload = vec![1u8; 1000];
        // A window of 10 in flight: at most two or three segments on disk at any time.
        let mut window = VecDeque::new();
        let mut most = 0;
        for _ in 0..2000 {
            window.push_back(j.append(&(&msg("t", &payload)).into()).unwrap());
            if window.len() > 10 {
                j.done(window.pop_front().unwrap());
            }
            most = most.max(segments(&d).len());
        }
        assert!(most <= 3, "{most} segments at once");
        assert_eq!(j.bytes(), disk_bytes(&d));
        assert_eq!(j.unfinished(), 10);
        drop(j);
        let again = open_small(&d);
        let left: Vec<u64> = again.unfinished.iter().map(|(s, _)| *s).collect();
        assert_eq!(left, Vec::from(window));
    }

    #[test]
    fn appends_and_dones_from_two_threads() {
        let d = TempDir::new("threads");
        let j = std::sync::Arc::new(open_small(&d).journal);
        let (tx, rx) = std::sync::mpsc::channel();
        let marker = {
            let j = j.clone();
            std::thread::spawn(move || rx.into_iter().for_each(|s| j.done(s)))
        };
        for i in 0..5000u32 {
            let seq = j.append(&(&msg("t", &i.to_le_bytes())).into()).unwrap();
            if i % 1000 != 0 {
                tx.send(seq).unwrap();
            }
        }
        drop(tx);
        marker.join().unwrap();
        assert_eq!(j.unfinished(), 5);
        drop(j);
        let again = open_small(&d);
        let left: Vec<u64> = again.unfinished.iter().map(|(s, _)| *s).collect();
        assert_eq!(left, [1, 1001, 2001, 3001, 4001]);
        assert_eq!(again.unfinished[1].1.payload, 1000u32.to_le_bytes());
    }

    /// Two segments of three records each, the first two of each done (the second segment
    /// ending with the DONE of 5); the segment files.
    fn two_segments(d: &Path) -> (PathBuf, PathBuf) {
        let j = open(d).journal;
        for i in 1..=3u8 {
            let s = j.append(&(&msg("one", &[i])).into()).unwrap();
            if i < 3 {
                j.done(s);
            }
        }
        drop(j);
        let first = d.join(segment_name(1));
        let j = open(d).journal;
        let seqs: Vec<u64> = (4..=6u8)
            .map(|i| j.append(&(&msg("two", &[i])).into()).unwrap())
            .collect();
        j.done(seqs[0]);
        j.done(seqs[1]);
        drop(j);
        (first, d.join(segment_name(4)))
    }

    /// The end of a segment's last good record.
    fn good_end(path: &Path) -> usize {
        let bytes = std::fs::read(path).unwrap();
        let mut at = MAGIC.len();
        while let Some((_, len)) = decode(&bytes[at..]) {
            at += len;
        }
        at
    }

    fn payloads(o: &Opened) -> Vec<u8> {
        o.unfinished.iter().map(|(_, m)| m.payload[0]).collect()
    }

    #[test]
    fn a_segment_cut_short_gives_the_records_before_the_cut_and_says_so() {
        let d = TempDir::new("torn");
        let (_, second) = two_segments(&d);
        assert_eq!(payloads(&open(&d)), [3, 6]);
        // A crash in the middle of copying the last record (the DONE of 5): only its first
        // six bytes reached the file.
        let mut bytes = std::fs::read(&second).unwrap();
        let end = good_end(&second);
        assert_eq!(bytes[end - DONE_LEN], DONE);
        bytes[end - DONE_LEN + 6..end].fill(0);
        std::fs::write(&second, &bytes).unwrap();
        let o = open(&d);
        assert_eq!(payloads(&o), [3, 5, 6], "5's mark was lost, not 5");
        assert_eq!(o.damage.len(), 1, "{:?}", o.damage);
        let name = second.display().to_string();
        assert!(
            o.damage[0].contains(&name)
                && o.damage[0].contains(": 6 byte(s) after its last good record"),
            "{}",
            o.damage[0]
        );
        // Appends go on in a new segment; the damaged one stays as it is, and says the same
        // at the next open.
        let j = o.journal;
        assert_eq!(j.append(&(&msg("three", &[7])).into()).unwrap(), 7);
        drop(j);
        assert_eq!(std::fs::read(&second).unwrap(), bytes);
        let o = open(&d);
        assert_eq!(payloads(&o), [3, 5, 6, 7]);
        assert_eq!(o.damage.len(), 1);
        // Once its records are done it goes like any other.
        for (s, _) in &o.unfinished {
            o.journal.done(*s);
        }
        assert!(!second.exists());
    }

    #[test]
    fn a_flipped_byte_ends_the_segment_there() {
        let d = TempDir::new("flipped");
        let (first, second) = two_segments(&d);
        // A byte of the second segment's first record (the RECV of 4) flipped: nothing in
        // that segment can be trusted, the first segment is read as before.
        let mut bytes = std::fs::read(&second).unwrap();
        bytes[MAGIC.len() + HEAD + 20] ^= 0x40;
        std::fs::write(&second, &bytes).unwrap();
        let o = open(&d);
        assert_eq!(payloads(&o), [3]);
        let unreadable = bytes.iter().rposition(|b| *b != 0).unwrap() + 1 - MAGIC.len();
        assert!(unreadable > 50, "{unreadable}");
        assert!(
            o.damage.len() == 1
                && o.damage[0].contains(&second.display().to_string())
                && o.damage[0].contains(&format!(": {unreadable} byte(s) after")),
            "{:?}",
            o.damage
        );
        // Numbers go on after the first segment's and the second's name (what the second
        // held cannot be read, now or later); the damaged segment stays as it is.
        assert_eq!(o.journal.append(&(&msg("t", &[8])).into()).unwrap(), 5);
        drop(o);
        assert!(first.exists());
        assert_eq!(std::fs::read(&second).unwrap(), bytes);
        // It goes once it is at the front: when the first segment's record is done.
        let o = open(&d);
        assert_eq!(payloads(&o), [3, 8]);
        o.journal.done(o.unfinished[0].0);
        assert!(!first.exists() && !second.exists());
    }

    #[test]
    fn files_that_are_not_segments_are_left_alone() {
        let d = TempDir::new("strangers");
        let (first, _) = two_segments(&d);
        std::fs::write(d.join("notes.txt"), b"mine").unwrap();
        std::fs::write(d.join("00000000000000zz.journal"), b"x").unwrap();
        // Named as a segment, but not one.
        let odd = d.join(segment_name(100));
        std::fs::write(&odd, b"PK\x03\x04 something else").unwrap();
        // Created by a process killed before the header: nothing to say about it.
        let empty = d.join(segment_name(200));
        std::fs::write(&empty, b"").unwrap();
        let o = open(&d);
        assert_eq!(payloads(&o), [3, 6]);
        assert_eq!(o.damage.len(), 1, "{:?}", o.damage);
        assert!(
            o.damage[0].contains(&odd.display().to_string())
                && o.damage[0].contains("none of its 19 byte(s) could be read"),
            "{}",
            o.damage[0]
        );
        assert!(!empty.exists());
        // A new segment's name and numbers stay clear of the odd file's.
        let seq = o.journal.append(&(&msg("t", &[9])).into()).unwrap();
        assert!(seq > 100 + 19, "{seq}");
        for (s, _) in &o.unfinished {
            o.journal.done(*s);
        }
        o.journal.done(seq);
        assert!(!first.exists());
        assert!(odd.exists() && d.join("notes.txt").exists());
        assert!(d.join("00000000000000zz.journal").exists());
    }

    #[test]
    fn an_unusable_directory_is_an_error() {
        let d = TempDir::new("notadir");
        std::fs::write(&*d, b"a file").unwrap();
        assert!(Journal::open(&d).is_err());
        std::fs::remove_file(&*d).unwrap();
    }

    #[test]
    fn directory_and_files_are_private() {
        let d = TempDir::new("modes");
        let j = open(&d.join("sub")).journal;
        j.append(&(&msg("t", b"secret")).into()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("sub")), 0o700);
        let names = segments(&d.join("sub"));
        assert_eq!(names.len(), 1);
        assert_eq!(mode(&d.join("sub").join(&names[0])), 0o600);
    }

    #[test]
    fn destroy_removes_the_directory() {
        let d = TempDir::new("destroy");
        let j = open(&d).journal;
        j.append(&(&msg("t", b"p")).into()).unwrap();
        std::fs::write(d.join("other"), b"x").unwrap();
        j.destroy().unwrap();
        assert!(!d.exists());
    }

    #[test]
    fn a_field_longer_than_mqtt_allows_is_refused() {
        let d = TempDir::new("long");
        let j = open(&d).journal;
        let topic = "t".repeat(70_000);
        let e = j.append(&(&msg(&topic, b"p")).into()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(j.unfinished(), 0);
        assert_eq!(j.append(&(&msg("t", b"p")).into()).unwrap(), 1);
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
        let d = TempDir::new("resident");
        let j = open(&d).journal;
        let payload = vec![7u8; 300];
        // About 3 MiB of records into a 4 MiB segment.
        for _ in 0..10_000 {
            let seq = j.append(&(&msg("t", &payload)).into()).unwrap();
            j.done(seq);
        }
        let path = d.join(segment_name(1));
        let kib = resident_kib(&path).expect("the segment is mapped");
        assert!(
            kib <= (RELEASE_STEP as u64 >> 10) + 8,
            "{kib} KiB of the segment resident"
        );
        assert!(good_end(&path) > 3 << 20);
    }

    #[test]
    fn the_journal_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Journal>();
    }

    /// Append+done pairs a second, with 200-byte payloads:
    /// `cargo test -p flowbus-nodes --release input_journal -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        let d = TempDir::new("throughput");
        let j = open(&d).journal;
        let payload = vec![0x5au8; 200];
        let props = [("k".to_string(), "v".to_string())];
        let m = Incoming {
            topic: "sensors/building-1/floor-2/temperature",
            payload: &payload,
            qos: 1,
            retained: false,
            dup: false,
            msgid: 1,
            user_properties: &props,
        };
        let n = 2_000_000u64;
        let window = 100;
        let start = std::time::Instant::now();
        for i in 0..n {
            j.append(&m).unwrap();
            if i >= window {
                j.done(i + 1 - window);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "input journal: {n} append+done pairs of 200-byte payloads in {secs:.2} s: {:.0} pairs/s",
            n as f64 / secs
        );
        assert_eq!(j.unfinished(), window as usize);
    }
}
