//! Builders for the cache operations a plugin returns, one per WIT [`Op`] case.
//!
//! Keys, fields, members and channels take anything that converts into a `String`; values and
//! messages anything that converts into bytes (`&str`, `String`, `&[u8]`, `Vec<u8>`). Expiries
//! are in milliseconds, as in Redis's `PX`/`PEXPIRE`. Every operation is idempotent, so a
//! redelivered change is harmless; there is deliberately no increment.
//!
//! ```
//! use keepwarm_guest::{Op, ops};
//!
//! let ops: Vec<Op> = vec![
//!     ops::set_with_ttl("order:1001", r#"{"id":1001}"#, 60_000),
//!     ops::set_add("customer:42:orders", ["1001"]),
//!     ops::sorted_set_add("orders:by-total", [(149.90, "1001")]),
//!     ops::publish("invalidate", "order:1001"),
//! ];
//! assert_eq!(ops[0], ops::set_with_ttl("order:1001", "{\"id\":1001}".to_owned(), 60_000));
//! ```

use crate::{
    ExpireOp, FieldValue, HashSetOp, MembersOp, Op, PublishOp, ScoredMember, SetOp, SortedSetAddOp,
};

/// `SET key value`: store `value` under `key` with no expiry.
pub fn set(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
    Op::Set(SetOp {
        key: key.into(),
        value: value.into(),
        ttl_ms: None,
    })
}

/// `SET key value PX ttl_ms`: store `value` under `key`, expiring after `ttl_ms` milliseconds.
pub fn set_with_ttl(key: impl Into<String>, value: impl Into<Vec<u8>>, ttl_ms: u64) -> Op {
    Op::Set(SetOp {
        key: key.into(),
        value: value.into(),
        ttl_ms: Some(ttl_ms),
    })
}

/// `DEL key`.
pub fn del(key: impl Into<String>) -> Op {
    Op::Del(key.into())
}

/// `HSET key field value ...`: set some fields of the hash at `key`.
pub fn hash_set<F, V>(key: impl Into<String>, fields: impl IntoIterator<Item = (F, V)>) -> Op
where
    F: Into<String>,
    V: Into<Vec<u8>>,
{
    Op::HashSet(HashSetOp {
        key: key.into(),
        fields: fields
            .into_iter()
            .map(|(field, value)| FieldValue {
                field: field.into(),
                value: value.into(),
            })
            .collect(),
    })
}

/// `HDEL key field ...`: remove some fields of the hash at `key`.
pub fn hash_del(key: impl Into<String>, fields: impl IntoIterator<Item = impl Into<String>>) -> Op {
    Op::HashDel(members(key, fields))
}

/// `SADD key member ...`: add members to the set at `key`.
pub fn set_add(key: impl Into<String>, members: impl IntoIterator<Item = impl Into<String>>) -> Op {
    Op::SetAdd(self::members(key, members))
}

/// `SREM key member ...`: remove members from the set at `key`.
pub fn set_remove(
    key: impl Into<String>,
    members: impl IntoIterator<Item = impl Into<String>>,
) -> Op {
    Op::SetRemove(self::members(key, members))
}

/// `ZADD key score member ...`: add members, as `(score, member)`, to the sorted set at `key`,
/// or re-score them.
pub fn sorted_set_add<M: Into<String>>(
    key: impl Into<String>,
    members: impl IntoIterator<Item = (f64, M)>,
) -> Op {
    Op::SortedSetAdd(SortedSetAddOp {
        key: key.into(),
        members: members
            .into_iter()
            .map(|(score, member)| ScoredMember {
                score,
                member: member.into(),
            })
            .collect(),
    })
}

/// `ZREM key member ...`: remove members from the sorted set at `key`.
pub fn sorted_set_remove(
    key: impl Into<String>,
    members: impl IntoIterator<Item = impl Into<String>>,
) -> Op {
    Op::SortedSetRemove(self::members(key, members))
}

/// `PEXPIRE key ttl_ms`: expire `key` after `ttl_ms` milliseconds.
pub fn expire(key: impl Into<String>, ttl_ms: u64) -> Op {
    Op::Expire(ExpireOp {
        key: key.into(),
        ttl_ms,
    })
}

/// `PUBLISH channel message`: an invalidation broadcast for in-process caches.
pub fn publish(channel: impl Into<String>, message: impl Into<Vec<u8>>) -> Op {
    Op::Publish(PublishOp {
        channel: channel.into(),
        message: message.into(),
    })
}

fn members(
    key: impl Into<String>,
    members: impl IntoIterator<Item = impl Into<String>>,
) -> MembersOp {
    MembersOp {
        key: key.into(),
        members: members.into_iter().map(Into::into).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(op: Op, expect: &str) {
        assert_eq!(format!("{op:?}"), expect);
    }

    #[test]
    fn builders_fill_the_wit_records() {
        check(
            set("k", "v"),
            r#"Op::Set(SetOp { key: "k", value: [118], ttl-ms: None })"#,
        );
        check(
            set_with_ttl("k", vec![1u8, 2], 1500),
            r#"Op::Set(SetOp { key: "k", value: [1, 2], ttl-ms: Some(1500) })"#,
        );
        check(del(String::from("k")), r#"Op::Del("k")"#);
        check(
            hash_set("h", [("a", "1"), ("b", "2")]),
            r#"Op::HashSet(HashSetOp { key: "h", fields: [FieldValue { field: "a", value: [49] }, FieldValue { field: "b", value: [50] }] })"#,
        );
        check(
            hash_del("h", ["a"]),
            r#"Op::HashDel(MembersOp { key: "h", members: ["a"] })"#,
        );
        check(
            set_add("s", vec!["x".to_owned(), "y".to_owned()]),
            r#"Op::SetAdd(MembersOp { key: "s", members: ["x", "y"] })"#,
        );
        check(
            set_remove("s", ["x"]),
            r#"Op::SetRemove(MembersOp { key: "s", members: ["x"] })"#,
        );
        check(
            sorted_set_add("z", [(1.5, "m")]),
            r#"Op::SortedSetAdd(SortedSetAddOp { key: "z", members: [ScoredMember { score: 1.5, member: "m" }] })"#,
        );
        check(
            sorted_set_remove("z", ["m"]),
            r#"Op::SortedSetRemove(MembersOp { key: "z", members: ["m"] })"#,
        );
        check(
            expire("k", 60_000),
            r#"Op::Expire(ExpireOp { key: "k", ttl-ms: 60000 })"#,
        );
        check(
            publish("c", &b"bytes"[..]),
            r#"Op::Publish(PublishOp { channel: "c", message: [98, 121, 116, 101, 115] })"#,
        );
    }
}
