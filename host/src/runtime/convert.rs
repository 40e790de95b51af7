//! Conversions at the WIT boundary: `ChangeMessage` to the WIT `change` (borrowed, no copy of
//! the record text) and the WIT `op` to [`Op`].

use super::bindings::keepwarm::plugin::types as wit;
use crate::message::{Action, ChangeMessage};
use crate::ops::Op;

/// The primary keys as the WIT call borrows them.
pub fn pk_refs(message: &ChangeMessage) -> Vec<&str> {
    message.pks().collect()
}

/// The primary keys of a whole batch in one list, for [`change_params`] (one allocation per
/// batch rather than one per change).
pub fn batch_pk_refs<'a>(changes: &[&'a ChangeMessage]) -> Vec<&'a str> {
    changes.iter().flat_map(|c| c.pks()).collect()
}

/// The WIT view of a batch, borrowing from the messages and their [`batch_pk_refs`].
pub fn change_params<'a>(
    changes: &[&'a ChangeMessage],
    pks: &'a [&'a str],
) -> Vec<wit::Change<'a>> {
    let mut rest = pks;
    changes
        .iter()
        .map(|c| {
            let (own, others) = rest.split_at(c.pks().len().min(rest.len()));
            rest = others;
            change_param(c, own)
        })
        .collect()
}

/// The WIT view of a change, borrowing from the message (and its [`pk_refs`]).
pub fn change_param<'a>(message: &'a ChangeMessage, pks: &'a [&'a str]) -> wit::Change<'a> {
    wit::Change {
        action: match message.action {
            Action::Insert => wit::Action::Insert,
            Action::Update => wit::Action::Update,
            Action::Delete => wit::Action::Delete,
            Action::Read => wit::Action::Read,
        },
        schema: message.schema(),
        table: message.table(),
        record: message.record(),
        changes: message.changes(),
        pks,
        commit_lsn: message.version.map(|v| v.lsn),
        commit_idx: message.version.map(|v| v.idx),
        commit_timestamp: message.commit_timestamp(),
        idempotency_key: message.idempotency_key(),
        metadata: message.metadata(),
    }
}

/// The host form of an operation a plugin returned.
pub fn op(op: wit::Op) -> Op {
    match op {
        wit::Op::Set(set) => Op::Set {
            key: set.key,
            value: set.value,
            ttl_ms: set.ttl_ms,
        },
        wit::Op::Del(key) => Op::Del { key },
        wit::Op::HashSet(hash) => Op::HashSet {
            key: hash.key,
            fields: hash
                .fields
                .into_iter()
                .map(|f| (f.field, f.value))
                .collect(),
        },
        wit::Op::HashDel(m) => Op::HashDel {
            key: m.key,
            fields: m.members,
        },
        wit::Op::SetAdd(m) => Op::SetAdd {
            key: m.key,
            members: m.members,
        },
        wit::Op::SetRemove(m) => Op::SetRemove {
            key: m.key,
            members: m.members,
        },
        wit::Op::SortedSetAdd(z) => Op::SortedSetAdd {
            key: z.key,
            members: z.members.into_iter().map(|m| (m.score, m.member)).collect(),
        },
        wit::Op::SortedSetRemove(m) => Op::SortedSetRemove {
            key: m.key,
            members: m.members,
        },
        wit::Op::Expire(e) => Op::Expire {
            key: e.key,
            ttl_ms: e.ttl_ms,
        },
        wit::Op::Publish(p) => Op::Publish {
            channel: p.channel,
            message: p.message,
        },
    }
}
