//! The Redis Stream source end to end: exact cache entries, acks, reclaim of pending entries.

use crate::util::*;

/// Checks what row-cache keeps of the fixtures: the keys every source test checks, and with
/// `all` every key and the exact numbers and text inside.
pub async fn assert_fixtures_cached(keys: &Keys, all: bool) {
    let f = fixtures();
    let invoice = "billing.invoices:7d9f2c1e-4b3a-4e8d-a1f0-9c2b6e5d4a31";
    let views = "analytics.page_views:2025-03-13:9007199254740993";
    // Each key, and the fixture line whose record it holds (none: no key).
    let mut expected = vec![
        // The update (line 3) came after the insert (line 1): the cache holds the updated row.
        ("public.orders:1001", Some(2)),
        // Deleted row: no key.
        ("public.orders:998", None),
        (invoice, Some(5)),
        (views, Some(11)),
    ];
    if all {
        expected.extend([
            ("public.order_items:1001:1", Some(1)),
            ("inventory.stock_levels:ams-1:SKU-00042", Some(4)),
            ("public.user_profiles:501", Some(6)),
            ("public.articles:3001", Some(7)),
            // A backfill read fills a key nobody wrote.
            ("public.orders:1002", Some(8)),
            // An update with an unchanged-TOAST placeholder deletes rather than caching it.
            ("public.documents:doc_8f2a", None),
        ]);
    }
    for (key, line) in expected {
        let record = line.map(|n| record_text(f[n]));
        assert_eq!(keys.get(key).await, record, "{key}");
    }
    if all {
        let invoice = keys.get(invoice).await.unwrap();
        assert!(
            invoice.contains(r#""rounding_residual":"1E-7""#)
                && invoice.contains(r#""amount_due":"1249.00""#)
        );
        let product = keys.get("public.products:77").await.unwrap();
        assert!(product.contains("Café Crème ☕ 東京ブレンド") && product.contains("🍫"));
        let views = keys.get(views).await.unwrap();
        assert!(views.contains(r#""view_id":9007199254740993"#));
    }
}

/// Every fixture line, owned.
pub fn fixture_lines() -> Vec<String> {
    fixtures().iter().map(|l| l.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequin_stream_entries_become_exact_cache_entries() {
    let env = TestEnv::row_cache("exact");
    let lines = fixture_lines();
    env.xadd(&lines).await;
    let daemon = env.run();
    env.wait_drained(lines.len() as u64).await;
    daemon.stop().await;
    assert_fixtures_cached(&env.keys().await, true).await;
    // Nothing was dead-lettered.
    assert_eq!(env.dead_letters().await.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_from_the_manifest_is_set_on_every_write() {
    let env = TestEnv::new("ttl");
    let manifest = format!(
        "[config]\nkey = \"{}:{{table}}:{{pks}}\"\nttl_seconds = 300\n",
        env.prefix
    );
    env.add_plugin("row-cache", &plugin_wasm("row-cache"), &manifest);
    env.xadd(&[fixtures()[0].to_string()]).await;
    let daemon = env.run();
    env.wait_drained(1).await;
    daemon.stop().await;
    let ttl = env.keys().await.pttl("orders:1001").await;
    assert!((290_000..=300_000).contains(&ttl), "ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_pending_by_a_dead_consumer_are_reclaimed() {
    let env = TestEnv::row_cache("reclaim");
    // A consumer takes both entries and dies without acknowledging them.
    env.xadd_read_by(
        "dead-worker",
        &[fixtures()[0].to_string(), fixtures()[1].to_string()],
    )
    .await;
    assert_eq!(env.progress().await, (2, 2));

    let daemon = env.run();
    env.wait_drained(2).await;
    daemon.stop().await;
    let keys = env.keys().await;
    assert_eq!(
        keys.get("public.orders:1001").await,
        Some(record_text(fixtures()[0]))
    );
    assert!(keys.get("public.order_items:1001:1").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_is_applied_completely_and_in_row_order() {
    let env = TestEnv::row_cache("steady");
    let daemon = env.run();
    // 200 rows, 10 successive updates each, interleaved across rows; the last update must win.
    let lines: Vec<String> = (0..10u64)
        .flat_map(|version| (0..200u64).map(move |row| order_line(row, version)))
        .collect();
    for chunk in lines.chunks(250) {
        env.xadd(chunk).await;
    }
    env.wait_drained(lines.len() as u64).await;
    daemon.stop().await;
    let values = env
        .keys()
        .await
        .get_all((0..200u64).map(|row| format!("public.orders:{row}")))
        .await;
    for (row, value) in values.into_iter().enumerate() {
        let value = value.unwrap();
        assert!(value.contains(r#""status":"v9""#), "row {row}: {value}");
    }
}

/// The reader's own `XREADGROUP` connection authenticates as the URL says (a named user, or the
/// default user's password) and reads the URL's database, like every other connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_read_with_the_urls_user_password_and_database() {
    let server = RedisServer::start_with(&[
        "--requirepass",
        "s3cret-pw",
        "--user",
        "reader",
        "on",
        ">reader-pw",
        "~*",
        "&*",
        "+@all",
    ])
    .await;
    let port = server.port;
    for (name, url) in [
        (
            "acl",
            format!("redis://reader:reader-pw@127.0.0.1:{port}/3"),
        ),
        ("pw", format!("redis://:s3cret-pw@127.0.0.1:{port}/2")),
    ] {
        let env = TestEnv::row_cache(name).on(&url);
        let lines = fixture_lines();
        env.xadd(&lines).await;
        let daemon = env.run();
        env.wait_drained(lines.len() as u64).await;
        daemon.stop().await;
        assert_fixtures_cached(&Keys::under(&url, &env.prefix).await, false).await;
    }
    // Each database holds its own stream, and database 0 none of them.
    let mut zero = connect(&format!("redis://:s3cret-pw@127.0.0.1:{port}/0")).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut zero)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
}
