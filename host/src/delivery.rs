//! What a source hands to the pipeline, and how the pipeline tells it a message is done.
//!
//! A leaf: it names nothing of keepwarm's but the message type. Sources build [`Delivery`]s
//! and give them to a [`Dispatch`] handle; the pipeline and the applier read them and settle
//! their [`AckToken`]s. Neither side names the other.
//!
//! A token carries the message's in-flight permit: the permit goes back to the budget when the
//! token is dropped, settled or not, so no source counts its budget by hand.

use crate::message::{ChangeMessage, DecodeError};
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedSemaphorePermit;

/// One message from a source, decoded or not, with its acknowledgement.
pub struct Delivery {
    /// The decoded message, or the raw payload and why it did not decode.
    pub payload: Payload,
    /// Where it came from.
    pub origin: Origin,
    /// Settled by the pipeline once the message is done.
    pub ack: AckToken,
    /// The only plugin that takes it (a replayed dead letter goes back to the plugin that
    /// failed on it, not to those that applied it then); `None`: every plugin subscribed.
    pub only: Option<Arc<str>>,
    /// Where the pipeline leaves the message once it is finished, for the source's own thread
    /// to free; `None`: it is freed where it finishes.
    pub home: Option<Arc<Graveyard>>,
}

/// Finished messages, left by the pipeline for the thread that decoded them to free.
///
/// A source that decodes on a thread of its own (Kafka's poll thread) allocates every part of
/// every message there, and the pipeline finishes messages on other threads. Freed where they
/// finish, each part went back to the decoding thread through the allocator's cross-thread
/// free list, and the decoding thread's next allocations found those blocks in another core's
/// cache: the allocator and the copies into fresh blocks were about a fifth of keepwarm-kafka's
/// CPU (docs/bench.md, "Round 16"). Left here, they are freed by the thread that allocated
/// them, which reuses the blocks while they are still in its cache.
///
/// A message is settled (acknowledged, its permit returned) before it is left here: what waits
/// here is memory only, so the source clears it every time it polls. Once closed, a graveyard
/// frees what is left on it at once.
#[derive(Default)]
pub struct Graveyard(Mutex<Yard>);

#[derive(Default)]
struct Yard {
    dead: Vec<Arc<dyn Send + Sync>>,
    closed: bool,
}

impl Graveyard {
    fn yard(&self) -> std::sync::MutexGuard<'_, Yard> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leaves finished messages to be freed by [`Graveyard::clear`] (at once when closed).
    pub fn bury(&self, dead: impl IntoIterator<Item = Arc<dyn Send + Sync>>) {
        let mut yard = self.yard();
        if yard.closed {
            drop(yard);
            dead.into_iter().for_each(drop);
        } else {
            yard.dead.extend(dead);
        }
    }

    /// Frees, on the calling thread, what was left; returns how many were left.
    pub fn clear(&self) -> usize {
        let dead = std::mem::take(&mut self.yard().dead);
        dead.len()
    }

    /// Frees what was left, and from now on whatever is left, at once: the source has stopped
    /// and will not clear it again.
    pub fn close(&self) {
        let dead = {
            let mut yard = self.yard();
            yard.closed = true;
            std::mem::take(&mut yard.dead)
        };
        drop(dead);
    }
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
        reason: DecodeError,
    },
}

/// A payload as received, kept byte for byte for its dead letter.
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
    /// The message's id in that source (stream entry id, SQS message id, line number,
    /// topic/partition/offset).
    pub id: String,
}

/// How a message ended, as far as its source is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Applied, or safely dead-lettered: acknowledge it to the queue.
    Done,
    /// Not done (shutdown while the cache was down, a lane that ended): leave it for
    /// redelivery.
    Abandoned,
}

/// How a source learns that a message is settled.
pub trait Settle: Send + Sync + 'static {
    /// Called exactly once per message.
    fn settle(&self, id: &str, settled: Settled);

    /// Instead of [`Settle::settle`]: no plugin subscribes to the message, so there was nothing
    /// to apply. A queue acknowledges it as done; a source that must tell "applied" from
    /// "nothing took it" (a dead-letter replay, which deletes what it applied) overrides this.
    fn unrouted(&self, id: &str) {
        self.settle(id, Settled::Done);
    }

    /// [`Settle::settle`] as done for several messages at once, in order: the messages of one
    /// lane's batch that the lane finished. A source that takes a lock for each settlement
    /// overrides this to take it once.
    fn settle_done(&self, ids: &mut dyn Iterator<Item = &str>) {
        for id in ids {
            self.settle(id, Settled::Done);
        }
    }
}

/// The acknowledgement of one message. Settling it as done, or dropping it (abandoned), tells
/// the source; dropping it also returns its in-flight permit.
pub struct AckToken {
    settle: Arc<dyn Settle>,
    id: String,
    /// Returned to the in-flight budget when the token goes.
    _permit: Option<OwnedSemaphorePermit>,
    settled: bool,
}

impl AckToken {
    /// A token that reports to `settle` under `id`, holding `permit` until it goes.
    pub fn new(
        settle: Arc<dyn Settle>,
        id: String,
        permit: Option<OwnedSemaphorePermit>,
    ) -> AckToken {
        AckToken {
            settle,
            id,
            _permit: permit,
            settled: false,
        }
    }

    /// Marks the message done: applied, or safely dead-lettered.
    pub fn ack(mut self) {
        self.settled = true;
        self.settle.settle(&self.id, Settled::Done);
    }

    /// Marks the message done with nothing to apply: no plugin subscribes to it.
    pub fn ack_unrouted(mut self) {
        self.settled = true;
        self.settle.unrouted(&self.id);
    }

    /// [`AckToken::ack`] for several tokens, in order: each run of tokens of one source goes to
    /// it in one [`Settle::settle_done`] call. Their permits return when they are dropped, here.
    pub fn ack_all(mut tokens: Vec<AckToken>) {
        let mut rest = tokens.as_mut_slice();
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take_while(|t| Arc::ptr_eq(&t.settle, &first.settle))
                .count();
            let (same, others) = rest.split_at_mut(run);
            same[0]
                .settle
                .settle_done(&mut same.iter().map(|t| t.id.as_str()));
            for token in same {
                token.settled = true;
            }
            rest = others;
        }
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.settled {
            self.settle.settle(&self.id, Settled::Abandoned);
        }
    }
}

/// Where sources hand their deliveries: the pipeline's dispatcher, seen from below.
pub trait Dispatch: Send + Sync + 'static {
    /// Takes one delivery; its token is settled later (or dropped, on shutdown).
    fn dispatch(&self, delivery: Delivery);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its drops.
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn counted(n: usize, drops: &Arc<std::sync::atomic::AtomicUsize>) -> Vec<Arc<dyn Send + Sync>> {
        (0..n)
            .map(|_| Arc::new(Counted(Arc::clone(drops))) as Arc<dyn Send + Sync>)
            .collect()
    }

    /// Records each call it gets: `settle` one id at a time, `settle_done` a run.
    #[derive(Default)]
    struct Calls(Mutex<Vec<(Settled, Vec<String>)>>);

    impl Settle for Calls {
        fn settle(&self, id: &str, settled: Settled) {
            self.0.lock().unwrap().push((settled, vec![id.to_owned()]));
        }

        fn settle_done(&self, ids: &mut dyn Iterator<Item = &str>) {
            let ids = ids.map(str::to_owned).collect();
            self.0.lock().unwrap().push((Settled::Done, ids));
        }
    }

    impl Calls {
        fn taken(&self) -> Vec<(Settled, Vec<String>)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    #[test]
    fn tokens_acknowledged_together_reach_each_source_in_runs_in_order_and_return_permits() {
        let (one, two) = (Arc::new(Calls::default()), Arc::new(Calls::default()));
        let budget = Arc::new(tokio::sync::Semaphore::new(5));
        let token = |settle: &Arc<Calls>, id: &str| {
            let permit = Arc::clone(&budget).try_acquire_owned().unwrap();
            AckToken::new(settle.clone(), id.to_owned(), Some(permit))
        };
        let tokens = vec![
            token(&one, "a"),
            token(&one, "b"),
            token(&two, "c"),
            token(&one, "d"),
            token(&one, "e"),
        ];
        assert_eq!(budget.available_permits(), 0);
        AckToken::ack_all(tokens);
        let ids = |ids: &[&str]| (Settled::Done, ids.iter().map(|i| i.to_string()).collect());
        assert_eq!(one.taken(), [ids(&["a", "b"]), ids(&["d", "e"])]);
        assert_eq!(two.taken(), [ids(&["c"])]);
        assert_eq!(budget.available_permits(), 5);
        // None was dropped unsettled (which would report it abandoned).
        AckToken::ack_all(Vec::new());
        drop(token(&one, "f"));
        assert_eq!(one.taken(), [(Settled::Abandoned, vec!["f".to_owned()])]);
    }

    #[test]
    fn what_is_buried_is_freed_by_clear_and_after_close_at_once() {
        let drops = Arc::default();
        let graveyard = Graveyard::default();
        graveyard.bury(counted(3, &drops));
        graveyard.bury(counted(2, &drops));
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(graveyard.clear(), 5);
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert_eq!(graveyard.clear(), 0);

        graveyard.bury(counted(1, &drops));
        graveyard.close();
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 6);
        graveyard.bury(counted(4, &drops));
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 10);
        assert_eq!(graveyard.clear(), 0);
    }
}
