//! One row change from the replication stream, written as the JSON change message Sequin would
//! have sent for it (SEQUIN-FORMAT.md §1): `record`, `changes`, `action` and the twelve
//! `metadata` keys, with the same types and formats, so that a plugin cannot tell the two apart.
//!
//! - `record`: the new row (insert, update) or the old one (delete: the whole row with
//!   `REPLICA IDENTITY FULL`, else the key with every other column `null`). An update that left
//!   a TOASTed column unchanged does not carry it: it is taken from the old row when there is
//!   one, else written as the string `"unchanged_toast"`.
//! - `changes`: for an update, the old values of the columns whose value changed, when the old
//!   row came along (`{}` when it did not); `null` otherwise.
//! - `commit_lsn` is the commit record's LSN (from `Begin`), `commit_idx` counts every insert,
//!   update, delete, truncate and logical message of the transaction, and the idempotency key
//!   is Base64 of `"<commit_lsn>:<commit_idx>"`, all as Sequin does.

use super::values::{quoted, write_value};
use base64::Engine as _;
use pg_walstream::{ColumnValue, RowData};
use std::fmt::Write as _;
use std::sync::Arc;

/// A table as the stream describes it, plus its primary key.
#[derive(Clone, Debug)]
pub(super) struct Relation {
    pub(super) schema: String,
    pub(super) table: String,
    pub(super) columns: Vec<Column>,
    /// Indexes into `columns` of the primary key, in column order.
    pub(super) pks: Vec<usize>,
    /// `REPLICA IDENTITY FULL`: old rows are whole.
    pub(super) full_identity: bool,
}

/// A column of a [`Relation`].
#[derive(Clone, Debug)]
pub(super) struct Column {
    pub(super) name: Arc<str>,
    pub(super) type_oid: u32,
}

/// What is known of the transaction a change belongs to.
#[derive(Clone, Debug)]
pub(super) struct TxnInfo {
    pub(super) commit_lsn: u64,
    /// RFC 3339 in UTC with six fractional digits.
    pub(super) commit_timestamp: String,
    /// `transaction_annotations` as JSON text, when the transaction set valid ones.
    pub(super) annotations: Option<String>,
}

/// The parts of `metadata` that are the same for every message of a source, as JSON.
#[derive(Clone, Debug)]
pub(super) struct Fixed {
    /// `"database_name":…,"consumer":{…},"database":{…}`, without braces.
    pub(super) json: String,
}

impl Fixed {
    /// From the names Sequin would have had for the database and the sink.
    pub(super) fn new(database_name: &str, consumer_name: &str, dbname: &str, host: &str) -> Fixed {
        let consumer_id = name_uuid(&format!("consumer:{dbname}:{consumer_name}"));
        let database_id = name_uuid(&format!("database:{host}:{dbname}"));
        Fixed {
            json: format!(
                r#""database_name":{},"consumer":{{"id":"{consumer_id}","name":{},"annotations":{{}}}},"database":{{"id":"{database_id}","name":{},"annotations":{{}},"database":{},"hostname":{}}}"#,
                quoted(database_name),
                quoted(consumer_name),
                quoted(database_name),
                quoted(dbname),
                quoted(host),
            ),
        }
    }
}

/// A stable UUID-shaped id derived from a name (Sequin's ids are UUIDs of its own records).
fn name_uuid(name: &str) -> String {
    use sha2::Digest as _;
    let hash = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &hash[..8],
        &hash[8..12],
        &hash[12..16],
        &hash[16..20],
        &hash[20..32]
    )
}

/// The row data of one change.
pub(super) enum Row<'a> {
    Insert(&'a RowData),
    Update {
        old: Option<&'a RowData>,
        new: &'a RowData,
    },
    Delete(&'a RowData),
}

impl Row<'_> {
    /// The action, as Sequin names it.
    pub(super) fn action(&self) -> &'static str {
        match self {
            Row::Insert(_) => "insert",
            Row::Update { .. } => "update",
            Row::Delete(_) => "delete",
        }
    }

    /// The row the message shows: the new one, or for a delete the old one.
    fn shown(&self) -> &RowData {
        match *self {
            Row::Insert(new) | Row::Update { new, .. } => new,
            Row::Delete(old) => old,
        }
    }
}

/// The first primary key column the change carries no value for, if any: a delete under a
/// replica identity index that leaves out the primary key sends only that index's columns.
pub(super) fn missing_key<'r>(relation: &'r Relation, row: &Row<'_>) -> Option<&'r str> {
    relation
        .pks
        .iter()
        .map(|&i| &relation.columns[i])
        // A presence check: `message` renders the key's text itself.
        .find(|column| {
            matches!(
                row.shown().get(&column.name),
                None | Some(ColumnValue::Null)
            )
        })
        .map(|column| &*column.name)
}

/// A column's value in one row.
#[derive(PartialEq)]
enum Value {
    Null,
    /// Not sent: an unchanged TOASTed value.
    Absent,
    Json(String),
}

fn value(column: &Column, row: &RowData) -> Value {
    match row.get(&column.name) {
        None => Value::Absent,
        Some(ColumnValue::Null) => Value::Null,
        Some(ColumnValue::Text(bytes)) => {
            let mut out = String::new();
            write_value(&mut out, column.type_oid, &String::from_utf8_lossy(bytes));
            Value::Json(out)
        }
        Some(ColumnValue::Binary(bytes)) => {
            Value::Json(quoted(&format!("\\x{}", hex::encode(bytes))))
        }
    }
}

fn text(column: &Column, row: &RowData) -> Option<String> {
    match row.get(&column.name)? {
        ColumnValue::Text(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        ColumnValue::Binary(bytes) => Some(format!("\\x{}", hex::encode(bytes))),
        ColumnValue::Null => None,
    }
}

fn push_entry(out: &mut String, first: &mut bool, name: &str, json: &str) {
    if !std::mem::take(first) {
        out.push(',');
    }
    out.push_str(&quoted(name));
    out.push(':');
    out.push_str(json);
}

/// The Sequin change message of one row change, as JSON text.
pub(super) fn message(
    relation: &Relation,
    txn: &TxnInfo,
    commit_idx: u64,
    row: &Row<'_>,
    fixed: &Fixed,
) -> String {
    let (action, shown) = (row.action(), row.shown());
    let old = match *row {
        Row::Update { old, .. } => old,
        Row::Insert(_) | Row::Delete(_) => None,
    };
    let mut record = String::from("{");
    let mut changes = String::from("{");
    let (mut first, mut first_change) = (true, true);
    for column in &relation.columns {
        let new_value = value(column, shown);
        let old_value = old.map(|old| value(column, old));
        let json = match (&new_value, &old_value) {
            (Value::Json(json), _) => json.as_str(),
            (Value::Null, _) => "null",
            // An unchanged TOAST: the old row has it when identity is FULL.
            (Value::Absent, Some(Value::Json(old))) if action == "update" => old.as_str(),
            (Value::Absent, _) if action == "update" => "\"unchanged_toast\"",
            (Value::Absent, _) => "null",
        };
        push_entry(&mut record, &mut first, &column.name, json);
        // Sequin lists a column in `changes` when the old row carried it and its value
        // differs; a key-only old row (identity not FULL) carries only the key.
        if let Some(old_value) = &old_value
            && new_value != Value::Absent
            && (relation.full_identity
                || relation
                    .pks
                    .iter()
                    .any(|&i| relation.columns[i].name == column.name))
            && *old_value != Value::Absent
            && *old_value != new_value
        {
            let old_json = match old_value {
                Value::Json(json) => json.as_str(),
                _ => "null",
            };
            push_entry(&mut changes, &mut first_change, &column.name, old_json);
        }
    }
    record.push('}');
    changes.push('}');
    let changes = if action == "update" {
        changes.as_str()
    } else {
        "null"
    };
    let pks: Vec<String> = relation
        .pks
        .iter()
        .map(|&i| quoted(&text(&relation.columns[i], shown).unwrap_or_default()))
        .collect();
    let key = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{commit_idx}", txn.commit_lsn));
    let mut out = String::with_capacity(record.len() + 512);
    let _ = write!(
        out,
        r#"{{"record":{record},"changes":{changes},"action":"{action}","metadata":{{"table_schema":{},"table_name":{},"commit_timestamp":"{}","commit_lsn":{},"commit_idx":{commit_idx},"transaction_annotations":{},"idempotency_key":"{key}","record_pks":[{}],"enrichment":null,{}}}}}"#,
        quoted(&relation.schema),
        quoted(&relation.table),
        txn.commit_timestamp,
        txn.commit_lsn,
        txn.annotations.as_deref().unwrap_or("null"),
        pks.join(","),
        fixed.json,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(full: bool) -> Relation {
        let column = |name: &str, type_oid| Column {
            name: Arc::from(name),
            type_oid,
        };
        Relation {
            schema: "public".into(),
            table: "orders".into(),
            columns: vec![column("id", 23), column("status", 25), column("note", 25)],
            pks: vec![0],
            full_identity: full,
        }
    }

    fn txn() -> TxnInfo {
        TxnInfo {
            commit_lsn: 1_243_361_160,
            commit_timestamp: "2025-03-14T09:26:53.601022Z".into(),
            annotations: None,
        }
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> RowData {
        RowData::from_pairs(
            pairs
                .iter()
                .map(|(name, v)| (*name, v.map_or(ColumnValue::Null, ColumnValue::text)))
                .collect(),
        )
    }

    fn parse(json: &str) -> serde_json::Value {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_insert_is_a_sequin_message() {
        let fixed = Fixed::new("shop-prod", "orders-cache", "shop", "db.internal");
        let new = row(&[
            ("id", Some("1001")),
            ("status", Some("paid")),
            ("note", None),
        ]);
        let json = message(&relation(false), &txn(), 0, &Row::Insert(&new), &fixed);
        let message = crate::message::ChangeMessage::from_json(&json).unwrap();
        assert_eq!(message.row_id(), "public.orders:1001");
        assert_eq!(message.idempotency_key(), "MTI0MzM2MTE2MDow");
        let v = parse(&json);
        assert_eq!(
            v["record"],
            parse(r#"{"id":1001,"status":"paid","note":null}"#)
        );
        assert_eq!(v["changes"], serde_json::Value::Null);
        let meta = &v["metadata"];
        assert_eq!(meta.as_object().unwrap().len(), 12);
        assert_eq!(meta["commit_lsn"], 1_243_361_160u64);
        assert_eq!(meta["record_pks"], parse(r#"["1001"]"#));
        assert_eq!(meta["database"]["database"], "shop");
        assert_eq!(meta["consumer"]["name"], "orders-cache");
    }

    #[test]
    fn updates_carry_changed_old_values_or_an_empty_object() {
        let fixed = Fixed::new("db", "c", "db", "h");
        let old = row(&[
            ("id", Some("1")),
            ("status", Some("new")),
            ("note", Some("x")),
        ]);
        let new = row(&[
            ("id", Some("1")),
            ("status", Some("paid")),
            ("note", Some("x")),
        ]);
        let full = message(
            &relation(true),
            &txn(),
            3,
            &Row::Update {
                old: Some(&old),
                new: &new,
            },
            &fixed,
        );
        assert_eq!(parse(&full)["changes"], parse(r#"{"status":"new"}"#));
        let none = message(
            &relation(false),
            &txn(),
            3,
            &Row::Update {
                old: None,
                new: &new,
            },
            &fixed,
        );
        assert_eq!(parse(&none)["changes"], parse("{}"));
    }

    #[test]
    fn unchanged_toast_is_marked_or_filled_from_the_old_row() {
        let fixed = Fixed::new("db", "c", "db", "h");
        let new = row(&[("id", Some("1")), ("status", Some("paid"))]);
        let json = message(
            &relation(false),
            &txn(),
            0,
            &Row::Update {
                old: None,
                new: &new,
            },
            &fixed,
        );
        assert_eq!(parse(&json)["record"]["note"], "unchanged_toast");
        let old = row(&[
            ("id", Some("1")),
            ("status", Some("new")),
            ("note", Some("long")),
        ]);
        let json = message(
            &relation(true),
            &txn(),
            0,
            &Row::Update {
                old: Some(&old),
                new: &new,
            },
            &fixed,
        );
        assert_eq!(parse(&json)["record"]["note"], "long");
        assert_eq!(parse(&json)["changes"], parse(r#"{"status":"new"}"#));
    }

    #[test]
    fn a_change_without_its_key_is_named() {
        let keyed = row(&[("id", Some("7")), ("status", None), ("note", None)]);
        let keyless = row(&[("id", None), ("status", Some("x")), ("note", None)]);
        let relation = relation(false);
        assert_eq!(missing_key(&relation, &Row::Delete(&keyed)), None);
        assert_eq!(missing_key(&relation, &Row::Delete(&keyless)), Some("id"));
        assert_eq!(Row::Delete(&keyless).action(), "delete");
    }

    #[test]
    fn a_delete_without_full_identity_has_the_key_and_nulls() {
        let fixed = Fixed::new("db", "c", "db", "h");
        let old = row(&[("id", Some("7")), ("status", None), ("note", None)]);
        let json = message(&relation(false), &txn(), 1, &Row::Delete(&old), &fixed);
        let v = parse(&json);
        assert_eq!(v["action"], "delete");
        assert_eq!(v["record"], parse(r#"{"id":7,"status":null,"note":null}"#));
        assert_eq!(v["metadata"]["commit_idx"], 1);
    }
}
