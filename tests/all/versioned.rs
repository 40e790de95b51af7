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
