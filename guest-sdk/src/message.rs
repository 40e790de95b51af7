//! Builds a [`Change`] from one Sequin change message, so plugins can be tested natively.
//!
//! A change message is a JSON object with the keys `record`, `changes`, `action` and `metadata`
//! (see Sequin's message reference). The host decodes messages itself; this is the same mapping
//! for tests: `record`, `changes` and `metadata` keep their exact text, `schema`, `table`, `pks`,
//! `commit-lsn`, `commit-idx`, `commit-timestamp` and `idempotency-key` come from `metadata`.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{Action, Change, ChangeParts};

/// The top level of a change message; the JSON texts are borrowed as they are.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
    #[serde(borrow, default)]
    changes: Option<&'a RawValue>,
    action: String,
    #[serde(borrow)]
    metadata: &'a RawValue,
}

/// The fields of `metadata` that become parts of the change.
#[derive(Deserialize)]
struct Metadata {
    table_schema: String,
    table_name: String,
    commit_timestamp: String,
    #[serde(default)]
    commit_lsn: Option<u64>,
    #[serde(default)]
    commit_idx: Option<u64>,
    idempotency_key: String,
    record_pks: Vec<String>,
}

impl Change {
    /// Builds a change from one Sequin change-message JSON text (one line of a `.jsonl` file).
    ///
    /// `record`, `changes` and `metadata` keep their text byte for byte; `changes: null` becomes
    /// `None`. `metadata` needs `table_schema`, `table_name`, `commit_timestamp`,
    /// `idempotency_key` and `record_pks`; `commit_lsn` and `commit_idx` may be null or absent.
    ///
    /// # Errors
    ///
    /// When the text is not a change message: invalid JSON, a missing field, an unknown action,
    /// or a `record`, `changes` or `metadata` that is not an object.
    pub fn from_message_json(json: &str) -> Result<Change, String> {
        let message: Message<'_> =
            serde_json::from_str(json).map_err(|error| format!("change message: {error}"))?;
        let action = parse_action(&message.action)?;
        let record = object_text("record", message.record)?;
        let changes = message
            .changes
            .map(|changes| object_text("changes", changes))
            .transpose()?;
        let metadata_json = object_text("metadata", message.metadata)?;
        let metadata: Metadata = serde_json::from_str(metadata_json)
            .map_err(|error| format!("change message: metadata: {error}"))?;
        Ok(Change::from(ChangeParts {
            action,
            schema: metadata.table_schema,
            table: metadata.table_name,
            record: record.to_owned(),
            changes: changes.map(str::to_owned),
            pks: metadata.record_pks,
            commit_lsn: metadata.commit_lsn,
            commit_idx: metadata.commit_idx,
            commit_timestamp: metadata.commit_timestamp,
            idempotency_key: metadata.idempotency_key,
            metadata: metadata_json.to_owned(),
        }))
    }
}

fn parse_action(action: &str) -> Result<Action, String> {
    match action {
        "insert" => Ok(Action::Insert),
        "update" => Ok(Action::Update),
        "delete" => Ok(Action::Delete),
        "read" => Ok(Action::Read),
        other => Err(format!(
            "change message: unknown action {other:?}, expected insert, update, delete or read"
        )),
    }
}

/// The text of `value`, which must be a JSON object.
fn object_text<'a>(field: &str, value: &'a RawValue) -> Result<&'a str, String> {
    let text = value.get();
    if text.starts_with('{') {
        Ok(text)
    } else {
        Err(format!("change message: {field} is not a JSON object"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn fixtures_keep_their_texts_byte_for_byte() {
        for (n, fixture) in fixtures::all().iter().enumerate() {
            let change = Change::from_message_json(&fixture.line).unwrap();
            assert_eq!(change.record_json(), fixture.record, "line {n}");
            assert_eq!(change.old_json(), fixture.changes.as_deref(), "line {n}");
            assert_eq!(change.metadata_json(), fixture.metadata, "line {n}");
            assert_eq!(change.action().as_str(), fixture.action, "line {n}");
            assert_eq!(
                (change.schema(), change.table()),
                (&*fixture.schema, &*fixture.table)
            );
        }
    }

    #[test]
    fn fixture_fields_map_to_the_wit_record() {
        let all = fixtures::all();
        let update = Change::from_message_json(&all[2].line).unwrap();
        assert_eq!(update.action(), Action::Update);
        assert_eq!(update.pks(), ["1001"]);
        assert_eq!(update.version(), Some((1243362320, 1)));
        assert_eq!(update.commit_timestamp(), "2025-03-14T09:31:07.004512Z");
        assert_eq!(update.idempotency_key(), "MTI0MzM2MjMyMDox");
        assert_eq!(
            update.old_json(),
            Some(r#"{"status":"pending","updated_at":"2025-03-14T09:26:53.589793Z"}"#)
        );

        let read = Change::from_message_json(&all[11].line).unwrap();
        assert_eq!(read.action(), Action::Read);
        assert_eq!((read.schema(), read.table()), ("analytics", "page_views"));
        assert_eq!(read.pks(), ["2025-03-13", "9007199254740993"]);
        assert_eq!(read.version(), None);
        assert_eq!(read.old_json(), None);
        assert_eq!(
            read.record_value().unwrap()["view_id"].to_string(),
            "9007199254740993"
        );

        let toast = Change::from_message_json(&all[10].line).unwrap();
        assert_eq!(toast.old_json(), Some("{}"));
    }

    fn check_error(json: &str, expect: &str) {
        let error = Change::from_message_json(json).unwrap_err();
        assert!(
            error.starts_with(expect),
            "{error:?} should start with {expect:?}"
        );
    }

    #[test]
    fn malformed_messages_are_rejected_with_a_reason() {
        let metadata = r#"{"table_schema":"public","table_name":"t","commit_timestamp":"x","idempotency_key":"k","record_pks":["1"]}"#;
        check_error("{", "change message: EOF");
        check_error(
            &format!(r#"{{"record":{{}},"action":"truncate","metadata":{metadata}}}"#),
            r#"change message: unknown action "truncate""#,
        );
        check_error(
            &format!(r#"{{"record":[1],"action":"insert","metadata":{metadata}}}"#),
            "change message: record is not a JSON object",
        );
        check_error(
            &format!(r#"{{"record":{{}},"changes":"x","action":"update","metadata":{metadata}}}"#),
            "change message: changes is not a JSON object",
        );
        check_error(
            r#"{"record":{},"action":"insert","metadata":{"table_schema":"public"}}"#,
            "change message: metadata: missing field `table_name`",
        );
        check_error(
            &format!(r#"{{"action":"insert","metadata":{metadata}}}"#),
            "change message: missing field `record`",
        );
    }

    #[test]
    fn lsn_and_index_may_be_absent() {
        let json = r#"{"record":{"id":1},"action":"read","metadata":{"table_schema":"public","table_name":"t","commit_timestamp":"x","idempotency_key":"k","record_pks":["1"]}}"#;
        let change = Change::from_message_json(json).unwrap();
        assert_eq!(change.version(), None);
        assert_eq!(change.old_json(), None);
    }
}
