//! Property tests of the decoder: no input panics it, and what it accepts round-trips.
//!
//! The suite runs `KEEPWARM_FUZZ_CASES` cases per property (default 2,000); the soak mode is
//! `scripts/fuzz-soak.sh`, a million cases each in a release build.

use super::*;
use proptest::prelude::*;
use proptest::test_runner::Config;

fn cases() -> u32 {
    std::env::var("KEEPWARM_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}

fn fixtures() -> Vec<&'static str> {
    super::tests::FIXTURES
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Random JSON values, including deep nesting and awkward strings.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("{n}{n}")),
        any::<f64>().prop_map(|f| if f.is_finite() {
            f.to_string()
        } else {
            "0".to_owned()
        }),
        ".*".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        (1usize..400).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..5).prop_map(|kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// One mutation of a valid message's text.
#[derive(Debug, Clone)]
enum Mutation {
    /// Cut the text at a position.
    Truncate(usize),
    /// Put a byte at a position.
    Insert(usize, u8),
    /// Replace the value of a key (top level or metadata) with random JSON.
    Replace(&'static str, String),
    /// Remove a key.
    Remove(&'static str),
}

const KEYS: &[&str] = &[
    "record",
    "changes",
    "action",
    "metadata",
    "table_schema",
    "table_name",
    "commit_lsn",
    "commit_idx",
    "record_pks",
    "idempotency_key",
    "commit_timestamp",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        (prop::sample::select(KEYS), json_value()).prop_map(|(k, v)| Mutation::Replace(k, v)),
        prop::sample::select(KEYS).prop_map(Mutation::Remove),
    ]
}

fn apply(text: &str, mutation: &Mutation) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    match mutation {
        Mutation::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
        Mutation::Insert(at, byte) => bytes.insert(at % (bytes.len() + 1), *byte),
        Mutation::Replace(key, _) | Mutation::Remove(key) => {
            let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(text) else {
                return bytes;
            };
            let new = match mutation {
                Mutation::Replace(_, v) => serde_json::from_str(v).ok(),
                _ => None,
            };
            let slot = if doc.get(*key).is_some() {
                doc.as_object_mut()
            } else {
                doc.get_mut("metadata").and_then(|m| m.as_object_mut())
            };
            if let Some(map) = slot {
                match new {
                    Some(v) => {
                        map.insert((*key).to_owned(), v);
                    }
                    None => {
                        map.remove(*key);
                    }
                }
            }
            bytes = doc.to_string().into_bytes();
        }
    }
    bytes
}

fn decode_bytes(bytes: &[u8]) -> Result<ChangeMessage, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    ChangeMessage::from_json(text).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(Config { cases: cases(), ..Config::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_bytes(&bytes);
        let fields = [("action", &bytes[..]), ("record", &bytes[..]), ("metadata", &bytes[..])];
        let _ = ChangeMessage::from_stream_fields(|name| {
            fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        });
    }

    #[test]
    fn mutated_messages_are_rejected_with_a_reason_or_round_trip(
        index in 0usize..12,
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let fixtures = fixtures();
        let mut text = fixtures[index % fixtures.len()].to_owned();
        for m in &mutations {
            text = String::from_utf8_lossy(&apply(&text, m)).into_owned();
        }
        // The one-pass read of the object (and of its metadata) decides as serde_json's read
        // does, and reads the same fields.
        let exact = ChangeMessage::decode_object(&text, false);
        let fast = ChangeMessage::from_json(&text);
        prop_assert_eq!(format!("{fast:?}"), format!("{exact:?}"), "{:?}", text);
        match decode_bytes(text.as_bytes()) {
            Ok(message) => {
                let again = ChangeMessage::from_json(&message.to_sequin_json()).unwrap();
                prop_assert_eq!(again.to_sequin_json(), message.to_sequin_json());
                prop_assert!(nesting_depth(message.record()) <= MAX_DEPTH);
            }
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }
}

/// What the exact checks of an unchecked field decide: valid JSON, an object, not too deep.
fn exact_verdict(text: &str) -> bool {
    serde_json::from_str::<&RawValue>(text).is_ok()
        && text.trim_start().starts_with('{')
        && nesting_depth(text) <= MAX_DEPTH
}

proptest! {
    #![proptest_config(Config { cases: cases(), ..Config::default() })]

    #[test]
    fn the_one_pass_scan_vouches_only_for_what_the_exact_checks_accept(
        value in json_value(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<bool>()), 0..3),
    ) {
        // An object around the value, then a few bytes inserted or removed.
        let mut bytes = format!("{{\"v\":{value}}}").into_bytes();
        let unedited = edits.is_empty();
        for (at, byte, insert) in edits {
            let at = at % (bytes.len() + 1);
            if insert {
                bytes.insert(at, byte);
            } else if at < bytes.len() {
                bytes.remove(at);
            }
        }
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Ok(());
        };
        let exact = exact_verdict(text);
        let vouched = json_scan::is_shallow_object(&bytes);
        prop_assert!(!vouched || exact, "vouched for {text:?}");
        // And it vouches for every valid object serde_json writes, so the fast path is taken.
        prop_assert!(!(unedited && exact) || vouched, "did not vouch for {text:?}");
    }
}

proptest! {
    #![proptest_config(Config { cases: cases(), ..Config::default() })]

    #[test]
    fn metadata_read_in_one_pass_is_what_serde_json_reads(
        index in 0usize..12,
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        let fixtures = fixtures();
        let mut text = fixtures[index % fixtures.len()].to_owned();
        for m in &mutations {
            text = String::from_utf8_lossy(&apply(&text, m)).into_owned();
        }
        let Some(metadata) = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|doc| doc.get("metadata").map(ToString::to_string))
        else {
            return Ok(());
        };
        if let Some(scanned) = metadata::scanned(&metadata) {
            let exact: metadata::MetadataWire = serde_json::from_str(&metadata).unwrap();
            prop_assert_eq!(scanned, exact);
        }
    }
}
