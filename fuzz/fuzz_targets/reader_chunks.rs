//! The connection's request reader fed arbitrary chunks: the same bytes give the same requests
//! however they are split, and the reader never holds more than its limits allow.
#![no_main]

use flagsmith_sse::http::{self, HttpError, Parsed, Reader};
use libfuzzer_sys::fuzz_target;

/// Most poll calls per input before the reader must have stopped making progress.
const MAX_POLLS: usize = 100_000;

/// Pushes `chunks` in order, polling after each until the reader wants more or refuses.
fn feed<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> (Vec<Parsed>, Option<HttpError>) {
    let mut r = Reader::default();
    let mut out = Vec::new();
    let mut polls = 0;
    for chunk in chunks {
        r.push(chunk);
        loop {
            polls += 1;
            assert!(polls < MAX_POLLS, "the reader does not settle");
            match r.poll() {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    // The first byte seeds the split points; the rest is the wire.
    let Some((&seed, wire)) = data.split_first() else {
        return;
    };
    let mut cuts = Vec::new();
    let mut at = 0usize;
    let mut state = u32::from(seed) | 1;
    while at < wire.len() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = 1 + (state as usize % 64).min(wire.len() - at - 1);
        cuts.push(&wire[at..at + len]);
        at += len;
    }
    let (split, split_err) = feed(cuts.iter().copied());
    let (whole, whole_err) = feed(std::iter::once(wire));
    // Heads reported early (`Parsed::Head`) depend on the split; whole requests must not.
    let requests = |v: &[Parsed]| -> Vec<Parsed> {
        v.iter()
            .filter(|p| matches!(p, Parsed::Request(..)))
            .cloned()
            .collect()
    };
    assert_eq!(requests(&split), requests(&whole));
    // Which limit trips first may depend on how much had arrived; that one trips may not.
    assert_eq!(
        split_err.is_some(),
        whole_err.is_some(),
        "{split_err:?} / {whole_err:?}"
    );
    for p in &whole {
        if let Parsed::Request(head, body) = p {
            assert!(head.len <= http::MAX_HEAD);
            assert!(body.len() <= http::MAX_BODY);
        }
    }
});
