//! A quick hasher for the hot path's small maps whose keys come from configuration or
//! the registry (service names, upstream addresses), never from clients: word at a
//! time (the multiply-rotate of rustc's `FxHasher`) instead of SipHash's rounds or
//! FNV's multiply per byte. Not for keys a client chooses: it does not resist flooding.

use std::hash::{BuildHasherDefault, Hasher};

/// The hasher; see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuickHasher(u64);

/// Builds [`QuickHasher`]s, for `HashMap::with_hasher` and friends.
pub type QuickBuild = BuildHasherDefault<QuickHasher>;

/// A `HashMap` with [`QuickHasher`].
pub type QuickMap<K, V> = std::collections::HashMap<K, V, QuickBuild>;

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl QuickHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for QuickHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for chunk in &mut words {
            let mut word = [0_u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0_u8; 8];
            if let Some(head) = word.get_mut(..rest.len()) {
                head.copy_from_slice(rest);
            }
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn equal_keys_hash_alike_and_near_keys_apart() {
        let build = QuickBuild::default();
        assert_eq!(
            build.hash_one("127.0.0.1:8080"),
            build.hash_one(String::from("127.0.0.1:8080"))
        );
        let hashes: std::collections::HashSet<u64> = (0..1000)
            .map(|port| build.hash_one(format!("127.0.0.1:{port}")))
            .collect();
        assert_eq!(hashes.len(), 1000, "no collisions among near addresses");
        // Length is part of the key: a short key and its zero-padded form differ.
        assert_ne!(build.hash_one(&b"ab"[..]), build.hash_one(&b"ab\0"[..]));
    }

    #[test]
    fn a_map_with_it_finds_what_it_holds() {
        let mut map: QuickMap<String, usize> = QuickMap::default();
        for i in 0..100 {
            map.insert(format!("service-{i}"), i);
        }
        for i in 0..100 {
            assert_eq!(map.get(format!("service-{i}").as_str()), Some(&i));
        }
        assert_eq!(map.get("service-100"), None);
    }
}
