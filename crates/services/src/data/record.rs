//! Record ids and the shard each one belongs to.
//!
//! An id is 128 random bits written as 32 lowercase hex digits. The shard is
//! `jump(fnv1a64(id text), N)`: a fixed hash (never std's per-process `RandomState`) so
//! every process, and any other implementation, puts an id in the same shard; and jump
//! consistent hashing (Lamping and Veach, 2014) so that growing N to N+1 moves only
//! 1/(N+1) of the keys.

use std::fmt;
use std::str::FromStr;

/// The id of a stored record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordId(u128);

impl RecordId {
    /// A fresh id from the thread's CSPRNG; collisions are as likely as guessing a
    /// 128-bit key.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// The shard of `shards` (at least 1) that holds this id.
    pub fn shard(self, shards: u32) -> u32 {
        jump_hash(fnv1a64(self.to_string().as_bytes()), shards)
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Text that is not exactly 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a record id is 32 lowercase hex digits")]
pub struct InvalidRecordId;

/// Strict: exactly 32 characters of `0-9a-f`, so each record has one spelling.
impl FromStr for RecordId {
    type Err = InvalidRecordId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(InvalidRecordId);
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| InvalidRecordId)
    }
}

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// Jump consistent hash: the bucket in `0..buckets` for `key` (0 when `buckets` is 0).
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets);
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < buckets {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        let jump = f64::from(1u32 << 31) / (((key >> 33) + 1) as f64);
        next = ((bucket + 1) as f64 * jump) as i64;
    }
    u32::try_from(bucket.max(0)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn ids_round_trip_strictly() {
        let id = RecordId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<RecordId>(), Ok(id));
        assert_eq!(
            "0000000000000000000000000000000a".parse::<RecordId>(),
            Ok(RecordId(10))
        );
        for bad in [
            "",
            "abc",
            "0000000000000000000000000000000A",
            "0000000000000000000000000000000g",
            "+000000000000000000000000000000a",
            "00000000000000000000000000000000a",
            " 0000000000000000000000000000000",
        ] {
            assert_eq!(bad.parse::<RecordId>(), Err(InvalidRecordId), "{bad:?}");
        }
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn jump_hash_matches_the_paper() {
        // Values of an independent transcription of the paper's C++ code.
        assert_eq!(jump_hash(1, 1), 0);
        assert_eq!(jump_hash(0, 10), 0);
        assert_eq!(jump_hash(1, 1000), 549);
        assert_eq!(jump_hash(0xdead_beef, 1000), 285);
        assert_eq!(jump_hash(0, 0), 0);
        for key in [1u64, 42, u64::MAX] {
            for n in 1..50 {
                assert!(jump_hash(key, n) < n);
            }
        }
    }

    #[test]
    fn ten_thousand_keys_spread_within_ten_percent_over_four_shards() {
        let mut rng = StdRng::seed_from_u64(2024);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            let id = RecordId(rng.random());
            counts[id.shard(4) as usize] += 1;
        }
        for count in counts {
            assert!((2_250..=2_750).contains(&count), "{counts:?}");
        }
        // The same keys from fresh random ids: the bound is not luck of one seed.
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[RecordId::random().shard(4) as usize] += 1;
        }
        for count in counts {
            assert!((2_250..=2_750).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn growing_the_shard_count_moves_few_keys() {
        let mut rng = StdRng::seed_from_u64(7);
        let ids: Vec<RecordId> = (0..10_000).map(|_| RecordId(rng.random())).collect();
        let moved = ids.iter().filter(|id| id.shard(4) != id.shard(5)).count();
        // Ideal is 1/5 of the keys; every moved key goes to the new shard.
        assert!((1_800..=2_200).contains(&moved), "{moved}");
        assert!(
            ids.iter()
                .filter(|id| id.shard(4) != id.shard(5))
                .all(|id| id.shard(5) == 4)
        );
    }

    #[test]
    fn shards_are_stable_across_processes() {
        // Pinned so a change of hash (which would strand stored records) fails here.
        let id: RecordId = "00000000000000000000000000000001".parse().unwrap();
        let pinned: Vec<u32> = (1..=8).map(|n| id.shard(n)).collect();
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [u32; 8] = [0, 1, 1, 3, 3, 3, 3, 3];
}
