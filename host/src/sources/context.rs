//! What every source is given: the way into the pipeline, the in-flight budget, the one
//! decode, backoff, metrics and shutdown. A new source uses these and re-writes none of them.

use crate::backoff::Backoff;
use crate::delivery::{
    AckToken, Delivery, Dispatch, Graveyard, Origin, Payload, RawPayload, Settle,
};
use crate::message::{ChangeMessage, DecodeError, StreamFields};
use crate::telemetry::{self, Counters, Metrics, SourceLabel};
use prometheus_client::metrics::counter::Counter;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

/// A running source's context. Cheap to clone.
#[derive(Clone)]
pub struct SourceContext {
    /// The source's name for logs, metrics and dead letters.
    pub name: Arc<str>,
    /// Cancelled when the daemon shuts down: stop reading, let in-flight work finish.
    pub shutdown: CancellationToken,
    dispatch: Arc<dyn Dispatch>,
    counters: Arc<Counters>,
    permits: Arc<Semaphore>,
    max_message_bytes: usize,
    labels: SourceLabel,
    /// This source's `messages_received` counter, looked up once rather than per message.
    received: Counter,
    /// What [`SourceContext::set_up`] last recorded (`None`: nothing yet), so that a source
    /// that says "up" with every message (Kafka, NATS) records only the changes.
    up: Arc<Mutex<Option<bool>>>,
    /// Where finished messages wait for this source's thread to free them, when it asked to
    /// ([`SourceContext::free_at_home`]).
    home: Option<Arc<Graveyard>>,
}

/// In-flight permits reserved by [`SourceContext::reserve`]; those not taken go back to the
/// budget when this is dropped.
pub struct Permits(OwnedSemaphorePermit);

impl Permits {
    /// How many are left.
    pub fn len(&self) -> usize {
        self.0.num_permits()
    }

    /// Whether none are left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One permit, to deliver one message with.
    pub fn take(&mut self) -> Option<OwnedSemaphorePermit> {
        if self.is_empty() {
            return None;
        }
        self.0.split(1)
    }
}

impl SourceContext {
    /// A context for the source `name`, drawing on the shared in-flight budget `permits`.
    pub fn new(
        name: impl Into<Arc<str>>,
        dispatch: Arc<dyn Dispatch>,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
        permits: Arc<Semaphore>,
        max_message_bytes: usize,
    ) -> SourceContext {
        let name = name.into();
        let labels = telemetry::source(&name);
        let received = counters.metrics.received.get_or_create(&labels).clone();
        SourceContext {
            name,
            shutdown,
            dispatch,
            counters,
            permits,
            max_message_bytes,
            labels,
            received,
            up: Arc::default(),
            home: None,
        }
    }

    /// Has the messages this context delivers from now on freed by the source's own thread:
    /// once finished, each is left in the returned [`Graveyard`], which the source clears
    /// whenever it polls and closes when it stops. For a source that decodes on one thread of
    /// its own, where the messages' memory is allocated.
    pub fn free_at_home(&mut self) -> Arc<Graveyard> {
        Arc::clone(self.home.get_or_insert_with(Arc::default))
    }

    /// Waits until at least one more message may be in flight, then reserves as many permits
    /// as are free, up to `n` (at least 1). `None` on shutdown.
    ///
    /// Waiting for all `n` at once would stall a source while part of the budget is stuck in
    /// flight (say, behind a cache outage): messages would wait in the queue though permits
    /// are free.
    pub async fn reserve(&self, n: usize) -> Option<Permits> {
        let n = n.clamp(1, Semaphore::MAX_PERMITS);
        let mut permits = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return None,
            permit = Arc::clone(&self.permits).acquire_owned() => permit.ok()?,
        };
        while permits.num_permits() < n {
            let free = self
                .permits
                .available_permits()
                .min(n - permits.num_permits());
            if free == 0 {
                break;
            }
            match Arc::clone(&self.permits).try_acquire_many_owned(free as u32) {
                Ok(more) => permits.merge(more),
                // Another source took some meanwhile: look again.
                Err(TryAcquireError::NoPermits) => {}
                Err(TryAcquireError::Closed) => break,
            }
        }
        Some(Permits(permits))
    }

    /// Hands one message to the pipeline; `permit` travels in its token and returns to the
    /// budget when the token goes.
    pub fn deliver(
        &self,
        permit: OwnedSemaphorePermit,
        payload: Payload,
        id: String,
        settle: &Arc<dyn Settle>,
    ) {
        self.deliver_to(permit, payload, id, settle, None);
    }

    /// [`SourceContext::deliver`] to the plugin named `only` alone, when given.
    pub fn deliver_to(
        &self,
        permit: OwnedSemaphorePermit,
        payload: Payload,
        id: String,
        settle: &Arc<dyn Settle>,
        only: Option<Arc<str>>,
    ) {
        let ack = AckToken::new(Arc::clone(settle), id.clone(), Some(permit));
        let origin = Origin {
            source: Arc::clone(&self.name),
            id,
        };
        self.received.inc();
        self.dispatch.dispatch(Delivery {
            payload,
            origin,
            ack,
            only,
            home: self.home.clone(),
        });
    }

    /// The largest message taken (`pipeline.max_message_bytes`).
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Decodes a JSON message body (SQS, HTTP, Kafka, NATS, AMQP, a JSONL line, a dead
    /// letter): the size limit, UTF-8, then the Sequin message. The body is borrowed: a decoded
    /// message copies only its parts (a source holding librdkafka's or the network's buffer
    /// copies nothing first), and a rejected body is copied whole for its dead letter.
    pub fn decode_json(&self, body: &[u8]) -> Payload {
        decode_json(body, self.max_message_bytes)
    }

    /// Decodes the fields of a Sequin Redis Stream entry, by value (no copy of the texts).
    pub fn decode_stream_entry(&self, fields: StreamFields) -> Payload {
        decode_stream_entry(fields, self.max_message_bytes)
    }

    /// Records whether the source reaches its queue (`keepwarm_source_up`, `/readyz`). Cheap
    /// when nothing changed: a source may call it for every message.
    pub fn set_up(&self, up: bool) {
        // Held while recording, so that two tasks of a source cannot record out of order.
        let mut last = self.up.lock().unwrap_or_else(|p| p.into_inner());
        if *last != Some(up) {
            self.counters.source_up(&self.name, up);
            *last = Some(up);
        }
    }

    /// The Prometheus metrics, for a source's own gauges.
    pub fn metrics(&self) -> &Metrics {
        &self.counters.metrics
    }

    /// This source's label set.
    pub fn labels(&self) -> &SourceLabel {
        &self.labels
    }

    /// A backoff with the sources' defaults (100 ms doubling to 5 s).
    pub fn backoff(&self) -> Backoff {
        Backoff::default()
    }

    /// Sleeps for `backoff`'s next delay; false when shutdown came first.
    pub async fn wait(&self, backoff: &mut Backoff) -> bool {
        backoff.wait(&self.shutdown).await
    }
}

/// A periodic tick for a source's gauges (queue depth, lag), ended by shutdown.
pub struct Sampler(tokio::time::Interval);

impl Sampler {
    /// Ticks every `period`, the first at once; late ticks are delayed, not bunched.
    pub fn every(period: std::time::Duration) -> Sampler {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Sampler(interval)
    }

    /// Waits for the next tick; false, at once, when `ctx` is shutting down.
    pub async fn tick(&mut self, ctx: &SourceContext) -> bool {
        tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => false,
            _ = self.0.tick() => true,
        }
    }
}

/// See [`SourceContext::decode_json`].
pub(crate) fn decode_json(body: &[u8], max_bytes: usize) -> Payload {
    let decoded = if body.len() > max_bytes {
        Err(DecodeError::TooLarge {
            size: body.len(),
            limit: max_bytes,
        })
    } else {
        crate::message::utf8(body)
            .map_err(|error| DecodeError::NotUtf8 {
                part: "message".to_owned(),
                error,
            })
            .and_then(ChangeMessage::from_json)
    };
    match decoded {
        Ok(message) => Payload::Decoded(message),
        Err(reason) => Payload::Malformed {
            raw: RawPayload::Body(body.to_vec()),
            reason,
        },
    }
}

/// See [`SourceContext::decode_stream_entry`].
pub(crate) fn decode_stream_entry(fields: StreamFields, max_bytes: usize) -> Payload {
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > max_bytes {
        return Payload::Malformed {
            raw: RawPayload::StreamFields(fields),
            reason: DecodeError::TooLarge {
                size,
                limit: max_bytes,
            },
        };
    }
    match ChangeMessage::from_stream_entry(fields) {
        Ok(message) => Payload::Decoded(message),
        Err((reason, fields)) => Payload::Malformed {
            raw: RawPayload::StreamFields(fields),
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(body: &[u8], max: usize) -> String {
        match decode_json(body, max) {
            Payload::Malformed { reason, .. } => reason.to_string(),
            Payload::Decoded(message) => panic!("decoded {}", message.row_id()),
        }
    }

    #[test]
    fn bodies_that_are_not_change_messages_are_malformed_with_a_reason() {
        assert!(reason(b"not json", 1000).contains("invalid JSON"));
        assert!(reason(br#"{"id":1}"#, 1000).contains("missing field"));
        assert!(reason(br#""a transform's string""#, 1000).contains("JSON string"));
        assert!(reason(b"\xff{}", 1000).contains("not valid UTF-8"));
        assert!(reason(br#"{"record":{}}"#, 5).contains("exceeds the limit of 5 bytes"));
    }

    #[test]
    fn a_sequin_body_decodes_and_a_rejected_one_is_kept_whole() {
        let line = include_str!("../../../tests/fixtures/sequin-examples.jsonl")
            .lines()
            .next()
            .unwrap();
        match decode_json(line.as_bytes(), 1 << 20) {
            Payload::Decoded(message) => assert_eq!(message.row_id(), "public.orders:1001"),
            Payload::Malformed { reason, .. } => panic!("{reason}"),
        }
        match decode_json(line.as_bytes(), 10) {
            Payload::Malformed {
                raw: RawPayload::Body(raw),
                reason: DecodeError::TooLarge { .. },
            } => assert_eq!(raw, line.as_bytes()),
            _ => panic!("expected a too-large message"),
        }
    }

    #[tokio::test]
    async fn reserve_takes_what_is_free_and_permits_come_back_on_drop() {
        struct Nowhere;
        impl Dispatch for Nowhere {
            fn dispatch(&self, _delivery: Delivery) {}
        }
        let budget = Arc::new(Semaphore::new(5));
        let ctx = SourceContext::new(
            "test",
            Arc::new(Nowhere),
            Arc::new(Counters::default()),
            CancellationToken::new(),
            Arc::clone(&budget),
            1 << 20,
        );
        let mut first = ctx.reserve(3).await.unwrap();
        assert_eq!(first.len(), 3);
        let second = ctx.reserve(10).await.unwrap();
        assert_eq!(second.len(), 2);
        let one = first.take().unwrap();
        assert_eq!((first.len(), budget.available_permits()), (2, 0));
        drop(second);
        drop(first);
        assert_eq!(budget.available_permits(), 4);
        drop(one);
        assert_eq!(budget.available_permits(), 5);
        ctx.shutdown.cancel();
        assert!(ctx.reserve(1).await.is_none());
    }
}
