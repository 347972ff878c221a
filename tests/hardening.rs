//! SPEC section 4 against the real binary over real sockets: slow senders, oversized and
//! hostile input, slow readers, descriptor exhaustion and peers that vanish. Shutdown is in
//! `shutdown.rs`. Timing-sensitive tests print what they measured.
//!
//! The tests here take turns (one lock): several of them load the machine with a thousand
//! connections and measure latency, which tests running beside them would distort.

mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Base of the epoch-second times these tests send.
const BASE: u64 = 1_700_000_000;

fn subscribers(server: &Server) -> f64 {
    metric(server, "flagsmith_sse_subscribers_active")
}

/// Waits until the server holds `fds` descriptors (or fewer); panics with the count if not.
#[track_caller]
fn wait_fds(server: &Server, fds: usize, timeout: Duration) {
    let ok = wait_until(timeout, || server.open_fds() <= fds);
    assert!(
        ok,
        "server holds {} descriptors, expected {fds}",
        server.open_fds()
    );
}

/// The server's descriptors once they have not changed for 200 ms (call with no client open).
fn settled_fds(server: &Server) -> usize {
    let mut last = server.open_fds();
    let mut since = Instant::now();
    wait_until(Duration::from_secs(3), || {
        let now = server.open_fds();
        if now != last {
            last = now;
            since = Instant::now();
        }
        since.elapsed() >= Duration::from_millis(200)
    });
    last
}

fn alive(server: &mut Server) -> bool {
    server.wait_exit(Duration::ZERO).is_none()
        && request(
            server.addr,
            b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .status
            == 200
}

// ----- 1. slow senders ---------------------------------------------------------------------

#[test]
fn request_not_complete_in_time_gets_408_and_is_closed() {
    let _turn = serial();
    let server = Server::start(&[("REQUEST_TIMEOUT_SECONDS", "1")]);
    let post_head = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: 40\r\n\r\n{{\"upd"
    );
    let cases: [(&str, &[u8]); 3] = [
        ("a partial head", b"GET /health HTTP/1.1\r\nHost: t"),
        ("nothing at all", b""),
        ("a head without all of its body", post_head.as_bytes()),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let t0 = Instant::now();
        s.write_all(bytes).unwrap();
        let r = read_response(&mut s);
        let took = t0.elapsed();
        println!("{what}: {} after {took:?}", r.status);
        assert_eq!(r.status, 408, "{what}: {}", r.text());
        assert_eq!(r.header("connection"), Some("close"));
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{what}: 408 after {took:?} with a 1 s request timeout"
        );
        let rest = read_to_eof(&mut s, Duration::from_secs(5));
        assert!(
            matches!(&rest, Ok(v) if v.is_empty()),
            "{what}: not closed gracefully: {rest:?}"
        );
    }

    // A client that keeps sending, one byte every 100 ms, does not extend its deadline.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let mut w = s.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let t0 = Instant::now();
    let trickler = std::thread::spawn(move || {
        let line = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in line {
            if stop2.load(Ordering::SeqCst) || w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = read_response(&mut s);
    let took = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    println!("a trickling client: {} after {took:?}", r.status);
    assert_eq!(r.status, 408);
    assert!(took < Duration::from_secs(4), "408 after {took:?}");
    assert!(rejected(&server, "timeout") >= 4.0);
}

#[test]
fn a_thousand_trickling_clients_do_not_delay_events() {
    let _turn = serial();
    const TRICKLERS: usize = 1000;
    let server = Server::start(&[
        ("REQUEST_TIMEOUT_SECONDS", "60"),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
        ("LOG_LEVEL", "info"),
    ]);
    let mut sub = Subscriber::connect(server.addr, "fast");
    let mut poster = Poster::connect(server.addr);
    let mut secs = BASE;
    // One sample every `pace`, so that the samples span the trickling.
    let mut measure = |n: usize, pace: Duration| -> Vec<Duration> {
        (0..n)
            .map(|_| {
                secs += 1;
                let t0 = Instant::now();
                let r = poster.post("fast", &update_body(secs));
                assert_eq!(r.status, 200, "{}", r.text());
                let got = sub.next_update(Duration::from_secs(5));
                assert_eq!(got, Some(update_text(secs)));
                let took = t0.elapsed();
                std::thread::sleep(pace.saturating_sub(took));
                took
            })
            .collect()
    };
    let alone = measure(30, Duration::from_millis(20));

    let socks: Vec<TcpStream> = (0..TRICKLERS)
        .map(|_| TcpStream::connect(server.addr).expect("connect a trickler"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let trickler = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            let line = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let mut socks = socks;
            let started = Instant::now();
            // One byte a second for each, sent in ten slices per second.
            for (round, &byte) in line.iter().enumerate() {
                for slice in socks.chunks_mut(TRICKLERS / 10) {
                    if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
                        return socks;
                    }
                    for s in slice {
                        s.write_all(&[byte]).expect("trickle a byte");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                rounds.store(round + 1, Ordering::SeqCst);
            }
            socks
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || rounds.load(Ordering::SeqCst)
            >= 2),
        "the tricklers did not get going"
    );
    let open = metric(&server, "flagsmith_sse_connections_open");
    assert!(
        open >= (TRICKLERS + 2) as f64,
        "only {open} connections open while {TRICKLERS} trickle"
    );
    let loaded = measure(60, Duration::from_millis(70));
    let trickled = rounds.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let socks = trickler.join().unwrap();
    assert!(trickled >= 3, "tricklers sent only {trickled} bytes each");
    let open = metric(&server, "flagsmith_sse_connections_open");
    assert!(
        open >= (TRICKLERS + 2) as f64,
        "tricklers were dropped before their timeout: {open} open"
    );
    drop(socks);

    let (a_med, a_max) = median_max(&alone);
    let (l_med, l_max) = median_max(&loaded);
    println!(
        "queue-change to event: alone median {a_med:?} max {a_max:?}; with {TRICKLERS} tricklers \
         (each sent {trickled} bytes) median {l_med:?} max {l_max:?}"
    );
    assert!(
        l_med <= a_med + Duration::from_millis(50),
        "tricklers delay events: median {l_med:?} against {a_med:?} alone"
    );
    assert!(
        l_max < Duration::from_millis(500),
        "an event took {l_max:?}"
    );
}

// ----- 2. oversized and malformed input -----------------------------------------------------

fn chunked_post(data_len: usize) -> Vec<u8> {
    let mut v = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    let mut left = data_len;
    while left > 0 {
        let n = left.min(16 * 1024);
        v.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        v.extend(std::iter::repeat_n(b' ', n));
        v.extend_from_slice(b"\r\n");
        left -= n;
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}

#[test]
fn oversized_and_malformed_requests_get_their_status_and_a_graceful_close() {
    let _turn = serial();
    let mut server = Server::start(&[]);
    let big_header = |n: usize, end: bool| {
        let mut v = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
        v.extend(std::iter::repeat_n(b'a', n));
        if end {
            v.extend_from_slice(b"\r\n\r\n");
        }
        v
    };
    let mut many_headers = b"GET /health HTTP/1.1\r\nHost: t\r\n".to_vec();
    for i in 0..100 {
        many_headers.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many_headers.extend_from_slice(b"\r\n");
    let mut length_70k = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: 70000\r\n\r\n"
    )
    .into_bytes();
    length_70k.extend(std::iter::repeat_n(b' ', 70_000));
    let tls_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x5e, 0x91, 0x1c, 0x02,
        0x7a, 0x33, 0x00, 0x00, 0x20, 0xc0, 0x2b, 0xc0, 0x2f,
    ];
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("a 9 KiB header", big_header(9 * 1024, true), 431),
        ("20 KiB of head that never ends", big_header(20 * 1024, false), 431),
        ("100 header lines", many_headers, 431),
        ("Content-Length: 70000", length_70k, 413),
        ("a 70 KiB chunked body", chunked_post(70 * 1024), 413),
        ("garbage", b"\x00\x01\x02 hello there\r\n\r\n".to_vec(), 400),
        ("a TLS handshake", tls_hello.to_vec(), 400),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), 400),
        (
            "Content-Length and Transfer-Encoding",
            b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a malformed chunk size",
            format!("POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").into_bytes(),
            400,
        ),
        (
            "a request line without a version",
            b"GET /health\r\n\r\n".to_vec(),
            400,
        ),
    ];
    for (what, bytes, status) in &cases {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(bytes).expect("send");
        let r = read_response(&mut s);
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        assert_eq!(r.header("connection"), Some("close"), "{what}");
        s.shutdown(Shutdown::Write).unwrap();
        let rest = read_to_eof(&mut s, Duration::from_secs(5));
        assert!(
            matches!(&rest, Ok(v) if v.is_empty()),
            "{what}: not closed gracefully: {rest:?}"
        );
    }
    // A malformed JSON body is answered and the connection stays usable.
    let mut p = Poster::connect(server.addr);
    assert_eq!(p.post("k", "{\"updated_at\": ").status, 400);
    assert_eq!(p.post("k", &update_body(BASE)).status, 200);
    assert!(rejected(&server, "bad_request") >= 8.0);
    assert!(alive(&mut server));
}

#[test]
fn refused_connections_release_their_buffers() {
    let _turn = serial();
    const CLIENTS: usize = 300;
    let server = Server::start(&[("LOG_LEVEL", "info")]);
    let fds0 = settled_fds(&server);
    let hostile = |i: usize| -> Vec<u8> {
        if i.is_multiple_of(2) {
            let mut v = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ".to_vec();
            v.extend(std::iter::repeat_n(b'a', 60 * 1024));
            v
        } else {
            chunked_post(70 * 1024)
        }
    };
    // Warm up the allocator with a few, then measure with many held open.
    for i in 0..20 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(&hostile(i)).unwrap();
        assert!(matches!(read_response(&mut s).status, 413 | 431));
    }
    let rss0 = server.proc_status_kb("VmRSS").unwrap();
    let mut held = Vec::new();
    for i in 0..CLIENTS {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(&hostile(i)).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, if i.is_multiple_of(2) { 431 } else { 413 });
        held.push(s);
    }
    let rss1 = server.proc_status_kb("VmRSS").unwrap();
    let grown = rss1.saturating_sub(rss0);
    println!(
        "RSS {rss0} kB before, {rss1} kB with {CLIENTS} refused clients holding their \
         connections ({grown} kB more; ~{} kB if their buffers were kept)",
        CLIENTS * 64
    );
    assert!(
        grown < 8 * 1024,
        "refused connections keep their buffers: RSS grew {grown} kB"
    );
    drop(held);
    wait_fds(&server, fds0, Duration::from_secs(5));
}

/// xorshift64*: reproducible noise.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn hostile_bytes_never_crash_or_stall_the_server() {
    let _turn = serial();
    let mut server = Server::start(&[
        ("REQUEST_TIMEOUT_SECONDS", "1"),
        ("MAX_STREAM_AGE", "1"),
        ("LOG_LEVEL", "info"),
    ]);
    let fds0 = settled_fds(&server);
    let post = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: 26\r\n\r\n{{\"updated_at\": 1700000000}}"
    );
    let chunked = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n5\r\n{{\"upd\r\n15\r\nated_at\": 1700000001}}\r\n0\r\n\r\n"
    );
    let templates: Vec<Vec<u8>> = vec![
        post.into_bytes(),
        chunked.into_bytes(),
        stream_request("k").into_bytes(),
        b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.0\r\n\r\n".to_vec(),
        b"OPTIONS /sse/environments/k/stream HTTP/1.1\r\nHost: t\r\nAccess-Control-Request-Headers: x\r\n\r\n"
            .to_vec(),
    ];
    let specials: &[u8] = b"\r\n\0\xff: ;0123456789abcdefxX{}\"\\-.+";
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let addr = server.addr;
            let templates = templates.clone();
            std::thread::spawn(move || {
                let mut rng = Noise(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                // All of a thread's clients at once, then every answer: the waits overlap.
                let mut sent = Vec::new();
                for _ in 0..100 {
                    let mut v = match rng.below(4) {
                        0 => (0..rng.below(2000)).map(|_| rng.next() as u8).collect(),
                        _ => templates[rng.below(templates.len())].clone(),
                    };
                    for _ in 0..rng.below(8) {
                        if v.is_empty() {
                            break;
                        }
                        let at = rng.below(v.len());
                        match rng.below(4) {
                            0 => v[at] = specials[rng.below(specials.len())],
                            1 => v.insert(at, specials[rng.below(specials.len())]),
                            2 => {
                                v.remove(at);
                            }
                            _ => v.truncate(at),
                        }
                    }
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        panic!("connect failed: the server is gone")
                    };
                    let _ = s.write_all(&v);
                    if rng.below(2) == 0 {
                        let _ = s.shutdown(Shutdown::Write);
                    }
                    sent.push((s, v));
                }
                // Whatever the answer, it must end: by a response and close, a 408, or the end
                // of a short-lived stream.
                let t0 = Instant::now();
                for (mut s, v) in sent {
                    let end = read_to_eof(&mut s, Duration::from_secs(6));
                    assert!(
                        !matches!(&end, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
                        "no end after {:?} for {:?}",
                        t0.elapsed(),
                        String::from_utf8_lossy(&v)
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client thread failed");
    }
    assert!(alive(&mut server), "server died:\n{}", server.log());
    assert!(!server.log().contains("panicked"));
    wait_fds(&server, fds0, Duration::from_secs(5));
}

// ----- 3. slow readers ----------------------------------------------------------------------

/// Reads what arrives on `s` until nothing has come for `quiet` (at most `limit` in all) and
/// returns the `updated_at` texts found in it, in order, and the byte count.
fn drain_updates(s: &mut TcpStream, quiet: Duration, limit: Duration) -> (Vec<String>, usize) {
    let deadline = Instant::now() + limit;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    s.set_read_timeout(Some(quiet)).unwrap();
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let updates = text
        .split("{\"updated_at\": ")
        .skip(1)
        .filter_map(|p| p.split_once('}').map(|(v, _)| v.to_owned()))
        .collect();
    (updates, raw.len())
}

#[test]
fn a_stalled_reader_holds_one_event_is_dropped_and_slows_nobody() {
    let _turn = serial();
    const CROWD: usize = 1000;
    const UPDATES: u64 = 200;
    let keepalive = Duration::from_secs(4);
    let server = Server::start(&[
        ("STREAM_DELAY", "0"),
        ("KEEPALIVE_SECONDS", "4"),
        ("MAX_STREAM_AGE", "-1"),
        ("LOG_LEVEL", "info"),
    ]);
    let key = "crowd";
    // Two readers with a tiny receive window: `never` never reads, `late` reads after the burst.
    let mut never = connect_small_rcvbuf(server.addr, 1024);
    never.write_all(stream_request(key).as_bytes()).unwrap();
    let mut late = connect_small_rcvbuf(server.addr, 1024);
    late.write_all(stream_request(key).as_bytes()).unwrap();
    let crowd = Crowd::connect(server.addr, key, CROWD);
    assert!(wait_until(Duration::from_secs(5), || subscribers(&server)
        == (CROWD + 2) as f64));
    let rss0 = server.proc_status_kb("VmRSS").unwrap();

    let last = update_text(BASE + UPDATES);
    let reader = {
        let last = last.clone();
        let mut crowd = crowd;
        std::thread::spawn(move || {
            let ok = crowd.pump_until(Duration::from_secs(60), |c| c.all_have(&last));
            (crowd, ok, Instant::now())
        })
    };
    let mut poster = Poster::connect(server.addr);
    let t_first = Instant::now();
    for i in 1..=UPDATES {
        let r = poster.post(key, &update_body(BASE + i));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let t_last = Instant::now();
    let (crowd, ok, t_all) = reader.join().unwrap();
    let ended = crowd.ended.iter().filter(|&&e| e).count();
    assert!(ok, "the crowd did not all get the newest update");
    assert_eq!(ended, 0, "{ended} of the crowd lost their stream");
    let lag = t_all.saturating_duration_since(t_last);
    let counts: Vec<usize> = (0..crowd.len()).map(|i| crowd.count(i)).collect();
    println!(
        "{UPDATES} updates posted in {:?}; the last reached all {CROWD} readers {lag:?} after \
         its 200; each reader saw {}..={} events",
        t_last - t_first,
        counts.iter().min().unwrap(),
        counts.iter().max().unwrap()
    );
    assert!(
        lag < Duration::from_secs(2),
        "the crowd got the last update {lag:?} late"
    );

    // `late` now reads: what the kernel held, then at most one more event, the newest.
    let (seen, bytes) = drain_updates(
        &mut late,
        Duration::from_millis(300),
        Duration::from_secs(5),
    );
    let values: Vec<u64> = seen
        .iter()
        .map(|v| v.trim_end_matches(".25").parse().expect("an update"))
        .collect();
    println!(
        "the late reader got {} of {UPDATES} updates ({bytes} bytes), last {:?}",
        values.len(),
        seen.last()
    );
    assert_eq!(
        seen.last(),
        Some(&last),
        "the late reader missed the newest"
    );
    assert!(
        values.windows(2).all(|w| w[0] < w[1]),
        "out of order: {values:?}"
    );
    // Everything before the newest is what the kernel buffered before the stall (a fan-out
    // still under way when a newer time comes passes subscribers on with the newer one, so the
    // run may skip times); after the stall the newest replaced the rest instead of queueing
    // behind: the run ends well short of it.
    let run = &values[..values.len() - 1];
    assert!(
        run.last().is_some_and(|&v| v + 10 < BASE + UPDATES),
        "the late reader got more than one event after its stall: {values:?}"
    );
    assert!(
        values.len() < UPDATES as usize,
        "the kernel absorbed all {UPDATES} events; the stall was not exercised"
    );

    // `never` is dropped once stalled for the keep-alive interval; `late` is not.
    let dropped = wait_until(keepalive * 3, || rejected(&server, "stalled") >= 1.0);
    let after = t_first.elapsed();
    let after_last = t_last.elapsed();
    assert!(
        dropped,
        "the stalled reader was not dropped after {after:?}"
    );
    println!(
        "the stalled reader was dropped {after:?} after the first update, {after_last:?} after \
         the last"
    );
    // It stalled during the burst: it goes a keep-alive interval later, not two.
    assert!(
        after_last <= keepalive + Duration::from_millis(1500),
        "dropped {after_last:?} after the last update, with a keep-alive interval of {keepalive:?}"
    );
    assert!(
        after >= keepalive - Duration::from_millis(100),
        "dropped after {after:?}, before the keep-alive interval"
    );
    assert_eq!(rejected(&server, "stalled"), 1.0);
    assert_eq!(subscribers(&server), (CROWD + 1) as f64);
    let rss1 = server.proc_status_kb("VmRSS").unwrap();
    println!("RSS {rss0} kB with the subscribers, {rss1} kB after the burst");
    assert!(rss1 < rss0 + 4 * 1024, "RSS grew from {rss0} to {rss1} kB");
    drop(never);
    drop(crowd);
}

// ----- 4. descriptor exhaustion and MAX_CONNECTIONS -----------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Stream,
    Busy,
    Closed,
    Nothing,
}

/// Connects `n` subscribers and sorts what each got within `timeout`.
fn storm(addr: SocketAddr, key: &str, n: usize, timeout: Duration) -> Vec<(Outcome, TcpStream)> {
    let req = stream_request(key);
    let mut socks: Vec<(Option<Outcome>, Vec<u8>, TcpStream)> = Vec::new();
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                let sent = s.write_all(req.as_bytes()).is_ok();
                s.set_nonblocking(true).unwrap();
                socks.push(((!sent).then_some(Outcome::Closed), Vec::new(), s));
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        for (out, got, s) in socks.iter_mut().filter(|(o, _, _)| o.is_none()) {
            match s.read(&mut buf) {
                Ok(0) => *out = Some(Outcome::Closed),
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *out = Some(Outcome::Closed),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                *out = Some(if got.starts_with(b"HTTP/1.1 200") {
                    Outcome::Stream
                } else if got.starts_with(b"HTTP/1.1 503") {
                    Outcome::Busy
                } else {
                    panic!("unexpected answer {:?}", String::from_utf8_lossy(got))
                });
            }
        }
        if socks.iter().all(|(o, _, _)| o.is_some()) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    socks
        .into_iter()
        .map(|(o, _, s)| (o.unwrap_or(Outcome::Nothing), s))
        .collect()
}

fn tally(v: &[(Outcome, TcpStream)]) -> [usize; 4] {
    let mut t = [0; 4];
    for (o, _) in v {
        t[*o as usize] += 1;
    }
    t
}

/// CPU time the server uses over two idle seconds (a measuring window, not a wait).
fn idle_cpu(server: &Server) -> Duration {
    let c0 = server.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    server.cpu_time().saturating_sub(c0)
}

fn max_connections_from_log(server: &Server) -> usize {
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("MAX_CONNECTIONS "))
        .expect("the start-up log names MAX_CONNECTIONS");
    line.rsplit("MAX_CONNECTIONS ")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .expect("a number")
}

/// The shared part of the descriptor tests: existing clients are served while `storm` clients
/// are refused, the server idles, and it accepts again once some clients leave.
fn serves_refuses_and_recovers(server: &Server, storm_size: usize, expect_fd_refusals: bool) {
    let mut sub = Subscriber::connect(server.addr, "held");
    let mut poster = Poster::connect(server.addr);
    let t0 = Instant::now();
    let clients = storm(server.addr, "storm", storm_size, Duration::from_secs(5));
    let [streams, busy, closed, nothing] = tally(&clients);
    println!(
        "{storm_size} clients: {streams} streams, {busy} got 503, {closed} closed, {nothing} \
         no answer, all within {:?}",
        t0.elapsed()
    );
    assert_eq!(nothing, 0, "clients left hanging");
    assert!(streams > 0, "no client was served");
    assert!(busy > 0, "no client was refused with 503");
    let cpu = idle_cpu(server);
    println!("CPU over 2 s idle at the limit: {cpu:?}");
    assert!(
        cpu < Duration::from_millis(200),
        "the server spins: {cpu:?}"
    );

    let r = poster.post("held", &update_body(BASE + 1));
    assert_eq!(r.status, 200);
    assert_eq!(
        sub.next_update(Duration::from_secs(2)),
        Some(update_text(BASE + 1))
    );

    // Free some descriptors: new clients are taken again at once.
    let mut clients = clients;
    let mut freed = 0;
    clients.retain(|(o, _)| {
        if *o == Outcome::Stream && freed < 10 {
            freed += 1;
            false
        } else {
            true
        }
    });
    let t1 = Instant::now();
    let mut accepted = 0;
    while accepted < 5 && t1.elapsed() < Duration::from_secs(5) {
        let again = storm(server.addr, "again", 1, Duration::from_secs(2));
        if again[0].0 == Outcome::Stream {
            accepted += 1;
            clients.extend(again);
        }
    }
    println!(
        "after {freed} clients left, {accepted} new ones were taken within {:?}",
        t1.elapsed()
    );
    assert_eq!(
        accepted, 5,
        "not accepting again after descriptors came free"
    );
    if expect_fd_refusals {
        assert!(rejected(server, "no_descriptors") > 0.0);
    }
}

#[test]
fn low_open_file_limit_refuses_extras_promptly_and_recovers() {
    let _turn = serial();
    let server = Server::start_with(&[("LOG_LEVEL", "info")], |cmd| limit_nofile(cmd, 64, 64));
    let max = max_connections_from_log(&server);
    println!("open-file limit 64: MAX_CONNECTIONS {max}");
    assert!(
        (16..64).contains(&max),
        "MAX_CONNECTIONS {max} does not fit an open-file limit of 64"
    );
    serves_refuses_and_recovers(&server, 200, false);
    assert!(rejected(&server, "max_connections") > 0.0);
}

#[test]
fn out_of_descriptors_refuses_promptly_without_spinning_and_recovers() {
    let _turn = serial();
    let server = Server::start_with(&[("LOG_LEVEL", "info")], |cmd| limit_nofile(cmd, 64, 64));
    // Descriptors run out below MAX_CONNECTIONS: lower the limit under the running server.
    let max = max_connections_from_log(&server);
    set_nofile_of(server.pid(), 28, 64);
    println!("MAX_CONNECTIONS {max}, open-file limit now 28");
    serves_refuses_and_recovers(&server, 200, true);
}

#[test]
fn max_connections_is_enforced_with_503() {
    let _turn = serial();
    let server = Server::start(&[("MAX_CONNECTIONS", "20"), ("LOG_LEVEL", "info")]);
    let mut crowd = Crowd::connect(server.addr, "k", 20);
    let t0 = Instant::now();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(stream_request("k").as_bytes()).unwrap();
    let r = read_response(&mut s);
    println!("the 21st client got {} after {:?}", r.status, t0.elapsed());
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(t0.elapsed() < Duration::from_secs(1));
    let rest = read_to_eof(&mut s, Duration::from_secs(5));
    assert!(matches!(&rest, Ok(v) if v.is_empty()), "{rest:?}");
    crowd.close(0);
    crowd.close(1);
    // One slot for the next subscriber, one for the scrape.
    assert!(
        wait_until(Duration::from_secs(2), || {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            read_response(&mut s).status == 200
        }),
        "not accepting again after clients left"
    );
    assert!(rejected(&server, "max_connections") >= 1.0);
}

// ----- 5. peers that vanish -----------------------------------------------------------------

#[test]
fn resets_in_the_middle_of_requests_and_frames_leak_nothing() {
    let _turn = serial();
    let server = Server::start(&[
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
        ("LOG_LEVEL", "info"),
    ]);
    let fds0 = settled_fds(&server);
    let post = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: 40\r\n\r\n{{\"upd"
    );
    for i in 0..20u32 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let bytes: &[u8] = if i.is_multiple_of(2) {
            b"GET /sse/environments/k/str"
        } else {
            post.as_bytes()
        };
        s.write_all(bytes).unwrap();
        reset(s);
    }
    // A subscriber that stops reading and resets while frames are half written to it.
    let mut watcher = Subscriber::connect(server.addr, "k");
    let mut stalled = connect_small_rcvbuf(server.addr, 1024);
    stalled.write_all(stream_request("k").as_bytes()).unwrap();
    assert!(wait_until(Duration::from_secs(5), || subscribers(&server) == 2.0));
    let mut poster = Poster::connect(server.addr);
    for i in 1..=300 {
        assert_eq!(poster.post("k", &update_body(BASE + i)).status, 200);
    }
    reset(stalled);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || subscribers(&server) == 1.0),
        "the reset subscriber is still counted"
    );
    println!("a reset subscriber was released after {:?}", t0.elapsed());
    let mut last = None;
    while let Some(v) = watcher.next_update(Duration::from_millis(500)) {
        last = Some(v);
    }
    assert_eq!(last, Some(update_text(BASE + 300)));
    drop(watcher);
    drop(poster);
    wait_fds(&server, fds0, Duration::from_secs(5));
}

#[test]
fn half_closed_clients_are_answered_and_released() {
    let _turn = serial();
    let server = Server::start(&[("STREAM_DELAY", "0"), ("LOG_LEVEL", "info")]);
    let fds0 = settled_fds(&server);

    // A client that got an error and never closes its side is let go after a short linger.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"\x00garbage\r\n\r\n").unwrap();
    let t0 = Instant::now();
    assert_eq!(read_response(&mut s).status, 400);
    assert!(matches!(read_to_eof(&mut s, Duration::from_secs(5)), Ok(v) if v.is_empty()));
    assert_eq!(
        server.open_fds(),
        fds0 + 1,
        "the refused connection is not held"
    );
    wait_fds(&server, fds0, Duration::from_secs(5));
    println!(
        "a refused client that kept its side open was let go after {:?}",
        t0.elapsed()
    );
    drop(s);

    let mut watcher = Subscriber::connect(server.addr, "k");
    // Requests followed by FIN are still answered, pipelined ones too.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(
        b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let r1 = read_response(&mut s);
    let r2 = read_response(&mut s);
    assert_eq!((r1.status, r2.status), (200, 200));
    assert!(matches!(read_to_eof(&mut s, Duration::from_secs(5)), Ok(v) if v.is_empty()));

    let body = update_body(BASE + 7);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(
        format!(
            "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_response(&mut s).status, 200);
    assert_eq!(
        watcher.next_update(Duration::from_secs(2)),
        Some(update_text(BASE + 7))
    );

    // A subscriber that half-closes has gone: its stream is ended and released.
    let mut sub = Subscriber::connect(server.addr, "k");
    assert_eq!(
        sub.next_update(Duration::from_secs(2)),
        Some(update_text(BASE + 7))
    );
    sub.sock.shutdown(Shutdown::Write).unwrap();
    assert!(sub.wait_end(Duration::from_secs(3)), "stream not ended");
    assert!(wait_until(Duration::from_secs(2), || subscribers(&server) == 1.0));

    drop(sub);
    drop(watcher);
    wait_fds(&server, fds0, Duration::from_secs(5));
}

#[test]
fn a_queue_change_whose_client_vanished_is_still_stored_and_delivered() {
    let _turn = serial();
    const N: u64 = 100;
    let server = Server::start(&[("STREAM_DELAY", "0"), ("LOG_LEVEL", "info")]);
    let fds0 = settled_fds(&server);
    let mut watchers: Vec<Subscriber> = (0..5)
        .map(|i| Subscriber::connect(server.addr, &format!("gone-{i}")))
        .collect();
    for i in 0..N {
        let mut s = TcpStream::connect(server.addr).unwrap();
        // One exchange first, so that the server has the connection before it vanishes.
        s.write_all(b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut s).status, 200);
        let body = update_body(BASE + i);
        s.write_all(
            format!(
                "POST /sse/environments/gone-{i}/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        if i.is_multiple_of(2) {
            reset(s);
        } else {
            drop(s);
        }
    }
    let ok = "flagsmith_sse_queue_changes_total{result=\"ok\"}";
    assert!(
        wait_until(Duration::from_secs(5), || metric(&server, ok) == N as f64),
        "stored {} of {N}",
        metric(&server, ok)
    );
    for (i, w) in watchers.iter_mut().enumerate() {
        assert_eq!(
            w.next_update(Duration::from_secs(2)),
            Some(update_text(BASE + i as u64))
        );
    }
    for i in 0..N {
        let mut s = Subscriber::connect(server.addr, &format!("gone-{i}"));
        assert_eq!(
            s.next_update(Duration::from_secs(2)),
            Some(update_text(BASE + i)),
            "gone-{i}"
        );
    }
    drop(watchers);
    wait_fds(&server, fds0, Duration::from_secs(5));
}

/// A reader whose unread events all fit in the kernel's buffers (so nothing is left queued in
/// the server's user space) is still found stalled: the bytes sit unacknowledged behind a closed
/// window, and it is dropped about a keep-alive interval later.
#[test]
fn a_reader_stalled_behind_kernel_buffers_is_dropped() {
    let _serial = serial();
    let server = Server::start(&[
        ("KEEPALIVE_SECONDS", "2"),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
    ]);
    let mut stalled = connect_small_rcvbuf(server.addr, 1024);
    stalled
        .write_all(b"GET /sse/environments/kernel/stream HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || subscribers(&server) == 1.0));
    // A few events: more than the reader's window takes, fewer than fill the server's send buffer.
    for i in 0..20u64 {
        let body = format!("{{\"updated_at\": {}.5}}", 1_700_000_000 + i);
        assert_eq!(queue_change(server.addr, "kernel", &body).status, 200);
    }
    let sent = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || subscribers(&server) == 0.0),
        "the stalled reader was not dropped"
    );
    let after = sent.elapsed();
    println!(
        "stalled reader dropped {:.2} s after its last event (KEEPALIVE_SECONDS=2)",
        after.as_secs_f64()
    );
    assert!(
        after >= Duration::from_millis(1500),
        "dropped before a keep-alive interval passed: {after:?}"
    );
    assert_eq!(rejected(&server, "stalled"), 1.0);
    // A reader that keeps up is not touched.
    let mut healthy = Subscriber::connect(server.addr, "kernel");
    assert!(healthy.next_update(Duration::from_secs(5)).is_some());
    assert!(
        healthy.next(Duration::from_secs(5)).is_some(),
        "no ping for the healthy reader"
    );
    assert_eq!(subscribers(&server), 1.0);
}
