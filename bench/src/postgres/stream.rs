//! The paced run of `keepwarm-postgres`: single-row updates committed at a fixed rate (each
//! statement its own transaction), and the time from each commit returning to the cache key
//! holding that change's value.
//!
//! Every change writes a sequence number into its row (`seq`). A listener subscribes to the
//! keyspace notifications of the rows whose id ends in 7 (one change in ten), reads the key on
//! each and records when each sequence number first appeared. Latency is that moment minus the
//! moment the change's `UPDATE` returned (both on this machine's monotonic clock).

use super::Step;
use crate::pace::{Pacer, percentile};
use crate::procstat::Sample;
use anyhow::Context as _;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Statement};

/// Rows the updates cycle over (fewer when the table is smaller): a row changes again only
/// after this many changes, so a sampled key holds one change long enough to be read.
pub(crate) const HOT_ROWS: u64 = 100_000;

/// Connections committing the changes (each pipelines its statements).
const CONNECTIONS: usize = 4;

/// The sampled rows: ids ending in this digit.
const SAMPLED_DIGIT: u64 = 7;

/// How long the cache may take to show the last sampled change of a step.
const DRAIN: Duration = Duration::from_secs(30);

type Times = Arc<Mutex<HashMap<u64, Instant>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Commits the changes.
pub(crate) struct Producer {
    clients: Vec<(Arc<Client>, Statement)>,
    rows: u64,
    /// The next change's sequence number.
    next: u64,
}

impl Producer {
    pub(crate) async fn new(clients: Vec<Client>, rows: u64) -> anyhow::Result<Producer> {
        let mut prepared = Vec::new();
        for client in clients {
            let statement = client
                .prepare(
                    "UPDATE orders SET seq = $1, status = $2, updated_at = now() WHERE id = $3",
                )
                .await?;
            prepared.push((Arc::new(client), statement));
        }
        Ok(Producer {
            clients: prepared,
            rows: rows.clamp(1, HOT_ROWS),
            next: 1,
        })
    }

    pub(crate) fn connections() -> usize {
        CONNECTIONS
    }
}

/// Records when each sampled change first appears in the cache.
pub(crate) struct Listener {
    observed: Times,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Listener {
    pub(crate) fn start(url: &str) -> anyhow::Result<Listener> {
        let client = redis::Client::open(url)?;
        let mut config = client.get_connection()?;
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("K$")
            .query(&mut config)?;
        let mut sub = client.get_connection()?;
        let mut reader = client.get_connection()?;
        let observed: Times = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let prefix = "__keyspace@0__:";
        let (seen, stopping) = (Arc::clone(&observed), Arc::clone(&stop));
        let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut pubsub = sub.as_pubsub();
            pubsub.psubscribe(format!("{prefix}public.orders:*{SAMPLED_DIGIT}"))?;
            pubsub.set_read_timeout(Some(Duration::from_millis(200)))?;
            let _ = subscribed_tx.send(());
            while !stopping.load(Ordering::Relaxed) {
                let Ok(msg) = pubsub.get_message() else {
                    continue;
                };
                let now = Instant::now();
                let Some(key) = msg.get_channel_name().strip_prefix(prefix) else {
                    continue;
                };
                let value: Option<String> = redis::cmd("GET").arg(key).query(&mut reader)?;
                let seq = value
                    .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
                    .and_then(|v| v["seq"].as_u64());
                if let Some(seq) = seq {
                    lock(&seen).entry(seq).or_insert(now);
                }
            }
            Ok(())
        });
        subscribed_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the keyspace listener did not start")?;
        Ok(Listener {
            observed,
            stop,
            thread,
        })
    }

    fn seen(&self, seq: u64) -> bool {
        lock(&self.observed).contains_key(&seq)
    }

    pub(crate) fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the keyspace listener panicked"))?
    }
}

/// What a step measures.
pub(crate) struct Processes<'a> {
    /// keepwarm's pid, for its CPU.
    pub(crate) keepwarm: u32,
    /// The cluster, for its CPU.
    pub(crate) cluster: &'a super::cluster::Cluster,
    /// A connection of its own, for the walsender's backlog.
    pub(crate) monitor: Arc<Client>,
}

/// The most WAL the walsender had not yet sent to keepwarm, sampled every 50 ms: when it
/// grows, Postgres (decoding), not keepwarm, is behind.
struct Unsent {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<i64>>,
}

impl Unsent {
    fn sample(client: Arc<Client>) -> Unsent {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut max = 0_i64;
            while !stopping.load(Ordering::Relaxed) {
                let row = client
                    .query_opt(
                        "SELECT (pg_current_wal_lsn() - r.sent_lsn)::int8
                         FROM pg_replication_slots s JOIN pg_stat_replication r
                         ON r.pid = s.active_pid WHERE s.slot_name = $1",
                        &[&super::SLOT],
                    )
                    .await?;
                if let Some(bytes) = row.and_then(|r| r.get::<_, Option<i64>>(0)) {
                    max = max.max(bytes);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(max)
        });
        Unsent { stop, task }
    }

    async fn stop(self) -> anyhow::Result<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// One change and waits until the cache shows it: the pipeline is up and warm.
pub(crate) async fn warm_up(
    producer: &mut Producer,
    listener: &Listener,
    patience: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        // The next sampled change.
        while (producer.next % producer.rows + 1) % 10 != SAMPLED_DIGIT {
            producer.next += 1;
        }
        let seq = producer.next;
        producer.next += 1;
        let (client, statement) = &producer.clients[0];
        client
            .execute(statement, &params(seq, producer.rows).as_refs())
            .await?;
        let retry = Instant::now() + Duration::from_secs(2);
        while Instant::now() < retry {
            if listener.seen(seq) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "keepwarm did not apply a change within {patience:?}"
        );
    }
}

/// The parameters of change `seq`.
struct Params {
    seq: i64,
    status: &'static str,
    id: i64,
}

impl Params {
    fn as_refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 3] {
        [&self.seq, &self.status, &self.id]
    }
}

const STATUSES: [&str; 5] = ["pending", "paid", "packed", "shipped", "delivered"];

fn params(seq: u64, rows: u64) -> Params {
    Params {
        seq: i64::try_from(seq).unwrap_or(i64::MAX),
        status: STATUSES[usize::try_from(seq % 5).unwrap_or(0)],
        id: i64::try_from(seq % rows + 1).unwrap_or(1),
    }
}

/// Commits changes at `rate` per second for `seconds`, then waits for the cache to show them.
pub(crate) async fn step(
    producer: &mut Producer,
    listener: &Listener,
    processes: &Processes<'_>,
    rate: f64,
    seconds: u64,
) -> anyhow::Result<Step> {
    let committed: Times = Arc::default();
    let in_flight = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let unsent = Unsent::sample(Arc::clone(&processes.monitor));
    let keepwarm_before = Sample::of(processes.keepwarm)?;
    let cluster_before = processes.cluster.cpu_seconds()?;
    let first = producer.next;
    let mut pacer = Pacer::new(rate, seconds);
    let start = pacer.start();
    let mut sent: u64 = 0;
    // More outstanding statements than a second's worth means Postgres does not keep up with
    // the rate: the producer waits, and the step reports the rate it reached.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a small positive count"
    )]
    let max_in_flight = (rate as u64).max(100);
    while let Some(due) = pacer.due().await {
        while sent < due && in_flight.load(Ordering::Relaxed) < max_in_flight {
            let seq = first + sent;
            let (client, statement) = &producer.clients[usize::try_from(sent)? % CONNECTIONS];
            let (client, statement) = (Arc::clone(client), statement.clone());
            let (committed, in_flight, failures) = (
                Arc::clone(&committed),
                Arc::clone(&in_flight),
                Arc::clone(&failures),
            );
            let sampled = (seq % producer.rows + 1) % 10 == SAMPLED_DIGIT;
            let rows = producer.rows;
            in_flight.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let values = params(seq, rows);
                match client.execute(&statement, &values.as_refs()).await {
                    Ok(_) if sampled => {
                        lock(&committed).insert(seq, Instant::now());
                    }
                    Ok(_) => {}
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            sent += 1;
        }
    }
    producer.next = first + sent;
    while in_flight.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Until the last commit returned: the rate Postgres committed at.
    let producing = start.elapsed().as_secs_f64();
    let failed = failures.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} of {sent} updates failed");
    let committed = std::mem::take(&mut *lock(&committed));
    let deadline = Instant::now() + DRAIN;
    while Instant::now() < deadline && !committed.keys().all(|seq| listener.seen(*seq)) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let max_unsent_bytes = unsent.stop().await?;
    let keepwarm_cpu = Sample::of(processes.keepwarm)?.cpu_seconds - keepwarm_before.cpu_seconds;
    let cluster_cpu = processes.cluster.cpu_seconds()? - cluster_before;
    let observed = lock(&listener.observed);
    // (commit time, latency ms) of every sampled change, in commit order.
    let mut samples: Vec<(Instant, f64)> = committed
        .iter()
        .filter_map(|(seq, at)| {
            let seen = observed.get(seq)?;
            Some((*at, seen.saturating_duration_since(*at).as_secs_f64() * 1e3))
        })
        .collect();
    drop(observed);
    samples.sort_by_key(|(at, _)| *at);
    let unobserved = committed.len() - samples.len();
    #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let (sent_f, samples_n) = (sent as f64, samples.len());
    let fifth = (samples_n / 5).max(1);
    let early = quantile(&mut latencies(&samples[..fifth.min(samples_n)]), 0.5);
    let late = quantile(
        &mut latencies(&samples[samples_n.saturating_sub(fifth)..]),
        0.5,
    );
    let mut all = latencies(&samples);
    let achieved = sent_f / producing;
    let p99 = quantile(&mut all, 0.99);
    let kept_up = achieved >= 0.95 * rate
        && samples_n > 0
        && unobserved * 1000 <= committed.len()
        && p99 <= 1000.0
        && late <= 2.0 * early + 20.0;
    Ok(Step {
        rate_per_second: rate,
        committed: sent,
        achieved_per_second: achieved,
        observed: samples_n as u64,
        unobserved: unobserved as u64,
        p50_ms: quantile(&mut all, 0.5),
        p99_ms: p99,
        max_ms: all.last().copied().unwrap_or(f64::NAN),
        early_p50_ms: early,
        late_p50_ms: late,
        keepwarm_cpu_seconds_per_million: keepwarm_cpu / sent_f * 1e6,
        keepwarm_cpu_percent: keepwarm_cpu / elapsed * 100.0,
        postgres_cpu_percent: cluster_cpu / elapsed * 100.0,
        max_unsent_bytes,
        kept_up,
    })
}

fn latencies(samples: &[(Instant, f64)]) -> Vec<f64> {
    samples.iter().map(|(_, ms)| *ms).collect()
}

/// The `p` quantile of `values` (sorted here).
fn quantile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(values, p)
}
