//! One seed's run: the two consumers, the deliveries and faults of its plan, and what the cache
//! holds afterwards.

use super::model::{self, Cache, Divergence, Entry, Stale, Workload};
use super::plan::{self, Plan, Step};
use super::process::{Process, free_address, stale_skipped};
use super::{GROUP, IN_PROCESS, PLAIN, PROCESS, SIZE, Setup, VERSIONED};
use crate::memcached::{Memcached, MemcachedServer};
use crate::util::*;
use redis::AsyncCommands as _;
use redis::streams::{StreamInfoGroupsReply, StreamPendingCountReply};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A stream entry id, comparable.
pub fn entry_id(text: &str) -> (u64, u64) {
    let (ms, seq) = text.split_once('-').unwrap();
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// `(last-delivered-id, pending)` of the group, `None` while Redis does not answer.
pub async fn group_state(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Option<((u64, u64), u64)> {
    let reply: StreamInfoGroupsReply = conn.xinfo_groups(stream).await.ok()?;
    let group = reply.groups.into_iter().find(|g| g.name == GROUP)?;
    Some((entry_id(&group.last_delivered_id), group.pending as u64))
}

/// Entries pending on `consumer` (0 while Redis does not answer).
pub async fn pending_on(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    consumer: &str,
) -> usize {
    let reply: redis::RedisResult<StreamPendingCountReply> = conn
        .xpending_consumer_count(stream, GROUP, "-", "+", 1000, consumer)
        .await;
    reply.map_or(0, |r| r.ids.len())
}

/// Waits until the group has read up to `last`, and with `settle` until nothing is pending.
pub async fn wait_group(url: &str, stream: &str, last: (u64, u64), settle: bool, seed: u64) {
    let conn = connect(url).await;
    let what = format!("seed {seed}: the group to read up to {last:?} (settle: {settle})");
    wait_for(&what, Duration::from_secs(120), || {
        let mut conn = conn.clone();
        async move {
            match group_state(&mut conn, stream).await {
                Some((read, pending)) => read >= last && (!settle || pending == 0),
                None => false,
            }
        }
    })
    .await;
}

/// Every key under `prefix`, as the model sees a cache.
pub async fn read_cache(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Cache {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .unwrap();
    let mut cache = Cache::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(conn)
            .await
            .unwrap();
        let entry = match kind.as_str() {
            "string" => Entry::Text(redis::cmd("GET").arg(&key).query_async(conn).await.unwrap()),
            "set" => Entry::Members(
                redis::cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(conn)
                    .await
                    .unwrap(),
            ),
            other => panic!("{key} is a {other}"),
        };
        cache.insert(key, entry);
    }
    cache
}

/// Every key under `prefix` the messages wrote, as Memcached holds it (it cannot list keys):
/// versioned values by the envelope, plain ones as they are.
async fn read_memcached(work: &Workload, address: &str, prefix: &str, versioned: bool) -> Cache {
    let mut mc = Memcached::open(address).await;
    let mut cache = Cache::new();
    for (key, _) in work.history(prefix).into_keys() {
        if cache.contains_key(&key) {
            continue;
        }
        let value = if versioned {
            mc.versioned(&key).await.value().map(str::to_owned)
        } else {
            mc.text(&key).await
        };
        if let Some(text) = value {
            cache.insert(key, Entry::Text(text));
        }
    }
    cache
}

/// The model's cache without sets (Memcached has none; the plugin leaves them out).
fn strings_only(mut cache: Cache) -> Cache {
    cache.retain(|_, entry| matches!(entry, Entry::Text(_)));
    cache
}

/// What one seed did and found.
pub struct SeedReport {
    pub seed: u64,
    pub cluster: bool,
    pub messages: usize,
    pub plan: Plan,
    /// Entries the killed process held when it was killed.
    pub pending_at_kills: Vec<usize>,
    /// Stale writes versioning skipped (at least; killed processes' counts are lost).
    pub skipped: u64,
    pub versioned: Vec<Divergence>,
    pub plain: Vec<Divergence>,
    /// On Memcached: keys of the versioned cache missing after the restart lost them.
    pub misses: usize,
    pub elapsed: Duration,
    pub work: Workload,
}

impl SeedReport {
    pub fn line(&self) -> String {
        let f = &self.plan.faults;
        format!(
            "seed {:>4} {:<10} {} messages ({} transactions, {} key moves, {} re-inserts, {} reads), {} deliveries: {} duplicates, {} redeliveries, {} kills (pending {:?}), {} redis restarts | versioned: {} divergences, {}+ stale writes skipped | plain: {} stale | {:.1}s",
            self.seed,
            if self.cluster {
                "cluster"
            } else {
                "standalone"
            },
            self.messages,
            self.work.transactions,
            self.work.key_moves,
            self.work.reinserts,
            self.work.reads(),
            self.plan.deliveries,
            f.duplicates,
            f.redeliveries,
            f.kills,
            self.pending_at_kills,
            f.redis_restarts,
            self.versioned.len(),
            self.skipped,
            self.plain.len(),
            self.elapsed.as_secs_f64()
        )
    }

    /// The divergences of the versioned cache with the messages that touched each key and
    /// where they were delivered.
    pub fn explain(&self) -> String {
        let history = self.work.history(VERSIONED);
        let mut delivered: Vec<Vec<usize>> = vec![Vec::new(); self.work.messages.len()];
        let mut position = 0;
        for step in &self.plan.steps {
            if let Step::Deliver { messages, .. } = step {
                for &n in messages {
                    delivered[n].push(position);
                    position += 1;
                }
            }
        }
        let mut out = format!("{}\n", self.line());
        for d in self.versioned.iter().take(10) {
            out += &format!("  {} {:?}: {}\n", d.key, d.member, d.what);
            for &n in history
                .get(&(d.key.clone(), d.member.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                out += &format!(
                    "    #{n} {} delivered at {:?}\n",
                    self.work.messages[n].describe(),
                    delivered[n]
                );
            }
        }
        out
    }
}

/// The consumer process, the connection, and where the plan has got to.
struct Run<'a> {
    seed: u64,
    server: &'a mut RedisServer,
    /// The cache when it is Memcached: its restart is the run's cache restart.
    memcached: Option<&'a mut MemcachedServer>,
    url: String,
    conn: redis::aio::MultiplexedConnection,
    stream: String,
    config: PathBuf,
    /// Where the process logs, one file per start.
    logs: PathBuf,
    starts: usize,
    process: Option<Process>,
    /// The id of the last entry added.
    last: (u64, u64),
    /// Kills waiting for the process to hold entries, with how long it then stays down.
    armed: Vec<usize>,
    /// Deliveries left before the killed process starts again.
    down_for: Option<usize>,
    pending_at_kills: Vec<usize>,
}

impl Run<'_> {
    fn start_process(&mut self) {
        self.starts += 1;
        let log = self.logs.join(format!("{}-{}.log", self.seed, self.starts));
        self.process = Some(Process::start(&self.config, &log));
    }

    async fn step(&mut self, step: &Step, work: &Workload) {
        match step {
            Step::Deliver { messages, settle } => {
                let lines: Vec<String> = messages
                    .iter()
                    .map(|&n| work.messages[n].line.clone())
                    .collect();
                let ids = xadd_sequin(&mut self.conn, &self.stream, &lines).await;
                self.last = entry_id(ids.last().unwrap());
                match self.down_for.as_mut() {
                    Some(0) => {
                        self.start_process();
                        self.down_for = None;
                    }
                    Some(left) => *left -= 1,
                    None if !self.armed.is_empty() => self.kill_if_holding().await,
                    None => {}
                }
                wait_group(&self.url, &self.stream, self.last, *settle, self.seed).await;
            }
            Step::KillConsumer { down_for } => self.armed.push(*down_for),
            Step::RestartRedis => match self.memcached.as_mut() {
                Some(memcached) => memcached.start_again().await,
                None => {
                    self.server.restart().await;
                    self.conn = connect(&self.url).await;
                }
            },
        }
    }

    /// Kills the process with SIGKILL the moment it holds entries; if it holds none by the time
    /// the group has read everything, the kill waits for the next delivery.
    async fn kill_if_holding(&mut self) {
        loop {
            if pending_on(&mut self.conn, &self.stream, PROCESS).await > 0 {
                break;
            }
            match group_state(&mut self.conn, &self.stream).await {
                Some((read, _)) if read >= self.last => return,
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        self.process.take().expect("the process runs").kill9();
        // What it left unacknowledged, for the other consumers to reclaim.
        let left = pending_on(&mut self.conn, &self.stream, PROCESS).await;
        self.pending_at_kills.push(left);
        self.down_for = Some(self.armed.remove(0));
    }

    /// Kills still waiting happen now, whatever the process holds, and the process runs again.
    async fn finish_faults(&mut self) {
        for _ in std::mem::take(&mut self.armed) {
            if let Some(process) = self.process.take() {
                process.kill9();
                let left = pending_on(&mut self.conn, &self.stream, PROCESS).await;
                self.pending_at_kills.push(left);
            }
            self.start_process();
        }
        if self.process.is_none() {
            self.start_process();
        }
    }
}

/// Runs `seed` against `server`: both consumers, every step of the plan, then the comparison.
pub async fn run_seed(
    seed: u64,
    server: &mut RedisServer,
    cluster: bool,
    mut memcached: Option<&mut MemcachedServer>,
    setup: &Setup,
) -> SeedReport {
    if let Some(memcached) = memcached.as_mut() {
        memcached.start_again().await;
    }
    let started = Instant::now();
    let url = server.url();
    let mut conn = connect(&url).await;
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let work = model::generate(seed, SIZE);
    work.check(VERSIONED);
    let plan = plan::plan(seed, &work.messages);
    let stream = format!("kwm:stream:{seed}");
    let admin_in_process = free_address();
    let config = setup.work.path().join(format!("{seed}.toml"));
    std::fs::write(&config, setup.config(&url, &stream, PROCESS, "127.0.0.1:0")).unwrap();
    let in_process = Daemon::start(
        keepwarm::config::Config::parse(&setup.config(
            &url,
            &stream,
            IN_PROCESS,
            &admin_in_process,
        ))
        .unwrap(),
    );
    let mut run = Run {
        seed,
        server,
        memcached,
        url: url.clone(),
        conn,
        stream,
        process: None,
        config,
        logs: setup.work.path().to_owned(),
        starts: 0,
        last: (0, 0),
        armed: Vec::new(),
        down_for: None,
        pending_at_kills: Vec::new(),
    };
    run.start_process();
    for step in &plan.steps {
        run.step(step, &work).await;
    }
    run.finish_faults().await;
    wait_group(&url, &run.stream, run.last, true, seed).await;
    let process = run.process.as_mut().unwrap();
    process.assert_running();
    let mut admin_process = None;
    wait_for(
        "the process's admin endpoint",
        Duration::from_secs(60),
        || {
            admin_process = process.admin_address();
            std::future::ready(admin_process.is_some())
        },
    )
    .await;
    // The killed processes took their counts with them: this is a lower bound.
    let skipped =
        stale_skipped(&admin_in_process).await + stale_skipped(&admin_process.unwrap()).await;
    in_process.stop().await;
    run.process.take().unwrap().stop();
    let mut conn = run.conn;
    let dead = if setup.without_redis {
        let letters = std::fs::read_to_string(setup.letter_file(&run.stream)).unwrap_or_default();
        letters.lines().count() as u64
    } else {
        redis::cmd("XLEN")
            .arg("kwm:dead")
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(
        dead,
        0,
        "seed {seed}: dead letters (logs: {}/{seed}-*.log)",
        run.logs.display()
    );
    let (versioned, plain, misses) = match run.memcached.as_ref() {
        None => (
            model::diff(
                &work.expected(VERSIONED),
                &read_cache(&mut conn, VERSIONED).await,
            ),
            model::diff(&work.expected(PLAIN), &read_cache(&mut conn, PLAIN).await),
            0,
        ),
        Some(memcached) => {
            let address = memcached.address();
            let got = read_memcached(&work, &address, VERSIONED, true).await;
            let mut versioned = model::diff(&strings_only(work.expected(VERSIONED)), &got);
            // A key the restart emptied is a miss, not a stale value.
            let before = versioned.len();
            versioned.retain(|d| d.kind != Stale::Lost || got.contains_key(&d.key));
            let misses = before - versioned.len();
            let got = read_memcached(&work, &address, PLAIN, false).await;
            let mut plain = model::diff(&strings_only(work.expected(PLAIN)), &got);
            plain.retain(|d| d.kind != Stale::Lost || got.contains_key(&d.key));
            (versioned, plain, misses)
        }
    };
    SeedReport {
        seed,
        cluster,
        messages: work.messages.len(),
        plan,
        pending_at_kills: run.pending_at_kills,
        skipped,
        versioned,
        plain,
        misses,
        elapsed: started.elapsed(),
        work,
    }
}
