//! Versioned writes: every operation of a change goes through one Lua script that compares the
//! change's version with the version stored for each key (or member) and skips stale writes.
//!
//! Versions live in a companion hash per data key, named so that it shares the data key's Redis
//! Cluster hash slot (see [`version_key`]). Field `""` ([`KEY_FIELD`]) holds the key's version;
//! field `m:<member>` ([`MEMBER_FIELD_PREFIX`]) the version of a set member, sorted-set member or
//! hash field. `versioned.lua` writes them; `keepwarm version` ([`crate::inspect`]) reads them
//! back with [`VersionField::parse`] and [`parse_version`].

use super::cluster::{HashSlot, hash_tag, key_slot, slot_tag};
use crate::message::Version;
use crate::ops::Op;
use std::sync::OnceLock;

/// The Lua source of the versioned apply script.
pub(crate) const SCRIPT: &str = include_str!("versioned.lua");

/// The script's SHA-1, as `EVALSHA` wants it.
pub(crate) fn script_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(SCRIPT).get_hash().to_owned())
}

/// The companion-hash field that holds the version of the key as a whole.
pub(crate) const KEY_FIELD: &str = "";
/// The prefix of the companion-hash field that holds a member's version (`m:<member>`).
pub(crate) const MEMBER_FIELD_PREFIX: &str = "m:";

/// What a field of a companion hash versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VersionField<'a> {
    /// The key as a whole (`set`, `del`, `expire`).
    Key,
    /// One member: a hash field, a set or sorted-set member.
    Member(&'a str),
}

impl<'a> VersionField<'a> {
    /// Reads a companion-hash field name; `None` for a field keepwarm does not write.
    pub(crate) fn parse(field: &'a str) -> Option<VersionField<'a>> {
        if field == KEY_FIELD {
            return Some(VersionField::Key);
        }
        field
            .strip_prefix(MEMBER_FIELD_PREFIX)
            .map(VersionField::Member)
    }
}

/// The version as the script compares and stores it: zero-padded so that string order is
/// version order. A backfill read (no version) is the empty string.
pub(crate) fn version_arg(version: Option<Version>) -> String {
    match version {
        Some(v) => format!("{:020}:{:020}", v.lsn, v.idx),
        None => String::new(),
    }
}

/// A version as the script stores it (see [`version_arg`]).
pub(crate) fn parse_version(text: &str) -> Option<Version> {
    let (lsn, idx) = text.split_once(':')?;
    Some(Version {
        lsn: lsn.parse().ok()?,
        idx: idx.parse().ok()?,
    })
}

/// The companion key that holds the versions of `key`; it always hashes to `key`'s slot.
///
/// - `key` has a hash tag (`{…}` with something inside): `prefix + key` keeps that tag, since
///   the prefix has no braces.
/// - `key` is not empty and has no `}`: `prefix + "{" + key + "}"` makes the whole key the tag, which is
///   what Redis hashes for a key without a tag.
/// - otherwise (a `}` but no valid tag, e.g. `a}b` or `x{}y`): a tag chosen to land on the same
///   slot, then the key: `prefix + "{" + tag + "}" + key`.
pub(crate) fn version_key(prefix: &str, key: &str) -> String {
    if hash_tag(key).is_some() {
        format!("{prefix}{key}")
    } else if !key.is_empty() && !key.contains('}') {
        format!("{prefix}{{{key}}}")
    } else {
        format!("{prefix}{{{}}}{key}", slot_tag(key_slot(key)))
    }
}

/// Builds the `EVALSHA` commands that apply `ops` at `version`: one per Redis Cluster hash slot
/// the operations touch, in the order of each slot's first operation, so that no call names keys
/// of two slots (Redis Cluster refuses that with `CROSSSLOT`). Each key, with its members, is
/// versioned and written atomically; the keys of one message in different slots are not one
/// atomic step. A publish goes into the call of the keyed operation before it (or the first
/// call), so it still follows the writes it announces; publishes alone make one call without keys.
pub(crate) fn commands_by_slot(
    ops: &[&Op],
    version: Option<Version>,
    prefix: &str,
    tombstone_ms: u64,
) -> Vec<(HashSlot, redis::Cmd)> {
    let mut groups: Vec<(Option<HashSlot>, Vec<&Op>)> = Vec::new();
    let mut pending_publishes: Vec<&Op> = Vec::new();
    let mut current: Option<usize> = None;
    for op in ops {
        if matches!(op, Op::Publish { .. }) {
            match current {
                Some(index) => groups[index].1.push(op),
                None => pending_publishes.push(op),
            }
            continue;
        }
        let slot = key_slot(op.key());
        let index = match groups.iter().position(|(s, _)| *s == Some(slot)) {
            Some(index) => index,
            None => {
                groups.push((Some(slot), Vec::new()));
                groups.len() - 1
            }
        };
        groups[index].1.append(&mut pending_publishes);
        groups[index].1.push(op);
        current = Some(index);
    }
    if !pending_publishes.is_empty() {
        groups.push((None, pending_publishes));
    }
    groups
        .iter()
        .map(|(slot, ops)| {
            let slot = slot.unwrap_or_else(|| key_slot(ops.first().map_or("", |op| op.key())));
            (slot, command(ops, version, prefix, tombstone_ms))
        })
        .collect()
}

/// Builds one `EVALSHA` command that applies `ops` at `version`. Its keys must share a hash slot
/// for Redis Cluster: [`commands_by_slot`] splits a message's operations accordingly.
fn command(ops: &[&Op], version: Option<Version>, prefix: &str, tombstone_ms: u64) -> redis::Cmd {
    let mut keys: Vec<String> = Vec::with_capacity(ops.len() * 2);
    let mut args: Vec<Vec<u8>> = vec![
        version_arg(version).into_bytes(),
        tombstone_ms.to_string().into_bytes(),
    ];
    let text = |s: &String| s.as_bytes().to_vec();
    for op in ops {
        if !matches!(op, Op::Publish { .. }) {
            keys.push(op.key().to_owned());
            keys.push(version_key(prefix, op.key()));
        }
        let list: Vec<Vec<u8>> = match op {
            Op::Set { value, ttl_ms, .. } => vec![
                value.clone(),
                ttl_ms
                    .map(|t| t.to_string())
                    .unwrap_or_default()
                    .into_bytes(),
            ],
            Op::Del { .. } => vec![],
            Op::Expire { ttl_ms, .. } => vec![ttl_ms.to_string().into_bytes()],
            Op::HashSet { fields, .. } => fields
                .iter()
                .flat_map(|(f, v)| [text(f), v.clone()])
                .collect(),
            Op::HashDel {
                fields: members, ..
            }
            | Op::SetAdd { members, .. }
            | Op::SetRemove { members, .. }
            | Op::SortedSetRemove { members, .. } => members.iter().map(text).collect(),
            Op::SortedSetAdd { members, .. } => members
                .iter()
                .flat_map(|(score, m)| [score_text(*score).into_bytes(), text(m)])
                .collect(),
            Op::Publish { channel, message } => vec![text(channel), message.clone()],
        };
        // The script dispatches on the Redis command name (`Op::name`).
        args.push(op.name().as_bytes().to_vec());
        args.push(list.len().to_string().into_bytes());
        args.extend(list);
    }
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script_sha()).arg(keys.len());
    for key in &keys {
        cmd.arg(key);
    }
    for arg in &args {
        cmd.arg(arg.as_slice());
    }
    cmd
}

/// A score as Redis parses it (`inf`/`-inf` for infinities).
pub(crate) fn score_text(score: f64) -> String {
    if score.is_infinite() {
        if score > 0.0 {
            "+inf".to_owned()
        } else {
            "-inf".to_owned()
        }
    } else {
        score.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commands alone, in order.
    fn commands(ops: &[&Op], version: Option<Version>, prefix: &str, ttl: u64) -> Vec<redis::Cmd> {
        commands_by_slot(ops, version, prefix, ttl)
            .into_iter()
            .map(|(_, cmd)| cmd)
            .collect()
    }

    #[test]
    fn companion_keys_share_the_slot() {
        for key in [
            "users:1",
            "{user:1}:profile",
            "a}b",
            "x{}y",
            "{}",
            "",
            "a{b",
            "日本:1",
        ] {
            let companion = version_key("kw:v:", key);
            assert_eq!(key_slot(&companion), key_slot(key), "{key} -> {companion}");
        }
        assert_eq!(version_key("kw:v:", "users:1"), "kw:v:{users:1}");
        assert_eq!(version_key("kw:v:", "{u1}:a"), "kw:v:{u1}:a");
    }

    #[test]
    fn the_script_knows_every_operation_and_the_member_prefix() {
        let ops = [
            Op::Set {
                key: String::new(),
                value: Vec::new(),
                ttl_ms: None,
            },
            Op::Del { key: String::new() },
            Op::HashSet {
                key: String::new(),
                fields: Vec::new(),
            },
            Op::HashDel {
                key: String::new(),
                fields: Vec::new(),
            },
            Op::SetAdd {
                key: String::new(),
                members: Vec::new(),
            },
            Op::SetRemove {
                key: String::new(),
                members: Vec::new(),
            },
            Op::SortedSetAdd {
                key: String::new(),
                members: Vec::new(),
            },
            Op::SortedSetRemove {
                key: String::new(),
                members: Vec::new(),
            },
            Op::Expire {
                key: String::new(),
                ttl_ms: 1,
            },
            Op::Publish {
                channel: String::new(),
                message: Vec::new(),
            },
        ];
        for op in &ops {
            let name = op.name();
            assert!(SCRIPT.contains(&format!("op == '{name}'")), "{name}");
        }
        assert!(SCRIPT.contains(&format!("'{MEMBER_FIELD_PREFIX}' ..")));
        assert_eq!(VersionField::parse(KEY_FIELD), Some(VersionField::Key));
        assert_eq!(
            VersionField::parse("m:a:b"),
            Some(VersionField::Member("a:b"))
        );
        assert_eq!(VersionField::parse("x"), None);
    }

    /// The keys (after the script's SHA and key count) and the operation names of a command.
    fn keys_and_ops(cmd: &redis::Cmd) -> (Vec<String>, Vec<String>) {
        let args: Vec<String> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => String::new(),
            })
            .collect();
        let n_keys: usize = args[2].parse().unwrap();
        let keys = args[3..3 + n_keys].to_vec();
        let mut names = Vec::new();
        let mut at = 3 + n_keys + 2;
        while at < args.len() {
            names.push(args[at].clone());
            at += 2 + args[at + 1].parse::<usize>().unwrap();
        }
        (keys, names)
    }

    #[test]
    fn one_call_per_hash_slot_in_order() {
        let set = |key: &str| Op::Set {
            key: key.to_owned(),
            value: b"v".to_vec(),
            ttl_ms: None,
        };
        let publish = Op::Publish {
            channel: "ch".to_owned(),
            message: b"m".to_vec(),
        };
        let sadd = Op::SetAdd {
            key: "{a}:index".to_owned(),
            members: vec!["1".to_owned()],
        };
        let del_b = Op::Del {
            key: "b".to_owned(),
        };
        let (a, b) = (set("a"), set("b"));
        assert_ne!(key_slot("a"), key_slot("b"));
        let ops = [&publish, &a, &b, &sadd, &publish, &del_b];
        let cmds = commands(&ops, Some(Version { lsn: 1, idx: 0 }), "kw:v:", 1000);
        assert_eq!(cmds.len(), 2);
        let (keys, names) = keys_and_ops(&cmds[0]);
        assert_eq!(keys, ["a", "kw:v:{a}", "{a}:index", "kw:v:{a}:index"]);
        assert_eq!(names, ["PUBLISH", "SET", "SADD", "PUBLISH"]);
        let (keys, names) = keys_and_ops(&cmds[1]);
        assert_eq!(keys, ["b", "kw:v:{b}", "b", "kw:v:{b}"]);
        assert_eq!(names, ["SET", "DEL"]);
        for cmd in &cmds {
            let (keys, _) = keys_and_ops(cmd);
            assert!(keys.iter().all(|k| key_slot(k) == key_slot(&keys[0])));
        }
        let only_publish = commands(&[&publish], None, "kw:v:", 1000);
        assert_eq!(
            keys_and_ops(&only_publish[0]),
            (vec![], vec!["PUBLISH".to_owned()])
        );
        assert!(commands(&[], None, "kw:v:", 1000).is_empty());
    }

    #[test]
    fn versioned_writes_split_by_slot() {
        let ops = [
            Op::Del {
                key: "{a}:1".into(),
            },
            Op::Del {
                key: "{b}:1".into(),
            },
            Op::Publish {
                channel: "c".into(),
                message: b"m".to_vec(),
            },
            Op::Del {
                key: "{a}:2".into(),
            },
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let calls = commands_by_slot(&refs, None, "kw:v:", 1000);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].0, key_slot("a"));
        assert_eq!(calls[1].0, key_slot("b"));
    }

    #[test]
    fn version_strings_order_like_versions() {
        let a = version_arg(Some(Version { lsn: 9, idx: 10 }));
        let b = version_arg(Some(Version { lsn: 10, idx: 0 }));
        let c = version_arg(Some(Version { lsn: 10, idx: 2 }));
        assert!(a < b && b < c);
        assert_eq!(version_arg(None), "");
        assert_eq!(parse_version(&a), Some(Version { lsn: 9, idx: 10 }));
        assert_eq!(
            parse_version("00000000001243362320:00000000000000000001"),
            Some(Version {
                lsn: 1_243_362_320,
                idx: 1
            })
        );
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("12"), None);
    }
}
