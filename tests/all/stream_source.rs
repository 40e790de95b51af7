//! The Redis Stream source end to end: exact cache entries, acks, reclaim of pending entries.

use crate::util::*;
use std::time::Duration;

/// The `record` of a fixture line, byte for byte.
pub fn record_text(line: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow)]
        record: &'a serde_json::value::RawValue,
    }
    serde_json::from_str::<Message<'_>>(line)
        .unwrap()
        .record
        .get()
        .to_owned()
}

pub async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequin_stream_entries_become_exact_cache_entries() {
    let url = redis_url();
    let prefix = unique("exact");
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

    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    wait_all_acked(
        &url,
        &stream,
        &group,
        lines.len() as u64,
        Duration::from_secs(30),
    )
    .await;
    daemon.stop().await;

    let f = fixtures();
    let key = |rest: &str| format!("{prefix}:{rest}");
    // The update (line 3) came after the insert (line 1): the cache holds the updated row.
    assert_eq!(
        get(&mut conn, &key("public.orders:1001")).await,
        Some(record_text(f[2]))
    );
    assert_eq!(
        get(&mut conn, &key("public.order_items:1001:1")).await,
        Some(record_text(f[1]))
    );
    // Deleted row: no key.
    assert_eq!(get(&mut conn, &key("public.orders:998")).await, None);
    assert_eq!(
        get(&mut conn, &key("inventory.stock_levels:ams-1:SKU-00042")).await,
        Some(record_text(f[4]))
    );
    let invoice = get(
        &mut conn,
        &key("billing.invoices:7d9f2c1e-4b3a-4e8d-a1f0-9c2b6e5d4a31"),
    )
    .await
    .unwrap();
    assert_eq!(invoice, record_text(f[5]));
    assert!(
        invoice.contains(r#""rounding_residual":"1E-7""#)
            && invoice.contains(r#""amount_due":"1249.00""#)
    );
    assert_eq!(
        get(&mut conn, &key("public.user_profiles:501")).await,
        Some(record_text(f[6]))
    );
    assert_eq!(
        get(&mut conn, &key("public.articles:3001")).await,
        Some(record_text(f[7]))
    );
    // A backfill read fills a key nobody wrote.
    assert_eq!(
        get(&mut conn, &key("public.orders:1002")).await,
        Some(record_text(f[8]))
    );
    let product = get(&mut conn, &key("public.products:77")).await.unwrap();
    assert!(product.contains("Café Crème ☕ 東京ブレンド") && product.contains("🍫"));
    // An update with an unchanged-TOAST placeholder deletes rather than caching it.
    assert_eq!(
        get(&mut conn, &key("public.documents:doc_8f2a")).await,
        None
    );
    let views = get(
        &mut conn,
        &key("analytics.page_views:2025-03-13:9007199254740993"),
    )
    .await
    .unwrap();
    assert!(views.contains(r#""view_id":9007199254740993"#));
    assert_eq!(views, record_text(f[11]));
    // Nothing was dead-lettered.
    let dead: u64 = redis::cmd("XLEN")
        .arg(format!("{stream}:dead"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_from_the_manifest_is_set_on_every_write() {
    let url = redis_url();
    let prefix = unique("ttl");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    let manifest = format!("[config]\nkey = \"{prefix}:{{table}}:{{pks}}\"\nttl_seconds = 300\n");
    plugins.add("row-cache", &plugin_wasm("row-cache"), &manifest);
    let mut conn = connect(&url).await;
    xadd_sequin(&mut conn, &stream, &[fixtures()[0].to_string()]).await;
    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    wait_all_acked(&url, &stream, &group, 1, Duration::from_secs(30)).await;
    daemon.stop().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}:orders:1001"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((290_000..=300_000).contains(&ttl), "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_pending_by_a_dead_consumer_are_reclaimed() {
    let url = redis_url();
    let prefix = unique("reclaim");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let mut conn = connect(&url).await;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(&group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    xadd_sequin(
        &mut conn,
        &stream,
        &[fixtures()[0].to_string(), fixtures()[1].to_string()],
    )
    .await;
    // A consumer takes both entries and dies without acknowledging them.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("dead-worker")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(group_progress(&mut conn, &stream, &group).await, (2, 2));

    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    wait_all_acked(&url, &stream, &group, 2, Duration::from_secs(30)).await;
    daemon.stop().await;
    assert_eq!(
        get(&mut conn, &format!("{prefix}:public.orders:1001")).await,
        Some(record_text(fixtures()[0]))
    );
    assert!(
        get(&mut conn, &format!("{prefix}:public.order_items:1001:1"))
            .await
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_is_applied_completely_and_in_row_order() {
    let url = redis_url();
    let prefix = unique("steady");
    let (stream, group) = (format!("{prefix}:stream"), "kw".to_owned());
    let plugins = PluginDir::new();
    plugins.add(
        "row-cache",
        &plugin_wasm("row-cache"),
        &row_cache_manifest(&prefix, ""),
    );
    let mut conn = connect(&url).await;
    let daemon = Daemon::start(stream_config(plugins.path(), &stream, &group, ""));
    // 200 rows, 10 successive updates each, interleaved across rows; the last update must win.
    let template = fixtures()[2];
    let mut lines = Vec::new();
    for version in 0..10u64 {
        for row in 0..200u64 {
            let line = template
                .replace(r#""id":1001"#, &format!(r#""id":{row}"#))
                .replace(
                    r#""record_pks":["1001"]"#,
                    &format!(r#""record_pks":["{row}"]"#),
                )
                .replace(
                    r#""status":"shipped""#,
                    &format!(r#""status":"v{version}""#),
                )
                .replace(
                    r#""commit_lsn":1243362320"#,
                    &format!(r#""commit_lsn":{}"#, 1_000_000 + version * 1000 + row),
                );
            lines.push(line);
        }
    }
    for chunk in lines.chunks(250) {
        xadd_sequin(&mut conn, &stream, chunk).await;
    }
    wait_all_acked(
        &url,
        &stream,
        &group,
        lines.len() as u64,
        Duration::from_secs(60),
    )
    .await;
    daemon.stop().await;
    for row in 0..200u64 {
        let value = get(&mut conn, &format!("{prefix}:public.orders:{row}"))
            .await
            .unwrap();
        assert!(value.contains(r#""status":"v9""#), "row {row}: {value}");
    }
}
