//! Graceful shutdown of the real binary on real signals.

use crate::hostile::hostile_manifest;
use crate::util::*;
use std::time::Duration;

fn order(row: u64) -> String {
    order_change(fixtures()[0], row, None)
}

/// Starts the `keepwarm` binary on `env`'s stream with `args` before and after `run --config`.
fn spawn(env: &TestEnv, dir: &TempDir, before: &[&str], after: &[&str]) -> KeepwarmProcess {
    let config = env.stream_config().admin().write(dir, "keepwarm.toml");
    let args: Vec<&str> = before
        .iter()
        .copied()
        .chain(["run", "--config", &config])
        .chain(after.iter().copied())
        .collect();
    KeepwarmProcess::spawn(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_and_acknowledges_in_flight_work_then_exits_0() {
    let env = TestEnv::row_cache("sigterm");
    let n = 20_000;
    let lines: Vec<String> = (0..n).map(order).collect();
    for chunk in lines.chunks(2000) {
        env.xadd(chunk).await;
    }
    let dir = TempDir::new("kw-sigterm");
    let json = ["--log-format", "json"];
    let mut daemon = spawn(&env, &dir, &json, &["--shutdown-timeout", "60"]);
    // Signal once the daemon is working through the stream.
    env.wait("the daemon to read entries", |read, _| read > 0)
        .await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", daemon.log.join("\n"));

    // Everything read was applied and acknowledged; nothing is left pending.
    let (read, pending) = env.progress().await;
    assert_eq!(pending, 0, "{}", daemon.log.join("\n"));
    assert!(read > 0);
    let keys = (0..n).map(|row| format!("public.orders:{row}"));
    let cached = env.keys().await.exist(keys).await;
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
    let env = TestEnv::new("second-signal");
    // A plugin call that runs for two minutes holds the graceful shutdown back.
    let limits = "[limits]\ndeadline_ms = 120000";
    let manifest = hostile_manifest(&env.prefix, "loop", limits, "");
    env.add_plugin("hostile", &test_plugin_wasm("hostile"), &manifest);
    env.xadd(&[order(1)]).await;
    let dir = TempDir::new("kw-second-signal");
    let mut daemon = spawn(&env, &dir, &[], &["--shutdown-timeout", "120"]);
    env.wait("the entry to be read", |read, pending| {
        (read, pending) == (1, 1)
    })
    .await;
    daemon.signal("TERM");
    daemon.wait_log("shutting down", Duration::from_secs(30));
    daemon.signal("INT");
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", daemon.log.join("\n"));
    // The unfinished entry stays pending for redelivery.
    assert_eq!(env.progress().await, (1, 1));
}
