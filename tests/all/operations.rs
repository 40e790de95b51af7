//! Operating keepwarm: `/metrics`, health endpoints.

use crate::util::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_a_run_did() {
    let url = redis_url();
    let prefix = unique("metrics");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let mut conn = connect(&url).await;
    let lines: Vec<String> = fixtures().iter().map(|l| l.to_string()).collect();
    xadd_sequin(&mut conn, &stream, &lines).await;
    xadd_raw(&mut conn, &stream, &[("garbage", b"not a change message")]).await;
    let n = lines.len() as u64 + 1;

    let admin = format!("127.0.0.1:{}", free_port());
    let mut config = stream_config(plugins.path(), &stream, &group, "");
    config.admin.listen = admin.clone();
    let daemon = Daemon::start(config);
    wait_all_acked(&url, &stream, &group, n, Duration::from_secs(30)).await;

    let source = format!("redis-stream:{stream}");
    let src = source.as_str();
    let metrics_url = format!("http://{admin}/metrics");
    // The lag gauges are sampled periodically: wait until a sample shows the drained group.
    wait_for(
        "the stream gauges to show a drained group",
        Duration::from_secs(30),
        || {
            let metrics_url = metrics_url.clone();
            async move {
                let Some((200, body)) = http_get(&metrics_url).await else {
                    return false;
                };
                metric(&body, "keepwarm_stream_pending", &[("source", src)]) == Some(0.0)
                    && metric(&body, "keepwarm_stream_lag", &[("source", src)]) == Some(0.0)
            }
        },
    )
    .await;
    // Everything is acknowledged: the counters no longer move.
    let (_, text) = http_get(&metrics_url).await.unwrap();
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

    let (status, _) = http_get(&format!("http://{admin}/healthz")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(value("keepwarm_source_up", &[("source", src)]), Some(1.0));
    let (status, ready) = http_get(&format!("http://{admin}/readyz")).await.unwrap();
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
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest("check", ""),
    );
    let config_text = |plugins: &std::path::Path| {
        format!(
            r#"
[redis]
url = "redis://127.0.0.1:1/0"
[plugins]
dir = "{}"
[[source]]
kind = "redis-stream"
stream = "s"
group = "g"
"#,
            plugins.display()
        )
    };
    let config = dir.path().join("good.toml");
    std::fs::write(&config, config_text(plugins.path())).unwrap();
    let config = config.display().to_string();
    let (ok, out, err) = keepwarm_cli(&["check", "--config", &config], "");
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("config: ok (1 sources: redis-stream:s)"),
        "{out}"
    );
    assert!(out.contains("plugin row-cache: ok"), "{out}");

    // A plugin built against another world fails to link: reported, exit code 1.
    plugins.add("wrong-world", &test_plugin_wasm("wrong-world"), "");
    let (ok, out, _) = keepwarm_cli(&["check", "--config", &config], "");
    assert!(!ok);
    assert!(out.contains("plugin row-cache: ok"), "{out}");
    assert!(out.contains("plugin wrong-world: FAILED"), "{out}");

    // An unknown key fails the parse.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        config_text(plugins.path()).replace("[redis]", "[redis]\nport = 1"),
    )
    .unwrap();
    let (ok, _, err) = keepwarm_cli(&["check", "--config", &bad.display().to_string()], "");
    assert!(!ok);
    assert!(err.contains("invalid config"), "{err}");
}

/// The Redis password comes from the environment: `password_env`, or `KEEPWARM_REDIS_PASSWORD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_comes_from_the_environment() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]).await;
    let dir = TempDir::new("kw-password");
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest("pw", ""),
    );
    let config_with = |extra: &str| {
        let path = dir.path().join(format!("c{}.toml", extra.len()));
        std::fs::write(
            &path,
            format!(
                "[redis]\nurl = \"{}\"\n{extra}\n[plugins]\ndir = \"{}\"\n",
                server.url(),
                plugins.path().display()
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, format!("{}\n", fixtures()[0])).unwrap();
    let input = input.display().to_string();

    let named = config_with("password_env = \"KW_TEST_CACHE_PASSWORD\"");
    let (ok, _, err) = keepwarm_cli_env(
        &["replay", "--config", &named, &input],
        "",
        &[("KW_TEST_CACHE_PASSWORD", "s3cret-pw")],
    );
    assert!(ok, "{err}");
    // Unset: refused with the variable's name, and the password never appears in the output.
    let (ok, _, err) = keepwarm_cli(&["replay", "--config", &named, &input], "");
    assert!(!ok);
    assert!(err.contains("KW_TEST_CACHE_PASSWORD"), "{err}");

    let plain = config_with("");
    let (ok, _, err) = keepwarm_cli_env(
        &["replay", "--config", &plain, &input],
        "",
        &[("KEEPWARM_REDIS_PASSWORD", "s3cret-pw")],
    );
    assert!(ok, "{err}");
    assert!(!err.contains("s3cret-pw"));
    let (ok, _, _) = keepwarm_cli(&["replay", "--config", &plain, &input], "");
    assert!(!ok, "no password: Redis refuses");

    let url = format!("redis://:s3cret-pw@127.0.0.1:{}/0", server.port);
    let mut conn = connect(&url).await;
    let cached: Option<String> = redis::cmd("GET")
        .arg("pw:public.orders:1001")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(cached.is_some());
}

/// The SQS source feeds `/metrics`: messages received per source and the sampled queue depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_queue_depth_and_counts_reach_metrics() {
    use crate::sqs::{client, fifo_queue, send_sequin, sqs_config, wait_queue_empty};
    let url = redis_url();
    let prefix = unique("sqs-metrics");
    let sqs = client();
    let queue = fifo_queue(&sqs, "metrics").await;
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let lines: Vec<String> = fixtures().iter().map(|l| l.to_string()).collect();
    send_sequin(&sqs, &queue, &lines).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let mut config = sqs_config(
        plugins.path(),
        &url,
        &queue,
        &format!("{prefix}:dead"),
        "",
        "",
    );
    config.admin.listen = admin.clone();
    let source = config.sources[0].name();
    let daemon = Daemon::start(config);
    wait_queue_empty(&sqs, &queue, Duration::from_secs(60)).await;
    let metrics_url = format!("http://{admin}/metrics");
    let src = source.as_str();
    // The depth is sampled every 5 s: wait for a sample of the drained queue.
    wait_for(
        "a sample of the empty queue",
        Duration::from_secs(30),
        || {
            let metrics_url = metrics_url.clone();
            async move {
                let Some((200, body)) = http_get(&metrics_url).await else {
                    return false;
                };
                metric(&body, "keepwarm_sqs_messages_visible", &[("source", src)]) == Some(0.0)
                    && metric(&body, "keepwarm_sqs_messages_in_flight", &[("source", src)])
                        == Some(0.0)
            }
        },
    )
    .await;
    let (_, text) = http_get(&metrics_url).await.unwrap();
    assert_eq!(
        metric(
            &text,
            "keepwarm_messages_received_total",
            &[("source", src)]
        ),
        Some(lines.len() as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, "keepwarm_source_up", &[("source", src)]),
        Some(1.0)
    );
    daemon.stop().await;
}
