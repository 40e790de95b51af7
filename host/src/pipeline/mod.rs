//! The pipeline: lanes per plugin and row, batched plugin calls, one Redis pipeline per batch,
//! then acks.
//!
//! Each plugin has its own group of lanes. The [`Dispatcher`] hands a message to one lane of
//! every plugin subscribed to it, picked by hashing `(schema, table, record_pks)`: for each
//! plugin, changes to one row share a lane and are applied in the order received, while rows
//! (and plugins) proceed in parallel. A slow, looping or paused plugin therefore holds back only
//! its own lanes. A message is acknowledged once every plugin's part of it is done ([`Job`]).
//!
//! Lane queues are unbounded, but the number of messages in flight is bounded by the sources'
//! in-flight permits (`pipeline.max_in_flight`): when a lane is stuck (Redis down, plugin
//! paused) the permits run out and the sources stop reading. Nothing is dropped.
//!
//! - [`lane`]: one lane's loop: batch, call the plugin, check limits, apply, retry, finish.
//! - [`job`]: a message shared by the lanes of its plugins, acknowledged when all are done.

mod job;
mod lane;

use crate::applier::Applier;
use crate::config::PipelineConfig;
use crate::delivery::{Delivery, Dispatch, Payload};
use crate::runtime::PluginSet;
use crate::runtime::status::StatusBoard;
use crate::telemetry::{self, Counters};
use arc_swap::ArcSwap;
use job::Job;
use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hash as _};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every lane shares.
pub struct Shared {
    /// The plugins serving traffic; swapped atomically on reload.
    pub plugins: Arc<ArcSwap<PluginSet>>,
    /// The only writer to the cache.
    pub applier: Arc<Applier>,
    /// Plugin status, where pauses are shown.
    pub registry: Arc<StatusBoard>,
    /// What the lanes count, and the metrics behind `/metrics`.
    pub counters: Arc<Counters>,
    /// Batch size, lanes per plugin, retry backoff.
    pub config: PipelineConfig,
    /// Prefix of keepwarm's version keys, which plugins may not write.
    pub reserved_prefix: String,
    /// The dead-letter stream, which plugins may not write.
    pub dead_letter_stream: String,
    /// Cancelled at shutdown: a lane then gives up waiting (Redis down, plugin paused), leaving
    /// its messages unacknowledged for redelivery.
    pub shutdown: CancellationToken,
}

type Lanes = Arc<[mpsc::UnboundedSender<Arc<Job>>]>;

struct Inner {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    /// Lane groups by plugin name, created when a plugin is first routed to.
    groups: Mutex<HashMap<String, Lanes, RowHasher>>,
    /// Lanes for messages that did not decode (they only need a dead letter).
    malformed: Lanes,
    hasher: RowHasher,
}

/// Picks lanes by row and finds plugins' lanes by name, once or twice per message. SipHash was
/// 1,100 instructions per message; a row that chooses its own lane gains nothing (any row can
/// share a lane with others: there are only a few), and the seed is still random per process.
type RowHasher = foldhash::fast::RandomState;

/// Hands deliveries to lanes. Cheap to clone; the lanes end once every clone is dropped and
/// their queues are drained.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl Dispatch for Dispatcher {
    /// Sends a delivery to the lane of its row in every plugin subscribed to it (or in the one
    /// it names); a message no plugin wants is acknowledged at once.
    fn dispatch(&self, delivery: Delivery) {
        let inner = &self.inner;
        let metrics = &inner.shared.counters.metrics;
        // `messages_received` is counted by the source's context (one lookup per source).
        Counters::add(&inner.shared.counters.received, 1);
        let mut hasher = inner.hasher.build_hasher();
        let message = match &delivery.payload {
            Payload::Decoded(message) => message,
            Payload::Malformed { .. } => {
                delivery.origin.id.hash(&mut hasher);
                let lane = pick(&hasher, inner.malformed.len());
                let _ = inner.malformed[lane].send(Job::new(delivery, 1));
                return;
            }
        };
        message.schema().hash(&mut hasher);
        message.table().hash(&mut hasher);
        for pk in message.pks() {
            pk.hash(&mut hasher);
        }
        let plugins = inner.shared.plugins.load();
        // The lanes are picked while the message is borrowed: no plugin name is copied per
        // message.
        let targets: Vec<(Lanes, usize)> = plugins
            .routes(message)
            .filter(|p| delivery.only.as_deref().is_none_or(|only| p.name() == only))
            .map(|p| {
                let lanes = self.lanes_of(p.name());
                let lane = pick(&hasher, lanes.len());
                (lanes, lane)
            })
            .collect();
        if targets.is_empty() {
            Counters::add(&inner.shared.counters.unrouted, 1);
            metrics
                .unrouted
                .get_or_create(&telemetry::source(&delivery.origin.source))
                .inc();
            delivery.ack.ack_unrouted();
            return;
        }
        let job = Job::new(delivery, targets.len());
        for (lanes, lane) in targets {
            // A send fails only when the lane has ended (shutdown); the job is then dropped
            // unfinished and its message stays unacknowledged for redelivery.
            let _ = lanes[lane].send(Arc::clone(&job));
        }
    }
}

impl Dispatcher {
    fn lanes_of(&self, plugin: &str) -> Lanes {
        let inner = &self.inner;
        let mut groups = inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lanes) = groups.get(plugin) {
            return Arc::clone(lanes);
        }
        let lanes = spawn_lanes(&inner.shared, &inner.tracker, Some(plugin));
        groups.insert(plugin.to_owned(), Arc::clone(&lanes));
        lanes
    }
}

fn pick(hasher: &impl std::hash::Hasher, lanes: usize) -> usize {
    (hasher.finish() % lanes as u64) as usize
}

fn spawn_lanes(shared: &Arc<Shared>, tracker: &TaskTracker, plugin: Option<&str>) -> Lanes {
    let count = if plugin.is_some() {
        shared.config.lanes
    } else {
        1
    };
    let mut senders = Vec::with_capacity(count);
    for index in 0..count {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        let name = plugin.map(str::to_owned);
        tracker.spawn(lane::run(name, index, rx, Arc::clone(shared)));
    }
    senders.into()
}

/// Starts the pipeline on `tracker` and returns the dispatcher that feeds it.
pub fn start(shared: Shared, tracker: &TaskTracker) -> Dispatcher {
    let shared = Arc::new(shared);
    let malformed = spawn_lanes(&shared, tracker, None);
    Dispatcher {
        inner: Arc::new(Inner {
            shared,
            tracker: tracker.clone(),
            groups: Mutex::new(HashMap::default()),
            malformed,
            hasher: RowHasher::default(),
        }),
    }
}
