//! Memcached as the cache target (`[memcached]`): plain and versioned writes, operations it
//! lacks refused at load and at run time, oversize values dead-lettered, and a Memcached restart
//! retried and refilled. [`only`]: Memcached without Redis.

mod only;
mod server;

use crate::util::*;
pub use server::{Memcached, MemcachedServer, Versioned, memcached_servers};

/// A change of order 1001 (`line`) moved to commit LSN `lsn` and status `status`.
fn with_lsn(line: &str, lsn: u64, status: &str) -> String {
    let line = order_change(line, 1001, Some(lsn));
    let at = line.find(r#""status":""#).unwrap() + r#""status":""#.len();
    let close = at + line[at..].find('"').unwrap();
    format!("{}{status}{}", &line[..at], &line[close..])
}

/// The test's config with the cache on the Memcached at `servers`.
fn config(env: &TestEnv, servers: &str) -> ConfigBuilder {
    env.stream_config()
        .set("memcached", &format!("servers = [\"{servers}\"]"))
}

/// Runs `lines` through row-cache (with `manifest_extra`) into the suite's Memcached, one by one
/// so that arrival order is exactly the order given.
async fn run(name: &str, manifest_extra: &str, lines: &[String]) -> TestEnv {
    let env = TestEnv::new(name);
    env.add_row_cache(manifest_extra);
    let daemon = config(&env, &memcached_servers()).run();
    env.xadd_each_drained(lines).await;
    daemon.stop().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_writes_land_in_memcached_as_the_plugin_wrote_them() {
    let insert = with_lsn(fixtures()[0], 100, "pending");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let other = order_change(fixtures()[0], 1003, Some(150));
    let delete_other = move_row(fixtures()[3], 998, 1003);
    let lines = [
        update.clone(),
        insert.clone(),
        other.clone(),
        delete_other.clone(),
    ];
    let env = run("mc-plain", "consistency = \"plain\"", &lines).await;
    let mut mc = Memcached::open(&memcached_servers()).await;
    // Last write wins: the late insert overwrote the update.
    assert_eq!(
        mc.text(&env.key("public.orders:1001")).await,
        Some(record_text(&insert))
    );
    assert_eq!(mc.raw(&env.key("public.orders:1003")).await, None);
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_with_a_ttl_expires_in_memcached_plain_or_versioned() {
    for mode in ["plain", "versioned"] {
        let env = TestEnv::new(&format!("mc-ttl-{mode}"));
        let manifest = format!(
            "consistency = \"{mode}\"\n[config]\nkey = \"{}:{{table}}:{{pks}}\"\nttl_seconds = 3600\n",
            env.prefix
        );
        env.add_plugin("row-cache", &plugin_wasm("row-cache"), &manifest);
        let daemon = config(&env, &memcached_servers()).run();
        env.xadd(&[order_change(fixtures()[0], 1001, Some(100))])
            .await;
        env.wait_drained(1).await;
        daemon.stop().await;
        let ttl = Memcached::open(&memcached_servers())
            .await
            .ttl(&env.key("orders:1001"))
            .await;
        assert!(
            ttl.is_some_and(|t| (3500..=3600).contains(&t)),
            "{mode}: {ttl:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_change_arriving_late_never_overwrites_a_newer_one() {
    let insert = with_lsn(fixtures()[0], 100, "pending");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let env = run("mc-stale", "", &[update.clone(), insert]).await;
    let mut mc = Memcached::open(&memcached_servers()).await;
    assert_eq!(
        mc.versioned(&env.key("public.orders:1001")).await,
        Versioned::Value {
            version: (200, 1),
            text: record_text(&update)
        }
    );
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_leaves_a_tombstone_that_stops_a_late_write() {
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let delete = move_row(fixtures()[3], 998, 1001);
    let delete = with_lsn(
        &delete.replace(r#""status":null"#, r#""status":"x""#),
        300,
        "x",
    );
    let env = run("mc-tomb", "", &[delete, update]).await;
    let mut mc = Memcached::open(&memcached_servers()).await;
    let key = env.key("public.orders:1001");
    let stored = mc.versioned(&key).await;
    assert!(
        matches!(stored, Versioned::Tombstone((300, _))),
        "{stored:?}"
    );
    assert_eq!(stored.value(), None);
    // The tombstone lives for versioning.tombstone_ttl_seconds (7 days by default).
    let ttl = mc.ttl(&key).await.unwrap();
    assert!(ttl > 6 * 24 * 3600, "tombstone ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_read_fills_only_keys_no_change_has_written() {
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let read_1001 = move_row(fixtures()[8], 1002, 1001);
    let read_1002 = fixtures()[8].to_string();
    let env = run(
        "mc-read",
        "",
        &[update.clone(), read_1001, read_1002.clone()],
    )
    .await;
    let mut mc = Memcached::open(&memcached_servers()).await;
    assert_eq!(
        mc.versioned(&env.key("public.orders:1001")).await.value(),
        Some(record_text(&update).as_str())
    );
    assert_eq!(
        mc.versioned(&env.key("public.orders:1002")).await,
        Versioned::Read(record_text(&read_1002))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_over_the_item_size_limit_is_dead_lettered_with_the_reason() {
    let env = TestEnv::new("mc-large");
    env.add_row_cache("");
    let daemon = config(&env, &memcached_servers())
        .set("memcached", "max_value_bytes = 64")
        .run();
    let small = order_change(fixtures()[0], 1001, Some(100));
    env.xadd(&[small]).await;
    env.wait_drained(1).await;
    daemon.stop().await;
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].field("kind"), "memcached");
    let reason = dead[0].field("reason");
    assert!(
        reason.contains("item size limit of 64 bytes") && reason.contains("public.orders:1001"),
        "{reason}"
    );
    let mut mc = Memcached::open(&memcached_servers()).await;
    assert_eq!(mc.raw(&env.key("public.orders:1001")).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_memcached_lacks_at_run_time_is_dead_lettered() {
    // tagger declares no `ops` and returns a set-add with its set.
    let env = TestEnv::new("mc-slip");
    let manifest = format!("[config]\nprefix = \"{}:\"\ntag = \"t\"\n", env.prefix);
    env.add_plugin("tagger", &test_plugin_wasm("tagger"), &manifest);
    let daemon = config(&env, &memcached_servers()).run();
    env.xadd(&[order_change(fixtures()[0], 1001, Some(100))])
        .await;
    env.wait_drained(1).await;
    daemon.stop().await;
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].field("plugin"), "tagger");
    let reason = dead[0].field("reason");
    assert!(reason.contains("no set-add operation"), "{reason}");
    // Nothing of the refused message was written, not even its set.
    let mut mc = Memcached::open(&memcached_servers()).await;
    assert_eq!(mc.raw(&env.key("row:1001")).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepwarm_check_refuses_a_plugin_whose_manifest_uses_an_operation_memcached_lacks() {
    let env = TestEnv::new("mc-check");
    env.add_row_cache("ops = [\"set\", \"del\", \"hash-set\"]");
    let dir = TempDir::new("kw-mc-check");
    let path = config(&env, &memcached_servers()).write(&dir, "keepwarm.toml");
    let (ok, out, err) = keepwarm_cli(&["check", "--config", &path], "");
    assert!(!ok, "{out}{err}");
    assert!(
        out.contains("plugin row-cache: FAILED")
            && out.contains("hash-set")
            && out.contains("memcached"),
        "{out}"
    );
    // The same plugin passes against Redis.
    let path = env.stream_config().write(&dir, "redis.toml");
    let (ok, out, err) = keepwarm_cli(&["check", "--config", &path], "");
    assert!(ok, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_an_operation_memcached_lacks_is_refused_and_the_old_version_serves() {
    let env = TestEnv::new("mc-reload");
    let good = row_cache_manifest(&env.prefix, "ops = [\"set\", \"del\"]");
    env.add_plugin("row-cache", &plugin_wasm("row-cache"), &good);
    // Rescans every second, whether or not the file event arrives.
    let daemon = config(&env, &memcached_servers())
        .admin()
        .set("plugins", "rescan_seconds = 1")
        .run();
    let status = || async { plugins_status(&daemon.admin_url("/plugins")).await };
    let serving = |s: &[serde_json::Value]| {
        s.iter()
            .find(|p| p["name"] == "row-cache")
            .filter(|p| p["state"] == "serving")
            .map(|p| p["version"].clone())
    };
    wait_for("row-cache to serve", PATIENCE, || async {
        serving(&status().await).is_some()
    })
    .await;
    let version = serving(&status().await).unwrap();
    let bad = row_cache_manifest(&env.prefix, "ops = [\"set\", \"sorted-set-add\"]");
    let tmp = env.plugins_dir().join(".row-cache.toml.tmp");
    std::fs::write(&tmp, bad).unwrap();
    std::fs::rename(&tmp, env.plugins_dir().join("row-cache.toml")).unwrap();
    wait_for("the reload to be refused", PATIENCE, || async {
        status().await.iter().any(|p| {
            p["name"] == "row-cache"
                && p["state"] == "failed-to-reload"
                && p["error"].as_str().unwrap_or("").contains("sorted-set-add")
        })
    })
    .await;
    let now = status().await;
    let entry = now.iter().find(|p| p["name"] == "row-cache").unwrap();
    assert_eq!(entry["version"], version, "the old version keeps serving");
    let insert = order_change(fixtures()[0], 1001, Some(100));
    env.xadd(std::slice::from_ref(&insert)).await;
    env.wait_drained(1).await;
    let mut mc = Memcached::open(&memcached_servers()).await;
    assert_eq!(
        mc.versioned(&env.key("public.orders:1001")).await.value(),
        Some(record_text(&insert).as_str())
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memcached_restart_is_retried_unacknowledged_and_the_cache_refills() {
    let mut server = MemcachedServer::start().await;
    let env = TestEnv::new("mc-restart");
    env.add_row_cache("");
    let daemon = config(&env, &server.address())
        .admin()
        .pipeline("max_backoff_ms = 200")
        .run();
    let first = order_change(fixtures()[0], 1001, Some(100));
    env.xadd(std::slice::from_ref(&first)).await;
    env.wait_drained(1).await;
    let ready = |daemon: &Daemon| {
        let url = daemon.admin_url("/readyz");
        async move { http_get(&url).await.map(|(code, _)| code) }
    };
    assert_eq!(ready(&daemon).await, Some(200));

    server.kill();
    wait_for("/readyz to say not ready", PATIENCE, || async {
        ready(&daemon).await == Some(503)
    })
    .await;
    let second = order_change(fixtures()[0], 1002, Some(200));
    env.xadd(std::slice::from_ref(&second)).await;
    // The change is read but stays unacknowledged while its batch is retried.
    let metrics = daemon.admin_url("/metrics");
    wait_for("apply retries", PATIENCE, || async {
        let text = http_get(&metrics)
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        metric(&text, "keepwarm_apply_retries_total", &[]).is_some_and(|n| n >= 2.0)
    })
    .await;
    let (read, pending) = env.progress().await;
    assert_eq!(
        (read, pending),
        (2, 1),
        "read, pending while memcached is down"
    );

    server.start_again().await;
    env.wait_drained(2).await;
    wait_for("/readyz to say ready", PATIENCE, || async {
        ready(&daemon).await == Some(200)
    })
    .await;
    let mut mc = Memcached::open(&server.address()).await;
    // The restart emptied memcached: the retried change is there, the first one is a miss,
    // never a stale value.
    assert_eq!(
        mc.versioned(&env.key("public.orders:1002")).await.value(),
        Some(record_text(&second).as_str())
    );
    assert_eq!(
        mc.versioned(&env.key("public.orders:1001")).await,
        Versioned::Missing
    );
    daemon.stop().await;
    assert!(env.dead_letters().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memcached_restart_while_keepwarm_is_down_raises_the_floor_at_start() {
    let mut server = MemcachedServer::start().await;
    let env = TestEnv::new("mc-restart-down");
    env.add_row_cache("");
    let update = with_lsn(fixtures()[2], 200, "shipped");
    let daemon = config(&env, &server.address()).run();
    env.xadd_each_drained(std::slice::from_ref(&update)).await;
    daemon.stop().await;
    // Memcached restarts (empty) while no keepwarm runs; then an older change of the row
    // comes (a redelivery, a late queue): it must not fill the emptied key.
    server.kill();
    server.start_again().await;
    let daemon = config(&env, &server.address()).run();
    let insert = with_lsn(fixtures()[0], 100, "pending");
    let newer = with_lsn(fixtures()[2], 300, "delivered");
    env.xadd(std::slice::from_ref(&insert)).await;
    env.wait_drained(2).await;
    let mut mc = Memcached::open(&server.address()).await;
    let key = env.key("public.orders:1001");
    assert_eq!(mc.versioned(&key).await, Versioned::Missing);
    // Newer changes are written as ever.
    env.xadd(std::slice::from_ref(&newer)).await;
    env.wait_drained(3).await;
    assert_eq!(
        mc.versioned(&key).await.value(),
        Some(record_text(&newer).as_str())
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_down_at_start_is_retried_until_it_answers() {
    let mut server = MemcachedServer::start().await;
    server.kill();
    let env = TestEnv::new("mc-down-at-start");
    env.add_row_cache("");
    let daemon = config(&env, &server.address())
        .admin()
        .pipeline("max_backoff_ms = 200")
        .run();
    let insert = order_change(fixtures()[0], 1001, Some(100));
    env.xadd(std::slice::from_ref(&insert)).await;
    let readyz = daemon.admin_url("/readyz");
    wait_for("/readyz to say not ready", PATIENCE, || async {
        http_get(&readyz).await.map(|(code, _)| code) == Some(503)
    })
    .await;
    // Read, and held unacknowledged while memcached is down.
    env.wait("the change read and pending", |read, pending| {
        read == 1 && pending == 1
    })
    .await;
    server.start_again().await;
    env.wait_drained(1).await;
    let mut mc = Memcached::open(&server.address()).await;
    assert_eq!(
        mc.versioned(&env.key("public.orders:1001")).await.value(),
        Some(record_text(&insert).as_str())
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_writing_a_key_twice_applies_both_writes() {
    use keepwarm::applier::{Applier, MessageOutcome, MessageWrites};
    use keepwarm::message::Version;
    use keepwarm::ops::Op;
    let env = TestEnv::new("mc-twice");
    let applier = Applier::connect(&config(&env, &memcached_servers()).parse())
        .await
        .unwrap();
    let key = env.key("twice");
    let set = |value: &str| Op::Set {
        key: key.clone(),
        value: value.as_bytes().to_vec(),
        ttl_ms: None,
    };
    let apply = async |lsn: u64, ops: &[Op]| {
        let writes = MessageWrites {
            version: Some(Version { lsn, idx: 0 }),
            plain: &[],
            versioned: ops,
        };
        match applier.apply(&[writes], &[]).await.unwrap().remove(0) {
            MessageOutcome::Applied { stale } => stale,
            MessageOutcome::Refused(reason) => panic!("refused: {reason}"),
        }
    };
    let expire = Op::Expire {
        key: key.clone(),
        ttl_ms: 100_000,
    };
    // A value and then its time to live, in one message: the second write is not stale.
    assert_eq!(apply(20, &[set("a"), expire]).await, 0);
    let mut mc = Memcached::open(&memcached_servers()).await;
    let ttl = mc.ttl(&key).await;
    assert!(ttl.is_some_and(|t| (90..=100).contains(&t)), "{ttl:?}");
    // Delete then write again.
    let del = Op::Del { key: key.clone() };
    assert_eq!(apply(30, &[del, set("b")]).await, 0);
    assert_eq!(mc.versioned(&key).await.value(), Some("b"));
    assert_eq!(apply(25, &[set("old")]).await, 1);
    assert_eq!(mc.versioned(&key).await.value(), Some("b"));
}
