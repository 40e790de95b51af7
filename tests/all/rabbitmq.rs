//! The RabbitMQ source against the shared RabbitMQ: changes published exactly as Sequin's
//! RabbitMQ sink publishes them, acknowledged only after apply, malformed bodies
//! dead-lettered, nothing lost when the daemon is killed or its connection dropped, each row's
//! order kept with one consumer. Each test has an exchange and a queue of its own, and deletes
//! them at the end.

pub mod broker;

use crate::stream_source::{assert_fixtures_cached, fixture_lines};
use crate::util::*;
pub use broker::{Broker, amqp_url};
use std::time::Duration;

/// Waits until `/readyz` answers `status`.
async fn wait_ready(daemon: &Daemon, status: u16) {
    let url = daemon.admin_url("/readyz");
    wait_for(&format!("/readyz {status}"), PATIENCE, || async {
        http_get(&url).await.map(|(s, _)| s) == Some(status)
    })
    .await;
}

/// Waits until the cache holds a key for each of `rows` orders.
async fn wait_rows_cached(env: &TestEnv, rows: u64) {
    let keys = env.keys().await;
    let what = format!("{rows} rows cached");
    wait_for(&what, PATIENCE, || async {
        keys.exist((0..rows).map(|row| format!("public.orders:{row}")))
            .await
            == rows
    })
    .await;
}

/// Checks that each of `lines` (order `row` at index `row`) is cached exactly.
async fn assert_rows_cached(env: &TestEnv, lines: &[String]) {
    let keys = (0..lines.len()).map(|row| format!("public.orders:{row}"));
    let values = env.keys().await.get_all(keys).await;
    for (row, value) in values.into_iter().enumerate() {
        assert_eq!(value, Some(record_text(&lines[row])), "row {row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequin_rabbitmq_messages_become_exact_cache_entries_and_are_acknowledged() {
    let env = TestEnv::row_cache("amqp-exact");
    let broker = Broker::new("amqp-exact").await;
    broker.declare_queue().await;
    let lines = fixture_lines();
    broker.publish_sequin(&lines).await;
    let daemon = broker.config(&env, "").admin().run();
    let metrics = daemon.admin_url("/metrics");
    let source = broker.source_name();
    let n = lines.len() as f64;
    wait_for("every message received", PATIENCE, || async {
        let text = http_get(&metrics).await.map(|(_, t)| t).unwrap_or_default();
        metric(
            &text,
            "keepwarm_messages_received_total",
            &[("source", source.as_str())],
        ) == Some(n)
    })
    .await;
    wait_ready(&daemon, 200).await;
    wait_gauges_zero(&metrics, &source, &["keepwarm_source_backlog"]).await;
    daemon.stop().await;
    assert_fixtures_cached(&env.keys().await, true).await;
    assert!(env.dead_letters().await.is_empty());
    // Everything was acknowledged: nothing came back to the queue when the daemon left.
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rabbitmq_bodies_are_dead_lettered_with_the_reason_and_acknowledged() {
    let env = TestEnv::row_cache("amqp-malformed");
    let broker = Broker::new("amqp-malformed").await;
    broker.declare_queue().await;
    let bodies = malformed_then_good();
    broker.publish_sequin(&bodies).await;
    let daemon = broker.config(&env, "").run();
    wait_for("three dead letters", PATIENCE, || async {
        env.dead_letters().await.len() == 3
    })
    .await;
    wait_for("the good message applied", PATIENCE, || async {
        env.keys().await.get("public.orders:1001").await.is_some()
    })
    .await;
    daemon.stop().await;
    assert_eq!(
        env.keys().await.get("public.orders:1001").await,
        Some(record_text(fixtures()[0]))
    );
    let letters = env.dead_letters().await;
    for letter in malformed_letters(&letters) {
        assert_eq!(letter.field("source"), broker.source_name());
        assert!(!letter.field("source_id").is_empty());
    }
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}

/// The `keepwarm` binary is killed with SIGKILL while it works through a backlog, and started
/// again: the broker redelivers what it held, and every change ends up in the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepwarm_killed_mid_run_and_restarted_loses_nothing() {
    let env = TestEnv::row_cache("amqp-kill");
    let broker = Broker::new("amqp-kill").await;
    broker.declare_queue().await;
    let dir = TempDir::new("kw-amqp-kill");
    let config = broker
        .config(&env, "")
        .pipeline("batch_size = 20\nmax_in_flight = 200")
        .write(&dir, "keepwarm.toml");
    let n: u64 = 4000;
    let lines: Vec<String> = (0..n).map(|row| order_line(row, 0)).collect();
    let (before, after) = lines.split_at(2000);
    broker.publish_sequin(before).await;
    let mut first = KeepwarmProcess::spawn(&["run", "--config", &config]);
    first.wait_log("consuming from rabbitmq", PATIENCE);
    wait_for("the first process to be under way", PATIENCE, || async {
        broker.ready().await < 1800
    })
    .await;
    first.signal("KILL");
    first.wait_exit(PATIENCE);
    // Sequin goes on publishing while no keepwarm runs.
    broker.publish_sequin(after).await;

    let mut second = KeepwarmProcess::spawn(&["run", "--config", &config]);
    wait_rows_cached(&env, n).await;
    second.signal("TERM");
    let status = second.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(0), "{}", second.log.join("\n"));
    assert_rows_cached(&env, &lines).await;
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}

/// SIGTERM in the middle of a backlog: the `keepwarm` binary finishes and acknowledges what it
/// took, gives the rest back, and exits 0. Every message is then either cached or back in the
/// queue, never both gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_what_was_taken_and_leaves_the_rest_in_the_queue() {
    let env = TestEnv::row_cache("amqp-sigterm");
    let broker = Broker::new("amqp-sigterm").await;
    broker.declare_queue().await;
    let dir = TempDir::new("kw-amqp-sigterm");
    // A prefetch of 100: most of the backlog is still in the queue when the signal comes.
    let config = broker
        .config(&env, "")
        .pipeline("batch_size = 20\nmax_in_flight = 100")
        .write(&dir, "keepwarm.toml");
    let n: u64 = 6000;
    let lines: Vec<String> = (0..n).map(|row| order_line(row, 0)).collect();
    broker.publish_sequin(&lines).await;
    let mut daemon = KeepwarmProcess::spawn(&["run", "--config", &config]);
    daemon.wait_log("consuming from rabbitmq", PATIENCE);
    wait_for("the daemon to be under way", PATIENCE, || async {
        broker.ready().await < 5800
    })
    .await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(0), "{}", daemon.log.join("\n"));
    let keys = (0..n).map(|row| format!("public.orders:{row}"));
    let cached = env.keys().await.exist(keys).await;
    // Nothing acknowledged without being applied: each message is cached or back in the
    // queue (rows are distinct, so none is both). The broker requeues what the closed
    // connection held as it notices the close.
    wait_for("every message cached or queued", PATIENCE, || async {
        cached + u64::from(broker.ready().await) == n
    })
    .await;
    let ready = n - cached;
    eprintln!("at SIGTERM: {cached} cached, {ready} left in the queue");
    assert!(
        ready > 0,
        "the whole backlog was consumed before the signal"
    );
    broker.delete().await;
}

/// Shut down while the cache is down: nothing in flight is acknowledged, and the broker has it
/// all again once the process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_the_cache_is_down_returns_what_was_in_flight() {
    let mut cache = RedisServer::start().await;
    let env = TestEnv::row_cache("amqp-outage").with_cache(&cache.url());
    let broker = Broker::new("amqp-outage").await;
    broker.declare_queue().await;
    let dir = TempDir::new("kw-amqp-outage");
    let config = broker
        .config(&env, "")
        .pipeline("max_backoff_ms = 200")
        .write(&dir, "keepwarm.toml");
    let mut daemon =
        KeepwarmProcess::spawn(&["run", "--config", &config, "--shutdown-timeout", "1"]);
    daemon.wait_log("consuming from rabbitmq", PATIENCE);
    cache.stop();
    let lines: Vec<String> = (0..3).map(|row| order_line(row, 0)).collect();
    broker.publish_sequin(&lines).await;
    wait_for("the daemon to take all three", PATIENCE, || async {
        broker.ready().await == 0
    })
    .await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(0), "{}", daemon.log.join("\n"));
    wait_for("all three back in the queue", PATIENCE, || async {
        broker.ready().await == 3
    })
    .await;
    broker.delete().await;
}

/// The daemon's connection is dropped mid-run and the broker refused for a while: the source
/// reports itself down, reconnects with backoff, and every change is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_rabbitmq_connection_recovers_and_nothing_is_lost() {
    let env = TestEnv::row_cache("amqp-drop");
    let broker = Broker::new("amqp-drop").await;
    broker.declare_queue().await;
    let upstream = amqp_url();
    let host_port = upstream
        .rsplit_once('@')
        .map_or(upstream.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let proxy = TcpProxy::start(&host_port).await;
    let url = upstream.replace(&host_port, &proxy.address().to_string());
    let daemon = broker.config_at(&env, &url, "").admin().run();
    let n: u64 = 400;
    let lines: Vec<String> = (0..n).map(|row| order_line(row, 0)).collect();
    let (first, rest) = lines.split_at(200);
    broker.publish_sequin(first).await;
    wait_rows_cached(&env, 200).await;
    wait_ready(&daemon, 200).await;

    proxy.cut();
    wait_ready(&daemon, 503).await;
    // Sequin goes on publishing to the broker meanwhile; the queue keeps it.
    broker.publish_sequin(rest).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.resume();
    wait_rows_cached(&env, n).await;
    wait_ready(&daemon, 200).await;
    daemon.stop().await;
    assert_rows_cached(&env, &lines).await;
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rows_order_is_kept_with_one_consumer() {
    // Last write wins: only the order of application decides what the cache holds.
    let env = TestEnv::new("amqp-order");
    env.add_row_cache("consistency = \"plain\"");
    let broker = Broker::new("amqp-order").await;
    broker.declare_queue().await;
    let (rows, versions) = (20u64, 10u64);
    let lines: Vec<String> = (0..versions)
        .flat_map(|version| (0..rows).map(move |row| order_line(row, version)))
        .collect();
    broker.publish_sequin(&lines).await;
    let daemon = broker
        .config(&env, "")
        .pipeline("lanes = 4\nbatch_size = 16")
        .run();
    let keys = env.keys().await;
    wait_for("every row at its last version", PATIENCE, || async {
        let values = keys
            .get_all((0..rows).map(|row| format!("public.orders:{row}")))
            .await;
        values.iter().all(|value| {
            value
                .as_deref()
                .is_some_and(|v| v.contains(&format!(r#""status":"v{}""#, versions - 1)))
        })
    })
    .await;
    daemon.stop().await;
    // Still the last version once everything is done: no older change came after it.
    for row in 0..rows {
        let value = keys.get(&format!("public.orders:{row}")).await.unwrap();
        assert!(
            value.contains(&format!(r#""status":"v{}""#, versions - 1)),
            "row {row}: {value}"
        );
    }
    assert_eq!(broker.ready().await, 0);
    broker.delete().await;
}
