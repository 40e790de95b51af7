//! Versioned writes: redelivered or late messages cannot move the cache back in time.

use crate::stream_source::{get, record_text};
use crate::util::*;
use std::time::Duration;

fn with_lsn(line: &str, lsn: u64, status: &str) -> String {
    let re_lsn = line.find(r#""commit_lsn":"#).unwrap();
    let end = re_lsn + line[re_lsn..].find(',').unwrap();
    let line = format!("{}\"commit_lsn\":{lsn}{}", &line[..re_lsn], &line[end..]);
    let at = line.find(r#""status":""#).unwrap() + r#""status":""#.len();
    let close = at + line[at..].find('"').unwrap();
    format!("{}{status}{}", &line[..at], &line[close..])
}

async fn run(
    prefix: &str,
    manifest_extra: &str,
    lines: &[String],
) -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    let stream = format!("{prefix}:stream");
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(prefix, manifest_extra),
    );
    let mut conn = connect(&url).await;
    let daemon = Daemon::start(stream_config(plugins.path(), &stream, "kw", ""));
    // One by one, so arrival order is exactly the order given.
    for (n, line) in lines.iter().enumerate() {
        xadd_sequin(&mut conn, &stream, std::slice::from_ref(line)).await;
        wait_all_acked(&url, &stream, "kw", n as u64 + 1, Duration::from_secs(30)).await;
    }
    daemon.stop().await;
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_change_arriving_late_is_skipped() {
    let prefix = unique("stale");
    let insert = with_lsn(fixtures()[0], 100, "pending");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let mut conn = run(&prefix, "", &[update.clone(), insert.clone()]).await;
    let key = format!("{prefix}:public.orders:1001");
    assert_eq!(get(&mut conn, &key).await, Some(record_text(&update)));
    let version: Option<String> = redis::cmd("HGET")
        .arg(format!("kw:v:{{{key}}}"))
        .arg("")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        version.as_deref(),
        Some("00000000000000000200:00000000000000000001")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mode_lets_the_late_change_win() {
    let prefix = unique("plain");
    let insert = with_lsn(fixtures()[0], 100, "pending");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let mut conn = run(
        &prefix,
        "consistency = \"plain\"",
        &[update, insert.clone()],
    )
    .await;
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1001")).await,
        Some(record_text(&insert))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_tombstone_stops_a_late_write_resurrecting_the_row() {
    let prefix = unique("tomb");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let delete = fixtures()[3]
        .replace(r#""id":998"#, r#""id":1001"#)
        .replace(r#""record_pks":["998"]"#, r#""record_pks":["1001"]"#);
    let delete = with_lsn(
        &delete.replace(r#""status":null"#, r#""status":"x""#),
        300,
        "x",
    );
    let mut conn = run(&prefix, "", &[delete, update]).await;
    let key = format!("{prefix}:public.orders:1001");
    assert_eq!(get(&mut conn, &key).await, None);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("kw:v:{{{key}}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 6 * 24 * 3600 * 1000, "tombstone ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_read_fills_only_keys_no_change_has_written() {
    let prefix = unique("read");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let read_1001 = fixtures()[8]
        .replace(r#""id":1002"#, r#""id":1001"#)
        .replace(r#""record_pks":["1002"]"#, r#""record_pks":["1001"]"#);
    let read_1002 = fixtures()[8].to_string();
    let mut conn = run(&prefix, "", &[update.clone(), read_1001, read_1002.clone()]).await;
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1001")).await,
        Some(record_text(&update))
    );
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1002")).await,
        Some(record_text(&read_1002))
    );
}

// The versioned script itself, through the applier: aggregates, companion lifetimes, cluster.

use keepwarm::applier::{Applier, MessageOutcome, MessageWrites};
use keepwarm::message::Version;
use keepwarm::ops::Op;

async fn applier(url: &str) -> Applier {
    let config = keepwarm::config::Config::parse(&format!(
        "[redis]\nurl = \"{url}\"\n[plugins]\ndir = \"unused\"\n[versioning]\ntombstone_ttl_seconds = 3600\n"
    ))
    .unwrap();
    Applier::connect(&config).await.unwrap()
}

/// Applies `ops` as one versioned message at `(lsn, 0)` (a read when `lsn` is 0) and returns how
/// many writes were skipped as stale.
async fn apply(applier: &Applier, lsn: u64, ops: &[Op]) -> u64 {
    let writes = MessageWrites {
        version: (lsn > 0).then_some(Version { lsn, idx: 0 }),
        plain: Vec::new(),
        versioned: ops.iter().collect(),
    };
    match applier.apply(&[writes], &[]).await.unwrap().remove(0) {
        MessageOutcome::Applied { stale } => stale,
        MessageOutcome::Refused(reason) => panic!("refused: {reason}"),
    }
}

fn sadd(key: &str, member: &str) -> Op {
    Op::SetAdd {
        key: key.to_owned(),
        members: vec![member.to_owned()],
    }
}

fn del(key: &str) -> Op {
    Op::Del {
        key: key.to_owned(),
    }
}

async fn members(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let mut members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap();
    members.sort();
    members
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delete_of_an_aggregate_keeps_what_was_written_after_it() {
    let url = redis_url();
    let applier = applier(&url).await;
    let mut conn = connect(&url).await;
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
    assert_eq!(members(&mut conn, &set).await, ["m30"]);
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&hash)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(fields, ["f30"]);
    // Older than the delete: stale. Newer: applied.
    assert_eq!(apply(&applier, 15, &[sadd(&set, "m15")]).await, 1);
    assert_eq!(apply(&applier, 0, &[sadd(&set, "from-read")]).await, 1);
    assert_eq!(apply(&applier, 25, &[sadd(&set, "m25")]).await, 0);
    assert_eq!(members(&mut conn, &set).await, ["m25", "m30"]);
    assert_eq!(pttl(&mut conn, &format!("kw:v:{{{set}}}")).await, -1);
    // A delete newer than everything removes everything and leaves a tombstone.
    apply(&applier, 40, &[del(&set)]).await;
    assert!(members(&mut conn, &set).await.is_empty());
    let companion: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("kw:v:{{{set}}}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(companion, [""]);
    assert!(pttl(&mut conn, &format!("kw:v:{{{set}}}")).await > 3_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_versions_live_as_long_as_their_key_then_as_tombstones() {
    let url = redis_url();
    let applier = applier(&url).await;
    let mut conn = connect(&url).await;
    let set = unique("ttl-set");
    let companion = format!("kw:v:{{{set}}}");
    apply(&applier, 1, &[sadd(&set, "a")]).await;
    assert_eq!(pttl(&mut conn, &companion).await, -1);
    apply(
        &applier,
        2,
        &[Op::Expire {
            key: set.clone(),
            ttl_ms: 100_000,
        }],
    )
    .await;
    let ttl = pttl(&mut conn, &companion).await;
    assert!((1..=100_000).contains(&ttl), "{ttl}");
    // The last member goes, and with it the key: its versions become tombstones.
    let srem = Op::SetRemove {
        key: set.clone(),
        members: vec!["a".to_owned()],
    };
    apply(&applier, 3, &[srem]).await;
    assert!(pttl(&mut conn, &companion).await > 3_000_000);
    assert_eq!(apply(&applier, 2, &[sadd(&set, "a")]).await, 1);
    assert!(members(&mut conn, &set).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_touching_several_hash_slots_applies_on_redis_cluster() {
    let server = RedisServer::start_cluster().await;
    let applier = applier(&server.url()).await;
    let mut conn = connect(&server.url()).await;
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
    assert_eq!(get(&mut conn, "user:1").await.as_deref(), Some("one"));
    assert_eq!(
        get(&mut conn, "email:a@example.com").await.as_deref(),
        Some("1")
    );
    assert_eq!(members(&mut conn, "{user:1}:tags").await, ["x"]);
    assert_eq!(apply(&applier, 4, &ops[..4]).await, 4);
    // What one call naming both keys would have met:
    let refused: redis::RedisResult<()> = redis::cmd("DEL")
        .arg("user:1")
        .arg("email:a@example.com")
        .query_async(&mut conn)
        .await;
    assert_eq!(refused.unwrap_err().code(), Some("CROSSSLOT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepwarm_version_shows_what_is_stored_for_a_key() {
    let url = redis_url();
    let applier = applier(&url).await;
    let dir = TempDir::new("kw-version");
    let config = dir.path().join("keepwarm.toml");
    std::fs::write(
        &config,
        format!("[redis]\nurl = \"{url}\"\n[plugins]\ndir = \"unused\"\n"),
    )
    .unwrap();
    let (row, set) = (unique("version-row"), unique("version-set"));
    let version = |key: &str, json: bool| {
        let mut args = vec!["version", "--config", config.to_str().unwrap(), key];
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
    assert_eq!(json["versions_key"], format!("kw:v:{{{set}}}"));
    assert_eq!(json["type"], "set");
    assert_eq!(json["tombstone"], false);
    assert_eq!(
        json["members"],
        serde_json::json!([{"member": "a b", "commit_lsn": 1_243_361_160u64, "commit_idx": 0}])
    );
}
