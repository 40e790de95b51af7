//! The throughput cost of versioned writes: the daemon alone, no faults, one plugin in one mode,
//! against a private Redis.

use super::model::{self, Workload};
use super::run::read_cache;
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
    let mut env = TestEnv::new("kwt").on(url);
    env.group.name = GROUP.to_owned();
    let prefix = env.key("cache:");
    let manifest = format!("consistency = \"{mode}\"\n[config]\nprefix = \"{prefix}\"\n");
    env.add_plugin("model", &test_plugin_wasm("model-cache"), &manifest);
    let cache_dir = format!("cache_dir = \"{}\"", setup.cache.path().display());
    let config = env
        .stream_config()
        .set("plugins", &cache_dir)
        .source_lines(&format!("consumer = \"{IN_PROCESS}\""))
        .source_lines("block_ms = 100\nclaim_idle_ms = 30000");
    let mut conn = connect(url).await;
    let daemon = config.run();
    // Ready once the source has created its group.
    env.wait_group().await;
    let lines: Vec<String> = work.messages.iter().map(|m| m.line.clone()).collect();
    let cpu = redis_cpu_seconds(&mut conn).await;
    let started = Instant::now();
    for chunk in lines.chunks(1000) {
        env.xadd(chunk).await;
    }
    env.wait_drained_within(lines.len() as u64, Duration::from_secs(600))
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
