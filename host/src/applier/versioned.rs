//! Versioned writes: every operation of a change goes through one Lua script that compares the
//! change's version with the version stored for each key (or member) and skips stale writes. One
//! call of the script carries the writes of many messages (a lane's batch, per hash slot) and
//! answers for each message on its own ([`Calls`]).
//!
//! Versions live in a companion key per data key, named so that it shares the data key's Redis
//! Cluster hash slot (see [`version_key`]). A key written as a whole (`set`, `del`, `expire`)
//! has a string companion: its version. A key written member by member has a hash companion:
//! field `""` ([`KEY_FIELD`]) holds the key's version, field `m:<member>`
//! ([`MEMBER_FIELD_PREFIX`]) the version of a set member, sorted-set member or hash field
//! (contract v4 kept every key's version in a hash; `versioned.lua` reads those and rewrites
//! them as strings). `versioned.lua` and the transactions of [`super::watched`] write them;
//! `keepwarm version` ([`crate::inspect`]) reads them back with [`VersionField::parse`] and
//! [`parse_version`].

use super::cluster::{HashSlot, hash_tag, key_slot, slot_tag};
use crate::message::Version;
use crate::ops::Op;
use std::borrow::Cow;
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
    let Some(v) = version else {
        return String::new();
    };
    // `format!("{:020}:{:020}")` without the formatter, once per message on the hot path: each
    // number by `itoa` after its padding zeros. Forty divisions by ten, one digit at a time,
    // cost about 400 instructions more (docs/bench.md, round 15).
    const ZEROS: &str = "00000000000000000000";
    let mut text = String::with_capacity(41);
    let mut digits = itoa::Buffer::new();
    for (n, end) in [(v.lsn, ":"), (v.idx, "")] {
        let written = digits.format(n);
        // A u64 has at most 20 digits.
        text.push_str(&ZEROS[written.len()..]);
        text.push_str(written);
        text.push_str(end);
    }
    text
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
    // `concat` sizes the string once; `format!` took 2.6% of the daemon's samples in a profile
    // of versioned writes (docs/bench.md, round 9): this runs once per write.
    if hash_tag(key).is_some() {
        [prefix, key].concat()
    } else if !key.is_empty() && !key.contains('}') {
        [prefix, "{", key, "}"].concat()
    } else {
        [prefix, "{", slot_tag(key_slot(key)), "}", key].concat()
    }
}

/// The most messages one script call carries, and about the most bytes of arguments: a lane's
/// batch (256 messages by default) of ordinary rows is one call, while a batch of large values is
/// split, so that Redis never takes one huge command nor runs the script for long.
pub(crate) const CALL_MESSAGES: usize = 256;
/// See [`CALL_MESSAGES`].
pub(crate) const CALL_BYTES: usize = 1 << 20;

/// One call of the versioned script: the hash slot of its keys, the `EVALSHA` command, and the
/// batch index of each message it carries, in the order of its reply (one element per message).
pub(crate) struct Call {
    pub(crate) slot: HashSlot,
    pub(crate) cmd: redis::Cmd,
    pub(crate) messages: Vec<usize>,
}

/// Gathers the versioned writes of a batch's messages into script calls: one per Redis Cluster
/// hash slot the writes touch (on a single Redis, one in all), split after [`CALL_MESSAGES`]
/// messages or [`CALL_BYTES`] bytes. No call names keys of two slots (Redis Cluster refuses that
/// with `CROSSSLOT`); a message whose keys span slots is carried by one call per slot, and those
/// are not one atomic step. Within a call, messages keep their batch order; a publish goes with
/// the keyed operation before it (or the first one after it), so it still follows the writes it
/// announces.
pub(crate) struct Calls<'a> {
    prefix: &'a str,
    tombstone: String,
    by_slot: bool,
    /// The calls still taking messages, one per slot.
    open: Vec<Builder<'a>>,
    done: Vec<Call>,
}

/// A call being filled.
struct Builder<'a> {
    slot: HashSlot,
    keys: Vec<Cow<'a, str>>,
    args: Vec<Cow<'a, [u8]>>,
    bytes: usize,
    messages: Vec<usize>,
}

impl<'a> Calls<'a> {
    /// Calls that keep companions under `prefix` and tombstones for `tombstone_ms`, one per hash
    /// slot when `by_slot` (Redis Cluster).
    pub(crate) fn new(prefix: &'a str, tombstone_ms: u64, by_slot: bool) -> Calls<'a> {
        Calls {
            prefix,
            tombstone: tombstone_ms.to_string(),
            by_slot,
            open: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Adds the versioned operations of the batch's message `index`, written at `version`.
    pub(crate) fn add(&mut self, index: usize, ops: &'a [Op], version: Option<Version>) {
        if ops.is_empty() {
            return;
        }
        let version = version_arg(version).into_bytes();
        if !self.by_slot {
            self.push(0, index, version, ops.iter());
            return;
        }
        for (slot, ops) in by_slot(ops) {
            self.push(slot, index, version.clone(), ops.into_iter());
        }
    }

    /// The calls, each slot's in the order its messages came.
    pub(crate) fn finish(mut self) -> Vec<Call> {
        let open = std::mem::take(&mut self.open);
        for builder in open {
            self.close(builder);
        }
        self.done
    }

    fn push(
        &mut self,
        slot: HashSlot,
        index: usize,
        version: Vec<u8>,
        ops: impl Iterator<Item = &'a Op>,
    ) {
        let at = match self.open.iter().position(|b| b.slot == slot) {
            Some(at) => at,
            None => {
                self.open.push(Builder {
                    slot,
                    keys: Vec::new(),
                    args: vec![Cow::Owned(self.tombstone.clone().into_bytes())],
                    bytes: 0,
                    messages: Vec::new(),
                });
                self.open.len() - 1
            }
        };
        let builder = &mut self.open[at];
        builder.messages.push(index);
        builder.arg(Cow::Owned(version));
        for op in ops {
            builder.op(op, self.prefix);
        }
        if builder.messages.len() >= CALL_MESSAGES || builder.bytes >= CALL_BYTES {
            let full = self.open.swap_remove(at);
            self.close(full);
        }
    }

    fn close(&mut self, builder: Builder<'a>) {
        // Sized once (`bytes` counts the keys and arguments): growing the buffer of a call of a
        // few hundred kilobytes copied it again at each step.
        let args = 3 + builder.keys.len() + builder.args.len();
        let mut cmd = redis::Cmd::with_capacity(args, builder.bytes + 64);
        cmd.arg("EVALSHA").arg(script_sha()).arg(builder.keys.len());
        for key in &builder.keys {
            cmd.arg(key.as_ref());
        }
        for arg in &builder.args {
            cmd.arg(arg.as_ref());
        }
        self.done.push(Call {
            slot: builder.slot,
            cmd,
            messages: builder.messages,
        });
    }
}

impl<'a> Builder<'a> {
    fn arg(&mut self, arg: Cow<'a, [u8]>) {
        self.bytes += arg.len();
        self.args.push(arg);
    }

    fn text(&mut self, text: &'a str) {
        self.arg(Cow::Borrowed(text.as_bytes()));
    }

    fn count(&mut self, n: usize) {
        self.arg(Cow::Owned(n.to_string().into_bytes()));
    }

    /// One operation as the script reads it (see `versioned.lua`): its name, then its arguments.
    fn op(&mut self, op: &'a Op, prefix: &str) {
        if !matches!(op, Op::Publish { .. }) {
            let key = op.key();
            self.bytes += key.len() * 2 + prefix.len() + 2;
            self.keys.push(Cow::Borrowed(key));
            self.keys.push(Cow::Owned(version_key(prefix, key)));
        }
        // The script dispatches on the Redis command name (`Op::name`).
        self.text(op.name());
        match op {
            Op::Set { value, ttl_ms, .. } => {
                self.arg(Cow::Borrowed(value));
                match ttl_ms {
                    Some(ttl) => self.arg(Cow::Owned(ttl.to_string().into_bytes())),
                    None => self.text(""),
                }
            }
            Op::Del { .. } => {}
            Op::Expire { ttl_ms, .. } => self.arg(Cow::Owned(ttl_ms.to_string().into_bytes())),
            Op::HashSet { fields, .. } => {
                self.count(fields.len() * 2);
                for (field, value) in fields {
                    self.text(field);
                    self.arg(Cow::Borrowed(value));
                }
            }
            Op::HashDel {
                fields: members, ..
            }
            | Op::SetAdd { members, .. }
            | Op::SetRemove { members, .. }
            | Op::SortedSetRemove { members, .. } => {
                self.count(members.len());
                for member in members {
                    self.text(member);
                }
            }
            Op::SortedSetAdd { members, .. } => {
                self.count(members.len() * 2);
                for (score, member) in members {
                    self.arg(Cow::Owned(score_text(*score).into_bytes()));
                    self.text(member);
                }
            }
            Op::Publish { channel, message } => {
                self.text(channel);
                self.arg(Cow::Borrowed(message));
            }
        }
    }
}

/// A message's operations grouped by the hash slot of their keys, in the order of each slot's
/// first operation. A publish joins the group of the keyed operation before it (or of the first
/// one after it); publishes alone make a group of their channel's slot.
fn by_slot(ops: &[Op]) -> Vec<(HashSlot, Vec<&Op>)> {
    let mut groups: Vec<(HashSlot, Vec<&Op>)> = Vec::new();
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
        let index = match groups.iter().position(|(s, _)| *s == slot) {
            Some(index) => index,
            None => {
                groups.push((slot, Vec::new()));
                groups.len() - 1
            }
        };
        groups[index].1.append(&mut pending_publishes);
        groups[index].1.push(op);
        current = Some(index);
    }
    if let Some(first) = pending_publishes.first() {
        groups.push((key_slot(first.key()), pending_publishes));
    }
    groups
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

    /// One operation of every kind.
    fn every_op() -> Vec<Op> {
        vec![
            Op::Set {
                key: "s".into(),
                value: b"v".to_vec(),
                ttl_ms: Some(5),
            },
            Op::Del { key: "d".into() },
            Op::HashSet {
                key: "h".into(),
                fields: vec![("f".into(), b"1".to_vec()), ("g".into(), b"2".to_vec())],
            },
            Op::HashDel {
                key: "h".into(),
                fields: vec!["f".into()],
            },
            Op::SetAdd {
                key: "t".into(),
                members: vec!["a".into(), "b".into()],
            },
            Op::SetRemove {
                key: "t".into(),
                members: vec!["a".into()],
            },
            Op::SortedSetAdd {
                key: "z".into(),
                members: vec![(1.5, "a".into()), (f64::INFINITY, "b".into())],
            },
            Op::SortedSetRemove {
                key: "z".into(),
                members: vec!["a".into()],
            },
            Op::Expire {
                key: "s".into(),
                ttl_ms: 1,
            },
            Op::Publish {
                channel: "c".into(),
                message: b"m".to_vec(),
            },
        ]
    }

    #[test]
    fn the_script_knows_every_operation_and_the_member_prefix() {
        for op in &every_op() {
            let name = op.name();
            assert!(SCRIPT.contains(&format!(" {name} = ")), "{name}");
        }
        assert!(SCRIPT.contains(&format!("'{MEMBER_FIELD_PREFIX}' ..")));
        assert_eq!(VersionField::parse(KEY_FIELD), Some(VersionField::Key));
        assert_eq!(
            VersionField::parse("m:a:b"),
            Some(VersionField::Member("a:b"))
        );
        assert_eq!(VersionField::parse("x"), None);
    }

    /// A call as the script reads it: its keys, and per message its version and operations
    /// (name and arguments).
    type Message = (String, Vec<(String, Vec<String>)>);

    fn read(call: &Call) -> (Vec<String>, Vec<Message>) {
        let args: Vec<String> = call
            .cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(args[0], "EVALSHA");
        assert_eq!(args[1], script_sha());
        let n_keys: usize = args[2].parse().unwrap();
        let keys = args[3..3 + n_keys].to_vec();
        let mut rest = args[3 + n_keys..].iter().cloned();
        assert_eq!(rest.next().unwrap(), "1000");
        let mut messages: Vec<Message> = Vec::new();
        let mut rest = rest.peekable();
        while let Some(token) = rest.next() {
            let arity = match token.as_str() {
                "SET" | "PUBLISH" => Some(2),
                "DEL" => Some(0),
                "PEXPIRE" => Some(1),
                "HSET" | "HDEL" | "SADD" | "SREM" | "ZADD" | "ZREM" => None,
                _ => {
                    messages.push((token, Vec::new()));
                    continue;
                }
            };
            let n = arity.unwrap_or_else(|| rest.next().unwrap().parse().unwrap());
            let op_args = (0..n).map(|_| rest.next().unwrap()).collect();
            messages.last_mut().unwrap().1.push((token, op_args));
        }
        assert_eq!(messages.len(), call.messages.len());
        (keys, messages)
    }

    fn names(message: &Message) -> Vec<&str> {
        message.1.iter().map(|(name, _)| name.as_str()).collect()
    }

    fn calls(messages: &[Vec<&Op>], by_slot: bool) -> Vec<Call> {
        // Each message's answer, as a plugin returns it.
        let answers: Vec<Vec<Op>> = messages
            .iter()
            .map(|ops| ops.iter().map(|&op| op.clone()).collect())
            .collect();
        let mut calls = Calls::new("kw:v:", 1000, by_slot);
        for (index, ops) in answers.iter().enumerate() {
            calls.add(index, ops, Some(Version { lsn: 1, idx: 0 }));
        }
        calls.finish()
    }

    #[test]
    fn every_operation_is_written_as_the_script_reads_it() {
        let ops = every_op();
        let mut calls = Calls::new("kw:v:", 1000, false);
        calls.add(7, &ops, None);
        let calls = calls.finish();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].messages, [7]);
        let (keys, messages) = read(&calls[0]);
        assert_eq!(keys.len(), 2 * (ops.len() - 1));
        assert_eq!(keys[..4], ["s", "kw:v:{s}", "d", "kw:v:{d}"]);
        let (version, written) = &messages[0];
        assert_eq!(version, "");
        let expect = |name: &str, args: &[&str]| {
            (
                name.to_owned(),
                args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            written,
            &[
                expect("SET", &["v", "5"]),
                expect("DEL", &[]),
                expect("HSET", &["f", "1", "g", "2"]),
                expect("HDEL", &["f"]),
                expect("SADD", &["a", "b"]),
                expect("SREM", &["a"]),
                expect("ZADD", &["1.5", "a", "+inf", "b"]),
                expect("ZREM", &["a"]),
                expect("PEXPIRE", &["1"]),
                expect("PUBLISH", &["c", "m"]),
            ]
        );
    }

    #[test]
    fn one_call_per_hash_slot_carries_the_batch_in_order() {
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
        let batch = vec![
            vec![&publish, &a, &b, &sadd, &publish, &del_b],
            vec![],
            vec![&a],
            vec![&publish],
        ];
        let cluster = calls(&batch, true);
        assert_eq!(cluster.len(), 3);
        let (keys, messages) = read(&cluster[0]);
        assert_eq!(cluster[0].slot, key_slot("a"));
        assert_eq!(cluster[0].messages, [0, 2]);
        assert_eq!(
            keys,
            [
                "a",
                "kw:v:{a}",
                "{a}:index",
                "kw:v:{a}:index",
                "a",
                "kw:v:{a}"
            ]
        );
        assert_eq!(names(&messages[0]), ["PUBLISH", "SET", "SADD", "PUBLISH"]);
        assert_eq!(names(&messages[1]), ["SET"]);
        assert_eq!(messages[0].0, version_arg(Some(Version { lsn: 1, idx: 0 })));
        let (keys, messages) = read(&cluster[1]);
        assert_eq!(cluster[1].slot, key_slot("b"));
        assert_eq!(cluster[1].messages, [0]);
        assert_eq!(keys, ["b", "kw:v:{b}", "b", "kw:v:{b}"]);
        assert_eq!(names(&messages[0]), ["SET", "DEL"]);
        // Publishes alone: a call without keys, routed by the channel's slot.
        let (keys, messages) = read(&cluster[2]);
        assert_eq!(
            (cluster[2].slot, &cluster[2].messages),
            (key_slot("ch"), &vec![3])
        );
        assert!(keys.is_empty());
        assert_eq!(names(&messages[0]), ["PUBLISH"]);
        for call in &cluster {
            let (keys, _) = read(call);
            assert!(keys.iter().all(|k| key_slot(k) == call.slot));
        }
        // On a single Redis, one call for the batch, every message's operations in order.
        let single = calls(&batch, false);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].messages, [0, 2, 3]);
        let (_, messages) = read(&single[0]);
        assert_eq!(
            names(&messages[0]),
            ["PUBLISH", "SET", "SET", "SADD", "PUBLISH", "DEL"]
        );
        assert!(calls(&[vec![]], true).is_empty());
    }

    #[test]
    fn big_batches_are_split_by_messages_and_bytes() {
        let small = Op::Set {
            key: "k".to_owned(),
            value: b"v".to_vec(),
            ttl_ms: None,
        };
        let batch = vec![vec![&small]; CALL_MESSAGES + 3];
        let split = calls(&batch, false);
        assert_eq!(split.len(), 2);
        assert_eq!(split[0].messages.len(), CALL_MESSAGES);
        assert_eq!(
            split[1].messages,
            (CALL_MESSAGES..CALL_MESSAGES + 3).collect::<Vec<_>>()
        );
        let big = Op::Set {
            key: "k".to_owned(),
            value: vec![b'x'; CALL_BYTES / 2],
            ttl_ms: None,
        };
        let split = calls(&[vec![&big], vec![&big], vec![&big]], false);
        let carried: Vec<_> = split.iter().map(|call| call.messages.clone()).collect();
        assert_eq!(carried, [vec![0, 1], vec![2]]);
    }

    #[test]
    fn version_strings_order_like_versions() {
        let a = version_arg(Some(Version { lsn: 9, idx: 10 }));
        let b = version_arg(Some(Version { lsn: 10, idx: 0 }));
        let c = version_arg(Some(Version { lsn: 10, idx: 2 }));
        assert!(a < b && b < c);
        assert_eq!(version_arg(None), "");
        assert_eq!(parse_version(&a), Some(Version { lsn: 9, idx: 10 }));
        for (lsn, idx) in [(0, 0), (1, u64::MAX), (u64::MAX, 7), (10_u64.pow(19), 99)] {
            let version = Some(Version { lsn, idx });
            assert_eq!(version_arg(version), format!("{lsn:020}:{idx:020}"));
            assert_eq!(parse_version(&version_arg(version)), version);
        }
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
