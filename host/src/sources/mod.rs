//! Sources: where change messages come from, and how each one is acknowledged.
//!
//! A source reads from its queue, decodes each message into a [`Delivery`] and hands it to the
//! pipeline through its [`SourceContext`]. Every delivery carries an [`AckToken`]; the pipeline
//! settles the token only once Redis has confirmed the message's operations (or its dead-letter
//! entry), and the source then acknowledges to its queue. A token dropped unsettled (shutdown,
//! crash of a lane) means "not done": the source leaves the message for redelivery.
//!
//! Sources never write to the cache; only the applier does. Only sources talk to queues.
//!
//! - [`redis_streams`]: Sequin's Redis Stream sink, through a consumer group.
//! - [`sqs`]: Sequin's SQS sink (FIFO or standard queues); deletes after apply.
//! - [`webhook`]: Sequin's webhook sink (HTTP push); replies 200 after apply.
//! - [`dead_letters`]: the dead-letter stream, listed and replayed.
//! - [`jsonl`]: a file (or stdin) of change messages, one JSON object per line.

pub mod dead_letters;
pub mod jsonl;
pub mod redis_streams;
pub mod sqs;
pub mod webhook;

use crate::message::ChangeMessage;
use crate::pipeline::Dispatcher;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

/// One message from a source, decoded or not, with its acknowledgement.
pub struct Delivery {
    /// The decoded message, or the raw payload and why it did not decode.
    pub payload: Payload,
    /// Where it came from.
    pub origin: Origin,
    /// Settled by the pipeline once the message is done.
    pub ack: AckToken,
}

/// What a source read.
pub enum Payload {
    /// A change message.
    Decoded(ChangeMessage),
    /// Something that is not a change message; it goes to the dead-letter stream.
    Malformed {
        /// The bytes as received.
        raw: RawPayload,
        /// Why it was rejected.
        reason: String,
    },
}

/// A payload as received, kept for dead letters.
#[derive(Clone, Debug)]
pub enum RawPayload {
    /// A JSON document (or what was meant to be one).
    Body(Vec<u8>),
    /// The fields of a stream entry.
    StreamFields(Vec<(String, Vec<u8>)>),
}

/// Where a message came from.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The source's name, e.g. `redis-stream:orders`.
    pub source: Arc<str>,
    /// The message's id in that source (stream entry id, SQS message id, line number).
    pub id: String,
}

/// How a source learns that a message is done.
pub trait Acker: Send + Sync + 'static {
    /// Called exactly once per message: `done` is true when the message was applied or
    /// dead-lettered, false when it was abandoned and must be redelivered.
    fn settle(&self, id: &str, done: bool);
}

/// The acknowledgement of one message. Settling it releases the message's in-flight slot.
pub struct AckToken {
    acker: Arc<dyn Acker>,
    id: String,
    slots: Option<Arc<Semaphore>>,
    settled: bool,
}

impl AckToken {
    /// A token that reports to `acker` under `id`.
    pub fn new(acker: Arc<dyn Acker>, id: String) -> AckToken {
        AckToken {
            acker,
            id,
            slots: None,
            settled: false,
        }
    }

    /// Marks the message done: applied, or safely dead-lettered.
    pub fn ack(mut self) {
        self.settled = true;
        self.acker.settle(&self.id, true);
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.settled {
            self.acker.settle(&self.id, false);
        }
        if let Some(slots) = &self.slots {
            slots.add_permits(1);
        }
    }
}

/// What a running source is given: the way into the pipeline, flow control and shutdown.
#[derive(Clone)]
pub struct SourceContext {
    /// The source's name for logs and dead letters.
    pub name: Arc<str>,
    /// Hands deliveries to the pipeline's lanes.
    pub dispatcher: Dispatcher,
    /// Cancelled when the daemon shuts down: stop reading, let in-flight work finish.
    pub shutdown: CancellationToken,
    slots: Arc<Semaphore>,
    /// This source's `messages_received` counter, looked up once rather than per message.
    received: Counter,
}

impl SourceContext {
    /// A context for the source `name`.
    pub fn new(
        name: impl Into<Arc<str>>,
        dispatcher: Dispatcher,
        shutdown: CancellationToken,
        slots: Arc<Semaphore>,
    ) -> SourceContext {
        let name = name.into();
        let received = dispatcher
            .counters()
            .metrics
            .received
            .get_or_create(&crate::telemetry::source(&name))
            .clone();
        SourceContext {
            name,
            dispatcher,
            shutdown,
            slots,
            received,
        }
    }

    /// Waits until at least one more message may be in flight, then reserves as many slots as
    /// are free, up to `n`, and returns how many it reserved (at least 1). Returns `None` on
    /// shutdown. Reserved slots are handed to tokens with [`SourceContext::deliver`]; slots not
    /// used must be given back with [`SourceContext::release`].
    ///
    /// Waiting for all `n` at once would stall a source while part of its budget is stuck in
    /// flight (say, behind a Redis outage): messages would wait in the queue though slots are
    /// free.
    pub async fn reserve(&self, n: usize) -> Option<usize> {
        let n = n.clamp(1, u32::MAX as usize) as u32;
        tokio::select! {
            permit = self.slots.acquire() => permit.ok()?.forget(),
            () = self.shutdown.cancelled() => return None,
        }
        let mut reserved = 1;
        while reserved < n {
            let free = (self.slots.available_permits() as u32).min(n - reserved);
            if free == 0 {
                break;
            }
            match self.slots.try_acquire_many(free) {
                Ok(permit) => {
                    permit.forget();
                    reserved += free;
                }
                // Another source took some meanwhile: look again.
                Err(TryAcquireError::NoPermits) => {}
                Err(TryAcquireError::Closed) => break,
            }
        }
        Some(reserved as usize)
    }

    /// Gives back `n` reserved slots that were not used.
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.slots.add_permits(n);
        }
    }

    /// Hands one message to the pipeline, using one reserved slot.
    pub fn deliver(&self, payload: Payload, id: String, acker: &Arc<dyn Acker>) {
        let mut ack = AckToken::new(Arc::clone(acker), id.clone());
        ack.slots = Some(Arc::clone(&self.slots));
        let origin = Origin {
            source: Arc::clone(&self.name),
            id,
        };
        self.received.inc();
        self.dispatcher.dispatch(Delivery {
            payload,
            origin,
            ack,
        });
    }
}

/// An acker that counts settled messages, for a source that waits until everything it handed
/// over is settled (a webhook request, a JSONL file).
#[derive(Default)]
pub(crate) struct Tally {
    done: AtomicU64,
    abandoned: AtomicU64,
    /// Notified at every settlement.
    pub(crate) changed: Notify,
}

impl Tally {
    /// Messages settled as done.
    pub(crate) fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Messages abandoned (left for redelivery).
    pub(crate) fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Messages settled either way.
    pub(crate) fn settled(&self) -> u64 {
        self.done() + self.abandoned()
    }
}

impl Acker for Tally {
    fn settle(&self, _id: &str, done: bool) {
        let counter = if done { &self.done } else { &self.abandoned };
        counter.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }
}

/// Capped exponential backoff (100 ms doubling to 5 s) that gives up on shutdown.
pub(crate) struct Backoff {
    delay: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            delay: Duration::from_millis(100),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.delay = Duration::from_millis(100);
    }

    /// Sleeps; returns false if shutdown came first.
    pub(crate) async fn wait(&mut self, ctx: &SourceContext) -> bool {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = ctx.shutdown.cancelled() => false,
        }
    }
}
