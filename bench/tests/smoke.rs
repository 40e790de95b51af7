//! Smoke test: `keepwarm-bench --quick` runs every scenario on a tiny workload against a private
//! redis-server (and a private Postgres cluster for the Postgres scenarios) and writes valid
//! JSON. No timing assertions: the numbers mean nothing here.
//!
//! Needs the `keepwarm` binary of the same profile (built by `cargo test -p keepwarm`) and
//! `target/plugins/row-cache.wasm` (`scripts/build-plugins.sh`); fails loudly otherwise.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn quick_run_writes_results() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_keepwarm-bench"));
    let bin_dir = exe.parent().unwrap();
    let target = bin_dir.parent().unwrap();
    let keepwarm = bin_dir.join("keepwarm");
    let plugins =
        std::env::var_os("KEEPWARM_PLUGINS").map_or_else(|| target.join("plugins"), PathBuf::from);
    assert!(
        keepwarm.exists() && plugins.join("row-cache.wasm").exists(),
        "needs {} (cargo build -p keepwarm) and {}/row-cache.wasm (scripts/build-plugins.sh)",
        keepwarm.display(),
        plugins.display()
    );
    let out = target.join("bench").join("smoke.json");
    let _ = std::fs::remove_file(&out);
    let status = Command::new(&exe)
        .arg("--quick")
        .arg("--plugins")
        .arg(&plugins)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "keepwarm-bench --quick failed");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let runs = json["throughput"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    let mut expected = vec![
        "keepwarm-plain",
        "keepwarm-versioned",
        "keepwarm-memcached-plain",
        "keepwarm-memcached-versioned",
        "native-rust",
    ];
    // The broker scenarios run where the brokers are given (scripts/test.sh exports them).
    if std::env::var_os("NATS_URL").is_some() {
        expected.push("keepwarm-nats");
    }
    if std::env::var_os("AMQP_URL").is_some() {
        expected.push("keepwarm-rabbitmq");
    }
    for name in expected {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    // The Kafka scenarios run when scripts/test.sh started a broker.
    if std::env::var_os("KAFKA_BROKERS").is_some() {
        for name in ["keepwarm-kafka", "native-kafka"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
    }
    for run in runs {
        assert_eq!(run["messages"], 2000, "{run}");
        assert_eq!(run["dead_letters"], 0, "{run}");
        assert!(run["keys"].as_u64().unwrap() > 0, "{run}");
    }
    assert!(!json["latency"].as_array().unwrap().is_empty());
    // Every example plugin was called on every change and accepted all of them.
    let calls = json["plugin_calls"].as_array().unwrap();
    let plugins: Vec<&str> = calls
        .iter()
        .map(|c| c["plugin"].as_str().unwrap())
        .collect();
    assert_eq!(plugins, ["row-cache", "orders-index", "product-catalog"]);
    for call in calls {
        assert_eq!(call["rejected"], 0, "{call}");
        assert!(call["ops_per_change"].as_f64().unwrap() >= 1.0, "{call}");
    }
    // The Postgres scenarios, tiny, against the private cluster the benchmark starts: skipped
    // (with the reason) only where it cannot start one.
    let pg = &json["postgres"];
    if let Some(reason) = pg["skipped"].as_str() {
        assert!(
            !can_start_postgres(),
            "skipped although Postgres can start: {reason}"
        );
        eprintln!("the Postgres scenarios were skipped: {reason}");
    } else {
        let steps = pg["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 1, "{pg}");
        assert!(steps[0]["observed"].as_u64().unwrap() > 0, "{pg}");
        assert_eq!(steps[0]["unobserved"], 0, "{pg}");
        let backfill = &pg["backfill"];
        assert_eq!(backfill["rows"], 2000, "{pg}");
        assert_eq!(backfill["dead_letters"], 0, "{pg}");
        assert!(backfill["keys"].as_u64().unwrap() >= 2000, "{pg}");
    }
    // --quick loads only the Rust example, once compiled and once from the artifact cache (the
    // bench fails when `keepwarm check` says otherwise), each with its phases timed.
    let loads = json["plugin_load"].as_array().unwrap();
    let plugins: Vec<&str> = loads
        .iter()
        .map(|l| l["plugin"].as_str().unwrap())
        .collect();
    assert_eq!(plugins, ["row-cache"]);
    for kind in ["cold", "cached"] {
        let run = &loads[0][kind];
        for figure in [
            "wall_seconds",
            "cpu_seconds",
            "compile_seconds",
            "instantiate_seconds",
            "self_test_seconds",
        ] {
            assert!(run[figure].is_f64(), "{kind} {figure}: {run}");
        }
    }
}

/// Postgres is installed and this process is root (initdb runs as the postgres user).
fn can_start_postgres() -> bool {
    let installed = std::fs::read_dir("/usr/lib/postgresql")
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().join("bin/initdb").is_file())));
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            == Some("0")
    });
    installed && root
}
