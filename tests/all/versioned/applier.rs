//! The versioned script itself, through the applier: aggregates, companion lifetimes, cluster.

use crate::util::*;
use keepwarm::applier::{Applier, MessageOutcome, MessageWrites};
use keepwarm::message::Version;
use keepwarm::ops::Op;
use std::path::Path;

/// An applier on the Redis at `url` (tombstones kept an hour), and a reader of that Redis.
pub(super) async fn applier(url: &str) -> (Applier, Keys) {
    let config = ConfigBuilder::new(url, Path::new("unused"))
        .set("versioning", "tombstone_ttl_seconds = 3600")
        .parse();
    let applier = Applier::connect(&config).await.unwrap();
    (applier, Keys::connect(url).await)
}

/// Applies `ops` as one versioned message at `(lsn, 0)` (a read when `lsn` is 0) and returns how
/// many writes were skipped as stale.
pub(super) async fn apply(applier: &Applier, lsn: u64, ops: &[Op]) -> u64 {
    let writes = MessageWrites {
        version: (lsn > 0).then_some(Version { lsn, idx: 0 }),
        plain: &[],
        versioned: ops,
    };
    match applier.apply(&[writes], &[]).await.unwrap().remove(0) {
        MessageOutcome::Applied { stale } => stale,
        MessageOutcome::Refused(reason) => panic!("refused: {reason}"),
    }
}

pub(super) fn sadd(key: &str, member: &str) -> Op {
    Op::SetAdd {
        key: key.to_owned(),
        members: vec![member.to_owned()],
    }
}

pub(super) fn del(key: &str) -> Op {
    Op::Del {
        key: key.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delete_of_an_aggregate_keeps_what_was_written_after_it() {
    let (applier, keys) = applier(&redis_url()).await;
    let set = unique("agg-set");
    let hash = unique("agg-hash");
    let hset = |field: &str, value: &str| Op::HashSet {
        key: hash.clone(),
        fields: vec![(field.to_owned(), value.as_bytes().to_vec())],
    };
    apply(&applier, 0, &[sadd(&set, "from-read")]).await;
    apply(&applier, 10, &[sadd(&set, "m10"), hset("f10", "a")]).await;
    apply(&applier, 30, &[sadd(&set, "m30"), hset("f30", "b")]).await;
    // The delete at 20 arrives after the writes at 30: only what is older than 20 goes.
    assert_eq!(apply(&applier, 20, &[del(&set), del(&hash)]).await, 0);
    assert_eq!(keys.members(&set).await, ["m30"]);
    assert_eq!(keys.hkeys(&hash).await, ["f30"]);
    // Older than the delete: stale. Newer: applied.
    assert_eq!(apply(&applier, 15, &[sadd(&set, "m15")]).await, 1);
    assert_eq!(apply(&applier, 0, &[sadd(&set, "from-read")]).await, 1);
    assert_eq!(apply(&applier, 25, &[sadd(&set, "m25")]).await, 0);
    assert_eq!(keys.members(&set).await, ["m25", "m30"]);
    assert_eq!(keys.pttl(&version_key(&set)).await, -1);
    // A delete newer than everything removes everything and leaves a tombstone.
    apply(&applier, 40, &[del(&set)]).await;
    assert!(keys.members(&set).await.is_empty());
    // The tombstone is the key's version alone, as a string.
    assert_eq!(
        keys.get(&version_key(&set)).await.as_deref(),
        Some("00000000000000000040:00000000000000000000")
    );
    assert!(keys.pttl(&version_key(&set)).await > 3_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_versions_live_as_long_as_their_key_then_as_tombstones() {
    let (applier, keys) = applier(&redis_url()).await;
    let set = unique("ttl-set");
    let companion = version_key(&set);
    apply(&applier, 1, &[sadd(&set, "a")]).await;
    assert_eq!(keys.pttl(&companion).await, -1);
    apply(
        &applier,
        2,
        &[Op::Expire {
            key: set.clone(),
            ttl_ms: 100_000,
        }],
    )
    .await;
    let ttl = keys.pttl(&companion).await;
    assert!((1..=100_000).contains(&ttl), "{ttl}");
    // The last member goes, and with it the key: its versions become tombstones.
    let srem = Op::SetRemove {
        key: set.clone(),
        members: vec!["a".to_owned()],
    };
    apply(&applier, 3, &[srem]).await;
    assert!(keys.pttl(&companion).await > 3_000_000);
    assert_eq!(apply(&applier, 2, &[sadd(&set, "a")]).await, 1);
    assert!(keys.members(&set).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_touching_several_hash_slots_applies_on_redis_cluster() {
    let server = RedisServer::start_cluster().await;
    let (applier, keys) = applier(&server.url()).await;
    let set = |key: &str, value: &str| Op::Set {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        ttl_ms: None,
    };
    let ops = [
        set("user:1", "one"),
        set("email:a@example.com", "1"),
        sadd("{user:1}:tags", "x"),
        del("gone"),
        Op::Publish {
            channel: "invalidate".to_owned(),
            message: b"user:1".to_vec(),
        },
    ];
    assert_eq!(apply(&applier, 5, &ops).await, 0);
    assert_eq!(keys.get("user:1").await.as_deref(), Some("one"));
    assert_eq!(keys.get("email:a@example.com").await.as_deref(), Some("1"));
    assert_eq!(keys.members("{user:1}:tags").await, ["x"]);
    assert_eq!(apply(&applier, 4, &ops[..4]).await, 4);
    // What one call naming both keys would have met:
    let refused: redis::RedisResult<()> = keys
        .try_query(redis::cmd("DEL").arg("user:1").arg("email:a@example.com"))
        .await;
    assert_eq!(refused.unwrap_err().code(), Some("CROSSSLOT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepwarm_version_shows_what_is_stored_for_a_key() {
    let url = redis_url();
    let (applier, _) = applier(&url).await;
    let dir = TempDir::new("kw-version");
    let config = ConfigBuilder::new(&url, Path::new("unused")).write(&dir, "keepwarm.toml");
    let (row, set) = (unique("version-row"), unique("version-set"));
    let version = |key: &str, json: bool| {
        let mut args = vec!["version", "--config", &config, key];
        if json {
            args.push("--json");
        }
        let (ok, out, err) = keepwarm_cli(&args, "");
        assert!(ok, "{err}");
        out
    };
    let out = version(&row, false);
    assert!(out.contains("no version stored"), "{out}");
    let set_row = Op::Set {
        key: row.clone(),
        value: b"{}".to_vec(),
        ttl_ms: None,
    };
    apply(&applier, 1_243_361_160, &[set_row, sadd(&set, "a b")]).await;
    apply(&applier, 1_243_361_161, &[del(&row)]).await;
    let out = version(&row, false);
    assert!(
        out.contains("version:  1243361161/0 (commit_lsn 0/4A1C2F89, commit_idx 0)"),
        "{out}"
    );
    assert!(out.contains("tombstone"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&version(&set, true)).unwrap();
    assert_eq!(json["versions_key"], version_key(&set));
    assert_eq!(json["type"], "set");
    assert_eq!(json["tombstone"], false);
    assert_eq!(
        json["members"],
        serde_json::json!([{"member": "a b", "commit_lsn": 1_243_361_160u64, "commit_idx": 0}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_rebuilding_a_key_applies_every_operation() {
    let (applier, keys) = applier(&redis_url()).await;
    let set = unique("rebuild-set");
    let string = unique("rebuild-string");
    apply(&applier, 10, &[sadd(&set, "old")]).await;
    // Delete then refill, as a plugin rebuilds an aggregate: the refill is the same change, not
    // a stale write.
    let rebuild = [del(&set), sadd(&set, "a"), sadd(&set, "b")];
    assert_eq!(apply(&applier, 20, &rebuild).await, 0);
    assert_eq!(keys.members(&set).await, ["a", "b"]);
    // A value and then its time to live.
    let set_then_expire = [
        Op::Set {
            key: string.clone(),
            value: b"v".to_vec(),
            ttl_ms: None,
        },
        Op::Expire {
            key: string.clone(),
            ttl_ms: 100_000,
        },
    ];
    assert_eq!(apply(&applier, 20, &set_then_expire).await, 0);
    let ttl = keys.pttl(&string).await;
    assert!((1..=100_000).contains(&ttl), "{ttl}");
    // Redelivered, the message writes what it wrote; an older one is still stale.
    assert_eq!(apply(&applier, 20, &rebuild).await, 0);
    assert_eq!(keys.members(&set).await, ["a", "b"]);
    assert_eq!(apply(&applier, 15, &[sadd(&set, "c")]).await, 1);
    assert_eq!(keys.members(&set).await, ["a", "b"]);
}

fn set_op(key: &str, value: &str) -> Op {
    Op::Set {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        ttl_ms: None,
    }
}

/// The version string the script stores for `(lsn, 0)`.
fn stored(lsn: u64) -> String {
    format!("{lsn:020}:{:020}", 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_kept_in_a_hash_by_an_older_keepwarm_are_honoured_and_rewritten() {
    let (applier, keys) = applier(&redis_url()).await;
    let (row, gone) = (unique("v4-row"), unique("v4-gone"));
    // What contract v4 left: a value at version 20, and a tombstone at 20.
    let () = keys.query(redis::cmd("SET").arg(&row).arg("at 20")).await;
    for key in [&row, &gone] {
        let () = keys
            .query(
                redis::cmd("HSET")
                    .arg(version_key(key))
                    .arg("")
                    .arg(stored(20)),
            )
            .await;
    }
    let () = keys
        .query(redis::cmd("PEXPIRE").arg(version_key(&gone)).arg(3_600_000))
        .await;
    // Older writes are stale against them, as they were.
    assert_eq!(apply(&applier, 10, &[set_op(&row, "at 10")]).await, 1);
    assert_eq!(apply(&applier, 10, &[set_op(&gone, "at 10")]).await, 1);
    assert_eq!(apply(&applier, 0, &[set_op(&gone, "read")]).await, 1);
    assert_eq!(keys.get(&row).await.as_deref(), Some("at 20"));
    assert_eq!(keys.get(&gone).await, None);
    // A newer write applies and leaves the version as a string, without a time to live.
    assert_eq!(apply(&applier, 30, &[set_op(&row, "at 30")]).await, 0);
    assert_eq!(apply(&applier, 30, &[set_op(&gone, "at 30")]).await, 0);
    for key in [&row, &gone] {
        assert_eq!(keys.get(key).await.as_deref(), Some("at 30"));
        assert_eq!(keys.get(&version_key(key)).await, Some(stored(30)));
        assert_eq!(keys.pttl(&version_key(key)).await, -1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_whole_then_by_member_keeps_its_version_in_a_hash() {
    let (applier, keys) = applier(&redis_url()).await;
    let set = unique("whole-then-members");
    let companion = version_key(&set);
    // Deleted at 10: a string tombstone.
    assert_eq!(apply(&applier, 10, &[del(&set)]).await, 0);
    assert_eq!(keys.get(&companion).await, Some(stored(10)));
    let tombstone_ttl = keys.pttl(&companion).await;
    assert!(tombstone_ttl > 3_000_000, "{tombstone_ttl}");
    // A member older than the delete is stale; a newer one is written, and the key's version
    // moves into a hash beside the member's.
    assert_eq!(apply(&applier, 5, &[sadd(&set, "old")]).await, 1);
    assert_eq!(apply(&applier, 20, &[sadd(&set, "new")]).await, 0);
    assert_eq!(keys.members(&set).await, ["new"]);
    let versions = keys.hgetall(&companion).await;
    assert_eq!(versions.get(""), Some(&stored(10)));
    assert_eq!(versions.get("m:new"), Some(&stored(20)));
    assert_eq!(keys.pttl(&companion).await, -1);
    // The delete at 10 still holds for the other members.
    assert_eq!(apply(&applier, 8, &[sadd(&set, "older")]).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_one_key_in_one_call_keep_their_order() {
    let (applier, keys) = applier(&redis_url()).await;
    let (a, b, c) = (unique("order-a"), unique("order-b"), unique("order-c"));
    fn message(lsn: u64, ops: &[Op]) -> MessageWrites<'_> {
        MessageWrites {
            version: Some(Version { lsn, idx: 0 }),
            plain: &[],
            versioned: ops,
        }
    }
    let (m1, m2, m3) = (
        [set_op(&a, "a30"), set_op(&b, "b30"), del(&c)],
        [set_op(&a, "a20"), del(&b), set_op(&c, "c20")],
        [del(&a), set_op(&a, "a50")],
    );
    // One batch, one call: a newer write then an older one; a set then a delete of the same key
    // by one message; a delete then a set.
    let outcomes = applier
        .apply(&[message(30, &m1), message(20, &m2), message(50, &m3)], &[])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            MessageOutcome::Applied { stale: 0 },
            MessageOutcome::Applied { stale: 3 },
            MessageOutcome::Applied { stale: 0 },
        ]
    );
    assert_eq!(keys.get(&a).await.as_deref(), Some("a50"));
    assert_eq!(keys.get(&b).await.as_deref(), Some("b30"));
    assert_eq!(keys.get(&c).await, None);
    let order = [set_op(&c, "c60"), del(&c)];
    assert_eq!(apply(&applier, 60, &order).await, 0);
    assert_eq!(keys.get(&c).await, None);
    assert_eq!(keys.get(&version_key(&c)).await, Some(stored(60)));
}
