//! `postgres-backfill`: `keepwarm backfill --table public.orders` of the whole table into an
//! empty cache, as a user re-warms one; rows per second and the CPU it took.

use super::cluster::{Cluster, reaped_children_cpu};
use crate::procstat::Sample;
use crate::{Env, connect, flush, keepwarm_config};
use anyhow::Context as _;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One backfill.
#[derive(serde::Serialize)]
pub(crate) struct Backfill {
    pub(crate) rows: u64,
    /// From starting `keepwarm backfill` to its exit (start-up included).
    pub(crate) seconds: f64,
    pub(crate) rows_per_second: f64,
    /// The rate keepwarm reports itself (reading and applying, start-up excluded).
    pub(crate) reported_rows_per_second: Option<f64>,
    /// keepwarm's user+system CPU over the whole run, per million rows.
    pub(crate) cpu_seconds_per_million: f64,
    pub(crate) postgres_cpu_seconds_per_million: f64,
    pub(crate) redis_cpu_seconds_per_million: Option<f64>,
    pub(crate) peak_rss_mib: f64,
    pub(crate) keys: u64,
    pub(crate) dead_letters: u64,
}

/// Backfills `rows` rows of `public.orders` through row-cache (versioned writes) into the
/// flushed cache.
pub(crate) async fn measure(
    env: &Env,
    cluster: &Cluster,
    source: &str,
    rows: u64,
) -> anyhow::Result<Backfill> {
    let mut conn = connect(&env.url).await?;
    flush(&mut conn).await?;
    let (config, _) = keepwarm_config(env, "postgres-backfill", false, source)?;
    let state = env.scratch.join("postgres-backfill-state.json");
    let _ = std::fs::remove_file(&state);
    let cpu_before = reaped_children_cpu()?;
    let cluster_before = cluster.cpu_seconds()?;
    let redis_before = env.redis_pid.map(Sample::of).transpose()?;
    let start = Instant::now();
    let mut child = Command::new(&env.keepwarm)
        .arg("backfill")
        .arg("--config")
        .arg(&config)
        .args(["--table", "public.orders", "--state"])
        .arg(&state)
        .env("TOKIO_WORKER_THREADS", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start keepwarm backfill")?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let pid = child.id();
    let mut peak_rss_mib = 0.0_f64;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Ok(sample) = Sample::of(pid) {
            peak_rss_mib = peak_rss_mib.max(sample.peak_rss_mib);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(1800),
            "keepwarm backfill did not finish in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = start.elapsed().as_secs_f64();
    let cpu = reaped_children_cpu()? - cpu_before;
    let cluster_cpu = cluster.cpu_seconds()? - cluster_before;
    let redis_cpu = redis_before
        .zip(env.redis_pid.map(Sample::of).transpose()?)
        .map(|(a, b)| b.cpu_seconds - a.cpu_seconds);
    let log = reader
        .join()
        .map_err(|_| anyhow::anyhow!("stderr reader panicked"))?;
    anyhow::ensure!(
        status.success(),
        "keepwarm backfill failed ({status}):\n{log}"
    );
    let (reported_rows, reported_rate) =
        summary(&log).context("no summary from keepwarm backfill")?;
    anyhow::ensure!(
        reported_rows == rows,
        "keepwarm backfilled {reported_rows} of {rows} rows:\n{log}"
    );
    let dead_letters: u64 = redis::cmd("XLEN")
        .arg("keepwarm:dead-letters")
        .query_async(&mut conn)
        .await?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
    #[allow(clippy::cast_precision_loss, reason = "row counts far below 2^52")]
    let millions = rows as f64 / 1e6;
    Ok(Backfill {
        rows,
        seconds,
        rows_per_second: millions * 1e6 / seconds,
        reported_rows_per_second: reported_rate,
        cpu_seconds_per_million: cpu / millions,
        postgres_cpu_seconds_per_million: cluster_cpu / millions,
        redis_cpu_seconds_per_million: redis_cpu.map(|c| c / millions),
        peak_rss_mib,
        keys,
        dead_letters,
    })
}

/// The rows and rate of keepwarm's closing line, `backfilled N rows (R rows/s): …`.
fn summary(log: &str) -> Option<(u64, Option<f64>)> {
    let line = log.lines().find_map(|l| l.strip_prefix("backfilled "))?;
    let (rows, rest) = line.split_once(" rows (")?;
    let rate = rest.split_once(" rows/s").and_then(|(r, _)| r.parse().ok());
    Some((rows.parse().ok()?, rate))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_summary_line_is_read() {
        let log = "warn: x\nbackfilled 2000 rows (1234 rows/s): 2000 done, 0 left unapplied\n";
        assert_eq!(super::summary(log), Some((2000, Some(1234.0))));
        assert_eq!(super::summary("nothing"), None);
    }
}
