//! Column values: the text form pgoutput sends, written as the JSON Sequin writes for that type
//! (SEQUIN-FORMAT.md §1.4, CDC column), chosen by type OID.
//!
//! Numbers stay numbers (integers verbatim, floats in their shortest form), `numeric` becomes a
//! string in `Decimal.to_string` scientific form, timestamps ISO 8601 with six fractional digits
//! (`timestamptz` in UTC with a `Z`), `time`/`timetz` lose their fraction and offset as Sequin's
//! cast does, `interval` an object of months, days and microseconds, json/jsonb the JSON itself,
//! arrays JSON arrays of their elements. Every other type (text, uuid, bytea as `\x…`, enums,
//! inet, money …) is its text, as a string. A value that does not parse as its type expects is
//! written as its text too, never dropped.

use chrono::{Duration, NaiveDateTime};

/// Type OIDs of the built-in types with a mapping of their own (`pg_type.oid`, fixed).
mod oid {
    pub(super) const BOOL: u32 = 16;
    pub(super) const INT8: u32 = 20;
    pub(super) const INT2: u32 = 21;
    pub(super) const INT4: u32 = 23;
    pub(super) const OID: u32 = 26;
    pub(super) const JSON: u32 = 114;
    pub(super) const FLOAT4: u32 = 700;
    pub(super) const FLOAT8: u32 = 701;
    pub(super) const TIME: u32 = 1083;
    pub(super) const TIMESTAMP: u32 = 1114;
    pub(super) const TIMESTAMPTZ: u32 = 1184;
    pub(super) const INTERVAL: u32 = 1186;
    pub(super) const TIMETZ: u32 = 1266;
    pub(super) const NUMERIC: u32 = 1700;
    pub(super) const JSONB: u32 = 3802;
}

/// The element type of a built-in array type, if `type_oid` is one.
fn element_of(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => 17, // bytea
        1002 => 18, // char
        1003 => 19, // name
        1005 => oid::INT2,
        1007 => oid::INT4,
        1009 => 25,   // text
        1014 => 1042, // bpchar
        1015 => 1043, // varchar
        1016 => oid::INT8,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1028 => oid::OID,
        791 => 790, // money
        199 => oid::JSON,
        3807 => oid::JSONB,
        1182 => 1082, // date
        1183 => oid::TIME,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1187 => oid::INTERVAL,
        1270 => oid::TIMETZ,
        1231 => oid::NUMERIC,
        2951 => 2950, // uuid
        1041 => 869,  // inet
        651 => 650,   // cidr
        1040 => 829,  // macaddr
        143 => 142,   // xml
        1017 => 600,  // point
        _ => return None,
    })
}

/// Appends the JSON of one non-null value of type `type_oid`, given its Postgres text form.
pub(super) fn write_value(out: &mut String, type_oid: u32, text: &str) {
    let written = match type_oid {
        oid::BOOL => match text {
            "t" => Some("true".to_owned()),
            "f" => Some("false".to_owned()),
            _ => None,
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => integer(text).map(str::to_owned),
        oid::FLOAT4 | oid::FLOAT8 => float(text),
        oid::NUMERIC => Some(quoted(&numeric(text))),
        oid::JSON | oid::JSONB => json(text).map(str::to_owned),
        oid::TIMESTAMPTZ => timestamptz(text).map(|t| quoted(&t)),
        oid::TIMESTAMP => timestamp(text).map(|t| quoted(&t)),
        oid::TIME | oid::TIMETZ => time(text).map(quoted),
        oid::INTERVAL => interval(text),
        _ => match element_of(type_oid) {
            Some(element) => array(text, element),
            None => None,
        },
    };
    match written {
        Some(json) => out.push_str(&json),
        None => out.push_str(&quoted(text)),
    }
}

/// A JSON string.
pub(super) fn quoted(text: &str) -> String {
    // Serialising a `str` cannot fail.
    serde_json::to_string(text).unwrap_or_else(|_| String::from("\"\""))
}

fn integer(text: &str) -> Option<&str> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(text)
}

/// Shortest round-trip form; `NaN` and the infinities are not JSON numbers and go as strings.
fn float(text: &str) -> Option<String> {
    let value: f64 = text.parse().ok()?;
    if !value.is_finite() {
        return None;
    }
    serde_json::Number::from_f64(value).map(|n| n.to_string())
}

fn json(text: &str) -> Option<&str> {
    serde_json::from_str::<&serde_json::value::RawValue>(text)
        .ok()
        .map(|raw| raw.get())
}

/// `numeric` as Elixir's `Decimal.to_string/1` (scientific mode) writes it: plain unless the
/// exponent is negative and the adjusted exponent below −6 (`0.0000001` → `1E-7`).
fn numeric(text: &str) -> String {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let valid = !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit());
    if !valid {
        // NaN, Infinity, -Infinity: as Postgres writes them.
        return text.to_owned();
    }
    let exponent = -(fraction.len() as i64);
    let all = format!("{whole}{fraction}");
    let coefficient = all.trim_start_matches('0');
    let coefficient = if coefficient.is_empty() {
        "0"
    } else {
        coefficient
    };
    let adjusted = exponent + coefficient.len() as i64 - 1;
    if exponent == 0 || adjusted >= -6 {
        return text.to_owned();
    }
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    let (first, rest) = coefficient.split_at(1);
    out.push_str(first);
    if !rest.is_empty() {
        out.push('.');
        out.push_str(rest);
    }
    out.push_str(&format!("E{adjusted}"));
    out
}

/// `2026-12-02 06:13:42.5+05:30` → `2026-12-02T00:43:42.500000Z`.
fn timestamptz(text: &str) -> Option<String> {
    // The offset starts at the last sign after the time of day.
    let at = text.rfind(['+', '-']).filter(|&at| at > 10)?;
    let (local, offset) = text.split_at(at);
    let local = NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    let sign: i64 = if offset.starts_with('-') { -1 } else { 1 };
    let mut seconds = 0i64;
    for (part, unit) in offset[1..].split(':').zip([3600, 60, 1]) {
        seconds += part.parse::<i64>().ok()? * unit;
    }
    let utc = local.checked_sub_signed(Duration::seconds(sign * seconds))?;
    Some(utc.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

/// `2026-12-02 06:13:42` → `2026-12-02T06:13:42.000000`.
fn timestamp(text: &str) -> Option<String> {
    let local = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok()?;
    Some(local.format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
}

/// `HH:MM:SS`, fraction and offset dropped (Ecto's `:time` cast).
fn time(text: &str) -> Option<&str> {
    let hms = text.get(..8)?;
    let b = hms.as_bytes();
    (b[2] == b':' && b[5] == b':').then_some(hms)
}

/// The `postgres` interval style (`1 year 2 mons -3 days 04:05:06.5`) as
/// `{"months":14,"days":-3,"microseconds":14706500000}`.
fn interval(text: &str) -> Option<String> {
    let (mut months, mut days, mut micros) = (0i64, 0i64, 0i64);
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word.contains(':') {
            let (negative, clock) = match word.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, word.strip_prefix('+').unwrap_or(word)),
            };
            let mut parts = clock.split(':');
            let hours: i64 = parts.next()?.parse().ok()?;
            let minutes: i64 = parts.next()?.parse().ok()?;
            let seconds = parts.next().unwrap_or("0");
            let (whole, fraction) = seconds.split_once('.').unwrap_or((seconds, ""));
            let whole: i64 = whole.parse().ok()?;
            let fraction: i64 = if fraction.is_empty() {
                0
            } else {
                format!("{fraction:0<6}").get(..6)?.parse().ok()?
            };
            let total = ((hours * 60 + minutes) * 60 + whole) * 1_000_000 + fraction;
            micros += if negative { -total } else { total };
            continue;
        }
        let n: i64 = word.parse().ok()?;
        match words.next()? {
            "year" | "years" => months += 12 * n,
            "mon" | "mons" => months += n,
            "day" | "days" => days += n,
            _ => return None,
        }
    }
    Some(format!(
        r#"{{"months":{months},"days":{days},"microseconds":{micros}}}"#
    ))
}

/// A Postgres array literal (`{1,NULL,"a b"}`, nested for more dimensions) as a JSON array,
/// each element mapped by `element`.
fn array(text: &str, element: u32) -> Option<String> {
    // `[0:1]={…}`: explicit bounds, which JSON cannot keep.
    let body = match text.find('=') {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let mut out = String::new();
    let rest = array_level(body.as_bytes(), element, &mut out)?;
    rest.is_empty().then_some(out)
}

/// Parses one `{…}` level at the start of `input`, appending JSON; returns what follows.
fn array_level<'a>(input: &'a [u8], element: u32, out: &mut String) -> Option<&'a [u8]> {
    let mut rest = input.strip_prefix(b"{")?;
    out.push('[');
    if let Some(after) = rest.strip_prefix(b"}") {
        out.push(']');
        return Some(after);
    }
    loop {
        if rest.first() == Some(&b'{') {
            rest = array_level(rest, element, out)?;
        } else if rest.first() == Some(&b'"') {
            let mut value = Vec::new();
            let mut i = 1;
            loop {
                match *rest.get(i)? {
                    b'\\' => {
                        value.push(*rest.get(i + 1)?);
                        i += 2;
                    }
                    b'"' => break,
                    byte => {
                        value.push(byte);
                        i += 1;
                    }
                }
            }
            write_value(out, element, std::str::from_utf8(&value).ok()?);
            rest = &rest[i + 1..];
        } else {
            let end = rest.iter().position(|&b| b == b',' || b == b'}')?;
            let value = std::str::from_utf8(&rest[..end]).ok()?;
            if value.eq_ignore_ascii_case("NULL") {
                out.push_str("null");
            } else {
                write_value(out, element, value);
            }
            rest = &rest[end..];
        }
        match rest.split_first()? {
            (b',', after) => {
                out.push(',');
                rest = after;
            }
            (b'}', after) => {
                out.push(']');
                return Some(after);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(type_oid: u32, text: &str, expect: &str) {
        let mut out = String::new();
        write_value(&mut out, type_oid, text);
        assert_eq!(out, expect, "type {type_oid}, text {text:?}");
    }

    #[test]
    fn scalars() {
        check(16, "t", "true");
        check(16, "f", "false");
        check(20, "-9223372036854775808", "-9223372036854775808");
        check(23, "42", "42");
        check(701, "1.25", "1.25");
        check(701, "5", "5.0");
        check(700, "1.1", "1.1");
        check(701, "NaN", r#""NaN""#);
        check(701, "-Infinity", r#""-Infinity""#);
        check(25, "naïve \"quoted\"\n", r#""naïve \"quoted\"\n""#);
        check(
            2950,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#,
        );
        check(17, r"\xdeadbeef", r#""\\xdeadbeef""#);
        check(3802, r#"{"a": [1, 10.50]}"#, r#"{"a": [1, 10.50]}"#);
        check(114, "3", "3");
        check(1082, "2026-12-02", r#""2026-12-02""#);
    }

    #[test]
    fn numerics_as_decimal_writes_them() {
        check(1700, "149.90", r#""149.90""#);
        check(1700, "1000", r#""1000""#);
        check(1700, "0.000001", r#""0.000001""#);
        check(1700, "0.0000001", r#""1E-7""#);
        check(1700, "0.00000012", r#""1.2E-7""#);
        check(1700, "-0.00000012", r#""-1.2E-7""#);
        check(1700, "0.0000000", r#""0E-7""#);
        check(1700, "NaN", r#""NaN""#);
    }

    #[test]
    fn times() {
        check(
            1184,
            "2026-12-02 06:13:42+00",
            r#""2026-12-02T06:13:42.000000Z""#,
        );
        check(
            1184,
            "2026-12-02 06:13:42.5+05:30",
            r#""2026-12-02T00:43:42.500000Z""#,
        );
        check(
            1184,
            "2026-12-01 23:00:00.123456-02",
            r#""2026-12-02T01:00:00.123456Z""#,
        );
        check(1184, "infinity", r#""infinity""#);
        check(
            1114,
            "2026-12-02 06:13:42.25",
            r#""2026-12-02T06:13:42.250000""#,
        );
        check(1083, "06:13:42.123", r#""06:13:42""#);
        check(1266, "06:13:42+02", r#""06:13:42""#);
        check(
            1186,
            "1 year 2 mons -3 days 04:05:06.5",
            r#"{"months":14,"days":-3,"microseconds":14706500000}"#,
        );
        check(
            1186,
            "-00:00:01",
            r#"{"months":0,"days":0,"microseconds":-1000000}"#,
        );
        check(
            1186,
            "00:00:00",
            r#"{"months":0,"days":0,"microseconds":0}"#,
        );
    }

    #[test]
    fn arrays() {
        check(1007, "{1,2,NULL}", "[1,2,null]");
        check(1007, "{}", "[]");
        check(1007, "{{1,2},{3,4}}", "[[1,2],[3,4]]");
        check(
            1009,
            r#"{a,"b c","d\"e","NULL",NULL}"#,
            r#"["a","b c","d\"e","NULL",null]"#,
        );
        check(1231, "{1.50,0.0000001}", r#"["1.50","1E-7"]"#);
        check(
            1185,
            r#"{"2026-12-02 06:13:42+00"}"#,
            r#"["2026-12-02T06:13:42.000000Z"]"#,
        );
        check(3807, r#"{"{\"a\": 1}",null}"#, r#"[{"a": 1},null]"#);
        check(1007, "[0:1]={1,2}", "[1,2]");
        check(1000, "{t,f}", "[true,false]");
    }
}
