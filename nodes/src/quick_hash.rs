//! A cheap 64-bit hash for the per-message path: the in-flight store's keys (`c-17`, `s-3`),
//! the records' checksums, and the payload digests that recognise redelivered messages.
//!
//! std's `HashMap` hashes with SipHash-1-3, which costs about a thousand instructions for a
//! 200-byte payload and a few hundred for a five-byte key, several times per message. This
//! mixes eight bytes per step (FNV's prime, then a rotation: each step is a bijection of the
//! state, so every change to the input changes the result). It is not keyed against chosen
//! collisions: use it only for keys a peer cannot choose, or after [`digest`] (which is
//! seeded per process).

use std::hash::{BuildHasherDefault, Hasher};

const PRIME: u64 = 0x0000_0100_0000_01b3;
const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Mixes `bytes` into the state `h`.
pub fn mix(mut h: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(PRIME).rotate_left(29);
    }
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
    }
    h
}

/// The hash of `bytes`, the length mixed in first.
pub fn of(bytes: &[u8]) -> u64 {
    mix(OFFSET ^ bytes.len() as u64, bytes)
}

/// A digest of `parts` seeded per process (from std's random hash keys), so that a peer who
/// knows the function still cannot prepare two different inputs with one digest.
pub fn digest(parts: &[&[u8]]) -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(0u8)
    });
    parts
        .iter()
        .fold(seed, |h, p| mix(h ^ p.len() as u64, p).wrapping_mul(PRIME))
}

/// [`mix`] as a `Hasher`, for maps whose keys no peer chooses.
#[derive(Default, Clone, Copy)]
pub struct Quick(u64);

impl Hasher for Quick {
    fn finish(&self) -> u64 {
        // The last step's high bits are the best mixed; hashbrown takes its buckets from the
        // low bits and its tags from the top seven.
        self.0 ^ self.0.rotate_right(32)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = mix(self.0 ^ OFFSET, bytes);
    }
}

/// A `HashMap` hashing with [`Quick`].
pub type QuickMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<Quick>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_one_byte_change_and_every_length_gives_another_hash() {
        let base: Vec<u8> = (0..200u8).collect();
        let mut seen = HashSet::new();
        assert!(seen.insert(of(&base)));
        for i in 0..base.len() {
            let mut b = base.clone();
            b[i] ^= 1;
            assert!(seen.insert(of(&b)), "flipping byte {i} gave a known hash");
        }
        for n in 0..base.len() {
            assert!(seen.insert(of(&base[..n])), "prefix {n} gave a known hash");
        }
        // Trailing zeros are not lost.
        assert_ne!(of(&[1, 0]), of(&[1]));
    }

    #[test]
    fn digests_tell_parts_apart_and_repeat_within_the_process() {
        assert_eq!(digest(&[b"t", b"payload"]), digest(&[b"t", b"payload"]));
        assert_ne!(digest(&[b"t", b"payload"]), digest(&[b"tp", b"ayload"]));
        assert_ne!(digest(&[b"", b"x"]), digest(&[b"x", b""]));
    }

    #[test]
    fn store_keys_spread_over_a_maps_buckets() {
        // Keys as Paho makes them: low bits and top bits both vary.
        let mut low = HashSet::new();
        let mut top = HashSet::new();
        for i in 0..4096 {
            let mut h = Quick::default();
            std::hash::Hash::hash(&format!("s-{i}"), &mut h);
            let f = h.finish();
            low.insert(f & 1023);
            top.insert(f >> 57);
        }
        // 4,096 random draws would leave ~18 of 1,024 buckets empty, and no tag unused.
        assert!(
            low.len() > 950,
            "{} of 1024 low-bit buckets used",
            low.len()
        );
        assert!(top.len() >= 120, "{} of 128 tags used", top.len());
    }
}
