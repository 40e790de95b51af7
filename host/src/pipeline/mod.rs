//! The pipeline: lanes by row, batched plugin calls, one Redis pipeline per batch, then acks.
//!
//! Sources hand deliveries to a [`Dispatcher`], which picks a lane by hashing
//! `(schema, table, record_pks)`: changes to one row always share a lane and are applied in the
//! order received, while different rows proceed in parallel. Lane queues are unbounded, but the
//! number of messages in flight is bounded by the sources' slots (`pipeline.max_in_flight`), so a
//! lane stuck on Redis holds back only what it already holds until the slots run out, and then
//! the sources stop reading. Nothing is dropped.
//!
//! - [`lane`]: one lane's loop: batch, call plugins, check limits, apply, retry, ack.

pub mod lane;

use crate::applier::Applier;
use crate::config::PipelineConfig;
use crate::runtime::PluginSet;
use crate::sources::{Delivery, Payload};
use crate::telemetry::Counters;
use arc_swap::ArcSwap;
use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every lane shares.
pub struct Shared {
    /// The plugins serving traffic; swapped atomically on reload.
    pub plugins: Arc<ArcSwap<PluginSet>>,
    /// The cache writer.
    pub applier: Arc<Applier>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Lane settings.
    pub config: PipelineConfig,
    /// Prefix of keepwarm's version keys, which plugins may not write.
    pub reserved_prefix: String,
    /// The dead-letter stream, which plugins may not write.
    pub dead_letter_stream: String,
    /// Cancelled at shutdown: a lane then gives up retrying a batch Redis refuses, leaving its
    /// messages unacknowledged for redelivery.
    pub shutdown: CancellationToken,
}

/// Hands deliveries to lanes. Cheap to clone; the lanes end once every clone is dropped and
/// their queues are drained.
#[derive(Clone)]
pub struct Dispatcher {
    lanes: Arc<[mpsc::UnboundedSender<Delivery>]>,
    hasher: std::hash::RandomState,
    counters: Arc<Counters>,
}

impl Dispatcher {
    /// Sends a delivery to the lane of its row.
    pub fn dispatch(&self, delivery: Delivery) {
        let mut hasher = self.hasher.build_hasher();
        match &delivery.payload {
            Payload::Decoded(message) => {
                message.schema.hash(&mut hasher);
                message.table.hash(&mut hasher);
                message.pks.hash(&mut hasher);
            }
            Payload::Malformed { .. } => delivery.origin.id.hash(&mut hasher),
        }
        let lane = (hasher.finish() % self.lanes.len() as u64) as usize;
        Counters::add(&self.counters.received, 1);
        // A send fails only when the lane has ended (shutdown); the delivery's token is then
        // dropped unsettled and the source leaves the message for redelivery.
        let _ = self.lanes[lane].send(delivery);
    }
}

/// Starts the lanes on `tracker` and returns the dispatcher that feeds them.
pub fn start(shared: Shared, tracker: &TaskTracker) -> Dispatcher {
    let shared = Arc::new(shared);
    let mut senders = Vec::with_capacity(shared.config.lanes);
    for index in 0..shared.config.lanes {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        tracker.spawn(lane::run(index, rx, Arc::clone(&shared)));
    }
    Dispatcher {
        lanes: senders.into(),
        hasher: std::hash::RandomState::new(),
        counters: Arc::clone(&shared.counters),
    }
}
