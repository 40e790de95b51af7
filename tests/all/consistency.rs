//! The proof of versioned writes: a model-based consistency test.
//!
//! For each seed, [`model`] generates a random history of a table (inserts, updates that move a
//! row to another cache key, deletes, re-inserts of a primary key, backfill reads between
//! changes, transactions of several rows with gaps in `commit_idx`) as Sequin messages, and
//! [`plan`] decides how they reach a Redis Stream: interleaved across rows, with duplicates, late
//! redeliveries, a consumer process killed with SIGKILL and restarted, and Redis restarted, while
//! two consumers (the daemon in this process and the `keepwarm` binary) share the group. Both a
//! `versioned` and a `plain` copy of the `model-cache` plugin serve every message, under their
//! own key prefixes, so both see the same deliveries and faults. Then, key by key, the versioned
//! cache must equal the model, and the plain one shows what versioning prevents.
//!
//! One seed in four runs against a one-node Redis Cluster, which refuses any script call that
//! names keys of two hash slots.
//!
//! The same seeds run against Memcached as the cache (the stream stays in Redis): the plugin
//! leaves out its team sets (Memcached has none), and the Redis restart becomes a Memcached
//! restart, which loses every key and version. After it, a key may be missing (a cache miss, the
//! cache refills as changes come), but a value present must be the model's. They run once more
//! on Memcached without `[redis]` (the stream source names its Redis itself): both consumers
//! then share the newest version written through a local file, and dead letters would go to a
//! file.
//!
//! - `KEEPWARM_SOAK_SEEDS=N`: run N seeds (from `KEEPWARM_SEED_BASE`, default 1000) instead of
//!   the suite's.
//! - `KEEPWARM_SEED=S`: run only seed S (to reproduce a failure).

mod model;
mod plan;
mod process;
mod run;
mod throughput;

use crate::util::*;
use model::Size;
use run::{SeedReport, run_seed};
use std::time::Instant;
use throughput::{Measured, median};

/// The seeds of the suite.
const SUITE_SEEDS: u64 = 20;
/// Messages per seed (before duplicates and redeliveries).
const MESSAGES: usize = 400;
const VERSIONED: &str = "kwm:v:";
const PLAIN: &str = "kwm:p:";
const GROUP: &str = "keepwarm";
const IN_PROCESS: &str = "kw-in-process";
const PROCESS: &str = "kw-process";

const SIZE: Size = Size {
    messages: MESSAGES,
    initial_rows: 16,
    emails: 40,
    teams: 4,
};

/// The plugin directory (a versioned and a plain copy of `model-cache`) and a shared artifact
/// cache, so that restarted processes do not compile again.
struct Setup {
    plugins: TempDir,
    cache: TempDir,
    work: TempDir,
    /// The Memcached servers when Memcached is the cache.
    memcached: Option<String>,
    /// Memcached without `[redis]`: dead letters and the newest version go to files.
    without_redis: bool,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_cache(None)
    }

    /// A setup whose cache is the Memcached at `servers` (or Redis).
    fn with_cache(memcached: Option<String>) -> Setup {
        let teams = if memcached.is_some() {
            "teams = false\n"
        } else {
            ""
        };
        let plugins = TempDir::new("kw-plugins");
        let wasm = test_plugin_wasm("model-cache");
        for (name, mode, prefix) in [
            ("model-versioned", "versioned", VERSIONED),
            ("model-plain", "plain", PLAIN),
        ] {
            let manifest = format!(
                "tables = [\"public.users\"]\nconsistency = \"{mode}\"\n[config]\nprefix = \"{prefix}\"\n{teams}"
            );
            add_plugin(plugins.path(), name, &wasm, &manifest);
        }
        Setup {
            plugins,
            cache: TempDir::new("kw-artifacts"),
            work: TempDir::new("kw-consistency"),
            memcached,
            without_redis: false,
        }
    }

    /// The dead-letter file of the run on `stream` (without `[redis]`).
    fn letter_file(&self, stream: &str) -> std::path::PathBuf {
        self.work.path().join(format!("{stream}.dead.jsonl"))
    }

    /// The daemon configuration of one consumer, its admin endpoint on `admin`.
    fn config(&self, url: &str, stream: &str, consumer: &str, admin: &str) -> String {
        let memcached = match &self.memcached {
            Some(servers) => format!("[memcached]\nservers = [\"{servers}\"]\n"),
            None => String::new(),
        };
        // Without [redis], the source names its Redis; dead letters go to a file of the run's.
        let (redis, dead_letter, source_url) = if self.without_redis {
            let file = self.letter_file(stream);
            (
                String::new(),
                format!("file = \"{}\"", file.display()),
                format!("url = \"{url}\""),
            )
        } else {
            (
                format!("[redis]\nurl = \"{url}\"\nresponse_timeout_ms = 3000\n"),
                "stream = \"kwm:dead\"".to_owned(),
                String::new(),
            )
        };
        format!(
            r#"
{redis}{memcached}[plugins]
dir = "{plugins}"
cache_dir = "{cache}"
[pipeline]
lanes = 4
batch_size = 16
max_backoff_ms = 200
[dead_letter]
{dead_letter}
[admin]
listen = "{admin}"
[[source]]
kind = "redis-stream"
stream = "{stream}"
group = "{GROUP}"
consumer = "{consumer}"
read_count = 8
block_ms = 20
claim_idle_ms = 250
{source_url}
"#,
            plugins = self.plugins.path().display(),
            cache = self.cache.path().display(),
        )
    }
}

/// The seeds to run: the suite's, a soak's, or one.
fn seeds() -> Vec<u64> {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
    };
    if let Some(seed) = var("KEEPWARM_SEED") {
        return vec![seed];
    }
    match var("KEEPWARM_SOAK_SEEDS") {
        Some(n) => {
            let base = var("KEEPWARM_SEED_BASE").unwrap_or(1000);
            (base..base + n).collect()
        }
        None => (1..=SUITE_SEEDS).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_versioned_cache_equals_the_model_under_faults_and_plain_does_not() {
    let setup = Setup::new();
    let mut standalone = RedisServer::start().await;
    let mut cluster = RedisServer::start_cluster().await;
    let seeds = seeds();
    let started = Instant::now();
    let mut reports = Vec::new();
    for &seed in &seeds {
        let on_cluster = seed % 4 == 3;
        let server = if on_cluster {
            &mut cluster
        } else {
            &mut standalone
        };
        let report = run_seed(seed, server, on_cluster, None, &setup).await;
        println!("{}", report.line());
        reports.push(report);
    }
    let failed: Vec<&SeedReport> = reports.iter().filter(|r| !r.versioned.is_empty()).collect();
    let sum = |f: fn(&SeedReport) -> usize| reports.iter().map(f).sum::<usize>();
    println!(
        "{} seeds in {:.1}s: {} messages, {} deliveries, {} duplicates, {} redeliveries, {} kills, {} redis restarts; versioned: {} seeds diverged, {}+ stale writes skipped; plain: {} stale keys or members over {} of {} seeds",
        reports.len(),
        started.elapsed().as_secs_f64(),
        sum(|r| r.messages),
        sum(|r| r.plan.deliveries),
        sum(|r| r.plan.faults.duplicates),
        sum(|r| r.plan.faults.redeliveries),
        sum(|r| r.plan.faults.kills),
        sum(|r| r.plan.faults.redis_restarts),
        failed.len(),
        reports.iter().map(|r| r.skipped).sum::<u64>(),
        sum(|r| r.plain.len()),
        reports.iter().filter(|r| !r.plain.is_empty()).count(),
        reports.len(),
    );
    let (values, resurrected, lost) = model::by_kind(reports.iter().flat_map(|r| &r.plain));
    println!(
        "plain mode's stale keys and members: {values} older values, {resurrected} resurrected after a delete, {lost} lost to an older delete"
    );
    assert!(
        failed.is_empty(),
        "the versioned cache diverged from the model (reproduce with KEEPWARM_SEED=<seed>):\n{}",
        failed.iter().map(|r| r.explain()).collect::<String>()
    );
    // The harness can fail: the same deliveries leave the plain cache stale.
    if seeds.len() >= 4 {
        assert!(
            reports.iter().any(|r| !r.plain.is_empty()),
            "plain mode matched the model on every seed: the faults did not bite"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memcached_the_versioned_cache_never_holds_a_stale_value_and_plain_does() {
    on_memcached(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memcached_without_redis_the_versioned_cache_never_holds_a_stale_value() {
    on_memcached(true).await;
}

/// The seeds on Memcached (`without_redis`: no `[redis]` in the consumers' configs).
async fn on_memcached(without_redis: bool) {
    let mut memcached = crate::memcached::MemcachedServer::start().await;
    let mut setup = Setup::with_cache(Some(memcached.address()));
    setup.without_redis = without_redis;
    let mut redis = RedisServer::start().await;
    let seeds = seeds();
    let started = Instant::now();
    let mut reports = Vec::new();
    for &seed in &seeds {
        let report = run_seed(seed, &mut redis, false, Some(&mut memcached), &setup).await;
        println!("{} | memcached: {} misses", report.line(), report.misses);
        reports.push(report);
    }
    let failed: Vec<&SeedReport> = reports.iter().filter(|r| !r.versioned.is_empty()).collect();
    let (values, resurrected, lost) = model::by_kind(reports.iter().flat_map(|r| &r.plain));
    println!(
        "memcached{}, {} seeds in {:.1}s: versioned: {} seeds diverged, {} misses after restarts; plain: {} stale keys ({values} older values, {resurrected} resurrected, {lost} lost) over {} seeds",
        if without_redis { " without redis" } else { "" },
        reports.len(),
        started.elapsed().as_secs_f64(),
        failed.len(),
        reports.iter().map(|r| r.misses).sum::<usize>(),
        reports.iter().map(|r| r.plain.len()).sum::<usize>(),
        reports.iter().filter(|r| !r.plain.is_empty()).count(),
    );
    assert!(
        failed.is_empty(),
        "the versioned memcached cache diverged from the model (reproduce with KEEPWARM_SEED=<seed>):\n{}",
        failed.iter().map(|r| r.explain()).collect::<String>()
    );
    if seeds.len() >= 4 {
        assert!(
            reports.iter().any(|r| !r.plain.is_empty()),
            "plain mode matched the model on every seed: the faults did not bite"
        );
    }
}

/// Versioned against plain on one workload, in alternating rounds against a private Redis:
/// end-to-end messages per second (debug build, one daemon, shared machine) and the Redis CPU
/// time per message. `KEEPWARM_THROUGHPUT_MESSAGES` sets the workload size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_writes_cost_is_measured_against_plain_on_the_same_workload() {
    let setup = Setup::new();
    let server = RedisServer::start_volatile().await;
    let messages = std::env::var("KEEPWARM_THROUGHPUT_MESSAGES")
        .map_or(10_000, |n| n.parse().expect("KEEPWARM_THROUGHPUT_MESSAGES"));
    let work = model::generate(
        7,
        Size {
            messages,
            initial_rows: 200,
            emails: 600,
            teams: 8,
        },
    );
    let (mut plain, mut versioned) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        plain.push(throughput::measure(&server.url(), &work, "plain", &setup).await);
        versioned.push(throughput::measure(&server.url(), &work, "versioned", &setup).await);
    }
    let rates = |m: &[Measured]| m.iter().map(|m| m.rate).collect::<Vec<_>>();
    let cpu = |m: &[Measured]| median(m.iter().map(|m| m.redis_cpu_us).collect());
    let (plain_rate, versioned_rate) = (median(rates(&plain)), median(rates(&versioned)));
    println!(
        "throughput on {} messages (median of {} alternating rounds): plain {:.0}/s {:.0?}, versioned {:.0}/s {:.0?}, versioned/plain = {:.2}; redis cpu per message: plain {:.1} us, versioned {:.1} us, versioned/plain = {:.2}",
        work.messages.len(),
        plain.len(),
        plain_rate,
        rates(&plain),
        versioned_rate,
        rates(&versioned),
        versioned_rate / plain_rate,
        cpu(&plain),
        cpu(&versioned),
        cpu(&versioned) / cpu(&plain),
    );
}
