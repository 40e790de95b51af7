//! The throughput cost of versioned writes: the daemon alone, no faults, one plugin in one mode,
//! against a private Redis.

use super::model::{self, Workload};
use super::run::{group_state, read_cache};
use super::{GROUP, IN_PROCESS, Setup};
use crate::util::*;
use std::time::{Duration, Instant};

/// One throughput measurement.
pub struct Measured {
    /// Messages per second, from the first `XADD` to the last acknowledgement.
    pub rate: f64,
    /// Redis CPU time (user and system) per message, in microseconds: the cost of the scripts
    /// themselves, which wall time on a shared machine blurs.
    pub redis_cpu_us: f64,
}

async fn redis_cpu_seconds(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| *name == "used_cpu_user" || *name == "used_cpu_sys")
        .map(|(_, value)| value.trim().parse::<f64>().unwrap())
        .sum()
}

/// The daemon alone on a fresh stream of `url`, one plugin in `mode`, no faults.
pub async fn measure(url: &str, work: &Workload, mode: &str, setup: &Setup) -> Measured {
    let base = unique("kwt");
    let prefix = format!("{base}:cache:");
    let stream = format!("{base}:stream");
    let plugins = PluginDir::new();
    plugins.add(
        "model",
        &test_plugin_wasm("model-cache"),
        &format!("consistency = \"{mode}\"\n[config]\nprefix = \"{prefix}\"\n"),
    );
    let config = keepwarm::config::Config::parse(&format!(
        r#"
[redis]
url = "{url}"
[plugins]
dir = "{dir}"
cache_dir = "{cache}"
[dead_letter]
stream = "{base}:dead"
[admin]
listen = "127.0.0.1:0"
[[source]]
kind = "redis-stream"
stream = "{stream}"
group = "{GROUP}"
consumer = "{IN_PROCESS}"
block_ms = 100
"#,
        dir = plugins.path().display(),
        cache = setup.cache.path().display(),
    ))
    .unwrap();
    let mut conn = connect(url).await;
    let daemon = Daemon::start(config);
    // Ready once the source has created its group.
    wait_for("the group", Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move { group_state(&mut conn, &stream).await.is_some() }
    })
    .await;
    let lines: Vec<String> = work.messages.iter().map(|m| m.line.clone()).collect();
    let cpu = redis_cpu_seconds(&mut conn).await;
    let started = Instant::now();
    for chunk in lines.chunks(1000) {
        xadd_sequin(&mut conn, &stream, chunk).await;
    }
    wait_all_acked(
        url,
        &stream,
        GROUP,
        lines.len() as u64,
        Duration::from_secs(600),
    )
    .await;
    let n = lines.len() as f64;
    let measured = Measured {
        rate: n / started.elapsed().as_secs_f64(),
        redis_cpu_us: (redis_cpu_seconds(&mut conn).await - cpu) * 1e6 / n,
    };
    daemon.stop().await;
    if mode == "versioned" {
        let found = read_cache(&mut conn, &prefix).await;
        let divergences = model::diff(&work.expected(&prefix), &found);
        assert!(divergences.is_empty(), "{divergences:?}");
    }
    measured
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
