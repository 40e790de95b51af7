//! The SQS source against the moto emulator: messages sent exactly as Sequin's SQS sink sends
//! them (FIFO, MD5 hex group and deduplication ids), deleted only after apply, malformed bodies
//! dead-lettered, row order kept, visibility extended while a message is in flight.

use crate::dead_letters::{entries, field};
use crate::stream_source::{get, record_text};
use crate::util::*;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use keepwarm::config::Config;
use md5::{Digest as _, Md5};
use std::time::{Duration, Instant};

/// The emulator's URL, from `scripts/test.sh`.
pub fn sqs_endpoint() -> String {
    let endpoint = std::env::var("SQS_ENDPOINT").expect(
        "SQS_ENDPOINT is not set: run the suite with scripts/test.sh, which starts the SQS emulator",
    );
    assert!(
        std::env::var_os("AWS_ACCESS_KEY_ID").is_some(),
        "AWS_ACCESS_KEY_ID is not set: scripts/test.sh exports dummy credentials for the emulator"
    );
    endpoint
}

/// A client of the emulator with dummy credentials of its own.
pub fn client() -> Client {
    let credentials = aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "tests");
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(sqs_endpoint())
        .credentials_provider(credentials)
        .build();
    Client::from_conf(config)
}

/// Creates a FIFO queue of its own for a test; returns its URL.
pub async fn fifo_queue(client: &Client, prefix: &str) -> String {
    // Queue names: at most 80 characters of [A-Za-z0-9_-], plus `.fifo`.
    let name: String = unique(prefix)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(70)
        .collect();
    client
        .create_queue()
        .queue_name(format!("{name}.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap()
}

fn md5_hex(text: &str) -> String {
    hex::encode(Md5::digest(text.as_bytes()))
}

/// Sends bodies as Sequin's SQS sink does: `SendMessageBatch` of up to 10, the group id the MD5
/// hex of the row's primary keys joined with `:`, the deduplication id the MD5 hex of the
/// idempotency key. A body that is not a change message gets a group and an id of its own.
pub async fn send_sequin(client: &Client, queue_url: &str, bodies: &[String]) {
    for chunk in bodies.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let (group, dedup) = match serde_json::from_str::<serde_json::Value>(body) {
                    Ok(value) if value["metadata"]["record_pks"].is_array() => {
                        let pks: Vec<&str> = value["metadata"]["record_pks"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|pk| pk.as_str().unwrap())
                            .collect();
                        let key = value["metadata"]["idempotency_key"].as_str().unwrap();
                        (md5_hex(&pks.join(":")), md5_hex(key))
                    }
                    _ => (md5_hex(body), md5_hex(&unique("dedup"))),
                };
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .message_group_id(group)
                    .message_deduplication_id(dedup)
                    .build()
                    .unwrap()
            })
            .collect();
        let sent = client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(sent.failed.is_empty(), "{:?}", sent.failed);
    }
}

/// `(visible, in flight)` message counts of a queue.
pub async fn queue_counts(client: &Client, queue_url: &str) -> (u64, u64) {
    let attributes = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    let count = |name: QueueAttributeName| {
        attributes
            .get(&name)
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    (
        count(QueueAttributeName::ApproximateNumberOfMessages),
        count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

/// Waits until the queue holds nothing, visible or in flight: everything was deleted. Checks
/// every 100 ms: the emulator serves one request at a time, and polling it harder would slow
/// down the daemon under test.
pub async fn wait_queue_empty(client: &Client, queue_url: &str, limit: Duration) {
    let start = Instant::now();
    while queue_counts(client, queue_url).await != (0, 0) {
        assert!(
            start.elapsed() < limit,
            "timed out waiting for the queue to be empty"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A daemon configuration with one SQS source.
pub fn sqs_config(
    plugins: &std::path::Path,
    cache_url: &str,
    queue_url: &str,
    dead: &str,
    source_extra: &str,
    extra: &str,
) -> Config {
    Config::parse(&format!(
        r#"
[redis]
url = "{cache_url}"
[plugins]
dir = "{dir}"
[dead_letter]
stream = "{dead}"
{extra}
[[source]]
kind = "sqs"
queue_url = "{queue_url}"
region = "us-east-1"
endpoint_url = "{endpoint}"
wait_time_seconds = 1
{source_extra}
"#,
        dir = plugins.display(),
        endpoint = sqs_endpoint(),
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequin_sqs_messages_become_exact_cache_entries_and_are_deleted() {
    let url = redis_url();
    let prefix = unique("sqs-exact");
    let sqs = client();
    let queue = fifo_queue(&sqs, "exact").await;
    let plugins = row_cache_dir(&prefix, "");
    let lines: Vec<String> = fixtures().iter().map(|l| l.to_string()).collect();
    send_sequin(&sqs, &queue, &lines).await;
    let dead = format!("{prefix}:dead");
    let daemon = Daemon::start(sqs_config(plugins.path(), &url, &queue, &dead, "", ""));
    wait_queue_empty(&sqs, &queue, Duration::from_secs(60)).await;
    daemon.stop().await;

    let mut conn = connect(&url).await;
    let f = fixtures();
    let key = |rest: &str| format!("{prefix}:{rest}");
    // The update came after the insert in the same FIFO group: the cache holds the update.
    assert_eq!(
        get(&mut conn, &key("public.orders:1001")).await,
        Some(record_text(f[2]))
    );
    assert_eq!(get(&mut conn, &key("public.orders:998")).await, None);
    assert_eq!(
        get(
            &mut conn,
            &key("billing.invoices:7d9f2c1e-4b3a-4e8d-a1f0-9c2b6e5d4a31")
        )
        .await,
        Some(record_text(f[5]))
    );
    assert_eq!(
        get(
            &mut conn,
            &key("analytics.page_views:2025-03-13:9007199254740993")
        )
        .await,
        Some(record_text(f[11]))
    );
    assert!(entries(&mut conn, &dead).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sqs_bodies_are_dead_lettered_with_the_reason_and_deleted() {
    let url = redis_url();
    let prefix = unique("sqs-malformed");
    let sqs = client();
    let queue = fifo_queue(&sqs, "malformed").await;
    let plugins = row_cache_dir(&prefix, "");
    let bad = [
        "this is not JSON".to_owned(),
        r#"{"id":1,"name":"not a change message"}"#.to_owned(),
        r#""a bare string from a Sequin transform""#.to_owned(),
    ];
    let mut bodies = bad.to_vec();
    bodies.push(fixtures()[0].to_owned());
    send_sequin(&sqs, &queue, &bodies).await;
    let dead = format!("{prefix}:dead");
    let daemon = Daemon::start(sqs_config(plugins.path(), &url, &queue, &dead, "", ""));
    wait_queue_empty(&sqs, &queue, Duration::from_secs(60)).await;
    daemon.stop().await;

    let mut conn = connect(&url).await;
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1001")).await,
        Some(record_text(fixtures()[0]))
    );
    let letters = entries(&mut conn, &dead).await;
    assert_eq!(letters.len(), 3);
    for (body, expected) in bad.iter().zip([
        "invalid JSON",
        "missing field `action`",
        "a JSON string, not a change message",
    ]) {
        let letter = letters
            .iter()
            .find(|l| field(l, "payload") == *body)
            .unwrap_or_else(|| panic!("no dead letter for {body}"));
        assert!(field(letter, "reason").contains(expected), "{letter:?}");
        assert_eq!(field(letter, "kind"), "decode");
        assert!(field(letter, "source").starts_with("sqs:"));
        assert!(!field(letter, "source_id").is_empty());
    }
}

/// An order message for `row` at `version`, committed after every earlier version.
fn order_line(row: u64, version: u64) -> String {
    fixtures()[2]
        .replace(r#""id":1001"#, &format!(r#""id":{row}"#))
        .replace(
            r#""record_pks":["1001"]"#,
            &format!(r#""record_pks":["{row}"]"#),
        )
        .replace(
            r#""status":"shipped""#,
            &format!(r#""status":"v{version}""#),
        )
        .replace(
            r#""commit_lsn":1243362320"#,
            &format!(r#""commit_lsn":{}"#, 1_000_000 + version * 1000 + row),
        )
        .replace(
            r#""idempotency_key":"MTI0MzM2MjMyMDox""#,
            &format!(r#""idempotency_key":"k-{row}-{version}""#),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rows_order_is_kept_through_the_lanes() {
    let url = redis_url();
    let prefix = unique("sqs-order");
    let sqs = client();
    let queue = fifo_queue(&sqs, "order").await;
    // Last write wins: only the order of application decides what the cache holds.
    let plugins = row_cache_dir(&prefix, "consistency = \"plain\"");
    let (rows, versions) = (20u64, 10u64);
    let mut lines = Vec::new();
    for version in 0..versions {
        for row in 0..rows {
            lines.push(order_line(row, version));
        }
    }
    send_sequin(&sqs, &queue, &lines).await;
    let dead = format!("{prefix}:dead");
    let config = sqs_config(
        plugins.path(),
        &url,
        &queue,
        &dead,
        // One receiver: moto scans a FIFO queue for a receive without a lock, so two concurrent
        // receives can each take a message of the same group, which SQS never does (moto
        // `sqs/models.py`, `receive_message`). Several receivers are exercised by the
        // throughput test, on rows of their own.
        "receivers = 1",
        "[pipeline]\nlanes = 4\nbatch_size = 16",
    );
    let start = Instant::now();
    let daemon = Daemon::start(config);
    wait_queue_empty(&sqs, &queue, Duration::from_secs(120)).await;
    let elapsed = start.elapsed();
    daemon.stop().await;
    println!(
        "sqs source: {} messages received, applied and deleted in {:.2} s ({:.0} messages/s, moto emulator)",
        lines.len(),
        elapsed.as_secs_f64(),
        lines.len() as f64 / elapsed.as_secs_f64()
    );
    let mut conn = connect(&url).await;
    for row in 0..rows {
        let value = get(&mut conn, &format!("{prefix}:public.orders:{row}"))
            .await
            .unwrap();
        assert!(
            value.contains(&format!(r#""status":"v{}""#, versions - 1)),
            "row {row}: {value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_stay_invisible_while_in_flight_and_are_deleted_only_after_apply() {
    let mut cache = RedisServer::start().await;
    let prefix = unique("sqs-visibility");
    let sqs = client();
    let queue = fifo_queue(&sqs, "visibility").await;
    let plugins = row_cache_dir(&prefix, "");
    let dead = format!("{prefix}:dead");
    // Three slots for three messages: the daemon cannot receive a message twice, so a message
    // whose visibility ran out would show as visible in the queue.
    let config = sqs_config(
        plugins.path(),
        &cache.url(),
        &queue,
        &dead,
        "visibility_timeout_seconds = 2\nmax_messages = 3",
        "[pipeline]\nmax_in_flight = 3\nbatch_size = 3\nmax_backoff_ms = 200",
    );
    let daemon = Daemon::start(config);
    // The daemon is up and applying before the outage.
    send_sequin(&sqs, &queue, &[order_line(0, 0)]).await;
    wait_queue_empty(&sqs, &queue, Duration::from_secs(30)).await;
    cache.stop();
    let lines: Vec<String> = (1..=3).map(|row| order_line(row, 0)).collect();
    send_sequin(&sqs, &queue, &lines).await;
    wait_for(
        "the daemon to receive all three",
        Duration::from_secs(30),
        || async { queue_counts(&sqs, &queue).await == (0, 3) },
    )
    .await;
    // Three visibility timeouts pass while the cache is down: the messages must stay in flight
    // (extended), and none may be deleted before it is applied.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(queue_counts(&sqs, &queue).await, (0, 3));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cache.restart().await;
    wait_queue_empty(&sqs, &queue, Duration::from_secs(60)).await;
    daemon.stop().await;
    let mut conn = connect(&cache.url()).await;
    for (row, line) in (1..=3).zip(&lines) {
        assert_eq!(
            get(&mut conn, &format!("{prefix}:public.orders:{row}")).await,
            Some(record_text(line))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_a_fifo_backlog() {
    let url = redis_url();
    let prefix = unique("sqs-rate");
    let sqs = client();
    let queue = fifo_queue(&sqs, "rate").await;
    let plugins = row_cache_dir(&prefix, "");
    // One message per row: no message group waits for another.
    let total = 300u64;
    let lines: Vec<String> = (0..total).map(|row| order_line(row, 0)).collect();
    send_sequin(&sqs, &queue, &lines).await;
    let dead = format!("{prefix}:dead");
    let config = sqs_config(plugins.path(), &url, &queue, &dead, "receivers = 4", "");
    let start = Instant::now();
    let daemon = Daemon::start(config);
    wait_queue_empty(&sqs, &queue, Duration::from_secs(120)).await;
    let elapsed = start.elapsed();
    daemon.stop().await;
    println!(
        "sqs source: a backlog of {total} messages (one per row) received, applied and deleted in {:.2} s ({:.0} messages/s, moto emulator)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    let mut conn = connect(&url).await;
    for row in [0, total / 2, total - 1] {
        assert_eq!(
            get(&mut conn, &format!("{prefix}:public.orders:{row}")).await,
            Some(record_text(&lines[row as usize]))
        );
    }
}
