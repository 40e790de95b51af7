//! Plain writes: each operation becomes its Redis command, last write wins.

use super::versioned::score_text;
use crate::ops::Op;

/// The Redis command for one operation.
pub(crate) fn command(op: &Op) -> redis::Cmd {
    let mut cmd;
    match op {
        Op::Set { key, value, ttl_ms } => {
            // Sized once: the value is most of the command, and growing the buffer around it
            // copied it again at each step.
            cmd = redis::Cmd::with_capacity(5, key.len() + value.len() + 32);
            cmd.arg("SET").arg(key).arg(value.as_slice());
            if let Some(ttl) = ttl_ms {
                cmd.arg("PX").arg(*ttl);
            }
        }
        Op::Del { key } => {
            cmd = redis::cmd("DEL");
            cmd.arg(key);
        }
        Op::HashSet { key, fields } => {
            cmd = redis::cmd("HSET");
            cmd.arg(key);
            for (field, value) in fields {
                cmd.arg(field).arg(value.as_slice());
            }
        }
        Op::HashDel {
            key,
            fields: members,
        }
        | Op::SetAdd { key, members }
        | Op::SetRemove { key, members }
        | Op::SortedSetRemove { key, members } => {
            cmd = redis::cmd(op.name());
            cmd.arg(key).arg(members);
        }
        Op::SortedSetAdd { key, members } => {
            cmd = redis::cmd("ZADD");
            cmd.arg(key);
            for (score, member) in members {
                cmd.arg(score_text(*score)).arg(member);
            }
        }
        Op::Expire { key, ttl_ms } => {
            cmd = redis::cmd("PEXPIRE");
            cmd.arg(key).arg(*ttl_ms);
        }
        Op::Publish { channel, message } => {
            cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(message.as_slice());
        }
    }
    cmd
}
