//! One lane of one plugin: take a batch, call the plugin (waiting while it is paused), check
//! what it returned, apply it in one Redis pipeline (retrying while Redis is unavailable),
//! dead-letter what cannot be applied, and only then finish every message's part.
//!
//! The lane without a plugin takes the messages that did not decode: it only writes their dead
//! letters.
//!
//! - [`call`]: the plugin call, pauses and the breaker.
//! - [`check`]: the manifest's limits and key prefixes on what the plugin returned.
//! - [`apply`]: the applier call retried while Redis is unavailable, and the applied tally.
//! - [`letters`]: dead letters, built, logged and counted in one place.
//! - [`thread`]: the lane's own thread, where its plugin calls run.

mod apply;
mod call;
mod check;
mod letters;
mod thread;

use super::{Job, Shared};
use crate::applier::dead_letter::DeadLetter;
use crate::applier::{MessageOutcome, MessageWrites};
use crate::delivery::Payload;
use crate::manifest::Consistency;
use crate::message::ChangeMessage;
use crate::runtime::Plugin;
use crate::runtime::plugin::ChangeOutcome;
use apply::AppliedTally;
use call::Called;
use letters::Cause;
use std::sync::Arc;
use thread::CallThread;
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
    let mut thread = CallThread::default();
    while queue.recv_many(&mut batch, max).await > 0 {
        let jobs = std::mem::take(&mut batch);
        let done = match &plugin {
            Some(name) => process(name, index, &shared, &mut thread, &jobs).await,
            None => dead_letter_malformed(&shared, &jobs).await,
        };
        super::job::finish_all(&jobs, done);
        super::job::bury(jobs);
    }
}

/// Writes the dead letters of messages that did not decode. Returns whether they are written
/// (false: shutdown came first).
async fn dead_letter_malformed(shared: &Shared, jobs: &[Arc<Job>]) -> bool {
    let dead: Vec<_> = jobs
        .iter()
        .filter_map(|job| match &job.payload {
            Payload::Malformed { reason, .. } => {
                Some(letters::dead_letter(job, None, Cause::Decode(reason)))
            }
            Payload::Decoded(_) => None,
        })
        .collect();
    let done = apply::with_retry("decode", shared, &[], &dead)
        .await
        .is_some();
    if done {
        letters::record(shared, &dead);
    }
    done
}

/// Calls the plugin on a batch and applies its answer. Returns whether the lane's part of every
/// message is done (applied, dead-lettered, or the plugin is gone); false leaves the batch for
/// redelivery.
async fn process(
    name: &str,
    lane: usize,
    shared: &Shared,
    thread: &mut CallThread,
    jobs: &[Arc<Job>],
) -> bool {
    match call::call(name, shared, thread, jobs).await {
        Called::Answered { plugin, outcomes } => {
            let lane = format!("{name}#{lane}");
            apply_answers(&lane, shared, &plugin, jobs, outcomes).await
        }
        // The plugin was removed: nothing left to do for it.
        Called::Gone => true,
        Called::Abandoned => false,
    }
}

/// Checks the plugin's answers, applies them with the dead letters of the changes it failed
/// on, then dead-letters the messages Redis refused.
async fn apply_answers(
    lane: &str,
    shared: &Shared,
    plugin: &Plugin,
    jobs: &[Arc<Job>],
    mut outcomes: Vec<ChangeOutcome>,
) -> bool {
    // Plugin lanes only get decoded messages, one outcome each.
    let decoded: Vec<(&Job, &ChangeMessage)> = jobs
        .iter()
        .filter_map(|job| Some((&**job, job.message()?)))
        .collect();
    for outcome in &mut outcomes {
        check::enforce(plugin, shared, outcome);
    }
    let (writes, mut dead) = plan(plugin, &decoded, &outcomes);
    let Some(applied) = apply::with_retry(lane, shared, &writes, &dead).await else {
        return false;
    };
    let mut tally = AppliedTally::new(shared, plugin.name());
    let mut refused = Vec::new();
    for ((job, message), outcome) in decoded.iter().zip(&applied) {
        match outcome {
            MessageOutcome::Applied { stale } => {
                tally.applied(&job.origin.source, *stale);
                if *stale > 0 {
                    tracing::debug!(plugin = plugin.name(), version = plugin.version(), row = %message.row_id(), stale, "stale writes skipped");
                }
            }
            MessageOutcome::Refused(refusal) => {
                refused.push(letters::dead_letter(
                    job,
                    Some(plugin),
                    Cause::Cache(refusal),
                ));
            }
        }
    }
    if !refused.is_empty()
        && apply::with_retry(lane, shared, &[], &refused)
            .await
            .is_none()
    {
        return false;
    }
    tally.flush();
    dead.append(&mut refused);
    letters::record(shared, &dead);
    true
}

/// Splits the answers into each message's writes (by the plugin's consistency mode) and the
/// dead letters of the changes the plugin failed on.
fn plan<'a>(
    plugin: &Plugin,
    decoded: &[(&Job, &ChangeMessage)],
    outcomes: &'a [ChangeOutcome],
) -> (Vec<MessageWrites<'a>>, Vec<DeadLetter>) {
    let mut writes = Vec::with_capacity(decoded.len());
    let mut dead = Vec::new();
    for ((job, message), outcome) in decoded.iter().zip(outcomes) {
        let mut message_writes = MessageWrites {
            version: message.version,
            ..MessageWrites::default()
        };
        match outcome {
            Ok(ops) => match plugin.manifest.consistency {
                Consistency::Versioned => message_writes.versioned = ops,
                Consistency::Plain => message_writes.plain = ops,
            },
            Err(error) => dead.push(letters::dead_letter(
                job,
                Some(plugin),
                Cause::Plugin(error),
            )),
        }
        writes.push(message_writes);
    }
    (writes, dead)
}
