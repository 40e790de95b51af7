//! The workload: deterministic Sequin change messages, shaped as Sequin's Redis Stream sink
//! writes them (fields `record`, `changes`, `action`, `metadata`; strings raw, everything else as
//! JSON text).

use std::fmt::Write as _;

/// The rows the workload touches, all in `public.orders`.
pub(crate) const TABLE: (&str, &str) = ("public", "orders");

/// One stream entry.
pub(crate) struct Entry {
    /// The row's primary key.
    pub(crate) id: u64,
    /// The field/value pairs, in Sequin's order.
    pub(crate) fields: [(&'static str, String); 4],
}

impl Entry {
    /// The value of the field `name`, as `ChangeMessage::from_stream_fields` asks for it.
    pub(crate) fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_bytes())
    }

    /// The Sequin message as one JSON object, as the Kafka, NATS and RabbitMQ sinks send it.
    pub(crate) fn to_json(&self) -> String {
        let [record, changes, action, metadata] = &self.fields;
        format!(
            r#"{{"record":{},"changes":{},"action":"{}","metadata":{}}}"#,
            record.1, changes.1, action.1, metadata.1
        )
    }
}

/// A seeded generator: entry `i` is the same on every run with the same seed.
pub(crate) struct Workload {
    /// The seed.
    pub(crate) seed: u64,
    /// Distinct rows.
    pub(crate) rows: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const STATUSES: [&str; 5] = ["pending", "paid", "packed", "shipped", "delivered"];

impl Workload {
    /// Entry number `i`: 80% updates, 10% inserts, 5% deletes, 5% reads.
    pub(crate) fn entry(&self, i: u64) -> Entry {
        let r = splitmix(self.seed ^ splitmix(i));
        let id = r % self.rows + 1;
        let pick = (r >> 32) % 100;
        let action = match pick {
            0..80 => "update",
            80..90 => "insert",
            90..95 => "delete",
            _ => "read",
        };
        let status = STATUSES[usize::try_from((r >> 40) % 5).unwrap_or(0)];
        let cents = (r >> 20) % 100_000;
        let mut record = String::with_capacity(640);
        let _ = write!(
            record,
            r#"{{"id":{id},"customer_id":{customer},"status":"{status}","currency":"EUR","total_amount":"{units}.{frac:02}","shipping_weight_kg":{weight}.25,"is_gift":{gift},"created_at":"2025-03-14T09:26:53.589793Z","updated_at":"2025-03-14T09:{m:02}:{s:02}.601022Z","shipping_address":{{"line1":"{id} Keizersgracht","city":"Amsterdam","postcode":"1015 CJ","country":"NL"}},"notes":""#,
            customer = id % 9973 + 1,
            units = cents / 100,
            frac = cents % 100,
            weight = (r >> 12) % 20,
            gift = (r & 1) == 1,
            m = (i / 60) % 60,
            s = i % 60,
        );
        // Pad the record to about 600 bytes with a deterministic note.
        while record.len() < 596 {
            record.push(char::from(
                b'a' + u8::try_from((record.len() + usize::try_from(i % 26).unwrap_or(0)) % 26)
                    .unwrap_or(0),
            ));
        }
        record.push_str(r#""}"#);
        let changes = if action == "update" {
            format!(
                r#"{{"status":"{}"}}"#,
                STATUSES[usize::try_from((r >> 44) % 5).unwrap_or(0)]
            )
        } else {
            "null".to_owned()
        };
        // Backfill reads carry no commit position.
        let (lsn, idx) = if action == "read" {
            ("null".to_owned(), "null")
        } else {
            ((1_000_000_000 + i * 8).to_string(), "0")
        };
        let metadata = format!(
            r#"{{"table_schema":"{schema}","table_name":"{table}","commit_timestamp":"2025-03-14T09:26:53.601022Z","commit_lsn":{lsn},"commit_idx":{idx},"database_name":"shop-prod","transaction_annotations":null,"idempotency_key":"bench-{i}","record_pks":["{id}"],"enrichment":null,"consumer":{{"id":"0b7e1c52-3d4f-4a8e-9c21-6f5d8e7a9b10","name":"shop-cdc","annotations":{{}}}},"database":{{"id":"5a9c3e7d-2b1f-4c6a-8e0d-7f3b1a2c4d5e","name":"shop-prod","annotations":{{}},"database":"shop","hostname":"pg-primary.internal.example.com"}}}}"#,
            schema = TABLE.0,
            table = TABLE.1,
        );
        Entry {
            id,
            fields: [
                ("record", record),
                ("changes", changes),
                ("action", action.to_owned()),
                ("metadata", metadata),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_deterministic_valid_json_and_about_600_bytes() {
        let w = Workload { seed: 7, rows: 100 };
        for i in 0..200 {
            let a = w.entry(i);
            let b = w.entry(i);
            assert_eq!(a.fields, b.fields);
            let record: serde_json::Value = serde_json::from_str(&a.fields[0].1).unwrap();
            assert_eq!(record["id"], a.id);
            assert!((590..=620).contains(&a.fields[0].1.len()));
            let _: serde_json::Value = serde_json::from_str(&a.fields[1].1).unwrap();
            let _: serde_json::Value = serde_json::from_str(&a.fields[3].1).unwrap();
        }
    }

    #[test]
    fn the_mix_is_about_80_10_5_5() {
        let w = Workload {
            seed: 1,
            rows: 100_000,
        };
        let mut counts = std::collections::HashMap::new();
        for i in 0..10_000 {
            *counts.entry(w.entry(i).fields[2].1.clone()).or_insert(0) += 1;
        }
        assert!((7_700..8_300).contains(&counts["update"]));
        assert!((800..1_200).contains(&counts["insert"]));
        assert!((350..650).contains(&counts["delete"]));
        assert!((350..650).contains(&counts["read"]));
    }
}
