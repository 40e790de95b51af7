//! The fields of `metadata` that keepwarm reads.
//!
//! Sequin's metadata is about 500 bytes of which keepwarm needs seven plain fields. The usual
//! metadata (no escapes in those fields, each once) is read in one pass of [`json_scan`] that
//! also checks its syntax and depth: its own ([`scanned`], a stream entry's field), or that of
//! the message object around it ([`Gather`], fed by the message's pass). Anything else is read
//! by serde_json, which decides and words the error. Both give the same fields for the same text
//! (`metadata_fields_*` tests, and the decoder's property tests).

use super::json_scan;
use serde::Deserialize;
use std::borrow::Cow;
use std::ops::Range;

/// The fields of `metadata` that keepwarm reads; the rest is passed through as text. The texts
/// are borrowed from the metadata unless serde_json had to unescape them.
#[derive(Deserialize, Debug, PartialEq)]
pub(super) struct MetadataWire<'a> {
    #[serde(borrow)]
    pub(super) table_schema: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) table_name: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) commit_timestamp: Cow<'a, str>,
    pub(super) commit_lsn: Option<u64>,
    pub(super) commit_idx: Option<u64>,
    #[serde(borrow)]
    pub(super) idempotency_key: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) record_pks: Vec<Cow<'a, str>>,
}

/// How `metadata` was read.
pub(super) enum Read<'a> {
    /// In one pass, which also vouched for its syntax and depth.
    Scanned(MetadataWire<'a>),
    /// By serde_json; its depth is still to be checked.
    Parsed(MetadataWire<'a>),
}

/// Reads the fields from `text`, which starts with `{`.
///
/// # Errors
///
/// serde_json's error: invalid JSON, a missing field, a field of the wrong type.
pub(super) fn read(text: &str) -> Result<Read<'_>, serde_json::Error> {
    match scanned(text) {
        Some(fields) => Ok(Read::Scanned(fields)),
        None => serde_json::from_str(text).map(Read::Parsed),
    }
}

/// The fields from one scan, or `None` when the text is unusual in any way that serde_json may
/// read differently: invalid or too deep, a key written with escapes, a field given twice, an
/// escape in a value, a number that is not a plain `u64`, a missing field.
pub(super) fn scanned(text: &str) -> Option<MetadataWire<'_>> {
    let mut gather = Gather::default();
    let valid = json_scan::scan_object(text.as_bytes(), |key, value| {
        gather.field(text, key, value);
    });
    if !valid {
        return None;
    }
    gather.finish(text)
}

/// The fields' values, gathered field by field while some scan vouches for the object they are
/// in (the metadata on its own, or the message around it).
#[derive(Default)]
pub(super) struct Gather {
    values: [Option<Range<usize>>; 7],
    unusual: bool,
}

impl Gather {
    /// One field of the object, by the ranges of its key and value in `text`. The slots are in
    /// [`MetadataWire`]'s order.
    pub(super) fn field(&mut self, text: &str, key: Range<usize>, value: Range<usize>) {
        let key = &text.as_bytes()[key];
        // By length first, then one comparison of whole words: a `match` on byte-string
        // patterns compares byte by byte, and each name in turn cost more still, once per field
        // of every message (docs/bench.md, round 15).
        let slot = match key.len() {
            10 if key == b"table_name" => 1,
            10 if key == b"commit_lsn" => 3,
            10 if key == b"commit_idx" => 4,
            10 if key == b"record_pks" => 6,
            12 if key == b"table_schema" => 0,
            15 if key == b"idempotency_key" => 5,
            16 if key == b"commit_timestamp" => 2,
            // A key written with escapes may spell one of the names (ten letters at least);
            // any other key serde_json skips too.
            _ => {
                self.unusual |= json_scan::may_spell_a_name(key, 10);
                return;
            }
        };
        self.unusual |= self.values[slot].replace(value).is_some();
    }

    /// The fields, read from `text` (where the ranges are), once a scan has vouched for the
    /// whole object; `None` as for [`scanned`].
    pub(super) fn finish(self, text: &str) -> Option<MetadataWire<'_>> {
        if self.unusual {
            return None;
        }
        let [schema, table, timestamp, lsn, idx, key, pks] = self.values;
        let string =
            |range: Option<Range<usize>>| plain_string(text.get(range?)?).map(Cow::Borrowed);
        let number = |range: Option<Range<usize>>| match range {
            None => Some(None),
            Some(range) => plain_u64(text.get(range)?),
        };
        Some(MetadataWire {
            table_schema: string(schema)?,
            table_name: string(table)?,
            commit_timestamp: string(timestamp)?,
            commit_lsn: number(lsn)?,
            commit_idx: number(idx)?,
            idempotency_key: string(key)?,
            record_pks: plain_strings(text.get(pks?)?)?,
        })
    }
}

/// The contents of a JSON string without escapes (the scan has checked the rest).
fn plain_string(value: &str) -> Option<&str> {
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.as_bytes().contains(&b'\\')).then_some(inner)
}

/// `null`, or digits that fit a `u64` (the scan has ruled out leading zeros).
fn plain_u64(value: &str) -> Option<Option<u64>> {
    if value == "null" {
        return Some(None);
    }
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().map(Some)
}

/// An array of strings without escapes, e.g. `["1", "a,b"]`. Read byte by byte: `str`'s
/// patterns decode characters and set up searchers, several times the cost for keys this short.
fn plain_strings(value: &str) -> Option<Vec<Cow<'_, str>>> {
    let inner = value.strip_prefix('[')?.strip_suffix(']')?;
    let bytes = inner.as_bytes();
    let skip_whitespace = |mut at: usize| {
        while bytes.get(at).is_some_and(|&b| json_scan::is_whitespace(b)) {
            at += 1;
        }
        at
    };
    let mut strings = Vec::new();
    let mut at = skip_whitespace(0);
    while at < bytes.len() {
        if bytes[at] != b'"' {
            return None;
        }
        let start = at + 1;
        // Without escapes, each string ends at the next quote.
        let end = start
            + bytes[start..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\')?;
        if bytes[end] != b'"' {
            return None;
        }
        strings.push(Cow::Borrowed(&inner[start..end]));
        at = skip_whitespace(end + 1);
        if at < bytes.len() {
            if bytes[at] != b',' {
                return None;
            }
            at = skip_whitespace(at + 1);
        }
    }
    Some(strings)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQUIN: &str = r#"{"table_schema":"public","table_name":"orders","commit_timestamp":"2025-03-14T09:26:53.601022Z","commit_lsn":1243361160,"commit_idx":0,"database_name":"shop","transaction_annotations":null,"idempotency_key":"MTI0MzM2MTE2MDow","record_pks":["1001"],"consumer":{"id":"0b7e","name":"shop-cdc","annotations":{}}}"#;

    /// The scan's fields, checked against serde_json's, or `None` when it defers.
    fn scan(text: &str) -> Option<MetadataWire<'_>> {
        let fields = scanned(text)?;
        let exact: MetadataWire = serde_json::from_str(text).unwrap();
        assert_eq!(fields, exact, "{text}");
        Some(fields)
    }

    #[test]
    fn metadata_fields_of_usual_metadata_come_from_the_scan() {
        let fields = scan(SEQUIN).unwrap();
        assert_eq!(fields.table_name, "orders");
        assert_eq!(
            (fields.commit_lsn, fields.commit_idx),
            (Some(1243361160), Some(0))
        );
        assert_eq!(fields.record_pks, ["1001"]);
        let read = SEQUIN
            .replace(
                r#""commit_lsn":1243361160,"commit_idx":0,"#,
                r#""commit_lsn":null,"#,
            )
            .replace(r#"["1001"]"#, r#" [ "ams-1" , "SKU,42" ] "#);
        let fields = scan(&read).unwrap();
        assert_eq!((fields.commit_lsn, fields.commit_idx), (None, None));
        assert_eq!(fields.record_pks, ["ams-1", "SKU,42"]);
        let max = SEQUIN.replace("1243361160", &u64::MAX.to_string());
        assert_eq!(scan(&max).unwrap().commit_lsn, Some(u64::MAX));
        // Keys too short to spell a name with escapes are skipped, escaped or not; longer
        // ones with escapes are left to serde_json.
        for (to, deferred) in [
            (r"db\n", false),
            (r"c\u006fnsumer", false),
            (r"ab\u005fcdefgh", false),
            (r"abc\u005fcdefgh", true),
        ] {
            let text = SEQUIN.replace("database_name", to);
            assert_eq!(scan(&text).is_none(), deferred, "{text}");
        }
        assert_eq!(
            scan(&SEQUIN.replace(r#"["1001"]"#, "[]"))
                .unwrap()
                .record_pks,
            [""; 0]
        );
    }

    #[test]
    fn primary_keys_read_byte_by_byte_match_serde_json_or_defer_to_it() {
        for text in [
            "[]",
            "[ ]",
            r#"["1001"]"#,
            "[\n\t\"a\" ,\r\"b,c\" , \"\" ]",
            r#"["ünï", "日本"]"#,
        ] {
            let exact: Vec<String> = serde_json::from_str(text).unwrap();
            assert_eq!(
                plain_strings(text),
                Some(exact.into_iter().map(Cow::Owned).collect()),
                "{text}"
            );
        }
        // Escapes, other values and nesting are serde_json's to read (or refuse).
        for text in [
            r#"["a\"b"]"#,
            r#"["a\\"]"#,
            "[1]",
            r#"["a", 1]"#,
            r#"[["a"]]"#,
            r#"["a" "b"]"#,
        ] {
            assert_eq!(plain_strings(text), None, "{text}");
        }
    }

    #[test]
    fn metadata_fields_serde_json_may_read_otherwise_are_left_to_it() {
        for (from, to) in [
            (r#""table_name":"orders""#, r#""table_name":"ord\u0065rs""#),
            (r#""table_name":"orders""#, r#""table\u005fname":"orders""#),
            (
                r#""table_name":"orders""#,
                r#""table_name":"orders","table_name":"x""#,
            ),
            (r#""commit_idx":0"#, r#""commit_idx":1.0"#),
            (r#""commit_idx":0"#, r#""commit_idx":-1"#),
            (r#""commit_idx":0"#, r#""commit_idx":18446744073709551616"#),
            (r#""commit_idx":0"#, r#""commit_idx":"0""#),
            (r#"["1001"]"#, "[1001]"),
            (r#"["1001"]"#, r#"["10\"01"]"#),
            (r#"["1001"]"#, r#""1001""#),
            (r#""table_name":"orders","#, ""),
            (r#""table_name":"orders""#, r#""table_name":null"#),
            (r#""consumer":{"#, r#""consumer":{"deep":[[[[]]]],"#),
        ] {
            let text = SEQUIN.replace(from, to);
            assert_ne!(text, SEQUIN, "{from}");
            let deferred = scanned(&text).is_none();
            // (The last one is usual: it only checks that nested values are skipped.)
            assert_eq!(deferred, !text.contains("deep"), "{text}");
        }
        assert!(scanned(&format!("{SEQUIN} x")).is_none());
        assert!(scanned(&format!("[{SEQUIN}]")).is_none());
    }
}
