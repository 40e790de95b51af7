//! Conversions at the WIT boundary: messages to a plugin call's parameters (borrowed, no copy
//! of their texts), for contract 0.2.0 ([`Batch`]) and 0.1.0 ([`change_params_v0_1`]).
//! Both contracts return [`wit::Op`]s, which [`op`] turns into [`Op`]s.

use super::bindings::keepwarm::plugin::types as wit;
use super::bindings::v0_1::keepwarm::plugin::types as wit_v0_1;
use crate::message::{Action, ChangeMessage};
use crate::ops::Op;

/// A batch as contract 0.2.0 passes it (`wit/keepwarm.wit`, `batch`): each message's texts
/// buffer as it is, and the numbers that say where each text lies.
#[derive(Debug)]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(action: &str, lsn: &str, changes: &str, pks: &str) -> ChangeMessage {
        ChangeMessage::from_json(&format!(
            r#"{{"record":{{"id":1}},"changes":{changes},"action":"{action}","metadata":{{
                "table_schema":"public","table_name":"orders","commit_timestamp":"ts",
                "commit_lsn":{lsn},"commit_idx":{lsn},"idempotency_key":"k","record_pks":{pks}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_batch_lays_out_each_change_as_contract_0_2_says() {
        let update = message("update", "7", r#"{"s":"é"}"#, r#"["1","a:b"]"#);
        let read = message("read", "null", "null", r#"["2"]"#);
        let batch = Batch::new(&[&update, &read]);
        let param = batch.param();
        assert_eq!(param.actions, [wit::Action::Update, wit::Action::Read]);
        assert_eq!(param.versions, [7, 7, 0, 0]);
        assert_eq!(param.layout.len(), 2 * Batch::LAYOUT);
        // Flags: a version and changes; then neither.
        assert_eq!((param.layout[0], param.layout[Batch::LAYOUT]), (3, 0));
        let text = |change: usize, at: usize| {
            let n = &param.layout[change * Batch::LAYOUT..];
            let start = n[at] as usize;
            &param.texts[change][start..start + n[at + 1] as usize]
        };
        let update_texts: Vec<&str> = [1, 3, 5, 7, 9, 11, 13].map(|at| text(0, at)).to_vec();
        assert_eq!(
            update_texts,
            [
                "public",
                "orders",
                r#"{"id":1}"#,
                r#"{"s":"é"}"#,
                "ts",
                "k",
                update.metadata()
            ]
        );
        assert_eq!(text(1, 7), "", "a read has no changes");
        // Two keys for the update, one for the read, each within its own change's texts.
        assert_eq!((param.layout[15], param.layout[Batch::LAYOUT + 15]), (2, 1));
        let key = |change: usize, k: usize| {
            let start = param.pks[2 * k] as usize;
            &param.texts[change][start..start + param.pks[2 * k + 1] as usize]
        };
        assert_eq!([key(0, 0), key(0, 1), key(1, 2)], ["1", "a:b", "2"]);
    }
}
