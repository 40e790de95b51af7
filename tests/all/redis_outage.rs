//! Redis going away: nothing is acknowledged before it is applied, and nothing is lost.

use crate::stream_source::{get, record_text};
use crate::util::*;
use keepwarm::config::Config;
use std::time::Duration;

fn config(plugins: &std::path::Path, cache_url: &str, stream_url: &str, stream: &str) -> Config {
    config_with(plugins, cache_url, stream_url, stream, "", "")
}

/// [`config`] with more `[pipeline]` and `[[source]]` settings.
fn config_with(
    plugins: &std::path::Path,
    cache_url: &str,
    stream_url: &str,
    stream: &str,
    pipeline: &str,
    source: &str,
) -> Config {
    Config::parse(&format!(
        r#"
[redis]
url = "{cache_url}"
response_timeout_ms = 2000
[plugins]
dir = "{dir}"
[pipeline]
max_backoff_ms = 200
{pipeline}
[admin]
listen = "127.0.0.1:0"
[dead_letter]
stream = "{stream}:dead"
[[source]]
kind = "redis-stream"
url = "{stream_url}"
stream = "{stream}"
group = "kw"
block_ms = 200
{source}
"#,
        dir = plugins.display()
    ))
    .unwrap()
}

fn order_line(row: u64) -> String {
    order_change(fixtures()[0], row, None)
}

/// Rows `0..=last` are in the cache, each holding its record exactly.
async fn assert_rows_cached(cache_url: &str, prefix: &str, last: u64) {
    let mut conn = connect(cache_url).await;
    for row in 0..=last {
        let value = get(&mut conn, &format!("{prefix}:public.orders:{row}")).await;
        assert_eq!(value, Some(record_text(&order_line(row))), "row {row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_while_the_cache_is_down_and_nothing_is_lost() {
    let stream_url = redis_url();
    let mut cache = RedisServer::start().await;
    let prefix = unique("outage");
    let stream = format!("{prefix}:stream");
    let plugins = row_cache_dir(&prefix, "");
    let daemon = Daemon::start(config(plugins.path(), &cache.url(), &stream_url, &stream));
    let mut conn = connect(&stream_url).await;
    // Make sure the daemon is up and applying before the outage.
    xadd_sequin(&mut conn, &stream, &[order_line(0)]).await;
    wait_all_acked(&stream_url, &stream, "kw", 1, Duration::from_secs(30)).await;

    cache.stop();
    let lines: Vec<String> = (1..=50).map(order_line).collect();
    xadd_sequin(&mut conn, &stream, &lines).await;
    // The daemon reads everything, but with the cache down it must acknowledge none of it.
    wait_for(
        "the daemon to read the entries",
        Duration::from_secs(30),
        || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move { group_progress(&mut conn, &stream, "kw").await.0 == 51 }
        },
    )
    .await;
    assert_eq!(group_progress(&mut conn, &stream, "kw").await, (51, 50));

    cache.restart().await;
    wait_all_acked(&stream_url, &stream, "kw", 51, Duration::from_secs(60)).await;
    daemon.stop().await;
    assert_rows_cached(&cache.url(), &prefix, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_nothing() {
    let mut server = RedisServer::start().await;
    let url = server.url();
    let prefix = unique("restart");
    let stream = format!("{prefix}:stream");
    let plugins = row_cache_dir(&prefix, "");
    let mut conn = connect(&url).await;
    let total = 3000u64;
    let lines: Vec<String> = (0..total).map(order_line).collect();
    for chunk in lines.chunks(500) {
        xadd_sequin(&mut conn, &stream, chunk).await;
    }
    let daemon = Daemon::start(config(plugins.path(), &url, &url, &stream));
    wait_for(
        "the daemon to start reading",
        Duration::from_secs(30),
        || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move { group_progress(&mut conn, &stream, "kw").await.0 > 0 }
        },
    )
    .await;
    server.restart().await;
    wait_all_acked(&url, &stream, "kw", total, Duration::from_secs(120)).await;
    daemon.stop().await;
    assert_rows_cached(&url, &prefix, total - 1).await;
}

/// A daemon on its own cache, which applied row 0 and then stopped: what the daemon reads next
/// is stuck in flight until the cache is back.
struct Outage {
    cache: RedisServer,
    daemon: Daemon,
    conn: redis::aio::MultiplexedConnection,
    prefix: String,
    stream: String,
    _plugins: PluginDir,
}

impl Outage {
    async fn start(name: &str, pipeline: &str, source: &str) -> Outage {
        let stream_url = redis_url();
        let mut cache = RedisServer::start().await;
        let prefix = unique(name);
        let stream = format!("{prefix}:stream");
        let plugins = row_cache_dir(&prefix, "");
        let daemon = Daemon::start(config_with(
            plugins.path(),
            &cache.url(),
            &stream_url,
            &stream,
            pipeline,
            source,
        ));
        let mut conn = connect(&stream_url).await;
        xadd_sequin(&mut conn, &stream, &[order_line(0)]).await;
        wait_all_acked(&stream_url, &stream, "kw", 1, Duration::from_secs(30)).await;
        cache.stop();
        Outage {
            cache,
            daemon,
            conn,
            prefix,
            stream,
            _plugins: plugins,
        }
    }

    async fn add(&mut self, rows: std::ops::RangeInclusive<u64>) {
        let lines: Vec<String> = rows.map(order_line).collect();
        xadd_sequin(&mut self.conn, &self.stream, &lines).await;
    }

    /// Waits until the group has delivered `n` entries.
    async fn wait_read(&self, n: u64, what: &str) {
        wait_for(what, Duration::from_secs(30), || {
            let (mut conn, stream) = (self.conn.clone(), self.stream.clone());
            async move { group_progress(&mut conn, &stream, "kw").await.0 == n }
        })
        .await;
    }

    /// Restarts the cache and checks that rows `0..=last` end up applied and acknowledged.
    async fn end(mut self, last: u64) {
        self.cache.restart().await;
        wait_all_acked(
            &redis_url(),
            &self.stream,
            "kw",
            last + 1,
            Duration::from_secs(60),
        )
        .await;
        self.daemon.stop().await;
        assert_rows_cached(&self.cache.url(), &self.prefix, last).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_keeps_reading_while_part_of_its_budget_is_stuck() {
    // Three slots, reads of up to three: with one message stuck behind the outage, the source
    // must still read the next two into the two free slots, not wait for three free at once.
    let mut outage = Outage::start(
        "budget",
        "max_in_flight = 3\nbatch_size = 1",
        "read_count = 3",
    )
    .await;
    outage.add(1..=1).await;
    outage.wait_read(2, "the daemon to read entry 1").await;
    outage.add(2..=3).await;
    outage
        .wait_read(4, "the daemon to read entries 2 and 3 into its free slots")
        .await;
    assert_eq!(
        group_progress(&mut outage.conn, &outage.stream, "kw").await,
        (4, 3)
    );
    outage.end(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_stuck_behind_an_outage_are_not_reclaimed_by_their_own_daemon() {
    // To Redis, entries stuck in flight look idle: the daemon's own XAUTOCLAIM hands them back.
    // Delivered again, they would fill the free half of the budget with copies, and the
    // entries written after them would wait for the outage to end.
    let mut outage = Outage::start(
        "reclaim",
        "max_in_flight = 6\nbatch_size = 1",
        "read_count = 3\nclaim_idle_ms = 300",
    )
    .await;
    outage.add(1..=3).await;
    wait_for(
        "a claim to hand the stuck entries back",
        Duration::from_secs(30),
        || {
            let (mut conn, stream) = (outage.conn.clone(), outage.stream.clone());
            async move { least_delivery_count(&mut conn, &stream, 3).await >= 2 }
        },
    )
    .await;
    outage.add(4..=6).await;
    outage
        .wait_read(
            7,
            "the daemon to read the later entries into its free slots",
        )
        .await;
    outage.end(6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_dead_consumer_left_behind_held_ones_are_still_reclaimed() {
    // The pending list is in id order, and the daemon's own stuck entries come first: its claim
    // finds them idle, skips them (they are held), and must still reach the entries a dead
    // consumer left after them. (It does because a claim resets the idle time of what it
    // claims, so the next claim scans past the held entries.)
    let mut outage = Outage::start(
        "cursor",
        "max_in_flight = 6\nbatch_size = 1",
        "read_count = 3\nclaim_idle_ms = 300",
    )
    .await;
    outage.add(1..=3).await;
    outage
        .wait_read(4, "the daemon to read entries 1 to 3")
        .await;
    // Entries 4 and 5 go to a consumer that then dies: added and read in one transaction, so
    // the daemon's blocked read cannot take them first.
    let mut pipe = redis::pipe();
    pipe.atomic();
    for row in 4..=5 {
        let cmd = pipe.cmd("XADD").arg(&outage.stream).arg("*");
        for (k, v) in stream_fields(&order_line(row)) {
            cmd.arg(k).arg(v);
        }
        cmd.ignore();
    }
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg("kw")
        .arg("dead")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&outage.stream)
        .arg(">")
        .ignore();
    let () = pipe.query_async(&mut outage.conn).await.unwrap();
    let dead = pending(&mut outage.conn, &outage.stream, Some("dead")).await;
    assert_eq!(dead.len(), 2, "the dead consumer holds entries 4 and 5");
    wait_for(
        "the daemon to reclaim what the dead consumer held",
        Duration::from_secs(30),
        || {
            let (mut conn, stream) = (outage.conn.clone(), outage.stream.clone());
            async move { pending(&mut conn, &stream, Some("dead")).await.is_empty() }
        },
    )
    .await;
    outage.end(5).await;
}

/// The smallest delivery count among the group's pending entries, 0 unless `n` are pending.
async fn least_delivery_count(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    n: usize,
) -> i64 {
    let pending = pending(conn, stream, None).await;
    if pending.len() != n {
        return 0;
    }
    pending.iter().map(|p| p.3).min().unwrap_or(0)
}

/// The group's first 100 pending entries (of `consumer` only, if given): id, consumer, idle
/// ms, delivery count.
async fn pending(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    consumer: Option<&str>,
) -> Vec<(String, String, i64, i64)> {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(stream).arg("kw").arg("-").arg("+").arg(100);
    if let Some(consumer) = consumer {
        cmd.arg(consumer);
    }
    cmd.query_async(conn).await.unwrap()
}
