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

/// The civil date (year, month, day; proleptic Gregorian calendar) of a day count since
/// 1970-01-01: the inverse of the day count that ISO-8601 parsing uses.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
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
/// Plain decimals are converted exactly and rounded to the nearest microsecond (half up);
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
    // Digits past the sixth round to the nearest microsecond (half up): a number is read as
    // the value it names, and `write_epoch_seconds` may write seven digits.
    let fraction = fraction + i64::from(frac.as_bytes().get(6).is_some_and(|&d| d >= b'5'));
    let secs: i64 = int.parse().map_err(|_| TimeError::Syntax(WHAT))?;
    check_bounds(secs * MICROS_PER_SECOND + fraction)
}

/// Appends `micros` as the `updated_at` number SDKs read: epoch seconds with a decimal point.
///
/// Every SDK reads the number as an IEEE-754 double, and the Go SDK truncates it to
/// nanoseconds, so the value written is the largest double *not above* the exact time, as the
/// shortest decimal that reads back to that double. When the double nearest to the plain
/// microsecond decimal is not above the time (about half of all times), that is the plain
/// decimal with trailing zeros trimmed (`1735229888.760412`, `1735229888.76`); otherwise it
/// has more digits (`1736705300.000003` is written `1736705300.0000029`). One digit always
/// follows the point, because the Flutter SDK ignores an integer: `1735229888.0`, `0.0`.
///
/// Read back and rounded to the nearest microsecond, the number is the exact time for every
/// time before 2106-02-07 (2^32 seconds). Later, one double step exceeds half a microsecond
/// (a whole one from 2242 on), and the number may read back as a neighbouring microsecond
/// (up to 46 µs away by the year 9999). Negative (pre-1970) times follow the same rule; the
/// server never stores one.
pub fn write_epoch_seconds(micros: Micros, out: &mut Vec<u8>) {
    use std::io::Write;
    // Below 2^33 s one double step is less than a microsecond, so no decimal with six
    // fractional digits or fewer other than the time itself reads back to the time's nearest
    // double: when that double is not above the time, the plain form is the shortest.
    // Below 2^53 µs the integer converts exactly and the division rounds correctly.
    const PLAIN_BELOW: Micros = (1 << 33) * MICROS_PER_SECOND;
    if (0..PLAIN_BELOW).contains(&micros)
        && cmp_exact(micros as f64 / 1e6, micros) != std::cmp::Ordering::Greater
    {
        let secs = micros / MICROS_PER_SECOND;
        let mut frac = micros % MICROS_PER_SECOND;
        let mut digits = 6;
        while digits > 1 && frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{secs}.{frac:0digits$}");
        return;
    }
    let start = out.len();
    // `Display` for f64 writes the shortest decimal that reads back to the same double, never
    // in exponent notation; an integral value comes without a point.
    let _ = write!(out, "{}", at_or_below(micros));
    if !out[start..].contains(&b'.') {
        out.extend_from_slice(b".0");
    }
}

/// The largest double not above `micros` microseconds, in seconds.
fn at_or_below(micros: Micros) -> f64 {
    use std::cmp::Ordering::Greater;
    // Within a step or two of the answer: the conversion of a large integer and the division
    // each round once.
    let mut d = micros as f64 / 1e6;
    while cmp_exact(d, micros) == Greater {
        d = d.next_down();
    }
    while cmp_exact(d.next_up(), micros) != Greater {
        d = d.next_up();
    }
    // No -0.0: it would be written with a sign.
    d + 0.0
}

/// Compares the exact value of the finite double `d` (seconds) with `micros` microseconds.
fn cmp_exact(d: f64, micros: Micros) -> std::cmp::Ordering {
    use std::cmp::Ordering::{Greater, Less};
    if d == 0.0 {
        return 0.cmp(&micros);
    }
    match (d < 0.0, micros < 0) {
        (false, true) => Greater,
        (true, false) => Less,
        (false, false) => cmp_magnitude(d, micros.unsigned_abs()),
        (true, true) => cmp_magnitude(-d, micros.unsigned_abs()).reverse(),
    }
}

/// Compares the exact value of the positive finite double `d` (seconds) with `micros`
/// microseconds, as `m * 2^e * 10^6` against `micros` in 128-bit integers.
fn cmp_magnitude(d: f64, micros: u64) -> std::cmp::Ordering {
    use std::cmp::Ordering::{Greater, Less};
    let bits = d.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    let (m, e) = if biased == 0 {
        (fraction, -1074)
    } else {
        (fraction | (1 << 52), biased - 1075)
    };
    // m * 10^6 < 2^73.
    let scaled = u128::from(m) * 1_000_000;
    if e >= 0 {
        // 2^55 * 10^6 exceeds every u64; below that the shift fits in 128 bits.
        if e >= 55 {
            return Greater;
        }
        return (scaled << e).cmp(&u128::from(micros));
    }
    let shift = e.unsigned_abs();
    let micros = u128::from(micros);
    if micros == 0 {
        return Greater;
    }
    if micros.leading_zeros() < shift {
        // micros * 2^shift is at least 2^128, above any m * 10^6.
        return Less;
    }
    scaled.cmp(&(micros << shift))
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
    use std::cmp::Ordering;

    #[test]
    fn civil_dates_and_day_counts_are_inverse() {
        for days in (-800_000..3_000_000)
            .step_by(997)
            .chain([-1, 0, 1, 59, 60, 11_016, 2_932_896])
        {
            let (y, m, d) = civil_from_days(days);
            assert!(
                (1..=12).contains(&m)
                    && (1..=days_in_month(y, i64::from(m))).contains(&i64::from(d))
            );
            assert_eq!(
                days_from_civil(y, i64::from(m), i64::from(d)),
                days,
                "{y}-{m}-{d}"
            );
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

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
        assert_eq!(parse_epoch_seconds("1736705202.0280604"), Ok(T));
        assert_eq!(parse_epoch_seconds("1736705202.0280609"), Ok(T + 1));
        assert_eq!(parse_epoch_seconds("1736705202"), Ok(T - 28_060));
        assert_eq!(parse_epoch_seconds("1.736705202e9"), Ok(T - 28_060));
        assert_eq!(parse_epoch_seconds("0"), Ok(0));
        assert!(parse_epoch_seconds("-1").is_err());
        assert!(parse_epoch_seconds("1e300").is_err());
        assert!(parse_epoch_seconds("1.").is_err());
        assert!(parse_epoch_seconds("99999999999999").is_err());
    }

    fn written(micros: Micros) -> String {
        let mut out = Vec::new();
        write_epoch_seconds(micros, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_seconds_with_a_point() {
        let cases = [
            (T, "1736705202.02806"),
            (1_735_229_888_760_412, "1735229888.760412"),
            (1_735_229_888_000_000, "1735229888.0"),
            (1_735_229_888_500_000, "1735229888.5"),
            (1_735_229_888_000_001, "1735229888.000001"),
            // The nearest double to ….000003 is above the time: the one below it is written.
            (1_736_705_300_000_003, "1736705300.0000029"),
            (0, "0.0"),
            (-1_000_000, "-1.0"),
            (-1_500_000, "-1.5"),
        ];
        for (micros, want) in cases {
            assert_eq!(written(micros), want, "{micros}");
        }
    }

    #[test]
    fn round_trips_through_text() {
        // After 2^32 s one double step exceeds half a microsecond: see `write_epoch_seconds`.
        for micros in [0, 1, 999_999, T, (1 << 32) * MICROS_PER_SECOND - 1] {
            let text = written(micros);
            assert_eq!(parse_epoch_seconds(&text), Ok(micros), "{text}");
        }
        // Later times read back within a double step and a half (steps of 2^-15 s by 9999).
        for micros in [
            MAX_MICROS,
            MAX_MICROS - 17,
            (1 << 32) * MICROS_PER_SECOND + 1,
        ] {
            let text = written(micros);
            let back = parse_epoch_seconds(&text).unwrap();
            assert!((micros - back).abs() <= 46, "{text} for {micros}");
        }
    }

    #[test]
    fn epoch_numbers_round_to_the_microsecond() {
        assert_eq!(
            parse_epoch_seconds("1736705300.0000029"),
            Ok(1_736_705_300_000_003)
        );
        assert_eq!(
            parse_epoch_seconds("1736705300.0000025"),
            Ok(1_736_705_300_000_003)
        );
        assert_eq!(
            parse_epoch_seconds("1736705300.00000249"),
            Ok(1_736_705_300_000_002)
        );
        assert_eq!(
            parse_epoch_seconds("1736705300.9999999"),
            Ok(1_736_705_301_000_000)
        );
    }

    /// Exact comparison of the double `v` (seconds) with `micros`, from `v`'s exact decimal
    /// expansion: independent of the integer arithmetic in `cmp_exact`.
    fn reference_cmp(v: f64, micros: i64) -> Ordering {
        if v < 0.0 || (v == 0.0 && micros < 0) {
            return reference_cmp(-v, -micros).reverse();
        }
        if micros < 0 {
            return Ordering::Greater;
        }
        // A double's exact expansion has as many fractional digits as its exponent is below 0.
        let text = if v >= 1.0 {
            format!("{v:.52}")
        } else {
            format!("{v:.1100}")
        };
        let (int, frac) = text.split_once('.').unwrap();
        let int: i64 = int.parse().unwrap();
        let secs = micros / MICROS_PER_SECOND;
        let want = format!(
            "{:06}{}",
            micros % MICROS_PER_SECOND,
            "0".repeat(frac.len() - 6)
        );
        int.cmp(&secs).then_with(|| frac.cmp(want.as_str()))
    }

    /// `v` written with `digits` fractional digits, rounded down and up.
    fn neighbours(v: f64, digits: usize) -> [f64; 2] {
        let text = format!("{v:.52}");
        let (int, frac) = text.split_once('.').unwrap();
        let down: u128 = format!("{int}{}", &frac[..digits]).parse().unwrap();
        let scale = 10u128.pow(digits as u32);
        [down, down + 1].map(|n| {
            format!("{}.{:0digits$}", n / scale, n % scale)
                .parse()
                .unwrap()
        })
    }

    fn plain(micros: i64) -> String {
        let text = format!(
            "{}.{:06}",
            micros / MICROS_PER_SECOND,
            micros % MICROS_PER_SECOND
        );
        let trimmed = text.trim_end_matches('0');
        if trimmed.ends_with('.') {
            format!("{trimmed}0")
        } else {
            trimmed.to_owned()
        }
    }

    /// Everything the rule and the SDKs ask of the text written for a time `micros >= 0`.
    fn check(micros: i64) {
        let text = written(micros);
        let (int, frac) = text.split_once('.').expect("a decimal point");
        assert!(!int.is_empty() && !frac.is_empty(), "{text}");
        assert!(
            text.bytes().all(|b| b.is_ascii_digit() || b == b'.'),
            "{text}"
        );
        let v: f64 = text.parse().unwrap();
        // The largest double not above the time.
        assert_ne!(
            reference_cmp(v, micros),
            Ordering::Greater,
            "{text} above {micros}"
        );
        assert_eq!(
            reference_cmp(v.next_up(), micros),
            Ordering::Greater,
            "{text} not the largest double at or below {micros}"
        );
        // The shortest decimal for it: none with one digit fewer reads back to the same double.
        if frac.len() > 1 && v >= 1.0 {
            for shorter in neighbours(v, frac.len() - 1) {
                assert_ne!(shorter, v, "{text}: a shorter decimal reads back the same");
            }
        }
        // The plain form whenever its double is not above the time (up to 2^33 s, 2242: later
        // one double step exceeds a microsecond and a shorter decimal may read back the same).
        let plain = plain(micros);
        let plain_double: f64 = plain.parse().unwrap();
        if reference_cmp(plain_double, micros) != Ordering::Greater {
            if micros < (1 << 33) * MICROS_PER_SECOND {
                assert_eq!(text, plain);
            }
        } else if ((1 << 30) * MICROS_PER_SECOND..(1 << 32) * MICROS_PER_SECOND).contains(&micros) {
            // 2004 to 2106. Later, one double step is nearly a microsecond and the shortest
            // decimal may be another microsecond's plain form.
            assert_eq!(frac.len(), 7, "{text} for {plain}");
        }
        // The Go SDK: sec = floor(v), ns = trunc((v - sec) * 1e9), never after the time.
        let sec = v.floor();
        let ns = ((v - sec) * 1e9).trunc();
        assert!(
            sec as i128 * 1_000_000_000 + ns as i128 <= i128::from(micros) * 1000,
            "{text}: the Go SDK reads {sec} s {ns} ns, after {micros} µs"
        );
        if micros < (1 << 32) * MICROS_PER_SECOND {
            // The Python SDK (`datetime.fromtimestamp`): the fraction times 1e6, rounded half
            // to even, in doubles.
            let sec = v.trunc();
            let us = ((v - sec) * 1e6).round_ties_even();
            assert_eq!(sec as i64 * MICROS_PER_SECOND + us as i64, micros, "{text}");
            // And this server's own reading of the number.
            assert_eq!(parse_epoch_seconds(&text), Ok(micros), "{text}");
        }
    }

    #[test]
    fn writes_the_largest_double_not_above_the_time() {
        const S: i64 = MICROS_PER_SECOND;
        let mut edges = vec![0, 1, 2, 3, 999_999, S, S + 1, 2 * S - 1, T, T + 1, T - 1];
        for secs in [
            1 << 30,
            1 << 31,
            1 << 32,
            1 << 33,
            1_736_705_300,
            7_258_118_400,
        ] {
            for delta in [
                -1_000_001, -1_000_000, -999_999, -1, 0, 1, 3, 999_999, 1_000_000,
            ] {
                edges.push(secs * S + delta);
            }
        }
        for micros in edges {
            check(micros);
        }
        // 1970-01-01 to 2200-01-01, from a fixed seed (splitmix64).
        let mut state: u64 = 0x05ee_d0f7_13e5;
        let span = 7_258_118_400 * S as u64;
        let mut seven = 0;
        const N: usize = 1_000_000;
        for _ in 0..N {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let micros = (z % span) as i64;
            check(micros);
            if written(micros) != plain(micros) {
                seven += 1;
            }
        }
        // About half of all times need the longer form.
        assert!((N * 4 / 10..N * 6 / 10).contains(&seven), "{seven} of {N}");
    }

    #[test]
    fn the_plain_form_reads_newer_in_go_when_its_double_is_above() {
        // Why the rule exists: 1736705300.000003 reads back as ….000003099 s in the Go SDK.
        let v: f64 = "1736705300.000003".parse().unwrap();
        let ns = ((v - v.floor()) * 1e9).trunc();
        assert!(ns > 3000.0, "{ns}");
        let v: f64 = written(1_736_705_300_000_003).parse().unwrap();
        let ns = ((v - v.floor()) * 1e9).trunc();
        assert!(ns <= 3000.0, "{ns}");
    }

    #[test]
    fn negative_times_follow_the_same_rule() {
        for micros in [
            -1,
            -2,
            -3,
            -999_999,
            -1_000_001,
            -1_736_705_300_000_003,
            i64::MIN + 1,
        ] {
            let text = written(micros);
            let v: f64 = text.parse().unwrap();
            assert_ne!(reference_cmp(v, micros), Ordering::Greater, "{text}");
            assert_eq!(
                reference_cmp(v.next_up(), micros),
                Ordering::Greater,
                "{text}"
            );
            assert!(text.starts_with('-') && text.contains('.'), "{text}");
        }
        let text = written(i64::MIN);
        assert!(text.starts_with("-9223372036854.77"), "{text}");
    }
}
