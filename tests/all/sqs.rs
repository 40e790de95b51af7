//! The SQS source against the moto emulator: messages sent exactly as Sequin's SQS sink sends
//! them (FIFO, MD5 hex group and deduplication ids), deleted only after apply, malformed bodies
//! dead-lettered, row order kept, visibility extended while a message is in flight.

pub mod queue;

use crate::stream_source::{assert_fixtures_cached, fixture_lines};
use crate::util::*;
pub use queue::Queue;
use std::time::{Duration, Instant};

/// Runs the daemon with `config` until `queue` is empty; returns how long that took.
async fn drain(queue: &Queue, config: ConfigBuilder) -> Duration {
    let start = Instant::now();
    let daemon = config.run();
    queue.wait_empty().await;
    let elapsed = start.elapsed();
    daemon.stop().await;
    elapsed
}

/// Prints a measured rate.
fn report(what: &str, n: usize, elapsed: Duration) {
    println!(
        "sqs source: {what} received, applied and deleted in {:.2} s ({:.0} messages/s, moto emulator)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequin_sqs_messages_become_exact_cache_entries_and_are_deleted() {
    let env = TestEnv::row_cache("sqs-exact");
    let queue = Queue::fifo("exact").await;
    queue.send_sequin(&fixture_lines()).await;
    drain(&queue, queue.config(&env, "")).await;
    // The update came after the insert in the same FIFO group: the cache holds the update.
    assert_fixtures_cached(&env.keys().await, false).await;
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sqs_bodies_are_dead_lettered_with_the_reason_and_deleted() {
    let env = TestEnv::row_cache("sqs-malformed");
    let queue = Queue::fifo("malformed").await;
    let bodies = malformed_then_good();
    queue.send_sequin(&bodies).await;
    drain(&queue, queue.config(&env, "")).await;

    assert_eq!(
        env.keys().await.get("public.orders:1001").await,
        Some(record_text(fixtures()[0]))
    );
    let letters = env.dead_letters().await;
    for letter in malformed_letters(&letters) {
        assert!(letter.field("source").starts_with("sqs:"));
        assert!(!letter.field("source_id").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rows_order_is_kept_through_the_lanes() {
    // Last write wins: only the order of application decides what the cache holds.
    let env = TestEnv::new("sqs-order");
    env.add_row_cache("consistency = \"plain\"");
    let queue = Queue::fifo("order").await;
    let (rows, versions) = (20u64, 10u64);
    let lines: Vec<String> = (0..versions)
        .flat_map(|version| (0..rows).map(move |row| order_line(row, version)))
        .collect();
    queue.send_sequin(&lines).await;
    // One receiver: moto scans a FIFO queue for a receive without a lock, so two concurrent
    // receives can each take a message of the same group, which SQS never does (moto
    // `sqs/models.py`, `receive_message`). Several receivers are exercised by the throughput
    // test, on rows of their own.
    let config = queue
        .config(&env, "receivers = 1")
        .pipeline("lanes = 4\nbatch_size = 16");
    let elapsed = drain(&queue, config).await;
    report(&format!("{} messages", lines.len()), lines.len(), elapsed);
    let keys = env.keys().await;
    for row in 0..rows {
        let value = keys.get(&format!("public.orders:{row}")).await.unwrap();
        assert!(
            value.contains(&format!(r#""status":"v{}""#, versions - 1)),
            "row {row}: {value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stay_invisible_while_in_flight_and_are_deleted_only_after_apply() {
    let mut cache = RedisServer::start().await;
    let env = TestEnv::row_cache("sqs-visibility").with_cache(&cache.url());
    let queue = Queue::fifo("visibility").await;
    // Three slots for three messages: the daemon cannot receive a message twice, so a message
    // whose visibility ran out would show as visible in the queue.
    let config = queue
        .config(&env, "visibility_timeout_seconds = 2\nmax_messages = 3")
        .pipeline("max_in_flight = 3\nbatch_size = 3\nmax_backoff_ms = 200");
    let daemon = config.run();
    // The daemon is up and applying before the outage.
    queue.send_sequin(&[order_line(0, 0)]).await;
    queue.wait_empty().await;
    cache.stop();
    let lines: Vec<String> = (1..=3).map(|row| order_line(row, 0)).collect();
    queue.send_sequin(&lines).await;
    let what = "the daemon to receive all three";
    queue.wait_counts((0, 3), what, PATIENCE).await;
    // Three visibility timeouts pass while the cache is down: the messages must stay in flight
    // (extended), and none may be deleted before it is applied. What is checked is that nothing
    // happens for a while, so this waits for time, not for an event.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(queue.counts().await, (0, 3));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cache.restart().await;
    queue.wait_empty().await;
    daemon.stop().await;
    let keys = env.keys().await;
    for (row, line) in (1..=3).zip(&lines) {
        assert_eq!(
            keys.get(&format!("public.orders:{row}")).await,
            Some(record_text(line))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_a_fifo_backlog() {
    let env = TestEnv::row_cache("sqs-rate");
    let queue = Queue::fifo("rate").await;
    // One message per row: no message group waits for another.
    let total = 300u64;
    let lines: Vec<String> = (0..total).map(|row| order_line(row, 0)).collect();
    queue.send_sequin(&lines).await;
    let elapsed = drain(&queue, queue.config(&env, "receivers = 4")).await;
    let what = format!("a backlog of {total} messages (one per row)");
    report(&what, lines.len(), elapsed);
    let keys = env.keys().await;
    for row in [0, total / 2, total - 1] {
        assert_eq!(
            keys.get(&format!("public.orders:{row}")).await,
            Some(record_text(&lines[row as usize]))
        );
    }
}
