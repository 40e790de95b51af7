//! What a plugin returned, checked against its manifest before anything is applied: the number
//! of operations, the operations the manifest declares, key prefixes, keepwarm's own keys,
//! payload sizes, scores and TTLs. A change whose operations break a rule is dead-lettered as a
//! whole.

use super::Shared;
use crate::ops::Op;
use crate::runtime::Plugin;
use crate::runtime::error::{Misbehavior, PluginError};
use crate::runtime::plugin::ChangeOutcome;

/// Turns an answer that breaks the rules into the plugin's error, and drops operations that
/// name no member (they would be Redis syntax errors and mean nothing).
pub(super) fn enforce(plugin: &Plugin, shared: &Shared, outcome: &mut ChangeOutcome) {
    if let Ok(ops) = outcome {
        match check(plugin, shared, ops) {
            Ok(()) => ops.retain(|op| !names_nothing(op)),
            Err(misbehavior) => *outcome = Err(PluginError::Misbehaved(misbehavior)),
        }
    }
}

fn check(plugin: &Plugin, shared: &Shared, ops: &[Op]) -> Result<(), Misbehavior> {
    let limits = &plugin.manifest.limits;
    if ops.len() > limits.max_ops_per_change {
        return Err(Misbehavior::TooManyOps {
            count: ops.len(),
            limit: limits.max_ops_per_change,
        });
    }
    for op in ops {
        if !plugin.manifest.declares(op.kind()) {
            return Err(Misbehavior::UndeclaredOp {
                op: op.kind().as_str(),
                declared: plugin
                    .manifest
                    .ops
                    .iter()
                    .flatten()
                    .map(|kind| kind.as_str())
                    .collect(),
            });
        }
        let key = op.key();
        if !plugin.manifest.allows_key(key) {
            return Err(Misbehavior::OutsidePrefixes {
                op: op.name(),
                key: key.to_owned(),
                prefixes: plugin.manifest.key_prefixes.clone().unwrap_or_default(),
            });
        }
        if key.starts_with(&shared.reserved_prefix) || key == shared.dead_letter_stream {
            return Err(Misbehavior::ReservedKey {
                op: op.name(),
                key: key.to_owned(),
            });
        }
        if op.payload_bytes() > limits.max_value_bytes {
            return Err(Misbehavior::TooLarge {
                op: op.name(),
                key: key.to_owned(),
                bytes: op.payload_bytes(),
                limit: limits.max_value_bytes,
            });
        }
        if let Op::SortedSetAdd { members, .. } = op
            && members.iter().any(|(score, _)| score.is_nan())
        {
            return Err(Misbehavior::NanScore {
                key: key.to_owned(),
            });
        }
        if let Op::Set {
            ttl_ms: Some(0), ..
        }
        | Op::Expire { ttl_ms: 0, .. } = op
        {
            return Err(Misbehavior::ZeroTtl {
                op: op.name(),
                key: key.to_owned(),
            });
        }
    }
    Ok(())
}

/// A hash, set or sorted-set operation without a single field or member.
fn names_nothing(op: &Op) -> bool {
    match op {
        Op::HashSet { fields, .. } => fields.is_empty(),
        Op::HashDel {
            fields: members, ..
        }
        | Op::SetAdd { members, .. }
        | Op::SetRemove { members, .. }
        | Op::SortedSetRemove { members, .. } => members.is_empty(),
        Op::SortedSetAdd { members, .. } => members.is_empty(),
        _ => false,
    }
}
