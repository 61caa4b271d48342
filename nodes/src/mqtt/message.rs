//! What a received paho message carries beyond its topic and payload: the `Duplicate` flag
//! and packet id (read from Paho's C struct), and MQTT v5 user properties.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use paho_mqtt as paho;
use serde_json::Value;

/// The `Duplicate` flag and packet id of a received message. paho-mqtt exposes neither; they
/// are fields of the C struct that a `paho::Message` holds. [`wire_info_raw`] reads them
/// there; should that ever fail its checks (another paho-mqtt), they are read from the
/// message's `Debug` output, which starts with the C struct (`... dup: 0, msgid: 7, ...`),
/// stopping as soon as they are found (5,000 instructions a message against 30).
pub fn wire_info(m: &paho::Message) -> (bool, i32) {
    wire_info_raw(m)
        .or_else(|| wire_info_fast(m))
        .unwrap_or_else(|| wire_info_text(m))
}

/// The head of Paho's C `MQTTAsync_message` (MQTTAsync.h, unchanged since Paho C 1.3), as far
/// as `msgid`.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(test, derive(Debug))]
struct CMessageHead {
    struct_id: [u8; 4],
    struct_version: i32,
    payloadlen: i32,
    payload: *const u8,
    qos: i32,
    retained: i32,
    dup: i32,
    msgid: i32,
}

/// The whole C struct: the head and `MQTTProperties` (three ints and a pointer).
const C_MESSAGE_SIZE: usize = std::mem::size_of::<CMessageHead>() + 24;

/// Where the C struct sits inside a `paho::Message`: [`NOT_FOUND`] until the first look, then
/// the offset, or [`UNUSABLE`].
static C_MESSAGE_AT: AtomicUsize = AtomicUsize::new(NOT_FOUND);

const NOT_FOUND: usize = usize::MAX;

const UNUSABLE: usize = usize::MAX - 1;

/// `dup` and `msgid` read from the C struct inside `m`, or None if it cannot be found there.
///
/// paho-mqtt 0.14's `Message` has two fields, the C struct and a pointer to the Rust copies
/// of its data (`Pin<Box<MessageData>>`), so it is 8 bytes larger than the C struct and the
/// struct is at offset 0 or 8 (Rust may order the fields either way). The offset is looked
/// for once, and every read is checked against what paho-mqtt's accessors say: the struct's
/// tag `MQTM`, a payload pointer and length equal to `payload()`'s, the same QoS and retained
/// flag. A paho-mqtt laid out otherwise fails the checks, and the caller reads `Debug`.
fn wire_info_raw(m: &paho::Message) -> Option<(bool, i32)> {
    let base = (m as *const paho::Message).cast::<u8>();
    let matches = |at: usize| -> Option<CMessageHead> {
        // SAFETY: `at` is 0 or 8 and the value is `C_MESSAGE_SIZE + 8` bytes long (checked
        // below before any read). In either order of the two fields, bytes `at..at + 4` are
        // initialised: the struct's tag, the box pointer, or `payloadlen`. The head is read
        // only once they are `MQTM`, which neither of the others can be: a box pointer is
        // 8-aligned and `M` (0x4d) is odd; as `payloadlen` they would be 1.3 GB, above MQTT's
        // 256 MB packet limit. So it is read from where the C struct is.
        let tag = unsafe { base.add(at).cast::<[u8; 4]>().read_unaligned() };
        if &tag != b"MQTM" {
            return None;
        }
        let head = unsafe { base.add(at).cast::<CMessageHead>().read_unaligned() };
        let p = m.payload();
        let same = std::ptr::eq(head.payload, p.as_ptr())
            && usize::try_from(head.payloadlen) == Ok(p.len())
            && head.qos == m.qos() as i32
            && (head.retained != 0) == m.retained();
        same.then_some(head)
    };
    let at = match C_MESSAGE_AT.load(Ordering::Relaxed) {
        UNUSABLE => return None,
        NOT_FOUND => {
            let at = (std::mem::size_of::<paho::Message>() == C_MESSAGE_SIZE + 8)
                .then(|| [0, 8].into_iter().find(|at| matches(*at).is_some()))
                .flatten();
            C_MESSAGE_AT.store(at.unwrap_or(UNUSABLE), Ordering::Relaxed);
            at?
        }
        at => at,
    };
    matches(at).map(|h| (h.dup != 0, h.msgid))
}

/// Follows the formatter's pieces: `debug_struct` writes a field's name, `": "`, then the
/// value (one piece for an integer). No buffer, no searching: this runs for every message.
fn wire_info_fast(m: &dyn std::fmt::Debug) -> Option<(bool, i32)> {
    #[derive(Clone, Copy)]
    enum Want {
        Nothing,
        Dup,
        MsgId,
    }
    struct Pieces {
        want: Want,
        dup: Option<bool>,
        msgid: Option<i32>,
        seen: usize,
    }
    impl std::fmt::Write for Pieces {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.seen += s.len();
            match (s, self.want) {
                ("dup", _) => self.want = Want::Dup,
                ("msgid", _) => self.want = Want::MsgId,
                (": ", _) => {}
                (v, Want::Dup) => {
                    self.dup = v.parse::<i32>().ok().map(|d| d != 0);
                    self.want = Want::Nothing;
                }
                (v, Want::MsgId) => {
                    self.msgid = v.parse().ok();
                    self.want = Want::Nothing;
                }
                _ => {}
            }
            if (self.dup.is_some() && self.msgid.is_some()) || self.seen > 1024 {
                return Err(std::fmt::Error);
            }
            Ok(())
        }
    }
    let mut p = Pieces {
        want: Want::Nothing,
        dup: None,
        msgid: None,
        seen: 0,
    };
    let _ = write!(p, "{m:?}");
    Some((p.dup?, p.msgid?))
}

/// The same from the formatted text (if the formatter's pieces ever change shape).
fn wire_info_text(m: &paho::Message) -> (bool, i32) {
    struct Finder {
        buf: String,
        found: Option<(bool, i32)>,
    }
    impl std::fmt::Write for Finder {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.buf.push_str(s);
            if let (Some(d), Some(i)) = (self.buf.find("dup: "), self.buf.find("msgid: ")) {
                let rest = &self.buf[i + 7..];
                if let Some(end) = rest.find(|c: char| !c.is_ascii_digit() && c != '-') {
                    let dup = self.buf[d + 5..].starts_with('1');
                    self.found = Some((dup, rest[..end].parse().unwrap_or(0)));
                    return Err(std::fmt::Error);
                }
            }
            if self.buf.len() > 512 {
                return Err(std::fmt::Error);
            }
            Ok(())
        }
    }
    let mut f = Finder {
        buf: String::new(),
        found: None,
    };
    let _ = write!(f, "{m:?}");
    f.found.unwrap_or((false, 0))
}

/// v5 user properties as a JSON object (later values of a repeated key win).
pub fn user_properties(props: &paho::Properties) -> Option<Value> {
    let mut m = serde_json::Map::new();
    for (k, v) in props.user_iter() {
        m.insert(k, Value::String(v));
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_info_reads_the_c_struct() {
        let m = paho::Message::new("t", vec![1u8; 100], 1);
        assert_eq!(wire_info(&m), (false, 0));
        // The fast path understands the formatter (no fallback to searching the text).
        assert_eq!(wire_info_fast(&m), Some((false, 0)));
        assert_eq!(wire_info_text(&m), (false, 0));
        // What the C struct looks like to the formatter, with a resend's flag and id.
        let like = CMessageHead {
            struct_id: *b"MQTM",
            struct_version: 1,
            payloadlen: 3,
            payload: std::ptr::null(),
            qos: 1,
            retained: 0,
            dup: 1,
            msgid: 4711,
        };
        assert_eq!(wire_info_fast(&like), Some((true, 4711)));
    }

    #[test]
    fn wire_info_finds_the_c_struct_in_place_and_agrees_with_debug() {
        for (payload, qos, retained) in [(vec![7u8; 200], 1, false), (vec![], 2, true)] {
            let mut m = paho::MessageBuilder::new()
                .topic("t")
                .payload(payload)
                .qos(qos)
                .retained(retained)
                .finalize();
            assert_eq!(wire_info_raw(&m), Some((false, 0)));
            let at = C_MESSAGE_AT.load(Ordering::Relaxed);
            assert!(at == 0 || at == 8, "found at {at}");
            // Give it a resend's flag and id where the C struct keeps them; the formatter,
            // which prints the struct's own fields, must read the same.
            // SAFETY: the offset was found and checked above; the fields are plain ints.
            unsafe {
                let head = (&mut m as *mut paho::Message)
                    .cast::<u8>()
                    .add(at)
                    .cast::<CMessageHead>();
                (*head).dup = 1;
                (*head).msgid = 4711;
            }
            assert_eq!(wire_info_fast(&m), Some((true, 4711)));
            assert_eq!(wire_info_raw(&m), Some((true, 4711)));
            assert_eq!(wire_info(&m), (true, 4711));
            // A message whose struct does not hold what the accessors say is refused.
            unsafe {
                let head = (&mut m as *mut paho::Message)
                    .cast::<u8>()
                    .add(at)
                    .cast::<CMessageHead>();
                (*head).payloadlen += 1;
            }
            assert_eq!(wire_info_raw(&m), None);
        }
    }
}
