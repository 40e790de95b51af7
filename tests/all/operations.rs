//! Operating keepwarm: `/metrics`, health endpoints, `keepwarm check`, the Redis password.

use crate::sqs::Queue;
use crate::stream_source::{assert_fixtures_cached, fixture_lines};
use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_a_run_did() {
    let env = TestEnv::row_cache("metrics");
    let lines = fixture_lines();
    env.xadd(&lines).await;
    env.xadd_raw(&[("garbage", b"not a change message")]).await;
    let n = lines.len() as u64 + 1;

    let daemon = env.stream_config().admin().run();
    env.wait_drained(n).await;

    let source = format!("redis-stream:{}", env.stream());
    let src = source.as_str();
    // The lag gauges are sampled periodically: wait until a sample shows the drained group.
    // Everything is acknowledged by then: the counters no longer move.
    let gauges = ["keepwarm_stream_pending", "keepwarm_stream_lag"];
    let text = wait_gauges_zero(&daemon.admin_url("/metrics"), src, &gauges).await;
    let value = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    assert_eq!(
        value("keepwarm_messages_received_total", &[("source", src)]),
        Some(n as f64),
        "{text}"
    );
    assert_eq!(
        value(
            "keepwarm_messages_dead_lettered_total",
            &[("source", src), ("plugin", ""), ("kind", "decode")]
        ),
        Some(1.0),
        "{text}"
    );
    let applied = value(
        "keepwarm_messages_applied_total",
        &[("source", src), ("plugin", "row-cache")],
    )
    .unwrap_or(0.0);
    let plugin_letters = value(
        "keepwarm_messages_dead_lettered_total",
        &[("source", src), ("plugin", "row-cache"), ("kind", "plugin")],
    )
    .unwrap_or(0.0);
    assert!(applied > 0.0, "{text}");
    assert_eq!(applied + plugin_letters, lines.len() as f64, "{text}");
    let calls = value(
        "keepwarm_plugin_call_seconds_count",
        &[("plugin", "row-cache")],
    )
    .unwrap();
    assert!(calls >= 1.0, "{text}");
    assert!(value("keepwarm_redis_apply_seconds_count", &[]).unwrap() >= 1.0);
    assert!(text.contains("# TYPE keepwarm_plugin_call_seconds histogram"));

    let (status, _) = http_get(&daemon.admin_url("/healthz")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(value("keepwarm_source_up", &[("source", src)]), Some(1.0));
    let (status, ready) = http_get(&daemon.admin_url("/readyz")).await.unwrap();
    assert_eq!(status, 200, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["sources"][src], true, "{ready}");
    daemon.stop().await;
}

/// `keepwarm check`: config and plugins validated without connecting to anything (the Redis URL
/// points at a port where nothing listens).
#[test]
fn check_validates_config_and_plugins_without_connecting() {
    let dir = TempDir::new("kw-check");
    let env = TestEnv::row_cache("check");
    let config = ConfigBuilder::new("redis://127.0.0.1:1/0", env.plugins_dir())
        .source("redis-stream", "stream = \"s\"\ngroup = \"g\"");
    let good = config.write(&dir, "good.toml");
    let (ok, out, err) = keepwarm_cli(&["check", "--config", &good], "");
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("config: ok (1 sources: redis-stream:s)"),
        "{out}"
    );
    assert!(out.contains("plugin row-cache: ok"), "{out}");

    // A plugin built against another world fails to link: reported, exit code 1.
    env.add_plugin("wrong-world", &test_plugin_wasm("wrong-world"), "");
    let (ok, out, _) = keepwarm_cli(&["check", "--config", &good], "");
    assert!(!ok);
    assert!(out.contains("plugin row-cache: ok"), "{out}");
    assert!(out.contains("plugin wrong-world: FAILED"), "{out}");

    // An unknown key fails the parse.
    let bad = config.redis("port = 1").write(&dir, "bad.toml");
    let (ok, _, err) = keepwarm_cli(&["check", "--config", &bad], "");
    assert!(!ok);
    assert!(err.contains("invalid config"), "{err}");
}

/// The Redis password comes from the environment: `password_env`, or `KEEPWARM_REDIS_PASSWORD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_comes_from_the_environment() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]).await;
    let env = TestEnv::row_cache("pw").with_cache(&server.url());
    let dir = TempDir::new("kw-password");
    let input = dir.write("in.jsonl", &format!("{}\n", fixtures()[0]));
    let replay = |config: &str, vars: &[(&str, &str)]| {
        keepwarm_cli_env(&["replay", "--config", config, &input], "", vars)
    };

    let named = env
        .config()
        .redis("password_env = \"KW_TEST_CACHE_PASSWORD\"")
        .write(&dir, "named.toml");
    let (ok, _, err) = replay(&named, &[("KW_TEST_CACHE_PASSWORD", "s3cret-pw")]);
    assert!(ok, "{err}");
    // Unset: refused with the variable's name, and the password never appears in the output.
    let (ok, _, err) = replay(&named, &[]);
    assert!(!ok);
    assert!(err.contains("KW_TEST_CACHE_PASSWORD"), "{err}");

    let plain = env.config().write(&dir, "plain.toml");
    let (ok, _, err) = replay(&plain, &[("KEEPWARM_REDIS_PASSWORD", "s3cret-pw")]);
    assert!(ok, "{err}");
    assert!(!err.contains("s3cret-pw"));
    let (ok, _, _) = replay(&plain, &[]);
    assert!(!ok, "no password: Redis refuses");

    let url = format!("redis://:s3cret-pw@127.0.0.1:{}/0", server.port);
    let keys = Keys::under(&url, &env.prefix).await;
    assert!(keys.get("public.orders:1001").await.is_some());
}

/// The SQS source feeds `/metrics`: messages received per source and the sampled queue depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_queue_depth_and_counts_reach_metrics() {
    let env = TestEnv::row_cache("sqs-metrics");
    let queue = Queue::fifo("metrics").await;
    let lines = fixture_lines();
    queue.send_sequin(&lines).await;
    let daemon = queue.config(&env, "").admin().run();
    queue.wait_empty().await;
    let source = queue.source_name();
    let src = source.as_str();
    // The depth is sampled every 5 s: wait for a sample of the drained queue.
    let gauges = [
        "keepwarm_sqs_messages_visible",
        "keepwarm_sqs_messages_in_flight",
    ];
    let text = wait_gauges_zero(&daemon.admin_url("/metrics"), src, &gauges).await;
    // At least every message sent: SQS delivers at least once, the emulator under load has
    // handed messages out twice, and the counter rightly counts every delivery.
    let received = metric(
        &text,
        "keepwarm_messages_received_total",
        &[("source", src)],
    );
    assert!(
        received.is_some_and(|n| n >= lines.len() as f64),
        "received {received:?} of {} sent\n{text}",
        lines.len()
    );
    // And every one was applied, none dead-lettered: a count of deliveries alone would not
    // show a message lost.
    assert_fixtures_cached(&env.keys().await, false).await;
    assert!(env.dead_letters().await.is_empty());
    assert_eq!(
        metric(&text, "keepwarm_source_up", &[("source", src)]),
        Some(1.0)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_makes_batches_wait_not_dead_letters() {
    // Three plugins with four lanes each, and room for three instances in all: a lane that
    // finds no room waits (the other plugins' idle instances are dropped to make some), and no
    // message is dead-lettered for it.
    let env = TestEnv::new("pool-full");
    for name in ["a", "b", "c"] {
        let manifest = format!(
            "[config]\nkey = \"{}:{name}:{{table}}:{{pks}}\"\n",
            env.prefix
        );
        env.add_plugin(name, &plugin_wasm("row-cache"), &manifest);
    }
    let daemon = env
        .stream_config()
        .set("plugins", "instances = 3")
        .pipeline("lanes = 4\nbatch_size = 2")
        .run();
    let lines: Vec<String> = (0..40).map(|row| order_line(row, 0)).collect();
    env.xadd(&lines).await;
    env.wait_drained(lines.len() as u64).await;
    daemon.stop().await;
    assert!(env.dead_letters().await.is_empty());
    let keys = env.keys().await;
    for name in ["a", "b", "c"] {
        let cached = keys.matching(&format!("{name}:orders:*")).await.len();
        assert_eq!(cached, 40, "plugin {name}");
    }
}
