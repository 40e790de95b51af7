//! `keepwarm version`: the versions keepwarm stores for a cache key, for operators debugging a
//! cache ("why does this key hold that?").
//!
//! It reads the key's companion hash (see [`crate::applier::versioned`]) and the key itself, and
//! shows the key's version, whether it is a tombstone, and the version of every member (set and
//! sorted-set members, hash fields), as `commit_lsn/commit_idx` with the LSN also in Postgres
//! notation (`0/4A1C2F88`). It only reads.

use crate::applier::cluster::{HashSlot, key_slot};
use crate::applier::versioned::{VersionField, parse_version, version_key};
use crate::config::Config;
use crate::message::Version;
use serde_json::json;

/// Why the versions of a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The URL is invalid or Redis cannot be reached.
    #[error("cannot connect to redis at {url}: {error}")]
    Connect {
        /// The configured URL.
        url: String,
        /// The client's error.
        error: redis::RedisError,
    },
    /// Redis refused a read.
    #[error("cannot read {key} and {versions_key}: {error}")]
    Read {
        /// The data key.
        key: String,
        /// Its companion hash.
        versions_key: String,
        /// The client's error.
        error: redis::RedisError,
    },
}

/// What Redis holds for one key and its versions.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyVersions {
    /// The data key.
    pub key: String,
    /// Its Redis type (`string`, `set`, …), `none` when it does not exist.
    pub kind: String,
    /// Its time to live in milliseconds, `None` without one (or when it does not exist).
    pub ttl_ms: Option<i64>,
    /// The companion hash holding the versions.
    pub versions_key: String,
    /// The Redis Cluster hash slot both share.
    pub slot: HashSlot,
    /// The companion's time to live in milliseconds (a tombstone's countdown).
    pub versions_ttl_ms: Option<i64>,
    /// The version of the last change written to the key as a whole (`set`, `del`, `expire`).
    pub version: Option<Version>,
    /// Per-member versions (hash fields, set and sorted-set members), by member.
    pub members: Vec<(String, Version)>,
    /// Companion fields that are not versions keepwarm writes (should be none).
    pub unknown: Vec<(String, String)>,
}

impl KeyVersions {
    /// Whether the versions outlive a deleted key: older writes arriving now are skipped.
    pub fn is_tombstone(&self) -> bool {
        self.kind == "none" && (self.version.is_some() || !self.members.is_empty())
    }

    /// A human-readable report.
    pub fn to_text(&self) -> String {
        let ttl = |ttl: Option<i64>| ttl.map_or("none".to_owned(), |ms| format!("{ms} ms"));
        let mut out = format!(
            "key:      {} ({}, ttl {})\nversions: {} (slot {}, ttl {})\n",
            self.key,
            self.kind,
            ttl(self.ttl_ms),
            self.versions_key,
            self.slot,
            ttl(self.versions_ttl_ms)
        );
        if self.version.is_none() && self.members.is_empty() {
            out +=
                "no version stored: no change has written this key (a backfill read may fill it)\n";
        }
        if let Some(version) = self.version {
            out += &format!("version:  {}\n", describe(version));
        }
        if self.is_tombstone() {
            out += "tombstone: the key was deleted; writes older than its versions are skipped\n";
        }
        for (member, version) in &self.members {
            out += &format!("member:   {member:?} {}\n", describe(*version));
        }
        for (field, value) in &self.unknown {
            out += &format!("unknown field {field:?} = {value:?}\n");
        }
        out
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let version = |v: Version| json!({"commit_lsn": v.lsn, "commit_idx": v.idx});
        json!({
            "key": self.key,
            "type": self.kind,
            "ttl_ms": self.ttl_ms,
            "versions_key": self.versions_key,
            "slot": self.slot,
            "versions_ttl_ms": self.versions_ttl_ms,
            "version": self.version.map(version),
            "tombstone": self.is_tombstone(),
            "members": self.members.iter().map(|(member, v)| {
                json!({"member": member, "commit_lsn": v.lsn, "commit_idx": v.idx})
            }).collect::<Vec<_>>(),
        })
    }
}

/// `lsn/idx (LSN X/Y)`.
fn describe(version: Version) -> String {
    format!(
        "{}/{} (commit_lsn {:X}/{:X}, commit_idx {})",
        version.lsn,
        version.idx,
        version.lsn >> 32,
        version.lsn & 0xFFFF_FFFF,
        version.idx
    )
}

/// Reads the versions of `key` from the cache Redis of `config`.
///
/// # Errors
///
/// Redis cannot be reached or refuses a command.
pub async fn read(config: &Config, key: &str) -> Result<KeyVersions, InspectError> {
    let url = &config.redis.url;
    let connect = |error| InspectError::Connect {
        url: url.clone(),
        error,
    };
    let mut conn = redis::Client::open(url.as_str())
        .map_err(connect)?
        .get_multiplexed_async_connection()
        .await
        .map_err(connect)?;
    let versions_key = version_key(&config.versioning.key_prefix, key);
    let ttl = |ms: i64| (ms >= 0).then_some(ms);
    let (kind, ttl_ms, fields, versions_ttl): (String, i64, Vec<(String, String)>, i64) =
        redis::pipe()
            .cmd("TYPE")
            .arg(key)
            .cmd("PTTL")
            .arg(key)
            .cmd("HGETALL")
            .arg(&versions_key)
            .cmd("PTTL")
            .arg(&versions_key)
            .query_async(&mut conn)
            .await
            .map_err(|error| InspectError::Read {
                key: key.to_owned(),
                versions_key: versions_key.clone(),
                error,
            })?;
    let mut report = KeyVersions {
        key: key.to_owned(),
        kind,
        ttl_ms: ttl(ttl_ms),
        slot: key_slot(key),
        versions_key,
        versions_ttl_ms: ttl(versions_ttl),
        version: None,
        members: Vec::new(),
        unknown: Vec::new(),
    };
    for (field, value) in fields {
        match (VersionField::parse(&field), parse_version(&value)) {
            (Some(VersionField::Key), Some(version)) => report.version = Some(version),
            (Some(VersionField::Member(member)), Some(version)) => {
                report.members.push((member.to_owned(), version));
            }
            _ => report.unknown.push((field, value)),
        }
    }
    report.members.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_described_with_the_lsn_in_postgres_notation() {
        assert_eq!(
            describe(Version {
                lsn: 1_243_361_160,
                idx: 0
            }),
            "1243361160/0 (commit_lsn 0/4A1C2F88, commit_idx 0)"
        );
    }

    #[test]
    fn a_deleted_key_with_versions_is_a_tombstone() {
        let mut report = KeyVersions {
            key: "orders:1".into(),
            kind: "none".into(),
            ttl_ms: None,
            versions_key: "kw:v:{orders:1}".into(),
            slot: key_slot("orders:1"),
            versions_ttl_ms: Some(1000),
            version: Some(Version { lsn: 5, idx: 2 }),
            members: Vec::new(),
            unknown: Vec::new(),
        };
        assert!(report.is_tombstone());
        assert!(report.to_text().contains("tombstone"));
        assert_eq!(report.to_json()["version"]["commit_lsn"], 5);
        report.version = None;
        assert!(!report.is_tombstone());
        assert!(report.to_text().contains("no version stored"));
    }
}
