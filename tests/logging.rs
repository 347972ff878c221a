//! Logging with the real binary: JSON lines, the start-up configuration line, the access log,
//! errors that name their address, and a log destination that stops reading or goes away
//! while the server keeps serving.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary with the test token, on 127.0.0.1.
fn bin() -> Command {
    let mut c = binary();
    c.env("SSE_AUTHENTICATION_TOKEN", TOKEN)
        .env("BIND_ADDRESS", "127.0.0.1");
    c
}

/// One HTTP/1.1 GET for `target` (sent as it is) on a fresh connection; the status, or None
/// on any failure.
fn status_of(addr: SocketAddr, target: impl AsRef<[u8]>, timeout: Duration) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target.as_ref());
    req.extend_from_slice(b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(&req).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The value of one series on /metrics, fetched with a bounded wait.
fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sends `n` liveness requests on one keep-alive connection (each line of the access log).
fn hammer(addr: SocketAddr, n: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut buf = vec![0u8; 64 * 1024];
    // In batches of 50 pipelined requests, reading all the answers before the next batch.
    let mut left = n;
    while left > 0 {
        let k = left.min(50);
        s.write_all(&req.repeat(k)).unwrap();
        let mut seen = 0;
        let mut tail = Vec::new();
        while seen < k {
            let got = s.read(&mut buf).expect("liveness answers");
            assert!(got > 0, "connection closed");
            tail.extend_from_slice(&buf[..got]);
            seen = tail.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
        }
        left -= k;
    }
}

/// A server whose stderr is a pipe the test holds but does not read.
struct Unread {
    child: Child,
    addr: SocketAddr,
    stderr: Option<std::process::ChildStderr>,
}

impl Unread {
    fn start() -> Unread {
        let port = free_port();
        let mut child = bin()
            .env("PORT", port.to_string())
            .env("LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = wait_until(Duration::from_secs(20), || {
            status_of(addr, "/health/liveness/", Duration::from_secs(1)) == Some(200)
        });
        assert!(up, "server did not come up");
        Unread {
            child,
            addr,
            stderr,
        }
    }

    #[track_caller]
    fn signal(&self, sig: &str) {
        signal_pid(self.child.id(), sig);
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Times liveness probes on fresh connections while the log pipe is full.
    fn probe_liveness(&self, n: usize) -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let t0 = Instant::now();
                let status = status_of(self.addr, "/health/liveness/", Duration::from_secs(5));
                assert_eq!(status, Some(200), "liveness failed while stderr is full");
                t0.elapsed()
            })
            .collect()
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_full_log_pipe_drops_lines_and_the_server_keeps_serving() {
    let mut server = Unread::start();
    // The pipe takes 64 KiB, the queue 4096 lines: a few thousand access lines fill both.
    let dropped = wait_until(Duration::from_secs(60), || {
        hammer(server.addr, 2_000);
        metric(server.addr, "flagsmith_sse_log_lines_dropped_total").is_some_and(|d| d > 0.0)
    });
    assert!(dropped, "no log lines counted as dropped");
    let before = metric(server.addr, "flagsmith_sse_log_lines_dropped_total").unwrap();
    let samples = server.probe_liveness(200);
    let (median, max) = median_max(&samples);
    println!("liveness with a full log pipe: median {median:?}, max {max:?} over 200 probes");
    hammer(server.addr, 500);
    let after = metric(server.addr, "flagsmith_sse_log_lines_dropped_total").unwrap();
    assert!(after >= before + 500.0, "dropped {before} -> {after}");
    // Reading the pipe again lets lines through, among them one that counts the lost ones.
    let mut stderr = server.stderr.take().unwrap();
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let seen = |needle: &str| text.lock().unwrap().contains(needle);
    assert!(
        wait_until(Duration::from_secs(30), || seen(
            "log lines dropped in the last"
        )),
        "no line counting the dropped ones"
    );
    // A marker request shows that the backlog is through and new lines get out again.
    assert_eq!(
        queue_change(server.addr, "marker", &update_body(1_700_000_000)).status,
        200
    );
    assert!(
        wait_until(Duration::from_secs(30), || seen(
            "/sse/environments/marker/"
        )),
        "new lines do not get through"
    );
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(20)).expect("no exit");
    assert!(status.success(), "{status}");
    assert!(
        wait_until(Duration::from_secs(5), || seen("all connections closed")),
        "last lines lost"
    );
}

#[test]
fn a_closed_log_pipe_neither_stops_nor_kills_the_server() {
    let mut server = Unread::start();
    // Fill the pipe so that the writer is blocked in write(2) when the reader goes away.
    hammer(server.addr, 3_000);
    drop(server.stderr.take());
    hammer(server.addr, 3_000);
    let dropped = wait_until(Duration::from_secs(10), || {
        metric(server.addr, "flagsmith_sse_log_lines_dropped_total").is_some_and(|d| d >= 3_000.0)
    });
    assert!(dropped, "failed log writes not counted");
    assert_eq!(
        status_of(server.addr, "/health/liveness/", Duration::from_secs(5)),
        Some(200)
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10)).expect("no exit");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn json_lines_parse_and_carry_their_fields() {
    let server = Server::start(&[("LOG_FORMAT", "json"), ("LOG_LEVEL", "debug")]);
    assert_eq!(
        status_of(server.addr, "/metrics", Duration::from_secs(5)),
        Some(200)
    );
    server.assert_log("\"path\":\"/metrics\"", Duration::from_secs(5));
    let log = server.log();
    let mut access = None;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let time = v["time"].as_str().expect("time");
        assert!(
            time.len() == 27 && time.ends_with('Z') && &time[10..11] == "T",
            "{time}"
        );
        assert!(
            ["error", "warn", "info", "debug", "trace"].contains(&v["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(
            v["module"].as_str().unwrap().starts_with("flagsmith_sse"),
            "{line}"
        );
        assert!(v["message"].is_string(), "{line}");
        if v["path"] == "/metrics" {
            access = Some(v);
        }
    }
    let a = access.expect("an access line");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["status"], 200);
    assert!(a["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{a}");
    assert!(a["duration_ms"].is_u64(), "{a}");
    assert_eq!(a["module"], "flagsmith_sse::server::access");
}

#[test]
fn access_log_at_debug_covers_requests_and_streams() {
    let server = Server::start(&[("LOG_LEVEL", "debug"), ("STREAM_DELAY", "0")]);
    assert_eq!(
        status_of(server.addr, "/nowhere", Duration::from_secs(5)),
        Some(404)
    );
    assert_eq!(
        queue_change(server.addr, "env-a", &update_body(1_700_000_001)).status,
        200
    );
    assert_eq!(
        queue_change_with(server.addr, "env-a", &update_body(1_700_000_002), None).status,
        401
    );
    let mut sub = Subscriber::connect(server.addr, "env-a");
    assert!(sub.next_update(Duration::from_secs(5)).is_some());
    drop(sub);
    server.assert_log("stream closed", Duration::from_secs(5));
    let log = server.log();
    let has = |parts: &[&str]| {
        log.lines().any(|l| {
            l.contains("[flagsmith_sse::server::access]") && parts.iter().all(|p| l.contains(p))
        })
    };
    assert!(
        has(&[
            "request",
            "method=GET",
            "path=/nowhere ",
            "status=404",
            "peer=127.0.0.1:",
            "duration_ms="
        ]),
        "{log}"
    );
    assert!(
        has(&[
            "method=POST",
            "path=/sse/environments/env-a/queue-change",
            "status=200"
        ]),
        "{log}"
    );
    // Refused without reading the body: the line still says what was refused.
    assert!(
        has(&[
            "method=POST",
            "path=/sse/environments/env-a/queue-change",
            "status=401"
        ]),
        "{log}"
    );
    assert!(
        has(&["stream opened", "environment=env-a", "peer=127.0.0.1:"]),
        "{log}"
    );
    assert!(
        has(&[
            "stream closed",
            "environment=env-a",
            "reason=peer",
            "duration_ms="
        ]),
        "{log}"
    );

    // Not at info.
    let quiet = Server::start(&[("LOG_LEVEL", "info")]);
    assert_eq!(
        status_of(quiet.addr, "/metrics", Duration::from_secs(5)),
        Some(200)
    );
    quiet.assert_log("configuration:", Duration::from_secs(5));
    assert!(!quiet.log().contains("server::access"), "{}", quiet.log());
}

#[test]
fn access_log_paths_are_as_sent_and_cannot_forge_lines() {
    for format in ["text", "json"] {
        let server = Server::start(&[("LOG_LEVEL", "debug"), ("LOG_FORMAT", format)]);
        // Quotes, a backslash and non-ASCII bytes reach the router (404); the query string
        // is not logged (it may carry secrets).
        let hostile: &[u8] = b"/a\"b\\c/caf\xc3\xa9?token=hunter2";
        assert_eq!(
            status_of(server.addr, hostile, Duration::from_secs(5)),
            Some(404)
        );
        // A CR, LF or other control byte in the target is refused before routing.
        for bad in [&b"/x\ry"[..], b"/x\x01y", b"/x\ny"] {
            let got = status_of(server.addr, bad, Duration::from_secs(5));
            assert!(got == Some(400) || got.is_none(), "{bad:?}: {got:?}");
        }
        let long = format!("/{}", "p".repeat(1000));
        assert_eq!(
            status_of(server.addr, long.as_bytes(), Duration::from_secs(5)),
            Some(404)
        );
        assert_eq!(
            status_of(server.addr, b"/last", Duration::from_secs(5)),
            Some(404)
        );
        let last = if format == "json" {
            "\"path\":\"/last\""
        } else {
            "path=/last "
        };
        server.assert_log(last, Duration::from_secs(5));
        let log = server.log();
        assert!(!log.contains("hunter2"), "{log}");
        let shown_long = format!("/{}...", "p".repeat(255));
        let mut paths = Vec::new();
        for line in log.lines() {
            if format == "json" {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if v["module"] == "flagsmith_sse::server::access" && v["message"] == "request" {
                    let path = v["path"].as_str().expect("path").to_owned();
                    paths.push((path, v["status"].as_u64().expect("status")));
                }
            } else {
                // Every line is a record of its own: it starts with the time.
                assert!(
                    line.len() > 24 && line.as_bytes()[4] == b'-' && line.as_bytes()[23] == b'Z',
                    "a forged or broken line: {line:?}"
                );
                if line.contains("[flagsmith_sse::server::access] request ") {
                    let field = |name: &str| {
                        line.split(&format!(" {name}="))
                            .nth(1)
                            .and_then(|r| r.split(' ').next())
                            .unwrap_or_else(|| panic!("no {name}: {line}"))
                            .to_owned()
                    };
                    let status = field("status").parse().expect("status");
                    paths.push((field("path"), status));
                }
            }
        }
        let refused: Vec<&(String, u64)> = paths.iter().filter(|(_, s)| *s == 400).collect();
        assert_eq!(refused.len(), 3, "{format}:\n{log}");
        // Refused before its head was read: no path to show.
        assert!(refused.iter().all(|(p, _)| p == "-"), "{format}:\n{log}");
        let found: Vec<&str> = paths
            .iter()
            .filter(|(_, s)| *s == 404)
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(
            found,
            ["/a%22b%5Cc/caf%C3%A9", shown_long.as_str(), "/last"],
            "{format}:\n{log}"
        );
    }
}

#[test]
fn a_queue_change_answered_503_by_a_stalled_store_logs_its_path() {
    let redis = Redis::start();
    let server = Server::start(&[
        ("LOG_LEVEL", "debug"),
        ("REDIS_URL", &redis.url()),
        ("REDIS_NOTIFY", "false"),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "60"),
    ]);
    assert_eq!(
        queue_change(server.addr, "stall-env", &update_body(1_700_000_001)).status,
        200
    );
    // Redis stops answering: the write times out and is answered 503. The path is the one
    // sent, without its query string.
    signal_pid(redis.pid(), "STOP");
    let body = update_body(1_700_000_002);
    let raw = format!(
        "POST /sse/environments/stall-env/queue-change?from=test HTTP/1.1\r\nHost: t\r\n\
         Authorization: Token {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let status = request(server.addr, raw.as_bytes()).status;
    signal_pid(redis.pid(), "CONT");
    assert_eq!(status, 503);
    let want = "path=/sse/environments/stall-env/queue-change status=503";
    server.assert_log(want, Duration::from_secs(5));
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("[flagsmith_sse::server::access] request ") && l.contains(want)),
        "{log}"
    );
    assert!(
        !log.contains("(unknown)") && !log.contains("from=test"),
        "{log}"
    );
}

#[test]
fn start_up_shows_the_configuration_once_and_the_store_once() {
    let server = Server::start(&[("LOG_LEVEL", "info"), ("REDIS_PASSWORD", "hunter2")]);
    server.assert_log("configuration:", Duration::from_secs(5));
    let log = server.log();
    let config: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("configuration:"))
        .collect();
    assert_eq!(config.len(), 1, "{log}");
    let line = config[0];
    for (name, _, _) in flagsmith_sse::config::VARIABLES {
        assert!(
            line.contains(&format!(" {name}=")),
            "{name} missing: {line}"
        );
    }
    // Effective values, not Rust's debug format.
    let max: usize = line
        .split(" MAX_CONNECTIONS=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("MAX_CONNECTIONS is not a number: {line}"));
    assert!(max > 0);
    assert!(
        line.contains("SSE_AUTHENTICATION_TOKEN=<redacted>"),
        "{line}"
    );
    assert!(
        line.contains("PORT=") && line.contains("LOG_FORMAT=text"),
        "{line}"
    );
    assert!(!line.contains(TOKEN) && !line.contains("hunter2"), "{line}");
    assert!(!line.contains("None") && !line.contains('{'), "{line}");
    let store = log
        .lines()
        .filter(|l| l.contains("embedded in-memory store"))
        .count();
    assert_eq!(store, 1, "{log}");
}

#[test]
fn a_listen_error_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = bin()
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot listen on 127.0.0.1:{port}: Address already in use"
        )),
        "{err}"
    );
}

#[test]
fn redis_errors_name_the_host() {
    // Nothing listens on `port`: the fetch, the store thread's connection and the wake-up
    // listener all fail, and each says where it tried (never with the password).
    let port = free_port();
    let server = Server::start(&[
        ("LOG_LEVEL", "info"),
        ("REDIS_URL", &format!("redis://:secret@127.0.0.1:{port}/0")),
    ]);
    let host = format!("127.0.0.1:{port}");
    for what in [
        "fetch from",
        "Redis connection failed at",
        "wake-up listener lost its Redis connection to",
    ] {
        server.assert_log(what, Duration::from_secs(10));
        let log = server.log();
        assert!(
            log.lines().any(|l| l.contains(what) && l.contains(&host)),
            "no line with {what:?} names {host}:\n{log}"
        );
    }
    assert!(!server.log().contains("secret"), "{}", server.log());
}

#[cfg(feature = "cluster")]
#[test]
fn a_cluster_names_its_seed_nodes() {
    // Two seeds, neither listening: the store's line lists both, without the password.
    let (a, b) = (free_port(), free_port());
    let server = Server::start(&[
        ("LOG_LEVEL", "info"),
        ("USE_CLUSTER_MODE", "true"),
        (
            "REDIS_URL",
            &format!("redis://:secret@127.0.0.1:{a},redis://:secret@127.0.0.1:{b}"),
        ),
    ]);
    let seeds = format!("127.0.0.1:{a},127.0.0.1:{b}");
    server.assert_log("Redis connection failed at", Duration::from_secs(10));
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("Redis connection failed at") && l.contains(&seeds)),
        "{log}"
    );
    assert!(!log.contains("secret"), "{log}");
}

#[test]
fn repeated_warnings_become_one_line_with_a_count() {
    // Redis is not there: every queue-change fails with the same warning.
    let port = free_port();
    let server = Server::start(&[
        ("LOG_LEVEL", "info"),
        ("REDIS_URL", &format!("redis://127.0.0.1:{port}/0")),
    ]);
    for i in 0..20 {
        let r = queue_change(server.addr, "k", &update_body(1_700_000_000 + i));
        assert_eq!(r.status, 503);
    }
    server.assert_log("(repeated ", Duration::from_secs(30));
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("not stored")).collect();
    assert!(lines.len() <= 3, "not aggregated: {log}");
    // Each plain line is one occurrence; an aggregated line stands for its count.
    let plain = lines.iter().filter(|l| !l.contains("(repeated ")).count() as u64;
    let counted: u64 = lines
        .iter()
        .filter_map(|l| {
            l.split("(repeated ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(counted > 0, "{log}");
    assert_eq!(plain + counted, 20, "{log}");
}
