//! Plugins in the three guest languages: the JavaScript `orders-index`, the Python
//! `product-catalog` and the Rust `row-cache`, each built from source by
//! `scripts/build-plugins.sh`, side by side through the real pipeline (a Sequin Redis Stream, one
//! daemon) with exact cache contents; and the JavaScript and Python helper modules checked
//! inside their engines by probe plugins (`tests/plugins/sdk-probe-*`).

use crate::util::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

/// A Sequin change message for `public.<table>` (metadata trimmed to what keepwarm reads). A
/// backfill read has no LSN.
fn message(
    table: &str,
    action: &str,
    record: Value,
    changes: Option<Value>,
    pks: &[&str],
    lsn: Option<u64>,
) -> String {
    json!({
        "record": record,
        "changes": changes,
        "action": action,
        "metadata": {
            "table_schema": "public",
            "table_name": table,
            "commit_timestamp": "2025-03-14T10:00:00.000000Z",
            "commit_lsn": lsn,
            "commit_idx": lsn.map(|_| 0),
            "idempotency_key": format!("{table}:{}:{lsn:?}", pks.join(":")),
            "record_pks": pks,
        }
    })
    .to_string()
}

fn order(
    action: &str,
    id: u64,
    customer: Option<u64>,
    changes: Option<Value>,
    lsn: Option<u64>,
) -> String {
    let id_text = id.to_string();
    message(
        "orders",
        action,
        json!({"id": id, "customer_id": customer, "status": "pending", "total_amount": "149.90"}),
        changes,
        &[&id_text],
        lsn,
    )
}

fn product(action: &str, id: u64, name: Option<&str>, price: Option<&str>, lsn: u64) -> String {
    let id_text = id.to_string();
    let updated_at = name.map(|_| format!("2025-03-14T10:{:02}:00.000000Z", lsn % 60));
    message(
        "products",
        action,
        json!({"id": id, "name": name, "price": price, "description": null, "updated_at": updated_at}),
        (action == "update").then(|| json!({})),
        &[&id_text],
        Some(lsn),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_in_rust_javascript_and_python_keep_their_caches_exact() {
    let _heavy = heavy_test_async().await;
    let env = TestEnv::new("langs");
    let prefix = &env.prefix;
    env.add_plugin(
        "orders-index",
        &plugin_wasm("orders-index"),
        &format!(
            "tables = [\"public.orders\"]\nkey_prefixes = [\"{prefix}:orders:\"]\n\
             [config]\nkey_prefix = \"{prefix}:orders:by_customer:\"\n"
        ),
    );
    env.add_plugin(
        "product-catalog",
        &plugin_wasm("product-catalog"),
        &format!(
            "tables = [\"public.products\"]\nkey_prefixes = [\"{prefix}:product\"]\n\
             [config]\nhash_prefix = \"{prefix}:product:\"\nranking_key = \"{prefix}:products:by_price\"\n"
        ),
    );
    env.add_row_cache("tables = [\"public.order_items\"]");

    let big_order = 9_007_199_254_740_993u64; // 2^53 + 1: a double would make it ...992.
    let big_customer = 9_007_199_254_740_995u64;
    let lines = vec![
        // orders-index (JavaScript).
        order("insert", 1001, Some(42), None, Some(100)),
        order("insert", 1002, Some(42), None, Some(101)),
        order("insert", big_order, Some(big_customer), None, Some(102)),
        // Order 1001 moves from customer 42 to 43 (REPLICA IDENTITY FULL: old value in changes).
        order(
            "update",
            1001,
            Some(43),
            Some(json!({"customer_id": 42})),
            Some(103),
        ),
        // A status change: same customer, `changes` without customer_id.
        order(
            "update",
            1002,
            Some(42),
            Some(json!({"status": "new"})),
            Some(104),
        ),
        // A delete with the full old row, then one with only the primary key.
        order("delete", 1002, Some(42), None, Some(105)),
        order("delete", 998, None, None, Some(106)),
        // A backfill read.
        order("read", 1003, Some(77), None, None),
        // The insert of 1001 redelivered late: per-member versions keep it out of set 42.
        order("insert", 1001, Some(42), None, Some(100)),
        // product-catalog (Python).
        product(
            "insert",
            77,
            Some("Café Crème ☕ 東京ブレンド"),
            Some("4.50"),
            200,
        ),
        product("insert", 78, Some("Beans"), Some("12.00"), 201),
        product("insert", 79, Some("Sample"), Some("1E-7"), 202),
        // The name is a TOASTed value this update did not carry: the cached name stays.
        product("update", 78, Some("unchanged_toast"), Some("3.25"), 203),
        product("delete", 77, None, None, 204),
        product("insert", 80, Some("Gift card"), Some("25.00"), 205),
        product("update", 80, Some("Gift card"), None, 206),
        // row-cache (Rust).
        fixtures()[1].to_string(),
    ];
    env.xadd(&lines).await;
    let daemon = env.stream_config().admin().run();
    // Loading compiles the Python component (CPython inside: ~18 MiB), slow in debug builds.
    env.wait_drained_within(lines.len() as u64, Duration::from_secs(300))
        .await;
    // The Rust helper speaks contract 0.2.0; the JavaScript and Python helpers 0.1.0, which
    // keepwarm runs beside it.
    let contracts: HashMap<String, String> = plugins_status(&daemon.admin_url("/plugins"))
        .await
        .iter()
        .map(|p| (p["name"].to_string(), p["contract"].to_string()))
        .collect();
    let expect = |name: &str, contract: &str| {
        assert_eq!(
            contracts.get(&format!("\"{name}\"")),
            Some(&format!("\"{contract}\"")),
            "{contracts:?}"
        );
    };
    expect("row-cache", "0.2.0");
    expect("orders-index", "0.1.0");
    expect("product-catalog", "0.1.0");
    daemon.stop().await;

    let keys = env.keys().await;
    let set = |rest: &str| format!("orders:by_customer:{rest}");
    assert_eq!(keys.members(&set("42")).await, Vec::<String>::new());
    assert_eq!(keys.members(&set("43")).await, ["1001"]);
    assert_eq!(
        keys.members(&set(&big_customer.to_string())).await,
        [big_order.to_string()]
    );
    assert_eq!(keys.members(&set("77")).await, ["1003"]);

    let hash = |id: u64| format!("product:{id}");
    assert_eq!(keys.hgetall(&hash(77)).await, HashMap::new());
    let fields = |items: &[(&str, &str)]| -> HashMap<String, String> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    assert_eq!(
        keys.hgetall(&hash(78)).await,
        fields(&[
            ("name", "Beans"),
            ("price", "3.25"),
            ("updated_at", "2025-03-14T10:23:00.000000Z"),
        ])
    );
    // The exact numeric string, not 1e-07.
    assert_eq!(
        keys.hgetall(&hash(79)).await,
        fields(&[
            ("name", "Sample"),
            ("price", "1E-7"),
            ("updated_at", "2025-03-14T10:22:00.000000Z"),
        ])
    );
    // The price became null: the field leaves the hash and the product leaves the ranking.
    assert_eq!(
        keys.hgetall(&hash(80)).await,
        fields(&[
            ("name", "Gift card"),
            ("updated_at", "2025-03-14T10:26:00.000000Z"),
        ])
    );
    let ranking: Vec<(String, f64)> = keys
        .query(
            redis::cmd("ZRANGE")
                .arg(keys.name("products:by_price"))
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await;
    assert_eq!(ranking, [("79".to_owned(), 1e-7), ("78".to_owned(), 3.25)]);

    assert_eq!(
        keys.get("public.order_items:1001:1").await,
        Some(record_text(fixtures()[1]))
    );

    // The delete without the customer id is the only dead letter, with the plugin's reason.
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].field("plugin"), "orders-index");
    let reason = dead[0].field("reason");
    assert!(
        reason.contains("carries no customer_id") && reason.contains("REPLICA IDENTITY FULL"),
        "{reason}"
    );
}

const PROBES: &str = include_str!("../fixtures/sdk-probes.jsonl");

/// Runs `keepwarm test` with a probe plugin (tests/plugins/sdk-probe-*) over
/// tests/fixtures/sdk-probes.jsonl and compares its answer with the expected one, line by line:
/// the helper module inside the real engine, from exact JSON numbers and key templates to the
/// checks that turn a plugin's mistakes into rejections with a message instead of traps.
fn check_probes(plugin: &str, manifest: Option<&str>, expected: &str) {
    let wasm = test_plugin_wasm(plugin);
    let dir = TempDir::new("kw-probe");
    let manifest_path = dir.path().join("probe.toml");
    std::fs::write(&manifest_path, manifest.unwrap_or("")).unwrap();
    let (ok, out, err) = keepwarm_cli(
        &[
            "test",
            wasm.to_str().unwrap(),
            "--manifest",
            manifest_path.to_str().unwrap(),
        ],
        PROBES,
    );
    assert!(ok, "{err}");
    let got: Vec<&str> = out.lines().collect();
    let want: Vec<&str> = expected.lines().collect();
    for (n, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "{plugin}: answer to probe line {}", n + 1);
    }
    assert_eq!(got.len(), want.len(), "{plugin}: number of answers");
}

#[test]
fn the_javascript_helper_behaves_as_specified_inside_quickjs() {
    check_probes(
        "sdk-probe-js",
        None,
        include_str!("../fixtures/sdk-probes.js.expected.jsonl"),
    );
    // A constructor that throws rejects every change with the reason.
    let reason = "plugin rejected the change: plugin configuration: asked to fail: on purpose";
    let expected: String = (1..=PROBES.lines().count())
        .map(|n| format!("{{\"error\":\"{reason}\",\"line\":{n}}}\n"))
        .collect();
    check_probes(
        "sdk-probe-js",
        Some("[config]\nfail = \"on purpose\"\n"),
        &expected,
    );
}

#[test]
fn the_python_helper_behaves_as_specified_inside_the_component() {
    let _heavy = heavy_test();
    check_probes(
        "sdk-probe-python",
        None,
        include_str!("../fixtures/sdk-probes.python.expected.jsonl"),
    );
}
