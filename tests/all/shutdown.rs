//! Graceful shutdown of the real binary on real signals.

use crate::util::*;
use std::time::Duration;

fn order(row: u64) -> String {
    fixtures()[0]
        .replace(r#""id":1001"#, &format!(r#""id":{row}"#))
        .replace(
            r#""record_pks":["1001"]"#,
            &format!(r#""record_pks":["{row}"]"#),
        )
}

fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.path().join("keepwarm.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_acknowledges_in_flight_work_then_exits_0() {
    let url = redis_url();
    let prefix = unique("sigterm");
    let (stream, group) = (format!("{prefix}:stream"), "kw");
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let mut conn = connect(&url).await;
    let n = 20_000;
    let lines: Vec<String> = (0..n).map(order).collect();
    for chunk in lines.chunks(2000) {
        xadd_sequin(&mut conn, &stream, chunk).await;
    }
    let dir = TempDir::new("kw-sigterm");
    let admin = format!("127.0.0.1:{}", free_port());
    let text = stream_config_text(plugins.path(), &stream, group, "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\""));
    let config = write_config(&dir, &text);
    let mut daemon = KeepwarmProcess::spawn(&[
        "--log-format",
        "json",
        "run",
        "--config",
        &config,
        "--shutdown-timeout",
        "60",
    ]);
    // Signal once the daemon is working through the stream.
    wait_for(
        "the daemon to read entries",
        Duration::from_secs(60),
        || {
            let mut conn = conn.clone();
            let stream = stream.clone();
            async move { group_progress(&mut conn, &stream, group).await.0 > 0 }
        },
    )
    .await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", daemon.log.join("\n"));

    // Everything read was applied and acknowledged; nothing is left pending.
    let (read, pending) = group_progress(&mut conn, &stream, group).await;
    assert_eq!(pending, 0, "{}", daemon.log.join("\n"));
    assert!(read > 0);
    let keys: Vec<String> = (0..n)
        .map(|row| format!("{prefix}:public.orders:{row}"))
        .collect();
    let cached: u64 = redis::cmd("EXISTS")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(cached, read, "every entry read is in the cache");

    // --log-format json: every line is one JSON object.
    assert!(daemon.log.iter().any(|l| l.contains("shutting down")));
    for line in daemon.log.iter().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not a JSON log line ({error}): {line}"));
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let url = redis_url();
    let prefix = unique("second-signal");
    let (stream, group) = (format!("{prefix}:stream"), "kw");
    let plugins = PluginDir::new();
    // A plugin call that runs for two minutes holds the graceful shutdown back.
    let manifest = format!(
        "[limits]\ndeadline_ms = 120000\n[config]\nprefix = \"{prefix}:\"\nmode = \"loop\"\n"
    );
    plugins.add("hostile", &test_plugin_wasm("hostile"), &manifest);
    let mut conn = connect(&url).await;
    xadd_sequin(&mut conn, &stream, &[order(1)]).await;
    let dir = TempDir::new("kw-second-signal");
    let admin = format!("127.0.0.1:{}", free_port());
    let text = stream_config_text(plugins.path(), &stream, group, "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\""));
    let config = write_config(&dir, &text);
    let mut daemon =
        KeepwarmProcess::spawn(&["run", "--config", &config, "--shutdown-timeout", "120"]);
    wait_for("the entry to be read", Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { group_progress(&mut conn, &stream, group).await == (1, 1) }
    })
    .await;
    daemon.signal("TERM");
    daemon.wait_log("shutting down", Duration::from_secs(30));
    daemon.signal("INT");
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", daemon.log.join("\n"));
    // The unfinished entry stays pending for redelivery.
    assert_eq!(group_progress(&mut conn, &stream, group).await, (1, 1));
}
