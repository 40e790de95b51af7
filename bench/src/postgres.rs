//! The Postgres source's scenarios, against a private logical-replication cluster the benchmark
//! starts (`cluster`), with keepwarm running row-cache (versioned writes) into the benchmark's
//! Redis:
//!
//! - `keepwarm-postgres` (`stream`): single-row updates committed at a fixed rate, stepped up
//!   through `--pg-rate`; commit-to-cache latency p50/p99 at each rate and the highest rate the
//!   cache keeps up with.
//! - `postgres-backfill` (`backfill`): `keepwarm backfill` of a `--pg-backfill-rows` table.
//!
//! Skipped, with the reason, where Postgres is not installed or cannot be started.

mod backfill;
mod cluster;
mod stream;

use crate::{Env, RunArgs, keepwarm_command, stop};
use anyhow::Context as _;
use cluster::{Cluster, DATABASE};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The Postgres scenarios' options.
#[derive(clap::Args)]
pub(crate) struct PgArgs {
    /// keepwarm-postgres: commit rates to step through, changes per second, comma-separated;
    /// the step-up ends at the first rate the cache does not keep up with.
    #[arg(long, value_delimiter = ',', default_values_t = [1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 8000.0, 10000.0, 12000.0, 16000.0])]
    pg_rate: Vec<f64>,
    /// keepwarm-postgres: seconds of each rate.
    #[arg(long, default_value_t = 10)]
    pg_seconds: u64,
    /// postgres-backfill: rows of the table `keepwarm backfill` reads.
    #[arg(long, default_value_t = 1_000_000)]
    pg_backfill_rows: u64,
}

/// One rate of the step-up.
#[derive(serde::Serialize)]
pub(crate) struct Step {
    rate_per_second: f64,
    committed: u64,
    /// The rate Postgres committed at (changes over the time to the last commit's return;
    /// below the target when Postgres did not keep up).
    achieved_per_second: f64,
    /// Sampled changes seen in the cache, and those never seen.
    observed: u64,
    unobserved: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Median latency of the first and the last fifth of the step: a growing lag shows here.
    early_p50_ms: f64,
    late_p50_ms: f64,
    keepwarm_cpu_seconds_per_million: f64,
    /// Of one core, over the step and its drain.
    keepwarm_cpu_percent: f64,
    postgres_cpu_percent: f64,
    /// The most WAL the walsender had not sent yet (sampled every 50 ms): Postgres's own lag.
    max_unsent_bytes: i64,
    kept_up: bool,
}

/// What the Postgres scenarios measured.
#[derive(serde::Serialize, Default)]
pub(crate) struct Report {
    /// Why they did not run.
    skipped: Option<String>,
    steps: Vec<Step>,
    /// The highest rate the cache kept up with.
    max_sustained_per_second: Option<f64>,
    keepwarm_peak_rss_mib: Option<f64>,
    backfill: Option<backfill::Backfill>,
}

/// The publication and slot keepwarm creates in the benchmark's database.
const SLOT: &str = "keepwarm_bench";

/// Runs the scenarios `--only` selects (both by default); `None` when it selects neither.
pub(crate) async fn run(env: &Env, args: &RunArgs) -> anyhow::Result<Option<Report>> {
    let (streaming, backfilling) = (
        args.wants("keepwarm-postgres"),
        args.wants("postgres-backfill"),
    );
    if !streaming && !backfilling {
        return Ok(None);
    }
    if let Err(reason) = cluster::available() {
        let reason = format!("{reason:#}");
        eprintln!("note: {reason}; the Postgres scenarios are skipped");
        return Ok(Some(Report {
            skipped: Some(reason),
            ..Report::default()
        }));
    }
    let pg = &args.pg;
    let (rates, seconds, backfill_rows) = if args.quick {
        (vec![200.0], 1, pg.pg_backfill_rows.min(2_000))
    } else {
        (pg.pg_rate.clone(), pg.pg_seconds, pg.pg_backfill_rows)
    };
    let rows = if backfilling {
        backfill_rows
    } else {
        stream::HOT_ROWS.min(backfill_rows)
    }
    .max(10);
    eprintln!("== postgres: starting a private cluster, loading {rows} rows");
    let cluster = Cluster::start().await?;
    load(&cluster, rows).await?;
    let source = format!(
        "[[source]]\nkind = \"postgres\"\nconnection = \"{url}\"\npublication = \"{SLOT}\"\n\
         slot = \"{SLOT}\"\ntables = [\"public.orders\"]\ncreate_publication = true\n",
        url = cluster.url(DATABASE)
    );
    let mut report = Report::default();
    if backfilling {
        eprintln!("== postgres-backfill: {rows} rows");
        let result = backfill::measure(env, &cluster, &source, rows).await?;
        eprintln!(
            "   {:.0} rows/s ({} by keepwarm's count), {:.2} CPU s/M rows, {:.1} MiB",
            result.rows_per_second,
            result
                .reported_rows_per_second
                .map_or("-".to_owned(), |r| format!("{r:.0}")),
            result.cpu_seconds_per_million,
            result.peak_rss_mib
        );
        report.backfill = Some(result);
    }
    if streaming {
        stream_steps(env, &cluster, &source, rows, &rates, seconds, &mut report).await?;
    }
    Ok(Some(report))
}

/// The table: `rows` orders, shaped like the Redis Stream workload's records.
async fn load(cluster: &Cluster, rows: u64) -> anyhow::Result<()> {
    let client = cluster.connect(DATABASE).await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE orders (
                id bigint PRIMARY KEY, customer_id bigint NOT NULL, status text NOT NULL,
                currency text NOT NULL, total_amount numeric(12,2) NOT NULL, is_gift boolean NOT NULL,
                created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
                shipping_address jsonb NOT NULL, notes text NOT NULL, seq bigint NOT NULL);
             INSERT INTO orders SELECT g, g % 9973 + 1, 'pending', 'EUR', (g % 100000) / 100.0,
                g % 2 = 0, now(), now(),
                jsonb_build_object('line1', g || ' Keizersgracht', 'city', 'Amsterdam',
                                   'postcode', '1015 CJ', 'country', 'NL'),
                'leave at the door, ring twice', 0
             FROM generate_series(1, {rows}) g;"
        ))
        .await
        .context("cannot load the benchmark's table")?;
    client.batch_execute("VACUUM ANALYZE orders").await?;
    Ok(())
}

/// keepwarm streaming from the cluster while the rates are stepped up.
async fn stream_steps(
    env: &Env,
    cluster: &Cluster,
    source: &str,
    rows: u64,
    rates: &[f64],
    seconds: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut conn = crate::connect(&env.url).await?;
    crate::flush(&mut conn).await?;
    let listener = stream::Listener::start(&env.url)?;
    let mut command = keepwarm_command(env, "keepwarm-postgres", false, 2, source)?;
    let child = command.stdout(Stdio::null()).spawn()?;
    let keepwarm = child.id();
    let result = async {
        let mut clients = Vec::new();
        for _ in 0..stream::Producer::connections() {
            clients.push(cluster.connect(DATABASE).await?);
        }
        wait_streaming(&clients[0]).await?;
        let mut producer = stream::Producer::new(clients, rows).await?;
        stream::warm_up(&mut producer, &listener, Duration::from_secs(60)).await?;
        let processes = stream::Processes {
            keepwarm,
            cluster,
            monitor: std::sync::Arc::new(cluster.connect(DATABASE).await?),
        };
        for &rate in rates {
            eprintln!("== keepwarm-postgres: {rate:.0} commits/s for {seconds} s");
            let step = stream::step(&mut producer, &listener, &processes, rate, seconds).await?;
            eprintln!(
                "   committed {:.0}/s; p50 {:.2} ms, p99 {:.2} ms (first fifth {:.2}, last fifth {:.2}); keepwarm {:.0}% CPU; {}",
                step.achieved_per_second,
                step.p50_ms,
                step.p99_ms,
                step.early_p50_ms,
                step.late_p50_ms,
                step.keepwarm_cpu_percent,
                if step.kept_up { "kept up" } else { "did not keep up" }
            );
            let kept_up = step.kept_up;
            if kept_up {
                report.max_sustained_per_second = Some(rate);
            }
            report.steps.push(step);
            if !kept_up {
                break;
            }
        }
        report.keepwarm_peak_rss_mib = Some(crate::procstat::Sample::of(keepwarm)?.peak_rss_mib);
        anyhow::Ok(())
    }
    .await;
    stop(env, child);
    listener.stop()?;
    result
}

/// Waits until a walsender streams from the slot: from then on, commits reach keepwarm.
async fn wait_streaming(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let streaming = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r
                 ON r.pid = s.active_pid WHERE s.slot_name = $1",
                &[&SLOT],
            )
            .await?
            .is_some();
        if streaming {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "keepwarm did not start streaming from the slot within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prints the tables.
pub(crate) fn print(report: Option<&Report>) {
    let Some(report) = report else { return };
    if let Some(reason) = &report.skipped {
        println!();
        println!("Postgres scenarios skipped: {reason}");
        return;
    }
    if !report.steps.is_empty() {
        println!();
        println!(
            "| keepwarm-postgres (COMMIT to cache) | committed/s | observed | p50 ms | p99 ms | max ms | first/last fifth p50 ms | keepwarm CPU s / M | keepwarm CPU % | Postgres CPU % | max unsent KiB | kept up |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for s in &report.steps {
            println!(
                "| {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2} | {:.0} | {:.0} | {} | {} |",
                s.rate_per_second,
                s.achieved_per_second,
                s.observed,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.early_p50_ms,
                s.late_p50_ms,
                s.keepwarm_cpu_seconds_per_million,
                s.keepwarm_cpu_percent,
                s.postgres_cpu_percent,
                s.max_unsent_bytes / 1024,
                if s.kept_up { "yes" } else { "no" }
            );
        }
        println!(
            "max sustained: {}; keepwarm's peak RSS {}",
            report
                .max_sustained_per_second
                .map_or("none of the rates".to_owned(), |r| format!(
                    "{r:.0} commits/s"
                )),
            report
                .keepwarm_peak_rss_mib
                .map_or("-".to_owned(), |m| format!("{m:.1} MiB"))
        );
    }
    if let Some(b) = &report.backfill {
        println!();
        println!(
            "| postgres-backfill | rows | seconds | rows/s | rows/s (keepwarm's count) | CPU s / M rows | Postgres CPU s / M | Redis CPU s / M | peak RSS MiB | dead letters |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        println!(
            "| keepwarm backfill | {} | {:.2} | {:.0} | {} | {:.2} | {:.2} | {} | {:.1} | {} |",
            b.rows,
            b.seconds,
            b.rows_per_second,
            b.reported_rows_per_second
                .map_or("-".to_owned(), |r| format!("{r:.0}")),
            b.cpu_seconds_per_million,
            b.postgres_cpu_seconds_per_million,
            b.redis_cpu_seconds_per_million
                .map_or("-".to_owned(), |r| format!("{r:.2}")),
            b.peak_rss_mib,
            b.dead_letters
        );
    }
}
