//! Hot reload under load: versions swap atomically, broken versions never serve, nothing is lost.

use crate::util::*;
use keepwarm::runtime::Runtime;
use keepwarm::runtime::cache::Compiled;
use keepwarm::runtime::loader::{PluginFiles, content_hash, load_source, read_files};
use std::time::Duration;

/// A daemon of `env` watching its plugins (once started), and tagger's bytes.
struct Reloading {
    env: TestEnv,
    daemon: Option<Daemon>,
    tagger: Vec<u8>,
}

impl Reloading {
    /// An environment named `name` with tagger (tag `tag`) deployed.
    fn new(name: &str, tag: &str) -> Reloading {
        let r = Reloading {
            env: TestEnv::new(name),
            daemon: None,
            tagger: std::fs::read(test_plugin_wasm("tagger")).unwrap(),
        };
        r.deploy("tagger.toml", r.manifest(tag).as_bytes());
        r.deploy("tagger.wasm", &r.tagger);
        r
    }

    /// Starts the daemon, its artifact cache in the plugins directory, and waits until tagger
    /// serves `tag`.
    async fn start(&mut self, tag: &str) {
        self.start_with(tag, "").await;
    }

    /// [`Reloading::start`], with more lines for the `[plugins]` table.
    async fn start_with(&mut self, tag: &str, plugins: &str) {
        let cache_dir = self.env.plugins_dir().join(".cache");
        let config = self
            .env
            .stream_config()
            .admin()
            .set(
                "plugins",
                &format!("cache_dir = \"{}\"\n{plugins}", cache_dir.display()),
            )
            .source_lines("block_ms = 100\nclaim_idle_ms = 30000");
        self.daemon = Some(config.run());
        self.wait_serving("tagger", Some(&self.version(tag))).await;
    }

    /// Deploys a file the normal way: write a hidden temporary, then rename into place.
    fn deploy(&self, name: &str, bytes: &[u8]) {
        let dir = self.env.plugins_dir();
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    /// Tagger's manifest: it writes below the prefix with `tag`.
    fn manifest(&self, tag: &str) -> String {
        format!(
            "[config]\nprefix = \"{}:\"\ntag = \"{tag}\"\n",
            self.env.prefix
        )
    }

    /// The version tagger has with `tag`.
    fn version(&self, tag: &str) -> String {
        content_hash(&self.tagger, self.manifest(tag).as_bytes())
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    async fn status_of(&self, name: &str) -> Option<serde_json::Value> {
        let statuses = plugins_status(&self.daemon().admin_url("/plugins")).await;
        statuses.into_iter().find(|p| p["name"] == name)
    }

    /// Waits until `name` serves `version` (or, with `None`, is gone).
    async fn wait_serving(&self, name: &str, version: Option<&str>) {
        let what = format!("{name} to serve {version:?}");
        wait_for(&what, PATIENCE, || async {
            let status = self.status_of(name).await;
            match version {
                Some(v) => status.is_some_and(|s| s["version"] == v && s["state"] == "serving"),
                None => status.is_none(),
            }
        })
        .await;
    }
}

fn change(row: u64, lsn: u64) -> String {
    order_change(fixtures()[2], row, Some(lsn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_plugins_under_load_applies_every_message_by_exactly_one_version() {
    // A throughput test with deadlines: it must not share the two cores with guest builds and
    // Python component loads.
    let _heavy = heavy_test_async().await;
    let mut r = Reloading::new("reload", "a");
    let row_cache = std::fs::read(plugin_wasm("row-cache")).unwrap();
    let cache_manifest = row_cache_manifest(&r.env.prefix, "");
    r.deploy("row-cache.toml", cache_manifest.as_bytes());
    r.deploy("row-cache.wasm", &row_cache);
    r.start("a").await;

    // A steady stream of 100,000 changes over 1,000 rows, written while plugins are swapped.
    const TOTAL: u64 = 100_000;
    const ROWS: u64 = 1_000;
    let producer = tokio::spawn({
        let group = r.env.group.clone();
        async move {
            let mut conn = connect(&group.url).await;
            for chunk in 0..TOTAL / 1000 {
                let lines: Vec<String> = (chunk * 1000..(chunk + 1) * 1000)
                    .map(|i| change(i % ROWS, 1_000_000 + i))
                    .collect();
                xadd_sequin(&mut conn, &group.stream, &lines).await;
                // Pacing, not synchronisation: the swaps below happen while messages flow.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let progress_past = |n: u64| {
        let env = &r.env;
        async move {
            let what = format!("{n} entries to be read");
            env.wait(&what, |read, _| read >= n).await;
        }
    };

    // Ten replacements, alternating two versions, each while messages flow.
    for swap in 1..=10u64 {
        progress_past(swap * 7_000).await;
        let tag = if swap % 2 == 0 { "a" } else { "b" };
        r.deploy("tagger.toml", r.manifest(tag).as_bytes());
        r.wait_serving("tagger", Some(&r.version(tag))).await;
    }
    // Remove one plugin and add it back, under load.
    std::fs::remove_file(r.env.plugins_dir().join("row-cache.wasm")).unwrap();
    r.wait_serving("row-cache", None).await;
    progress_past(80_000).await;
    r.deploy("row-cache.wasm", &row_cache);
    let cache_version = content_hash(&row_cache, cache_manifest.as_bytes());
    r.wait_serving("row-cache", Some(&cache_version)).await;
    producer.await.unwrap();
    r.env
        .wait_drained_within(TOTAL, Duration::from_secs(300))
        .await;

    // The last version serving now produces every row's final value.
    let final_lines: Vec<String> = (0..ROWS).map(|row| change(row, 5_000_000 + row)).collect();
    r.env.xadd(&final_lines).await;
    r.env.wait_drained(TOTAL + ROWS).await;
    // Every reload is counted in /metrics.
    let (_, metrics) = http_get(&r.daemon().admin_url("/metrics")).await.unwrap();
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
    r.daemon.take().unwrap().stop().await;

    let keys = r.env.keys().await;
    let (seen_a, seen_b) = (keys.members("seen:a").await, keys.members("seen:b").await);
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
    let values = keys
        .get_all((0..ROWS).map(|row| format!("row:{row}")))
        .await;
    // The tenth swap deployed tag "a".
    assert!(
        values.iter().all(|v| v.as_deref() == Some("a")),
        "final values come from the last version"
    );
    // The re-added plugin serves again: it cached the final changes.
    assert_eq!(
        keys.get("public.orders:0").await,
        Some(record_text(&change(0, 5_000_000)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_version_never_serves_and_the_old_one_keeps_serving() {
    let mut r = Reloading::new("broken", "good");
    r.start("good").await;
    let dir = TempDir::new("kw-broken");
    let admin = format!("listen = \"{}\"", r.daemon().admin());
    let cli_config = r
        .env
        .config()
        .set("admin", &admin)
        .write(&dir, "keepwarm.toml");
    let good = r.version("good");
    let good_manifest = r.manifest("good");

    let self_test_fails = format!(
        "{good_manifest}\n[[test]]\nname = \"wrong expectation\"\ninput = '''{}'''\nexpect = []\n",
        fixtures()[0]
    );
    let tagger = r.tagger.clone();
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
    let keys = r.env.keys().await;
    let mut sent = 0u64;
    for (case, file, bytes, reason) in cases {
        r.deploy(file, &bytes);
        let what = format!("{case} to be reported");
        wait_for(&what, PATIENCE, || async {
            r.status_of("tagger").await.is_some_and(|s| {
                s["state"] == "failed-to-reload"
                    && s["error"].as_str().unwrap_or("").contains(reason)
            })
        })
        .await;
        let status = r.status_of("tagger").await.unwrap();
        assert_eq!(
            status["version"],
            good.as_str(),
            "{case}: the old version still serves"
        );
        // And it really serves: a new change is applied by it.
        sent += 1;
        let row = 100 + sent;
        r.env.xadd(&[change(row, 2_000_000 + sent)]).await;
        r.env.wait_drained(sent).await;
        let value = keys.get(&format!("row:{row}")).await;
        assert_eq!(value.as_deref(), Some("good"), "{case}");
        // Put the good files back before the next case.
        r.deploy("tagger.wasm", &tagger);
        r.deploy("tagger.toml", good_manifest.as_bytes());
        r.wait_serving("tagger", Some(&good)).await;
    }
    let (ok, out, err) = keepwarm_cli_async(&["plugins", "--config", &cli_config]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("tagger") && out.contains(&good) && out.contains("serving"),
        "{out}"
    );
    r.daemon.unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_deployed_into_a_full_instance_pool_loads_by_making_room() {
    // Room for one instance, which tagger's warm instance takes once it has loaded: the new
    // plugin's load finds the pool full. It must make room from tagger's idle instance (a
    // version that failed to load is not tried again until its files change), and both
    // plugins then share the one instance.
    let mut r = Reloading::new("pool-reload", "first");
    r.start_with("first", "instances = 1").await;
    let second = format!(
        "[config]\nprefix = \"{}:second:\"\ntag = \"second\"\n",
        r.env.prefix
    );
    r.deploy("second.toml", second.as_bytes());
    r.deploy("second.wasm", &r.tagger);
    r.wait_serving("second", Some(&content_hash(&r.tagger, second.as_bytes())))
        .await;
    r.wait_serving("tagger", Some(&r.version("first"))).await;
    let lines: Vec<String> = (0..20).map(|row| change(row, 1_000 + row)).collect();
    r.env.xadd(&lines).await;
    r.env.wait_drained(lines.len() as u64).await;
    let keys = r.env.keys().await;
    for row in 0..20 {
        assert_eq!(
            keys.get(&format!("row:{row}")).await.as_deref(),
            Some("first")
        );
        assert_eq!(
            keys.get(&format!("second:row:{row}")).await.as_deref(),
            Some("second")
        );
    }
    assert!(r.env.dead_letters().await.is_empty());
    r.daemon.unwrap().stop().await;
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
        let loaded = load_source(&runtime, read_files(&files).unwrap(), &[]).unwrap();
        assert_eq!(loaded.compiled, expected);
        times.push(loaded.elapsed);
    }
    println!(
        "row-cache load: cold {:?}, from the artifact cache {:?}",
        times[0], times[1]
    );
}
