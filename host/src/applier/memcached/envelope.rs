//! The envelope of a versioned value in Memcached: the version lives in the item itself, so that
//! one compare-and-set writes value and version together.
//!
//! ```text
//! byte 0       tag: 'v' a value written by a change, 'r' a value filled by a backfill read
//!              (no version), 't' a tombstone left by a delete (no payload)
//! bytes 1..9   commit LSN, big-endian u64 (zero for 'r')
//! bytes 9..17  commit index, big-endian u64 (zero for 'r')
//! bytes 17..   the value as the plugin wrote it
//! ```
//!
//! Another client reads a key this way: a miss or tag `t` means "not cached"; tags `v` and `r`
//! mean the value is everything after the first 17 bytes. An item in any other shape (written by
//! someone else) holds no version: a change overwrites it.

use crate::message::Version;

/// The header's length: tag, LSN, index.
pub(crate) const HEADER: usize = 17;

const VALUE: u8 = b'v';
const READ: u8 = b'r';
const TOMBSTONE: u8 = b't';

/// What an item holds, as keepwarm's versioned writes see it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item<'a> {
    /// A value, with the version of the change that wrote it (`None`: a backfill read's).
    Value {
        /// The change's version.
        version: Option<Version>,
        /// The value.
        payload: &'a [u8],
    },
    /// A delete's tombstone.
    Tombstone(Version),
    /// Not an envelope: the bytes as they are, without a version.
    Foreign(&'a [u8]),
}

impl Item<'_> {
    /// The version stored, if any.
    pub(crate) fn version(&self) -> Option<Version> {
        match self {
            Item::Value { version, .. } => *version,
            Item::Tombstone(version) => Some(*version),
            Item::Foreign(_) => None,
        }
    }
}

/// Reads an item.
pub(crate) fn decode(bytes: &[u8]) -> Item<'_> {
    if bytes.len() < HEADER {
        return Item::Foreign(bytes);
    }
    let number = |at: usize| {
        let mut be = [0; 8];
        be.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(be)
    };
    let version = Version {
        lsn: number(1),
        idx: number(9),
    };
    let payload = &bytes[HEADER..];
    match bytes[0] {
        VALUE => Item::Value {
            version: Some(version),
            payload,
        },
        READ if version == (Version { lsn: 0, idx: 0 }) => Item::Value {
            version: None,
            payload,
        },
        TOMBSTONE if payload.is_empty() => Item::Tombstone(version),
        _ => Item::Foreign(bytes),
    }
}

/// A value written at `version` (`None`: by a backfill read).
pub(crate) fn value(version: Option<Version>, payload: &[u8]) -> Vec<u8> {
    let tag = if version.is_some() { VALUE } else { READ };
    envelope(tag, version.unwrap_or(Version { lsn: 0, idx: 0 }), payload)
}

/// A tombstone at `version`.
pub(crate) fn tombstone(version: Version) -> Vec<u8> {
    envelope(TOMBSTONE, version, &[])
}

fn envelope(tag: u8, version: Version, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + payload.len());
    bytes.push(tag);
    bytes.extend_from_slice(&version.lsn.to_be_bytes());
    bytes.extend_from_slice(&version.idx.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_read_back() {
        let v = Version { lsn: 7, idx: 2 };
        let written = value(Some(v), b"{\"id\":1}");
        assert_eq!(&written[HEADER..], b"{\"id\":1}");
        assert_eq!(
            decode(&written),
            Item::Value {
                version: Some(v),
                payload: b"{\"id\":1}"
            }
        );
        assert_eq!(
            decode(&value(None, b"x")),
            Item::Value {
                version: None,
                payload: b"x"
            }
        );
        assert_eq!(decode(&tombstone(v)), Item::Tombstone(v));
        assert_eq!(decode(&tombstone(v)).version(), Some(v));
        assert_eq!(
            decode(b"plain text value"),
            Item::Foreign(b"plain text value")
        );
        let mut odd = tombstone(v);
        odd.push(b'!');
        assert!(matches!(decode(&odd), Item::Foreign(_)));
    }

    #[test]
    fn versions_compare_as_commit_order() {
        let older = Version { lsn: 9, idx: 10 };
        let newer = Version { lsn: 10, idx: 0 };
        let stored = decode(&value(Some(newer), b"a")).version();
        assert!(stored > Some(older));
    }
}
