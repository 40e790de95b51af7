//! row-cache's transform under one of the layouts of the contract (feature `old`, `packed`,
//! `flat`, `answers` or `answersref`; see README.md).

#[cfg(feature = "old")]
wit_bindgen::generate!({ path: "../wit-old", world: "plugin" });
#[cfg(feature = "packed")]
wit_bindgen::generate!({ path: "../wit-packed", world: "plugin" });
#[cfg(feature = "flat")]
wit_bindgen::generate!({ path: "../wit-flat", world: "plugin" });
#[cfg(feature = "answers")]
wit_bindgen::generate!({ path: "../wit-answers", world: "plugin" });
#[cfg(feature = "answers")]
use exports::proto::answers::transform::{Batch, Guest};

/// The answers of a batch, as `answers` in make_wit.py says (returned as a tuple).
#[cfg(feature = "answers")]
struct Answers {
    ops: Vec<u32>,
    bytes: Vec<u8>,
}
#[cfg(feature = "flat")]
use exports::proto::flat::transform::{Batch, ChangeResult, Guest};
#[cfg(feature = "old")]
use exports::proto::old::transform::{Change, ChangeResult, Guest};
#[cfg(feature = "packed")]
use exports::proto::packed::transform::{Batch, ChangeResult, Guest};
#[cfg(feature = "flat")]
use proto::flat::types::{Action, Op, SetOp};
#[cfg(feature = "old")]
use proto::old::types::{Action, Op, SetOp};
#[cfg(feature = "packed")]
use proto::packed::types::{Action, Op, SetOp, Span};

const UNCHANGED_TOAST: &str = "unchanged_toast";

/// The SDK's prefilter (`guest-sdk/src/change.rs`), repeated here: the prototype does without
/// the SDK so that only the contract's layout differs between its builds.
fn may_hold_toast(json: &[u8]) -> bool {
    const QUOTED: &[u8] = b"\"unchanged_toast\"";
    memchr::memchr_iter(b'u', json).any(|u| match u.checked_sub(1).map(|at| json[at]) {
        Some(b'\\') => true,
        Some(b'"') => json[u - 1..].starts_with(QUOTED),
        _ => false,
    })
}

fn has_toast(record: &str) -> bool {
    if !may_hold_toast(record.as_bytes()) {
        return false;
    }
    match serde_json::from_str::<serde_json::Value>(record) {
        Ok(serde_json::Value::Object(c)) => c.values().any(|v| v == UNCHANGED_TOAST),
        _ => false,
    }
}

#[cfg(not(feature = "answers"))]
fn one<'a>(
    action: Action,
    schema: &str,
    table: &str,
    pks: impl Iterator<Item = &'a str>,
    record: &str,
) -> ChangeResult {
    let mut key = String::with_capacity(schema.len() + table.len() + 24);
    key.push_str(schema);
    key.push('.');
    key.push_str(table);
    key.push(':');
    for (n, pk) in pks.enumerate() {
        if n > 0 {
            key.push(':');
        }
        key.push_str(pk);
    }
    let op = match action {
        Action::Delete => Op::Del(key),
        Action::Update if has_toast(record) => Op::Del(key),
        _ => Op::Set(SetOp {
            key,
            value: record.as_bytes().to_vec(),
            ttl_ms: None,
        }),
    };
    Ok(vec![op])
}

struct G;

#[cfg(feature = "old")]
impl Guest for G {
    fn handle_batch(changes: Vec<Change>) -> Vec<ChangeResult> {
        changes
            .iter()
            .map(|c| {
                one(
                    c.action,
                    &c.schema,
                    &c.table,
                    c.pks.iter().map(|s| s.as_str()),
                    &c.record,
                )
            })
            .collect()
    }
}

#[cfg(feature = "packed")]
fn text<'a>(texts: &'a str, s: &Span) -> &'a str {
    &texts[s.start as usize..(s.start + s.len) as usize]
}

#[cfg(feature = "packed")]
impl Guest for G {
    fn handle_batch(batch: Batch) -> Vec<ChangeResult> {
        let pks = &batch.pks;
        batch
            .changes
            .iter()
            .map(|c| {
                let own = &pks[c.pks_first as usize..(c.pks_first + c.pks_count) as usize];
                one(
                    c.action,
                    text(&c.texts, &c.schema),
                    text(&c.texts, &c.table),
                    own.iter().map(|s| text(&c.texts, s)),
                    text(&c.texts, &c.record),
                )
            })
            .collect()
    }
}

#[cfg(feature = "flat")]
impl Guest for G {
    fn handle_batch(batch: Batch) -> Vec<ChangeResult> {
        let Batch {
            texts, layout, pks, ..
        } = batch;
        texts
            .iter()
            .zip(layout.chunks_exact(17))
            .map(|(t, l)| {
                let at = |i: usize| &t[l[i] as usize..(l[i] + l[i + 1]) as usize];
                let action = match l[0] {
                    0 => Action::Insert,
                    1 => Action::Update,
                    2 => Action::Delete,
                    _ => Action::Read,
                };
                let own = &pks[2 * l[15] as usize..2 * (l[15] + l[16]) as usize];
                one(
                    action,
                    at(1),
                    at(3),
                    own.chunks_exact(2)
                        .map(|p| &t[p[0] as usize..(p[0] + p[1]) as usize]),
                    at(5),
                )
            })
            .collect()
    }
}

/// Appends the answer to one change: its key written straight into `bytes`, its value copied
/// there too or (`answersref`) given as the span of the record in the change's texts.
#[cfg(feature = "answers")]
fn answer<'a>(
    out: &mut Answers,
    index: u32,
    action: u32,
    key_parts: [&str; 2],
    pks: impl Iterator<Item = &'a str>,
    record: &str,
    record_span: (u32, u32),
) {
    let bytes = &mut out.bytes;
    let key_start = bytes.len() as u32;
    bytes.extend_from_slice(key_parts[0].as_bytes());
    bytes.push(b'.');
    bytes.extend_from_slice(key_parts[1].as_bytes());
    bytes.push(b':');
    for (n, pk) in pks.enumerate() {
        if n > 0 {
            bytes.push(b':');
        }
        bytes.extend_from_slice(pk.as_bytes());
    }
    let key_len = bytes.len() as u32 - key_start;
    // 0 insert, 1 update, 2 delete, 3 read (the flat layout's first number).
    let delete = action == 2 || (action == 1 && has_toast(record));
    let (kind, value) = if delete {
        (1, (0, 0))
    } else if cfg!(feature = "answersref") {
        (256, record_span)
    } else {
        let start = bytes.len() as u32;
        bytes.extend_from_slice(record.as_bytes());
        (0, (start, record.len() as u32))
    };
    out.ops
        .extend([index, kind, key_start, key_len, value.0, value.1]);
}

#[cfg(feature = "answers")]
impl Guest for G {
    fn handle_batch(batch: Batch) -> (Vec<u32>, Vec<u8>) {
        let Batch {
            texts, layout, pks, ..
        } = batch;
        let mut out = Answers {
            ops: Vec::with_capacity(texts.len() * 6),
            bytes: Vec::with_capacity(texts.iter().map(|t| t.len()).sum::<usize>() / 2),
        };
        for (index, (t, l)) in texts.iter().zip(layout.chunks_exact(17)).enumerate() {
            let at = |i: usize| &t[l[i] as usize..(l[i] + l[i + 1]) as usize];
            let own = &pks[2 * l[15] as usize..2 * (l[15] + l[16]) as usize];
            answer(
                &mut out,
                index as u32,
                l[0],
                [at(1), at(3)],
                own.chunks_exact(2)
                    .map(|p| &t[p[0] as usize..(p[0] + p[1]) as usize]),
                at(5),
                (l[5], l[6]),
            );
        }
        (out.ops, out.bytes)
    }
}

export!(G);
