//! The test message: a JSON object of exactly [`SIZE`] bytes,
//! `{"run":R,"seq":S,"ts":T,"k":K,"pad":"xxxx…"}`, where `run` tells benchmark phases apart,
//! `seq` counts from 0 within a run, `ts` is the send time in microseconds on the load
//! generator's monotonic clock and `k` is the input topic's index (`bench/in/<k>`).
//!
//! The systems under test re-serialise the object (key order and spacing may change, one
//! field is added), so the consumer finds the numbers by key rather than by position.

/// Payload size in bytes.
pub const SIZE: usize = 200;

/// Builds the payload.
pub fn build(run: u64, seq: u64, ts: u64, k: u32) -> Vec<u8> {
    let head = format!("{{\"run\":{run},\"seq\":{seq},\"ts\":{ts},\"k\":{k},\"pad\":\"");
    let mut v = Vec::with_capacity(SIZE);
    v.extend_from_slice(head.as_bytes());
    let pad = SIZE.saturating_sub(head.len() + 2);
    v.resize(v.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

/// A readiness probe (no `seq`; the consumer counts it apart).
pub fn probe(run: u64) -> Vec<u8> {
    format!("{{\"run\":{run},\"probe\":true}}").into_bytes()
}

/// The unsigned integer after `"key":` (whitespace allowed around the colon), if any.
pub fn field(payload: &[u8], key: &str) -> Option<u64> {
    let k = key.as_bytes();
    let mut i = 0;
    while i + k.len() + 2 < payload.len() {
        let rest = &payload[i..];
        let pos = rest.iter().position(|&b| b == b'"')?;
        let at = i + pos + 1;
        if payload.len() > at + k.len()
            && &payload[at..at + k.len()] == k
            && payload[at + k.len()] == b'"'
        {
            let mut j = at + k.len() + 1;
            while j < payload.len() && payload[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < payload.len() && payload[j] == b':' {
                j += 1;
                while j < payload.len() && payload[j].is_ascii_whitespace() {
                    j += 1;
                }
                let start = j;
                let mut n: u64 = 0;
                while j < payload.len() && payload[j].is_ascii_digit() {
                    n = n
                        .wrapping_mul(10)
                        .wrapping_add(u64::from(payload[j] - b'0'));
                    j += 1;
                }
                return (j > start).then_some(n);
            }
        }
        i = at;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_200_bytes_of_json_and_reads_back() {
        let p = build(7, 123_456, 9_876_543_210, 3);
        assert_eq!(p.len(), SIZE);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["seq"], 123_456);
        assert_eq!(field(&p, "run"), Some(7));
        assert_eq!(field(&p, "seq"), Some(123_456));
        assert_eq!(field(&p, "ts"), Some(9_876_543_210));
        assert_eq!(field(&p, "k"), Some(3));
        assert_eq!(field(&p, "probe"), None);
    }

    #[test]
    fn reads_reordered_and_spaced_output() {
        let p = br#"{"bridged": true, "k": 0, "pad": "xx", "run" : 2, "seq":5, "ts": 10}"#;
        assert_eq!(field(p, "seq"), Some(5));
        assert_eq!(field(p, "run"), Some(2));
        assert_eq!(field(p, "ts"), Some(10));
        assert_eq!(field(p, "k"), Some(0));
        assert_eq!(field(br#"{"run":1,"probe":true}"#, "seq"), None);
    }
}
