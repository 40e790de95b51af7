//! A batch as contract 0.2.0 carries it (`wit/keepwarm.wit`, record `batch`), read into
//! [`Change`]s and written from them.
//!
//! Each change's texts cross into the plugin as one string, and where each text lies as numbers
//! in flat lists: a few copies per batch, where one string per text (contract 0.1.0) cost a
//! call into the plugin and an allocation for each. [`export_plugin!`](crate::export_plugin)
//! reads every batch with [`changes`]; [`batch`] writes one, for tests that call a `Guest`
//! implementation by hand.

use std::ops::Range;

use crate::change::Spans;
use crate::{Change, WitBatch};

/// The numbers of `layout` per change.
const LAYOUT: usize = 16;
/// In a change's flags: it has a commit LSN and index.
const HAS_VERSION: u32 = 1;
/// In a change's flags: it has `changes`.
const HAS_CHANGES: u32 = 2;

/// The changes of a batch, in order; each keeps its texts string as it came.
///
/// # Errors
///
/// When the batch breaks the contract (a host's bug, not a plugin's): lists of lengths that do
/// not match, or a text that does not lie within its change's texts on character boundaries.
pub fn changes(batch: WitBatch) -> Result<Vec<Change>, String> {
    let WitBatch {
        actions,
        texts,
        layout,
        pks,
        versions,
    } = batch;
    let n = actions.len();
    if texts.len() != n
        || layout.len() != n * LAYOUT
        || versions.len() != n * 2
        || pks.len() % 2 != 0
    {
        return Err(format!(
            "malformed batch: {n} actions, {} texts, {} layout numbers, {} versions, {} primary-key numbers",
            texts.len(),
            layout.len(),
            versions.len(),
            pks.len()
        ));
    }
    let mut keys = pks.chunks_exact(2);
    let mut changes = Vec::with_capacity(n);
    for (i, (text, action)) in texts.into_iter().zip(actions).enumerate() {
        let numbers = &layout[i * LAYOUT..(i + 1) * LAYOUT];
        let span = |at: usize| range(&text, numbers[at], numbers[at + 1]);
        let flags = numbers[0];
        let spans = Spans {
            schema: span(1)?,
            table: span(3)?,
            record: span(5)?,
            changes: if flags & HAS_CHANGES == 0 {
                None
            } else {
                Some(span(7)?)
            },
            commit_timestamp: span(9)?,
            idempotency_key: span(11)?,
            metadata: span(13)?,
        };
        let own = (0..numbers[15])
            .map(|_| {
                let key = keys
                    .next()
                    .ok_or("malformed batch: fewer primary keys than the layout counts")?;
                Ok(text[range(&text, key[0], key[1])?].to_owned())
            })
            .collect::<Result<Vec<String>, String>>()?;
        let version = (flags & HAS_VERSION != 0).then(|| (versions[2 * i], versions[2 * i + 1]));
        changes.push(Change::from_texts(action, text, spans, own, version));
    }
    if keys.next().is_some() {
        return Err("malformed batch: more primary keys than the layout counts".to_owned());
    }
    Ok(changes)
}

/// `len` bytes of `text` from `start`, when they lie within it on character boundaries.
fn range(text: &str, start: u32, len: u32) -> Result<Range<usize>, String> {
    let start = start as usize;
    let end = start.saturating_add(len as usize);
    match text.get(start..end) {
        Some(_) => Ok(start..end),
        None => Err(format!(
            "malformed batch: bytes {start}..{end} do not lie within a change's texts of {} bytes on character boundaries",
            text.len()
        )),
    }
}

/// A batch of `changes`, as the host passes it.
///
/// # Panics
///
/// When a change's texts reach 4 GiB (the contract's offsets are 32-bit).
pub fn batch(changes: &[Change]) -> WitBatch {
    let mut batch = WitBatch {
        actions: Vec::with_capacity(changes.len()),
        texts: Vec::with_capacity(changes.len()),
        layout: Vec::with_capacity(changes.len() * LAYOUT),
        pks: Vec::new(),
        versions: Vec::with_capacity(changes.len() * 2),
    };
    let n = |x: usize| u32::try_from(x).expect("a change's texts reach 4 GiB");
    for change in changes {
        let (texts, spans) = change.texts();
        let mut text = texts.to_owned();
        for pk in change.pks() {
            batch.pks.extend([n(text.len()), n(pk.len())]);
            text.push_str(pk);
        }
        let flags = change.version().map_or(0, |_| HAS_VERSION)
            | spans.changes.as_ref().map_or(0, |_| HAS_CHANGES);
        batch.layout.push(flags);
        let none = 0..0;
        for span in [
            &spans.schema,
            &spans.table,
            &spans.record,
            spans.changes.as_ref().unwrap_or(&none),
            &spans.commit_timestamp,
            &spans.idempotency_key,
            &spans.metadata,
        ] {
            batch.layout.extend([n(span.start), n(span.len())]);
        }
        batch.layout.push(n(change.pks().len()));
        let (lsn, idx) = change.version().unwrap_or((0, 0));
        batch.versions.extend([lsn, idx]);
        batch.actions.push(change.action());
        batch.texts.push(text);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, fixtures};

    fn fixture_changes() -> Vec<Change> {
        fixtures::all()
            .iter()
            .map(|fixture| Change::from_message_json(&fixture.line).unwrap())
            .collect()
    }

    #[test]
    fn every_part_of_every_change_survives_a_batch() {
        let sent = fixture_changes();
        let got = changes(batch(&sent)).unwrap();
        assert_eq!(got.len(), sent.len());
        for (got, sent) in got.iter().zip(&sent) {
            assert_eq!(got.to_parts(), sent.to_parts());
        }
        assert_eq!(changes(batch(&[])).unwrap().len(), 0);
    }

    #[test]
    fn a_batch_that_breaks_the_contract_is_an_error_not_a_panic() {
        let sent = fixture_changes();
        let check = |alter: &dyn Fn(&mut WitBatch), expect: &str| {
            let mut wire = batch(&sent);
            alter(&mut wire);
            let error = changes(wire).unwrap_err();
            assert!(error.contains(expect), "{error}");
        };
        check(&|b| drop(b.texts.pop()), "12 actions, 11 texts");
        check(&|b| b.layout.truncate(191), "191 layout numbers");
        check(&|b| b.versions.truncate(23), "23 versions");
        check(&|b| b.pks.push(0), "primary-key numbers");
        check(&|b| b.pks.extend([0, 0]), "more primary keys");
        check(&|b| b.layout[11 * LAYOUT + 15] += 1, "fewer primary keys");
        check(&|b| b.layout[6] = u32::MAX, "do not lie within");
        // A span that cuts a character in two: "é" is two bytes.
        let mut wide = sent[0].to_parts();
        wide.schema = "é".to_owned();
        let wide = [Change::from(wide)];
        let mut wire = batch(&wide);
        wire.layout[2] = 1;
        assert!(changes(wire).unwrap_err().contains("character boundaries"));
    }

    #[test]
    fn flags_say_which_changes_have_a_version_and_old_values() {
        let sent = fixture_changes();
        let wire = batch(&sent);
        for (i, change) in sent.iter().enumerate() {
            let flags = wire.layout[i * LAYOUT];
            assert_eq!(flags & HAS_VERSION != 0, change.version().is_some());
            assert_eq!(flags & HAS_CHANGES != 0, change.old_json().is_some());
            assert_eq!(change.action() == Action::Read, change.version().is_none());
        }
    }
}
