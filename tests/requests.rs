//! SPEC section 4 on the request path, against the real binary over real sockets: bodies only
//! where one is expected, the stream input cap, the process-wide budget for buffered request
//! bytes, the HTTP/1.1 details, and pipelined requests answered together.
//!
//! The tests here take turns (one lock): the budget test opens two thousand connections and
//! measures resident memory, which tests running beside it would distort.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

fn queue_change_head(auth: &str, framing: &str) -> String {
    format!("POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\n{auth}{framing}\r\n\r\n")
}

#[test]
fn a_body_is_refused_unread_wherever_none_is_expected() {
    let _turn = serial();
    let server = Server::start(&[("LOG_LEVEL", "info")]);
    // Only the heads are sent: the answers come without the server waiting for the bodies.
    let cases = [
        (
            "GET /health/liveness/ HTTP/1.1\r\nHost: t\r\nContent-Length: 50000\r\n\r\n",
            400,
        ),
        (
            "GET /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            "GET /sse/environments/k/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n",
            400,
        ),
        (
            "OPTIONS /health HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n",
            400,
        ),
        (
            "POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: 60000\r\n\r\n",
            400,
        ),
        (
            "POST /metrics HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            "PUT /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n",
            400,
        ),
        (
            "GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n",
            400,
        ),
    ];
    let before = rejected(&server, "bad_request");
    for (head, status) in cases {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, status, "{head:?}: {}", r.text());
        assert!(r.text().contains("queue-change"), "{head:?}: {}", r.text());
        assert_eq!(r.header("connection"), Some("close"), "{head:?}");
        // Closed without the body: EOF (not a reset) once we stop sending.
        s.shutdown(Shutdown::Write).unwrap();
        let rest = read_to_eof(&mut s, Duration::from_secs(5));
        assert!(matches!(&rest, Ok(v) if v.is_empty()), "{head:?}: {rest:?}");
    }
    assert_eq!(rejected(&server, "bad_request") - before, 8.0);

    // A queue-change without the right token is refused before its body is read.
    for auth in ["", "Authorization: Token wrong\r\n"] {
        for framing in ["Content-Length: 60000", "Transfer-Encoding: chunked"] {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(queue_change_head(auth, framing).as_bytes())
                .unwrap();
            let r = read_response(&mut s);
            assert_eq!(r.status, 401, "{auth:?} {framing}");
            assert_eq!(r.header("connection"), Some("close"));
        }
    }
    // With the right token the body is awaited and read.
    let body = r#"{"updated_at": 1700000000}"#;
    let mut s = TcpStream::connect(server.addr).unwrap();
    let head = queue_change_head(
        &format!("Authorization: Token {TOKEN}\r\n"),
        &format!("Content-Length: {}", body.len()),
    );
    s.write_all(head.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(s.read(&mut byte), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "answered before the body"
    );
    s.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).status, 200);
}

#[test]
fn a_subscriber_that_keeps_sending_is_disconnected() {
    let _turn = serial();
    let server = Server::start(&[("LOG_LEVEL", "info"), ("STREAM_DELAY", "0")]);
    // A little input after the request is tolerated: the stream goes on.
    let mut polite = Subscriber::connect(server.addr, "k");
    polite.sock.write_all(&[b'x'; 1024]).unwrap();
    // More than 4 KiB, in pieces, ends the stream.
    let mut chatty = Subscriber::connect(server.addr, "k");
    for _ in 0..5 {
        chatty.sock.write_all(&[b'y'; 1000]).unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(5), || rejected(&server, "stream_input")
            == 1.0),
        "not counted"
    );
    // The server closed it: reading ends (EOF or a reset, since its input was left unread).
    chatty
        .sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sink = Vec::new();
    let end = chatty.sock.read_to_end(&mut sink);
    assert!(
        !matches!(&end, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "the stream was not closed: {end:?}"
    );
    post_ok(
        server.addr,
        "k",
        1_700_000_000_000_000,
        1_700_000_000_000_000,
    );
    assert_eq!(
        polite.next_update(Duration::from_secs(5)),
        Some(epoch_text(1_700_000_000_000_000))
    );
    // A request pipelined behind a subscription counts too.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let mut wire = stream_request("k").into_bytes();
    wire.extend(std::iter::repeat_n(b'z', 5000));
    s.write_all(&wire).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || rejected(&server, "stream_input")
            == 2.0),
        "input pipelined behind a subscription not counted"
    );
}

/// `n` connections each sending a queue-change head announcing `len` body bytes and `sent` of
/// them; returns the sockets.
fn partial_bodies(server: &Server, n: usize, len: usize, sent: usize) -> Vec<TcpStream> {
    let mut wire = queue_change_head(
        &format!("Authorization: Token {TOKEN}\r\n"),
        &format!("Content-Length: {len}"),
    )
    .into_bytes();
    wire.extend(std::iter::repeat_n(b' ', sent));
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).expect("connect");
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&wire).expect("send");
            s
        })
        .collect()
}

/// Whether a response has arrived on `s` (without blocking); its first bytes if so.
fn answered(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let got = match s.read(&mut buf) {
        Ok(n) if n > 0 => Some(buf[..n].to_vec()),
        _ => None,
    };
    s.set_nonblocking(false).unwrap();
    got
}

#[test]
fn buffered_requests_stay_within_their_budget_and_memory_comes_back() {
    let _turn = serial();
    const CLIENTS: usize = 2000;
    const BUDGET: usize = 8 << 20;
    const LEN: usize = 61_440;
    const SENT: usize = 60_000;
    let server = Server::start(&[
        ("LOG_LEVEL", "info"),
        ("MAX_BUFFERED_REQUEST_BYTES", &BUDGET.to_string()),
        ("REQUEST_TIMEOUT_SECONDS", "60"),
    ]);
    // Warm up: a few whole bodies, so that the baseline includes what any request costs once.
    for _ in 0..3 {
        let mut s = partial_bodies(&server, 1, 100, 100).remove(0);
        assert_eq!(read_response(&mut s).status, 400);
    }
    let rss0 = server.proc_status_kb("VmRSS").unwrap();

    let mut clients = partial_bodies(&server, CLIENTS, LEN, SENT);
    // The budget holds about BUDGET / LEN bodies; every other client is refused.
    let most_held = BUDGET / SENT;
    let mut refused = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut held: Vec<usize> = (0..CLIENTS).collect();
    while held.len() > most_held && Instant::now() < deadline {
        held.retain(|&i| match answered(&mut clients[i]) {
            Some(head) => {
                refused.push((i, head));
                false
            }
            None => true,
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak = server.proc_status_kb("VmHWM").unwrap();
    let rss1 = server.proc_status_kb("VmRSS").unwrap();
    println!(
        "{CLIENTS} clients with {SENT}-byte partial bodies, budget {BUDGET} bytes: {} held, {} \
         refused; RSS {rss0} kB before, {rss1} kB during, peak {peak} kB",
        held.len(),
        refused.len()
    );
    assert!(
        held.len() <= most_held,
        "{} clients held with a budget for {most_held}",
        held.len()
    );
    assert!(
        held.len() >= BUDGET / (2 * LEN),
        "only {} clients held: the budget is not used",
        held.len()
    );
    for (i, head) in &refused {
        let text = String::from_utf8_lossy(head);
        assert!(
            text.starts_with("HTTP/1.1 503 ") && text.contains("\r\nRetry-After: 1\r\n"),
            "client {i}: {text}"
        );
    }
    assert_eq!(
        rejected(&server, "request_budget") as usize,
        refused.len(),
        "refusals counted"
    );
    // Peak: the budget plus a fixed overhead (the connections themselves), far from
    // CLIENTS * SENT (117 MB).
    let overhead_kb = 12 * 1024;
    assert!(
        peak <= rss0 + (BUDGET / 1024) as u64 + overhead_kb,
        "peak RSS {peak} kB, baseline {rss0} kB"
    );

    // The held bodies complete and are answered (400: spaces are no JSON); nothing is lost.
    for &i in &held {
        clients[i].write_all(&[b' '; LEN - SENT]).unwrap();
        assert_eq!(read_response(&mut clients[i]).status, 400);
    }
    // Everyone leaves: memory goes back to about where it was.
    let fds_before = server.open_fds();
    drop(clients);
    assert!(
        wait_until(Duration::from_secs(10), || server.open_fds() + CLIENTS / 2
            < fds_before),
        "connections not closed"
    );
    let mut rss2 = 0;
    let back = wait_until(Duration::from_secs(10), || {
        rss2 = server.proc_status_kb("VmRSS").unwrap();
        rss2 <= rss0 + 4 * 1024
    });
    println!("RSS after the wave: {rss2} kB (baseline {rss0} kB)");
    assert!(back, "RSS {rss2} kB after the wave, baseline {rss0} kB");
    // And the budget is whole again: a full-size body is taken.
    let body = format!("{{\"updated_at\": 1700000000{}}}", " ".repeat(60_000));
    assert_eq!(queue_change(server.addr, "k", &body).status, 200);
}

#[test]
fn http_1_1_details() {
    let _turn = serial();
    let server = Server::start(&[("LOG_LEVEL", "info")]);
    let status = |raw: &str| request(server.addr, raw.as_bytes());
    // Absolute-form targets are routed by their path.
    let r = status(
        "GET http://sse.example.com:8000/health/liveness/ HTTP/1.1\r\nHost: sse.example.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut sub = TcpStream::connect(server.addr).unwrap();
    sub.write_all(b"GET http://h/sse/environments/abs/stream?x=1 HTTP/1.1\r\nHost: h\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 15];
    sub.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sub.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    // A later HTTP/1.x is answered as 1.1, keep-alive included.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"GET /health/liveness/ HTTP/1.2\r\nHost: t\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("keep-alive"));
    s.write_all(b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).status, 200);
    // HTTP/1.1 needs exactly one Host; HTTP/1.0 none.
    for raw in [
        "GET /health/liveness/ HTTP/1.1\r\n\r\n",
        "GET /health/liveness/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /health/liveness/ HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    ] {
        let r = status(raw);
        assert_eq!(r.status, 400, "{raw:?}");
        assert!(r.text().contains("Host"), "{}", r.text());
        assert_eq!(r.header("connection"), Some("close"));
    }
    assert_eq!(status("GET /health/liveness/ HTTP/1.0\r\n\r\n").status, 200);
    // OPTIONS * is the server's own: 200 with Allow.
    let r = status("OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    let allow = r.header("allow").expect("Allow");
    for m in ["GET", "POST", "OPTIONS"] {
        assert!(allow.contains(m), "Allow: {allow}");
    }
    assert_eq!(r.header("content-length"), Some("0"));
    assert_eq!(status("GET * HTTP/1.1\r\nHost: t\r\n\r\n").status, 400);
}

#[test]
fn pipelined_requests_are_answered_in_order_and_together() {
    let _turn = serial();
    let server = Server::start(&[("LOG_LEVEL", "info")]);
    // A 64 KiB read of small requests, then a queue-change and more behind it.
    let one = b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n";
    let n = 64 * 1024 / one.len();
    let mut wire = one.repeat(n);
    let body = r#"{"updated_at": 1700000000}"#;
    wire.extend_from_slice(
        queue_change_head(
            &format!("Authorization: Token {TOKEN}\r\n"),
            &format!("Content-Length: {}", body.len()),
        )
        .as_bytes(),
    );
    wire.extend_from_slice(body.as_bytes());
    wire.extend_from_slice(&one.repeat(10));
    wire.extend_from_slice(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut s = TcpStream::connect(server.addr).unwrap();
    let writer = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&wire))
    };
    for i in 0..n {
        let r = read_response(&mut s);
        assert_eq!((i, r.status), (i, 200));
    }
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("1700000000"), "{}", r.text());
    for _ in 0..10 {
        assert_eq!(read_response(&mut s).status, 200);
    }
    let r = read_response(&mut s);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(r.text().contains("flagsmith_sse_subscribers_active"));
    writer.join().unwrap().unwrap();

    // Responses gathered before a subscription in the same read go out before the stream.
    let mut s = TcpStream::connect(server.addr).unwrap();
    let mut wire = one.repeat(3);
    wire.extend_from_slice(stream_request("piped").as_bytes());
    s.write_all(&wire).unwrap();
    for _ in 0..3 {
        assert_eq!(read_response(&mut s).status, 200);
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("stream head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 200 OK") && head.contains("text/event-stream"),
        "{head}"
    );
}
