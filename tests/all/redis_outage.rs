//! Redis going away: nothing is acknowledged before it is applied, and nothing is lost.

use crate::util::*;

fn insert(row: u64) -> String {
    order_change(fixtures()[0], row, None)
}

/// The config of these tests: short retries, and `pipeline` and `source` settings.
fn config(env: &TestEnv, pipeline: &str, source: &str) -> ConfigBuilder {
    env.stream_config()
        .redis("response_timeout_ms = 2000")
        .pipeline("max_backoff_ms = 200")
        .pipeline(pipeline)
        .source_lines("claim_idle_ms = 30000")
        .source_lines(source)
}

/// Rows `0..=last` are in the cache, each holding its record exactly.
async fn assert_rows_cached(env: &TestEnv, last: u64) {
    let rows = 0..=last;
    let keys = rows.clone().map(|row| format!("public.orders:{row}"));
    let values = env.keys().await.get_all(keys).await;
    for (row, value) in rows.zip(values) {
        assert_eq!(value, Some(record_text(&insert(row))), "row {row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_while_the_cache_is_down_and_nothing_is_lost() {
    let outage = Outage::start("outage", "", "").await;
    outage.add(1..=50).await;
    // The daemon reads everything, but with the cache down it must acknowledge none of it.
    outage.wait_read(51, "the daemon to read the entries").await;
    assert_eq!(outage.env.progress().await, (51, 50));
    outage.end(50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_loses_nothing() {
    let mut server = RedisServer::start().await;
    let env = TestEnv::row_cache("restart").on(&server.url());
    let total = 3000u64;
    let lines: Vec<String> = (0..total).map(insert).collect();
    for chunk in lines.chunks(500) {
        env.xadd(chunk).await;
    }
    let daemon = config(&env, "", "").run();
    env.wait("the daemon to start reading", |read, _| read > 0)
        .await;
    server.restart().await;
    env.wait_drained(total).await;
    daemon.stop().await;
    assert_rows_cached(&env, total - 1).await;
}

/// A daemon on its own cache, which applied row 0 and then stopped: what the daemon reads next
/// is stuck in flight until the cache is back.
struct Outage {
    cache: RedisServer,
    daemon: Daemon,
    env: TestEnv,
}

impl Outage {
    async fn start(name: &str, pipeline: &str, source: &str) -> Outage {
        let mut cache = RedisServer::start().await;
        let env = TestEnv::row_cache(name).with_cache(&cache.url());
        let daemon = config(&env, pipeline, source).run();
        // Make sure the daemon is up and applying before the outage.
        env.xadd(&[insert(0)]).await;
        env.wait_drained(1).await;
        cache.stop();
        Outage { cache, daemon, env }
    }

    /// An outage of a daemon with six slots, one message a batch, reads of three and claims of
    /// entries idle for 300 ms, and rows 1 to 3 written (and stuck) after row 0.
    async fn claiming(name: &str) -> Outage {
        let pipeline = "max_in_flight = 6\nbatch_size = 1";
        let outage = Outage::start(name, pipeline, "read_count = 3\nclaim_idle_ms = 300").await;
        outage.add(1..=3).await;
        outage
    }

    async fn add(&self, rows: std::ops::RangeInclusive<u64>) {
        let lines: Vec<String> = rows.map(insert).collect();
        self.env.xadd(&lines).await;
    }

    /// Waits until the group has delivered `n` entries.
    async fn wait_read(&self, n: u64, what: &str) {
        self.env.wait(what, |read, _| read == n).await;
    }

    /// Restarts the cache and checks that rows `0..=last` end up applied and acknowledged.
    async fn end(mut self, last: u64) {
        self.cache.restart().await;
        self.env.wait_drained(last + 1).await;
        self.daemon.stop().await;
        assert_rows_cached(&self.env, last).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_keeps_reading_while_part_of_its_budget_is_stuck() {
    // Three slots, reads of up to three: with one message stuck behind the outage, the source
    // must still read the next two into the two free slots, not wait for three free at once.
    let outage = Outage::start(
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
    assert_eq!(outage.env.progress().await, (4, 3));
    outage.end(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_stuck_behind_an_outage_are_not_reclaimed_by_their_own_daemon() {
    // To Redis, entries stuck in flight look idle: the daemon's own XAUTOCLAIM hands them back.
    // Delivered again, they would fill the free half of the budget with copies, and the
    // entries written after them would wait for the outage to end.
    let outage = Outage::claiming("reclaim").await;
    let what = "a claim to hand the stuck entries back";
    wait_for(what, PATIENCE, || async {
        // The smallest delivery count among the pending entries, once all three are pending.
        let pending = outage.env.pending(None).await;
        pending.len() == 3 && pending.iter().all(|p| p.times_delivered >= 2)
    })
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
    let outage = Outage::claiming("cursor").await;
    outage
        .wait_read(4, "the daemon to read entries 1 to 3")
        .await;
    // Entries 4 and 5 go to a consumer that then dies.
    let env = &outage.env;
    env.xadd_read_by("dead", &[insert(4), insert(5)]).await;
    let dead = env.pending(Some("dead")).await;
    assert_eq!(dead.len(), 2, "the dead consumer holds entries 4 and 5");
    let what = "the daemon to reclaim what the dead consumer held";
    wait_for(what, PATIENCE, || async {
        env.pending(Some("dead")).await.is_empty()
    })
    .await;
    outage.end(5).await;
}
