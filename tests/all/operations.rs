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
    let (status, ready) = http_get(&format!("http://{admin}/readyz")).await.unwrap();
    assert_eq!(status, 200, "{ready}");
    daemon.stop().await;
}
