//! What happens to an SQS message after it is received: the in-flight table, the acker, batched
//! deletes, visibility changes, and the keeper that extends the visibility of long work.
//!
//! Batch calls take at most 10 entries. A delete that fails for a reason SQS calls its own
//! (throttling, a service error) or for a transport error is retried with capped backoff; one
//! that fails for the caller's reason (`ReceiptHandleIsInvalid`: the message's visibility ran
//! out and another consumer received it) is logged and dropped: the message comes back and the
//! versioned writes make its replay harmless.

use crate::backoff::Backoff;
use crate::delivery::{Settle, Settled};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Most entries in one SQS batch call.
const BATCH: usize = 10;
/// Batch calls in flight at once from the settle loop.
const CONCURRENT_CALLS: usize = 16;
/// Attempts of one delete or visibility batch before giving up on it.
const ATTEMPTS: u32 = 8;

/// The queue and the client that talks to it.
pub(super) struct Queue {
    /// The SQS client.
    pub(super) client: aws_sdk_sqs::Client,
    /// The queue URL.
    pub(super) url: String,
    /// The source's name, for logs.
    pub(super) source: Arc<str>,
}

/// Messages received and not yet settled, by message id.
#[derive(Default)]
pub(super) struct InFlight {
    held: Mutex<HashMap<String, HeldMessage>>,
}

struct HeldMessage {
    /// The newest receipt handle (only the newest is valid for a FIFO queue).
    receipt: String,
    /// When SQS makes the message visible again unless its timeout is extended.
    visible_until: Instant,
    /// Copies in the pipeline: a message whose visibility ran out can be received twice.
    copies: usize,
}

impl InFlight {
    /// Records a received message.
    pub(super) fn hold(&self, id: &str, receipt: String, visible_until: Instant) {
        let mut held = self.lock();
        let entry = held.entry(id.to_owned()).or_insert(HeldMessage {
            receipt: String::new(),
            visible_until,
            copies: 0,
        });
        entry.receipt = receipt;
        entry.visible_until = visible_until;
        entry.copies += 1;
    }

    /// Forgets one copy of a message; returns its receipt handle and whether it was the last
    /// copy in flight.
    fn settle(&self, id: &str) -> Option<(String, bool)> {
        let mut held = self.lock();
        let entry = held.get_mut(id)?;
        entry.copies -= 1;
        let receipt = entry.receipt.clone();
        let last = entry.copies == 0;
        if last {
            held.remove(id);
        }
        Some((receipt, last))
    }

    /// Messages that become visible before `horizon`: `(id, receipt)`.
    fn due(&self, horizon: Instant) -> Vec<(String, String)> {
        let mut due: Vec<(Instant, String, String)> = self
            .lock()
            .iter()
            .filter(|(_, held)| held.visible_until <= horizon)
            .map(|(id, held)| (held.visible_until, id.clone(), held.receipt.clone()))
            .collect();
        // The soonest to become visible again first.
        due.sort_unstable_by_key(|(until, _, _)| *until);
        due.into_iter()
            .map(|(_, id, receipt)| (id, receipt))
            .collect()
    }

    /// Records an extension of a message's visibility, if it is still held with `receipt`.
    fn extended(&self, id: &str, receipt: &str, visible_until: Instant) {
        if let Some(held) = self.lock().get_mut(id)
            && held.receipt == receipt
        {
            held.visible_until = visible_until;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HeldMessage>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What to do with a settled message.
pub(super) enum Disposal {
    /// Done (applied or dead-lettered): delete it.
    Delete(String),
    /// Abandoned: make it visible again now.
    Return(String),
}

/// Turns settled tokens into deletes and visibility resets.
pub(super) struct SqsSettle {
    /// The in-flight table.
    pub(super) inflight: Arc<InFlight>,
    /// To the settle loop.
    pub(super) tx: mpsc::UnboundedSender<Disposal>,
}

impl Settle for SqsSettle {
    fn settle(&self, id: &str, settled: Settled) {
        let Some((receipt, last)) = self.inflight.settle(id) else {
            return;
        };
        match settled {
            Settled::Done => {
                let _ = self.tx.send(Disposal::Delete(receipt));
            }
            // Another copy still in flight keeps the message; it decides.
            Settled::Abandoned if last => {
                let _ = self.tx.send(Disposal::Return(receipt));
            }
            Settled::Abandoned => {}
        }
    }
}

/// A failed SQS call; it keeps the SDK's error, whose whole chain it prints.
#[derive(Debug)]
pub(super) struct SqsCallError(Box<dyn std::error::Error + Send + Sync>);

impl SqsCallError {
    pub(super) fn new<E: std::error::Error + Send + Sync + 'static>(error: E) -> SqsCallError {
        SqsCallError(Box::new(error))
    }
}

impl std::fmt::Display for SqsCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", DisplayErrorContext(&*self.0))
    }
}

impl std::error::Error for SqsCallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// What a batch call does to its entries.
#[derive(Clone, Copy)]
enum Action {
    Delete,
    SetVisibility(i32),
}

impl Queue {
    /// One batch call for up to 10 `(entry id, receipt)` pairs. Returns the entries that
    /// failed, each with whether retrying can help and the reason.
    async fn call(
        &self,
        action: Action,
        entries: &[(String, String)],
    ) -> Result<Vec<(String, bool, String)>, SqsCallError> {
        let failed = match action {
            Action::Delete => {
                let entries = entries
                    .iter()
                    .filter_map(|(id, receipt)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(id)
                            .receipt_handle(receipt)
                            .build()
                            .ok()
                    })
                    .collect();
                self.client
                    .delete_message_batch()
                    .queue_url(&self.url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(SqsCallError::new)?
                    .failed
            }
            Action::SetVisibility(seconds) => {
                let entries = entries
                    .iter()
                    .filter_map(|(id, receipt)| {
                        ChangeMessageVisibilityBatchRequestEntry::builder()
                            .id(id)
                            .receipt_handle(receipt)
                            .visibility_timeout(seconds)
                            .build()
                            .ok()
                    })
                    .collect();
                self.client
                    .change_message_visibility_batch()
                    .queue_url(&self.url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(SqsCallError::new)?
                    .failed
            }
        };
        Ok(failed
            .into_iter()
            .map(|f| {
                let reason = format!("{}: {}", f.code, f.message.unwrap_or_default());
                (f.id, !f.sender_fault, reason)
            })
            .collect())
    }

    /// Applies `action` to `receipts` (at most 10), retrying what can be retried.
    async fn settle_batch(self: Arc<Self>, action: Action, receipts: Vec<String>) {
        let what = match action {
            Action::Delete => "delete",
            Action::SetVisibility(_) => "visibility reset",
        };
        let mut pending: Vec<(String, String)> = receipts
            .into_iter()
            .enumerate()
            .map(|(i, receipt)| (i.to_string(), receipt))
            .collect();
        let mut backoff = Backoff::default();
        for attempt in 1..=ATTEMPTS {
            match self.call(action, &pending).await {
                Ok(failed) => {
                    let mut retry = Vec::new();
                    for (id, retriable, reason) in failed {
                        if retriable {
                            retry.push(id);
                        } else {
                            tracing::warn!(source = %self.source, reason = %reason, "sqs {what} refused; the message will be redelivered and re-applied harmlessly");
                        }
                    }
                    pending.retain(|(id, _)| retry.contains(id));
                    if pending.is_empty() {
                        return;
                    }
                    tracing::warn!(source = %self.source, entries = pending.len(), attempt, "sqs {what} failed for some entries; retrying");
                }
                Err(error) => {
                    tracing::warn!(source = %self.source, entries = pending.len(), attempt, error = %error, "sqs {what} failed; retrying");
                }
            }
            backoff.sleep().await;
        }
        tracing::error!(source = %self.source, entries = pending.len(), "sqs {what} failed {ATTEMPTS} times; giving up: those messages come back after their visibility timeout and are applied again (harmless in versioned mode; in plain mode an older version may then overwrite a newer one)");
    }

    /// Makes one message visible again at once (it was received but will not be delivered).
    pub(super) async fn make_visible(self: &Arc<Self>, receipt: String) {
        Arc::clone(self)
            .settle_batch(Action::SetVisibility(0), vec![receipt])
            .await;
    }
}

/// Deletes and returns settled messages in batches until every token is settled and the
/// channel closes, then waits for the last calls.
pub(super) async fn settle_loop(queue: Arc<Queue>, mut rx: mpsc::UnboundedReceiver<Disposal>) {
    let mut settled = Vec::new();
    let mut calls = JoinSet::new();
    while rx.recv_many(&mut settled, BATCH * CONCURRENT_CALLS).await > 0 {
        let (mut deletes, mut returns) = (Vec::new(), Vec::new());
        for item in settled.drain(..) {
            match item {
                Disposal::Delete(receipt) => deletes.push(receipt),
                Disposal::Return(receipt) => returns.push(receipt),
            }
        }
        let batches = deletes
            .chunks(BATCH)
            .map(|chunk| (Action::Delete, chunk.to_vec()))
            .chain(
                returns
                    .chunks(BATCH)
                    .map(|chunk| (Action::SetVisibility(0), chunk.to_vec())),
            );
        for (action, receipts) in batches {
            while calls.len() >= CONCURRENT_CALLS {
                let _ = calls.join_next().await;
            }
            calls.spawn(Arc::clone(&queue).settle_batch(action, receipts));
        }
        // Reap finished calls without waiting.
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

/// Extends the visibility of messages still in flight when half of their timeout has passed,
/// until `stop`: the soonest due first, [`CONCURRENT_CALLS`] batch calls at once, each given
/// one tick. A backlog held while the cache is down (up to `max_in_flight` messages, all due at
/// once) is extended in a few seconds rather than one call after the other, and one stuck
/// connection does not hold back the rest.
pub(super) async fn keep_visible(
    queue: Arc<Queue>,
    inflight: Arc<InFlight>,
    visibility: Duration,
    stop: CancellationToken,
) {
    let tick = (visibility / 4).max(Duration::from_millis(250));
    let seconds = i32::try_from(visibility.as_secs()).unwrap_or(i32::MAX);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        let due = inflight.due(Instant::now() + visibility / 2);
        if due.is_empty() {
            continue;
        }
        tracing::debug!(source = %queue.source, messages = due.len(), "extending the visibility of messages still in flight");
        let mut calls = tokio::task::JoinSet::new();
        for chunk in due.chunks(BATCH) {
            while calls.len() >= CONCURRENT_CALLS {
                let _ = calls.join_next().await;
            }
            let (queue, inflight) = (Arc::clone(&queue), Arc::clone(&inflight));
            let chunk = chunk.to_vec();
            calls.spawn(async move {
                // One attempt per tick: what failed is still due at the next one.
                let extend = extend(&queue, &inflight, &chunk, seconds, visibility);
                if tokio::time::timeout(tick, extend).await.is_err() {
                    tracing::warn!(source = %queue.source, messages = chunk.len(), "extending visibility timed out; retrying at the next tick");
                }
            });
        }
        while calls.join_next().await.is_some() {}
    }
}

/// One visibility call for up to [`BATCH`] messages, recorded in the in-flight table.
async fn extend(
    queue: &Queue,
    inflight: &InFlight,
    chunk: &[(String, String)],
    seconds: i32,
    visibility: Duration,
) {
    // Entry ids are positions; the receipts identify the messages.
    let entries: Vec<(String, String)> = chunk
        .iter()
        .enumerate()
        .map(|(i, (_, receipt))| (i.to_string(), receipt.clone()))
        .collect();
    let asked = Instant::now();
    match queue.call(Action::SetVisibility(seconds), &entries).await {
        Ok(failed) => {
            for (i, (id, receipt)) in chunk.iter().enumerate() {
                match failed.iter().find(|(entry, _, _)| *entry == i.to_string()) {
                    None => inflight.extended(id, receipt, asked + visibility),
                    Some((_, _, reason)) => {
                        tracing::warn!(source = %queue.source, id = %id, reason = %reason, "cannot extend the visibility of a message in flight");
                    }
                }
            }
        }
        Err(error) => {
            tracing::warn!(source = %queue.source, messages = chunk.len(), error = %error, "cannot extend visibility; retrying at the next tick");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_table_tracks_copies_and_deadlines() {
        let table = InFlight::default();
        let now = Instant::now();
        table.hold("m1", "r1".into(), now + Duration::from_secs(10));
        table.hold("m2", "r2".into(), now + Duration::from_secs(40));
        assert_eq!(
            table.due(now + Duration::from_secs(15)),
            [("m1".to_owned(), "r1".to_owned())]
        );
        table.extended("m1", "r1", now + Duration::from_secs(50));
        assert!(table.due(now + Duration::from_secs(15)).is_empty());
        // A second copy (received again) brings the newer receipt.
        table.hold("m2", "r2b".into(), now + Duration::from_secs(40));
        assert_eq!(table.settle("m2"), Some(("r2b".to_owned(), false)));
        assert_eq!(table.settle("m2"), Some(("r2b".to_owned(), true)));
        assert_eq!(table.settle("m2"), None);
        // An extension with a stale receipt changes nothing.
        table.hold("m3", "new".into(), now);
        table.extended("m3", "old", now + Duration::from_secs(99));
        assert_eq!(table.due(now), [("m3".to_owned(), "new".to_owned())]);
        // The soonest to become visible again come first.
        table.hold("m4", "r4".into(), now - Duration::from_secs(1));
        let due: Vec<String> = table
            .due(now + Duration::from_secs(60))
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(due, ["m4", "m3", "m1"]);
    }
}
