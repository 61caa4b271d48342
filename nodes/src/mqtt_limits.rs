//! MQTT's own limits, checked before a value reaches paho: a string MQTT writes with a two-byte
//! length (topic, user-property key and value, client id) holds at most 65,535 bytes of UTF-8
//! and no NUL; a PUBLISH packet is at most 268,435,455 bytes after its fixed header; and a
//! payload is at most the node's `max_payload`. Paho C checks none of them: a 70,000-byte topic
//! went out with its length written modulo 65,536, so the broker read the rest of it as packet
//! id and payload. Topic names starting with `$` belong to the broker (`$SYS/...`), so a flow
//! publishes there only when its node allows it.
//!
//! Pure decisions with unit tests; the nodes turn a [`LimitError`] into an exception or a
//! validation problem.

/// The longest string MQTT can carry (a two-byte length).
pub const MAX_STRING: usize = 65_535;

/// The largest remaining length of an MQTT packet (a four-byte variable-length integer).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The default byte mark of a subscriber's queue (`queue_high_bytes`): four payloads of the
/// default `max_payload`, or a burst of about 140,000 messages of 200 bytes (each counted with
/// its topic and 256 bytes of overhead) taken without pausing.
pub const DEFAULT_QUEUE_HIGH_BYTES: u64 = 64 * 1024 * 1024;

/// A value MQTT cannot carry, or a flow may not send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A string over 65,535 bytes.
    #[error("{field} is {len} bytes long (UTF-8, starting {preview}); MQTT allows at most 65535")]
    TooLong {
        /// What the string is (e.g. `LocalEnvironment.Destination.MQTT.Output.TopicName`).
        field: String,
        /// Its length in bytes.
        len: usize,
        /// Its beginning, quoted.
        preview: String,
    },
    /// A string with a NUL character (MQTT forbids U+0000 in strings).
    #[error("{field} {preview} contains a NUL character, which MQTT does not allow")]
    Nul {
        /// What the string is.
        field: String,
        /// The string, quoted and shortened.
        preview: String,
    },
    /// A topic name starting with `$` (the broker's own topics).
    #[error("{field} {preview} starts with '$': topics starting with '$' belong to the broker ($SYS/...), so a flow may not publish there; set \"allow_dollar_topics\": true on the node if it must")]
    DollarTopic {
        /// What the topic is.
        field: String,
        /// The topic, quoted and shortened.
        preview: String,
    },
    /// A payload over the node's `max_payload`.
    #[error("{field} is {len} bytes, more than max_payload ({max} bytes)")]
    PayloadTooLarge {
        /// What the payload is (`Root.Body`, `the received payload`).
        field: String,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A PUBLISH packet larger than MQTT allows (payload, topic and properties together).
    #[error("the PUBLISH packet would be {len} bytes (topic, properties and payload); MQTT allows at most {MAX_REMAINING_LENGTH}")]
    PacketTooLarge {
        /// The packet's remaining length.
        len: usize,
    },
}

/// A string quoted for a message: the first 40 characters, and `…` when there is more (a
/// 70,000-byte topic must not end up whole in every log entry).
pub fn preview(s: &str) -> String {
    const SHOWN: usize = 40;
    match s.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// A string MQTT writes with a two-byte length: at most [`MAX_STRING`] bytes, no NUL.
pub fn check_string(field: &str, s: &str) -> Result<(), LimitError> {
    if s.len() > MAX_STRING {
        return Err(LimitError::TooLong {
            field: field.to_string(),
            len: s.len(),
            preview: preview(s),
        });
    }
    if s.as_bytes().contains(&0) {
        return Err(LimitError::Nul {
            field: field.to_string(),
            preview: preview(s),
        });
    }
    Ok(())
}

/// Whether a flow may publish to `topic`: names starting with `$` only when `allowed`.
pub fn check_dollar(field: &str, topic: &str, allowed: bool) -> Result<(), LimitError> {
    if topic.starts_with('$') && !allowed {
        return Err(LimitError::DollarTopic {
            field: field.to_string(),
            preview: preview(topic),
        });
    }
    Ok(())
}

/// A payload of `len` bytes against the limit `max`.
pub fn check_payload(field: &str, len: usize, max: usize) -> Result<(), LimitError> {
    if len > max {
        return Err(LimitError::PayloadTooLarge {
            field: field.to_string(),
            len,
            max,
        });
    }
    Ok(())
}

/// User properties: each key and value an MQTT string.
pub fn check_user_properties(field: &str, props: &[(String, String)]) -> Result<(), LimitError> {
    for (k, v) in props {
        check_string(&format!("{field} key {}", preview(k)), k)?;
        check_string(&format!("{field}.{k}"), v)?;
    }
    Ok(())
}

/// The remaining length of a PUBLISH packet: topic (with its length), packet id at QoS 1/2,
/// the v5 properties (user properties only: that is all flowbus sends) with their length,
/// and the payload; an error when MQTT cannot carry it.
pub fn check_packet(
    topic: &str,
    qos: u8,
    v5_user_properties: Option<&[(String, String)]>,
    payload: usize,
) -> Result<(), LimitError> {
    let mut len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload;
    if let Some(props) = v5_user_properties {
        // Identifier byte, then two length-prefixed strings, per property.
        let p: usize = props
            .iter()
            .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
            .sum();
        len += varint_len(p) + p;
    }
    if len > MAX_REMAINING_LENGTH {
        return Err(LimitError::PacketTooLarge { len });
    }
    Ok(())
}

/// Bytes of MQTT's variable-length integer for `n`.
fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_longer_than_mqtt_can_say_are_refused_with_a_short_preview() {
        assert_eq!(check_string("topic", &"a".repeat(65_535)), Ok(()));
        let e = check_string("TopicName", &"a".repeat(70_000)).unwrap_err();
        assert_eq!(
            e,
            LimitError::TooLong {
                field: "TopicName".into(),
                len: 70_000,
                preview: format!("{:?}…", "a".repeat(40)),
            }
        );
        let text = e.to_string();
        assert!(
            text.starts_with("TopicName is 70000 bytes long (UTF-8, starting \"aaaa")
                && text.ends_with("MQTT allows at most 65535"),
            "{text}"
        );
        assert!(text.len() < 200, "{text}");
        // Bytes, not characters: 30,000 three-byte characters are 90,000 bytes.
        assert!(matches!(
            check_string("k", &"€".repeat(30_000)),
            Err(LimitError::TooLong { len: 90_000, .. })
        ));
        assert!(matches!(
            check_string("k", "a\0b"),
            Err(LimitError::Nul { .. })
        ));
    }

    #[test]
    fn dollar_topics_need_permission() {
        assert!(check_dollar("topic", "$SYS/broker/x", false).is_err());
        assert!(check_dollar("topic", "$share/g/t", false).is_err());
        assert_eq!(check_dollar("topic", "$SYS/broker/x", true), Ok(()));
        assert_eq!(check_dollar("topic", "plant/$x", false), Ok(()));
        let text = check_dollar("TopicName", "$SYS/x", false)
            .unwrap_err()
            .to_string();
        assert!(text.contains("allow_dollar_topics"), "{text}");
    }

    #[test]
    fn payloads_over_the_limit_say_size_and_limit() {
        assert_eq!(check_payload("Root.Body", 10, 10), Ok(()));
        assert_eq!(
            check_payload("Root.Body", 11, 10).unwrap_err().to_string(),
            "Root.Body is 11 bytes, more than max_payload (10 bytes)"
        );
    }

    #[test]
    fn user_properties_are_mqtt_strings() {
        let ok = vec![("trace".to_string(), "t-1".to_string())];
        assert_eq!(check_user_properties("UserProperties", &ok), Ok(()));
        let long_value = vec![("k".to_string(), "v".repeat(65_536))];
        let e = check_user_properties("UserProperties", &long_value).unwrap_err();
        assert!(
            matches!(&e, LimitError::TooLong { field, len: 65_536, .. } if field == "UserProperties.k"),
            "{e:?}"
        );
        let long_key = vec![("k".repeat(65_536), "v".to_string())];
        let e = check_user_properties("UserProperties", &long_key).unwrap_err();
        assert!(e.to_string().starts_with("UserProperties key \"kkk"), "{e}");
    }

    #[test]
    fn a_packet_fits_in_mqtts_remaining_length_or_is_refused() {
        let max = MAX_REMAINING_LENGTH;
        // 2 (topic length) + 1 (topic) + payload.
        assert_eq!(check_packet("t", 0, None, max - 3), Ok(()));
        assert_eq!(
            check_packet("t", 0, None, max - 2),
            Err(LimitError::PacketTooLarge { len: max + 1 })
        );
        // QoS 1/2 add a packet id.
        assert!(check_packet("t", 1, None, max - 3).is_err());
        // v5 properties: length (1 byte here) and 1 + 2 + 1 + 2 + 1 bytes for one pair.
        let props = vec![("k".to_string(), "v".to_string())];
        assert_eq!(check_packet("t", 0, Some(&props), max - 3 - 8), Ok(()));
        assert!(check_packet("t", 0, Some(&props), max - 3 - 7).is_err());
        assert_eq!(varint_len(127), 1);
        assert_eq!(varint_len(128), 2);
        assert_eq!(varint_len(2_097_152), 4);
    }
}
