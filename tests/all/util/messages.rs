//! Sequin messages for the tests, made from `tests/fixtures/sequin-examples.jsonl`.

/// The fixture file: one Sequin change message a line.
pub const FIXTURES: &str = include_str!("../../fixtures/sequin-examples.jsonl");

/// The fixture lines.
pub fn fixtures() -> Vec<&'static str> {
    FIXTURES.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// A fixture's order change (`base` is a fixture line of `public.orders` row 1001) moved to `row`,
/// and to commit LSN `lsn` when given.
pub fn order_change(base: &str, row: u64, lsn: Option<u64>) -> String {
    let line = move_row(base, 1001, row);
    match lsn {
        None => line,
        Some(lsn) => {
            let at = line
                .find(r#""commit_lsn":"#)
                .expect("a change with a commit_lsn");
            let end = at + line[at..].find(',').unwrap();
            format!("{}\"commit_lsn\":{lsn}{}", &line[..at], &line[end..])
        }
    }
}

/// A change of the row with primary key `from` (an `id` column) made a change of row `to`.
pub fn move_row(line: &str, from: u64, to: u64) -> String {
    line.replace(&format!(r#""id":{from}"#), &format!(r#""id":{to}"#))
        .replace(
            &format!(r#""record_pks":["{from}"]"#),
            &format!(r#""record_pks":["{to}"]"#),
        )
}

/// The update of order `row` to status `v<version>`, committed after every earlier version of
/// every row, with an idempotency key of its own.
pub fn order_line(row: u64, version: u64) -> String {
    order_change(fixtures()[2], row, Some(1_000_000 + version * 1000 + row))
        .replace(
            r#""status":"shipped""#,
            &format!(r#""status":"v{version}""#),
        )
        .replace(
            r#""idempotency_key":"MTI0MzM2MjMyMDox""#,
            &format!(r#""idempotency_key":"k-{row}-{version}""#),
        )
}

/// The `record` of a message, byte for byte: what row-cache stores.
pub fn record_text(line: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow)]
        record: &'a serde_json::value::RawValue,
    }
    serde_json::from_str::<Message<'_>>(line)
        .unwrap()
        .record
        .get()
        .to_owned()
}

/// The stream fields Sequin's Redis Stream sink writes for a message: one per top-level key,
/// strings raw and everything else as JSON text (SEQUIN-FORMAT.md §2.1).
pub fn stream_fields(line: &str) -> Vec<(String, String)> {
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
    let raw: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_str(line).unwrap();
    value
        .iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                _ => raw[k].get().to_owned(),
            };
            (k.clone(), text)
        })
        .collect()
}
