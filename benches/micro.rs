//! Microbenchmarks of the hot pure functions: the request parser (`http::parse_head`,
//! `http::Reader`), the time parsers (`timestamp::parse_iso8601`, `json::parse_queue_change`),
//! the `updated_at` formatter (`timestamp::write_epoch_seconds`) and the frame encoder
//! (`sse::Event::new`).
//!
//! `cargo bench --bench micro [-- [--quick] [FILTER]]`. Each benchmark is calibrated so that one
//! sample takes about 5 ms, then sampled 31 times; the median time per call is reported with the
//! fastest and the 90th-percentile sample, so that a noisy neighbour shows up as spread rather
//! than moving the median.

use flagsmith_sse::http::{self, Parsed, Reader};
use flagsmith_sse::{json, sse, timestamp};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Browser `EventSource` request with the headers a real browser sends.
const GET_BROWSER: &[u8] = b"GET /sse/environments/ser.Abc123xyzDEF456/stream HTTP/1.1\r\n\
Host: realtime.flagsmith.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0\r\n\
Accept: text/event-stream\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Referer: https://app.example.com/\r\n\
Origin: https://app.example.com\r\n\
Connection: keep-alive\r\n\
Sec-Fetch-Dest: empty\r\n\
Sec-Fetch-Mode: cors\r\n\
Sec-Fetch-Site: cross-site\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\r\n";

/// An SDK's minimal stream request.
const GET_SDK: &[u8] =
    b"GET /sse/environments/ser.Abc123xyzDEF456/stream HTTP/1.1\r\nHost: sse\r\nAccept: text/event-stream\r\n\r\n";

/// Flagsmith's task processor notifying a change (Python requests).
const POST_QUEUE: &[u8] = b"POST /sse/environments/ser.Abc123xyzDEF456/queue-change HTTP/1.1\r\n\
Host: sse:8000\r\n\
User-Agent: python-requests/2.32.3\r\n\
Accept-Encoding: gzip, deflate\r\n\
Accept: */*\r\n\
Connection: keep-alive\r\n\
Authorization: Token 2c4e1f0b8a9d4e7f9a1b3c5d7e9f1a2b\r\n\
Content-Length: 50\r\n\
Content-Type: application/json\r\n\r\n\
{\"updated_at\": \"2025-01-12T18:06:42.028060+00:00\"}";

const SAMPLES: usize = 31;
const QUICK_SAMPLES: usize = 7;

struct Bench {
    filter: Vec<String>,
    samples: usize,
    sample_time: Duration,
}

impl Bench {
    fn run<T>(&self, name: &str, mut f: impl FnMut() -> T) {
        if !self.filter.is_empty() && !self.filter.iter().any(|p| name.contains(p.as_str())) {
            return;
        }
        // Calibrate: double the iterations until one sample takes long enough (bounded).
        let mut iters: u64 = 1;
        for _ in 0..40 {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            if t.elapsed() >= self.sample_time / 4 {
                break;
            }
            iters *= 2;
        }
        iters *= 4;
        let mut per_iter: Vec<f64> = (0..self.samples)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(f());
                }
                t.elapsed().as_nanos() as f64 / iters as f64
            })
            .collect();
        per_iter.sort_by(f64::total_cmp);
        let median = per_iter[per_iter.len() / 2];
        let p90 = per_iter[(per_iter.len() * 9 / 10).min(per_iter.len() - 1)];
        println!(
            "{name:<44} {median:>10.1} ns/iter   (min {:>8.1}, p90 {:>8.1}; {iters} iters × {} samples)",
            per_iter[0],
            p90,
            per_iter.len()
        );
    }
}

fn main() {
    let mut quick = false;
    let mut filter = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--bench" => {}
            "--quick" => quick = true,
            s if s.starts_with('-') => {}
            s => filter.push(s.to_owned()),
        }
    }
    let b = Bench {
        filter,
        samples: if quick { QUICK_SAMPLES } else { SAMPLES },
        sample_time: Duration::from_millis(if quick { 1 } else { 5 }),
    };
    check();

    b.run("http::parse_head/browser GET (14 headers)", || {
        http::parse_head(black_box(GET_BROWSER))
    });
    b.run("http::parse_head/SDK GET (2 headers)", || {
        http::parse_head(black_box(GET_SDK))
    });
    b.run("http::parse_head/queue-change POST", || {
        http::parse_head(black_box(POST_QUEUE))
    });
    b.run("http::parse_head/partial (half a head)", || {
        http::parse_head(black_box(&GET_BROWSER[..GET_BROWSER.len() / 2]))
    });
    b.run("http::Reader/queue-change in one read", || {
        let mut r = Reader::default();
        r.push(black_box(POST_QUEUE));
        read_one(&mut r)
    });
    b.run("http::Reader/queue-change in 3 reads", || {
        let mut r = Reader::default();
        let (a, rest) = POST_QUEUE.split_at(40);
        let (m, z) = rest.split_at(rest.len() - 20);
        let mut got = None;
        for part in [a, m, z] {
            r.push(black_box(part));
            if let Some(x) = read_one(&mut r) {
                got = Some(x);
            }
        }
        got
    });
    let pipelined: Vec<u8> = POST_QUEUE.repeat(16);
    b.run("http::Reader/16 pipelined queue-changes", || {
        let mut r = Reader::default();
        r.push(black_box(&pipelined));
        let mut n = 0;
        while read_one(&mut r).is_some() {
            n += 1;
        }
        n
    });

    for (label, text) in [
        ("isoformat +00:00", "2025-01-12T18:06:42.028060+00:00"),
        ("Z, no fraction", "2025-01-12T18:06:42Z"),
        ("naive", "2025-01-12T18:06:42.028060"),
        ("offset +05:30", "2025-01-12T23:36:42.028060+05:30"),
    ] {
        b.run(&format!("timestamp::parse_iso8601/{label}"), || {
            timestamp::parse_iso8601(black_box(text))
        });
    }
    for (label, body) in [
        (
            "iso string",
            &b"{\"updated_at\": \"2025-01-12T18:06:42.028060+00:00\"}"[..],
        ),
        ("epoch number", b"{\"updated_at\": 1736705202.02806}"),
        (
            "extra fields",
            b"{\"environment\": \"ser.Abc123\", \"tags\": [1, 2, {\"a\": null}], \"updated_at\": \"2025-01-12T18:06:42.028060Z\", \"x\": true}",
        ),
    ] {
        b.run(&format!("json::parse_queue_change/{label}"), || {
            json::parse_queue_change(black_box(body))
        });
    }
    // One time whose microsecond decimal reads back at or below it, one whose does not.
    for (label, micros) in [
        ("plain form", 1_736_705_202_028_060),
        ("7 digits", 1_736_705_300_000_003),
    ] {
        let mut out = Vec::with_capacity(32);
        b.run(&format!("timestamp::write_epoch_seconds/{label}"), || {
            out.clear();
            timestamp::write_epoch_seconds(black_box(micros), &mut out);
            out.len()
        });
    }
    b.run("sse::Event::new", || {
        sse::Event::new(black_box(1_736_705_202_028_060))
    });
    b.run("sse::Event::new + bytes(chunked)", || {
        let e = sse::Event::new(black_box(1_736_705_202_028_060));
        e.bytes(true).len()
    });
}

/// Takes one complete request from the reader, if there is one.
fn read_one(r: &mut Reader) -> Option<usize> {
    for _ in 0..2 {
        match r.poll() {
            Ok(Some(Parsed::Request(_, body))) => return Some(body.len()),
            Ok(Some(Parsed::Head)) => {}
            _ => return None,
        }
    }
    None
}

/// The inputs mean what the names say; a benchmark of an error path would be misleading.
fn check() {
    assert!(matches!(http::parse_head(GET_BROWSER), Ok(Some(_))));
    assert!(matches!(http::parse_head(GET_SDK), Ok(Some(_))));
    assert!(matches!(http::parse_head(POST_QUEUE), Ok(Some(_))));
    let mut r = Reader::default();
    r.push(POST_QUEUE);
    assert_eq!(read_one(&mut r), Some(50));
    let body = &POST_QUEUE[POST_QUEUE.len() - 50..];
    assert!(json::parse_queue_change(body).is_ok(), "queue-change body");
    let mut r = Reader::default();
    r.push(&POST_QUEUE.repeat(16));
    let mut n = 0;
    while read_one(&mut r).is_some() {
        n += 1;
    }
    assert_eq!(n, 16, "pipelined requests parsed");
    assert_eq!(
        timestamp::parse_iso8601("2025-01-12T18:06:42.028060+00:00"),
        timestamp::parse_iso8601("2025-01-12T23:36:42.028060+05:30")
    );
    assert!(json::parse_queue_change(b"{\"updated_at\": 1736705202.02806}").is_ok());
    assert!(
        json::parse_queue_change(
            b"{\"environment\": \"ser.Abc123\", \"tags\": [1, 2, {\"a\": null}], \"updated_at\": \"2025-01-12T18:06:42.028060Z\", \"x\": true}"
        )
        .is_ok()
    );
}
