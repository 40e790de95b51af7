//! Decoding tests over every case of the shared fixtures file, both wire shapes.

use super::*;

pub(super) const FIXTURES: &str = include_str!("../../../tests/fixtures/sequin-examples.jsonl");

fn fixtures() -> Vec<&'static str> {
    FIXTURES.lines().filter(|l| !l.trim().is_empty()).collect()
}

fn fixture(n: usize) -> ChangeMessage {
    ChangeMessage::from_json(fixtures()[n]).unwrap()
}

/// The Redis Stream shape of a JSON message: each top-level key becomes a field, strings raw,
/// everything else as JSON text (SEQUIN-FORMAT.md §2.1).
fn stream_fields(line: &str) -> Vec<(String, Vec<u8>)> {
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
    let raw: std::collections::HashMap<String, Box<RawValue>> = serde_json::from_str(line).unwrap();
    value
        .iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                _ => raw[k].get().to_owned(),
            };
            (k.clone(), text.into_bytes())
        })
        .collect()
}

fn from_fields(fields: &[(String, Vec<u8>)]) -> Result<ChangeMessage, DecodeError> {
    ChangeMessage::from_stream_fields(|name| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    })
}

#[test]
fn every_fixture_decodes_the_same_from_both_shapes() {
    for line in fixtures() {
        let json = ChangeMessage::from_json(line).unwrap();
        let stream = from_fields(&stream_fields(line)).unwrap();
        assert_eq!(json.to_sequin_json(), stream.to_sequin_json());
        assert_eq!(
            json.pks().collect::<Vec<_>>(),
            stream.pks().collect::<Vec<_>>()
        );
        assert_eq!(json.version, stream.version);
    }
}

#[test]
fn insert_carries_version_and_pks() {
    let m = fixture(0);
    assert_eq!(m.action, Action::Insert);
    assert_eq!((m.schema(), m.table()), ("public", "orders"));
    assert_eq!(m.pks().collect::<Vec<_>>(), ["1001"]);
    assert_eq!(
        m.version,
        Some(Version {
            lsn: 1243361160,
            idx: 0
        })
    );
    assert_eq!(m.commit_timestamp(), "2025-03-14T09:26:53.601022Z");
    assert_eq!(m.idempotency_key(), "MTI0MzM2MTE2MDow");
    assert!(m.changes().is_none());
}

#[test]
fn numeric_strings_stay_strings_in_the_record_text() {
    let m = fixture(0);
    assert!(m.record().contains(r#""total_amount":"149.90""#));
    let invoice = fixture(5);
    assert!(invoice.record().contains(r#""rounding_residual":"1E-7""#));
    assert!(invoice.record().contains(r#""pdf_sha256":"\\x9f86"#));
}

#[test]
fn composite_keys_keep_key_order() {
    let item = fixture(1);
    assert_eq!(item.pks().collect::<Vec<_>>(), ["1001", "1"]);
    let stock = fixture(4);
    assert_eq!(stock.pks().collect::<Vec<_>>(), ["ams-1", "SKU-00042"]);
    assert_eq!(stock.row_id(), "inventory.stock_levels:ams-1:SKU-00042");
}

#[test]
fn non_public_schemas_are_kept() {
    assert_eq!(fixture(4).schema(), "inventory");
    assert_eq!(fixture(5).schema(), "billing");
    assert_eq!(fixture(11).schema(), "analytics");
}

#[test]
fn update_keeps_old_values_and_annotations() {
    let m = fixture(2);
    assert_eq!(m.action, Action::Update);
    assert_eq!(
        m.changes().unwrap(),
        r#"{"status":"pending","updated_at":"2025-03-14T09:26:53.589793Z"}"#
    );
    assert!(m.metadata().contains("fulfillment-worker"));
    assert_eq!(
        m.version,
        Some(Version {
            lsn: 1243362320,
            idx: 1
        })
    );
}

#[test]
fn delete_record_holds_nulls_beside_the_key() {
    let m = fixture(3);
    assert_eq!(m.action, Action::Delete);
    assert!(m.record().contains(r#""id":998"#));
    assert!(m.record().contains(r#""status":null"#));
}

#[test]
fn backfill_reads_have_no_version() {
    for n in [8, 11] {
        let m = fixture(n);
        assert_eq!(m.action, Action::Read);
        assert_eq!(m.version, None);
    }
}

#[test]
fn big_integers_and_nested_json_stay_exact() {
    let views = fixture(11);
    assert!(views.record().contains(r#""view_id":9007199254740993"#));
    assert_eq!(
        views.pks().collect::<Vec<_>>(),
        ["2025-03-13", "9007199254740993"]
    );
    assert!(
        views
            .record()
            .contains(r#""utm":{"campaign":"spring_sale","source":"newsletter"}"#)
    );
    let profile = fixture(6);
    assert!(
        profile
            .record()
            .contains(r#""digest":{"enabled":true,"hour_utc":7}"#)
    );
    let article = fixture(7);
    assert!(
        article
            .record()
            .contains(r#""rating_grid":[[5,4],[3,null]]"#)
    );
}

#[test]
fn unicode_stays_as_it_is() {
    let product = fixture(9);
    assert!(product.record().contains("Café Crème ☕ 東京ブレンド"));
    assert!(product.record().contains("🍫"));
}

#[test]
fn toast_placeholder_and_empty_changes_are_kept() {
    let doc = fixture(10);
    assert!(doc.record().contains(r#""body":"unchanged_toast""#));
    assert_eq!(doc.changes().unwrap(), "{}");
}

#[test]
fn to_sequin_json_round_trips() {
    for line in fixtures() {
        let m = ChangeMessage::from_json(line).unwrap();
        let again = ChangeMessage::from_json(&m.to_sequin_json()).unwrap();
        assert_eq!(m.to_sequin_json(), again.to_sequin_json());
    }
}

fn reason(text: &str) -> String {
    ChangeMessage::from_json(text).unwrap_err().to_string()
}

#[test]
fn malformed_messages_get_clear_reasons() {
    assert!(reason("{not json").contains("invalid JSON"));
    assert!(reason("\"just a string\"").contains("JSON string"));
    assert!(reason("[1,2]").contains("not an object"));
    assert!(reason("{}").contains("missing field `action`"));
    let line = fixtures()[0];
    let unknown = line.replace(r#""action":"insert""#, r#""action":"upsert""#);
    assert!(reason(&unknown).contains("unknown action \"upsert\""));
    let no_meta = line.replace(r#""table_schema":"public","#, "");
    assert!(
        reason(&no_meta).contains("table_schema"),
        "{}",
        reason(&no_meta)
    );
    let bad_lsn = line.replace(r#""commit_lsn":1243361160"#, r#""commit_lsn":"x""#);
    assert!(reason(&bad_lsn).contains("metadata"));
    let no_lsn = line.replace(r#""commit_lsn":1243361160"#, r#""commit_lsn":null"#);
    assert!(reason(&no_lsn).contains("needs commit_lsn"));
    let record_array = line
        .replace(r#""record":{"#, r#""record":[{"#)
        .replace(r#"},"changes""#, r#"}],"changes""#);
    assert!(
        reason(&record_array).contains("`record` is not a JSON object"),
        "{}",
        reason(&record_array)
    );
}

#[test]
fn stream_entries_with_missing_or_bad_fields_are_rejected() {
    let mut fields = stream_fields(fixtures()[0]);
    fields.retain(|(k, _)| k != "metadata");
    assert!(
        from_fields(&fields)
            .unwrap_err()
            .to_string()
            .contains("missing field `metadata`")
    );
    let mut fields = stream_fields(fixtures()[0]);
    fields[0].1 = vec![0xff, 0xfe];
    assert!(
        from_fields(&fields)
            .unwrap_err()
            .to_string()
            .contains("not valid UTF-8")
    );
}

#[test]
fn absurd_nesting_is_an_error_not_a_crash() {
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let line = fixtures()[0].replace(r#""is_gift":false"#, &format!(r#""is_gift":{deep}"#));
    assert!(reason(&line).contains("nested deeper than 128"));
    let ok = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let line = fixtures()[0].replace(
        r#""is_gift":false"#,
        &format!(r#""is_gift":{ok},"s":"[[[""#),
    );
    assert!(ChangeMessage::from_json(&line).is_ok());
}

#[test]
fn entries_taken_by_value_decode_like_borrowed_ones() {
    for line in fixtures() {
        let fields = stream_fields(line);
        let borrowed = from_fields(&fields).unwrap();
        let owned = ChangeMessage::from_stream_entry(fields).unwrap();
        assert_eq!(owned.to_sequin_json(), borrowed.to_sequin_json());
        assert_eq!(
            owned.pks().collect::<Vec<_>>(),
            borrowed.pks().collect::<Vec<_>>()
        );
        assert_eq!(owned.version, borrowed.version);
    }
}

#[test]
fn a_rejected_entry_gives_its_fields_back_untouched() {
    let mut fields = stream_fields(fixtures()[0]);
    let record = fields.iter_mut().find(|(k, _)| k == "record").unwrap();
    record.1.truncate(record.1.len() - 1);
    let before = fields.clone();
    let (error, after) = ChangeMessage::from_stream_entry(fields).unwrap_err();
    assert!(
        error.to_string().contains("`record` is not valid JSON"),
        "{error}"
    );
    assert_eq!(after, before);

    // Not UTF-8 in one field, valid text in the others: all of it comes back as it arrived,
    // and the reason names the field, as for a borrowed entry.
    let mut fields = stream_fields(fixtures()[0]);
    let metadata = fields.iter_mut().find(|(k, _)| k == "metadata").unwrap();
    metadata.1.push(0xff);
    let before = fields.clone();
    let borrowed = from_fields(&fields).unwrap_err();
    let (error, after) = ChangeMessage::from_stream_entry(fields).unwrap_err();
    assert!(
        error.to_string().contains("`metadata` is not valid UTF-8"),
        "{error}"
    );
    assert_eq!(error, borrowed);
    assert_eq!(after, before);
}

#[test]
fn whitespace_around_a_field_is_not_kept() {
    let plain = ChangeMessage::from_stream_entry(stream_fields(fixtures()[0])).unwrap();
    // On both sides, or on one (each side is looked at on its own).
    for (before, after) in [(" \n", "\t "), ("", "\r\n"), ("\t", "")] {
        let mut fields = stream_fields(fixtures()[0]);
        for (k, v) in &mut fields {
            if k == "record" || k == "metadata" {
                *v = [before.as_bytes(), v, after.as_bytes()].concat();
            }
        }
        let message = ChangeMessage::from_stream_entry(fields).unwrap();
        assert_eq!(message.record(), plain.record(), "{before:?} {after:?}");
        assert_eq!(message.metadata(), plain.metadata(), "{before:?} {after:?}");
    }
}

#[test]
fn many_shallow_brackets_are_not_deep_nesting() {
    // More opening brackets than the depth limit, none deeper than 2: the quick count passes
    // the text on to the exact scan, which accepts it.
    let wide = vec!["[1]"; 500].join(",");
    let line = fixtures()[0].replace(r#""is_gift":false"#, &format!(r#""is_gift":[{wide}]"#));
    assert!(ChangeMessage::from_json(&line).is_ok());
}

#[test]
fn metadata_must_be_an_object() {
    let line = fixtures()[0];
    let start = line.find(r#""metadata":"#).unwrap() + r#""metadata":"#.len();
    let as_array = format!("{}[{}]}}", &line[..start], &line[start..line.len() - 1]);
    assert!(
        reason(&as_array).contains("`metadata` is not a JSON object"),
        "{}",
        reason(&as_array)
    );
}

#[test]
fn the_one_pass_read_of_a_message_agrees_with_serde_json_at_its_edges() {
    let line = fixtures()[0];
    let nested = |depth: usize| {
        let deep = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        line.replace(r#""is_gift":false"#, &format!(r#""is_gift":{deep}"#))
    };
    let mut cases: Vec<String> = (120..136).map(nested).collect();
    cases.extend([
        // A part given twice, a key written with an escape, escapes in `action`.
        line.replace(
            r#""action":"insert""#,
            r#""action":"insert","action":"update""#,
        ),
        line.replace(r#""action":"insert""#, r#""act\u0069on":"insert""#),
        line.replace(
            r#""action":"insert""#,
            r#""action":"insert","rec\u006frd":{}"#,
        ),
        line.replace(r#""action":"insert""#, r#""a\nb":1,"action":"insert""#),
        line.replace(r#""action":"insert""#, r#""action":"ins\u0065rt""#),
        line.replace(r#""action":"insert""#, r#""action":7"#),
        line.replace(r#""action":"insert""#, r#""action":null"#),
        line.replace(r#""record":{"#, r#""record":null,"r":{"#),
        line.replace(r#""changes":null"#, r#""changes":{"status":"x"}"#),
        line.replace(r#""changes":null"#, r#""changes":[]"#),
        line.replace(r#""metadata":{"#, r#""metadata":null,"m":{"#),
        format!(" \n{line}\t "),
        format!("{line} x"),
        format!("\u{feff}{line}"),
    ]);
    for text in &cases {
        let exact = ChangeMessage::decode_object(text, false);
        let fast = ChangeMessage::from_json(text);
        assert_eq!(
            fast.as_ref().map(ChangeMessage::to_sequin_json),
            exact.as_ref().map(ChangeMessage::to_sequin_json),
            "{text}"
        );
    }
    // A key too short to spell a part's name with escapes does not stop the one pass.
    let short = line.replace(r#""action":"insert""#, r#""a\nb":1,"action":"insert""#);
    assert!(Parts::scanned(&short).is_some());
    // Both verdicts occur: the edges are where they change.
    assert!(cases.iter().any(|t| ChangeMessage::from_json(t).is_ok()));
    assert!(cases.iter().any(|t| ChangeMessage::from_json(t).is_err()));
}

#[test]
fn the_one_pass_read_takes_every_fixture() {
    for line in fixtures() {
        let mut parts = Parts::scanned(line).expect(line);
        // The metadata's fields, gathered in the same pass, are what reading it alone gives.
        let fields = parts.fields.take().expect(line);
        let metadata = parts.metadata.expect(line);
        assert_eq!(Some(fields), metadata::scanned(metadata), "{line}");
        let wire: MessageWire<'_> = serde_json::from_str(line).unwrap();
        assert_eq!(parts, Parts::from(wire), "{line}");
    }
}

#[test]
fn escaped_metadata_texts_are_read_unescaped_into_the_message() {
    // Escapes send the metadata to serde_json, which unescapes each text into a copy of its
    // own; the message holds those texts, not the escaped ones.
    let line = fixtures()[0]
        .replace(r#""table_name":"orders""#, r#""table_name":"ord\u0065rs""#)
        .replace(
            r#""record_pks":["1001"]"#,
            r#""record_pks":["10\"01","a\\b"]"#,
        )
        .replace(
            r#""idempotency_key":"MTI0MzM2MTE2MDow""#,
            r#""idempotency_key":"MTI0\/MzM2""#,
        );
    for message in [
        ChangeMessage::from_json(&line).unwrap(),
        from_fields(&stream_fields(&line)).unwrap(),
    ] {
        assert_eq!(message.table(), "orders");
        assert_eq!(message.pks().collect::<Vec<_>>(), ["10\"01", "a\\b"]);
        assert_eq!(message.idempotency_key(), "MTI0/MzM2");
        assert_eq!(message.schema(), "public");
        assert!(message.metadata().contains(r#""table_name":"ord\u0065rs""#));
    }
}

#[test]
fn utf8_accepts_what_std_accepts_and_fails_with_stds_error() {
    let long_ascii = "a".repeat(100);
    let texts: [&[u8]; 7] = [
        b"",
        b"{\"a\":\"caf\xc3\xa9\"}",
        long_ascii.as_bytes(),
        "\u{1F600} and \u{10FFFF}".as_bytes(),
        b"caf\xc3",
        b"\xff\xfe",
        b"\xed\xa0\x80 (a surrogate)",
    ];
    for bytes in texts {
        let mut with_tail = long_ascii.clone().into_bytes();
        with_tail.extend_from_slice(bytes);
        for bytes in [bytes, with_tail.as_slice()] {
            assert_eq!(super::utf8(bytes), std::str::from_utf8(bytes), "{bytes:?}");
        }
    }
}
