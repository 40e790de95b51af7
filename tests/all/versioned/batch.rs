//! A batch of messages in one versioned script call: each message answered on its own, big
//! batches split, and the errors that retry the whole batch.

use super::applier::{applier, apply, sadd};
use crate::util::*;
use keepwarm::applier::{ApplyError, MessageOutcome, MessageWrites, Refusal};
use keepwarm::message::Version;
use keepwarm::ops::Op;

fn set(key: &str, value: &str) -> Op {
    Op::Set {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        ttl_ms: None,
    }
}

/// The messages `(lsn, ops)` as one batch (a backfill read when `lsn` is 0).
fn batch(messages: &[(u64, Vec<Op>)]) -> Vec<MessageWrites<'_>> {
    messages
        .iter()
        .map(|(lsn, ops)| MessageWrites {
            version: (*lsn > 0).then_some(Version { lsn: *lsn, idx: 0 }),
            plain: &[],
            versioned: ops,
        })
        .collect()
}

fn applied(stale: u64) -> MessageOutcome {
    MessageOutcome::Applied { stale }
}

fn refused_with(outcome: &MessageOutcome, code: &str) -> bool {
    matches!(outcome, MessageOutcome::Refused(Refusal::Redis(error)) if error.code() == code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_of_a_batch_is_answered_on_its_own() {
    let (applier, keys) = applier(&redis_url()).await;
    let [k1, k2, k3, k4] = ["k1", "k2", "k3", "k4"].map(|k| unique(&format!("batch-{k}")));
    apply(&applier, 7, &[set(&k3, "at 7")]).await;
    let messages = [
        (10, vec![set(&k1, "at 10")]),
        // Refused by its second write (k1 is a string): the first stays, the third is not applied.
        (
            11,
            vec![set(&k2, "at 11"), sadd(&k1, "x"), set(&k4, "at 11")],
        ),
        // Older than what k3 holds.
        (5, vec![set(&k3, "at 5")]),
        // Older than the first message of the same batch.
        (9, vec![set(&k1, "at 9")]),
        // A backfill read of a key no change has written, and one of a key a change wrote.
        (0, vec![set(&k4, "read"), set(&k1, "read")]),
    ];
    let outcomes = applier.apply(&batch(&messages), &[]).await.unwrap();
    assert_eq!(outcomes.len(), 5);
    assert_eq!(outcomes[0], applied(0));
    assert!(refused_with(&outcomes[1], "WRONGTYPE"), "{outcomes:?}");
    assert_eq!(outcomes[2..], [applied(1), applied(1), applied(1)]);
    assert_eq!(keys.get(&k1).await.as_deref(), Some("at 10"));
    assert_eq!(keys.get(&k2).await.as_deref(), Some("at 11"));
    assert_eq!(keys.get(&k3).await.as_deref(), Some("at 7"));
    assert_eq!(keys.get(&k4).await.as_deref(), Some("read"));
    // The read filled k4 without a version: a change still writes it.
    assert_eq!(apply(&applier, 1, &[set(&k4, "at 1")]).await, 0);
    assert_eq!(keys.get(&k4).await.as_deref(), Some("at 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_bigger_than_one_call_is_answered_in_order() {
    // Whole-key writes without a TTL: transactions of 128 companions each.
    big_batch(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_bigger_than_one_script_call_is_answered_in_order() {
    // With a TTL: script calls of at most 256 messages or about 1 MiB.
    big_batch(Some(3_600_000)).await;
}

async fn big_batch(ttl_ms: Option<u64>) {
    let (applier, keys) = applier(&redis_url()).await;
    let key = |n: u64| unique(&format!("big-batch-{n}"));
    let set = |key: &str, value: &str| Op::Set {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        ttl_ms,
    };
    let names: Vec<String> = (0..700).map(key).collect();
    // Every third message is older than what its key already holds; some values are large, so
    // that the batch is split by size as well as by count.
    let mut first = Vec::new();
    for (n, name) in names.iter().enumerate().step_by(3) {
        first.push((1_000 + n as u64, vec![set(name, "newer")]));
    }
    applier.apply(&batch(&first), &[]).await.unwrap();
    let large = "x".repeat(300_000);
    let messages: Vec<(u64, Vec<Op>)> = names
        .iter()
        .enumerate()
        .map(|(n, name)| {
            let value = if n % 100 == 1 { large.as_str() } else { "v" };
            (100 + n as u64, vec![set(name, value)])
        })
        .collect();
    let outcomes = applier.apply(&batch(&messages), &[]).await.unwrap();
    for (n, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome, &applied(u64::from(n % 3 == 0)), "message {n}");
    }
    let values = keys.get_all(names.iter().cloned()).await;
    for (n, value) in values.iter().enumerate() {
        let expected = match n {
            _ if n % 3 == 0 => "newer",
            _ if n % 100 == 1 => large.as_str(),
            _ => "v",
        };
        assert_eq!(value.as_deref(), Some(expected), "key {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_retries_the_batch_until_redis_has_room() {
    let server = RedisServer::start_volatile().await;
    let (applier, keys) = applier(&server.url()).await;
    let messages = [(3, vec![set("a", "1")]), (4, vec![set("b", "2")])];
    let maxmemory = |bytes: &str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxmemory").arg(bytes);
        cmd
    };
    let () = keys.query(&maxmemory("1")).await;
    match applier.apply(&batch(&messages), &[]).await {
        Err(ApplyError::Busy(error)) => assert_eq!(error.code(), "OOM"),
        other => panic!("expected OOM, got {other:?}"),
    }
    assert_eq!(keys.get("a").await, None);
    let () = keys.query(&maxmemory("0")).await;
    let outcomes = applier.apply(&batch(&messages), &[]).await.unwrap();
    assert_eq!(outcomes, [applied(0), applied(0)]);
    assert_eq!(keys.get("b").await.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_script_is_loaded_again_and_the_batch_retried() {
    let server = RedisServer::start_volatile().await;
    let (applier, keys) = applier(&server.url()).await;
    let () = keys.query(redis::cmd("SCRIPT").arg("FLUSH")).await;
    // A member write goes through the script (a whole-key write would go in a transaction).
    let messages = [(3, vec![sadd("a", "1")])];
    let failed = applier.apply(&batch(&messages), &[]).await;
    assert!(
        matches!(failed, Err(ApplyError::ScriptMissing)),
        "{failed:?}"
    );
    let outcomes = applier.apply(&batch(&messages), &[]).await.unwrap();
    assert_eq!(outcomes, [applied(0)]);
    assert_eq!(keys.members("a").await, ["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_redis_cluster_is_answered_per_message_across_slots() {
    let server = RedisServer::start_cluster().await;
    let (applier, keys) = applier(&server.url()).await;
    let () = keys
        .query(redis::cmd("SET").arg("taken").arg("a string"))
        .await;
    let messages = [
        // Two slots, both applied.
        (
            5,
            vec![set("user:1", "one"), set("email:a@example.com", "1")],
        ),
        // Applied in one slot, refused in another: refused.
        (6, vec![set("user:2", "two"), sadd("taken", "x")]),
        // Stale in one slot, applied in another: one write skipped.
        (4, vec![set("user:1", "old"), set("user:3", "three")]),
    ];
    let outcomes = applier.apply(&batch(&messages), &[]).await.unwrap();
    assert_eq!(outcomes[0], applied(0));
    assert!(refused_with(&outcomes[1], "WRONGTYPE"), "{outcomes:?}");
    assert_eq!(outcomes[2], applied(1));
    for (key, value) in [("user:1", "one"), ("user:2", "two"), ("user:3", "three")] {
        assert_eq!(keys.get(key).await.as_deref(), Some(value), "{key}");
    }
}
