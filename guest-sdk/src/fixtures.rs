//! The shared Sequin example messages, with the parts tests compare cut out by plain string
//! search, independently of the JSON parser under test.

use std::path::Path;

/// One line of `sequin-examples.jsonl` and the texts it holds.
pub(crate) struct Fixture {
    /// The whole line.
    pub(crate) line: String,
    /// The `record` object text.
    pub(crate) record: String,
    /// The `changes` object text, `None` when it is `null`.
    pub(crate) changes: Option<String>,
    /// The action name.
    pub(crate) action: String,
    /// The `metadata` object text.
    pub(crate) metadata: String,
    /// `metadata.table_schema`.
    pub(crate) schema: String,
    /// `metadata.table_name`.
    pub(crate) table: String,
}

/// Every line of the fixtures file, in order.
pub(crate) fn all() -> Vec<Fixture> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sequin-examples.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    let fixtures: Vec<Fixture> = text
        .lines()
        .filter(|line| !line.is_empty())
        .map(cut)
        .collect();
    assert_eq!(fixtures.len(), 12, "fixture lines");
    fixtures
}

/// Cuts a line of the shape `{"record":R,"changes":C,"action":"A","metadata":M}`.
fn cut(line: &str) -> Fixture {
    let between = |start: &str, end: &str| {
        let from = line.find(start).expect(start) + start.len();
        let to = from + line[from..].find(end).expect(end);
        line[from..to].to_owned()
    };
    let changes = between(r#","changes":"#, r#","action":"#);
    let metadata_start = line.find(r#","metadata":"#).unwrap() + r#","metadata":"#.len();
    Fixture {
        line: line.to_owned(),
        record: between(r#"{"record":"#, r#","changes":"#),
        changes: (changes != "null").then_some(changes),
        action: between(r#""action":""#, r#"""#),
        metadata: line[metadata_start..line.len() - 1].to_owned(),
        schema: between(r#""table_schema":""#, r#"""#),
        table: between(r#""table_name":""#, r#"""#),
    }
}
