//! Versioned writes: redelivered or late messages cannot move the cache back in time.

mod applier;
mod batch;
mod watched;

use crate::util::*;

/// A change of order 1001 (`line`) moved to commit LSN `lsn` and status `status`.
fn with_lsn(line: &str, lsn: u64, status: &str) -> String {
    let line = order_change(line, 1001, Some(lsn));
    let at = line.find(r#""status":""#).unwrap() + r#""status":""#.len();
    let close = at + line[at..].find('"').unwrap();
    format!("{}{status}{}", &line[..at], &line[close..])
}

/// Runs `lines` through row-cache (with `manifest_extra`), one by one so that arrival order is
/// exactly the order given; returns the environment.
async fn run(name: &str, manifest_extra: &str, lines: &[String]) -> TestEnv {
    let env = TestEnv::new(name);
    env.add_row_cache(manifest_extra);
    let daemon = env.run();
    env.xadd_each_drained(lines).await;
    daemon.stop().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_change_arriving_late_is_skipped() {
    let insert = with_lsn(fixtures()[0], 100, "pending");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let env = run("stale", "", &[update.clone(), insert.clone()]).await;
    let keys = env.keys().await;
    assert_eq!(
        keys.get("public.orders:1001").await,
        Some(record_text(&update))
    );
    let version: Option<String> = keys
        .query(
            // A key written as a whole keeps its version in a string beside it.
            redis::cmd("GET").arg(version_key(&env.key("public.orders:1001"))),
        )
        .await;
    assert_eq!(
        version.as_deref(),
        Some("00000000000000000200:00000000000000000001")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mode_lets_the_late_change_win() {
    let insert = with_lsn(fixtures()[0], 100, "pending");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let lines = [update, insert.clone()];
    let env = run("plain", "consistency = \"plain\"", &lines).await;
    assert_eq!(
        env.keys().await.get("public.orders:1001").await,
        Some(record_text(&insert))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_tombstone_stops_a_late_write_resurrecting_the_row() {
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let delete = move_row(fixtures()[3], 998, 1001);
    let delete = with_lsn(
        &delete.replace(r#""status":null"#, r#""status":"x""#),
        300,
        "x",
    );
    let env = run("tomb", "", &[delete, update]).await;
    let keys = Keys::connect(env.cache_url()).await;
    let key = env.key("public.orders:1001");
    assert_eq!(keys.get(&key).await, None);
    let ttl = keys.pttl(&version_key(&key)).await;
    assert!(ttl > 6 * 24 * 3600 * 1000, "tombstone ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_read_fills_only_keys_no_change_has_written() {
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let read_1001 = move_row(fixtures()[8], 1002, 1001);
    let read_1002 = fixtures()[8].to_string();
    let env = run("read", "", &[update.clone(), read_1001, read_1002.clone()]).await;
    let keys = env.keys().await;
    assert_eq!(
        keys.get("public.orders:1001").await,
        Some(record_text(&update))
    );
    assert_eq!(
        keys.get("public.orders:1002").await,
        Some(record_text(&read_1002))
    );
}
