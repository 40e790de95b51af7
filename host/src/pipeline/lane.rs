//! One lane of one plugin: take a batch, call the plugin (waiting while it is paused), check
//! what it returned, apply it in one Redis pipeline (retrying while Redis is unavailable),
//! dead-letter what cannot be applied, and only then finish every message's part.
//!
//! The lane without a plugin takes the messages that did not decode: it only writes their dead
//! letters.

use super::{Job, Shared};
use crate::applier::dead_letter::{DeadLetter, DeadLetterKind};
use crate::applier::{MessageOutcome, MessageWrites};
use crate::delivery::{Payload, RawPayload};
use crate::manifest::Consistency;
use crate::message::ChangeMessage;
use crate::ops::Op;
use crate::runtime::plugin::ChangeOutcome;
use crate::runtime::{Plugin, PluginError};
use crate::telemetry::{self, Counters};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Runs a lane until its queue is closed and drained.
pub(super) async fn run(
    plugin: Option<String>,
    index: usize,
    mut queue: mpsc::UnboundedReceiver<Arc<Job>>,
    shared: Arc<Shared>,
) {
    let max = shared.config.batch_size;
    let mut batch = Vec::with_capacity(max);
    while queue.recv_many(&mut batch, max).await > 0 {
        let jobs = std::mem::take(&mut batch);
        match &plugin {
            Some(name) => process(name, index, &shared, jobs).await,
            None => dead_letter_malformed(&shared, jobs).await,
        }
    }
}

async fn dead_letter_malformed(shared: &Shared, jobs: Vec<Arc<Job>>) {
    let letters: Vec<DeadLetter> = jobs
        .iter()
        .filter_map(|job| match &job.payload {
            Payload::Malformed { raw, reason } => Some(DeadLetter {
                kind: DeadLetterKind::Decode,
                reason: reason.to_string(),
                plugin: None,
                source: job.origin.source.to_string(),
                source_id: job.origin.id.clone(),
                payload: raw.clone(),
            }),
            Payload::Decoded(_) => None,
        })
        .collect();
    let done = apply_with_retry("decode", shared, &[], &letters)
        .await
        .is_some();
    if done {
        log_letters(&letters);
        count_letters(shared, &letters);
    }
    for job in jobs {
        job.finish(done);
    }
}

async fn process(name: &str, lane: usize, shared: &Shared, jobs: Vec<Arc<Job>>) {
    let Some((plugin, mut outcomes)) = call(name, shared, &jobs).await else {
        return;
    };
    let Some(plugin) = plugin else {
        // The plugin was removed: nothing left to do for it.
        for job in jobs {
            job.finish(true);
        }
        return;
    };
    let mut writes: Vec<MessageWrites<'_>> = Vec::with_capacity(jobs.len());
    let mut letters = Vec::new();
    for (job, outcome) in jobs.iter().zip(outcomes.iter_mut()) {
        let Payload::Decoded(message) = &job.payload else {
            writes.push(MessageWrites::default());
            continue;
        };
        if let Ok(ops) = outcome
            && let Err(error) = check_ops(&plugin, shared, ops)
        {
            *outcome = Err(error);
        }
        let mut message_writes = MessageWrites {
            version: message.version,
            ..MessageWrites::default()
        };
        match outcome {
            Ok(ops) => match plugin.manifest.consistency {
                Consistency::Versioned => message_writes.versioned.extend(ops.iter()),
                Consistency::Plain => message_writes.plain.extend(ops.iter()),
            },
            Err(error) => letters.push(plugin_letter(job, message, &plugin, error)),
        }
        writes.push(message_writes);
    }
    let label = format!("{name}#{lane}");
    let Some(applied) = apply_with_retry(&label, shared, &writes, &letters).await else {
        abandon(jobs);
        return;
    };
    let mut refused = Vec::new();
    let mut n_applied = 0;
    let mut tally = AppliedTally::new(shared, name);
    for (job, outcome) in jobs.iter().zip(&applied) {
        let Payload::Decoded(message) = &job.payload else {
            continue;
        };
        match outcome {
            MessageOutcome::Applied { stale } => {
                n_applied += 1;
                tally.applied(&job.origin.source, *stale);
                if *stale > 0 {
                    tracing::debug!(plugin = name, version = plugin.version(), row = %message.row_id(), stale, "stale writes skipped");
                }
            }
            MessageOutcome::Refused(reason) => refused.push(DeadLetter {
                kind: DeadLetterKind::Redis,
                reason: reason.clone(),
                plugin: Some((plugin.name().to_owned(), plugin.version().to_owned())),
                source: job.origin.source.to_string(),
                source_id: job.origin.id.clone(),
                payload: RawPayload::Body(message.to_sequin_json().into_bytes()),
            }),
        }
    }
    if !refused.is_empty()
        && apply_with_retry(&label, shared, &[], &refused)
            .await
            .is_none()
    {
        abandon(jobs);
        return;
    }
    tally.flush();
    log_letters(&letters);
    log_letters(&refused);
    Counters::add(&shared.counters.applied, n_applied);
    count_letters(shared, &letters);
    count_letters(shared, &refused);
    drop(writes);
    for job in jobs {
        job.finish(true);
    }
}

/// Counts a batch's applied messages and stale writes per source, adding to the labelled
/// metrics once per run of messages from one source (usually once per batch) rather than per
/// message.
struct AppliedTally<'a> {
    shared: &'a Shared,
    plugin: &'a str,
    source: Option<Arc<str>>,
    applied: u64,
    stale: u64,
}

impl<'a> AppliedTally<'a> {
    fn new(shared: &'a Shared, plugin: &'a str) -> AppliedTally<'a> {
        AppliedTally {
            shared,
            plugin,
            source: None,
            applied: 0,
            stale: 0,
        }
    }

    fn applied(&mut self, source: &Arc<str>, stale: u64) {
        if self.source.as_ref().is_some_and(|s| s != source) {
            self.flush();
        }
        if self.source.is_none() {
            self.source = Some(Arc::clone(source));
        }
        self.applied += 1;
        self.stale += stale;
    }

    fn flush(&mut self) {
        let Some(source) = self.source.take() else {
            return;
        };
        let metrics = &self.shared.counters.metrics;
        let labels = telemetry::source_plugin(&source, self.plugin);
        metrics.applied.get_or_create(&labels).inc_by(self.applied);
        if self.stale > 0 {
            metrics
                .stale_skipped
                .get_or_create(&labels)
                .inc_by(self.stale);
        }
        Counters::add(&self.shared.counters.stale_skipped, self.stale);
        (self.applied, self.stale) = (0, 0);
    }
}

/// Calls the plugin serving `name` on the batch, waiting while it is paused. Returns `None` on
/// shutdown (the jobs are then abandoned), and `Some((None, _))` when the plugin is gone.
async fn call(
    name: &str,
    shared: &Shared,
    jobs: &[Arc<Job>],
) -> Option<(Option<Arc<Plugin>>, Vec<ChangeOutcome>)> {
    loop {
        let Some(plugin) = shared.plugins.load().get(name).cloned() else {
            return Some((None, Vec::new()));
        };
        if let Some(pause) = plugin.breaker.paused_for() {
            // Wake at least every second: a new version (with a fresh breaker) ends the wait.
            tokio::select! {
                () = tokio::time::sleep(pause.min(Duration::from_secs(1))) => continue,
                () = shared.shutdown.cancelled() => {
                    abandon(jobs.to_vec());
                    return None;
                }
            }
        }
        let started = Instant::now();
        let called = tokio::task::spawn_blocking({
            let (plugin, jobs) = (Arc::clone(&plugin), jobs.to_vec());
            move || {
                let messages: Vec<&ChangeMessage> = jobs
                    .iter()
                    .filter_map(|job| match &job.payload {
                        Payload::Decoded(message) => Some(message),
                        Payload::Malformed { .. } => None,
                    })
                    .collect();
                plugin.call_batch(&messages)
            }
        })
        .await;
        let outcomes = match called {
            Ok(outcomes) => {
                shared.counters.metrics.plugin_call(name, started.elapsed());
                outcomes
            }
            Err(error) => {
                tracing::error!(plugin = name, error = %error, "plugin call task failed; batch left for redelivery");
                abandon(jobs.to_vec());
                return None;
            }
        };
        if !outcomes.is_empty()
            && outcomes
                .iter()
                .all(|o| matches!(o, Err(PluginError::Unattempted)))
            && plugin.breaker.paused_for().is_some()
        {
            // Paused by another lane meanwhile: wait out the pause.
            continue;
        }
        let failed = outcomes
            .iter()
            .filter(|o| o.as_ref().is_err_and(PluginError::is_instance_failure))
            .count() as u32;
        let gave_up = outcomes
            .iter()
            .any(|o| matches!(o, Err(PluginError::Unattempted)));
        let tripped = if gave_up {
            Some(plugin.breaker.trip())
        } else {
            plugin.breaker.record(failed)
        };
        match tripped {
            None => return Some((Some(plugin), outcomes)),
            Some(pause) => {
                shared.registry.paused(name, pause);
                // Failing as a whole: keep the whole batch (nothing applied, order kept) and try
                // again after the pause, possibly on a fixed version.
                tracing::warn!(
                    plugin = name,
                    version = plugin.version(),
                    pause_ms = pause.as_millis() as u64,
                    failed,
                    "plugin keeps failing; paused, its messages wait unacknowledged"
                );
            }
        }
    }
}

fn abandon(jobs: Vec<Arc<Job>>) {
    for job in jobs {
        job.finish(false);
    }
}

/// Enforces the plugin's key prefixes and limits on what it returned, and drops operations that
/// name no member (they would be Redis syntax errors and mean nothing).
fn check_ops(plugin: &Plugin, shared: &Shared, ops: &mut Vec<Op>) -> Result<(), PluginError> {
    let limits = &plugin.manifest.limits;
    if ops.len() > limits.max_ops_per_change {
        return Err(PluginError::Misbehaved(format!(
            "returned {} operations for one change, the limit is {}",
            ops.len(),
            limits.max_ops_per_change
        )));
    }
    for op in ops.iter() {
        let key = op.key();
        if !plugin.manifest.allows_key(key) {
            return Err(PluginError::Misbehaved(format!(
                "{} on key {key:?} is outside the plugin's key prefixes {:?}",
                op.name(),
                plugin.manifest.key_prefixes.as_deref().unwrap_or_default()
            )));
        }
        if key.starts_with(&shared.reserved_prefix) || key == shared.dead_letter_stream {
            return Err(PluginError::Misbehaved(format!(
                "{} on key {key:?} touches keepwarm's own keys",
                op.name()
            )));
        }
        if op.payload_bytes() > limits.max_value_bytes {
            return Err(PluginError::Misbehaved(format!(
                "{} on key {key:?} carries {} bytes, the limit is {}",
                op.name(),
                op.payload_bytes(),
                limits.max_value_bytes
            )));
        }
        if let Op::SortedSetAdd { members, .. } = op
            && members.iter().any(|(score, _)| score.is_nan())
        {
            return Err(PluginError::Misbehaved(format!(
                "ZADD on key {key:?} has a NaN score"
            )));
        }
        if let Op::Set {
            ttl_ms: Some(0), ..
        }
        | Op::Expire { ttl_ms: 0, .. } = op
        {
            return Err(PluginError::Misbehaved(format!(
                "{} on key {key:?} has a zero TTL",
                op.name()
            )));
        }
    }
    ops.retain(|op| match op {
        Op::HashSet { fields, .. } => !fields.is_empty(),
        Op::HashDel {
            fields: members, ..
        }
        | Op::SetAdd { members, .. }
        | Op::SetRemove { members, .. }
        | Op::SortedSetRemove { members, .. } => !members.is_empty(),
        Op::SortedSetAdd { members, .. } => !members.is_empty(),
        _ => true,
    });
    Ok(())
}

fn plugin_letter(
    job: &Job,
    message: &ChangeMessage,
    plugin: &Plugin,
    error: &PluginError,
) -> DeadLetter {
    DeadLetter {
        kind: DeadLetterKind::Plugin,
        reason: error.to_string(),
        plugin: Some((plugin.name().to_owned(), plugin.version().to_owned())),
        source: job.origin.source.to_string(),
        source_id: job.origin.id.clone(),
        payload: RawPayload::Body(message.to_sequin_json().into_bytes()),
    }
}

fn count_letters(shared: &Shared, letters: &[DeadLetter]) {
    Counters::add(&shared.counters.dead_lettered, letters.len() as u64);
    for letter in letters {
        let plugin = letter
            .plugin
            .as_ref()
            .map_or(String::new(), |(name, _)| name.clone());
        shared
            .counters
            .metrics
            .dead_lettered
            .get_or_create(&[
                ("source", letter.source.clone()),
                ("plugin", plugin),
                ("kind", letter.kind.as_str().to_owned()),
            ])
            .inc();
    }
}

fn log_letters(letters: &[DeadLetter]) {
    for letter in letters {
        tracing::warn!(
            source = %letter.source,
            source_id = %letter.source_id,
            kind = letter.kind.as_str(),
            plugin = letter.plugin.as_ref().map(|(name, _)| name.as_str()),
            version = letter.plugin.as_ref().map(|(_, version)| version.as_str()),
            reason = %letter.reason,
            "message dead-lettered"
        );
    }
}

/// Applies until Redis confirms, with capped exponential backoff. Returns `None` when shutdown
/// interrupts the retries: the batch is then left unacknowledged.
async fn apply_with_retry(
    lane: &str,
    shared: &Shared,
    writes: &[MessageWrites<'_>],
    letters: &[DeadLetter],
) -> Option<Vec<MessageOutcome>> {
    let max_backoff = Duration::from_millis(shared.config.max_backoff_ms);
    let mut backoff = Duration::from_millis(50).min(max_backoff);
    let metrics = &shared.counters.metrics;
    loop {
        let started = Instant::now();
        let applied = shared.applier.apply(writes, letters).await;
        metrics
            .redis_apply_seconds
            .observe(started.elapsed().as_secs_f64());
        match applied {
            Ok(outcomes) => return Some(outcomes),
            Err(error) => {
                Counters::add(&shared.counters.apply_retries, 1);
                metrics.apply_retries.inc();
                tracing::warn!(lane, error = %error, retry_in_ms = backoff.as_millis() as u64, "apply failed; retrying the batch");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shared.shutdown.cancelled() => {
                        tracing::warn!(lane, messages = writes.len().max(letters.len()), "shutting down while redis is unavailable; batch left unacknowledged for redelivery");
                        return None;
                    }
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}
