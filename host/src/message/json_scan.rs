//! One pass over a field's text that vouches for it: one JSON object, valid as serde_json reads
//! it, nested at most [`MAX_DEPTH`] deep; on the way it hands out where each top-level field's
//! key and value are, and, when asked, those of the fields of each top-level value that is an
//! object (a message's `metadata`, read in the message's pass).
//!
//! It only ever says "surely fine". Whatever it cannot vouch for (invalid JSON, another value,
//! deeper nesting) goes to the exact checks in `message.rs`, which decide and word the error, so
//! the decoder accepts and rejects exactly what it did before. The scan exists for speed: it
//! replaces a `RawValue` parse plus a separate bracket count, which were a tenth of the host's
//! CPU per message. The property tests (`fuzz.rs`) hold it to serde_json's verdict.

use super::MAX_DEPTH;
use std::ops::Range;

/// Whether `byte` is JSON whitespace (all of it ASCII).
#[inline]
pub(super) fn is_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\n' | b'\t' | b'\r')
}

/// Whether `key` (an object key's raw text, between its quotes) may be, with its escapes
/// undone, a name of at least `shortest` letters, digits or `_`. Only a `\uXXXX` escape stands
/// for one of those (the others stand for quotes, slashes and control characters), and it
/// takes five bytes more than the character: a shorter key is the name it spells only when it
/// has no escape, which comparing its bytes tells. So callers compare keys as they are and ask
/// this only of keys that are none of their names.
pub(super) fn may_spell_a_name(key: &[u8], shortest: usize) -> bool {
    key.len() >= shortest + 5 && key.contains(&b'\\')
}

/// Whether `text` is one JSON object, at most [`MAX_DEPTH`] deep, with nothing but JSON
/// whitespace around it. False means "not vouched for", not "invalid".
pub(super) fn is_shallow_object(text: &[u8]) -> bool {
    scan_object(text, |_, _| {})
}

/// As [`is_shallow_object`], calling `field` with the range of each top-level key (between its
/// quotes, as written: escapes are not undone) and of its value (the value's whole text), in
/// order.
pub(super) fn scan_object(text: &[u8], field: impl FnMut(Range<usize>, Range<usize>)) -> bool {
    scan::<false>(text, field, |_, _, _| {})
}

/// As [`scan_object`], also calling `inner` for each field of a top-level field's value that is
/// an object: with the range of that top-level field's key, then the inner field's key and
/// value, in order. One pass then reads a message and its `metadata`.
pub(super) fn scan_object_nested(
    text: &[u8],
    field: impl FnMut(Range<usize>, Range<usize>),
    inner: impl FnMut(&Range<usize>, Range<usize>, Range<usize>),
) -> bool {
    scan::<true>(text, field, inner)
}

/// [`scan_object`] (`NESTED` false: the inner fields are not tracked at all, which the scans of
/// stream entries' fields would pay for in vain) or [`scan_object_nested`].
fn scan<const NESTED: bool>(
    text: &[u8],
    field: impl FnMut(Range<usize>, Range<usize>),
    inner: impl FnMut(&Range<usize>, Range<usize>, Range<usize>),
) -> bool {
    let mut scan = Scan { text, at: 0 };
    scan.skip_whitespace();
    scan.peek() == Some(b'{') && scan.value::<NESTED>(field, inner) && {
        scan.skip_whitespace();
        scan.at == text.len()
    }
}

struct Scan<'a> {
    text: &'a [u8],
    at: usize,
}

/// The containers open around the current position: bit `d` is set when the container at depth
/// `d + 1` is an object. `MAX_DEPTH` levels fit. Whether the innermost one is an object, asked
/// after every value, is kept apart, so that only opening and closing a container shift the
/// 128-bit set.
#[derive(Default)]
struct Open {
    objects: u128,
    depth: usize,
    in_object: bool,
}

const _: () = assert!(MAX_DEPTH <= u128::BITS as usize);

impl Open {
    /// Opens a container; false when that would pass the depth limit.
    fn push(&mut self, object: bool) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        self.objects = (self.objects & !(1 << self.depth)) | (u128::from(object) << self.depth);
        self.depth += 1;
        self.in_object = object;
        true
    }

    /// Closes the innermost container.
    fn pop(&mut self) {
        self.depth -= 1;
        self.in_object = self.depth > 0 && self.objects >> (self.depth - 1) & 1 == 1;
    }

    /// Whether the innermost container is an object.
    fn in_object(&self) -> bool {
        self.in_object
    }
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(is_whitespace) {
            self.at += 1;
        }
    }

    /// Reads one value and everything nested in it, without recursion, reporting the fields of
    /// the outermost object (`field`) and those of the objects that are its fields' values
    /// (`inner`).
    fn value<const NESTED: bool>(
        &mut self,
        mut field: impl FnMut(Range<usize>, Range<usize>),
        mut inner: impl FnMut(&Range<usize>, Range<usize>, Range<usize>),
    ) -> bool {
        let mut open = Open::default();
        // The key of the top-level field being read, and where its value starts; the same for
        // the field of that value being read, when the value is an object.
        let (mut key, mut start) = (0..0, 0);
        let (mut inner_key, mut inner_start) = (0..0, 0);
        loop {
            // A value starts here.
            self.skip_whitespace();
            match open.depth {
                1 => start = self.at,
                2 if NESTED => inner_start = self.at,
                _ => {}
            }
            let Some(first) = self.peek() else {
                return false;
            };
            match first {
                b'{' | b'[' => {
                    let object = first == b'{';
                    if !open.push(object) {
                        return false;
                    }
                    self.at += 1;
                    self.skip_whitespace();
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        // Empty: the container is a finished value.
                        self.at += 1;
                        open.pop();
                    } else {
                        if object && !self.field_key::<NESTED>(open.depth, &mut key, &mut inner_key)
                        {
                            return false;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.at += 1;
                    if !self.string() {
                        return false;
                    }
                }
                b'-' | b'0'..=b'9' => {
                    if !self.number() {
                        return false;
                    }
                }
                b't' => {
                    if !self.literal(b"true") {
                        return false;
                    }
                }
                b'f' => {
                    if !self.literal(b"false") {
                        return false;
                    }
                }
                b'n' => {
                    if !self.literal(b"null") {
                        return false;
                    }
                }
                _ => return false,
            }
            // A value ended: a comma leads to the next one, a bracket closes its container.
            loop {
                match open.depth {
                    0 => return true,
                    1 => field(key.clone(), start..self.at),
                    2 if NESTED && open.in_object() => {
                        inner(&key, inner_key.clone(), inner_start..self.at);
                    }
                    _ => {}
                }
                self.skip_whitespace();
                let in_object = open.in_object();
                match self.peek() {
                    Some(b',') => {
                        self.at += 1;
                        if in_object
                            && !self.field_key::<NESTED>(open.depth, &mut key, &mut inner_key)
                        {
                            return false;
                        }
                        break;
                    }
                    Some(b'}') if in_object => {}
                    Some(b']') if !in_object => {}
                    _ => return false,
                }
                // The container closed: it is a finished value in its parent.
                self.at += 1;
                open.pop();
            }
        }
    }

    /// Reads the key of the next field of the object at `depth`, keeping its range in `key` when
    /// that is the outermost object, in `inner` when it is the value of one of its fields.
    #[inline]
    fn field_key<const NESTED: bool>(
        &mut self,
        depth: usize,
        key: &mut Range<usize>,
        inner: &mut Range<usize>,
    ) -> bool {
        let Some(read) = self.key() else {
            return false;
        };
        match depth {
            1 => *key = read,
            2 if NESTED => *inner = read,
            _ => {}
        }
        true
    }

    /// Reads `"key" :` inside an object; the range of the key between its quotes. Inlined: half
    /// the strings of a message are keys.
    #[inline]
    fn key(&mut self) -> Option<Range<usize>> {
        self.skip_whitespace();
        if self.peek() != Some(b'"') {
            return None;
        }
        self.at += 1;
        let start = self.at;
        if !self.string() {
            return None;
        }
        let key = start..self.at - 1;
        self.skip_whitespace();
        if self.peek() != Some(b':') {
            return None;
        }
        self.at += 1;
        Some(key)
    }

    /// Reads the rest of a string after its opening quote: no control characters, only the
    /// escapes JSON has. Runs of plain bytes are skipped several at a time.
    ///
    /// Most strings (keys, and values without escapes) end at the first stop that
    /// [`block_stops`] finds; this path is kept apart from [`Scan::string_rest`], which has the
    /// escapes, the shorter steps and the end of the text, so that the usual string costs a
    /// few instructions beyond its blocks (a third of the scan's instructions were spent
    /// entering and leaving this function, docs/bench.md, round 13).
    #[inline]
    fn string(&mut self) -> bool {
        #[cfg(target_arch = "x86_64")]
        while let Some(block) = self.text.get(self.at..self.at + 16) {
            let stops = block_stops(block.try_into().unwrap_or(&[0; 16]));
            if stops == 0 {
                self.at += 16;
                continue;
            }
            let stop = stops.trailing_zeros() as usize;
            self.at += stop;
            if block.get(stop) == Some(&b'"') {
                self.at += 1;
                return true;
            }
            break;
        }
        self.string_rest()
    }

    /// [`Scan::string`] from wherever it stopped: an escape, a control character, or fewer
    /// than sixteen bytes left.
    #[inline(never)]
    fn string_rest(&mut self) -> bool {
        loop {
            self.skip_plain();
            let Some(byte) = self.peek() else {
                return false;
            };
            self.at += 1;
            match byte {
                b'"' => return true,
                b'\\' => {
                    let Some(escape) = self.peek() else {
                        return false;
                    };
                    self.at += 1;
                    match escape {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => match self.text.get(self.at..self.at + 4) {
                            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => self.at += 4,
                            _ => return false,
                        },
                        _ => return false,
                    }
                }
                // A control character.
                _ => return false,
            }
        }
    }

    /// Moves to the next quote, backslash or control character (or the end): sixteen bytes at
    /// a time where the target has SSE2 (every x86-64), then eight, then one by one.
    fn skip_plain(&mut self) {
        // The same block loop as in `string`, on purpose: one helper shared by both cost
        // 0.3–0.4% more instructions per message (docs/bench.md, round 13).
        #[cfg(target_arch = "x86_64")]
        while let Some(block) = self.text.get(self.at..self.at + 16) {
            let stops = block_stops(block.try_into().unwrap_or(&[0; 16]));
            if stops != 0 {
                self.at += stops.trailing_zeros() as usize;
                return;
            }
            self.at += 16;
        }
        while let Some(word) = self.text.get(self.at..self.at + 8) {
            let stops = string_stops(u64::from_le_bytes(word.try_into().unwrap_or_default()));
            if stops != 0 {
                // The lowest marked byte is a true stop (see `string_stops`).
                self.at += stops.trailing_zeros() as usize / 8;
                return;
            }
            self.at += 8;
        }
        while self
            .peek()
            .is_some_and(|b| !matches!(b, b'"' | b'\\' | 0..0x20))
        {
            self.at += 1;
        }
    }

    /// Reads a number: `-`, no leading zeros, a fraction and an exponent with digits.
    fn number(&mut self) -> bool {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.at += 1;
                if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    return false;
                }
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return false,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if !self.some_digits() {
                return false;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if !self.some_digits() {
                return false;
            }
        }
        true
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }

    /// At least one digit.
    fn some_digits(&mut self) -> bool {
        let start = self.at;
        self.digits();
        self.at > start
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        let found = self.text[self.at..].starts_with(word);
        self.at += word.len();
        found
    }
}

/// The bytes of `block` that end a run of plain string bytes (a quote, a backslash or a control
/// character), as the bits of a mask: bit `i` for byte `i`. Under half the instructions per
/// byte of [`string_stops`] on long strings, and no more on short ones (docs/bench.md,
/// round 13).
#[cfg(target_arch = "x86_64")]
#[expect(
    unsafe_code,
    reason = "SSE2 intrinsics: an unaligned load of a 16-byte array, byte comparisons"
)]
fn block_stops(block: &[u8; 16]) -> u32 {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let splat = |byte: u8| i8::from_ne_bytes([byte]);
    // SAFETY: SSE2 is part of the x86-64 baseline (every x86-64 CPU has it, and the target
    // enables it), and `_mm_loadu_si128` reads 16 bytes with no alignment requirement from
    // `block`, which has 16.
    let mask = unsafe {
        let bytes = _mm_loadu_si128(block.as_ptr().cast());
        let quote = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(splat(b'"')));
        let backslash = _mm_cmpeq_epi8(bytes, _mm_set1_epi8(splat(b'\\')));
        // A byte is at most 0x1f (unsigned) exactly when raising it to 0x1f leaves 0x1f.
        let low = _mm_set1_epi8(splat(0x1f));
        let control = _mm_cmpeq_epi8(_mm_max_epu8(bytes, low), low);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control))
    };
    u32::from_ne_bytes(mask.to_ne_bytes())
}

/// The bytes of `word` (little-endian) that end a run of plain string bytes: a quote, a
/// backslash or a control character, each marked by its high bit. A byte just above a marked one
/// may be marked too (a borrow), but the lowest mark is always a true one.
fn string_stops(word: u64) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    quote | backslash | control
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expect: bool) {
        assert_eq!(is_shallow_object(text.as_bytes()), expect, "{text:?}");
        if expect {
            serde_json::from_str::<&serde_json::value::RawValue>(text).unwrap();
        }
    }

    #[test]
    fn vouches_for_objects_serde_json_accepts() {
        check("{}", true);
        check(" \t\r\n{ } \n", true);
        check(
            r#"{"a":1,"b":[1,2,{"c":null}],"d":{"e":true,"f":false}}"#,
            true,
        );
        check(
            r#"{"n":[0,-0,1.5,-2e10,3E+2,4e-2,12345678901234567890]}"#,
            true,
        );
        check(
            r#"{"s":"esc \" \\ \/ \b \f \n \r \t \u00e9 \uD83D\uDE00 ünïcødé ☕"}"#,
            true,
        );
        check(
            r#"{"long":"0123456789abcdef0123456789abcdef0123456789"}"#,
            true,
        );
        check(r#"{"a" : [ ] , "b" : { } }"#, true);
    }

    #[test]
    fn does_not_vouch_for_anything_else() {
        for text in [
            "",
            " ",
            "[]",
            "1",
            r#""{}""#,
            "null",
            "{",
            "}",
            "{}}",
            "{} {}",
            "{}x",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[1 2]}"#,
            r#"{a:1}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":-}"#,
            r#"{"a":+1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":True}"#,
            r#"{"a":"x\q"}"#,
            r#"{"a":"\u12"}"#,
            r#"{"a":"\u12g4"}"#,
            "{\"a\":\"tab\there\"}",
            "{\"a\":\"new\nline\"}",
            r#"{"a":"open}"#,
            r#"{"a":[}"#,
            r#"{"a":{]}"#,
            "{}\u{a0}",
            "\u{feff}{}",
        ] {
            check(text, false);
            // The exact check it defers to agrees where it would decide "invalid".
            let exact = serde_json::from_str::<&serde_json::value::RawValue>(text);
            if text != "[]" && text != "1" && text != r#""{}""# && text != "null" {
                assert!(exact.is_err(), "{text:?}");
            }
        }
    }

    #[test]
    fn nested_fields_are_those_of_top_level_object_values() {
        let text = r#"{"a":{"x":1,"y":[{"no":2}],"z":{"deeper":3}},"b":[{"no":4}],"c":5,"d":{}}"#;
        let (mut top, mut inner) = (Vec::new(), Vec::new());
        let vouched = scan_object_nested(
            text.as_bytes(),
            |key, value| top.push((&text[key], &text[value])),
            |parent, key, value| inner.push((&text[parent.clone()], &text[key], &text[value])),
        );
        assert!(vouched);
        assert_eq!(
            top.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        assert_eq!(
            inner,
            [
                ("a", "x", "1"),
                ("a", "y", r#"[{"no":2}]"#),
                ("a", "z", r#"{"deeper":3}"#),
            ]
        );
    }

    #[test]
    fn only_keys_long_enough_with_an_escape_may_spell_a_name() {
        // `name` is four letters: an escaped spelling takes at least nine bytes.
        assert!(may_spell_a_name(br"n\u0061me", 4));
        assert!(!may_spell_a_name(br"n\u0061m", 4));
        assert!(!may_spell_a_name(br"a\nbcdefgh", 10));
        assert!(!may_spell_a_name(b"table_names_are_long", 10));
    }

    #[test]
    fn depth_is_counted_to_the_limit() {
        let nested = |depth: usize| format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        check(&nested(MAX_DEPTH), true);
        check(&nested(MAX_DEPTH + 1), false);
        let arrays = |depth: usize| format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        check(&arrays(MAX_DEPTH - 1), true);
        check(&arrays(MAX_DEPTH), false);
        // Siblings do not add up.
        let wide = format!("{{{}\"z\":1}}", "\"a\":[[[]]],".repeat(500));
        check(&wide, true);
    }

    #[test]
    fn plain_bytes_are_skipped_only_up_to_the_first_stop() {
        for stop in [b'"', b'\\', 0x00, 0x1f] {
            for at in 0..8 {
                for later in [0x00, 0x01, b'"', b'a'] {
                    let mut word = *b"abcdefgh";
                    word[at] = stop;
                    if at < 7 {
                        word[at + 1] = later;
                    }
                    let stops = string_stops(u64::from_le_bytes(word));
                    assert_eq!(stops.trailing_zeros() / 8, at as u32, "{stop} at {at}");
                }
            }
        }
        assert_eq!(string_stops(u64::from_le_bytes(*b"abc{}[] ")), 0);
        let high = [0x20, 0x7f, 0x80, 0xff, 0xc3, 0xa9, b'/', b'!'];
        assert_eq!(string_stops(u64::from_le_bytes(high)), 0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocks_mark_exactly_their_stops() {
        let plain = [
            0x20, 0x21, 0x7f, 0x80, 0xff, 0xc3, 0xa9, b'/', b'!', b'a', b'{', b'}',
        ];
        for stop in [b'"', b'\\', 0x00, 0x01, 0x1f] {
            for at in 0..16 {
                for other in plain {
                    let mut block = [other; 16];
                    block[at] = stop;
                    assert_eq!(
                        block_stops(&block),
                        1 << at,
                        "{stop:#x} at {at} among {other:#x}"
                    );
                }
            }
        }
        for other in plain {
            assert_eq!(block_stops(&[other; 16]), 0, "{other:#x}");
        }
        let mut two = [b'a'; 16];
        (two[3], two[12]) = (b'"', 0x0a);
        assert_eq!(block_stops(&two), 1 << 3 | 1 << 12);
    }

    #[test]
    fn strings_end_at_their_first_stop_wherever_it_falls() {
        // Runs of every length around the 8- and 16-byte steps, each ended by each stop.
        for len in 0..40 {
            let run = "é".repeat(len / 2) + &"x".repeat(len % 2);
            check(&format!(r#"{{"{run}":"{run}"}}"#), true);
            check(&format!(r#"{{"a":"{run}\n{run}"}}"#), true);
            check(&format!("{{\"a\":\"{run}\t{run}\"}}"), false);
            check(&format!("{{\"a\":\"{run}\u{1f}\"}}"), false);
            check(&format!(r#"{{"a":"{run}"#), false);
        }
    }
}
