//! The queue-change body and the ISO-8601 parser: any bytes give a time or an error.
#![no_main]

use flagsmith_sse::{json, timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(micros) = json::parse_queue_change(data) {
        let mut out = Vec::new();
        timestamp::write_epoch_seconds(micros, &mut out);
        assert!(out.contains(&b'.'), "epoch seconds written without a point");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(micros) = timestamp::parse_iso8601(text) {
            // Written back as epoch seconds, the same instant reads back (before 2^32 s; later
            // within a double step and a half: 2^-15 s steps by the year 9999).
            let mut out = Vec::new();
            timestamp::write_epoch_seconds(micros, &mut out);
            let back = String::from_utf8(out).expect("ASCII");
            let read = timestamp::parse_epoch_seconds(&back).expect("a time");
            if micros < (1 << 32) * 1_000_000 {
                assert_eq!(read, micros, "{back}");
            } else {
                assert!((micros - read).abs() <= 46, "{back}");
            }
        }
        let _ = timestamp::parse_epoch_seconds(text);
    }
});
