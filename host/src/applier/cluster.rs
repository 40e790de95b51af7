//! Redis Cluster hash slots: which of the 16384 slots a key lands on (CRC16 of its hash tag or
//! of the whole key), as `CLUSTER KEYSLOT` computes it.
//!
//! The applier groups a batch's commands by slot (a cluster pipeline may not cross slots), and
//! [`super::versioned::version_key`] picks a companion key in its data key's slot.

use std::sync::OnceLock;

/// A Redis Cluster hash slot, `0..16384`.
pub(crate) type HashSlot = u16;

const SLOTS: u16 = 16384;

/// The part of a key Redis Cluster hashes: the content of the first `{…}` when it is not empty.
pub(crate) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// The hash slot of a key.
pub(crate) fn key_slot(key: &str) -> HashSlot {
    crc16(hash_tag(key).unwrap_or(key).as_bytes()) % SLOTS
}

/// A short hash tag for every slot: the first decimal number that hashes to it.
pub(crate) fn slot_tag(slot: HashSlot) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = SLOTS;
        let mut n = 0u64;
        while missing > 0 {
            let text = n.to_string();
            let slot = usize::from(key_slot(&text));
            if tags[slot].is_empty() {
                tags[slot] = text;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot)]
}

/// CRC16-CCITT (XMODEM), the hash of Redis Cluster.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from the Redis Cluster specification's test vectors and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(
            key_slot("{user1000}.following"),
            key_slot("{user1000}.followers")
        );
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for slot in [0, 1, 12182, SLOTS - 1] {
            assert_eq!(key_slot(slot_tag(slot)), slot);
        }
    }
}
