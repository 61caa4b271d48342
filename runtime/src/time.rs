//! Wall-clock time as text: RFC 3339 UTC timestamps with milliseconds (through `humantime`),
//! durations as people write them, and a rate limit for repeated reports.

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Now, as `2026-11-22T10:00:00.123Z`.
pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now())
}

/// Formats a time as RFC 3339 UTC with milliseconds. A time before 1970 reads as the epoch,
/// one past the year 9999 (which RFC 3339 cannot write) as the last second of 9999.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs().min(LAST_SECOND);
    let ms = d.subsec_millis();
    // Every message gets a CreationTime, many per second, and humantime takes three times as
    // long as this: it writes the whole seconds once per second and thread, the milliseconds
    // are filled in here.
    let head = SECOND.with(|c| match c.get() {
        (s, head) if s == secs => head,
        _ => {
            let head = whole_seconds(secs);
            c.set((secs, head));
            head
        }
    });
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(&head);
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
    String::from_utf8(out).unwrap_or_default()
}

/// 9999-12-31T23:59:59Z, the last second humantime (and RFC 3339) can write.
const LAST_SECOND: u64 = 253_402_300_799;

thread_local! {
    /// The last whole second formatted on this thread and its text.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// `2026-11-22T10:00:00` for whole seconds since the epoch (at most [`LAST_SECOND`]).
fn whole_seconds(secs: u64) -> [u8; 19] {
    let mut text = String::with_capacity(20);
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    let _ = write!(text, "{}", humantime::format_rfc3339_seconds(t));
    text.as_bytes()
        .get(..19)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([b'0'; 19])
}

/// Parses an RFC 3339 time (`2026-11-22T10:00:00Z`, `2026-11-22T10:00:00.5+01:00`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.to_ascii_uppercase();
    // humantime reads UTC only, and a time without a zone as UTC: the zone is required here
    // and an offset taken off.
    let (time, east) = match s.strip_suffix('Z') {
        Some(time) => (time, 0),
        None => {
            let (time, offset) = s.split_at_checked(s.len().checked_sub(6)?)?;
            let east = match offset.as_bytes() {
                [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
                    if [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) =>
                {
                    let secs = u64::from((h1 - b'0') * 10 + (h2 - b'0')) * 3600
                        + u64::from((m1 - b'0') * 10 + (m2 - b'0')) * 60;
                    if *sign == b'+' {
                        secs as i64
                    } else {
                        -(secs as i64)
                    }
                }
                _ => return None,
            };
            (time, east)
        }
    };
    let local = humantime::parse_rfc3339_weak(time).ok()?;
    let offset = Duration::from_secs(east.unsigned_abs());
    if east >= 0 {
        local.checked_sub(offset)
    } else {
        local.checked_add(offset)
    }
}

/// A duration as people write it, rounded to what matters: `250ms`, `1.5s`, `2s`, `2m 30s`,
/// `1h 5m` — never `1.999961588s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        // Tenths of a second, rounded; `2.0s` is written `2s`.
        let tenths = (ms + 50) / 100;
        let (whole, tenth) = (tenths / 10, tenths % 10);
        return if tenth == 0 {
            format!("{whole}s")
        } else {
            format!("{whole}.{tenth}s")
        };
    }
    let secs = (ms + 500) / 1000;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m, s) {
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

/// Counts events (a failure that repeats) and says when to report them: at most once per
/// period, with how many there were since the last report.
pub struct Every {
    period: Duration,
    last: Option<Instant>,
    count: u64,
}

impl Every {
    /// Reports at most once per `period`.
    pub fn new(period: Duration) -> Every {
        Every {
            period,
            last: None,
            count: 0,
        }
    }

    /// Counts one; returns how many to report when a report is due.
    pub fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let due = self.last.is_none_or(|t| t.elapsed() >= self.period);
        due.then(|| {
            self.last = Some(Instant::now());
            std::mem::take(&mut self.count)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let cases = [
            (Duration::from_micros(1), "0ms"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_nanos(1_999_961_588), "2s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(59_960), "60s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(150), "2m 30s"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(3900), "1h 5m"),
        ];
        for (d, want) in cases {
            assert_eq!(human(d), want, "{d:?}");
        }
    }

    #[test]
    fn reports_come_at_most_once_a_period_with_the_count_since() {
        let mut e = Every::new(Duration::from_secs(3600));
        assert_eq!(e.tick(), Some(1));
        assert_eq!(e.tick(), None);
        assert_eq!(e.tick(), None);
        e.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(e.tick(), Some(3));
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_341_600_123);
        assert_eq!(format_rfc3339(t), "2026-11-22T10:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn the_per_second_cache_keeps_milliseconds_and_seconds_apart() {
        let base = UNIX_EPOCH + Duration::from_millis(1_795_341_600_000);
        assert_eq!(format_rfc3339(base), "2026-11-22T10:00:00.000Z");
        assert_eq!(
            format_rfc3339(base + Duration::from_millis(7)),
            "2026-11-22T10:00:00.007Z"
        );
        assert_eq!(
            format_rfc3339(base + Duration::from_millis(1_999)),
            "2026-11-22T10:00:01.999Z"
        );
        assert_eq!(
            format_rfc3339(base + Duration::from_millis(59)),
            "2026-11-22T10:00:00.059Z"
        );
        // What RFC 3339 cannot write is brought within it.
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(format_rfc3339(far), "9999-12-31T23:59:59.000Z");
        let early = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(format_rfc3339(early), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn parses_what_it_formats_and_offsets() {
        for ms in [0u64, 951_782_400_000, 1_795_341_600_123] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2026-11-22T11:00:00+01:00").map(format_rfc3339),
            Some("2026-11-22T10:00:00.000Z".to_string())
        );
        assert_eq!(
            parse_rfc3339("2026-11-22t05:30:00.5-04:30").map(format_rfc3339),
            Some("2026-11-22T10:00:00.500Z".to_string())
        );
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-22T10:00:00",
            "2026-11-22",
            "2026-11-22T10:00:00+1:00",
            "2026-02-30T10:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
