//! What happens to a JetStream message after it is delivered: the in-flight table, the ack
//! loop, and the keeper that sends progress acknowledgements (`+WPI`) for messages still in
//! flight, so that the server does not deliver them again when `ack_wait` runs out.
//!
//! Acknowledgements are publishes to the message's reply subject. They are buffered by the
//! client while it reconnects; one lost with a connection means the message comes again and
//! is re-applied harmlessly (versioned writes).

use crate::delivery::{Settle, Settled};
use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::Acker;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Messages delivered and not yet settled, by stream sequence.
#[derive(Default)]
pub(super) struct InFlight {
    held: Mutex<HashMap<String, Held>>,
}

/// One message in flight: the acker of each copy (a message whose `ack_wait` ran out can be
/// delivered twice), newest last, and when progress was last reported.
struct Held {
    copies: Vec<Arc<Acker>>,
    progressed: Instant,
}

impl InFlight {
    /// Records a delivered message.
    pub(super) fn hold(&self, id: &str, acker: Acker) {
        let mut held = self.lock();
        let entry = held.entry(id.to_owned()).or_insert_with(|| Held {
            copies: Vec::new(),
            progressed: Instant::now(),
        });
        entry.copies.push(Arc::new(acker));
    }

    /// Forgets one copy of a message; returns its acker and whether it was the last copy in
    /// flight.
    fn settle(&self, id: &str) -> Option<(Arc<Acker>, bool)> {
        let mut held = self.lock();
        let entry = held.get_mut(id)?;
        let acker = entry.copies.pop()?;
        let last = entry.copies.is_empty();
        if last {
            held.remove(id);
        }
        Some((acker, last))
    }

    /// The newest acker of every message whose progress was last reported before `before`,
    /// marked as reported now.
    fn due(&self, before: Instant) -> Vec<Arc<Acker>> {
        let now = Instant::now();
        self.lock()
            .values_mut()
            .filter(|held| held.progressed < before)
            .filter_map(|held| {
                held.progressed = now;
                held.copies.last().cloned()
            })
            .collect()
    }

    /// How many messages are in flight.
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Turns settled tokens into acknowledgements: `+ACK` when done, `-NAK` (deliver again now)
/// when abandoned.
pub(super) struct NatsSettle {
    /// The in-flight table.
    pub(super) inflight: Arc<InFlight>,
    /// To the ack loop.
    pub(super) tx: mpsc::UnboundedSender<(Arc<Acker>, AckKind)>,
}

impl Settle for NatsSettle {
    fn settle(&self, id: &str, settled: Settled) {
        let Some((acker, last)) = self.inflight.settle(id) else {
            return;
        };
        match settled {
            Settled::Done => {
                let _ = self.tx.send((acker, AckKind::Ack));
            }
            // Another copy still in flight keeps the message; it decides.
            Settled::Abandoned if last => {
                let _ = self.tx.send((acker, AckKind::Nak(None)));
            }
            Settled::Abandoned => {}
        }
    }
}

/// Sends acknowledgements until every token is settled and the channel closes.
pub(super) async fn ack_loop(
    source: Arc<str>,
    mut rx: mpsc::UnboundedReceiver<(Arc<Acker>, AckKind)>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        for (acker, kind) in batch.drain(..) {
            if let Err(error) = acker.ack_with(kind).await {
                tracing::warn!(source = %source, error = %error, kind = ?kind, "cannot acknowledge a nats message; it will be delivered again and re-applied harmlessly");
            }
        }
    }
}

/// Reports progress (`+WPI`) for messages in flight longer than a third of `ack_wait`, until
/// `stop`; each report gives a message another `ack_wait`.
pub(super) async fn keep_in_progress(
    source: Arc<str>,
    inflight: Arc<InFlight>,
    ack_wait: Duration,
    stop: CancellationToken,
) {
    let every = (ack_wait / 6).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(before) = Instant::now().checked_sub(ack_wait / 3) else {
            continue;
        };
        let due = inflight.due(before);
        if due.is_empty() {
            continue;
        }
        tracing::debug!(source = %source, messages = due.len(), "reporting progress of messages still in flight");
        for acker in due {
            if let Err(error) = acker.ack_with(AckKind::Progress).await {
                tracing::warn!(source = %source, error = %error, "cannot report the progress of a nats message");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An acker of a client that never connects: the table only stores it.
    async fn acker() -> Acker {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .unwrap();
        Acker::new(async_nats::jetstream::new(client), None)
    }

    #[tokio::test]
    async fn the_in_flight_table_keeps_copies_and_reports_progress_once_a_period() {
        let table = InFlight::default();
        let start = Instant::now();
        table.hold("1", acker().await);
        table.hold("2", acker().await);
        // Delivered again while the first copy is still in flight.
        table.hold("2", acker().await);
        assert_eq!(table.len(), 2);
        assert!(table.due(start).is_empty());
        // One report per message, not per copy; then none until the next period.
        let reported = Instant::now();
        assert_eq!(table.due(reported + Duration::from_secs(1)).len(), 2);
        assert!(table.due(reported).is_empty());
        assert!(matches!(table.settle("2"), Some((_, false))));
        assert!(matches!(table.settle("2"), Some((_, true))));
        assert!(table.settle("2").is_none());
        assert_eq!(table.len(), 1);
    }

    #[tokio::test]
    async fn done_acks_and_only_the_last_abandoned_copy_naks() {
        let inflight = Arc::new(InFlight::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let settle = NatsSettle {
            inflight: Arc::clone(&inflight),
            tx,
        };
        inflight.hold("1", acker().await);
        inflight.hold("2", acker().await);
        inflight.hold("2", acker().await);
        settle.settle("1", Settled::Done);
        settle.settle("2", Settled::Abandoned);
        settle.settle("2", Settled::Abandoned);
        // Unknown or already settled: nothing.
        settle.settle("1", Settled::Done);
        drop(settle);
        let mut kinds = Vec::new();
        while let Some((_, kind)) = rx.recv().await {
            kinds.push(format!("{kind:?}"));
        }
        assert_eq!(kinds, ["Ack", "Nak(None)"]);
    }
}
