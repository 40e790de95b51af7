//! Hot reload under load: versions swap atomically, broken versions never serve, nothing is lost.

use crate::util::*;
use keepwarm::config::Config;
use keepwarm::runtime::Runtime;
use keepwarm::runtime::cache::Compiled;
use keepwarm::runtime::loader::{PluginFiles, content_hash, load_source, read_files};
use std::path::Path;
use std::time::Duration;

/// Deploys a file the normal way: write a hidden temporary, then rename into place.
fn deploy(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn tagger_manifest(prefix: &str, tag: &str) -> String {
    format!("[config]\nprefix = \"{prefix}\"\ntag = \"{tag}\"\n")
}

async fn plugins_status(admin: &str) -> Vec<serde_json::Value> {
    let url = format!("http://{admin}/plugins");
    // Empty while the daemon is still starting.
    tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
        Ok(mut response) => {
            serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
        }
        Err(_) => Vec::new(),
    })
    .await
    .unwrap()
}

async fn status_of(admin: &str, name: &str) -> Option<serde_json::Value> {
    plugins_status(admin)
        .await
        .into_iter()
        .find(|p| p["name"] == name)
}

/// Waits until `name` serves `version` (or, with `None`, is gone).
async fn wait_serving(admin: &str, name: &str, version: Option<&str>) {
    let what = format!("{name} to serve {version:?}");
    wait_for(&what, Duration::from_secs(60), || async {
        let status = status_of(admin, name).await;
        match version {
            Some(v) => status.is_some_and(|s| s["version"] == v && s["state"] == "serving"),
            None => status.is_none(),
        }
    })
    .await;
}

fn config(dir: &Path, stream: &str, admin: &str) -> Config {
    Config::parse(&format!(
        r#"
[redis]
url = "{url}"
[plugins]
dir = "{dir}"
cache_dir = "{dir}/.cache"
[admin]
listen = "{admin}"
[dead_letter]
stream = "{stream}:dead"
[[source]]
kind = "redis-stream"
stream = "{stream}"
group = "kw"
block_ms = 100
"#,
        url = redis_url(),
        dir = dir.display()
    ))
    .unwrap()
}

fn change(row: u64, lsn: u64) -> String {
    order_change(fixtures()[2], row, Some(lsn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_plugins_under_load_applies_every_message_by_exactly_one_version() {
    // A throughput test with deadlines: it must not share the two cores with guest builds and
    // Python component loads.
    let _heavy = heavy_test_async().await;
    let url = redis_url();
    let prefix = unique("reload");
    let tag_prefix = format!("{prefix}:");
    let stream = format!("{prefix}:stream");
    let plugins = PluginDir::new();
    let dir = plugins.path().to_owned();
    let tagger = std::fs::read(test_plugin_wasm("tagger")).unwrap();
    let row_cache = std::fs::read(plugin_wasm("row-cache")).unwrap();
    let cache_manifest = row_cache_manifest(&prefix, "");
    deploy(
        &dir,
        "tagger.toml",
        tagger_manifest(&tag_prefix, "a").as_bytes(),
    );
    deploy(&dir, "tagger.wasm", &tagger);
    deploy(&dir, "row-cache.toml", cache_manifest.as_bytes());
    deploy(&dir, "row-cache.wasm", &row_cache);
    let admin = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(config(&dir, &stream, &admin));
    let version = |tag: &str| content_hash(&tagger, tagger_manifest(&tag_prefix, tag).as_bytes());
    wait_serving(&admin, "tagger", Some(&version("a"))).await;

    // A steady stream of 100,000 changes over 1,000 rows, written while plugins are swapped.
    const TOTAL: u64 = 100_000;
    const ROWS: u64 = 1_000;
    let producer = tokio::spawn({
        let (url, stream) = (url.clone(), stream.clone());
        async move {
            let mut conn = connect(&url).await;
            for chunk in 0..TOTAL / 1000 {
                let lines: Vec<String> = (chunk * 1000..(chunk + 1) * 1000)
                    .map(|i| change(i % ROWS, 1_000_000 + i))
                    .collect();
                xadd_sequin(&mut conn, &stream, &lines).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let mut conn = connect(&url).await;
    let progress_past = |n: u64| {
        let (conn, stream) = (conn.clone(), stream.clone());
        async move {
            let what = format!("{n} entries to be read");
            wait_for(&what, Duration::from_secs(120), || {
                let (mut conn, stream) = (conn.clone(), stream.clone());
                async move { group_progress(&mut conn, &stream, "kw").await.0 >= n }
            })
            .await;
        }
    };

    // Ten replacements, alternating two versions, each while messages flow.
    for swap in 1..=10u64 {
        progress_past(swap * 7_000).await;
        let tag = if swap % 2 == 0 { "a" } else { "b" };
        deploy(
            &dir,
            "tagger.toml",
            tagger_manifest(&tag_prefix, tag).as_bytes(),
        );
        wait_serving(&admin, "tagger", Some(&version(tag))).await;
    }
    // Remove one plugin and add it back, under load.
    std::fs::remove_file(dir.join("row-cache.wasm")).unwrap();
    wait_serving(&admin, "row-cache", None).await;
    progress_past(80_000).await;
    deploy(&dir, "row-cache.wasm", &row_cache);
    let cache_version = content_hash(&row_cache, cache_manifest.as_bytes());
    wait_serving(&admin, "row-cache", Some(&cache_version)).await;
    producer.await.unwrap();
    wait_all_acked(&url, &stream, "kw", TOTAL, Duration::from_secs(300)).await;

    // The last version serving now produces every row's final value.
    let final_lines: Vec<String> = (0..ROWS).map(|row| change(row, 5_000_000 + row)).collect();
    xadd_sequin(&mut conn, &stream, &final_lines).await;
    wait_all_acked(&url, &stream, "kw", TOTAL + ROWS, Duration::from_secs(60)).await;
    // Every reload is counted in /metrics.
    let (_, metrics) = http_get(&format!("http://{admin}/metrics")).await.unwrap();
    let reloads = |plugin: &str, outcome: &str| {
        metric(
            &metrics,
            "keepwarm_plugin_reloads_total",
            &[("plugin", plugin), ("outcome", outcome)],
        )
    };
    assert!(
        reloads("tagger", "loaded").unwrap_or(0.0) >= 10.0,
        "{metrics}"
    );
    assert_eq!(reloads("row-cache", "removed"), Some(1.0), "{metrics}");
    assert!(
        reloads("row-cache", "loaded").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert_eq!(reloads("tagger", "failed"), None, "{metrics}");
    daemon.stop().await;

    let seen_a: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{tag_prefix}seen:a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let seen_b: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{tag_prefix}seen:b"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "both versions served"
    );
    let both: std::collections::HashSet<&String> = seen_a.iter().collect();
    let twice = seen_b.iter().filter(|m| both.contains(m)).count();
    assert_eq!(twice, 0, "no change was applied by both versions");
    assert_eq!(
        (seen_a.len() + seen_b.len()) as u64,
        TOTAL + ROWS,
        "every change was applied by exactly one version"
    );
    let values: Vec<Option<String>> = {
        let mut pipe = redis::pipe();
        for row in 0..ROWS {
            pipe.cmd("GET").arg(format!("{tag_prefix}row:{row}"));
        }
        pipe.query_async(&mut conn).await.unwrap()
    };
    // The tenth swap deployed tag "a".
    assert!(
        values.iter().all(|v| v.as_deref() == Some("a")),
        "final values come from the last version"
    );
    // The re-added plugin serves again: it cached the final changes.
    let cached: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:public.orders:0"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        cached,
        Some(crate::stream_source::record_text(&change(0, 5_000_000)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_version_never_serves_and_the_old_one_keeps_serving() {
    let url = redis_url();
    let prefix = unique("broken");
    let tag_prefix = format!("{prefix}:");
    let stream = format!("{prefix}:stream");
    let plugins = PluginDir::new();
    let dir = plugins.path().to_owned();
    let tagger = std::fs::read(test_plugin_wasm("tagger")).unwrap();
    let good_manifest = tagger_manifest(&tag_prefix, "good");
    deploy(&dir, "tagger.toml", good_manifest.as_bytes());
    deploy(&dir, "tagger.wasm", &tagger);
    let admin = format!("127.0.0.1:{}", free_port());
    let config_file = dir.join("keepwarm.toml.conf");
    let cfg = config(&dir, &stream, &admin);
    std::fs::write(
        &config_file,
        format!(
            "[redis]\nurl = \"{url}\"\n[plugins]\ndir = \"{}\"\n[admin]\nlisten = \"{admin}\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(cfg);
    let good = content_hash(&tagger, good_manifest.as_bytes());
    wait_serving(&admin, "tagger", Some(&good)).await;
    let mut conn = connect(&url).await;

    let self_test_fails = format!(
        "{good_manifest}\n[[test]]\nname = \"wrong expectation\"\ninput = '''{}'''\nexpect = []\n",
        fixtures()[0]
    );
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "truncated component",
            "tagger.wasm",
            tagger[..tagger.len() / 2].to_vec(),
            "compile failed",
        ),
        (
            "wrong world",
            "tagger.wasm",
            std::fs::read(test_plugin_wasm("wrong-world")).unwrap(),
            "does not implement the keepwarm:plugin/transform",
        ),
        (
            "failing self-test",
            "tagger.toml",
            self_test_fails.into_bytes(),
            "self-test wrong expectation failed",
        ),
        (
            "manifest syntax error",
            "tagger.toml",
            b"[config\nprefix = ".to_vec(),
            "invalid manifest",
        ),
    ];
    let mut sent = 0u64;
    for (case, file, bytes, reason) in cases {
        deploy(&dir, file, &bytes);
        let what = format!("{case} to be reported");
        wait_for(&what, Duration::from_secs(60), || async {
            status_of(&admin, "tagger").await.is_some_and(|s| {
                s["state"] == "failed-to-reload"
                    && s["error"].as_str().unwrap_or("").contains(reason)
            })
        })
        .await;
        let status = status_of(&admin, "tagger").await.unwrap();
        assert_eq!(
            status["version"],
            good.as_str(),
            "{case}: the old version still serves"
        );
        // And it really serves: a new change is applied by it.
        sent += 1;
        let row = 100 + sent;
        xadd_sequin(&mut conn, &stream, &[change(row, 2_000_000 + sent)]).await;
        wait_all_acked(&url, &stream, "kw", sent, Duration::from_secs(30)).await;
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("{tag_prefix}row:{row}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(value.as_deref(), Some("good"), "{case}");
        // Put the good files back before the next case.
        deploy(&dir, "tagger.wasm", &tagger);
        deploy(&dir, "tagger.toml", good_manifest.as_bytes());
        wait_serving(&admin, "tagger", Some(&good)).await;
    }
    let (ok, out, err) = tokio::task::spawn_blocking({
        let config_file = config_file.clone();
        move || keepwarm_cli(&["plugins", "--config", config_file.to_str().unwrap()], "")
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("tagger") && out.contains(&good) && out.contains("serving"),
        "{out}"
    );
    daemon.stop().await;
}

#[test]
fn a_restart_with_a_warm_artifact_cache_skips_compilation() {
    let cache = TempDir::new("kw-cache");
    let files = PluginFiles {
        name: "row-cache".to_owned(),
        wasm: plugin_wasm("row-cache"),
        manifest: None,
    };
    let mut times = Vec::new();
    for expected in [Compiled::Cold, Compiled::Cached] {
        // A new runtime each time, as after a restart.
        let runtime = Runtime::new(Some(cache.path().to_owned())).unwrap();
        let loaded = load_source(&runtime, read_files(&files).unwrap()).unwrap();
        assert_eq!(loaded.compiled, expected);
        times.push(loaded.elapsed);
    }
    println!(
        "row-cache load: cold {:?}, from the artifact cache {:?}",
        times[0], times[1]
    );
}
