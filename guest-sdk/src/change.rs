//! [`Change`]: one change to one row, with typed access to its parts.
//!
//! The record arrives as JSON text exactly as Sequin sent it. [`Change::record_json`] hands that
//! text out untouched (cache it as is); [`Change::record`] and [`Change::record_value`] parse it.
//! With `serde_json`'s `arbitrary_precision`, parsed numbers keep their digits, so a 64-bit id
//! beyond 2^53 survives a parse (only exponents are normalised: `1.0e20` reads back `1.0e+20`).
//!
//! ```
//! use keepwarm_guest::{Action, Change};
//!
//! let line = r#"{"record":{"id":9007199254740993,"total":"149.90"},"changes":null,"action":"insert",
//!   "metadata":{"table_schema":"public","table_name":"orders","commit_timestamp":"2025-03-14T09:26:53.601022Z",
//!   "commit_lsn":1243361160,"commit_idx":0,"idempotency_key":"MTI0MzM2MTE2MDow","record_pks":["9007199254740993"]}}"#;
//! let change = Change::from_message_json(line).unwrap();
//! assert_eq!(change.action(), Action::Insert);
//! assert_eq!(change.record_json(), r#"{"id":9007199254740993,"total":"149.90"}"#);
//! assert_eq!(change.record_value().unwrap()["id"].to_string(), "9007199254740993");
//! assert_eq!(change.version(), Some((1243361160, 0)));
//! ```

use std::cell::OnceCell;
use std::ops::Range;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Action;

/// The placeholder Sequin writes for an unchanged TOASTed column of an update.
const UNCHANGED_TOAST: &str = "unchanged_toast";

/// The parts of a change, each on its own: what [`Change::to_parts`] gives and
/// [`Change::from`] takes, to build or alter a change in tests and native tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeParts {
    /// What happened to the row.
    pub action: Action,
    /// The Postgres schema of the table.
    pub schema: String,
    /// The table name.
    pub table: String,
    /// The row as JSON object text.
    pub record: String,
    /// For updates, the old values as JSON object text.
    pub changes: Option<String>,
    /// The primary-key values, in primary-key column order.
    pub pks: Vec<String>,
    /// The commit LSN; the change has a version only with both it and `commit_idx`.
    pub commit_lsn: Option<u64>,
    /// The position of the change within its transaction.
    pub commit_idx: Option<u64>,
    /// The commit time (RFC 3339, UTC).
    pub commit_timestamp: String,
    /// Sequin's idempotency key.
    pub idempotency_key: String,
    /// The whole `metadata` object as JSON text.
    pub metadata: String,
}

/// Where each text of a change lies in its `texts`, in the order of the contract's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Spans {
    pub(crate) schema: Range<usize>,
    pub(crate) table: Range<usize>,
    pub(crate) record: Range<usize>,
    /// `None` when the change has no `changes`.
    pub(crate) changes: Option<Range<usize>>,
    pub(crate) commit_timestamp: Range<usize>,
    pub(crate) idempotency_key: Range<usize>,
    pub(crate) metadata: Range<usize>,
}

/// One change to one row, as the host delivered it.
///
/// Its texts arrive in one string (contract 0.2.0, `wit/keepwarm.wit`), and are handed out as
/// slices of it; the record JSON is parsed at most once, on first use.
#[derive(Clone, Debug)]
pub struct Change {
    action: Action,
    /// Every text of the change; `spans` says where each lies (checked on arrival).
    texts: String,
    spans: Spans,
    pks: Vec<String>,
    version: Option<(u64, u64)>,
    /// `record` parsed, filled on first use.
    record: OnceCell<Result<Value, String>>,
}

impl Change {
    /// A change from its texts and where each lies, as [`crate::wire`] reads them off a batch.
    /// The spans must lie in `texts` on character boundaries (the caller checked).
    pub(crate) fn from_texts(
        action: Action,
        texts: String,
        spans: Spans,
        pks: Vec<String>,
        version: Option<(u64, u64)>,
    ) -> Change {
        Change {
            action,
            texts,
            spans,
            pks,
            version,
            record: OnceCell::new(),
        }
    }

    /// Its texts and where each lies, as [`crate::wire`] writes them into a batch.
    pub(crate) fn texts(&self) -> (&str, &Spans) {
        (&self.texts, &self.spans)
    }

    fn text(&self, span: &Range<usize>) -> &str {
        &self.texts[span.clone()]
    }

    /// What happened to the row.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The Postgres schema of the table, e.g. `public`.
    pub fn schema(&self) -> &str {
        self.text(&self.spans.schema)
    }

    /// The table name (a partition reports its parent's name).
    pub fn table(&self) -> &str {
        self.text(&self.spans.table)
    }

    /// The row as JSON object text, byte for byte as delivered.
    ///
    /// For a delete this is the old row; unless the table has `REPLICA IDENTITY FULL`, only its
    /// primary-key columns are set and the others are `null`.
    pub fn record_json(&self) -> &str {
        self.text(&self.spans.record)
    }

    /// The row deserialized into `T`.
    ///
    /// `numeric` columns are JSON strings (`"149.90"`); `int8` may exceed 2^53, so prefer `i64`
    /// or `u64` over `f64` for integer columns.
    ///
    /// # Errors
    ///
    /// When the record does not fit `T`; the message names the problem.
    pub fn record<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(self.record_json()).map_err(|error| format!("record: {error}"))
    }

    /// The row as a JSON value (an object), parsed once and kept.
    ///
    /// Numbers keep their digits (`arbitrary_precision`), so big integers stay exact; exponents
    /// are normalised (`1.0e20` becomes `1.0e+20`). Use [`Change::record_json`] for the exact text.
    ///
    /// # Errors
    ///
    /// When the record is not valid JSON.
    pub fn record_value(&self) -> Result<&Value, String> {
        self.record
            .get_or_init(|| {
                serde_json::from_str(self.record_json()).map_err(|error| format!("record: {error}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// For updates, the old values of the changed columns as JSON object text, `{}` when the
    /// table's replica identity is not FULL. `None` for insert, delete and read.
    pub fn old_json(&self) -> Option<&str> {
        self.spans.changes.as_ref().map(|span| self.text(span))
    }

    /// The old values of [`Change::old_json`], parsed.
    ///
    /// # Errors
    ///
    /// When the text is not valid JSON.
    pub fn old_values(&self) -> Result<Option<Value>, String> {
        self.old_json()
            .map(|json| serde_json::from_str(json).map_err(|error| format!("changes: {error}")))
            .transpose()
    }

    /// The primary-key values as strings, in primary-key column order.
    pub fn pks(&self) -> &[String] {
        &self.pks
    }

    /// The version of the change: `(commit LSN, position in the transaction)`. `None` for
    /// backfill reads, which have neither.
    pub fn version(&self) -> Option<(u64, u64)> {
        self.version
    }

    /// The commit time (RFC 3339, UTC); for reads, the time the row was read.
    pub fn commit_timestamp(&self) -> &str {
        self.text(&self.spans.commit_timestamp)
    }

    /// Sequin's idempotency key for this change.
    pub fn idempotency_key(&self) -> &str {
        self.text(&self.spans.idempotency_key)
    }

    /// The whole `metadata` object of the message as JSON text.
    pub fn metadata_json(&self) -> &str {
        self.text(&self.spans.metadata)
    }

    /// The `metadata` object deserialized into `T`, e.g. to read `transaction_annotations`.
    ///
    /// # Errors
    ///
    /// When the metadata does not fit `T`.
    pub fn metadata<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_str(self.metadata_json()).map_err(|error| format!("metadata: {error}"))
    }

    /// Whether a top-level column of the record holds the string `"unchanged_toast"`: Sequin's
    /// placeholder for a TOASTed value the update did not carry. Never cache such a record.
    ///
    /// A record that is not a JSON object has no such column.
    pub fn has_unchanged_toast(&self) -> bool {
        if !may_hold_toast(self.record_json().as_bytes()) {
            return false;
        }
        match self.record_value() {
            Ok(Value::Object(columns)) => columns.values().any(|value| value == UNCHANGED_TOAST),
            _ => false,
        }
    }

    /// The change's parts, each on its own.
    pub fn to_parts(&self) -> ChangeParts {
        ChangeParts {
            action: self.action,
            schema: self.schema().to_owned(),
            table: self.table().to_owned(),
            record: self.record_json().to_owned(),
            changes: self.old_json().map(str::to_owned),
            pks: self.pks.clone(),
            commit_lsn: self.version.map(|(lsn, _)| lsn),
            commit_idx: self.version.map(|(_, idx)| idx),
            commit_timestamp: self.commit_timestamp().to_owned(),
            idempotency_key: self.idempotency_key().to_owned(),
            metadata: self.metadata_json().to_owned(),
        }
    }
}

impl From<ChangeParts> for Change {
    fn from(parts: ChangeParts) -> Change {
        let mut texts = String::new();
        let mut push = |text: &str| {
            let start = texts.len();
            texts.push_str(text);
            start..texts.len()
        };
        let spans = Spans {
            schema: push(&parts.schema),
            table: push(&parts.table),
            record: push(&parts.record),
            changes: parts.changes.as_deref().map(&mut push),
            commit_timestamp: push(&parts.commit_timestamp),
            idempotency_key: push(&parts.idempotency_key),
            metadata: push(&parts.metadata),
        };
        let version = parts.commit_lsn.zip(parts.commit_idx);
        Change::from_texts(parts.action, texts, spans, parts.pks, version)
    }
}

/// Whether `json` may hold the string `"unchanged_toast"`: its text appears quoted, or a `\u`
/// escape could spell it (no other JSON escape makes a letter). False means it surely does not,
/// and spares parsing the record.
///
/// Either way a `u` follows a quote or a backslash, so only the `u`s are looked at (`memchr`,
/// several bytes at a time): two `str::contains` searches were half of row-cache's time inside
/// WebAssembly.
fn may_hold_toast(json: &[u8]) -> bool {
    const QUOTED: &[u8] = b"\"unchanged_toast\"";
    memchr::memchr_iter(b'u', json).any(|u| match u.checked_sub(1).map(|at| json[at]) {
        Some(b'\\') => true,
        Some(b'"') => json[u - 1..].starts_with(QUOTED),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn change(record: &str, action: Action) -> Change {
        Change::from(ChangeParts {
            action,
            schema: "public".to_owned(),
            table: "t".to_owned(),
            record: record.to_owned(),
            changes: None,
            pks: vec!["1".to_owned()],
            commit_lsn: None,
            commit_idx: None,
            commit_timestamp: String::new(),
            idempotency_key: String::new(),
            metadata: "{}".to_owned(),
        })
    }

    fn check_toast(record: &str, expect: bool) {
        assert_eq!(
            change(record, Action::Update).has_unchanged_toast(),
            expect,
            "{record}"
        );
    }

    #[test]
    fn toast_is_a_top_level_string_value() {
        check_toast(r#"{"id":1,"body":"unchanged_toast"}"#, true);
        check_toast(r#"{"id":1,"body":"unchanged\u005ftoast"}"#, true);
        check_toast(r#"{"id":1,"body":"text"}"#, false);
        check_toast(r#"{"id":1,"doc":{"body":"unchanged_toast"}}"#, false);
        check_toast(r#"{"id":1,"tags":["unchanged_toast"]}"#, false);
        check_toast(r#"{"unchanged_toast":1}"#, false);
        check_toast(r#"{"body":"unchanged_toast "}"#, false);
        check_toast(r#"not json "unchanged_toast""#, false);
    }

    #[test]
    fn only_quoted_placeholders_and_unicode_escapes_pass_the_prefilter() {
        for (json, expect) in [
            (r#"{"id":1,"body":"unchanged_toast"}"#, true),
            (r#"{"unchanged_toast":1}"#, true),
            (r#"{"id":1,"body":"unchanged\u005ftoast"}"#, true),
            (r#"{"id":1,"body":"\\u"}"#, true),
            (r#"{"id":1,"body":"text"}"#, false),
            (r#"{"id":1,"body":"unchanged_toast "}"#, false),
            (r#"{"id":1,"body":"x unchanged_toast"}"#, false),
            (r#"{"id":1,"body":"line\nbreak \"quoted\""}"#, false),
            (r#"{"id":1,"body":"unchanged_toas"#, false),
            ("", false),
        ] {
            assert_eq!(may_hold_toast(json.as_bytes()), expect, "{json}");
        }
    }

    #[test]
    fn only_the_documents_fixture_holds_toast() {
        for (n, fixture) in fixtures::all().iter().enumerate() {
            let change = Change::from_message_json(&fixture.line).unwrap();
            assert_eq!(
                change.has_unchanged_toast(),
                fixture.table == "documents",
                "line {n}"
            );
        }
    }

    #[test]
    fn version_needs_lsn_and_index() {
        let mut parts = change("{}", Action::Read).to_parts();
        assert_eq!(Change::from(parts.clone()).version(), None);
        parts.commit_lsn = Some(7);
        assert_eq!(Change::from(parts.clone()).version(), None);
        parts.commit_idx = Some(2);
        assert_eq!(Change::from(parts).version(), Some((7, 2)));
    }

    #[test]
    fn record_parses_typed_and_keeps_big_integers() {
        #[derive(serde::Deserialize)]
        struct Row {
            id: u64,
            price: String,
        }
        let change = change(
            r#"{"id":9007199254740993,"price":"4.50","x":1.0e20}"#,
            Action::Insert,
        );
        let row: Row = change.record().unwrap();
        assert_eq!((row.id, row.price.as_str()), (9007199254740993, "4.50"));
        let value = change.record_value().unwrap();
        assert_eq!(value["id"].to_string(), "9007199254740993");
        assert_eq!(value["x"].to_string(), "1.0e+20");
        let error = change.record::<Vec<u8>>().unwrap_err();
        assert!(error.starts_with("record: invalid type: map"), "{error}");
    }

    #[test]
    fn record_value_reports_invalid_json_every_time() {
        let change = change("{", Action::Insert);
        let first = change.record_value().unwrap_err();
        assert!(first.starts_with("record: EOF"), "{first}");
        assert_eq!(change.record_value().unwrap_err(), first);
    }

    #[test]
    fn old_values_follow_changes() {
        let mut parts = change("{}", Action::Update).to_parts();
        assert_eq!(Change::from(parts.clone()).old_values(), Ok(None));
        parts.changes = Some(r#"{"status":"pending"}"#.to_owned());
        let change = Change::from(parts);
        assert_eq!(change.old_json(), Some(r#"{"status":"pending"}"#));
        assert_eq!(
            change.old_values(),
            Ok(Some(serde_json::json!({"status": "pending"})))
        );
    }

    #[test]
    fn parts_read_back_unchanged() {
        let parts = ChangeParts {
            action: Action::Update,
            schema: "público".to_owned(),
            table: "t".to_owned(),
            record: r#"{"id":1,"s":"é"}"#.to_owned(),
            changes: Some(String::new()),
            pks: vec!["1".to_owned(), String::new()],
            commit_lsn: Some(9),
            commit_idx: Some(0),
            commit_timestamp: "ts".to_owned(),
            idempotency_key: "k".to_owned(),
            metadata: "{}".to_owned(),
        };
        let change = Change::from(parts.clone());
        assert_eq!(change.old_json(), Some(""));
        assert_eq!(change.schema(), "público");
        assert_eq!(change.to_parts(), parts);
    }
}
