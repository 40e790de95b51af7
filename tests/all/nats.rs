//! The NATS JetStream source against the shared NATS server: changes published exactly as
//! Sequin's NATS sink publishes them (core NATS, `Nats-Msg-Id`), acknowledged only after
//! apply, malformed bodies dead-lettered, nothing lost when the daemon is killed or its
//! connection dropped. Each test has a stream, subjects and consumer of its own, and deletes
//! its stream at the end.

pub mod jetstream;

use crate::stream_source::{assert_fixtures_cached, fixture_lines};
use crate::util::*;
pub use jetstream::{Stream, nats_url};
use std::time::Duration;

/// Waits until `/readyz` answers `status`.
async fn wait_ready(daemon: &Daemon, status: u16) {
    let url = daemon.admin_url("/readyz");
    wait_for(&format!("/readyz {status}"), PATIENCE, || async {
        http_get(&url).await.map(|(s, _)| s) == Some(status)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequin_nats_messages_become_exact_cache_entries_and_are_acknowledged() {
    let env = TestEnv::row_cache("nats-exact");
    let stream = Stream::named("nats-exact").await;
    // keepwarm creates the stream; Sequin must not publish before it exists.
    let daemon = stream.config(&env, "create_stream = true").admin().run();
    stream.wait_exists().await;
    let mut lines = fixture_lines();
    stream.publish_sequin(&lines).await;
    // Sequin publishes a change again (a retry): the duplicate window drops it.
    lines.truncate(1);
    stream.publish_sequin(&lines).await;
    let n = fixture_lines().len() as u64;
    stream.wait_acked(n).await;
    assert_eq!(stream.messages().await, n);
    wait_ready(&daemon, 200).await;
    let (_, text) = http_get(&daemon.admin_url("/metrics")).await.unwrap();
    let source = stream.source_name();
    let labels = [("source", source.as_str())];
    assert_eq!(
        metric(&text, "keepwarm_messages_received_total", &labels),
        Some(n as f64)
    );
    wait_gauges_zero(
        &daemon.admin_url("/metrics"),
        &source,
        &["keepwarm_source_backlog"],
    )
    .await;
    daemon.stop().await;
    assert_fixtures_cached(&env.keys().await, true).await;
    assert!(env.dead_letters().await.is_empty());
    stream.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_nats_bodies_are_dead_lettered_with_the_reason_and_acknowledged() {
    let env = TestEnv::row_cache("nats-malformed");
    let stream = Stream::create("nats-malformed").await;
    let bodies = malformed_then_good();
    stream.publish_sequin(&bodies).await;
    let daemon = stream.config(&env, "").run();
    stream.wait_acked(bodies.len() as u64).await;
    daemon.stop().await;

    assert_eq!(
        env.keys().await.get("public.orders:1001").await,
        Some(record_text(fixtures()[0]))
    );
    let letters = env.dead_letters().await;
    for letter in malformed_letters(&letters) {
        assert_eq!(letter.field("source"), stream.source_name());
        // The stream sequence.
        assert!(
            letter.field("source_id").parse::<u64>().is_ok(),
            "{letter:?}"
        );
    }
    stream.delete().await;
}

/// The `keepwarm` binary is killed with SIGKILL while it works through a backlog, and started
/// again: every change ends up in the cache and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepwarm_killed_mid_run_and_restarted_loses_nothing() {
    let env = TestEnv::row_cache("nats-kill");
    let stream = Stream::create("nats-kill").await;
    let dir = TempDir::new("kw-nats-kill");
    // Small pulls and batches, so that the kill finds messages in flight.
    let builder = stream
        .config(&env, "max_messages = 50")
        .pipeline("batch_size = 20")
        .admin();
    let config = builder.write(&dir, "keepwarm.toml");
    let n: u64 = 4000;
    let lines: Vec<String> = (0..n).map(|row| order_line(row, 0)).collect();
    let (before, after) = lines.split_at(2000);
    stream.publish_sequin(before).await;
    let mut first = KeepwarmProcess::spawn(&["run", "--config", &config]);
    first.wait_log("pulling from nats", PATIENCE);
    wait_for("the first process to be under way", PATIENCE, || async {
        matches!(stream.consumer().await, Some((floor, _, _)) if floor >= 200)
    })
    .await;
    first.signal("KILL");
    first.wait_exit(PATIENCE);
    let (floor, in_flight, _) = stream.consumer().await.unwrap();
    eprintln!("killed at ack floor {floor} with {in_flight} messages unacknowledged");
    // Sequin goes on publishing while no keepwarm runs.
    stream.publish_sequin(after).await;

    let mut second = KeepwarmProcess::spawn(&["run", "--config", &config]);
    stream.wait_acked(n).await;
    if in_flight > 0 {
        // What the killed process held came again, after its ack wait, and was counted.
        let metrics = format!("http://{}/metrics", builder.admin_address());
        let (_, text) = http_get(&metrics).await.unwrap();
        let source = stream.source_name();
        let redelivered = metric(
            &text,
            "keepwarm_messages_redelivered_total",
            &[("source", source.as_str())],
        );
        assert!(redelivered.is_some_and(|n| n > 0.0), "{text}");
    }
    second.signal("TERM");
    let status = second.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(0), "{}", second.log.join("\n"));

    let keys = (0..n).map(|row| format!("public.orders:{row}"));
    let values = env.keys().await.get_all(keys).await;
    for (row, value) in values.into_iter().enumerate() {
        assert_eq!(value, Some(record_text(&lines[row])), "row {row}");
    }
    stream.delete().await;
}

/// Started before its stream exists (and not asked to create it): the source is down until
/// the stream is created, then binds and applies what Sequin publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_keeps_the_source_down_until_it_is_created() {
    let env = TestEnv::row_cache("nats-missing");
    let stream = Stream::named("nats-missing").await;
    let daemon = stream.config(&env, "").admin().run();
    wait_ready(&daemon, 503).await;
    stream.create_stream().await;
    stream.publish_sequin(&[order_line(0, 0)]).await;
    stream.wait_acked(1).await;
    wait_ready(&daemon, 200).await;
    daemon.stop().await;
    assert_eq!(
        env.keys().await.get("public.orders:0").await,
        Some(record_text(&order_line(0, 0)))
    );
    stream.delete().await;
}

/// The daemon's connection is dropped mid-run and the server refused for a while: the source
/// reports itself down, reconnects, and every change is applied and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_nats_connection_recovers_and_nothing_is_lost() {
    let env = TestEnv::row_cache("nats-drop");
    let stream = Stream::create("nats-drop").await;
    let upstream = nats_url();
    let proxy = TcpProxy::start(upstream.trim_start_matches("nats://")).await;
    let url = format!("nats://{}", proxy.address());
    let daemon = stream.config_at(&env, &url, "").admin().run();
    let n: u64 = 400;
    let lines: Vec<String> = (0..n).map(|row| order_line(row, 0)).collect();
    let (first, rest) = lines.split_at(200);
    stream.publish_sequin(first).await;
    stream.wait_acked(200).await;
    wait_ready(&daemon, 200).await;

    proxy.cut();
    wait_ready(&daemon, 503).await;
    // Sequin goes on publishing to the server meanwhile; the stream keeps it.
    stream.publish_sequin(rest).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.resume();
    stream.wait_acked(n).await;
    wait_ready(&daemon, 200).await;
    daemon.stop().await;

    let keys = (0..n).map(|row| format!("public.orders:{row}"));
    let values = env.keys().await.get_all(keys).await;
    for (row, value) in values.into_iter().enumerate() {
        assert_eq!(value, Some(record_text(&lines[row])), "row {row}");
    }
    stream.delete().await;
}

/// Messages wait in their lanes while the cache is down for longer than `ack_wait`: progress
/// acknowledgements keep the server from delivering them again, and they are acknowledged
/// once applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_flight_are_kept_from_redelivery_while_the_cache_is_down() {
    let mut cache = RedisServer::start().await;
    let env = TestEnv::row_cache("nats-progress").with_cache(&cache.url());
    let stream = Stream::create("nats-progress").await;
    let daemon = stream
        .config(&env, "ack_wait_seconds = 1")
        .pipeline("max_backoff_ms = 200")
        .run();
    stream.publish_sequin(&[order_line(0, 0)]).await;
    stream.wait_acked(1).await;
    cache.stop();
    let lines: Vec<String> = (1..=3).map(|row| order_line(row, 0)).collect();
    stream.publish_sequin(&lines).await;
    wait_for("three messages in flight", PATIENCE, || async {
        matches!(stream.consumer().await, Some((_, 3, _)))
    })
    .await;
    // Four ack waits pass while the cache is down: nothing may be delivered again. What is
    // checked is that nothing happens for a while, so this waits for time, not for an event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(stream.consumer().await, Some((1, 3, 0)));
    cache.restart().await;
    stream.wait_acked(4).await;
    daemon.stop().await;
    let keys = env.keys().await;
    for (row, line) in (1..=3).zip(&lines) {
        assert_eq!(
            keys.get(&format!("public.orders:{row}")).await,
            Some(record_text(line))
        );
    }
    stream.delete().await;
}
