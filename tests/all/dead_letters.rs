//! Messages that cannot be applied go to the dead-letter stream with a reason, and are then
//! acknowledged: never a crash, never a silent loss.

use crate::util::*;

/// Runs the daemon until the `n` entries written so far are acknowledged; returns the dead
/// letters.
async fn run_to_end(env: &TestEnv, n: u64) -> Vec<DeadLetter> {
    let daemon = env.run();
    env.wait_drained(n).await;
    daemon.stop().await;
    env.dead_letters().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_with_a_reason_and_acked() {
    let env = TestEnv::row_cache("malformed");
    let good = stream_fields(fixtures()[0]);
    let get = |name: &str| good.iter().find(|(k, _)| k == name).unwrap().1.clone();
    let (record, metadata) = (get("record"), get("metadata"));
    let (record, metadata) = (record.as_bytes(), metadata.as_bytes());
    let bad: [&[(&str, &[u8])]; 4] = [
        // Missing `metadata`.
        &[
            ("action", b"insert"),
            ("record", record),
            ("changes", b"null"),
        ],
        // Invalid JSON in `record`.
        &[
            ("action", b"insert"),
            ("record", b"{\"id\":"),
            ("changes", b"null"),
            ("metadata", metadata),
        ],
        // Unknown action.
        &[
            ("action", b"upsert"),
            ("record", record),
            ("changes", b"null"),
            ("metadata", metadata),
        ],
        // Not UTF-8.
        &[
            ("action", b"insert"),
            ("record", &[0xff, 0xfe]),
            ("changes", b"null"),
            ("metadata", metadata),
        ],
    ];
    for fields in bad {
        env.xadd_raw(fields).await;
    }
    // A field name that is not UTF-8 (`action` behind a stray byte): read in the same reply as
    // the entries around it, without failing them.
    let odd_name: &[(&[u8], &[u8])] = &[
        (b"\xffaction", b"insert"),
        (b"record", record),
        (b"changes", b"null"),
        (b"metadata", metadata),
    ];
    env.xadd_raw(odd_name).await;
    // And one good message after them.
    env.xadd(&[fixtures()[0].to_string()]).await;

    let dead = run_to_end(&env, 6).await;
    let reasons: Vec<String> = dead.iter().map(|e| e.field("reason")).collect();
    assert_eq!(dead.len(), 5, "{reasons:?}");
    // Lanes run in parallel, so the entries may come in any order: find each by its reason.
    let find = |needle: &str| {
        let found: Vec<_> = dead
            .iter()
            .filter(|e| e.field("reason").contains(needle))
            .collect();
        assert_eq!(found.len(), 1, "{needle:?} in {reasons:?}");
        found[0]
    };
    find("missing field `metadata`");
    find("`record` is not valid JSON");
    let unknown = find("unknown action \"upsert\"");
    let not_utf8 = find("not valid UTF-8");
    let odd_name = find("missing field `action`");
    for entry in &dead {
        assert_eq!(entry.field("kind"), "decode");
        assert_eq!(
            entry.field("source"),
            format!("redis-stream:{}", env.stream())
        );
        assert!(entry.field("source_id").contains('-'));
    }
    // The original fields are kept byte for byte.
    assert_eq!(not_utf8.raw("entry.record"), vec![0xff, 0xfe]);
    assert_eq!(unknown.raw("entry.action"), b"upsert");
    assert_eq!(odd_name.raw("entry.\u{fffd}action"), b"insert");
    assert!(
        env.keys().await.get("public.orders:1001").await.is_some(),
        "the good message after the bad ones was applied"
    );
}

/// A row-cache keyed by a column only `stock_levels` has: other tables' changes are rejected.
pub fn by_sku(env: &TestEnv, key: &str) {
    let manifest = format!("[config]\nkey = \"{}:{key}\"\n", env.prefix);
    env.add_plugin("by-sku", &plugin_wasm("row-cache"), &manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_plugin_rejects_is_dead_lettered_with_the_plugin_and_version() {
    let env = TestEnv::new("rejected");
    by_sku(&env, "{sku}");
    env.xadd(&[fixtures()[0].to_string(), fixtures()[4].to_string()])
        .await;
    let dead = run_to_end(&env, 2).await;
    assert_eq!(dead.len(), 1);
    let entry = &dead[0];
    assert_eq!(entry.field("kind"), "plugin");
    assert_eq!(entry.field("plugin"), "by-sku");
    assert_eq!(entry.field("plugin_version").len(), 12);
    assert!(entry.field("reason").contains("sku"), "{entry:?}");
    // The payload is the message, replayable as is.
    let payload = entry.field("payload");
    assert!(keepwarm::message::ChangeMessage::from_json(&payload).is_ok());
    assert!(payload.contains(r#""table_name":"orders""#));
    assert!(env.keys().await.get("SKU-00042").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_redis_refuses_is_dead_lettered_and_the_rest_applied() {
    let env = TestEnv::row_cache("wrongtype");
    // Someone else's string sits where the version of order 1001 belongs: the script answers
    // WRONGTYPE for that message only.
    let keys = env.keys().await;
    let squatter = version_key(&env.key("public.orders:1001"));
    let () = keys
        .query(redis::cmd("SET").arg(squatter).arg("not a hash"))
        .await;
    env.xadd(&[fixtures()[0].to_string(), fixtures()[1].to_string()])
        .await;
    let dead = run_to_end(&env, 2).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].field("kind"), "redis");
    assert!(dead[0].field("reason").contains("WRONGTYPE"), "{dead:?}");
    assert!(keys.get("public.order_items:1001:1").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_once_the_plugin_is_fixed() {
    let env = TestEnv::new("dlq-replay");
    by_sku(&env, "{sku}");
    env.xadd(&[fixtures()[0].to_string()]).await;
    env.xadd_raw(&[("action", b"upsert")]).await;
    assert_eq!(run_to_end(&env, 2).await.len(), 2);

    // The plugin is fixed: its key no longer needs a column orders lack.
    by_sku(&env, "{table}:{pks}");
    let dir = TempDir::new("kw-dlq");
    let config = env.config().write(&dir, "keepwarm.toml");
    let (ok, listed, err) =
        keepwarm_cli_async(&["dead-letters", "list", "--config", &config]).await;
    assert!(ok, "{err}");
    assert!(
        listed.contains("by-sku@") && listed.contains("missing field `record`"),
        "{listed}"
    );

    let (ok, _, err) = keepwarm_cli_async(&["dead-letters", "replay", "--config", &config]).await;
    assert!(
        !ok,
        "a dead letter that still fails makes the replay exit non-zero"
    );
    assert!(
        err.contains("replayed 2 dead letters: 1 fixed and removed, 1 still failing"),
        "{err}"
    );
    let left = env.dead_letters().await;
    assert_eq!(left.len(), 1, "only the entry that still fails stays");
    assert_eq!(left[0].field("kind"), "decode");
    assert!(
        env.keys().await.get("orders:1001").await.is_some(),
        "the fixed plugin applied the replayed change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_no_plugin_takes_stays_through_a_replay() {
    let env = TestEnv::new("dlq-unrouted");
    by_sku(&env, "{sku}");
    env.xadd(&[fixtures()[0].to_string()]).await;
    assert_eq!(run_to_end(&env, 1).await.len(), 1);
    // The plugin now takes products only: nothing takes the order change, which must not be
    // counted as fixed and deleted.
    let manifest = format!(
        "tables = [\"products\"]\n[config]\nkey = \"{}:{{table}}:{{pks}}\"\n",
        env.prefix
    );
    env.add_plugin("by-sku", &plugin_wasm("row-cache"), &manifest);
    let dir = TempDir::new("kw-dlq-unrouted");
    let config = env.config().write(&dir, "keepwarm.toml");
    let (ok, _, err) = keepwarm_cli_async(&["dead-letters", "replay", "--config", &config]).await;
    assert!(
        !ok,
        "a letter nothing took makes the replay exit non-zero: {err}"
    );
    assert!(
        err.contains("replayed 1 dead letters: 0 fixed and removed, 0 still failing, 1 taken by no plugin (kept)"),
        "{err}"
    );
    assert_eq!(env.dead_letters().await.len(), 1, "the letter stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_letter_goes_only_to_the_plugin_that_failed_on_it() {
    // by-sku fails on the insert; rows (plain writes) applies it, then the update of the same
    // row while by-sku is away. The replay of the insert must not take rows back to it.
    let env = TestEnv::new("dlq-only");
    by_sku(&env, "{sku}");
    let rows = format!(
        "consistency = \"plain\"\n[config]\nkey = \"{}:rows:{{table}}:{{pks}}\"\n",
        env.prefix
    );
    env.add_plugin("rows", &plugin_wasm("row-cache"), &rows);
    env.xadd(&[fixtures()[0].to_string()]).await;
    assert_eq!(run_to_end(&env, 1).await.len(), 1);
    for file in ["by-sku.wasm", "by-sku.toml"] {
        std::fs::remove_file(env.plugins_dir().join(file)).unwrap();
    }
    env.xadd(&[fixtures()[2].to_string()]).await;
    let daemon = env.run();
    env.wait_drained(2).await;
    daemon.stop().await;
    let keys = env.keys().await;
    let updated = Some(record_text(fixtures()[2]));
    assert_eq!(keys.get("rows:orders:1001").await, updated);

    by_sku(&env, "{table}:{pks}");
    let dir = TempDir::new("kw-dlq-only");
    let config = env.config().write(&dir, "keepwarm.toml");
    let (ok, _, err) = keepwarm_cli_async(&["dead-letters", "replay", "--config", &config]).await;
    assert!(ok, "{err}");
    assert!(err.contains("1 fixed and removed"), "{err}");
    assert_eq!(
        keys.get("orders:1001").await,
        Some(record_text(fixtures()[0])),
        "by-sku applied the replayed insert"
    );
    assert_eq!(
        keys.get("rows:orders:1001").await,
        updated,
        "rows kept the update"
    );
}
