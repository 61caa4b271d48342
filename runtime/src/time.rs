//! Wall-clock formatting without a date crate: RFC 3339 UTC timestamps with milliseconds.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Now, as `2026-11-22T10:00:00.123Z`.
pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now())
}

/// Formats a time as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let ms = d.subsec_millis();
    // Every message gets a CreationTime, many per second: the calendar arithmetic and
    // `format!` run once per second and thread, the milliseconds are filled in by hand.
    let head = SECOND.with(|c| match c.get() {
        (s, head) if s == secs => Some(head),
        _ => {
            let head = <[u8; 19]>::try_from(format_seconds(secs).as_bytes()).ok()?;
            c.set((secs, head));
            Some(head)
        }
    });
    let Some(head) = head else {
        // A year outside 0..=9999: not 19 characters.
        return format!("{}.{ms:03}Z", format_seconds(secs));
    };
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

thread_local! {
    /// The last whole second formatted on this thread and its text.
    static SECOND: std::cell::Cell<(i64, [u8; 19])> = const { std::cell::Cell::new((i64::MIN, [0; 19])) };
}

/// `2026-11-22T10:00:00` for whole seconds since the epoch.
fn format_seconds(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parses an RFC 3339 time (`2026-11-22T10:00:00Z`, `2026-11-22T10:00:00.5+01:00`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut f = frac[..digits.min(9)].to_string();
        while f.len() < 9 {
            f.push('0');
        }
        nanos = f.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = rest[1..].split_once(':')?;
            if oh.len() != 2 || om.len() != 2 {
                return None;
            }
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    let secs = days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

/// Howard Hinnant's civil-to-days algorithm.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
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
    use std::time::Duration;

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
        // Five-digit years do not fit the cached form and are formatted in full.
        let far = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(format_rfc3339(far), "10000-01-01T00:00:00.000Z");
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
            parse_rfc3339("2026-11-22T10:00:00.5Z").map(format_rfc3339),
            Some("2026-11-22T10:00:00.500Z".to_string())
        );
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-22T10:00:00",
            "2026-11-22",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
