//! The connection's request reader fed arbitrary chunks: the same bytes give the same requests
//! however they are split and whether they are handed over or parsed in place, the reader never
//! holds more than its limits allow, and its work stays proportional to the bytes.
#![no_main]

use flagsmith_sse::http::{self, HttpError, Parsed, Reader};
use libfuzzer_sys::fuzz_target;

/// Most poll calls per input before the reader must have stopped making progress.
const MAX_POLLS: usize = 100_000;

/// Most work per byte: the head is looked at by the scan and by httparse twice at most.
const MAX_WORK_PER_BYTE: u64 = 4;

/// Hands `chunks` over in order (or lets the reader parse them in place, `in_place`), polling
/// after each until the reader wants more or refuses.
fn feed<'a>(
    chunks: impl Iterator<Item = &'a [u8]>,
    in_place: bool,
) -> (Vec<Parsed>, Option<HttpError>) {
    let mut r = Reader::default();
    let mut out = Vec::new();
    let mut polls = 0;
    let mut bytes = 0u64;
    for chunk in chunks {
        bytes += chunk.len() as u64;
        let mut input = chunk;
        if !in_place {
            r.push(chunk);
            input = &[];
        }
        loop {
            polls += 1;
            assert!(polls < MAX_POLLS, "the reader does not settle");
            assert!(r.work() <= MAX_WORK_PER_BYTE * bytes, "{} for {bytes} bytes", r.work());
            match r.feed(&mut input) {
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
    let (split, split_err) = feed(cuts.iter().copied(), false);
    let (in_place, in_place_err) = feed(cuts.iter().copied(), true);
    let (whole, whole_err) = feed(std::iter::once(wire), false);
    // Heads reported early (`Parsed::Head`) depend on the split; whole requests must not.
    let requests = |v: &[Parsed]| -> Vec<Parsed> {
        v.iter()
            .filter(|p| matches!(p, Parsed::Request(..)))
            .cloned()
            .collect()
    };
    assert_eq!(requests(&split), requests(&whole));
    assert_eq!(requests(&in_place), requests(&whole));
    assert_eq!(split_err.is_some(), in_place_err.is_some());
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
