//! Property: any valid request sequence, split at any byte boundaries, reads as the same
//! requests as when it arrives in one piece, and no proper prefix of it is an error.

use flagsmith_sse::http::{HttpError, Parsed, Reader, Route};
use proptest::prelude::*;

/// One generated request: its bytes, and the route and body it must read as.
#[derive(Debug, Clone)]
struct Req {
    wire: Vec<u8>,
    route: Route,
    body: Vec<u8>,
}

fn key() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,24}"
}

fn extra_headers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("X-[A-Za-z-]{1,12}", "[!-~][ -~]{0,40}"), 0..6)
}

/// Splits `body` into chunked transfer coding with the given chunk sizes.
fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn request() -> impl Strategy<Value = Req> {
    (
        0..5u8,
        key(),
        any::<bool>(),
        extra_headers(),
        prop::collection::vec(any::<u8>(), 0..300),
        any::<bool>(),
        prop::collection::vec(1..64usize, 1..8),
        "(\\?[a-z=&0-9]{0,20})?",
    )
        .prop_map(
            |(kind, key, http11, headers, body, use_chunked, sizes, query)| {
                let version = if http11 { "1.1" } else { "1.0" };
                let (method, target, route, has_body) = match kind {
                    0 => (
                        "GET",
                        format!("/sse/environments/{key}/stream{query}"),
                        Route::Stream(key.as_str().into()),
                        false,
                    ),
                    1 => (
                        "POST",
                        format!("/sse/environments/{key}/queue-change{query}"),
                        Route::QueueChange(key.as_str().into()),
                        true,
                    ),
                    2 => (
                        "GET",
                        "/health/liveness/".to_owned(),
                        Route::Liveness,
                        false,
                    ),
                    3 => (
                        "OPTIONS",
                        format!("/sse/environments/{key}/stream"),
                        Route::Stream(key.as_str().into()),
                        false,
                    ),
                    _ => ("HEAD", "/metrics".to_owned(), Route::Metrics, false),
                };
                let mut wire =
                    format!("{method} {target} HTTP/{version}\r\nHost: test\r\n").into_bytes();
                for (name, value) in &headers {
                    wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                let body = if has_body { body } else { Vec::new() };
                if has_body && use_chunked && http11 {
                    wire.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    wire.extend_from_slice(&chunked(&body, &sizes));
                } else if has_body {
                    wire.extend_from_slice(
                        format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                    );
                    wire.extend_from_slice(&body);
                } else {
                    wire.extend_from_slice(b"\r\n");
                }
                Req { wire, route, body }
            },
        )
}

/// Hands `pieces` to a reader, polling after each; returns the requests and the first error.
fn read_all<'a>(
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Parsed>, Option<HttpError>, bool) {
    let mut r = Reader::default();
    let mut got = Vec::new();
    for piece in pieces {
        r.push(piece);
        loop {
            match r.poll() {
                Ok(Some(p @ Parsed::Request(..))) => got.push(p),
                Ok(Some(Parsed::Head)) => {}
                Ok(None) => break,
                Err(e) => return (got, Some(e), false),
            }
        }
    }
    let idle = r.is_idle();
    (got, None, idle)
}

/// Like [`read_all`], the way the server does it: each piece is parsed where it lies
/// ([`Reader::feed`]), and after every second request the rest of the piece is handed over, as
/// when a connection must wait (a queue-change at the store) before reading on.
fn feed_all<'a>(
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Parsed>, Option<HttpError>, bool) {
    let mut r = Reader::default();
    let mut got = Vec::new();
    for piece in pieces {
        let mut input = piece;
        loop {
            match r.feed(&mut input) {
                Ok(Some(p @ Parsed::Request(..))) => {
                    got.push(p);
                    if got.len() % 2 == 1 {
                        r.push(input);
                        input = &[];
                    }
                }
                Ok(Some(Parsed::Head)) => {}
                Ok(None) => {
                    assert!(input.is_empty(), "input left over without a request");
                    break;
                }
                Err(e) => return (got, Some(e), false),
            }
        }
    }
    let idle = r.is_idle();
    (got, None, idle)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_split_reads_the_same_requests(
        reqs in prop::collection::vec(request(), 1..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let wire: Vec<u8> = reqs.iter().flat_map(|r| r.wire.iter().copied()).collect();
        let (whole, err, idle) = read_all([wire.as_slice()]);
        prop_assert_eq!(err, None);
        prop_assert!(idle, "bytes left over after the last request");
        prop_assert_eq!(whole.len(), reqs.len());
        for (p, want) in whole.iter().zip(&reqs) {
            let Parsed::Request(head, body) = p else { unreachable!() };
            prop_assert_eq!(&head.route, &want.route);
            prop_assert_eq!(body, &want.body);
        }

        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        at.push(0);
        at.push(wire.len());
        at.sort_unstable();
        at.dedup();
        let pieces: Vec<&[u8]> = at.windows(2).map(|w| &wire[w[0]..w[1]]).collect();
        let (split, err, idle) = read_all(pieces.iter().copied());
        prop_assert_eq!(err, None);
        prop_assert!(idle);
        prop_assert_eq!(&split, &whole);
        let (fed, err, idle) = feed_all(pieces.iter().copied());
        prop_assert_eq!(err, None);
        prop_assert!(idle);
        prop_assert_eq!(&fed, &whole);

        // A proper prefix is never an error and never more requests than it holds.
        for &cut in &at[..at.len() - 1] {
            let (got, err, _) = read_all([&wire[..cut]]);
            prop_assert_eq!(err, None, "prefix of {} bytes", cut);
            prop_assert!(got.len() < reqs.len() || cut == wire.len());
        }
    }

    #[test]
    fn byte_by_byte_reads_the_same_requests(req in request()) {
        let (whole, _, _) = read_all([req.wire.as_slice()]);
        let (bytes, err, idle) = read_all(req.wire.chunks(1));
        prop_assert_eq!(err, None);
        prop_assert!(idle);
        prop_assert_eq!(&bytes, &whole);
        let (fed, err, idle) = feed_all(req.wire.chunks(1));
        prop_assert_eq!(err, None);
        prop_assert!(idle);
        prop_assert_eq!(fed, whole);
    }
}
