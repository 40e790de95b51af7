//! `keepwarm version`: the versions keepwarm stores for a cache key, for operators debugging a
//! cache ("why does this key hold that?").
//!
//! It reads the key's companion (see [`crate::applier::versioned`]) and the key itself, and
//! shows the key's version, whether it is a tombstone, and the version of every member (set and
//! sorted-set members, hash fields), as `commit_lsn/commit_idx` with the LSN also in Postgres
//! notation (`0/4A1C2F88`). With Memcached as the cache it reads the key's envelope (see
//! `applier/memcached/envelope.rs`) on the server the ring puts it on, and that server's floor.
//! It only reads.

use crate::applier::cluster::{HashSlot, key_slot};
use crate::applier::memcached::envelope::{self, Item};
use crate::applier::memcached::{self, ClientError};
use crate::applier::versioned::{KEY_FIELD, VersionField, parse_version, version_key};
use crate::config::{Config, ConfigError};
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
    /// The configuration has no cache Redis.
    #[error(transparent)]
    NoRedis(#[from] ConfigError),
    /// A Memcached server cannot be reached or failed.
    #[error("cannot read from memcached {server}: {error}")]
    Memcached {
        /// The server.
        server: String,
        /// What failed.
        error: ClientError,
    },
    /// Redis refused a read.
    #[error("cannot read {key} and {versions_key}: {error}")]
    Read {
        /// The data key.
        key: String,
        /// Its companion (the versions key).
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
    /// The companion holding the versions: a string (the key's version) or a hash.
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

/// What `keepwarm version` found, on the cache the configuration names.
#[derive(Debug)]
pub enum Report {
    /// The key and its companion in Redis.
    Redis(KeyVersions),
    /// The key's envelope in Memcached.
    Memcached(MemcachedKey),
}

impl Report {
    /// A human-readable report.
    pub fn to_text(&self) -> String {
        match self {
            Report::Redis(report) => report.to_text(),
            Report::Memcached(report) => report.to_text(),
        }
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Report::Redis(report) => report.to_json(),
            Report::Memcached(report) => report.to_json(),
        }
    }
}

/// What a Memcached key holds, read through its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct MemcachedKey {
    /// The key.
    pub key: String,
    /// The server the ring puts it on.
    pub server: String,
    /// The item's size in bytes (`None`: missing).
    pub bytes: Option<usize>,
    /// Its remaining time to live in seconds (`None`: none, or missing).
    pub ttl_secs: Option<i64>,
    /// What it holds.
    pub stored: Stored,
    /// The version of the server's floor, which a missing key counts as holding.
    pub floor: Option<Version>,
}

/// What a Memcached item holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Nothing: not cached.
    Missing,
    /// A value written by a change at this version.
    Value(Version),
    /// A value a backfill read filled (no version).
    Read,
    /// A delete's tombstone at this version.
    Tombstone(Version),
    /// Not an envelope (a plain-mode plugin's value, or another client's): no version.
    Foreign,
}

impl Stored {
    fn name(self) -> &'static str {
        match self {
            Stored::Missing => "missing",
            Stored::Value(_) => "value",
            Stored::Read => "read",
            Stored::Tombstone(_) => "tombstone",
            Stored::Foreign => "foreign",
        }
    }

    fn version(self) -> Option<Version> {
        match self {
            Stored::Value(version) | Stored::Tombstone(version) => Some(version),
            Stored::Missing | Stored::Read | Stored::Foreign => None,
        }
    }
}

impl MemcachedKey {
    /// A human-readable report.
    pub fn to_text(&self) -> String {
        let ttl = self
            .ttl_secs
            .map_or("none".to_owned(), |secs| format!("{secs} s"));
        let mut out = match self.bytes {
            Some(bytes) => format!(
                "key:      {} (memcached {}, {bytes} bytes, ttl {ttl})\n",
                self.key, self.server
            ),
            None => format!(
                "key:      {} (memcached {}, missing)\n",
                self.key, self.server
            ),
        };
        out += &match self.stored {
            Stored::Missing => "not cached\n".to_owned(),
            Stored::Value(version) => format!("version:  {}\n", describe(version)),
            Stored::Read => {
                "no version stored: filled by a backfill read (any change overwrites it)\n"
                    .to_owned()
            }
            Stored::Tombstone(version) => format!(
                "version:  {}\ntombstone: the key was deleted; writes older than its version are skipped\n",
                describe(version)
            ),
            Stored::Foreign => {
                "no version stored: not a keepwarm envelope (a plain-mode value, or another client's); any change overwrites it\n"
                    .to_owned()
            }
        };
        if let Some(floor) = self.floor {
            out += &format!(
                "floor:    {} (raised after a lost connection; a missing key counts as holding it)\n",
                describe(floor)
            );
        }
        out
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let version = |v: Version| json!({"commit_lsn": v.lsn, "commit_idx": v.idx});
        json!({
            "key": self.key,
            "cache": "memcached",
            "server": self.server,
            "bytes": self.bytes,
            "ttl_seconds": self.ttl_secs,
            "stored": self.stored.name(),
            "version": self.stored.version().map(version),
            "tombstone": matches!(self.stored, Stored::Tombstone(_)),
            "floor": self.floor.map(version),
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

/// Reads the versions of `key` from the cache of `config`: Memcached, or Redis.
///
/// # Errors
///
/// The cache cannot be reached or refuses a command.
pub async fn read(config: &Config, key: &str) -> Result<Report, InspectError> {
    if let Some(servers) = &config.memcached {
        let peek = memcached::peek(servers, &config.versioning.key_prefix, key)
            .await
            .map_err(|(server, error)| InspectError::Memcached { server, error })?;
        let (bytes, ttl_secs, stored) = match &peek.item {
            None => (None, None, Stored::Missing),
            Some((item, ttl)) => {
                let stored = match envelope::decode(item) {
                    Item::Value {
                        version: Some(version),
                        ..
                    } => Stored::Value(version),
                    Item::Value { version: None, .. } => Stored::Read,
                    Item::Tombstone(version) => Stored::Tombstone(version),
                    Item::Foreign(_) => Stored::Foreign,
                };
                (Some(item.len()), (*ttl >= 0).then_some(*ttl), stored)
            }
        };
        return Ok(Report::Memcached(MemcachedKey {
            key: key.to_owned(),
            server: peek.server,
            bytes,
            ttl_secs,
            stored,
            floor: peek.floor,
        }));
    }
    read_redis(config, key).await.map(Report::Redis)
}

async fn read_redis(config: &Config, key: &str) -> Result<KeyVersions, InspectError> {
    let url = &config.require_redis("keepwarm version")?.url;
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
    let read_error = |error| InspectError::Read {
        key: key.to_owned(),
        versions_key: versions_key.clone(),
        error,
    };
    let (kind, ttl_ms, versions_kind, versions_ttl): (String, i64, String, i64) = redis::pipe()
        .cmd("TYPE")
        .arg(key)
        .cmd("PTTL")
        .arg(key)
        .cmd("TYPE")
        .arg(&versions_key)
        .cmd("PTTL")
        .arg(&versions_key)
        .query_async(&mut conn)
        .await
        .map_err(read_error)?;
    // The companion is a string (the key's version) or a hash (field "" and members' fields).
    let fields: Vec<(String, String)> = match versions_kind.as_str() {
        "string" => {
            let version: Option<String> = redis::cmd("GET")
                .arg(&versions_key)
                .query_async(&mut conn)
                .await
                .map_err(read_error)?;
            version
                .map(|version| (KEY_FIELD.to_owned(), version))
                .into_iter()
                .collect()
        }
        "hash" => redis::cmd("HGETALL")
            .arg(&versions_key)
            .query_async(&mut conn)
            .await
            .map_err(read_error)?,
        _ => Vec::new(),
    };
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
