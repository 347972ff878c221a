//! Conformance of the event stream (SPEC 1.1) over real sockets against the real binary: the
//! response head, the exact bytes of events, keep-alive comments and the end of a stream, the
//! initial event, monotonic times, coalescing and fan-out.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Epoch seconds of 2025-01-12T18:00:00Z.
const BASE: u64 = 1_736_704_800;

/// A queue-change body for `sec` seconds and `micros` after [`BASE`], and the `updated_at`
/// text the stream must carry for it.
fn at(sec: u32, micros: u32) -> (String, String) {
    let body = format!(
        r#"{{"updated_at": "2025-01-12T18:{:02}:{:02}.{micros:06}+00:00"}}"#,
        sec / 60,
        sec % 60
    );
    let micros = (BASE + u64::from(sec)) as i64 * 1_000_000 + i64::from(micros);
    (body, epoch_text(micros))
}

/// POSTs the change and insists on a 200.
#[track_caller]
fn post(addr: SocketAddr, key: &str, body: &str) {
    let r = queue_change(addr, key, body);
    assert_eq!(r.status, 200, "queue-change {body}: {}", r.text());
}

/// The event text for an `updated_at` value.
fn event_text(updated_at: &str) -> String {
    format!("event: environment_updated\ndata: {{\"updated_at\": {updated_at}}}\nretry: 15000\n\n")
}

/// The event as one chunk of a chunked stream.
fn event_chunk(updated_at: &str) -> Vec<u8> {
    let text = event_text(updated_at);
    format!("{:x}\r\n{text}\r\n", text.len()).into_bytes()
}

/// Asserts that nothing at all arrives on the stream for `quiet`.
#[track_caller]
fn assert_silent(sub: &mut Subscriber, quiet: Duration) {
    let before = sub.wire.len();
    let item = sub.next(quiet);
    assert_eq!(item, None, "expected silence, got {item:?}");
    assert!(!sub.ended, "the stream ended");
    assert_eq!(
        sub.wire.len(),
        before,
        "unexpected bytes: {:?}",
        String::from_utf8_lossy(&sub.wire[before..])
    );
}

#[test]
fn stream_response_head_is_exact_and_nothing_precedes_the_first_event() {
    let server = Server::start(&[]);
    let mut sub = Subscriber::connect(server.addr, "head-env");
    let mut lines = sub.head.split("\r\n");
    assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
    let mut headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    headers.sort();
    let mut want: Vec<(String, String)> = [
        ("access-control-allow-origin", "*"),
        ("cache-control", "no-cache"),
        ("connection", "keep-alive"),
        ("content-type", "text/event-stream"),
        ("transfer-encoding", "chunked"),
        ("x-accel-buffering", "no"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    want.sort();
    assert_eq!(headers, want, "head: {:?}", sub.head);
    // No greeting comment, no padding: an environment with no known time gets nothing.
    assert_silent(&mut sub, Duration::from_millis(700));

    // With a known time the very first bytes after the head are the event's chunk.
    let (body, text) = at(1, 500_000);
    post(server.addr, "head-env-2", &body);
    let mut sub = Subscriber::connect(server.addr, "head-env-2");
    assert_eq!(
        sub.next(Duration::from_secs(5)),
        Some(Item::Update(text.clone()))
    );
    assert_eq!(
        String::from_utf8_lossy(&sub.wire),
        String::from_utf8_lossy(&event_chunk(&text))
    );
}

#[test]
fn times_are_the_largest_double_not_above() {
    // The double nearest to 1736705300.000003 lies above the time: the one below it is written,
    // in the queue-change response and in the event alike.
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let mut sub = Subscriber::connect(server.addr, "decimal-env");
    let r = queue_change(
        server.addr,
        "decimal-env",
        r#"{"updated_at": "2025-01-12T18:08:20.000003+00:00"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        r#"{"status": "ok", "updated_at": 1736705300.0000029}"#
    );
    assert_eq!(
        sub.next(Duration::from_secs(5)),
        Some(Item::Update("1736705300.0000029".into()))
    );
    assert_eq!(
        String::from_utf8_lossy(&sub.wire),
        String::from_utf8_lossy(&event_chunk("1736705300.0000029"))
    );
}

#[test]
fn event_bytes_are_exact() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let mut sub = Subscriber::connect(server.addr, "bytes-env");
    post(
        server.addr,
        "bytes-env",
        r#"{"updated_at": "2024-12-26T16:18:08.760412+00:00"}"#,
    );
    assert_eq!(
        sub.next(Duration::from_secs(5)),
        Some(Item::Update("1735229888.760412".into()))
    );
    let want = "51\r\nevent: environment_updated\ndata: {\"updated_at\": 1735229888.760412}\nretry: 15000\n\n\r\n";
    assert_eq!(String::from_utf8_lossy(&sub.wire), want);

    // A whole second still carries a decimal point.
    let start = sub.wire.len();
    post(
        server.addr,
        "bytes-env",
        r#"{"updated_at": "2024-12-26T16:18:09+00:00"}"#,
    );
    assert_eq!(
        sub.next(Duration::from_secs(5)),
        Some(Item::Update("1735229889.0".into()))
    );
    assert_eq!(
        String::from_utf8_lossy(&sub.wire[start..]),
        String::from_utf8_lossy(&event_chunk("1735229889.0"))
    );

    // Microseconds are kept exactly, including a single one.
    post(
        server.addr,
        "bytes-env",
        r#"{"updated_at": "2024-12-26T16:18:09.000001+00:00"}"#,
    );
    assert_eq!(
        sub.next_update(Duration::from_secs(5)).as_deref(),
        Some("1735229889.000001")
    );
}

#[test]
fn initial_event_on_connect_only_when_a_time_is_known() {
    let server = Server::start(&[]);
    let (body, text) = at(2, 28_060);
    post(server.addr, "known", &body);
    let started = Instant::now();
    let mut known = Subscriber::connect(server.addr, "known");
    assert_eq!(known.next(Duration::from_secs(5)), Some(Item::Update(text)));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the initial event took {:?}",
        started.elapsed()
    );
    // Exactly one event: the initial one is not repeated.
    assert_silent(&mut known, Duration::from_millis(700));

    let mut unknown = Subscriber::connect(server.addr, "unknown");
    assert_silent(&mut unknown, Duration::from_millis(700));
}

#[test]
fn times_never_go_backwards() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let mut sub = Subscriber::connect(server.addr, "mono");
    let (newer, newer_text) = at(30, 0);
    post(server.addr, "mono", &newer);
    assert_eq!(
        sub.next_update(Duration::from_secs(5)),
        Some(newer_text.clone())
    );
    let (older, _) = at(10, 999_999);
    post(server.addr, "mono", &older);
    post(server.addr, "mono", &newer);
    assert_silent(&mut sub, Duration::from_millis(700));

    // A late subscriber gets the newest time, not the last one POSTed.
    let mut late = Subscriber::connect(server.addr, "mono");
    assert_eq!(late.next_update(Duration::from_secs(5)), Some(newer_text));
    assert_silent(&mut late, Duration::from_millis(300));

    // The streams are still live: a newer time does go out.
    let (newest, newest_text) = at(31, 1);
    post(server.addr, "mono", &newest);
    assert_eq!(
        sub.next_update(Duration::from_secs(5)),
        Some(newest_text.clone())
    );
    assert_eq!(late.next_update(Duration::from_secs(5)), Some(newest_text));
}

#[test]
fn stream_delay_coalesces_changes() {
    let server = Server::start(&[("STREAM_DELAY", "2")]);
    let mut sub = Subscriber::connect(server.addr, "coalesce");
    // The environment has been quiet: the first change goes out at once.
    let (first, first_text) = at(1, 0);
    let posted = Instant::now();
    post(server.addr, "coalesce", &first);
    assert_eq!(sub.next_update(Duration::from_secs(5)), Some(first_text));
    let first_seen = Instant::now();
    assert!(
        first_seen - posted < Duration::from_millis(1500),
        "the first change took {:?}",
        first_seen - posted
    );
    // Three more inside the window: only the newest is delivered, when the window ends.
    for sec in 2..=4 {
        post(server.addr, "coalesce", &at(sec, 0).0);
    }
    let (_, last_text) = at(4, 0);
    // A subscriber that connects meanwhile gets the newest time at once, and only once.
    let mut late = Subscriber::connect(server.addr, "coalesce");
    assert_eq!(
        late.next(Duration::from_secs(5)),
        Some(Item::Update(last_text.clone()))
    );
    assert!(
        first_seen.elapsed() < Duration::from_millis(1500),
        "the late subscriber waited for the window"
    );
    assert_eq!(
        sub.next(Duration::from_secs(6)),
        Some(Item::Update(last_text))
    );
    let merged_seen = Instant::now();
    let waited = merged_seen - first_seen;
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "the merged change arrived {waited:?} after the first"
    );
    assert_silent(&mut sub, Duration::from_millis(300));
    assert_silent(&mut late, Duration::from_millis(100));

    // Right after an event a new window is open: the next change waits for its end too.
    let (next, next_text) = at(5, 0);
    post(server.addr, "coalesce", &next);
    for s in [&mut sub, &mut late] {
        assert_eq!(
            s.next(Duration::from_secs(6)),
            Some(Item::Update(next_text.clone()))
        );
    }
    let waited = merged_seen.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "the change after the merged one arrived {waited:?} after it"
    );
    assert_silent(&mut sub, Duration::from_millis(500));
}

#[test]
fn stream_delay_zero_sends_every_change() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let mut sub = Subscriber::connect(server.addr, "no-delay");
    for sec in 1..=4 {
        let (body, text) = at(sec, 0);
        post(server.addr, "no-delay", &body);
        assert_eq!(
            sub.next(Duration::from_millis(1500)),
            Some(Item::Update(text)),
            "change {sec}"
        );
    }
}

#[test]
fn keepalive_pings_are_exact_comments() {
    let server = Server::start(&[("KEEPALIVE_SECONDS", "1")]);
    let mut idle = Subscriber::connect(server.addr, "idle");
    assert_eq!(idle.next(Duration::from_secs(3)), Some(Item::Ping));
    assert_eq!(String::from_utf8_lossy(&idle.wire), "8\r\n: ping\n\n\r\n");

    // An environment with a time: after the initial event, only comments, never the event again.
    let (body, text) = at(5, 0);
    post(server.addr, "busy", &body);
    let mut busy = Subscriber::connect(server.addr, "busy");
    assert_eq!(busy.next(Duration::from_secs(5)), Some(Item::Update(text)));
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        let left = Duration::from_millis(3500).saturating_sub(started.elapsed());
        match busy.next(left) {
            None => break,
            Some(Item::Ping) => pings += 1,
            Some(other) => panic!("only pings expected on an idle stream, got {other:?}"),
        }
    }
    assert!(!busy.ended, "the stream ended");
    assert!((2..=5).contains(&pings), "{pings} pings in 3.5 s");
    // Every ping is the exact chunk: the wire is the event followed by ping chunks only.
    let event = event_chunk(&at(5, 0).1);
    assert!(busy.wire.starts_with(&event));
    let rest = &busy.wire[event.len()..];
    assert_eq!(
        String::from_utf8_lossy(rest),
        "8\r\n: ping\n\n\r\n".repeat(pings)
    );
}

#[test]
fn max_stream_age_ends_the_stream_cleanly() {
    let server = Server::start(&[("MAX_STREAM_AGE", "2")]);
    let addr = server.addr;
    // Each stream is watched by its own thread, so that every end is seen when it happens.
    let watchers: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let opened = Instant::now();
                let mut sub = Subscriber::connect(addr, "aging");
                assert!(sub.wait_end(Duration::from_secs(6)), "stream did not end");
                let age = opened.elapsed();
                assert!(
                    sub.wire.ends_with(b"0\r\n\r\n"),
                    "no final chunk: {:?}",
                    String::from_utf8_lossy(&sub.wire)
                );
                // After the final chunk the server hangs up, without a reset.
                let mut rest = Vec::new();
                sub.sock
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                sub.sock
                    .read_to_end(&mut rest)
                    .expect("clean close after the final chunk");
                assert!(rest.is_empty(), "bytes after the final chunk: {rest:?}");
                age
            })
        })
        .collect();
    let ages: Vec<Duration> = watchers
        .into_iter()
        .map(|w| w.join().expect("watcher"))
        .collect();
    for age in &ages {
        // 2 s with ±10% jitter is 1.8..2.2 s; the margins allow for a busy machine.
        assert!(
            *age >= Duration::from_millis(1700) && *age < Duration::from_millis(3000),
            "a stream ended after {age:?}: {ages:?}"
        );
    }
    // The jitter spreads the ends out (six uniform draws over 400 ms almost never fall
    // within 20 ms of each other).
    let spread = ages
        .iter()
        .max()
        .unwrap()
        .saturating_sub(*ages.iter().min().unwrap());
    assert!(
        spread >= Duration::from_millis(20),
        "all streams ended together: {ages:?}"
    );
}

#[test]
fn negative_max_stream_age_never_ends_the_stream() {
    let server = Server::start(&[("MAX_STREAM_AGE", "-2"), ("KEEPALIVE_SECONDS", "1")]);
    let mut sub = Subscriber::connect(server.addr, "forever");
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        let left = Duration::from_millis(3500).saturating_sub(started.elapsed());
        match sub.next(left) {
            None => break,
            Some(Item::Ping) => pings += 1,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(!sub.ended, "the stream ended after {:?}", started.elapsed());
    assert!(pings >= 2, "{pings} pings");
}

#[test]
fn http10_subscriber_gets_bare_events_until_close() {
    let server = Server::start(&[("MAX_STREAM_AGE", "2.5"), ("KEEPALIVE_SECONDS", "1")]);
    let (body, text) = at(7, 250_000);
    post(server.addr, "old-client", &body);
    let mut sub = Subscriber::connect_version(server.addr, "old-client", "1.0");
    let head = sub.head.to_ascii_lowercase();
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/event-stream\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\ncache-control: no-cache\r\n"), "{head}");
    assert!(
        head.contains("\r\naccess-control-allow-origin: *\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nx-accel-buffering: no\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: keep-alive\r\n"), "{head}");
    assert_eq!(
        sub.next(Duration::from_secs(5)),
        Some(Item::Update(text.clone()))
    );
    assert_eq!(sub.next(Duration::from_secs(3)), Some(Item::Ping));
    assert!(sub.wait_end(Duration::from_secs(5)), "the body did not end");
    // Bare text, no chunk framing, no final chunk: the body ended with the connection.
    // Pings come every 0.9..1 s and the stream ends after 2.25..2.75 s.
    let wire = String::from_utf8_lossy(&sub.wire).into_owned();
    let event = event_text(&text);
    assert!(
        (1..=3).any(|n| wire == format!("{event}{}", ": ping\n\n".repeat(n))),
        "{wire:?}"
    );
}

#[test]
fn subscribers_that_leave_do_not_disturb_the_others() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let active = |server: &Server| {
        server
            .metrics()
            .get("flagsmith_sse_subscribers_active")
            .copied()
            .unwrap_or(-1.0)
    };
    let mut subs: Vec<Option<Subscriber>> = (0..6)
        .map(|_| Some(Subscriber::connect(server.addr, "churn")))
        .collect();
    let mut other = Subscriber::connect(server.addr, "churn-other");
    // Leave from the middle, the front and the back of the subscriber list.
    for (round, leaving) in [vec![1, 3], vec![0], vec![5]].into_iter().enumerate() {
        for i in leaving {
            subs[i] = None;
        }
        let left = subs.iter().flatten().count() as f64 + 1.0;
        assert!(
            wait_until(Duration::from_secs(5), || active(&server) == left),
            "subscribers_active stays {} instead of {left}",
            active(&server)
        );
        let (body, text) = at(20 + round as u32, 0);
        post(server.addr, "churn", &body);
        for sub in subs.iter_mut().flatten() {
            assert_eq!(
                sub.next(Duration::from_secs(5)),
                Some(Item::Update(text.clone())),
                "round {round}"
            );
        }
        assert_silent(&mut other, Duration::from_millis(100));
    }
    // A newcomer takes a freed place and gets events like the rest.
    let mut newcomer = Subscriber::connect(server.addr, "churn");
    assert_eq!(
        newcomer.next(Duration::from_secs(5)),
        Some(Item::Update(at(22, 0).1))
    );
    let (body, text) = at(30, 0);
    post(server.addr, "churn", &body);
    for sub in subs.iter_mut().flatten().chain([&mut newcomer]) {
        assert_eq!(
            sub.next(Duration::from_secs(5)),
            Some(Item::Update(text.clone()))
        );
    }
}

#[test]
fn subscribers_get_exactly_their_environments_events() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let mut a1 = Subscriber::connect(server.addr, "env-a");
    let mut a2 = Subscriber::connect(server.addr, "env-a");
    let mut b = Subscriber::connect(server.addr, "env-b");

    let (body_a, text_a) = at(11, 110_000);
    post(server.addr, "env-a", &body_a);
    for sub in [&mut a1, &mut a2] {
        assert_eq!(
            sub.next(Duration::from_secs(5)),
            Some(Item::Update(text_a.clone()))
        );
    }
    assert_silent(&mut b, Duration::from_millis(500));

    let (body_b, text_b) = at(12, 120_000);
    post(server.addr, "env-b", &body_b);
    assert_eq!(b.next(Duration::from_secs(5)), Some(Item::Update(text_b)));
    assert_silent(&mut a1, Duration::from_millis(500));
    assert_silent(&mut a2, Duration::from_millis(100));
    assert_silent(&mut b, Duration::from_millis(100));
}

#[test]
fn query_string_on_the_stream_path_is_ignored() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(
        b"GET /sse/environments/query-env/stream?since=1&x=y%20z HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("stream head");
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let (body, text) = at(13, 0);
    post(server.addr, "query-env", &body);
    let chunk = event_chunk(&text);
    let ok = wait_until(Duration::from_secs(5), || {
        if got.windows(chunk.len()).any(|w| w == chunk.as_slice()) {
            return true;
        }
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if let Ok(n) = s.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        false
    });
    assert!(ok, "no event: {:?}", String::from_utf8_lossy(&got));
}
