//! Memcached without Redis (no `[redis]`): dead letters go to a JSONL file that
//! `keepwarm dead-letters` lists and replays, the newest version written is kept in a local file
//! that raises the floor after a Memcached restart, and configurations that cannot work are
//! refused with the key to set.

use super::{Memcached, MemcachedServer, Versioned, memcached_servers};
use crate::dead_letters::by_sku;
use crate::util::*;
use crate::webhook::{Endpoint, batch};
use std::path::PathBuf;

/// The dead-letter file of the test's config in `dir`.
fn letter_file(dir: &TempDir) -> PathBuf {
    dir.path().join("dead.jsonl")
}

/// The config of `env` with Memcached at `servers` as the cache and no `[redis]`: dead letters
/// go to the file in `dir`.
fn only_config(env: &TestEnv, servers: &str, dir: &TempDir) -> ConfigBuilder {
    env.config()
        .unset("redis")
        .set("memcached", &format!("servers = [\"{servers}\"]"))
        .set(
            "dead_letter",
            &format!("file = \"{}\"", letter_file(dir).display()),
        )
}

/// The dead letters in the file, one JSON object each.
fn file_letters(dir: &TempDir) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(letter_file(dir)).unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The one letter of `kind` among `letters`.
fn letter<'a>(letters: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<_> = letters.iter().filter(|l| l["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} letter in {letters:?}");
    found[0]
}

fn text(value: &serde_json::Value) -> &str {
    value.as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_dead_letters_go_to_a_file_that_is_listed_and_replayed() {
    let env = TestEnv::new("mco-letters");
    // Keyed by a column orders lack: order changes fail in the plugin.
    by_sku(&env, "{sku}");
    let dir = TempDir::new("kw-mco");
    let config = only_config(&env, &memcached_servers(), &dir);
    let path = config.write(&dir, "keepwarm.toml");
    let endpoint = Endpoint::start_with(config, "").await;
    let order = order_change(fixtures()[0], 1001, Some(100));
    let malformed = r#""a bare string from a Sequin transform""#.to_owned();
    let stock = fixtures()[4].to_string();
    // The reply comes once every message is applied or its dead letter is on disk.
    endpoint
        .post_ok(batch(&[order.clone(), malformed, stock]))
        .await;

    let letters = file_letters(&dir);
    assert_eq!(letters.len(), 2, "{letters:?}");
    let failed = letter(&letters, "plugin");
    assert_eq!(failed["plugin"], "by-sku");
    assert_eq!(text(&failed["plugin_version"]).len(), 12);
    assert!(text(&failed["reason"]).contains("sku"), "{failed}");
    assert!(text(&failed["source"]).starts_with("http:"));
    let payload = text(&failed["payload"]);
    assert!(keepwarm::message::ChangeMessage::from_json(payload).is_ok());
    let undecodable = letter(&letters, "decode");
    assert!(
        text(&undecodable["reason"]).contains("a JSON string, not a change message"),
        "{undecodable}"
    );
    let mut mc = Memcached::open(&memcached_servers()).await;
    assert!(
        mc.versioned(&env.key("SKU-00042")).await.value().is_some(),
        "the good message after the failures was applied"
    );

    // While the daemon runs.
    let (ok, listed, err) = keepwarm_cli_async(&["dead-letters", "list", "--config", &path]).await;
    assert!(ok, "{err}");
    assert!(
        listed.contains("line:1") && listed.contains("by-sku@") && listed.contains("a JSON string"),
        "{listed}"
    );
    assert!(err.contains("2 dead letters shown from"), "{err}");

    // The plugin is fixed: its key no longer needs a column orders lack.
    by_sku(&env, "{table}:{pks}");
    let (ok, _, err) = keepwarm_cli_async(&["dead-letters", "replay", "--config", &path]).await;
    assert!(
        !ok,
        "a letter that still fails makes the replay exit non-zero"
    );
    assert!(
        err.contains("replayed 2 dead letters: 1 fixed and removed, 1 still failing"),
        "{err}"
    );
    let left = file_letters(&dir);
    assert_eq!(
        left.len(),
        1,
        "only the letter that still fails stays: {left:?}"
    );
    assert_eq!(left[0]["kind"], "decode");
    assert_eq!(
        mc.versioned(&env.key("orders:1001")).await.value(),
        Some(record_text(&order).as_str()),
        "the fixed plugin applied the replayed change"
    );

    // The daemon appends to the file the replay put in place, not to the one it replaced.
    endpoint
        .post_ok(batch(&[
            r#"{"id":1,"name":"not a change message"}"#.to_owned()
        ]))
        .await;
    let now = file_letters(&dir);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(text(&now[1]["reason"]).contains("missing field `action`"));
    endpoint.daemon.stop().await;

    let key = env.key("orders:1001");
    let (ok, out, err) = keepwarm_cli_async(&["version", "--config", &path, &key, "--json"]).await;
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            report["stored"].clone(),
            report["version"]["commit_lsn"].clone()
        ),
        ("value".into(), 100.into()),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fixes_every_letter_empties_the_file() {
    let env = TestEnv::new("mco-empty");
    by_sku(&env, "{sku}");
    let dir = TempDir::new("kw-mco");
    let config = only_config(&env, &memcached_servers(), &dir);
    let small = config
        .clone()
        .set("memcached", "max_value_bytes = 64")
        .write(&dir, "small.toml");
    // Through the JSONL source: an order the plugin fails on, a stock level too large.
    let input = dir.write(
        "changes.jsonl",
        &format!(
            "{}\n{}\n",
            order_change(fixtures()[0], 1001, Some(100)),
            fixtures()[4]
        ),
    );
    let (ok, _, err) = keepwarm_cli_async(&["replay", "--config", &small, &input]).await;
    assert!(ok, "{err}");
    let letters = file_letters(&dir);
    assert_eq!(letters.len(), 2, "{letters:?}");
    letter(&letters, "plugin");
    let large = letter(&letters, "memcached");
    assert!(
        text(&large["reason"]).contains("item size limit of 64 bytes"),
        "{large}"
    );

    by_sku(&env, "{table}:{pks}");
    let fixed = config.write(&dir, "keepwarm.toml");
    let (ok, _, err) = keepwarm_cli_async(&["dead-letters", "replay", "--config", &fixed]).await;
    assert!(ok, "{err}");
    assert!(
        err.contains("replayed 2 dead letters: 2 fixed and removed, 0 still failing"),
        "{err}"
    );
    assert_eq!(std::fs::read(letter_file(&dir)).unwrap(), b"");
    let mut mc = Memcached::open(&memcached_servers()).await;
    assert!(
        mc.versioned(&env.key("orders:1001"))
            .await
            .value()
            .is_some()
    );
    // The replay's scratch file is gone.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("dead.jsonl"))
        .collect();
    names.sort();
    assert_eq!(names, ["dead.jsonl", "dead.jsonl.newest"]);
}

#[test]
fn a_config_without_redis_needs_the_dead_letter_file_and_says_so() {
    let env = TestEnv::row_cache("mco-check");
    let dir = TempDir::new("kw-mco");
    let servers = memcached_servers();
    let without_file = env
        .config()
        .unset("redis")
        .set("memcached", &format!("servers = [\"{servers}\"]"))
        .source(
            "http",
            "listen = \"127.0.0.1:0\"\npath = \"/h\"\ntoken = \"t\"",
        )
        .write(&dir, "no-file.toml");
    let (ok, out, err) = keepwarm_cli(&["check", "--config", &without_file], "");
    assert!(!ok, "{out}");
    assert!(
        err.contains("dead_letter.file is required without [redis]"),
        "{err}"
    );
    let config = only_config(&env, &servers, &dir);
    let path = config
        .clone()
        .source(
            "http",
            "listen = \"127.0.0.1:0\"\npath = \"/h\"\ntoken = \"t\"",
        )
        .write(&dir, "ok.toml");
    let (ok, out, err) = keepwarm_cli(&["check", "--config", &path], "");
    assert!(ok, "{out}{err}");
    let file = letter_file(&dir).display().to_string();
    assert!(
        out.contains(&format!(
            "cache: memcached {servers}; dead letters: file {file}"
        )),
        "{out}"
    );
    // A Redis Stream source has no cache Redis to default to.
    let stream = config
        .source("redis-stream", "stream = \"s\"\ngroup = \"g\"")
        .write(&dir, "stream.toml");
    let (ok, _, err) = keepwarm_cli(&["check", "--config", &stream], "");
    assert!(!ok);
    assert!(
        err.contains("source redis-stream:s") && err.contains("url: is required without [redis]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_newest_version_in_the_file_keeps_an_older_change_out() {
    let mut server = MemcachedServer::start().await;
    let env = TestEnv::row_cache("mco-restart");
    let dir = TempDir::new("kw-mco");
    let config = only_config(&env, &server.address(), &dir).pipeline("max_backoff_ms = 200");
    let change = |lsn| order_change(fixtures()[0], 1001, Some(lsn));
    // A first process writes the change at 200, and stops: only the file remembers it.
    let first = Endpoint::start_with(config.clone(), "").await;
    first.post_ok(batch(&[change(200)])).await;
    first.daemon.stop().await;

    let second = Endpoint::start_with(config, "").await;
    server.start_again().await;
    // A late redelivery of an older change, into the key the restart emptied; then a newer
    // change of another row.
    second.post_ok(batch(&[change(100)])).await;
    let newer = order_change(fixtures()[0], 1002, Some(300));
    second.post_ok(batch(std::slice::from_ref(&newer))).await;
    second.daemon.stop().await;

    let mut mc = Memcached::open(&server.address()).await;
    assert_eq!(
        mc.versioned(&env.key("public.orders:1001")).await,
        Versioned::Missing,
        "a cache miss, never the older value"
    );
    assert_eq!(
        mc.versioned(&env.key("public.orders:1002")).await.value(),
        Some(record_text(&newer).as_str())
    );
    let floor = mc.versioned("kw:v:floor").await;
    assert!(matches!(floor, Versioned::Tombstone((200, _))), "{floor:?}");
    assert!(file_letters(&dir).is_empty());
}
