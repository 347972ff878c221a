//! Clocks shared by the harness and its worker processes.
//!
//! `CLOCK_MONOTONIC` is one clock for every process on the machine, so a publish time taken in
//! the parent and an arrival time taken in a worker can be subtracted. `std::time::Instant`
//! makes no such promise across processes, so latencies never use it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock microseconds since the Unix epoch.
pub fn epoch_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// `micros` as Python's `datetime.isoformat()` writes an aware UTC time:
/// `2025-01-12T18:06:42.028060+00:00`.
pub fn iso8601(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (y, m, d) = flagsmith_sse::timestamp::civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}+00:00",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// `micros` as epoch seconds with six decimals: `1735229888.760412`.
pub fn epoch_text(micros: i64) -> String {
    format!(
        "{}.{:06}",
        micros.div_euclid(1_000_000),
        micros.rem_euclid(1_000_000)
    )
}

/// Hands out update times: wall-clock microseconds, strictly increasing, so that every publish
/// is a real update and can be told apart from every other one.
#[derive(Debug, Default)]
pub struct TimeSource {
    last: i64,
}

impl TimeSource {
    /// The next time.
    pub fn next(&mut self) -> i64 {
        self.last = epoch_micros().max(self.last + 1);
        self.last
    }
}
