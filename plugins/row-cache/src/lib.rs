//! row-cache: keeps one Redis string per row holding the row's JSON.
//!
//! | change | operation |
//! |---|---|
//! | insert, update, read | `SET key <record JSON> [PX ttl]`, the record byte for byte as received |
//! | delete | `DEL key` |
//! | update with an `"unchanged_toast"` column | `DEL key` (a placeholder is never cached) |
//!
//! Configured by the `[config]` table of `manifest.toml`:
//!
//! - `key`: the key template (default `{schema}.{table}:{pks}`); see
//!   [`keepwarm_guest::key`] for its placeholders. A change whose record lacks a column the
//!   template names is rejected with the reason (and dead-lettered).
//! - `ttl_seconds`: optional expiry of every `SET`, at least 1.

use keepwarm_guest::{Action, Change, Config, KeyTemplate, Op, Plugin, ops};
use serde::Deserialize;

/// The plugin: a parsed key template and an optional expiry.
#[derive(Debug)]
pub struct RowCache {
    /// Where each row goes.
    key: KeyTemplate,
    /// The expiry of every `SET`, in milliseconds.
    ttl_ms: Option<u64>,
}

/// The `[config]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RowCacheConfig {
    /// The key template.
    #[serde(default = "default_key")]
    key: String,
    /// The expiry of every `SET`, in seconds.
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

fn default_key() -> String {
    "{schema}.{table}:{pks}".to_owned()
}

impl Plugin for RowCache {
    fn new(config: &Config) -> Result<Self, String> {
        let config: RowCacheConfig = config.parse()?;
        let ttl_ms = match config.ttl_seconds {
            None => None,
            Some(0) => return Err("ttl_seconds must be at least 1".to_owned()),
            Some(seconds) => Some(
                seconds
                    .checked_mul(1000)
                    .ok_or_else(|| format!("ttl_seconds {seconds} is too large"))?,
            ),
        };
        Ok(RowCache {
            key: KeyTemplate::parse(&config.key)?,
            ttl_ms,
        })
    }

    fn handle(&self, change: &Change) -> Result<Vec<Op>, String> {
        let key = self.key.render(change)?;
        let op = match change.action() {
            Action::Delete => ops::del(key),
            Action::Update if change.has_unchanged_toast() => ops::del(key),
            Action::Insert | Action::Update | Action::Read => {
                let record = change.record_json();
                match self.ttl_ms {
                    Some(ttl_ms) => ops::set_with_ttl(key, record, ttl_ms),
                    None => ops::set(key, record),
                }
            }
        };
        Ok(vec![op])
    }
}

keepwarm_guest::export_plugin!(RowCache);

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared Sequin examples, one message per line.
    fn fixture_lines() -> Vec<String> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/sequin-examples.jsonl"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{path}: {error}"));
        text.lines().map(str::to_owned).collect()
    }

    /// The `record` text of a fixture line, cut out by string search rather than by the SDK.
    fn record_text(line: &str) -> &str {
        let start = line.find(r#"{"record":"#).unwrap() + r#"{"record":"#.len();
        let end = line.find(r#","changes":"#).unwrap();
        &line[start..end]
    }

    fn plugin(config: &str) -> Result<RowCache, String> {
        RowCache::new(&Config::from_json(config).unwrap())
    }

    fn handle(plugin: &RowCache, line: &str) -> Result<Vec<Op>, String> {
        plugin.handle(&Change::from_message_json(line).unwrap())
    }

    /// What the default configuration does with each fixture line, in order: the key, and
    /// whether the row is set (with its record text) or deleted.
    const EXPECTED: [(&str, bool); 12] = [
        ("public.orders:1001", true),
        ("public.order_items:1001:1", true),
        ("public.orders:1001", true),
        ("public.orders:998", false),
        ("inventory.stock_levels:ams-1:SKU-00042", true),
        (
            "billing.invoices:7d9f2c1e-4b3a-4e8d-a1f0-9c2b6e5d4a31",
            true,
        ),
        ("public.user_profiles:501", true),
        ("public.articles:3001", true),
        ("public.orders:1002", true),
        ("public.products:77", true),
        ("public.documents:doc_8f2a", false),
        ("analytics.page_views:2025-03-13:9007199254740993", true),
    ];

    fn check_fixtures(config: &str, ttl_ms: Option<u64>) {
        let plugin = plugin(config).unwrap();
        let lines = fixture_lines();
        assert_eq!(lines.len(), EXPECTED.len());
        for (n, (line, (key, set))) in lines.iter().zip(EXPECTED).enumerate() {
            let expect = if set {
                let value = record_text(line).as_bytes().to_vec();
                Op::Set(keepwarm_guest::SetOp {
                    key: key.to_owned(),
                    value,
                    ttl_ms,
                })
            } else {
                ops::del(key)
            };
            assert_eq!(handle(&plugin, line), Ok(vec![expect]), "line {}", n + 1);
        }
    }

    #[test]
    fn every_fixture_gives_its_exact_operation() {
        check_fixtures("{}", None);
        check_fixtures(r#"{"key":"{schema}.{table}:{pks}"}"#, None);
    }

    #[test]
    fn every_set_carries_the_ttl() {
        check_fixtures(r#"{"ttl_seconds":3600}"#, Some(3_600_000));
    }

    #[test]
    fn records_are_cached_byte_for_byte() {
        let plugin = plugin("{}").unwrap();
        let lines = fixture_lines();
        let value = |n: usize| match handle(&plugin, &lines[n]).unwrap().remove(0) {
            Op::Set(set) => String::from_utf8(set.value).unwrap(),
            op => panic!("line {}: {op:?}", n + 1),
        };
        assert!(value(5).contains(r#""amount_due":"1249.00","#));
        assert!(value(5).contains(r#""rounding_residual":"1E-7","#));
        assert!(value(5).contains(r#""pdf_sha256":"\\x9f86d081"#));
        assert!(value(6).contains(r#""digest":{"enabled":true,"hour_utc":7}"#));
        assert!(value(7).contains(r#""tags":["postgres","cdc",null,"naïve"]"#));
        assert!(value(9).contains("Café Crème ☕ 東京ブレンド"));
        assert!(value(11).contains(r#""view_id":9007199254740993}"#));
    }

    #[test]
    fn key_templates_can_name_columns() {
        let plugin = plugin(r#"{"key":"order:{id}:{currency}"}"#).unwrap();
        let lines = fixture_lines();
        let ops = handle(&plugin, &lines[0]).unwrap();
        assert_eq!(ops, [ops::set("order:1001:EUR", record_text(&lines[0]))]);
        assert_eq!(
            handle(&plugin, &lines[1]),
            Err(
                r#"key template "order:{id}:{currency}": column "id" is missing from the record"#
                    .to_owned()
            )
        );
        // A delete without REPLICA IDENTITY FULL carries only the primary key.
        assert_eq!(
            handle(&plugin, &lines[3]),
            Err(r#"key template "order:{id}:{currency}": column "currency" is null"#.to_owned())
        );
    }

    fn check_config_error(config: &str, expect: &str) {
        let error = plugin(config).unwrap_err();
        assert!(
            error.starts_with(expect),
            "{error:?} should start with {expect:?}"
        );
    }

    #[test]
    fn bad_configurations_are_rejected() {
        check_config_error(r#"{"ttl_seconds":0}"#, "ttl_seconds must be at least 1");
        check_config_error(
            r#"{"ttl_seconds":-5}"#,
            "invalid value: integer `-5`, expected u64",
        );
        check_config_error(
            r#"{"ttl_seconds":18446744073709552}"#,
            "ttl_seconds 18446744073709552 is too large",
        );
        check_config_error(
            r#"{"ttl":60}"#,
            "unknown field `ttl`, expected `key` or `ttl_seconds`",
        );
        check_config_error(
            r#"{"key":"{pks"}"#,
            r#"key template "{pks": unclosed '{' at byte 0"#,
        );
        check_config_error(
            r#"{"key":7}"#,
            "invalid type: integer `7`, expected a string",
        );
    }
}
