//! A Redis Cluster as the cache (`REDIS_CLUSTER_URLS`, started by `scripts/test.sh`): writes
//! split by slot, versioned writes atomic per slot, dead letters in the cluster.

use crate::stream_source::fixture_lines;
use crate::util::*;

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
    let env = TestEnv::row_cache("cluster").with_cache(&urls[0]);
    // Two keys in two slots per message: each message's versioned write is split by slot.
    let tagger = format!("[config]\nprefix = \"{}:t:\"\ntag = \"x\"\n", env.prefix);
    env.add_plugin("tagger", &test_plugin_wasm("tagger"), &tagger);
    let seeds: Vec<String> = urls[1..].iter().map(|u| format!("\"{u}\"")).collect();
    let config = env
        .stream_config()
        .redis(&format!(
            "cluster = true\ncluster_urls = [{}]",
            seeds.join(", ")
        ))
        .source_lines("claim_idle_ms = 30000");
    let dir = TempDir::new("kw-cluster");
    let config_path = config.write(&dir, "keepwarm.toml");
    let lines = fixture_lines();
    env.xadd(&lines).await;
    env.xadd_raw(&[("garbage", b"x")]).await;
    let daemon = config.run();
    env.wait_drained(lines.len() as u64 + 1).await;
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
    assert_eq!(
        get(env.key("public.orders:1001")).await,
        Some(record_text(f[2]))
    );
    assert_eq!(
        get(env.key("public.order_items:1001:1")).await,
        Some(record_text(f[1]))
    );
    assert_eq!(get(env.key("public.orders:998")).await, None);
    // The versions live beside the keys, in the same slot.
    let version: Option<String> = redis::cmd("GET")
        .arg(version_key(&env.key("public.orders:1001")))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        version.as_ref().is_some_and(|v| v.len() == 41),
        "{version:?}"
    );
    // The tagger's two keys of each message, in different slots.
    assert_eq!(get(env.key("t:row:1001")).await, Some("x".into()));
    let seen: u64 = redis::cmd("SCARD")
        .arg(env.key("t:seen:x"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(seen > 0);
    let dead: u64 = redis::cmd("XLEN")
        .arg(&env.dead)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(dead, 1);
    // The tools find the dead letters in the cluster too.
    let (ok, out, err) = keepwarm_cli(
        &["dead-letters", "list", "--json", "--config", &config_path],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("decode"), "{out}");
}
