//! Messages that cannot be applied go to the dead-letter stream with a reason, and are then
//! acknowledged: never a crash, never a silent loss.

use crate::util::*;
use std::collections::HashMap;
use std::time::Duration;

/// Every entry of a stream as a map of fields.
pub async fn entries(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<HashMap<String, Vec<u8>>> {
    let reply: Vec<(String, HashMap<String, Vec<u8>>)> = {
        let raw: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        let redis::Value::Array(items) = raw else {
            return Vec::new();
        };
        items
            .into_iter()
            .map(|item| {
                let redis::Value::Array(mut pair) = item else {
                    panic!("bad entry")
                };
                let fields = pair.pop().unwrap();
                let id: String = redis::from_redis_value(pair.pop().unwrap()).unwrap();
                let redis::Value::Array(flat) = fields else {
                    panic!("bad fields")
                };
                let map = flat
                    .chunks(2)
                    .map(|kv| {
                        (
                            redis::from_redis_value::<String>(kv[0].clone()).unwrap(),
                            redis::from_redis_value::<Vec<u8>>(kv[1].clone()).unwrap(),
                        )
                    })
                    .collect();
                (id, map)
            })
            .collect()
    };
    reply.into_iter().map(|(_, m)| m).collect()
}

pub fn field(entry: &HashMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8_lossy(entry.get(name).unwrap_or_else(|| panic!("no field {name}")))
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_with_a_reason_and_acked() {
    let url = redis_url();
    let prefix = unique("malformed");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let mut conn = connect(&url).await;
    let good = stream_fields(fixtures()[0]);
    let get = |name: &str| good.iter().find(|(k, _)| k == name).unwrap().1.clone();
    let (record, metadata) = (get("record"), get("metadata"));
    // Missing `metadata`.
    xadd_raw(
        &mut conn,
        &stream,
        &[
            ("action", b"insert"),
            ("record", record.as_bytes()),
            ("changes", b"null"),
        ],
    )
    .await;
    // Invalid JSON in `record`.
    xadd_raw(
        &mut conn,
        &stream,
        &[
            ("action", b"insert"),
            ("record", b"{\"id\":"),
            ("changes", b"null"),
            ("metadata", metadata.as_bytes()),
        ],
    )
    .await;
    // Unknown action.
    xadd_raw(
        &mut conn,
        &stream,
        &[
            ("action", b"upsert"),
            ("record", record.as_bytes()),
            ("changes", b"null"),
            ("metadata", metadata.as_bytes()),
        ],
    )
    .await;
    // Not UTF-8.
    xadd_raw(
        &mut conn,
        &stream,
        &[
            ("action", b"insert"),
            ("record", &[0xff, 0xfe]),
            ("changes", b"null"),
            ("metadata", metadata.as_bytes()),
        ],
    )
    .await;
    // And one good message after them.
    xadd_sequin(&mut conn, &stream, &[fixtures()[0].to_string()]).await;

    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    wait_all_acked(&url, &stream, &group, 5, Duration::from_secs(30)).await;
    daemon.stop().await;

    let dead = entries(&mut conn, &format!("{stream}:dead")).await;
    let reasons: Vec<String> = dead.iter().map(|e| field(e, "reason")).collect();
    assert_eq!(dead.len(), 4, "{reasons:?}");
    // Lanes run in parallel, so the entries may come in any order: find each by its reason.
    let find = |needle: &str| {
        let found: Vec<_> = dead
            .iter()
            .filter(|e| field(e, "reason").contains(needle))
            .collect();
        assert_eq!(found.len(), 1, "{needle:?} in {reasons:?}");
        found[0]
    };
    find("missing field `metadata`");
    find("`record` is not valid JSON");
    let unknown = find("unknown action \"upsert\"");
    let not_utf8 = find("not valid UTF-8");
    for entry in &dead {
        assert_eq!(field(entry, "kind"), "decode");
        assert_eq!(field(entry, "source"), format!("redis-stream:{stream}"));
        assert!(field(entry, "source_id").contains('-'));
    }
    // The original fields are kept byte for byte.
    assert_eq!(not_utf8.get("entry.record").unwrap(), &vec![0xff, 0xfe]);
    assert_eq!(unknown.get("entry.action").unwrap(), b"upsert");
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:public.orders:1001"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        value.is_some(),
        "the good message after the bad ones was applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_plugin_rejects_is_dead_lettered_with_the_plugin_and_version() {
    let url = redis_url();
    let prefix = unique("rejected");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    // The key names a column only stock_levels has: other tables' changes are rejected.
    let manifest = format!("[config]\nkey = \"{prefix}:{{sku}}\"\n");
    plugins.add("by-sku", &plugin_wasm("row-cache"), &manifest);
    let mut conn = connect(&url).await;
    xadd_sequin(
        &mut conn,
        &stream,
        &[fixtures()[0].to_string(), fixtures()[4].to_string()],
    )
    .await;
    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    wait_all_acked(&url, &stream, &group, 2, Duration::from_secs(30)).await;
    daemon.stop().await;

    let dead = entries(&mut conn, &format!("{stream}:dead")).await;
    assert_eq!(dead.len(), 1);
    let entry = &dead[0];
    assert_eq!(field(entry, "kind"), "plugin");
    assert_eq!(field(entry, "plugin"), "by-sku");
    assert_eq!(field(entry, "plugin_version").len(), 12);
    assert!(
        field(entry, "reason").contains("sku"),
        "{}",
        field(entry, "reason")
    );
    // The payload is the message, replayable as is.
    let payload = field(entry, "payload");
    assert!(keepwarm::message::ChangeMessage::from_json(&payload).is_ok());
    assert!(payload.contains(r#""table_name":"orders""#));
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:SKU-00042"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(value.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_redis_refuses_is_dead_lettered_and_the_rest_applied() {
    let url = redis_url();
    let prefix = unique("wrongtype");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let mut conn = connect(&url).await;
    // Someone else's string sits where the version hash of order 1001 belongs: Redis answers
    // WRONGTYPE for that message only.
    let _: () = redis::cmd("SET")
        .arg(format!("kw:v:{{{prefix}:public.orders:1001}}"))
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    xadd_sequin(
        &mut conn,
        &stream,
        &[fixtures()[0].to_string(), fixtures()[1].to_string()],
    )
    .await;
    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    wait_all_acked(&url, &stream, &group, 2, Duration::from_secs(30)).await;
    daemon.stop().await;
    let dead = entries(&mut conn, &format!("{stream}:dead")).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(field(&dead[0], "kind"), "redis");
    assert!(
        field(&dead[0], "reason").contains("WRONGTYPE"),
        "{}",
        field(&dead[0], "reason")
    );
    let item: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:public.order_items:1001:1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(item.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_once_the_plugin_is_fixed() {
    let url = redis_url();
    let prefix = unique("dlq-replay");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    plugins.add(
        "by-sku",
        &plugin_wasm("row-cache"),
        &format!("[config]\nkey = \"{prefix}:{{sku}}\"\n"),
    );
    let mut conn = connect(&url).await;
    xadd_sequin(&mut conn, &stream, &[fixtures()[0].to_string()]).await;
    xadd_raw(&mut conn, &stream, &[("action", b"upsert")]).await;
    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    wait_all_acked(&url, &stream, &group, 2, Duration::from_secs(30)).await;
    daemon.stop().await;
    let dead_stream = format!("{stream}:dead");
    assert_eq!(entries(&mut conn, &dead_stream).await.len(), 2);

    // The plugin is fixed: its key no longer needs a column orders lack.
    plugins.add(
        "by-sku",
        &plugin_wasm("row-cache"),
        &format!("[config]\nkey = \"{prefix}:{{table}}:{{pks}}\"\n"),
    );
    let config = plugins.path().join("keepwarm.conf");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"{url}\"\n[plugins]\ndir = \"{}\"\n[dead_letter]\nstream = \"{dead_stream}\"\n",
            plugins.path().display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let cli = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            keepwarm_cli(&args, "")
        })
    };
    let (ok, listed, err) = cli(vec![
        "dead-letters".into(),
        "list".into(),
        "--config".into(),
        config.clone(),
    ])
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        listed.contains("by-sku@") && listed.contains("missing field `record`"),
        "{listed}"
    );

    let (ok, _, err) = cli(vec![
        "dead-letters".into(),
        "replay".into(),
        "--config".into(),
        config.clone(),
    ])
    .await
    .unwrap();
    assert!(
        !ok,
        "a dead letter that still fails makes the replay exit non-zero"
    );
    assert!(
        err.contains("replayed 2 dead letters: 1 fixed and removed, 1 still failing"),
        "{err}"
    );
    let left = entries(&mut conn, &dead_stream).await;
    assert_eq!(left.len(), 1, "only the entry that still fails stays");
    assert_eq!(field(&left[0], "kind"), "decode");
    let value: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:orders:1001"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        value.is_some(),
        "the fixed plugin applied the replayed change"
    );
}
