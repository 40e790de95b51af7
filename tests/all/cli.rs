//! The `keepwarm` command line: `test` and `replay`.

use crate::util::*;

#[test]
fn keepwarm_test_prints_one_json_line_per_change() {
    let plugin = plugin_wasm("row-cache");
    let dir = TempDir::new("kw-cli");
    let manifest = dir.path().join("m.toml");
    std::fs::write(
        &manifest,
        "[config]\nkey = \"c:{table}:{pks}\"\nttl_seconds = 60\n",
    )
    .unwrap();
    let input = format!("{FIXTURES}\nnot json\n");
    let (ok, out, err) = keepwarm_cli(
        &[
            "test",
            plugin.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
        &input,
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 13);
    let f = fixtures();
    assert_eq!(
        lines[0],
        serde_json::json!({"line": 1, "ops": [{"op": "set", "key": "c:orders:1001", "value": record_text(f[0]), "ttl_ms": 60000}]})
    );
    assert_eq!(
        lines[3],
        serde_json::json!({"line": 4, "ops": [{"op": "del", "key": "c:orders:998"}]})
    );
    assert_eq!(
        lines[10],
        serde_json::json!({"line": 11, "ops": [{"op": "del", "key": "c:documents:doc_8f2a"}]})
    );
    assert_eq!(lines[12]["line"], 14);
    assert!(
        lines[12]["error"]
            .as_str()
            .unwrap()
            .contains("invalid JSON")
    );
}

#[test]
fn keepwarm_test_reports_a_plugin_that_fails_to_load() {
    let dir = TempDir::new("kw-cli");
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"\0asm\x0d\0\x01\0truncated").unwrap();
    let (ok, _, err) = keepwarm_cli(&["test", bogus.to_str().unwrap()], "");
    assert!(!ok);
    assert!(err.contains("compile failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepwarm_replay_dead_letters_a_line_over_the_limit_and_goes_on() {
    // A line of 3 MB against a 1 MB limit, between two changes: read no further than the
    // limit, dead-lettered as too large, and the next line applied.
    let env = TestEnv::row_cache("replay-huge");
    let dir = TempDir::new("kw-replay-huge");
    let config = env
        .config()
        .pipeline("max_message_bytes = 1048576")
        .write(&dir, "keepwarm.toml");
    let huge = format!("[{}]", "1,".repeat(1_500_000));
    let lines = [fixtures()[0], huge.as_str(), fixtures()[2]].join("\n");
    let input = dir.write("changes.jsonl", &lines);
    let (ok, _, err) = keepwarm_cli_async(&["replay", "--config", &config, &input]).await;
    assert!(ok, "{err}");
    assert!(err.contains("replayed 3 messages: 3 done"), "{err}");
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].field("reason");
    assert!(
        reason.contains("message of 3000002 bytes exceeds the limit of 1048576 bytes"),
        "{reason}"
    );
    assert_eq!(dead[0].raw("payload").len(), 1_048_576);
    assert_eq!(
        env.keys().await.get("public.orders:1001").await,
        Some(record_text(fixtures()[2]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepwarm_replay_warms_the_cache_from_a_file() {
    let env = TestEnv::row_cache("replay");
    let dir = TempDir::new("kw-replay");
    let config = env.config().write(&dir, "keepwarm.toml");
    let input = dir.write("changes.jsonl", FIXTURES);
    let (ok, _, err) = keepwarm_cli_async(&["replay", "--config", &config, &input]).await;
    assert!(ok, "{err}");
    assert!(err.contains("replayed 12 messages: 12 done"), "{err}");
    assert_eq!(
        env.keys().await.get("public.orders:1001").await,
        Some(record_text(fixtures()[2]))
    );
}
