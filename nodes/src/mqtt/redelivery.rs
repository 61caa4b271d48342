//! Redelivery detection: which `Duplicate` messages a subscriber already received.

/// Recognises the QoS 1 messages a broker sends again after a reconnect — what it had sent
/// and not seen acknowledged when the connection closed, flagged `Duplicate` — that were in
/// fact received, so they are not processed twice.
///
/// A broker cannot reuse a packet id until the message that had it is acknowledged, so a
/// resent message with id `n` is either the last message received with id `n` or one that
/// never arrived. The filter therefore keeps, per packet id, a digest (topic and payload) of
/// the last message received with it: one entry per id the broker actually used, so it covers
/// whatever the broker had in flight — up to the 65,535 ids MQTT has — at 8 bytes an id, and
/// forgets nothing it may still need. A broker resends in order, so the resends of messages
/// that arrived come first: the first message of a connection that is not one of them ends
/// the recognition for that connection, and a later `Duplicate` with a repeated id, topic and
/// payload (a sensor sending the same value) is taken as new.
#[derive(Default)]
pub struct Redeliveries {
    /// Digest + 1 of the last message received with each packet id (0: none yet).
    last: Vec<u64>,
    /// The connection the previous message came on.
    connection: u64,
    /// Whether the messages of this connection so far were all recognised resends.
    resending: bool,
    /// The digests' hasher, seeded at random: a publisher who knows the function still does
    /// not know the seed to prepare a payload with another's digest.
    digests: foldhash::quality::RandomState,
}

impl Redeliveries {
    /// An empty filter.
    pub fn new() -> Redeliveries {
        Redeliveries::default()
    }

    fn key(&self, topic: &str, payload: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        // Slices hash with their lengths, so topic and payload cannot trade bytes.
        self.digests
            .hash_one((topic.as_bytes(), payload))
            .wrapping_add(1)
    }

    /// Remembers a message received before this run without checking it (a message replayed
    /// from the input journal): the broker may send it again, not knowing it arrived.
    pub fn remember(&mut self, msgid: u16, topic: &str, payload: &[u8]) {
        self.set(msgid, self.key(topic, payload));
    }

    fn set(&mut self, msgid: u16, key: u64) {
        let i = usize::from(msgid);
        if i >= self.last.len() {
            // Grows with the ids the broker uses (mosquitto counts up through all of them).
            self.last.resize(
                (i + 1).next_power_of_two().min(usize::from(u16::MAX) + 1),
                0,
            );
        }
        self.last[i] = key;
    }

    /// Records a QoS 1/2 message received on connection number `connection` (counted up at
    /// each connect); returns true when it is a resend of one already received.
    pub fn is_redelivery(
        &mut self,
        connection: u64,
        dup: bool,
        msgid: u16,
        topic: &str,
        payload: &[u8],
    ) -> bool {
        if connection != self.connection {
            self.connection = connection;
            self.resending = true;
        }
        let key = self.key(topic, payload);
        let seen = self.last.get(usize::from(msgid)) == Some(&key);
        if dup && seen && self.resending {
            return true;
        }
        self.resending = false;
        self.set(msgid, key);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redeliveries_are_recognised_by_id_and_content() {
        let mut r = Redeliveries::new();
        assert!(!r.is_redelivery(1, false, 1, "t", b"a"));
        assert!(!r.is_redelivery(1, false, 2, "t", b"b"));
        // Reconnected: the broker resends what it had not seen acknowledged.
        assert!(r.is_redelivery(2, true, 1, "t", b"a"));
        assert!(r.is_redelivery(2, true, 2, "t", b"b"));
        // Then one that never arrived (same id as an old one, other content): new.
        assert!(!r.is_redelivery(2, true, 3, "t", b"c"));
        // Not flagged: always new (a reused id).
        assert!(!r.is_redelivery(2, false, 1, "t", b"a"));
        // Flagged, with the id and content of the last message with that id, but after a
        // message that was not a resend: the resends are over (a repeated value), new.
        assert!(!r.is_redelivery(2, true, 2, "t", b"b"));
        // Same content, other id: new.
        assert!(!r.is_redelivery(3, true, 9, "t", b"a"));
    }

    /// A new message whose payload differs from the last one with its packet id in two words
    /// is not taken for a resend (the hand-written digest this replaced gave both payloads the
    /// same digest whatever its seed: bit 63 of one word, bit 28 of the next).
    #[test]
    fn payloads_differing_in_two_words_are_not_taken_for_resends() {
        let a = [0u8; 16];
        let mut b = a;
        b[7] ^= 0x80;
        b[11] ^= 0x10;
        for _ in 0..100 {
            let mut r = Redeliveries::new();
            assert!(!r.is_redelivery(1, false, 1, "t", &a));
            assert!(!r.is_redelivery(2, true, 1, "t", &b));
        }
    }

    /// Whatever the broker's in-flight window, a resend is recognised: the filter keeps the
    /// last message of every packet id, not the last N messages.
    #[test]
    fn redeliveries_are_recognised_across_the_whole_packet_id_space() {
        let mut r = Redeliveries::new();
        // 200,000 messages: ids 1..=65,535 three times over and then some.
        let id = |n: u32| (n % 65_535 + 1) as u16;
        for n in 0..200_000u32 {
            assert!(!r.is_redelivery(1, false, id(n), "t", &n.to_le_bytes()));
        }
        // The broker had the last 60,000 in flight when the connection closed.
        for n in 140_000..200_000u32 {
            assert!(
                r.is_redelivery(2, true, id(n), "t", &n.to_le_bytes()),
                "{n}"
            );
        }
        // A message replayed from the journal is known too.
        r.remember(7, "j", b"x");
        assert!(r.is_redelivery(3, true, 7, "j", b"x"));
        assert!(r.last.len() <= 65_536);
    }
}
