//! SIGTERM and SIGINT with the real binary: stop accepting, finish in-flight queue-changes,
//! end open streams cleanly over the grace window, exit 0; a second signal exits at once.

mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
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
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    // A queue-change whose body is still arriving when the signal comes.
    let body = update_body(BASE + 1);
    let (first, rest) = body.split_at(10);
    let mut inflight = TcpStream::connect(server.addr).unwrap();
    inflight
        .write_all(
            format!(
                "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n{first}",
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

/// Reads `/proc/<pid>/task/<tid>/<file>` for every thread of `pid`: (tid, contents).
fn threads(pid: u32, file: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(entry.path().join(file)) {
            out.push((tid, text));
        }
    }
    out
}

#[test]
fn only_the_event_loop_thread_takes_sigterm_and_sigint() {
    let redis = Redis::start();
    let server = Server::start(&[("REDIS_URL", &redis.url()), ("LOG_LEVEL", "info")]);
    wait_ready(&server);
    // SIGINT is signal 2, SIGTERM 15: bits 1 and 14 of the SigBlk mask.
    const TERM_INT: u64 = (1 << 1) | (1 << 14);
    let pid = server.pid();
    let masks: Vec<(u32, u64)> = threads(pid, "status")
        .into_iter()
        .map(|(tid, status)| {
            let blk = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .expect("SigBlk");
            (tid, blk)
        })
        .collect();
    assert!(
        masks.len() >= 3,
        "loop, store helper and log writer: {masks:?}"
    );
    for (tid, blk) in &masks {
        if *tid == pid {
            assert_eq!(blk & TERM_INT, 0, "the loop thread blocks them: {blk:x}");
        } else {
            assert_eq!(blk & TERM_INT, TERM_INT, "thread {tid} takes them: {blk:x}");
        }
    }
}

#[test]
fn a_second_signal_exits_at_once_while_the_store_helper_is_stuck() {
    let redis = Redis::start();
    let mut server = Server::start(&[
        ("REDIS_URL", &redis.url()),
        ("SHUTDOWN_GRACE_SECONDS", "30"),
        ("LOG_LEVEL", "info"),
    ]);
    wait_ready(&server);
    let pid = server.pid();
    let helper = threads(pid, "comm")
        .into_iter()
        .find(|(_, comm)| comm.trim() == "store")
        .map(|(tid, _)| tid)
        .expect("the store thread");
    let stopped = Command::new("kill")
        .args(["-STOP", &redis.pid().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    // A queue-change in flight: the helper writes it to the stopped Redis and waits there.
    let body = update_body(BASE + 7);
    let mut inflight = TcpStream::connect(server.addr).unwrap();
    inflight
        .write_all(
            format!(
                "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    // The helper is stuck when it sleeps in a socket read rather than on its channel (futex,
    // syscall 202 on x86_64; 98 on aarch64).
    let futex = if cfg!(target_arch = "aarch64") {
        "98"
    } else {
        "202"
    };
    let stuck = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/task/{helper}/syscall"))
            .is_ok_and(|s| !s.starts_with(futex) && !s.starts_with("running"))
    });
    assert!(stuck, "the store helper never waited on Redis");
    server.signal("TERM");
    assert!(server.wait_log("shutting down", Duration::from_secs(5)));
    let t0 = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    let _ = Command::new("kill")
        .args(["-CONT", &redis.pid().to_string()])
        .status();
    println!("second SIGTERM with the store helper stuck: exited with {status:?} after {took:?}");
    assert!(status.is_some(), "still running after a second signal");
    // The helper's Redis read times out after 2 s; joining it would take that long.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(server.log().contains("second signal"), "{}", server.log());
}

/// Thousands of streams, idle keep-alive connections and a fan-out under way when the signal
/// comes: the walk that ends them spans turns, and still every stream ends with its final chunk
/// (after the update at most once), every idle connection is closed, and the exit is 0.
#[test]
fn thousands_of_streams_all_end_with_their_final_chunk_and_exit_0() {
    const STREAMS: usize = 3_000;
    const IDLE: usize = 50;
    let grace = Duration::from_secs(2);
    let mut server = Server::start(&[
        ("SHUTDOWN_GRACE_SECONDS", "2"),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
        ("LOG_LEVEL", "debug"),
    ]);
    let mut crowd = Crowd::connect(server.addr, "k", STREAMS);
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            assert_eq!(read_response(&mut s).status, 200);
            s
        })
        .collect();
    // An update whose fan-out is likely still under way when the signal arrives.
    let mut poster = Poster::connect(server.addr);
    assert_eq!(poster.post("k", &update_body(BASE + 7)).status, 200);
    let t0 = Instant::now();
    server.signal("TERM");
    assert!(server.wait_log("shutting down", Duration::from_secs(5)));
    // Some subscribers leave while the walk is under way.
    let left = |i: usize| i.is_multiple_of(7) && i < 70;
    for i in (0..crowd.len()).filter(|&i| left(i)) {
        crowd.close(i);
    }

    let done = crowd.pump_until(grace + Duration::from_secs(10), |c| {
        (0..c.len()).all(|i| left(i) || c.ended[i])
    });
    let open = (0..crowd.len())
        .filter(|&i| !left(i) && !crowd.ended[i])
        .count();
    assert!(done, "{open} streams not ended after {:?}", t0.elapsed());
    let ended_at = t0.elapsed();
    let want = update_text(BASE + 7);
    for i in (0..crowd.len()).filter(|&i| !left(i)) {
        assert!(
            crowd.finished[i],
            "stream {i} ended without its final chunk"
        );
        // A stream whose end time comes before the fan-out reaches it ends without the update;
        // none gets it twice, or anything else.
        assert!(
            crowd.history[i].iter().all(|u| *u == want) && crowd.history[i].len() <= 1,
            "stream {i}: {:?}",
            crowd.history[i]
        );
    }
    for (i, s) in idle.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        assert!(
            matches!(s.read_to_end(&mut buf), Ok(0)),
            "idle connection {i} not closed"
        );
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("the server did not exit");
    let log = server.log();
    let walk = log
        .lines()
        .find(|l| l.contains("every connection has its end"))
        .unwrap_or("(no walk line in the log)");
    println!(
        "{STREAMS} streams ended within {ended_at:?}; exited with {status} after {:?}; {walk}",
        t0.elapsed()
    );
    assert!(status.success(), "exit status {status}");
    assert!(log.contains("all connections closed"));
}
