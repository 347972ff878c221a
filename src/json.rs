//! The queue-change request body: `{"updated_at": "<ISO-8601>"}` or `{"updated_at": <seconds>}`.
//!
//! A small, strict JSON reader: it validates the whole document (RFC 8259), skips fields it does
//! not know, and refuses anything else with a message that goes back to the caller in a 400.
//! Nesting is bounded so that a hostile body cannot exhaust the stack. [`write_string`] is the
//! other direction: the one JSON string writer for what the server writes (error details, log
//! lines).

use crate::timestamp::{self, Micros};
use std::fmt::{self, Write};

/// Deepest nesting of arrays and objects accepted inside the body.
const MAX_DEPTH: usize = 32;

/// Why a queue-change body was refused; the text is the 400 response's `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// The body is not JSON; says what was expected and at which byte.
    Json(&'static str, usize),
    /// The body is JSON but not an object.
    NotObject,
    /// The object has no `updated_at` field.
    Missing,
    /// `updated_at` is neither a string nor a number.
    WrongType,
    /// `updated_at` does not name a valid time.
    Time(timestamp::TimeError),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Json(what, at) => {
                write!(
                    f,
                    "request body is not valid JSON: expected {what} at byte {at}"
                )
            }
            BodyError::NotObject => f.write_str("request body must be a JSON object"),
            BodyError::Missing => f.write_str("request body has no updated_at field"),
            BodyError::WrongType => f.write_str(
                "updated_at must be an ISO-8601 date-time string or a number of epoch seconds",
            ),
            BodyError::Time(e) => write!(f, "updated_at is not a valid date-time: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Appends `v` as a JSON string literal: quotes, backslashes and control characters (DEL too)
/// escaped, everything else as it is.
pub fn write_string(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Reads the update time from a queue-change body.
pub fn parse_queue_change(body: &[u8]) -> Result<Micros, BodyError> {
    let mut p = Parser { s: body, i: 0 };
    p.ws();
    if p.peek() != Some(b'{') {
        // Validate first so that garbage is reported as such, not as "not an object".
        p.value(0)?;
        p.ws();
        p.end()?;
        return Err(BodyError::NotObject);
    }
    let found = p.object_field(b"updated_at")?;
    p.ws();
    p.end()?;
    match found {
        None => Err(BodyError::Missing),
        Some(Scalar::Str(s)) => timestamp::parse_iso8601(&s).map_err(BodyError::Time),
        Some(Scalar::Num(start, end)) => {
            let lexeme = std::str::from_utf8(&body[start..end]).unwrap_or("");
            timestamp::parse_epoch_seconds(lexeme).map_err(BodyError::Time)
        }
        Some(Scalar::Other) => Err(BodyError::WrongType),
    }
}

/// The value found for the field we look for.
enum Scalar {
    Str(String),
    /// Byte range of a number lexeme.
    Num(usize, usize),
    Other,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn err<T>(&self, what: &'static str) -> Result<T, BodyError> {
        Err(BodyError::Json(what, self.i))
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn end(&self) -> Result<(), BodyError> {
        if self.i == self.s.len() {
            Ok(())
        } else {
            self.err("end of input")
        }
    }

    fn expect(&mut self, b: u8, what: &'static str) -> Result<(), BodyError> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            self.err(what)
        }
    }

    /// The top-level object: returns the value of `field` (last one wins), skipping the rest.
    fn object_field(&mut self, field: &[u8]) -> Result<Option<Scalar>, BodyError> {
        self.expect(b'{', "'{'")?;
        self.ws();
        let mut found = None;
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(None);
        }
        loop {
            self.ws();
            let key = self.string()?;
            self.ws();
            self.expect(b':', "':' after an object key")?;
            self.ws();
            if key.as_bytes() == field {
                found = Some(match self.peek() {
                    Some(b'"') => Scalar::Str(self.string()?),
                    Some(b'-' | b'0'..=b'9') => {
                        let start = self.i;
                        self.number()?;
                        Scalar::Num(start, self.i)
                    }
                    _ => {
                        self.value(1)?;
                        Scalar::Other
                    }
                });
            } else {
                self.value(1)?;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(found);
                }
                _ => return self.err("',' or '}' in an object"),
            }
        }
    }

    /// Validates and skips any value.
    fn value(&mut self, depth: usize) -> Result<(), BodyError> {
        if depth > MAX_DEPTH {
            return self.err("less deeply nested values");
        }
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return self.err("',' or ']' in an array"),
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.string()?;
                    self.ws();
                    self.expect(b':', "':' after an object key")?;
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return self.err("',' or '}' in an object"),
                    }
                }
            }
            _ => self.err("a JSON value"),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), BodyError> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            self.err("true, false or null")
        }
    }

    fn number(&mut self) -> Result<(), BodyError> {
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return self.err("a digit"),
        }
        if self.eat(b'.') {
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return self.err("a digit after '.'");
            }
            self.digits();
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return self.err("a digit in the exponent");
            }
            self.digits();
        }
        Ok(())
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
    }

    fn hex4(&mut self) -> Result<u32, BodyError> {
        let mut v = 0;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return self.err("four hex digits after \\u"),
            };
            v = v * 16 + u32::from(d);
            self.i += 1;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, BodyError> {
        self.expect(b'"', "a string")?;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return self.err("the closing '\"' of a string"),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.i += 1;
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return self.err("a low surrogate after a high surrogate");
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return self.err("a low surrogate after a high surrogate");
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            let Some(c) = char::from_u32(code) else {
                                return self.err("a valid unicode escape");
                            };
                            let mut buf = [0; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            continue;
                        }
                        _ => return self.err("a valid escape after '\\'"),
                    };
                    self.i += 1;
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                Some(c) if c < 0x20 => return self.err("no control characters in a string"),
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).or_else(|_| self.err("UTF-8 text in a string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_736_705_202_028_060;

    #[test]
    fn accepts_what_flagsmith_sends() {
        let ok: &[(&[u8], i64)] = &[
            (br#"{"updated_at": "2025-01-12T18:06:42.028060+00:00"}"#, T),
            (br#"{"updated_at":"2025-01-12T18:06:42.028060Z"}"#, T),
            (
                br#" { "other": [1, {"a": null}], "updated_at" : 1736705202.02806 } "#,
                T,
            ),
            (
                br#"{"updated_at": "x", "updated_at": "2025-01-12T18:06:42.028060"}"#,
                T,
            ),
            (br#"{"updated_at": "2025\u002d01-12T18:06:42.028060"}"#, T),
            (
                br#"{"\u00e9t\u00e9": "\ud83d\ude00", "updated_at": 1736705202.02806}"#,
                T,
            ),
        ];
        for (body, want) in ok {
            assert_eq!(
                parse_queue_change(body),
                Ok(*want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn refuses_with_a_reason() {
        let bad: &[(&[u8], &str)] = &[
            (b"", "not valid JSON"),
            (b"{", "not valid JSON"),
            (b"{\"updated_at\": \"2025-01-12\"", "not valid JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (b"\"2025-01-12\"", "must be a JSON object"),
            (b"{}", "no updated_at"),
            (b"{\"updated\": 1}", "no updated_at"),
            (
                b"{\"updated_at\": null}",
                "ISO-8601 date-time string or a number",
            ),
            (
                b"{\"updated_at\": true}",
                "ISO-8601 date-time string or a number",
            ),
            (b"{\"updated_at\": \"soon\"}", "not a valid date-time"),
            (b"{\"updated_at\": -5}", "not a valid date-time"),
            (b"{\"updated_at\": 01}", "not valid JSON"),
            (b"{\"updated_at\": 1} x", "not valid JSON"),
            (b"{\"a\": \"\x01\"}", "not valid JSON"),
            (b"{\"a\": \"\\ud800\"}", "not valid JSON"),
            (b"{\"a\": \"\xff\"}", "not valid JSON"),
            (b"{\"a\": tru}", "not valid JSON"),
        ];
        for (body, want) in bad {
            let e = parse_queue_change(body).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let mut body = b"{\"a\": ".to_vec();
        body.extend(std::iter::repeat_n(b'[', 100_000));
        assert!(matches!(
            parse_queue_change(&body),
            Err(BodyError::Json(..))
        ));
    }
}
