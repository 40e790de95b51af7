//! Hostile plugins: contained, reported, and nothing lost. The `hostile` test plugin misbehaves
//! on chosen rows in the way its manifest says.

use crate::dead_letters::{entries, field};
use crate::util::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn order(row: u64) -> String {
    order_change(fixtures()[0], row, Some(5_000 + row))
}

fn hostile_manifest(prefix: &str, mode: &str, victims: Option<&[u64]>, extra: &str) -> String {
    let victims = victims.map_or(String::new(), |v| {
        let list: Vec<String> = v.iter().map(|n| format!("\"{n}\"")).collect();
        format!("victims = [{}]\n", list.join(", "))
    });
    format!("{extra}\n[config]\nprefix = \"{prefix}:\"\nmode = \"{mode}\"\n{victims}")
}

struct Outcome {
    conn: redis::aio::MultiplexedConnection,
    prefix: String,
    dead: Vec<HashMap<String, Vec<u8>>>,
}

impl Outcome {
    async fn get(&mut self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(format!("{}:{key}", self.prefix))
            .query_async(&mut self.conn)
            .await
            .unwrap()
    }
}

/// Runs rows `0..rows` through the hostile plugin (and nothing else) and waits for all acks.
async fn run(mode: &str, victims: Option<&[u64]>, extra: &str, rows: u64) -> Outcome {
    run_lines(mode, victims, extra, "", || (0..rows).map(order).collect()).await
}

/// Runs the lines `lines` makes once the daemon reads through the hostile plugin, with
/// `pipeline` settings, and waits for all acks.
async fn run_lines(
    mode: &str,
    victims: Option<&[u64]>,
    extra: &str,
    pipeline: &str,
    lines: impl FnOnce() -> Vec<String>,
) -> Outcome {
    let url = redis_url();
    let prefix = unique(&format!("hostile-{mode}"));
    let stream = format!("{prefix}:stream");
    let plugins = PluginDir::new();
    plugins.add(
        "hostile",
        &test_plugin_wasm("hostile"),
        &hostile_manifest(&prefix, mode, victims, extra),
    );
    let mut conn = connect(&url).await;
    let daemon = Daemon::start(stream_config(plugins.path(), &stream, "kw", pipeline));
    wait_for("the daemon to read", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { group_progress(&mut conn, &stream, "kw").await.1 != u64::MAX }
    })
    .await;
    let lines = lines();
    xadd_sequin(&mut conn, &stream, &lines).await;
    let rows = lines.len() as u64;
    wait_all_acked(&url, &stream, "kw", rows, Duration::from_secs(120)).await;
    daemon.stop().await;
    let dead = entries(&mut conn, &format!("{stream}:dead")).await;
    Outcome { conn, prefix, dead }
}

fn only_dead_letter(outcome: &Outcome, needle: &str) {
    assert_eq!(
        outcome.dead.len(),
        1,
        "exactly the guilty change is dead-lettered"
    );
    let entry = &outcome.dead[0];
    assert_eq!(field(entry, "kind"), "plugin");
    assert_eq!(field(entry, "plugin"), "hostile");
    assert!(field(entry, "payload").contains(r#""record_pks":["2"]"#));
    assert!(
        field(entry, "reason").contains(needle),
        "{}",
        field(entry, "reason")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_fails_only_the_guilty_change_within_the_deadline() {
    let started = Instant::now();
    let mut outcome = run("loop", Some(&[2]), "[limits]\ndeadline_ms = 100", 5).await;
    only_dead_letter(&outcome, "exceeded its deadline of 100 ms");
    for row in [0, 1, 3, 4] {
        assert!(
            outcome.get(&row.to_string()).await.is_some(),
            "row {row} applied"
        );
    }
    assert!(outcome.get("2").await.is_none());
    println!("loop contained in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_slow_only_once_is_called_again_not_dead_lettered() {
    // The deadline is wall-clock time: a load spike can push a good change past it. Row 0
    // busy-waits until 3 s after it is written, against a deadline of 2 s: its first call
    // (begun within 1 s of the write) runs past the deadline, the second (begun over 2 s after
    // the write) gets through with a second to spare.
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut written = 0;
    let mut outcome = run_lines(
        "stall",
        Some(&[0]),
        "[limits]\ndeadline_ms = 2000\n[grants]\nclock = true",
        "[pipeline]\nbatch_size = 1",
        || {
            written = now_ms();
            let field = format!(r#""id":0,"stall_until_ms":{}"#, written + 3_000);
            vec![order(0).replace(r#""id":0"#, &field)]
        },
    )
    .await;
    let reasons: Vec<String> = outcome.dead.iter().map(|d| field(d, "reason")).collect();
    assert!(reasons.is_empty(), "dead-lettered: {reasons:?}");
    let value = outcome.get("0").await.expect("row 0 applied");
    let started: u64 = value.strip_prefix("started ").unwrap().parse().unwrap();
    assert!(
        started >= written + 2_000,
        "the call that got through began {} ms after the write: not a second call",
        started - written
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_traps_and_is_contained() {
    let mut outcome = run("alloc", Some(&[2]), "[limits]\nmemory_mb = 32", 5).await;
    only_dead_letter(&outcome, "memory cap exceeded");
    assert!(outcome.get("3").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_leak_is_recycled_before_it_reaches_the_cap() {
    // 1 MiB kept per change against a 16 MiB cap: without recycling the instance would die.
    let url = redis_url();
    let prefix = unique("hostile-leak");
    let stream = format!("{prefix}:stream");
    let plugins = PluginDir::new();
    let manifest = format!(
        "[limits]\nmemory_mb = 16\n[config]\nprefix = \"{prefix}:\"\nmode = \"leak\"\nleak_kib = 1024\n"
    );
    plugins.add("hostile", &test_plugin_wasm("hostile"), &manifest);
    let mut conn = connect(&url).await;
    let daemon = Daemon::start(stream_config(
        plugins.path(),
        &stream,
        "kw",
        "[pipeline]\nbatch_size = 4\nlanes = 1",
    ));
    let lines: Vec<String> = (0..60).map(order).collect();
    xadd_sequin(&mut conn, &stream, &lines).await;
    wait_all_acked(&url, &stream, "kw", 60, Duration::from_secs(120)).await;
    daemon.stop().await;
    assert!(
        entries(&mut conn, &format!("{stream}:dead"))
            .await
            .is_empty(),
        "no change failed"
    );
    for row in 0..60 {
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}:{row}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(value.is_some(), "row {row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_contained_to_its_change() {
    let mut outcome = run("panic", Some(&[2]), "", 5).await;
    only_dead_letter(&outcome, "plugin trapped");
    assert!(outcome.get("4").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_outside_the_key_prefixes_are_rejected() {
    let prefix_rule = "key_prefixes = [\"hostile-outside\"]";
    let mut outcome = run("outside", Some(&[2]), prefix_rule, 5).await;
    only_dead_letter(&outcome, "outside the plugin's key prefixes");
    let forbidden: Option<String> = redis::cmd("GET")
        .arg("forbidden:2")
        .query_async(&mut outcome.conn)
        .await
        .unwrap();
    assert!(forbidden.is_none());
    assert!(outcome.get("1").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_values_and_floods_of_operations_are_rejected() {
    let outcome = run("huge", Some(&[2]), "", 3).await;
    only_dead_letter(&outcome, "carries 8388608 bytes, the limit is 4194304");
    let outcome = run("many-ops", Some(&[2]), "", 3).await;
    only_dead_letter(
        &outcome,
        "returned 10000 operations for one change, the limit is 256",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_logs_is_rate_limited_and_changes_still_apply() {
    let mut outcome = run("log-flood", None, "", 3).await;
    assert!(outcome.dead.is_empty());
    for row in 0..3 {
        assert!(outcome.get(&row.to_string()).await.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_files_network_environment_or_clock_without_a_grant() {
    for (mode, expect) in [
        ("fs", "error:"),
        ("net", "error:"),
        ("env", "error:"),
        ("clock", "secs: 0"),
    ] {
        let mut outcome = run(mode, None, "", 1).await;
        let probe = outcome.get("probe:0").await.unwrap_or_default();
        assert!(probe.starts_with(expect), "{mode}: {probe}");
    }
    // Granted, the clock is real and the named variable is visible.
    let mut outcome = run("clock", None, "[grants]\nclock = true", 1).await;
    let probe = outcome.get("probe:0").await.unwrap();
    let secs: u64 = probe.trim_start_matches("secs: ").parse().unwrap();
    assert!(secs > 1_700_000_000, "{probe}");
    let mut outcome = run("env", None, "[grants]\nenv = [\"PATH\"]", 1).await;
    assert!(
        outcome.get("probe:0").await.unwrap().starts_with("error:"),
        "HOME was not granted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_keeps_failing_is_paused_and_its_messages_wait() {
    let url = redis_url();
    let prefix = unique("hostile-pause");
    let stream = format!("{prefix}:stream");
    let plugins = PluginDir::new();
    let dir = plugins.path().to_owned();
    let failing = hostile_manifest(&prefix, "panic", None, "[limits]\nmax_failures = 0");
    plugins.add("hostile", &test_plugin_wasm("hostile"), &failing);
    let admin = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let config = stream_config(&dir, &stream, "kw", "");
    let mut config = config;
    config.admin.listen = admin.clone();
    let daemon = Daemon::start(config);
    let mut conn = connect(&url).await;
    let lines: Vec<String> = (0..20).map(order).collect();
    xadd_sequin(&mut conn, &stream, &lines).await;
    let status_url = format!("http://{admin}/plugins");
    wait_for("the plugin to be paused", Duration::from_secs(60), || {
        let status_url = status_url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                ureq::get(&status_url)
                    .call()
                    .ok()
                    .and_then(|mut r| r.body_mut().read_to_string().ok())
            })
            .await
            .unwrap()
            .is_some_and(|body| body.contains(r#""state":"paused""#))
        }
    })
    .await;
    // Paused: nothing was dead-lettered and nothing acknowledged.
    assert!(
        entries(&mut conn, &format!("{stream}:dead"))
            .await
            .is_empty()
    );
    assert_eq!(group_progress(&mut conn, &stream, "kw").await.1, 20);
    // A fixed version takes over and the waiting messages go through.
    let fixed = hostile_manifest(&prefix, "leak", None, "");
    std::fs::write(dir.join(".hostile.toml.tmp"), fixed).unwrap();
    std::fs::rename(dir.join(".hostile.toml.tmp"), dir.join("hostile.toml")).unwrap();
    wait_all_acked(&url, &stream, "kw", 20, Duration::from_secs(120)).await;
    daemon.stop().await;
    assert!(
        entries(&mut conn, &format!("{stream}:dead"))
            .await
            .is_empty()
    );
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:7"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(value.is_some());
}

/// Throughput of a healthy plugin alone, then beside a plugin that loops on every change of its
/// own table (it is cut off by its deadline, then paused by its circuit breaker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_neighbour_does_not_stall_a_healthy_plugin() {
    fn product(n: u64) -> String {
        fixtures()[9]
            .replace(r#""id":77"#, &format!(r#""id":{n}"#))
            .replace(
                r#""record_pks":["77"]"#,
                &format!(r#""record_pks":["{n}"]"#),
            )
    }
    async fn measure(with_neighbour: bool) -> f64 {
        const N: u64 = 30_000;
        let url = redis_url();
        let prefix = unique("neighbour");
        let stream = format!("{prefix}:stream");
        let plugins = PluginDir::new();
        plugins.add(
            "row-cache",
            &plugin_wasm("row-cache"),
            &row_cache_manifest(&prefix, "tables = [\"orders\"]"),
        );
        if with_neighbour {
            let looping = hostile_manifest(
                &format!("{prefix}:h"),
                "loop",
                None,
                "tables = [\"products\"]\n[limits]\ndeadline_ms = 100",
            );
            plugins.add("hostile", &test_plugin_wasm("hostile"), &looping);
        }
        let mut conn = connect(&url).await;
        // One product change (for the neighbour) after every tenth order change.
        let mut lines = Vec::new();
        for n in 0..N {
            lines.push(order(n));
            if n % 10 == 0 {
                lines.push(product(n));
            }
        }
        // Time from the first write, once the daemon is up (plugin compilation excluded).
        let daemon = Daemon::start(stream_config(plugins.path(), &stream, "kw", ""));
        wait_for("the consumer group", Duration::from_secs(60), || {
            let (mut conn, stream) = (conn.clone(), stream.clone());
            async move { group_progress(&mut conn, &stream, "kw").await.1 == 0 }
        })
        .await;
        let start = Instant::now();
        for chunk in lines.chunks(1000) {
            xadd_sequin(&mut conn, &stream, chunk).await;
        }
        wait_for(
            "the healthy plugin to cache every order",
            Duration::from_secs(300),
            || {
                let mut conn = conn.clone();
                let pattern = format!("{prefix}:public.orders:*");
                async move {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(pattern)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    keys.len() as u64 == N
                }
            },
        )
        .await;
        let elapsed = start.elapsed();
        daemon.stop().await;
        N as f64 / elapsed.as_secs_f64()
    }
    let alone = measure(false).await;
    let beside = measure(true).await;
    println!(
        "healthy plugin: {alone:.0} msg/s alone, {beside:.0} msg/s beside a looping plugin ({:.0}%)",
        beside / alone * 100.0
    );
}
