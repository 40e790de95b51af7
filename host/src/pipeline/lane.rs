//! One lane: take a batch, call the subscribed plugins, check what they returned, apply it in
//! one Redis pipeline (retrying while Redis is unavailable), dead-letter what cannot be applied,
//! and only then settle every message's acknowledgement.

use super::Shared;
use crate::applier::dead_letter::{DeadLetter, DeadLetterKind};
use crate::applier::{MessageOutcome, MessageWrites};
use crate::manifest::Consistency;
use crate::message::ChangeMessage;
use crate::ops::Op;
use crate::runtime::plugin::ChangeOutcome;
use crate::runtime::{Plugin, PluginError, PluginSet};
use crate::sources::{Delivery, Payload, RawPayload};
use crate::telemetry::Counters;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What each subscribed plugin answered for one message: `(plugin index, outcome)`.
type Verdicts = Vec<(usize, ChangeOutcome)>;

/// Runs a lane until its queue is closed and drained.
pub(super) async fn run(
    index: usize,
    mut queue: mpsc::UnboundedReceiver<Delivery>,
    shared: Arc<Shared>,
) {
    let max = shared.config.batch_size;
    let mut batch = Vec::with_capacity(max);
    while queue.recv_many(&mut batch, max).await > 0 {
        process(index, &shared, std::mem::take(&mut batch)).await;
    }
    tracing::debug!(lane = index, "lane finished");
}

async fn process(lane: usize, shared: &Shared, batch: Vec<Delivery>) {
    let plugins = shared.plugins.load_full();
    let called = tokio::task::spawn_blocking({
        let plugins = Arc::clone(&plugins);
        move || {
            let verdicts = call_plugins(&plugins, &batch);
            (batch, verdicts)
        }
    })
    .await;
    let (batch, mut verdicts) = match called {
        Ok(called) => called,
        Err(error) => {
            // The deliveries went down with the task; their tokens were dropped unsettled, so
            // every message of the batch stays unacknowledged and comes back.
            tracing::error!(lane, error = %error, "plugin call task failed; batch left for redelivery");
            return;
        }
    };
    for (delivery, verdicts) in batch.iter().zip(verdicts.iter_mut()) {
        for (plugin, outcome) in verdicts.iter_mut() {
            if let Ok(ops) = outcome
                && let Err(error) = check_ops(&plugins.plugins[*plugin], shared, ops)
            {
                *outcome = Err(error);
            }
        }
        if verdicts.is_empty() && matches!(delivery.payload, Payload::Decoded(_)) {
            Counters::add(&shared.counters.unrouted, 1);
        }
    }

    let mut writes: Vec<MessageWrites<'_>> = Vec::with_capacity(batch.len());
    let mut letters = Vec::new();
    for (delivery, verdicts) in batch.iter().zip(&verdicts) {
        let mut message_writes = MessageWrites::default();
        match &delivery.payload {
            Payload::Malformed { raw, reason } => letters.push(DeadLetter {
                kind: DeadLetterKind::Decode,
                reason: reason.clone(),
                plugin: None,
                source: delivery.origin.source.to_string(),
                source_id: delivery.origin.id.clone(),
                payload: raw.clone(),
            }),
            Payload::Decoded(message) => {
                message_writes.version = message.version;
                for (index, outcome) in verdicts {
                    let plugin = &plugins.plugins[*index];
                    match outcome {
                        Ok(ops) => {
                            let target = match plugin.manifest.consistency {
                                Consistency::Versioned => &mut message_writes.versioned,
                                Consistency::Plain => &mut message_writes.plain,
                            };
                            target.extend(ops.iter());
                        }
                        Err(error) => {
                            letters.push(plugin_letter(delivery, message, plugin, error));
                        }
                    }
                }
            }
        }
        writes.push(message_writes);
    }

    let Some(outcomes) = apply_with_retry(lane, shared, &writes, &letters).await else {
        return;
    };
    let mut refused = Vec::new();
    let mut applied = 0;
    for (delivery, outcome) in batch.iter().zip(&outcomes) {
        match (outcome, &delivery.payload) {
            (MessageOutcome::Applied { stale }, Payload::Decoded(_)) => {
                applied += 1;
                Counters::add(&shared.counters.stale_skipped, *stale);
            }
            (MessageOutcome::Applied { .. }, Payload::Malformed { .. }) => {}
            (MessageOutcome::Refused(reason), Payload::Decoded(message)) => {
                refused.push(DeadLetter {
                    kind: DeadLetterKind::Redis,
                    reason: reason.clone(),
                    plugin: None,
                    source: delivery.origin.source.to_string(),
                    source_id: delivery.origin.id.clone(),
                    payload: RawPayload::Body(message.to_sequin_json().into_bytes()),
                });
            }
            (MessageOutcome::Refused(_), Payload::Malformed { .. }) => {}
        }
    }
    if !refused.is_empty()
        && apply_with_retry(lane, shared, &[], &refused)
            .await
            .is_none()
    {
        return;
    }
    for letter in letters.iter().chain(&refused) {
        tracing::warn!(
            lane,
            source = %letter.source,
            source_id = %letter.source_id,
            kind = letter.kind.as_str(),
            plugin = letter.plugin.as_ref().map(|(name, _)| name.as_str()),
            version = letter.plugin.as_ref().map(|(_, version)| version.as_str()),
            reason = %letter.reason,
            "message dead-lettered"
        );
    }
    Counters::add(&shared.counters.applied, applied);
    Counters::add(
        &shared.counters.dead_lettered,
        (letters.len() + refused.len()) as u64,
    );
    drop(writes);
    for delivery in batch {
        delivery.ack.ack();
    }
}

/// Calls every plugin once with the messages it subscribes to.
fn call_plugins(plugins: &PluginSet, batch: &[Delivery]) -> Vec<Verdicts> {
    let mut per_plugin: Vec<Vec<usize>> = vec![Vec::new(); plugins.plugins.len()];
    for (index, delivery) in batch.iter().enumerate() {
        if let Payload::Decoded(message) = &delivery.payload {
            for plugin in plugins.routes(message) {
                per_plugin[plugin].push(index);
            }
        }
    }
    let mut verdicts: Vec<Verdicts> = vec![Vec::new(); batch.len()];
    for (plugin, indices) in per_plugin.iter().enumerate() {
        if indices.is_empty() {
            continue;
        }
        let messages: Vec<&ChangeMessage> = indices
            .iter()
            .filter_map(|&i| match &batch[i].payload {
                Payload::Decoded(message) => Some(message),
                Payload::Malformed { .. } => None,
            })
            .collect();
        let outcomes = plugins.plugins[plugin].call_batch(&messages);
        for (&index, outcome) in indices.iter().zip(outcomes) {
            verdicts[index].push((plugin, outcome));
        }
    }
    verdicts
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
    delivery: &Delivery,
    message: &ChangeMessage,
    plugin: &Plugin,
    error: &PluginError,
) -> DeadLetter {
    DeadLetter {
        kind: DeadLetterKind::Plugin,
        reason: error.to_string(),
        plugin: Some((plugin.name().to_owned(), plugin.version().to_owned())),
        source: delivery.origin.source.to_string(),
        source_id: delivery.origin.id.clone(),
        payload: RawPayload::Body(message.to_sequin_json().into_bytes()),
    }
}

/// Applies until Redis confirms, with capped exponential backoff. Returns `None` when shutdown
/// interrupts the retries: the batch is then left unacknowledged.
async fn apply_with_retry(
    lane: usize,
    shared: &Shared,
    writes: &[MessageWrites<'_>],
    letters: &[DeadLetter],
) -> Option<Vec<MessageOutcome>> {
    let max_backoff = Duration::from_millis(shared.config.max_backoff_ms);
    let mut backoff = Duration::from_millis(50).min(max_backoff);
    loop {
        match shared.applier.apply(writes, letters).await {
            Ok(outcomes) => return Some(outcomes),
            Err(error) => {
                Counters::add(&shared.counters.apply_retries, 1);
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
