//! `Op`: the cache operations plugins return, as plain data.
//!
//! The runtime converts the WIT `op` variant into this enum (`runtime/convert.rs`); the applier
//! turns it into Redis commands. Every operation is idempotent, so a redelivered message is
//! harmless.

use serde::Deserialize;

/// One cache operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `SET key value [PX ttl_ms]`.
    Set {
        /// Key to write.
        key: String,
        /// Value to store.
        value: Vec<u8>,
        /// Expiry in milliseconds.
        ttl_ms: Option<u64>,
    },
    /// `DEL key`.
    Del {
        /// Key to delete.
        key: String,
    },
    /// `HSET key field value …`.
    HashSet {
        /// The hash.
        key: String,
        /// Fields and their values.
        fields: Vec<(String, Vec<u8>)>,
    },
    /// `HDEL key field …`.
    HashDel {
        /// The hash.
        key: String,
        /// Fields to delete.
        fields: Vec<String>,
    },
    /// `SADD key member …`.
    SetAdd {
        /// The set.
        key: String,
        /// Members to add.
        members: Vec<String>,
    },
    /// `SREM key member …`.
    SetRemove {
        /// The set.
        key: String,
        /// Members to remove.
        members: Vec<String>,
    },
    /// `ZADD key score member …`.
    SortedSetAdd {
        /// The sorted set.
        key: String,
        /// Scores and members.
        members: Vec<(f64, String)>,
    },
    /// `ZREM key member …`.
    SortedSetRemove {
        /// The sorted set.
        key: String,
        /// Members to remove.
        members: Vec<String>,
    },
    /// `PEXPIRE key ttl_ms`.
    Expire {
        /// Key to expire.
        key: String,
        /// Time to live in milliseconds.
        ttl_ms: u64,
    },
    /// `PUBLISH channel message`.
    Publish {
        /// Channel to publish on.
        channel: String,
        /// The payload, as bytes.
        message: Vec<u8>,
    },
}

impl Op {
    /// The key the operation writes, or the channel of a publish.
    pub fn key(&self) -> &str {
        match self {
            Op::Set { key, .. }
            | Op::Del { key }
            | Op::HashSet { key, .. }
            | Op::HashDel { key, .. }
            | Op::SetAdd { key, .. }
            | Op::SetRemove { key, .. }
            | Op::SortedSetAdd { key, .. }
            | Op::SortedSetRemove { key, .. }
            | Op::Expire { key, .. } => key,
            Op::Publish { channel, .. } => channel,
        }
    }

    /// The command name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Set { .. } => "SET",
            Op::Del { .. } => "DEL",
            Op::HashSet { .. } => "HSET",
            Op::HashDel { .. } => "HDEL",
            Op::SetAdd { .. } => "SADD",
            Op::SetRemove { .. } => "SREM",
            Op::SortedSetAdd { .. } => "ZADD",
            Op::SortedSetRemove { .. } => "ZREM",
            Op::Expire { .. } => "PEXPIRE",
            Op::Publish { .. } => "PUBLISH",
        }
    }

    /// The kind of the operation, as manifests and `keepwarm test` name it.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Set { .. } => OpKind::Set,
            Op::Del { .. } => OpKind::Del,
            Op::HashSet { .. } => OpKind::HashSet,
            Op::HashDel { .. } => OpKind::HashDel,
            Op::SetAdd { .. } => OpKind::SetAdd,
            Op::SetRemove { .. } => OpKind::SetRemove,
            Op::SortedSetAdd { .. } => OpKind::SortedSetAdd,
            Op::SortedSetRemove { .. } => OpKind::SortedSetRemove,
            Op::Expire { .. } => OpKind::Expire,
            Op::Publish { .. } => OpKind::Publish,
        }
    }

    /// The number of payload bytes the operation carries (values and members), for limits.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::Set { value, .. } => value.len(),
            Op::Del { .. } | Op::Expire { .. } => 0,
            Op::HashSet { fields, .. } => fields.iter().map(|(f, v)| f.len() + v.len()).sum(),
            Op::HashDel {
                fields: members, ..
            }
            | Op::SetAdd { members, .. }
            | Op::SetRemove { members, .. }
            | Op::SortedSetRemove { members, .. } => members.iter().map(String::len).sum(),
            Op::SortedSetAdd { members, .. } => members.iter().map(|(_, m)| m.len() + 8).sum(),
            Op::Publish { message, .. } => message.len(),
        }
    }

    /// The operation as JSON, the output format of `keepwarm test` (values as UTF-8 text when
    /// they are, otherwise as an array of bytes).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Op::Set { key, value, ttl_ms } => match ttl_ms {
                Some(ttl) => json!({"op": "set", "key": key, "value": bytes(value), "ttl_ms": ttl}),
                None => json!({"op": "set", "key": key, "value": bytes(value)}),
            },
            Op::Del { key } => json!({"op": "del", "key": key}),
            Op::HashSet { key, fields } => {
                let fields: serde_json::Map<String, serde_json::Value> =
                    fields.iter().map(|(f, v)| (f.clone(), bytes(v))).collect();
                json!({"op": "hash-set", "key": key, "fields": fields})
            }
            Op::HashDel { key, fields } => json!({"op": "hash-del", "key": key, "fields": fields}),
            Op::SetAdd { key, members } => json!({"op": "set-add", "key": key, "members": members}),
            Op::SetRemove { key, members } => {
                json!({"op": "set-remove", "key": key, "members": members})
            }
            Op::SortedSetAdd { key, members } => {
                let members: Vec<_> = members.iter().map(|(s, m)| json!([s, m])).collect();
                json!({"op": "sorted-set-add", "key": key, "members": members})
            }
            Op::SortedSetRemove { key, members } => {
                json!({"op": "sorted-set-remove", "key": key, "members": members})
            }
            Op::Expire { key, ttl_ms } => json!({"op": "expire", "key": key, "ttl_ms": ttl_ms}),
            Op::Publish { channel, message } => {
                json!({"op": "publish", "channel": channel, "message": bytes(message)})
            }
        }
    }
}

fn bytes(value: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(value) {
        Ok(text) => serde_json::Value::String(text.to_owned()),
        Err(_) => serde_json::Value::from(value.to_vec()),
    }
}

/// The kind of an operation, as a manifest's `ops` list and `keepwarm test`'s JSON name it
/// (`set`, `del`, `hash-set`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// `set`.
    Set,
    /// `del`.
    Del,
    /// `hash-set`.
    HashSet,
    /// `hash-del`.
    HashDel,
    /// `set-add`.
    SetAdd,
    /// `set-remove`.
    SetRemove,
    /// `sorted-set-add`.
    SortedSetAdd,
    /// `sorted-set-remove`.
    SortedSetRemove,
    /// `expire`.
    Expire,
    /// `publish`.
    Publish,
}

impl OpKind {
    /// The name as written in manifests and in `keepwarm test`'s output.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Set => "set",
            OpKind::Del => "del",
            OpKind::HashSet => "hash-set",
            OpKind::HashDel => "hash-del",
            OpKind::SetAdd => "set-add",
            OpKind::SetRemove => "set-remove",
            OpKind::SortedSetAdd => "sorted-set-add",
            OpKind::SortedSetRemove => "sorted-set-remove",
            OpKind::Expire => "expire",
            OpKind::Publish => "publish",
        }
    }

    /// The kind named `name` (`keepwarm test`'s `"op"` field).
    pub fn parse(name: &str) -> Option<OpKind> {
        ALL_KINDS.iter().copied().find(|kind| kind.as_str() == name)
    }
}

const ALL_KINDS: [OpKind; 10] = [
    OpKind::Set,
    OpKind::Del,
    OpKind::HashSet,
    OpKind::HashDel,
    OpKind::SetAdd,
    OpKind::SetRemove,
    OpKind::SortedSetAdd,
    OpKind::SortedSetRemove,
    OpKind::Expire,
    OpKind::Publish,
];

/// The kind of cache the operations are written to, which decides the operations it can take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheKind {
    /// Redis or a Redis Cluster: every operation.
    #[default]
    Redis,
    /// Memcached: `set`, `del` and `expire` only (it has no hashes, sets, sorted sets or
    /// publish).
    Memcached,
}

impl CacheKind {
    /// Whether this cache can apply operations of `kind`.
    pub fn supports(self, kind: OpKind) -> bool {
        match self {
            CacheKind::Redis => true,
            CacheKind::Memcached => matches!(kind, OpKind::Set | OpKind::Del | OpKind::Expire),
        }
    }

    /// The cache's name, for errors.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheKind::Redis => "redis",
            CacheKind::Memcached => "memcached",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_back_their_names_and_memcached_takes_three() {
        for kind in ALL_KINDS {
            assert_eq!(OpKind::parse(kind.as_str()), Some(kind));
        }
        let supported: Vec<_> = ALL_KINDS
            .into_iter()
            .filter(|k| CacheKind::Memcached.supports(*k))
            .collect();
        assert_eq!(supported, [OpKind::Set, OpKind::Del, OpKind::Expire]);
        assert!(ALL_KINDS.into_iter().all(|k| CacheKind::Redis.supports(k)));
    }
}
