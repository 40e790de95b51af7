//! A Redis Cluster as the cache (`REDIS_CLUSTER_URLS`, started by `scripts/test.sh`): writes
//! split by slot, versioned writes atomic per slot, dead letters in the cluster.

use crate::stream_source::record_text;
use crate::util::*;
use keepwarm::config::Config;
use std::time::Duration;

/// The cluster's masters; the suite fails loudly without them rather than skipping.
fn cluster_urls() -> Vec<String> {
    let urls = std::env::var("REDIS_CLUSTER_URLS").expect(
        "REDIS_CLUSTER_URLS is not set: run the suite with scripts/test.sh, which starts a cluster",
    );
    let urls: Vec<String> = urls.split_whitespace().map(str::to_owned).collect();
    assert!(!urls.is_empty(), "REDIS_CLUSTER_URLS is empty");
    urls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_row_cache_flow_runs_against_a_redis_cluster() {
    let urls = cluster_urls();
    let url = redis_url();
    let prefix = unique("cluster");
    let (stream, group) = (format!("{prefix}:stream"), "kw");
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    // Two keys in two slots per message: each message's versioned write is split by slot.
    plugins.add(
        "tagger",
        &test_plugin_wasm("tagger"),
        &format!("[config]\nprefix = \"{prefix}:t:\"\ntag = \"x\"\n"),
    );
    let seeds: Vec<String> = urls[1..].iter().map(|u| format!("\"{u}\"")).collect();
    let text = format!(
        r#"
[redis]
url = "{first}"
cluster = true
cluster_urls = [{seeds}]
[plugins]
dir = "{dir}"
[dead_letter]
stream = "{prefix}:dead"
[admin]
listen = "127.0.0.1:0"
[[source]]
kind = "redis-stream"
url = "{url}"
stream = "{stream}"
group = "{group}"
block_ms = 200
"#,
        first = urls[0],
        seeds = seeds.join(", "),
        dir = plugins.path().display(),
    );
    let config = Config::parse(&text).unwrap();
    let dir = TempDir::new("kw-cluster");
    let config_path = dir.path().join("keepwarm.toml");
    std::fs::write(&config_path, &text).unwrap();
    let mut conn = connect(&url).await;
    let lines: Vec<String> = fixtures().iter().map(|l| l.to_string()).collect();
    xadd_sequin(&mut conn, &stream, &lines).await;
    xadd_raw(&mut conn, &stream, &[("garbage", b"x")]).await;
    let daemon = Daemon::start(config);
    wait_all_acked(
        &url,
        &stream,
        group,
        lines.len() as u64 + 1,
        Duration::from_secs(60),
    )
    .await;
    daemon.stop().await;

    let cluster = redis::cluster::ClusterClient::new(urls.clone()).unwrap();
    let mut c = cluster.get_async_connection().await.unwrap();
    let reader = c.clone();
    let get = |key: String| {
        let mut c = reader.clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut c)
                .await
                .unwrap()
        }
    };
    let f = fixtures();
    let key = |rest: &str| format!("{prefix}:{rest}");
    assert_eq!(
        get(key("public.orders:1001")).await,
        Some(record_text(f[2]))
    );
    assert_eq!(
        get(key("public.order_items:1001:1")).await,
        Some(record_text(f[1]))
    );
    assert_eq!(get(key("public.orders:998")).await, None);
    // The versions live beside the keys, in the same slot.
    let versions: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("kw:v:{{{}}}", key("public.orders:1001")))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(versions.contains_key(""), "{versions:?}");
    // The tagger's two keys of each message, in different slots.
    assert_eq!(get(format!("{prefix}:t:row:1001")).await, Some("x".into()));
    let seen: u64 = redis::cmd("SCARD")
        .arg(format!("{prefix}:t:seen:x"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(seen > 0);
    let dead: u64 = redis::cmd("XLEN")
        .arg(format!("{prefix}:dead"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(dead, 1);
    // The tools find the dead letters in the cluster too.
    let (ok, out, err) = keepwarm_cli(
        &[
            "dead-letters",
            "list",
            "--json",
            "--config",
            &config_path.display().to_string(),
        ],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("decode"), "{out}");
}
