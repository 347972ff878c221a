//! SIGTERM and SIGINT with the real binary: stop accepting, finish in-flight queue-changes,
//! end open streams cleanly over the grace window, exit 0; a second signal exits at once.

mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const BASE: u64 = 1_700_000_000;

fn graceful_shutdown(signal: &str) {
    const STREAMS: usize = 40;
    let grace = Duration::from_secs(2);
    let mut server = Server::start(&[
        ("SHUTDOWN_GRACE_SECONDS", "2"),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
        ("LOG_LEVEL", "info"),
    ]);
    let mut crowd = Crowd::connect(server.addr, "k", STREAMS);
    let mut old = Subscriber::connect_version(server.addr, "k", "1.0");
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    // A queue-change whose body is still arriving when the signal comes.
    let body = update_body(BASE + 1);
    let (first, rest) = body.split_at(10);
    let mut inflight = TcpStream::connect(server.addr).unwrap();
    inflight
        .write_all(
            format!(
                "POST /sse/environments/k/queue-change HTTP/1.1\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n{first}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        server
            .metrics()
            .get("flagsmith_sse_connections_open")
            .is_some_and(|&n| n >= (STREAMS + 4) as f64)
    }));

    let t0 = Instant::now();
    server.signal(signal);
    assert!(server.wait_log("shutting down", Duration::from_secs(5)));
    // No longer accepting.
    let refused = wait_until(
        Duration::from_secs(2),
        || matches!(TcpStream::connect(server.addr), Err(e) if e.kind() == ErrorKind::ConnectionRefused),
    );
    assert!(refused, "still accepting after {signal}");
    // The idle keep-alive connection is closed at once, gracefully.
    idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = Vec::new();
    assert!(
        matches!(idle.read_to_end(&mut buf), Ok(0)),
        "idle connection not closed"
    );
    // The in-flight queue-change is finished and answered.
    inflight.write_all(rest.as_bytes()).unwrap();
    let r = read_response(&mut inflight);
    assert_eq!(r.status, 200, "in-flight queue-change: {}", r.text());
    assert_eq!(r.header("connection"), Some("close"));

    // Every stream ends with its final chunk, at times spread over the grace window.
    let mut ends = vec![None; STREAMS];
    let all = wait_until(grace + Duration::from_secs(2), || {
        crowd.pump(Duration::from_millis(5));
        for (i, end) in ends.iter_mut().enumerate() {
            if crowd.ended[i] && end.is_none() {
                *end = Some(t0.elapsed());
                crowd.close(i);
            }
        }
        ends.iter().all(Option::is_some)
    });
    assert!(all, "streams not ended: {ends:?}");
    let finished = crowd.finished.iter().filter(|&&f| f).count();
    assert_eq!(finished, STREAMS, "streams ended without their final chunk");
    let mut ends: Vec<Duration> = ends.into_iter().flatten().collect();
    ends.sort();
    let (first_end, last_end) = (ends[0], ends[STREAMS - 1]);
    println!(
        "{signal}: {STREAMS} streams ended between {first_end:?} and {last_end:?} (median {:?}) \
         with a grace of {grace:?}",
        ends[STREAMS / 2]
    );
    assert!(
        last_end <= grace + Duration::from_millis(500),
        "{last_end:?}"
    );
    assert!(
        last_end - first_end >= grace / 4,
        "stream ends are not spread: {first_end:?}..{last_end:?}"
    );
    assert!(
        old.wait_end(Duration::from_secs(3)),
        "HTTP/1.0 stream not ended"
    );
    drop(old);

    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("the server did not exit");
    println!(
        "{signal}: exited with {status} {:?} after the signal",
        t0.elapsed()
    );
    assert!(status.success(), "exit status {status}");
    assert!(server.log().contains("all connections closed"));
}

#[test]
fn sigterm_finishes_requests_ends_streams_and_exits_0() {
    graceful_shutdown("TERM");
}

#[test]
fn sigint_finishes_requests_ends_streams_and_exits_0() {
    graceful_shutdown("INT");
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut server = Server::start(&[("SHUTDOWN_GRACE_SECONDS", "60"), ("LOG_LEVEL", "info")]);
    let _sub = Subscriber::connect(server.addr, "k");
    server.signal("TERM");
    assert!(server.wait_log("shutting down", Duration::from_secs(5)));
    let t0 = Instant::now();
    server.signal("INT");
    let status = server.wait_exit(Duration::from_secs(3));
    println!(
        "exited with {status:?} {:?} after the second signal",
        t0.elapsed()
    );
    assert!(status.is_some(), "still running after a second signal");
}

#[test]
fn an_idle_server_exits_at_once() {
    let mut server = Server::start(&[("LOG_LEVEL", "info")]);
    let t0 = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(3)).expect("no exit");
    println!("idle server exited with {status} after {:?}", t0.elapsed());
    assert!(status.success());
}

#[test]
fn a_subscription_completed_during_shutdown_is_refused() {
    let mut server = Server::start(&[("SHUTDOWN_GRACE_SECONDS", "1"), ("LOG_LEVEL", "info")]);
    let req = stream_request("k");
    let (first, rest) = req.split_at(12);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(first.as_bytes()).unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        server
            .metrics()
            .get("flagsmith_sse_connections_open")
            .is_some_and(|&n| n >= 2.0)
    }));
    server.signal("TERM");
    assert!(server.wait_log("shutting down", Duration::from_secs(5)));
    s.write_all(rest.as_bytes()).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("the server did not exit");
    assert!(status.success());
}
