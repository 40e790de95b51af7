//! Conversions at the WIT boundary: messages to a plugin call's parameters (borrowed, no copy
//! of their texts), for contract 0.2.0 ([`Batch`]) and 0.1.0 ([`change_params_v0_1`]).
//! Both contracts return [`wit::Op`]s, which [`op`] turns into [`Op`]s.

use super::bindings::keepwarm::plugin::types as wit;
use super::bindings::v0_1::keepwarm::plugin::types as wit_v0_1;
use crate::message::{Action, ChangeMessage};
use crate::ops::Op;

/// A batch as contract 0.2.0 passes it (`wit/keepwarm.wit`, `batch`): each message's texts
/// buffer as it is, and the numbers that say where each text lies.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    actions: Vec<wit::Action>,
    texts: Vec<&'a str>,
    layout: Vec<u32>,
    pks: Vec<u32>,
    versions: Vec<u64>,
}

impl<'a> Batch<'a> {
    /// The numbers of contract 0.2.0's layout per change.
    pub const LAYOUT: usize = 16;

    /// The batch of `changes`, in order.
    pub fn new(changes: &[&'a ChangeMessage]) -> Batch<'a> {
        let n = changes.len();
        let mut batch = Batch {
            actions: Vec::with_capacity(n),
            texts: Vec::with_capacity(n),
            layout: Vec::with_capacity(n * Self::LAYOUT),
            pks: Vec::with_capacity(n * 2),
            versions: Vec::with_capacity(n * 2),
        };
        for message in changes {
            message.push_layout(&mut batch.layout, &mut batch.pks);
            batch.actions.push(action(message.action));
            batch.texts.push(message.wire_texts());
            let (lsn, idx) = message.version.map_or((0, 0), |v| (v.lsn, v.idx));
            batch.versions.extend([lsn, idx]);
        }
        batch
    }

    /// The call's parameter, borrowing this batch.
    pub fn param(&self) -> wit::Batch<'_> {
        wit::Batch {
            actions: &self.actions,
            texts: &self.texts,
            layout: &self.layout,
            pks: &self.pks,
            versions: &self.versions,
        }
    }
}

fn action(action: Action) -> wit::Action {
    match action {
        Action::Insert => wit::Action::Insert,
        Action::Update => wit::Action::Update,
        Action::Delete => wit::Action::Delete,
        Action::Read => wit::Action::Read,
    }
}

/// The primary keys of a whole batch in one list, for [`change_params_v0_1`] (one allocation
/// per batch rather than one per change).
pub fn batch_pk_refs<'a>(changes: &[&'a ChangeMessage]) -> Vec<&'a str> {
    changes.iter().flat_map(|c| c.pks()).collect()
}

/// The contract 0.1.0 view of a batch, borrowing from the messages and their
/// [`batch_pk_refs`].
pub fn change_params_v0_1<'a>(
    changes: &[&'a ChangeMessage],
    pks: &'a [&'a str],
) -> Vec<wit_v0_1::Change<'a>> {
    let mut rest = pks;
    changes
        .iter()
        .map(|c| {
            let (own, others) = rest.split_at(c.pks().len().min(rest.len()));
            rest = others;
            change_param_v0_1(c, own)
        })
        .collect()
}

/// The contract 0.1.0 view of a change, borrowing from the message.
fn change_param_v0_1<'a>(message: &'a ChangeMessage, pks: &'a [&'a str]) -> wit_v0_1::Change<'a> {
    wit_v0_1::Change {
        action: match message.action {
            Action::Insert => wit_v0_1::Action::Insert,
            Action::Update => wit_v0_1::Action::Update,
            Action::Delete => wit_v0_1::Action::Delete,
            Action::Read => wit_v0_1::Action::Read,
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

/// `fn $name(op: $wit::Op) -> Op`: the host form of an operation a plugin returned, for the
/// WIT types of one contract (the same operations in both).
macro_rules! op_from {
    ($name:ident, $wit:ident) => {
        /// The host form of an operation a plugin returned.
        pub fn $name(op: $wit::Op) -> Op {
            match op {
                $wit::Op::Set(set) => Op::Set {
                    key: set.key,
                    value: set.value,
                    ttl_ms: set.ttl_ms,
                },
                $wit::Op::Del(key) => Op::Del { key },
                $wit::Op::HashSet(hash) => Op::HashSet {
                    key: hash.key,
                    fields: hash
                        .fields
                        .into_iter()
                        .map(|f| (f.field, f.value))
                        .collect(),
                },
                $wit::Op::HashDel(m) => Op::HashDel {
                    key: m.key,
                    fields: m.members,
                },
                $wit::Op::SetAdd(m) => Op::SetAdd {
                    key: m.key,
                    members: m.members,
                },
                $wit::Op::SetRemove(m) => Op::SetRemove {
                    key: m.key,
                    members: m.members,
                },
                $wit::Op::SortedSetAdd(z) => Op::SortedSetAdd {
                    key: z.key,
                    members: z.members.into_iter().map(|m| (m.score, m.member)).collect(),
                },
                $wit::Op::SortedSetRemove(m) => Op::SortedSetRemove {
                    key: m.key,
                    members: m.members,
                },
                $wit::Op::Expire(e) => Op::Expire {
                    key: e.key,
                    ttl_ms: e.ttl_ms,
                },
                $wit::Op::Publish(p) => Op::Publish {
                    channel: p.channel,
                    message: p.message,
                },
            }
        }
    };
}

op_from!(op, wit);
op_from!(op_v0_1, wit_v0_1);
