//! Key templates: Redis keys built from a change, such as `{schema}.{table}:{pks}`.
//!
//! | placeholder | becomes |
//! |---|---|
//! | `{schema}` | the table's schema |
//! | `{table}` | the table's name |
//! | `{pks}` | the primary-key values joined with `:` |
//! | `{pk0}`, `{pk1}`, ... | one primary-key value, in primary-key column order |
//! | `{column}` | that column of the record: a string as is, a number or boolean as its JSON text |
//! | `{{`, `}}` | a literal `{` or `}` |
//!
//! The names `schema`, `table`, `pks` and `pk<N>` always mean the above, even when the table
//! has a column of that name. A column that is missing or `null` is an error, so is an object or
//! array. On a delete, a table without `REPLICA IDENTITY FULL` only sends its primary-key
//! columns, so templates that must serve deletes should name primary-key columns only.
//!
//! Parse a template once with [`KeyTemplate::parse`] (in `Plugin::new`, so a bad template is a
//! configuration error) and [`KeyTemplate::render`] it per change; [`format_key`] does both.
//!
//! ```
//! use keepwarm_guest::{Change, KeyTemplate};
//!
//! let line = r#"{"record":{"sku":"SKU-00042","warehouse_id":"ams-1","on_hand":17},"changes":null,
//!   "action":"insert","metadata":{"table_schema":"inventory","table_name":"stock_levels",
//!   "commit_timestamp":"2025-03-14T09:45:30.262771Z","commit_lsn":1,"commit_idx":0,
//!   "idempotency_key":"MTow","record_pks":["ams-1","SKU-00042"]}}"#;
//! let change = Change::from_message_json(line).unwrap();
//! let render = |template: &str| KeyTemplate::parse(template).unwrap().render(&change);
//! assert_eq!(render("{schema}.{table}:{pks}").unwrap(), "inventory.stock_levels:ams-1:SKU-00042");
//! assert_eq!(render("stock:{pk1}@{warehouse_id}={on_hand}").unwrap(), "stock:SKU-00042@ams-1=17");
//! assert_eq!(render("{{literal}}:{sku}").unwrap(), "{literal}:SKU-00042");
//! assert_eq!(
//!     render("{schema}:{tenant}").unwrap_err(),
//!     r#"key template "{schema}:{tenant}": column "tenant" is missing from the record"#,
//! );
//! ```

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::Change;

/// A parsed key template, ready to render keys for changes.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyTemplate {
    /// The template as written, for error messages.
    text: String,
    /// Literal text and placeholders, in order.
    parts: Vec<Part>,
}

/// A piece of a template.
#[derive(Clone, Debug, PartialEq)]
enum Part {
    Literal(String),
    Schema,
    Table,
    Pks,
    Pk(usize),
    Column(String),
}

/// Parses `template` and renders it for `change`.
///
/// # Errors
///
/// When the template is malformed or the change lacks a value it names; see [`KeyTemplate`].
pub fn format_key(template: &str, change: &Change) -> Result<String, String> {
    KeyTemplate::parse(template)?.render(change)
}

impl KeyTemplate {
    /// Parses a template.
    ///
    /// # Errors
    ///
    /// When the template is empty, has an empty placeholder `{}`, a `{` without its `}`, or a
    /// lone `}` (write `{{` and `}}` for literal braces).
    pub fn parse(template: &str) -> Result<KeyTemplate, String> {
        let error = |reason: String| format!("key template {template:?}: {reason}");
        if template.is_empty() {
            return Err("key template is empty".to_owned());
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.next_if(|&(_, c)| c == '{').is_some() => literal.push('{'),
                '}' if chars.next_if(|&(_, c)| c == '}').is_some() => literal.push('}'),
                '}' => {
                    return Err(error(format!(
                        "unmatched '}}' at byte {at} (write '}}}}' for a literal brace)"
                    )));
                }
                '{' => {
                    let rest = &template[at + 1..];
                    let name = match rest.find(['{', '}']) {
                        Some(end) if rest.as_bytes()[end] == b'}' => &rest[..end],
                        _ => {
                            return Err(error(format!(
                                "unclosed '{{' at byte {at} (write '{{{{' for a literal brace)"
                            )));
                        }
                    };
                    if name.is_empty() {
                        return Err(error(format!("empty placeholder '{{}}' at byte {at}")));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::from_name(name));
                    // Skip the name and its closing brace (both ASCII-delimited).
                    while chars.next_if(|&(i, _)| i <= at + 1 + name.len()).is_some() {}
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(KeyTemplate {
            text: template.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Renders the key for `change`.
    ///
    /// # Errors
    ///
    /// When a placeholder has no value: `{pks}` for a change without primary-key values,
    /// `{pkN}` past the last one, a column that is missing, `null`, an object or an array, or a
    /// record that is not a JSON object. The message names the template and the placeholder.
    pub fn render(&self, change: &Change) -> Result<String, String> {
        let mut key = String::with_capacity(self.text.len() + 32);
        // The record's columns as raw JSON texts, parsed on the first column placeholder. (A
        // `BTreeMap`: a `HashMap` would make the component import a random seed.)
        let mut columns: Option<BTreeMap<String, &RawValue>> = None;
        for part in &self.parts {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Schema => key.push_str(change.schema()),
                Part::Table => key.push_str(change.table()),
                Part::Pks => {
                    let pks = change.pks();
                    if pks.is_empty() {
                        return Err(self.error("{pks}: the change has no primary-key values"));
                    }
                    key.push_str(&pks.join(":"));
                }
                Part::Pk(n) => match change.pks().get(*n) {
                    Some(pk) => key.push_str(pk),
                    None => {
                        return Err(self.error(&format!(
                            "{{pk{n}}} is past the last primary-key value (the change has {})",
                            change.pks().len()
                        )));
                    }
                },
                Part::Column(name) => {
                    let columns = match &mut columns {
                        Some(columns) => columns,
                        None => columns.insert(self.columns(change)?),
                    };
                    self.push_column(&mut key, columns, name)?;
                }
            }
        }
        Ok(key)
    }

    /// The record's columns as raw JSON texts.
    fn columns<'a>(&self, change: &'a Change) -> Result<BTreeMap<String, &'a RawValue>, String> {
        serde_json::from_str(change.record_json())
            .map_err(|error| self.error(&format!("the record is not a JSON object: {error}")))
    }

    /// Appends the value of column `name`, taken from the record's text so that numbers keep
    /// their exact digits.
    fn push_column(
        &self,
        key: &mut String,
        columns: &BTreeMap<String, &RawValue>,
        name: &str,
    ) -> Result<(), String> {
        let Some(value) = columns.get(name) else {
            return Err(self.error(&format!("column {name:?} is missing from the record")));
        };
        let text = value.get();
        match text.as_bytes()[0] {
            b'"' => {
                let text: String = serde_json::from_str(text)
                    .map_err(|error| self.error(&format!("column {name:?}: {error}")))?;
                key.push_str(&text);
            }
            b'n' => return Err(self.error(&format!("column {name:?} is null"))),
            b'{' | b'[' => {
                return Err(self.error(&format!(
                    "column {name:?} is not a string, number or boolean"
                )));
            }
            // A number or a boolean: its JSON text.
            _ => key.push_str(text),
        }
        Ok(())
    }

    fn error(&self, reason: &str) -> String {
        format!("key template {:?}: {reason}", self.text)
    }
}

impl Part {
    fn from_name(name: &str) -> Part {
        match name {
            "schema" => Part::Schema,
            "table" => Part::Table,
            "pks" => Part::Pks,
            _ => match name.strip_prefix("pk").map(str::parse::<usize>) {
                Some(Ok(n)) if name[2..].bytes().all(|b| b.is_ascii_digit()) => Part::Pk(n),
                _ => Part::Column(name.to_owned()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn orders_update() -> Change {
        Change::from_message_json(&fixtures::all()[2].line).unwrap()
    }

    fn check(template: &str, change: &Change, expect: Result<&str, &str>) {
        let got = format_key(template, change);
        assert_eq!(
            got.as_deref(),
            expect.map_err(|e| e.to_owned()).as_deref(),
            "{template}"
        );
    }

    #[test]
    fn placeholders_take_their_values_from_the_change() {
        let change = orders_update();
        check("{schema}.{table}:{pks}", &change, Ok("public.orders:1001"));
        check("order:{pk0}", &change, Ok("order:1001"));
        check(
            "{id}|{status}|{is_gift}|{shipping_weight_kg}",
            &change,
            Ok("1001|shipped|false|1.25"),
        );
        check("{total_amount}", &change, Ok("149.90"));
        check("static", &change, Ok("static"));
        check("{{{table}}}", &change, Ok("{orders}"));
        check("a{{b}}c", &change, Ok("a{b}c"));
        check("é:{id}:ü", &change, Ok("é:1001:ü"));
    }

    #[test]
    fn composite_and_big_keys_render_exactly() {
        let all = fixtures::all();
        let stock = Change::from_message_json(&all[4].line).unwrap();
        check(
            "{schema}.{table}:{pks}",
            &stock,
            Ok("inventory.stock_levels:ams-1:SKU-00042"),
        );
        check("{pk1}/{pk0}", &stock, Ok("SKU-00042/ams-1"));
        let views = Change::from_message_json(&all[11].line).unwrap();
        check("v:{view_id}", &views, Ok("v:9007199254740993"));
        check("v:{duration_ms}", &views, Ok("v:1834.5"));
    }

    #[test]
    fn columns_render_from_the_record_text() {
        let line = r#"{"record":{"x":1.0e20,"n":-0,"b":true,"s":"a\"b\u00e9"},"action":"insert",
            "metadata":{"table_schema":"public","table_name":"t","commit_timestamp":"x",
            "idempotency_key":"k","record_pks":["1"]}}"#;
        let change = Change::from_message_json(line).unwrap();
        check("{x}|{n}|{b}|{s}", &change, Ok(r#"1.0e20|-0|true|a"bé"#));
        let mut broken = change.to_parts();
        broken.record = "[1]".to_owned();
        let error = format_key("{x}", &Change::from(broken)).unwrap_err();
        assert!(
            error.starts_with(
                r#"key template "{x}": the record is not a JSON object: invalid type"#
            ),
            "{error}"
        );
    }

    #[test]
    fn missing_values_are_errors_naming_them() {
        let change = orders_update();
        check(
            "{tenant}",
            &change,
            Err(r#"key template "{tenant}": column "tenant" is missing from the record"#),
        );
        check(
            "{pk1}",
            &change,
            Err(
                r#"key template "{pk1}": {pk1} is past the last primary-key value (the change has 1)"#,
            ),
        );
        let delete = Change::from_message_json(&fixtures::all()[3].line).unwrap();
        check(
            "{status}",
            &delete,
            Err(r#"key template "{status}": column "status" is null"#),
        );
        let profile = Change::from_message_json(&fixtures::all()[6].line).unwrap();
        check(
            "{preferences}",
            &profile,
            Err(
                r#"key template "{preferences}": column "preferences" is not a string, number or boolean"#,
            ),
        );
    }

    #[test]
    fn reserved_names_and_pk_lookalikes() {
        assert_eq!(Part::from_name("pk12"), Part::Pk(12));
        assert_eq!(Part::from_name("pk"), Part::Column("pk".to_owned()));
        assert_eq!(Part::from_name("pk+1"), Part::Column("pk+1".to_owned()));
        assert_eq!(Part::from_name("pkey"), Part::Column("pkey".to_owned()));
        assert_eq!(Part::from_name("Schema"), Part::Column("Schema".to_owned()));
    }

    fn check_parse_error(template: &str, expect: &str) {
        assert_eq!(KeyTemplate::parse(template).unwrap_err(), expect);
    }

    #[test]
    fn malformed_templates_are_rejected() {
        check_parse_error("", "key template is empty");
        check_parse_error(
            "a{}",
            r#"key template "a{}": empty placeholder '{}' at byte 1"#,
        );
        check_parse_error(
            "a{id",
            r#"key template "a{id": unclosed '{' at byte 1 (write '{{' for a literal brace)"#,
        );
        check_parse_error(
            "{a{b}",
            r#"key template "{a{b}": unclosed '{' at byte 0 (write '{{' for a literal brace)"#,
        );
        check_parse_error(
            "a}b",
            r#"key template "a}b": unmatched '}' at byte 1 (write '}}' for a literal brace)"#,
        );
    }

    #[test]
    fn parsed_templates_keep_their_text() {
        let template = KeyTemplate::parse("{schema}:{pks}").unwrap();
        assert_eq!(template.as_str(), "{schema}:{pks}");
        assert_eq!(
            template.parts,
            [Part::Schema, Part::Literal(":".to_owned()), Part::Pks]
        );
    }
}
