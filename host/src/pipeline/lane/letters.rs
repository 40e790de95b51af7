//! Dead letters: the one place a lane builds them (from the job and what failed), and where
//! written ones are logged and counted.

use super::Shared;
use crate::applier::Refusal;
use crate::applier::dead_letter::{DeadLetter, DeadLetterKind};
use crate::delivery::{Payload, RawPayload};
use crate::pipeline::Job;
use crate::runtime::{Plugin, PluginError};
use crate::telemetry::Counters;

/// What failed for a message.
pub(super) enum Cause<'a> {
    /// It did not decode (the decoder's error).
    Decode(&'a crate::message::DecodeError),
    /// The plugin rejected the change, trapped, timed out or broke its limits.
    Plugin(&'a PluginError),
    /// The cache refused one of its writes.
    Cache(&'a Refusal),
}

/// The dead letter of `job`: a decoded message is kept as Sequin JSON, a malformed one as it
/// arrived.
pub(super) fn dead_letter(job: &Job, plugin: Option<&Plugin>, cause: Cause<'_>) -> DeadLetter {
    let (kind, reason) = match cause {
        Cause::Decode(reason) => (DeadLetterKind::Decode, reason.to_string()),
        Cause::Plugin(error) => (DeadLetterKind::Plugin, error.to_string()),
        Cause::Cache(refusal @ Refusal::Redis(_)) => (DeadLetterKind::Redis, refusal.to_string()),
        Cause::Cache(refusal @ Refusal::Memcached(_)) => {
            (DeadLetterKind::Memcached, refusal.to_string())
        }
    };
    let payload = match &job.payload {
        Payload::Decoded(message) => RawPayload::Body(message.to_sequin_json().into_bytes()),
        Payload::Malformed { raw, .. } => raw.clone(),
    };
    DeadLetter {
        kind,
        reason,
        plugin: plugin.map(|p| (p.name().to_owned(), p.version().to_owned())),
        source: job.origin.source.to_string(),
        source_id: job.origin.id.clone(),
        payload,
    }
}

/// Logs and counts dead letters Redis confirmed.
pub(super) fn record(shared: &Shared, letters: &[DeadLetter]) {
    Counters::add(&shared.counters.dead_lettered, letters.len() as u64);
    for letter in letters {
        let plugin = letter.plugin.as_ref().map(|(name, _)| name.as_str());
        tracing::warn!(
            source = %letter.source,
            source_id = %letter.source_id,
            kind = letter.kind.as_str(),
            plugin,
            version = letter.plugin.as_ref().map(|(_, version)| version.as_str()),
            reason = %letter.reason,
            "message dead-lettered"
        );
        shared
            .counters
            .metrics
            .dead_lettered
            .get_or_create(&[
                ("source", letter.source.clone()),
                ("plugin", plugin.unwrap_or_default().to_owned()),
                ("kind", letter.kind.as_str().to_owned()),
            ])
            .inc();
    }
}
