//! Handing a batch to the applier, again and again while Redis is unavailable, and counting
//! what it applied.

use super::Shared;
use crate::applier::dead_letter::DeadLetter;
use crate::applier::{MessageOutcome, MessageWrites};
use crate::backoff::Backoff;
use crate::telemetry::{self, Counters};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Applies until Redis confirms, with capped exponential backoff. Returns `None` when shutdown
/// interrupts the retries: the batch is then left unacknowledged.
pub(super) async fn with_retry(
    lane: &str,
    shared: &Shared,
    writes: &[MessageWrites<'_>],
    letters: &[DeadLetter],
) -> Option<Vec<MessageOutcome>> {
    let mut backoff = Backoff::new(
        Duration::from_millis(50),
        Duration::from_millis(shared.config.max_backoff_ms),
    );
    let metrics = &shared.counters.metrics;
    loop {
        let started = Instant::now();
        let applied = shared.applier.apply(writes, letters).await;
        metrics
            .redis_apply_seconds
            .observe(started.elapsed().as_secs_f64());
        let error = match applied {
            Ok(outcomes) => return Some(outcomes),
            Err(error) => error,
        };
        Counters::add(&shared.counters.apply_retries, 1);
        metrics.apply_retries.inc();
        let delay = backoff.next_delay();
        tracing::warn!(lane, error = %error, retry_in_ms = delay.as_millis() as u64, "apply failed; retrying the batch");
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => {
                tracing::warn!(lane, messages = writes.len().max(letters.len()), "shutting down while redis is unavailable; batch left unacknowledged for redelivery");
                return None;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Counts a batch's applied messages and stale writes per source, adding to the labelled
/// metrics once per run of messages from one source (usually once per batch) rather than per
/// message.
pub(super) struct AppliedTally<'a> {
    shared: &'a Shared,
    plugin: &'a str,
    source: Option<Arc<str>>,
    applied: u64,
    stale: u64,
}

impl<'a> AppliedTally<'a> {
    pub(super) fn new(shared: &'a Shared, plugin: &'a str) -> AppliedTally<'a> {
        AppliedTally {
            shared,
            plugin,
            source: None,
            applied: 0,
            stale: 0,
        }
    }

    /// Counts one applied message of `source` with its `stale` skipped writes.
    pub(super) fn applied(&mut self, source: &Arc<str>, stale: u64) {
        if self.source.as_ref().is_some_and(|s| s != source) {
            self.flush();
        }
        if self.source.is_none() {
            self.source = Some(Arc::clone(source));
        }
        self.applied += 1;
        self.stale += stale;
    }

    /// Adds what was counted since the last flush to the counters and metrics.
    pub(super) fn flush(&mut self) {
        let Some(source) = self.source.take() else {
            return;
        };
        let counters = &self.shared.counters;
        let labels = telemetry::source_plugin(&source, self.plugin);
        counters
            .metrics
            .applied
            .get_or_create(&labels)
            .inc_by(self.applied);
        if self.stale > 0 {
            counters
                .metrics
                .stale_skipped
                .get_or_create(&labels)
                .inc_by(self.stale);
        }
        Counters::add(&counters.applied, self.applied);
        Counters::add(&counters.stale_skipped, self.stale);
        (self.applied, self.stale) = (0, 0);
    }
}
