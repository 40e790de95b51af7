//! Regressions of issue 14, each found by using keepwarm as a user would: an oversized HTTP
//! body, a dead-letter replay interrupted by a signal, an SQS receive running at shutdown. Each
//! runs the real binary.

use crate::util::*;
use aws_sdk_sqs::types::QueueAttributeName;
use std::time::Duration;

/// A plugin directory holding row-cache, writing under `prefix`.
fn row_cache_dir(prefix: &str) -> TempDir {
    let dir = TempDir::new("kw-plugins");
    add_plugin(
        dir.path(),
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(prefix, ""),
    );
    dir
}

/// A config file for the binary: the cache, `plugins`, a dead-letter stream, `rest`.
fn config_file(dir: &TempDir, plugins: &std::path::Path, dead: &str, rest: &str) -> String {
    let text = format!(
        "[redis]\nurl = \"{url}\"\n[plugins]\ndir = \"{plugins}\"\n[dead_letter]\nstream = \"{dead}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{rest}\n",
        url = redis_url(),
        plugins = plugins.display(),
    );
    dir.write("keepwarm.toml", &text)
}

#[tokio::test]
async fn issue_14_an_oversized_body_sent_whole_before_reading_gets_a_readable_413() {
    let prefix = unique("kw-413");
    let plugins = row_cache_dir(&prefix);
    let dir = TempDir::new("kw-413");
    let port = free_port();
    let config = config_file(
        &dir,
        plugins.path(),
        &format!("{prefix}:dead"),
        &format!(
            "[[source]]\nkind = \"http\"\nlisten = \"127.0.0.1:{port}\"\npath = \"/sequin\"\ntoken = \"t\"\nmax_body_bytes = 1024\n"
        ),
    );
    let mut daemon = KeepwarmProcess::spawn(&["run", "--config", &config]);
    daemon.wait_log("listening for sequin webhooks", Duration::from_secs(60));
    // 300 KB, sent whole by a client that reads nothing until it has written everything.
    let body = format!("{{\"data\":[\"{}\"]}}", "x".repeat(300 * 1024));
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/sequin"))
        .bearer_auth("t")
        .body(body)
        .send()
        .await
        .expect("the client must get a reply, not a broken pipe");
    assert_eq!(response.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    let text = response.text().await.unwrap();
    assert!(text.contains("body exceeds 1024 bytes"), "{text}");
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

#[tokio::test]
async fn issue_14_a_dead_letter_replay_stops_on_sigterm_and_keeps_what_it_did_not_replay() {
    let _heavy = heavy_test_async().await;
    let prefix = unique("kw-replay-stop");
    let dead = format!("{prefix}:dead");
    let plugins = row_cache_dir(&prefix);
    let dir = TempDir::new("kw-replay-stop");
    // One message in flight at a time, so that the replay is still reading when the signal
    // comes.
    let config = config_file(
        &dir,
        plugins.path(),
        &dead,
        "[pipeline]\nbatch_size = 1\nmax_in_flight = 1\nlanes = 1\n",
    );
    let total = 20_000u64;
    let base = fixtures()[0];
    let mut conn = connect(&redis_url()).await;
    let mut pipe = redis::pipe();
    for row in 0..total {
        pipe.xadd(
            &dead,
            "*",
            &[
                ("payload", order_change(base, row, Some(row + 1))),
                ("source_id", format!("line {row}")),
            ],
        )
        .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    let mut replay = KeepwarmProcess::spawn(&["dead-letters", "replay", "--config", &config]);
    let pattern = format!("{prefix}:*");
    wait_for(
        "the replay to apply its first entries",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            let pattern = pattern.clone();
            let dead = dead.clone();
            async move {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                keys.iter().any(|k| !k.starts_with(&dead))
            }
        },
    )
    .await;
    replay.signal("TERM");
    let status = replay.wait_exit(Duration::from_secs(60));
    let log = replay.log.join("\n");
    assert!(
        !status.success(),
        "an interrupted replay must not report success:\n{log}"
    );
    assert!(log.contains("interrupted"), "{log}");
    let left: u64 = redis::cmd("XLEN")
        .arg(&dead)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        left > 0 && left < total,
        "{left} of {total} dead letters left: the replayed ones must go, the others stay"
    );
}

#[tokio::test]
async fn issue_14_a_message_received_while_shutting_down_is_returned_at_once() {
    let client = crate::sqs::queue::client();
    let queue = client
        .create_queue()
        .queue_name(unique("kw-sqs-stop").replace(':', "-"))
        .attributes(QueueAttributeName::VisibilityTimeout, "600")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let prefix = unique("kw-sqs-stop");
    let plugins = row_cache_dir(&prefix);
    let dir = TempDir::new("kw-sqs-stop");
    let config = config_file(
        &dir,
        plugins.path(),
        &format!("{prefix}:dead"),
        &format!(
            "[[source]]\nkind = \"sqs\"\nqueue_url = \"{queue}\"\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\nreceivers = 1\nwait_time_seconds = 20\nvisibility_timeout_seconds = 600\n",
            endpoint = crate::sqs::queue::sqs_endpoint(),
        ),
    );
    let mut daemon = KeepwarmProcess::spawn(&["run", "--config", &config]);
    daemon.wait_log("receiving from sqs", Duration::from_secs(60));
    let send = |row: u64| {
        client
            .send_message()
            .queue_url(&queue)
            .message_body(order_change(fixtures()[0], row, Some(row)))
            .send()
    };
    // A first message applied: the receiver has gone round its loop and its next long poll is
    // under way on an empty queue.
    send(1).await.unwrap();
    let keys = Keys::connect(&redis_url()).await;
    let pattern = format!("{prefix}:public.*");
    wait_for(
        "the first message to be applied",
        Duration::from_secs(60),
        || {
            let (keys, pattern) = (&keys, &pattern);
            async move { !keys.matching(pattern).await.is_empty() }
        },
    )
    .await;
    // The daemon is asked to stop, and only then does a message arrive, which that poll takes.
    daemon.signal("TERM");
    daemon.wait_log("shutting down", Duration::from_secs(30));
    send(2).await.unwrap();
    assert!(daemon.wait_exit(Duration::from_secs(90)).success());
    // Taken by the stopping daemon, it must be visible again now, not in ten minutes.
    let received = client
        .receive_message()
        .queue_url(&queue)
        .wait_time_seconds(10)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    let log = daemon.log.join("\n");
    assert_eq!(
        received.len(),
        1,
        "the message must come back at once:\n{log}"
    );
    assert!(
        log.contains("returning a received message to the queue"),
        "the stopping daemon's poll must have taken it:\n{log}"
    );
}
