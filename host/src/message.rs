//! `ChangeMessage`: one Postgres row change, decoded from Sequin's wire formats.
//!
//! Sequin sends the same change message to every sink (SEQUIN-FORMAT.md §1): a JSON object with
//! `record`, `changes`, `action` and `metadata`. The Redis Stream sink splits it into four stream
//! fields (§2.1); SQS, webhooks and JSONL files carry the JSON object itself. Both shapes decode
//! here into one domain type. Column values are never re-encoded: `record`, `changes` and
//! `metadata` keep the exact JSON text that arrived, so numeric strings, integers beyond 2^53,
//! nested jsonb and unicode reach plugins untouched.
//!
//! `ChangeMessage` is deliberately not `Serialize`: the only way back to the wire is
//! [`ChangeMessage::to_sequin_json`], used for dead letters and replays.

use metadata::MetadataWire;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt;
use std::ops::Range;
use std::str::Utf8Error;
pub use texts::Pks;
use texts::Texts;

/// What happened to the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted; `record` holds the old row (often only its primary key).
    Delete,
    /// A backfill read of an existing row; it carries no commit LSN.
    Read,
}

impl Action {
    /// Parses Sequin's `action` text.
    pub fn parse(text: &str) -> Option<Action> {
        Some(match text {
            "insert" => Action::Insert,
            "update" => Action::Update,
            "delete" => Action::Delete,
            "read" => Action::Read,
            _ => return None,
        })
    }

    /// The action as Sequin writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Insert => "insert",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Read => "read",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The position of a change in the database's history: `(commit_lsn, commit_idx)`.
///
/// Ordering is lexicographic, which is the commit order (SEQUIN-FORMAT.md §1.3; `commit_idx` may
/// have gaps, so only its order matters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// LSN of the transaction's commit record.
    pub lsn: u64,
    /// Position of the change within the transaction.
    pub idx: u64,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.lsn, self.idx)
    }
}

/// One decoded change message. Its texts (`record`, `changes` and `metadata` exactly as
/// received, and the fields read from `metadata`) are held in one buffer (`texts.rs`); only
/// this module makes one, so `record`, `changes` and `metadata` are always checked JSON objects
/// (valid, at most [`MAX_DEPTH`] deep, without surrounding whitespace).
#[derive(Clone)]
pub struct ChangeMessage {
    /// What happened to the row.
    pub action: Action,
    /// Commit version; `None` exactly for backfill reads.
    pub version: Option<Version>,
    texts: Texts,
}

impl ChangeMessage {
    /// Postgres schema of the table.
    pub fn schema(&self) -> &str {
        self.texts.get(self.texts.schema)
    }

    /// Table name.
    pub fn table(&self) -> &str {
        self.texts.get(self.texts.table)
    }

    /// The row as JSON object text, exactly as delivered.
    pub fn record(&self) -> &str {
        self.texts.get(self.texts.record)
    }

    /// Old values of changed columns (JSON object text), when the message has them.
    pub fn changes(&self) -> Option<&str> {
        self.texts.changes.map(|span| self.texts.get(span))
    }

    /// Primary-key values as strings, in key-column order.
    pub fn pks(&self) -> Pks<'_> {
        self.texts.pks()
    }

    /// Commit timestamp (RFC 3339).
    pub fn commit_timestamp(&self) -> &str {
        self.texts.get(self.texts.commit_timestamp)
    }

    /// Sequin's idempotency key.
    pub fn idempotency_key(&self) -> &str {
        self.texts.get(self.texts.idempotency_key)
    }

    /// The whole `metadata` object, exactly as delivered.
    pub fn metadata(&self) -> &str {
        self.texts.get(self.texts.metadata)
    }

    /// Every text of the message in one string, as plugin contract 0.2.0 passes it
    /// (`wit/keepwarm.wit`, `batch.texts`); [`ChangeMessage::push_layout`] says where each lies.
    pub fn wire_texts(&self) -> &str {
        self.texts.buf()
    }

    /// Appends the message's sixteen numbers of contract 0.2.0's `batch.layout` to `layout`,
    /// and its primary keys' to `pks` (a message's texts always fit the contract's 32-bit
    /// offsets: a longer one is not decoded).
    pub fn push_layout(&self, layout: &mut Vec<u32>, pks: &mut Vec<u32>) {
        self.texts.push_layout(self.version.is_some(), layout, pks);
    }
}

impl fmt::Debug for ChangeMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChangeMessage")
            .field("action", &self.action)
            .field("schema", &self.schema())
            .field("table", &self.table())
            .field("record", &self.record())
            .field("changes", &self.changes())
            .field("pks", &self.pks())
            .field("version", &self.version)
            .field("commit_timestamp", &self.commit_timestamp())
            .field("idempotency_key", &self.idempotency_key())
            .field("metadata", &self.metadata())
            .finish()
    }
}

/// A checked JSON object's text without the whitespace around it. Only JSON's whitespace can
/// surround a valid object, and it is ASCII: a look at the first and last bytes does what
/// `str::trim` does there while decoding characters.
fn trim_object(text: &str) -> &str {
    let space = |b: &u8| json_scan::is_whitespace(*b);
    let bytes = text.as_bytes();
    if bytes.first().is_some_and(space) || bytes.last().is_some_and(space) {
        text.trim_matches(|c: char| c.is_ascii() && json_scan::is_whitespace(c as u8))
    } else {
        text
    }
}

/// Why a payload is not a change message: a poison message, dead-lettered with this text as
/// its reason and never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than `pipeline.max_message_bytes`.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The message's size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The queue delivered no body at all.
    #[error("{source_kind} message has no body")]
    NoBody {
        /// The kind of source, e.g. `sqs`.
        source_kind: &'static str,
    },
    /// The bytes (or one stream field) are not UTF-8.
    #[error("{part} is not valid UTF-8: {error}")]
    NotUtf8 {
        /// `message`, or a stream field as ``field `record` ``.
        part: String,
        /// Where the first bad byte is.
        error: std::str::Utf8Error,
    },
    /// The text is not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// Valid JSON of another shape (a string, a number, an array, a field that is not an
    /// object): not a change message.
    #[error("{0}")]
    WrongShape(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// The fields are there but break the format's rules (unknown action, a version that does
    /// not fit the action, empty `record_pks`, nesting too deep).
    #[error("{0}")]
    Invalid(String),
}

fn bad(reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(reason.into())
}

fn shape(reason: impl Into<String>) -> DecodeError {
    DecodeError::WrongShape(reason.into())
}

/// The message as one JSON object (SQS body, webhook, JSONL line), as serde_json reads it.
#[derive(Deserialize)]
struct MessageWire<'a> {
    #[serde(borrow)]
    record: Option<&'a RawValue>,
    #[serde(borrow, default)]
    changes: Option<&'a RawValue>,
    action: Option<&'a str>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
}

/// The parts of a message object: each field's text, `None` when absent or `null`.
#[derive(Debug, PartialEq)]
struct Parts<'a> {
    record: Option<&'a str>,
    changes: Option<&'a str>,
    action: Option<&'a str>,
    metadata: Option<&'a str>,
    /// The fields of `metadata` keepwarm reads, when the pass that found the parts could read
    /// them too (as `metadata::scanned` would have); `None`: `metadata` is read on its own.
    fields: Option<MetadataWire<'a>>,
}

impl<'a> From<MessageWire<'a>> for Parts<'a> {
    fn from(wire: MessageWire<'a>) -> Parts<'a> {
        Parts {
            record: wire.record.map(RawValue::get),
            changes: wire.changes.map(RawValue::get),
            action: wire.action,
            metadata: wire.metadata.map(RawValue::get),
            fields: None,
        }
    }
}

impl<'a> Parts<'a> {
    /// The parts in one pass of [`json_scan`], which also vouches that the whole object is valid
    /// JSON at most [`MAX_DEPTH`] deep, so that each part is too, and gathers the fields of
    /// `metadata` on the way. `None` for anything it cannot read exactly as serde_json would
    /// (invalid or deeper JSON, a key written with escapes or given twice, an `action` that is
    /// not a plain string or `null`): [`MessageWire`] then reads the message and words the
    /// error.
    fn scanned(text: &'a str) -> Option<Parts<'a>> {
        let mut parts = Parts {
            record: None,
            changes: None,
            action: None,
            metadata: None,
            fields: None,
        };
        let (mut seen, mut exact) = ([false; 4], true);
        let mut gather = metadata::Gather::default();
        let metadata_field = |parent: &Range<usize>, key, value| {
            if &text.as_bytes()[parent.clone()] == b"metadata" {
                gather.field(text, key, value);
            }
        };
        let vouched = json_scan::scan_object_nested(
            text.as_bytes(),
            |key, value| {
                let (key, value) = (&text[key], &text[value]);
                let (slot, part) = match key {
                    "record" => (0, &mut parts.record),
                    "changes" => (1, &mut parts.changes),
                    "action" => (2, &mut parts.action),
                    "metadata" => (3, &mut parts.metadata),
                    // A key written with escapes may spell one of these (six letters at least).
                    _ => {
                        exact &= !json_scan::may_spell_a_name(key.as_bytes(), 6);
                        return;
                    }
                };
                // serde_json refuses a field given twice.
                exact &= !std::mem::replace(&mut seen[slot], true);
                *part = (value != "null").then_some(value);
            },
            metadata_field,
        );
        if !vouched || !exact {
            return None;
        }
        // Gathered from the one `metadata` object there is (a `metadata` that is not an object
        // gathers nothing, and `check` refuses it).
        if parts.metadata.is_some_and(|m| m.starts_with('{')) {
            parts.fields = gather.finish(text);
        }
        // serde_json borrows `action` only when it has no escape, and refuses any other type.
        if let Some(action) = parts.action {
            let plain = action
                .strip_prefix('"')
                .and_then(|a| a.strip_suffix('"'))
                .filter(|a| !a.contains('\\'))?;
            parts.action = Some(plain);
        }
        Some(parts)
    }
}

/// The fields of a stream entry, by value: names and raw values.
pub type StreamFields = Vec<(String, Vec<u8>)>;

/// What checking the parts of a message found, before the message takes its texts.
struct Checked<'a> {
    action: Action,
    meta: MetadataWire<'a>,
    version: Option<Version>,
    has_changes: bool,
}

/// What is already known of the texts handed to [`check`]: vouched for by the one-pass scan of
/// their message object (valid JSON, shallower than [`MAX_DEPTH`]), parsed by serde_json as
/// part of it (valid JSON), or nothing yet.
#[derive(Clone, Copy, PartialEq)]
enum Syntax {
    Vouched,
    Parsed,
    Unchecked,
}

impl ChangeMessage {
    /// Decodes a change message from its JSON object text.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] naming the first problem: invalid JSON, a missing or mistyped field, an
    /// unknown action, or a version that does not fit the action.
    pub fn from_json(text: &str) -> Result<ChangeMessage, DecodeError> {
        Self::decode_object(text, true)
    }

    /// [`ChangeMessage::from_json`], reading the object in one pass of [`json_scan`] when
    /// `scan` (and when that pass can vouch for it), else with serde_json: the same verdict
    /// either way, which the property tests check.
    fn decode_object(text: &str, scan: bool) -> Result<ChangeMessage, DecodeError> {
        let trimmed = text.trim_start();
        if !trimmed.starts_with('{') {
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Err(error) => DecodeError::InvalidJson(error.to_string()),
                Ok(_) if trimmed.starts_with('"') => {
                    shape("a JSON string, not a change message (a Sequin transform output?)")
                }
                Ok(_) => shape("JSON value is not an object, not a change message"),
            });
        }
        let scanned = if scan { Parts::scanned(text) } else { None };
        let (parts, syntax) = match scanned {
            Some(parts) => (parts, Syntax::Vouched),
            None => (
                serde_json::from_str::<MessageWire<'_>>(text)
                    .map_err(|error| DecodeError::InvalidJson(error.to_string()))?
                    .into(),
                Syntax::Parsed,
            ),
        };
        let action = parts.action.ok_or(DecodeError::MissingField("action"))?;
        let record = parts.record.ok_or(DecodeError::MissingField("record"))?;
        let metadata = parts
            .metadata
            .ok_or(DecodeError::MissingField("metadata"))?;
        let changes = parts.changes;
        let checked = check(action, record, changes, metadata, parts.fields, syntax)?;
        Self::build(checked, record, changes, metadata)
    }

    /// Decodes a change message from the four fields of a Sequin Redis Stream entry.
    ///
    /// `field` returns the value of a field by name, or `None` when the entry lacks it.
    ///
    /// # Errors
    ///
    /// As [`ChangeMessage::from_json`], plus values that are not UTF-8.
    pub fn from_stream_fields<'a>(
        field: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<ChangeMessage, DecodeError> {
        let (checked, [record, changes, metadata]) =
            check_stream_fields(&|name: &str| field(name).map(utf8))?;
        Self::build(
            checked,
            record.unwrap_or_default(),
            changes,
            metadata.unwrap_or_default(),
        )
    }

    /// As [`ChangeMessage::from_stream_fields`], taking the entry's fields by value: a
    /// rejected entry's fields come back with the error, untouched, for its dead letter.
    ///
    /// # Errors
    ///
    /// As [`ChangeMessage::from_stream_fields`].
    pub fn from_stream_entry(
        fields: StreamFields,
    ) -> Result<ChangeMessage, (DecodeError, StreamFields)> {
        let decoded = Self::from_stream_fields(|name| {
            // The first field of a name counts, as a stream entry is read.
            fields
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value.as_slice())
        });
        decoded.map_err(|error| (error, fields))
    }

    /// The message, from checked parts and their texts (copied into one buffer); too large
    /// when the texts exceed the 32-bit offsets of a plugin call (4 GiB, far beyond any
    /// `pipeline.max_message_bytes` in use).
    fn build(
        checked: Checked<'_>,
        record: &str,
        changes: Option<&str>,
        metadata: &str,
    ) -> Result<ChangeMessage, DecodeError> {
        let Checked {
            action,
            meta,
            version,
            has_changes,
        } = checked;
        let texts = Texts::new(&texts::Parts {
            schema: &meta.table_schema,
            table: &meta.table_name,
            record: trim_object(record),
            changes: changes.filter(|_| has_changes).map(trim_object),
            commit_timestamp: &meta.commit_timestamp,
            idempotency_key: &meta.idempotency_key,
            metadata: trim_object(metadata),
            pks: meta.record_pks.iter().map(|pk| &**pk),
        });
        let size = texts.buf().len();
        if u32::try_from(size).is_err() {
            return Err(DecodeError::TooLarge {
                size,
                limit: u32::MAX as usize,
            });
        }
        Ok(ChangeMessage {
            action,
            version,
            texts,
        })
    }

    /// The message as Sequin's JSON object, for dead letters and replays.
    pub fn to_sequin_json(&self) -> String {
        format!(
            r#"{{"record":{},"changes":{},"action":"{}","metadata":{}}}"#,
            self.record(),
            self.changes().unwrap_or("null"),
            self.action,
            self.metadata()
        )
    }

    /// The row's identity, `schema.table:pk1:pk2…`, used for lanes and logs.
    pub fn row_id(&self) -> String {
        let pks: Vec<&str> = self.pks().collect();
        format!("{}.{}:{}", self.schema(), self.table(), pks.join(":"))
    }
}

/// The fields of a stream entry that make a change message, in the order their problems are
/// reported.
const STREAM_FIELDS: [&str; 4] = ["action", "record", "metadata", "changes"];

/// The checks of a stream entry's fields, and the texts of `record`, `changes`, `metadata`.
type StreamTexts<'a> = (Checked<'a>, [Option<&'a str>; 3]);

/// Checks a stream entry given the text of each field by name (`None` when absent, an error
/// when not UTF-8).
fn check_stream_fields<'a>(
    field: &impl Fn(&str) -> Option<Result<&'a str, Utf8Error>>,
) -> Result<StreamTexts<'a>, DecodeError> {
    let text = |name: &str| -> Result<Option<&'a str>, DecodeError> {
        field(name)
            .transpose()
            .map_err(|error| DecodeError::NotUtf8 {
                part: format!("field `{name}`"),
                error,
            })
    };
    let [action, record, metadata, changes] = STREAM_FIELDS;
    let action = text(action)?.ok_or(DecodeError::MissingField("action"))?;
    let record = text(record)?.ok_or(DecodeError::MissingField("record"))?;
    let metadata = text(metadata)?.ok_or(DecodeError::MissingField("metadata"))?;
    let changes = text(changes)?;
    let checked = check(action, record, changes, metadata, None, Syntax::Unchecked)?;
    Ok((checked, [Some(record), changes, Some(metadata)]))
}

/// Checks every part of a message; `metadata` is parsed once, for its syntax and its fields,
/// unless `fields` already holds them (read in the pass that vouched for the message).
fn check<'a>(
    action: &str,
    record: &str,
    changes: Option<&str>,
    metadata: &'a str,
    fields: Option<MetadataWire<'a>>,
    syntax: Syntax,
) -> Result<Checked<'a>, DecodeError> {
    let action = Action::parse(action).ok_or_else(|| {
        bad(format!(
            "unknown action {action:?} (expected insert, update, delete or read)"
        ))
    })?;
    check_object("record", record, syntax)?;
    let has_changes = match changes {
        None => false,
        Some(text) if text.trim() == "null" => false,
        Some(text) => {
            check_object("changes", text, syntax)?;
            true
        }
    };
    // A struct also deserializes from a JSON array: insist on an object first.
    if !metadata.trim_start().starts_with('{') {
        return Err(
            match serde_json::from_str::<serde::de::IgnoredAny>(metadata) {
                Err(error) => shape(format!("field `metadata` is not valid JSON: {error}")),
                Ok(_) => shape("field `metadata` is not a JSON object"),
            },
        );
    }
    let read = match fields {
        Some(fields) => Ok(metadata::Read::Scanned(fields)),
        None => metadata::read(metadata),
    };
    let meta = match read {
        Ok(metadata::Read::Scanned(meta)) => meta,
        Ok(metadata::Read::Parsed(meta)) => {
            check_depth("metadata", metadata)?;
            meta
        }
        Err(error) => return Err(bad(format!("field `metadata`: {error}"))),
    };
    let version = match (action, meta.commit_lsn, meta.commit_idx) {
        (Action::Read, None, None) => None,
        (Action::Read, _, _) => {
            return Err(bad(
                "a read (backfill) message carries a commit_lsn or commit_idx",
            ));
        }
        (_, Some(lsn), Some(idx)) => Some(Version { lsn, idx }),
        (_, _, _) => {
            return Err(bad(format!(
                "an {action} message needs commit_lsn and commit_idx"
            )));
        }
    };
    if meta.record_pks.is_empty() {
        return Err(bad("metadata.record_pks is empty"));
    }
    Ok(Checked {
        action,
        meta,
        version,
        has_changes,
    })
}

/// Deepest nesting accepted in a field; deeper JSON is refused before it reaches a plugin
/// (whose own parser would stop at about this depth anyway).
pub const MAX_DEPTH: usize = 128;

/// Checks that `text` is one JSON object, nested at most [`MAX_DEPTH`] deep.
fn check_object(name: &str, text: &str, syntax: Syntax) -> Result<(), DecodeError> {
    if syntax == Syntax::Vouched && text.starts_with('{') {
        return Ok(());
    }
    // One pass vouches for nearly every field; the rest get the exact checks and their errors.
    if json_scan::is_shallow_object(text.as_bytes()) {
        return Ok(());
    }
    if syntax == Syntax::Unchecked {
        serde_json::from_str::<&RawValue>(text)
            .map_err(|error| shape(format!("field `{name}` is not valid JSON: {error}")))?;
    }
    if !text.trim_start().starts_with('{') {
        return Err(shape(format!("field `{name}` is not a JSON object")));
    }
    check_depth(name, text)
}

fn check_depth(name: &str, text: &str) -> Result<(), DecodeError> {
    // Fewer opening brackets than the limit cannot nest deeper than it: one quick count (it
    // vectorises) spares the exact scan for nearly every message.
    let opening = text.bytes().filter(|b| matches!(b, b'{' | b'[')).count();
    if opening > MAX_DEPTH && nesting_depth(text) > MAX_DEPTH {
        return Err(bad(format!(
            "field `{name}` is nested deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in valid JSON text.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `bytes` as text, checked with vector instructions (`simdutf8`); std's check, several times
/// slower on long texts, only runs on failure, for its error's detail.
///
/// # Errors
///
/// When `bytes` is not UTF-8.
pub(crate) fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    simdutf8::basic::from_utf8(bytes).or_else(|_| std::str::from_utf8(bytes))
}

mod json_scan;
mod metadata;
mod texts;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
