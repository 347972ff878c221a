//! The request-head parser and the router: any bytes give a head, "not yet", or a refusal.
#![no_main]

use flagsmith_sse::http::{self, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = http::parse_head(data) {
        assert!(head.len <= data.len() && head.len <= http::MAX_HEAD);
        if let http::BodyFraming::Length(n) = head.body {
            assert!(n > 0 && n <= http::MAX_BODY);
        }
        // Every proper prefix of a complete head is incomplete, never a different answer.
        if let Ok(Some(_)) = http::parse_head(&data[..head.len - 1]) {
            panic!("a proper prefix of a head parsed as complete");
        }
        let _ = http::parse_body(head.body, &data[head.len..]);
    }
    if let Ok(target) = std::str::from_utf8(data) {
        match Route::parse(target) {
            Route::Stream(key) | Route::QueueChange(key) => assert!(http::valid_key(&key)),
            _ => {}
        }
    }
});
