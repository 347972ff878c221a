//! Update times: parsing what Flagsmith's task processor sends, and writing what SDKs read.
//!
//! A time is kept as whole microseconds since the Unix epoch (`i64`), which is exactly the
//! precision of Python's `datetime` and of the `X-Flagsmith-Document-Updated-At` header the
//! SDKs compare against. Parsing is written by hand so that no date crate is needed at run time.

use std::fmt;

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

const MICROS_PER_SECOND: i64 = 1_000_000;
/// 9999-12-31T23:59:59.999999Z: the last instant an ISO-8601 year of four digits can name.
const MAX_MICROS: i64 = 253_402_300_799_999_999;

/// Why a time was refused. The text is sent to the client in the 400 response's `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeError {
    /// The text is not an ISO-8601 date-time of the accepted forms.
    Syntax(&'static str),
    /// A field is out of its range (month 13, hour 24, February 30, ...).
    Range(&'static str),
    /// The instant is before 1970 or after the year 9999.
    OutOfBounds,
}

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeError::Syntax(what) => write!(f, "expected {what}"),
            TimeError::Range(what) => write!(f, "{what} is out of range"),
            TimeError::OutOfBounds => f.write_str("time must be between 1970 and 9999"),
        }
    }
}

impl std::error::Error for TimeError {}

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian calendar).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

/// A cursor over ASCII bytes with the few primitives ISO-8601 needs.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// Exactly `n` decimal digits.
    fn digits(&mut self, n: usize, what: &'static str) -> Result<i64, TimeError> {
        let mut v = 0i64;
        for _ in 0..n {
            match self.peek() {
                Some(d @ b'0'..=b'9') => {
                    v = v * 10 + i64::from(d - b'0');
                    self.i += 1;
                }
                _ => return Err(TimeError::Syntax(what)),
            }
        }
        Ok(v)
    }

    /// One or more digits of a fraction, returned as microseconds (extra digits truncated).
    fn fraction(&mut self) -> Result<i64, TimeError> {
        let start = self.i;
        let mut micros = 0i64;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            if self.i - start < 6 {
                micros = micros * 10 + i64::from(d - b'0');
            }
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 {
            return Err(TimeError::Syntax("digits after the decimal point"));
        }
        for _ in n..6 {
            micros *= 10;
        }
        Ok(micros)
    }
}

/// Parses an ISO-8601 date-time as Python's `datetime.isoformat()` writes it, into microseconds.
///
/// Accepted: `YYYY-MM-DD`, then optionally `T` (or `t`, or a space) and `HH:MM[:SS[.f…]]`, then
/// optionally `Z`/`z` or an offset `±HH[:MM[:SS[.f…]]]` / `±HHMM`. Without an offset the time is
/// read as UTC. More than six fractional digits are truncated to microseconds.
pub fn parse_iso8601(text: &str) -> Result<Micros, TimeError> {
    let mut c = Cursor {
        s: text.trim().as_bytes(),
        i: 0,
    };
    let year = c.digits(4, "a four-digit year (YYYY-MM-DD)")?;
    if !c.eat(b'-') {
        return Err(TimeError::Syntax("'-' after the year (YYYY-MM-DD)"));
    }
    let month = c.digits(2, "a two-digit month (YYYY-MM-DD)")?;
    if !c.eat(b'-') {
        return Err(TimeError::Syntax("'-' after the month (YYYY-MM-DD)"));
    }
    let day = c.digits(2, "a two-digit day (YYYY-MM-DD)")?;
    if !(1..=12).contains(&month) {
        return Err(TimeError::Range("month"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(TimeError::Range("day"));
    }
    let mut micros_of_day = 0i64;
    if matches!(c.peek(), Some(b'T' | b't' | b' ')) {
        c.i += 1;
        let hour = c.digits(2, "a two-digit hour (HH:MM:SS)")?;
        if !c.eat(b':') {
            return Err(TimeError::Syntax("':' after the hour (HH:MM:SS)"));
        }
        let minute = c.digits(2, "two-digit minutes (HH:MM:SS)")?;
        let mut second = 0;
        let mut fraction = 0;
        if c.eat(b':') {
            second = c.digits(2, "two-digit seconds (HH:MM:SS)")?;
            if c.eat(b'.') || c.eat(b',') {
                fraction = c.fraction()?;
            }
        }
        if hour > 23 {
            return Err(TimeError::Range("hour"));
        }
        if minute > 59 {
            return Err(TimeError::Range("minute"));
        }
        if second > 59 {
            return Err(TimeError::Range("second"));
        }
        micros_of_day = ((hour * 60 + minute) * 60 + second) * MICROS_PER_SECOND + fraction;
    }
    let offset = match c.peek() {
        None => 0,
        Some(b'Z' | b'z') => {
            c.i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            c.i += 1;
            let hours = c.digits(2, "a two-digit offset hour (+HH:MM)")?;
            let colon = c.eat(b':');
            let mut minutes = 0;
            let mut seconds = 0;
            let mut fraction = 0;
            if colon || matches!(c.peek(), Some(b'0'..=b'9')) {
                minutes = c.digits(2, "two-digit offset minutes (+HH:MM)")?;
                if colon && c.eat(b':') {
                    seconds = c.digits(2, "two-digit offset seconds (+HH:MM:SS)")?;
                    if c.eat(b'.') {
                        fraction = c.fraction()?;
                    }
                }
            }
            if hours > 23 || minutes > 59 || seconds > 59 {
                return Err(TimeError::Range("UTC offset"));
            }
            let off = ((hours * 60 + minutes) * 60 + seconds) * MICROS_PER_SECOND + fraction;
            if sign == b'-' { -off } else { off }
        }
        Some(_) => {
            return Err(TimeError::Syntax(
                "'Z' or a UTC offset like +00:00 after the time",
            ));
        }
    };
    if c.i != c.s.len() {
        return Err(TimeError::Syntax("nothing after the UTC offset"));
    }
    let micros =
        days_from_civil(year, month, day) * 86_400 * MICROS_PER_SECOND + micros_of_day - offset;
    check_bounds(micros)
}

fn check_bounds(micros: i64) -> Result<Micros, TimeError> {
    if (0..=MAX_MICROS).contains(&micros) {
        Ok(micros)
    } else {
        Err(TimeError::OutOfBounds)
    }
}

/// Parses a JSON number lexeme of epoch seconds (`1735229888`, `1735229888.760412`, `1.7e9`).
///
/// Plain decimals are converted exactly (digits past the sixth fractional one are truncated);
/// numbers with an exponent go through `f64` and are rounded to the nearest microsecond.
pub fn parse_epoch_seconds(lexeme: &str) -> Result<Micros, TimeError> {
    const WHAT: &str = "a number of epoch seconds";
    if lexeme.starts_with('-') {
        return Err(TimeError::OutOfBounds);
    }
    if lexeme.contains(['e', 'E']) {
        let secs: f64 = lexeme.parse().map_err(|_| TimeError::Syntax(WHAT))?;
        let micros = (secs * 1e6).round();
        if !micros.is_finite() || micros < 0.0 || micros > MAX_MICROS as f64 {
            return Err(TimeError::OutOfBounds);
        }
        return Ok(micros as i64);
    }
    let (int, frac) = lexeme.split_once('.').unwrap_or((lexeme, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TimeError::Syntax(WHAT));
    }
    if int.len() > 12 {
        return Err(TimeError::OutOfBounds);
    }
    let mut c = Cursor {
        s: frac.as_bytes(),
        i: 0,
    };
    let fraction = if lexeme.contains('.') {
        c.fraction()?
    } else {
        0
    };
    if c.i != c.s.len() {
        return Err(TimeError::Syntax(WHAT));
    }
    let secs: i64 = int.parse().map_err(|_| TimeError::Syntax(WHAT))?;
    check_bounds(secs * MICROS_PER_SECOND + fraction)
}

/// Appends `micros` as epoch seconds with a decimal point: `1735229888.760412`,
/// `1735229888.76`, `1735229888.0`. Trailing zeros are trimmed, but one digit always follows
/// the point, because the Flutter SDK ignores an integer.
pub fn write_epoch_seconds(micros: Micros, out: &mut Vec<u8>) {
    let secs = micros.div_euclid(MICROS_PER_SECOND);
    let mut frac = micros.rem_euclid(MICROS_PER_SECOND);
    let mut digits = 6;
    while digits > 1 && frac % 10 == 0 {
        frac /= 10;
        digits -= 1;
    }
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{secs}.{frac:0digits$}");
}

/// The current wall-clock time in microseconds since the epoch.
pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_736_705_202_028_060; // 2025-01-12T18:06:42.028060Z

    #[test]
    fn iso_forms() {
        let table: &[(&str, i64)] = &[
            ("2025-01-12T18:06:42.028060+00:00", T),
            ("2025-01-12T18:06:42.028060Z", T),
            ("2025-01-12T18:06:42.028060z", T),
            ("2025-01-12T18:06:42.028060", T),
            ("2025-01-12 18:06:42.028060", T),
            ("2025-01-12T18:06:42.02806", T),
            ("2025-01-12T18:06:42.028060999", T),
            ("2025-01-12T18:06:42,028060Z", T),
            ("2025-01-12T18:06:42+00:00", T - 28_060),
            ("2025-01-12T18:06:42", T - 28_060),
            ("2025-01-12T18:06", T - 42_028_060),
            ("2025-01-12T20:06:42.028060+02:00", T),
            ("2025-01-12T23:36:42.028060+0530", T),
            ("2025-01-12T13:06:42.028060-05:00", T),
            ("2025-01-12T18:06:42.028060+00", T),
            ("2025-01-12T18:06:43.028060+00:00:01", T),
            ("2025-01-12", T - 65_202_028_060),
            ("1970-01-01T00:00:00Z", 0),
            ("2000-02-29T00:00:00Z", 951_782_400_000_000),
            ("  2025-01-12T18:06:42.028060Z ", T),
        ];
        for (text, want) in table {
            assert_eq!(parse_iso8601(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn iso_rejects() {
        for text in [
            "",
            "yesterday",
            "2025-1-12T18:06:42",
            "2025-13-12T18:06:42",
            "2025-02-29T18:06:42",
            "2025-01-12T24:00:00",
            "2025-01-12T18:60:00",
            "2025-01-12T18:06:61",
            "2025-01-12T18:06:42.",
            "2025-01-12T18:06:42+25:00",
            "2025-01-12T18:06:42 UTC",
            "2025-01-12T18:06:42Zjunk",
            "1969-12-31T23:59:59Z",
            "2025/01/12",
        ] {
            assert!(parse_iso8601(text).is_err(), "{text} should be refused");
        }
    }

    #[test]
    fn epoch_numbers() {
        assert_eq!(parse_epoch_seconds("1736705202.02806"), Ok(T));
        assert_eq!(parse_epoch_seconds("1736705202.0280609"), Ok(T));
        assert_eq!(parse_epoch_seconds("1736705202"), Ok(T - 28_060));
        assert_eq!(parse_epoch_seconds("1.736705202e9"), Ok(T - 28_060));
        assert_eq!(parse_epoch_seconds("0"), Ok(0));
        assert!(parse_epoch_seconds("-1").is_err());
        assert!(parse_epoch_seconds("1e300").is_err());
        assert!(parse_epoch_seconds("1.").is_err());
        assert!(parse_epoch_seconds("99999999999999").is_err());
    }

    #[test]
    fn writes_seconds_with_a_point() {
        let cases = [
            (T, "1736705202.02806"),
            (1_735_229_888_760_412, "1735229888.760412"),
            (1_735_229_888_000_000, "1735229888.0"),
            (1_735_229_888_500_000, "1735229888.5"),
            (1_735_229_888_000_001, "1735229888.000001"),
            (0, "0.0"),
        ];
        for (micros, want) in cases {
            let mut out = Vec::new();
            write_epoch_seconds(micros, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn round_trips_through_text() {
        for micros in [0, 1, 999_999, T, MAX_MICROS] {
            let mut out = Vec::new();
            write_epoch_seconds(micros, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(parse_epoch_seconds(&text), Ok(micros), "{text}");
        }
    }
}
