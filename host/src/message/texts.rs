//! A message's texts in one buffer.
//!
//! A change message carries about ten texts (schema, table, record, changes, each primary key,
//! commit timestamp, idempotency key, metadata). Held as a `String` each, they were ten
//! allocations on the thread that decoded the message, read on others and freed on a third:
//! the allocator's share of keepwarm-kafka's time was larger than their instruction count
//! said (docs/bench.md, rounds 16 and 17). Here they are copied, once each as before, into one
//! buffer of exactly their total size, and each is a span of it.

use smallvec::SmallVec;
use std::fmt;

/// Where one text lies in [`Texts::buf`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Span {
    start: usize,
    end: usize,
}

/// The texts of one change message, in one buffer.
#[derive(Clone)]
pub(super) struct Texts {
    buf: Box<str>,
    pub(super) schema: Span,
    pub(super) table: Span,
    pub(super) record: Span,
    pub(super) changes: Option<Span>,
    pub(super) commit_timestamp: Span,
    pub(super) idempotency_key: Span,
    pub(super) metadata: Span,
    /// Most tables have a key of one or two columns.
    pks: SmallVec<[Span; 2]>,
}

/// The texts a message is built from, borrowed from what was decoded.
pub(super) struct Parts<'a, P> {
    pub(super) schema: &'a str,
    pub(super) table: &'a str,
    pub(super) record: &'a str,
    pub(super) changes: Option<&'a str>,
    pub(super) commit_timestamp: &'a str,
    pub(super) idempotency_key: &'a str,
    pub(super) metadata: &'a str,
    pub(super) pks: P,
}

impl Texts {
    /// Copies the parts into one buffer, allocated once at its final size.
    pub(super) fn new<'a, P>(parts: &Parts<'a, P>) -> Texts
    where
        P: Iterator<Item = &'a str> + Clone,
    {
        let singles = [
            parts.schema,
            parts.table,
            parts.record,
            parts.changes.unwrap_or_default(),
            parts.commit_timestamp,
            parts.idempotency_key,
            parts.metadata,
        ];
        let size = singles.iter().map(|t| t.len()).sum::<usize>()
            + parts.pks.clone().map(str::len).sum::<usize>();
        let mut buf = String::with_capacity(size);
        let mut push = |text: &str| {
            let start = buf.len();
            buf.push_str(text);
            Span {
                start,
                end: buf.len(),
            }
        };
        let [
            schema,
            table,
            record,
            changes,
            commit_timestamp,
            idempotency_key,
            metadata,
        ] = singles.map(&mut push);
        let pks = parts.pks.clone().map(push).collect();
        debug_assert_eq!(buf.len(), buf.capacity());
        Texts {
            // The capacity is the length: no reallocation.
            buf: buf.into_boxed_str(),
            schema,
            table,
            record,
            changes: parts.changes.map(|_| changes),
            commit_timestamp,
            idempotency_key,
            metadata,
            pks,
        }
    }

    /// One text, by its span.
    pub(super) fn get(&self, span: Span) -> &str {
        &self.buf[span.start..span.end]
    }

    /// The buffer every span lies in.
    pub(super) fn buf(&self) -> &str {
        &self.buf
    }

    /// Appends the layout of plugin contract 0.2.0 (`wit/keepwarm.wit`, `batch.layout`): the
    /// flags (1: a version, 2: `changes`), the start and length of schema, table, record,
    /// changes, commit timestamp, idempotency key and metadata, and the number of primary keys;
    /// and the keys' starts and lengths to `pks`. The buffer is at most `u32::MAX` bytes long
    /// (`ChangeMessage::build` refuses longer ones).
    pub(super) fn push_layout(&self, has_version: bool, layout: &mut Vec<u32>, pks: &mut Vec<u32>) {
        debug_assert!(u32::try_from(self.buf.len()).is_ok());
        #[allow(
            clippy::cast_possible_truncation,
            reason = "every offset is at most the buffer's length, which fits"
        )]
        let n = |x: usize| x as u32;
        let pair = |span: Span| [n(span.start), n(span.end - span.start)];
        let flags = u32::from(has_version) | (u32::from(self.changes.is_some()) << 1);
        layout.push(flags);
        for span in [
            self.schema,
            self.table,
            self.record,
            self.changes.unwrap_or_default(),
            self.commit_timestamp,
            self.idempotency_key,
            self.metadata,
        ] {
            layout.extend(pair(span));
        }
        layout.push(n(self.pks.len()));
        pks.extend(self.pks.iter().flat_map(|&span| pair(span)));
    }

    pub(super) fn pks(&self) -> Pks<'_> {
        Pks {
            texts: self,
            spans: self.pks.iter(),
        }
    }
}

/// The primary-key values of a message, in key-column order.
#[derive(Clone)]
pub struct Pks<'a> {
    texts: &'a Texts,
    spans: std::slice::Iter<'a, Span>,
}

impl<'a> Iterator for Pks<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let span = self.spans.next()?;
        Some(self.texts.get(*span))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl ExactSizeIterator for Pks<'_> {}

impl fmt::Debug for Pks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.clone()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_text_reads_back_from_one_buffer_of_their_total_size() {
        let parts = Parts {
            schema: "public",
            table: "orders",
            record: r#"{"id":1,"note":"héllo"}"#,
            changes: Some("{}"),
            commit_timestamp: "2025-03-14T09:26:53Z",
            idempotency_key: "a2V5",
            metadata: r#"{"x":1}"#,
            pks: ["1", "", "b:c"].into_iter(),
        };
        let texts = Texts::new(&parts);
        let get = |span| texts.get(span);
        assert_eq!(get(texts.schema), "public");
        assert_eq!(get(texts.table), "orders");
        assert_eq!(get(texts.record), parts.record);
        assert_eq!(texts.changes.map(get), Some("{}"));
        assert_eq!(get(texts.commit_timestamp), "2025-03-14T09:26:53Z");
        assert_eq!(get(texts.idempotency_key), "a2V5");
        assert_eq!(get(texts.metadata), r#"{"x":1}"#);
        assert_eq!(texts.pks().collect::<Vec<_>>(), ["1", "", "b:c"]);
        assert_eq!(texts.pks().len(), 3);
        let total = 6 + 6 + parts.record.len() + 2 + 20 + 4 + 7 + 1 + 3;
        assert_eq!(texts.buf.len(), total);
    }

    #[test]
    fn the_layout_of_contract_0_2_points_at_each_text() {
        let parts = Parts {
            schema: "public",
            table: "orders",
            record: r#"{"note":"héllo"}"#,
            changes: None,
            commit_timestamp: "t",
            idempotency_key: "k",
            metadata: "{}",
            pks: ["1", "b:c"].into_iter(),
        };
        let texts = Texts::new(&parts);
        let (mut layout, mut pks) = (vec![7], vec![9]);
        texts.push_layout(true, &mut layout, &mut pks);
        assert_eq!(layout.len(), 1 + 16);
        assert_eq!(layout[1], 1, "a version, no changes");
        let text = |i: usize| {
            let start = layout[2 + 2 * i] as usize;
            &texts.buf()[start..start + layout[3 + 2 * i] as usize]
        };
        let read: Vec<&str> = (0..7).map(text).collect();
        assert_eq!(read, ["public", "orders", parts.record, "", "t", "k", "{}"]);
        assert_eq!(layout[16], 2);
        let keys: Vec<&str> = pks[1..]
            .chunks(2)
            .map(|p| &texts.buf()[p[0] as usize..(p[0] + p[1]) as usize])
            .collect();
        assert_eq!(keys, ["1", "b:c"]);
        let mut parts = parts;
        parts.changes = Some("{}");
        let texts = Texts::new(&parts);
        let (mut layout, mut pks) = (Vec::new(), Vec::new());
        texts.push_layout(false, &mut layout, &mut pks);
        assert_eq!(layout[0], 2, "changes, no version");
    }

    #[test]
    fn absent_changes_stay_absent_and_an_empty_one_stays_empty() {
        let mut parts = Parts {
            schema: "s",
            table: "t",
            record: "{}",
            changes: None,
            commit_timestamp: "",
            idempotency_key: "",
            metadata: "{}",
            pks: std::iter::once("1"),
        };
        assert_eq!(Texts::new(&parts).changes, None);
        parts.changes = Some("");
        let texts = Texts::new(&parts);
        assert_eq!(texts.changes.map(|span| texts.get(span)), Some(""));
    }
}
