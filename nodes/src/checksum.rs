//! The records' checksum of the in-flight store ([`crate::mqtt_store`]) and the input journal
//! ([`crate::input_journal`]): 64 bits mixed eight bytes a step (FNV's prime, then a
//! rotation), folded to 32.
//!
//! Kept hand-written because it is part of those files' format: files written by earlier
//! versions must still verify, and general-purpose hashers (foldhash) do not promise the same
//! output across versions. It detects damage; it is not keyed and resists nothing chosen.

const PRIME: u64 = 0x0000_0100_0000_01b3;
const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The checksum of a record's bytes.
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut h = OFFSET ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(PRIME).rotate_left(29);
    }
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
    }
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_the_one_files_were_written_with() {
        // Values of the function that wrote the files of earlier versions: a change here makes
        // every existing in-flight store and input journal unreadable.
        let all: Vec<u8> = (0..=255).collect();
        let cases: [(&[u8], u32); 4] = [
            (b"", 0x4fd0_bfc1),
            (b"a", 0x2962_3373),
            (b"flowbus", 0x9389_f5e4),
            (&all, 0x7a01_dfe2),
        ];
        for (bytes, want) in cases {
            assert_eq!(checksum(bytes), want, "{bytes:?}");
        }
        assert_ne!(checksum(&[1, 0]), checksum(&[1]));
    }
}
