//! Conformance of the HTTP API (SPEC 1, 2 and 4) over real sockets against the real binary:
//! queue-change bodies and errors, CORS, health, keep-alive and pipelining, refusal of bad
//! input with a response the client can read, and configuration errors.

mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UNAUTHORIZED: &str = r#"{"detail": "Invalid authorization header"}"#;

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until the server closes, within `timeout`. A reset or a timeout fails the test: the
/// server must hang up gracefully.
#[track_caller]
fn read_to_close(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the server did not close; got {:?}",
            String::from_utf8_lossy(&out)
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "reading until close: {e}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// Splits the first response (head and Content-Length body) off `bytes`.
#[track_caller]
fn parse_response(bytes: &[u8]) -> (Response, &[u8]) {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(bytes)))
        + 4;
    let text = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = bytes
        .get(end..end + len)
        .unwrap_or_else(|| panic!("body cut short: {:?}", String::from_utf8_lossy(bytes)));
    let resp = Response {
        status,
        headers,
        body: body.to_vec(),
    };
    (resp, &bytes[end + len..])
}

/// Sends `raw` (in one write), reads everything until the server closes and returns the one
/// response it sent: an error response, then a graceful close, and nothing after it.
#[track_caller]
fn refused(addr: SocketAddr, raw: &[u8], status: u16) -> Response {
    let mut s = connect(addr);
    s.write_all(raw).expect("send");
    let bytes = read_to_close(&mut s, Duration::from_secs(10));
    let (r, rest) = parse_response(&bytes);
    assert_eq!(r.status, status, "{}", r.text());
    assert!(rest.is_empty(), "bytes after the response: {rest:?}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_cors(&r);
    assert_json_detail(&r);
    r
}

#[track_caller]
fn assert_cors(r: &Response) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("*"),
        "{:?}",
        r.headers
    );
}

#[track_caller]
fn assert_json_detail(r: &Response) {
    assert_eq!(r.header("content-type"), Some("application/json"));
    let text = r.text();
    assert!(
        text.starts_with("{\"detail\": \"") && text.ends_with("\"}") && text.len() > 14,
        "not a JSON detail: {text}"
    );
}

fn post_raw(key: &str, auth: &str, body: &str) -> String {
    format!(
        "POST /sse/environments/{key}/queue-change HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn auth() -> String {
    format!("Authorization: Token {TOKEN}\r\n")
}

/// Runs the binary with exactly `env` (plus PATH) and returns its exit code and stderr.
fn run_binary(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start flagsmith-sse");
    let exited = wait_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the binary did not exit with env {env:?}");
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let code = child.wait().expect("exit status").code();
    (code, err)
}

#[test]
fn unauthorized_queue_change_is_401_with_the_exact_body() {
    let server = Server::start(&[]);
    let body = r#"{"updated_at": "2025-01-12T18:06:42.028060+00:00"}"#;
    for auth in [
        "",
        "Authorization: Token wrong-token\r\n",
        "Authorization: Token test-tokenx\r\n",
        "Authorization: Bearer test-token\r\n",
        "Authorization: test-token\r\n",
        "Authorization: Token\r\n",
    ] {
        let mut s = connect(server.addr);
        s.write_all(post_raw("k", auth, body).as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.text(), UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_cors(&r);
    }
    // A complete request refused for its token leaves the connection usable.
    let mut s = connect(server.addr);
    s.write_all(post_raw("k", "Authorization: Token wrong\r\n", body).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut s).status, 401);
    s.write_all(b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).status, 200);
    // Nothing was stored: a subscriber gets no initial event.
    let mut sub = Subscriber::connect(server.addr, "k");
    assert_eq!(sub.next(Duration::from_millis(500)), None);
}

#[test]
fn bad_queue_change_bodies_are_400_with_a_json_detail() {
    let server = Server::start(&[]);
    for body in [
        "",
        "{",
        r#"{"updated_at": "2025-01-12T18:06:42Z""#,
        "not json",
        r#"["updated_at"]"#,
        "{}",
        r#"{"updated": "2025-01-12T18:06:42Z"}"#,
        r#"{"updated_at": null}"#,
        r#"{"updated_at": true}"#,
        r#"{"updated_at": "yesterday"}"#,
        r#"{"updated_at": "2025-13-12T18:06:42Z"}"#,
        r#"{"updated_at": "2025-01-12T18:06:42 UTC"}"#,
        r#"{"updated_at": ""}"#,
        r#"{"updated_at": -5}"#,
        &format!(
            r#"{{"x": {}{}, "updated_at": 1}}"#,
            "[".repeat(20_000),
            "]".repeat(20_000)
        ),
        "{\"updated_at\": \"2025-01-12T18:06:42\x01\"}",
    ] {
        let mut s = connect(server.addr);
        s.write_all(post_raw("bad-body", &auth(), body).as_bytes())
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 400, "{body:?}: {}", r.text());
        assert_json_detail(&r);
        assert_cors(&r);
        assert!(r.text().contains("updated_at") || r.text().contains("JSON"));
    }
    let mut sub = Subscriber::connect(server.addr, "bad-body");
    assert_eq!(sub.next(Duration::from_millis(500)), None);
}

#[test]
fn unknown_paths_and_invalid_keys_are_404() {
    let server = Server::start(&[]);
    let long = "k".repeat(129);
    let targets = [
        "/".to_owned(),
        "/nope".to_owned(),
        "/sse/environments/abc".to_owned(),
        "/sse/environments/abc/other".to_owned(),
        "/sse/environments//stream".to_owned(),
        "/sse/environments/a%20b/stream".to_owned(),
        "/sse/environments/a:b/stream".to_owned(),
        "/sse/environments/a~b/queue-change".to_owned(),
        "/sse/environments/a/b/stream".to_owned(),
        format!("/sse/environments/{long}/stream"),
        format!("/sse/environments/{long}/queue-change"),
    ];
    for target in &targets {
        for method in ["GET", "POST"] {
            let mut s = connect(server.addr);
            // A body only where one is expected (a body anywhere else is 400: requests.rs).
            let body = if method == "POST" && target.ends_with("/queue-change") {
                r#"{"updated_at": 1}"#
            } else {
                ""
            };
            let raw = format!(
                "{method} {target} HTTP/1.1\r\nHost: t\r\n{}Content-Length: {}\r\n\r\n{body}",
                auth(),
                body.len()
            );
            s.write_all(raw.as_bytes()).unwrap();
            let r = read_response(&mut s);
            assert_eq!(r.status, 404, "{method} {target}: {}", r.text());
            assert_json_detail(&r);
            assert_cors(&r);
        }
    }
    // 128 bytes of every allowed character class is a valid key.
    let key = format!("Az09._-{}", "k".repeat(121));
    assert_eq!(key.len(), 128);
    let r = queue_change(
        server.addr,
        &key,
        r#"{"updated_at": "2025-01-12T18:06:42Z"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut sub = Subscriber::connect(server.addr, &key);
    assert_eq!(
        sub.next_update(Duration::from_secs(5)).as_deref(),
        Some("1736705202.0")
    );
}

#[test]
fn wrong_methods_are_405_with_allow() {
    let server = Server::start(&[]);
    let cases = [
        ("POST", "/sse/environments/k/stream", "GET"),
        ("DELETE", "/sse/environments/k/stream", "GET"),
        ("GET", "/sse/environments/k/queue-change", "POST"),
        ("PUT", "/sse/environments/k/queue-change", "POST"),
        ("POST", "/health", "GET"),
        ("POST", "/health/liveness/", "GET"),
        ("DELETE", "/health/readiness/", "GET"),
        ("POST", "/metrics", "GET"),
    ];
    for (method, target, allowed) in cases {
        let mut s = connect(server.addr);
        let raw = format!("{method} {target} HTTP/1.1\r\nHost: t\r\n{}\r\n", auth());
        s.write_all(raw.as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 405, "{method} {target}: {}", r.text());
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("no Allow: {r:?}"));
        let methods: Vec<&str> = allow.split(',').map(str::trim).collect();
        assert!(
            methods.contains(&allowed),
            "{method} {target}: Allow {allow}"
        );
        assert!(
            !methods.contains(&method),
            "{method} {target}: Allow {allow}"
        );
        assert_cors(&r);
        assert_json_detail(&r);
        // The connection is still usable after a 405.
        s.write_all(b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut s).status, 200);
    }
}

#[test]
fn cors_preflight_on_every_endpoint() {
    let server = Server::start(&[]);
    let cases = [
        ("/sse/environments/k/stream", "GET"),
        ("/sse/environments/k/queue-change", "POST"),
        ("/health", "GET"),
        ("/health/liveness/", "GET"),
        ("/health/readiness/", "GET"),
        ("/metrics", "GET"),
    ];
    for (target, method) in cases {
        let mut s = connect(server.addr);
        let raw = format!(
            "OPTIONS {target} HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n\
             Access-Control-Request-Method: {method}\r\n\
             Access-Control-Request-Headers: authorization, content-type\r\n\r\n"
        );
        s.write_all(raw.as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert!((200..300).contains(&r.status), "{target}: {}", r.status);
        assert_cors(&r);
        let methods = r
            .header("access-control-allow-methods")
            .unwrap_or_else(|| panic!("{target}: no Allow-Methods: {r:?}"));
        assert!(
            methods.split(',').map(str::trim).any(|m| m == method),
            "{target}: {methods}"
        );
        let headers = r
            .header("access-control-allow-headers")
            .unwrap_or_else(|| panic!("{target}: no Allow-Headers: {r:?}"))
            .to_ascii_lowercase();
        assert!(
            headers.contains("authorization") && headers.contains("content-type"),
            "{target}: {headers}"
        );
        // A preflight without Access-Control-Request-Headers still names the useful ones.
        s.write_all(format!("OPTIONS {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        let r = read_response(&mut s);
        assert!((200..300).contains(&r.status), "{target}: {}", r.status);
        assert_cors(&r);
        let headers = r
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(headers.contains("content-type"), "{target}: {headers}");
        assert!(r.header("access-control-allow-methods").is_some());
    }
}

#[test]
fn every_non_stream_response_allows_any_origin() {
    let server = Server::start(&[]);
    let body = r#"{"updated_at": "2025-01-12T18:06:42Z"}"#;
    let requests: Vec<String> = vec![
        "GET /health HTTP/1.1\r\nHost: t\r\n\r\n".into(),
        "GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n".into(),
        "GET /health/readiness/ HTTP/1.1\r\nHost: t\r\n\r\n".into(),
        "HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n".into(),
        "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n".into(),
        "GET /nope HTTP/1.1\r\nHost: t\r\n\r\n".into(),
        "DELETE /metrics HTTP/1.1\r\nHost: t\r\n\r\n".into(),
        post_raw("cors", &auth(), body),
        post_raw("cors", &auth(), "{}"),
        post_raw("cors", "", body),
    ];
    for raw in &requests {
        let mut s = connect(server.addr);
        s.write_all(raw.as_bytes()).unwrap();
        if raw.starts_with("HEAD") {
            // A response to HEAD announces a length but has no body: read the head only.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(s.read(&mut byte).expect("HEAD response"), 1);
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            assert!(
                head.starts_with("http/1.1 200 "),
                "{head}\n{}",
                server.log()
            );
            assert!(
                head.contains("\r\naccess-control-allow-origin: *\r\n"),
                "{head}"
            );
        } else {
            assert_cors(&read_response(&mut s));
        }
    }
}

#[test]
fn payload_over_64_kib_is_413() {
    let server = Server::start(&[]);
    // Exactly 64 KiB is accepted.
    let json = r#"{"updated_at": "2025-01-12T18:06:42Z"}"#;
    let limit = format!("{json}{}", " ".repeat(65536 - json.len()));
    assert_eq!(limit.len(), 65536);
    let mut s = connect(server.addr);
    s.write_all(post_raw("big", &auth(), &limit).as_bytes())
        .unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.text());

    // One byte more, with Content-Length: the whole body is sent before the response is read.
    let over = format!("{limit} ");
    refused(server.addr, post_raw("big", &auth(), &over).as_bytes(), 413);

    // Chunked: no single chunk is too large, their sum is.
    let mut raw = format!(
        "POST /sse/environments/big/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\n\r\n",
        auth()
    )
    .into_bytes();
    raw.extend_from_slice(format!("{:x}\r\n{json}\r\n", json.len()).as_bytes());
    for _ in 0..3 {
        raw.extend_from_slice(format!("{:x}\r\n{}\r\n", 30_000, " ".repeat(30_000)).as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    refused(server.addr, &raw, 413);

    // One chunk larger than the limit on its own.
    let mut raw = format!(
        "POST /sse/environments/big/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\n\r\n",
        auth()
    )
    .into_bytes();
    raw.extend_from_slice(
        format!("{:x}\r\n{}\r\n0\r\n\r\n", 70_000, " ".repeat(70_000)).as_bytes(),
    );
    refused(server.addr, &raw, 413);
}

#[test]
fn headers_over_8_kib_are_431() {
    let server = Server::start(&[]);
    let raw = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    refused(server.addr, raw.as_bytes(), 431);
    // Many headers that add up to more than 8 KiB.
    let mut raw = String::from("GET /health HTTP/1.1\r\nHost: t\r\n");
    for i in 0..40 {
        raw.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(250)));
    }
    raw.push_str("\r\n");
    refused(server.addr, raw.as_bytes(), 431);
    // Headers just under the limit are fine.
    let raw = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(7000)
    );
    assert_eq!(request(server.addr, raw.as_bytes()).status, 200);
}

#[test]
fn incomplete_request_head_times_out_with_408() {
    let server = Server::start(&[("REQUEST_TIMEOUT_SECONDS", "1")]);
    let mut s = connect(server.addr);
    let started = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n").unwrap();
    let bytes = read_to_close(&mut s, Duration::from_secs(10));
    let waited = started.elapsed();
    let (r, rest) = parse_response(&bytes);
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(rest.is_empty());
    assert_cors(&r);
    assert_json_detail(&r);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "408 after {waited:?}"
    );

    // A body that never completes is refused the same way.
    let mut s = connect(server.addr);
    s.write_all(
        post_raw("slow", &auth(), r#"{"updated_at": 1}"#)
            .trim_end_matches("1}")
            .as_bytes(),
    )
    .unwrap();
    let bytes = read_to_close(&mut s, Duration::from_secs(10));
    assert_eq!(parse_response(&bytes).0.status, 408);

    // A complete request within the timeout is answered, however slowly it was sent.
    let mut s = connect(server.addr);
    for part in [
        &b"GET /health/liv"[..],
        b"eness/ HTTP/1.1\r\n",
        b"Host: t\r\n\r\n",
    ] {
        s.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(read_response(&mut s).status, 200);
}

#[test]
fn tls_client_hello_on_the_plain_port_is_400() {
    let server = Server::start(&[]);
    // The start of a TLS 1.2/1.3 ClientHello record.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
    ];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    hello.extend_from_slice(&[0x20]);
    hello.extend((0u8..32).map(|i| i.wrapping_mul(11)));
    hello.extend_from_slice(&[0x00, 0x08, 0x13, 0x02, 0x13, 0x03, 0x13, 0x01, 0x00, 0xff]);
    hello.extend_from_slice(&[0x01, 0x00, 0x00, 0x73, 0x00, 0x00, 0x00, 0x0e]);
    hello.extend(std::iter::repeat_n(0u8, 100));
    let r = refused(server.addr, &hello, 400);
    assert!(r.text().contains("TLS"), "{}", r.text());
}

#[test]
fn request_smuggling_is_refused_and_the_connection_closed() {
    let server = Server::start(&[]);
    let json = r#"{"updated_at": "2025-01-12T18:06:42Z"}"#;
    let smuggled = "GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n";
    let cases = [
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n{smuggled}",
            auth(),
            json.len() + 10,
            json.len()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n{smuggled}",
            auth(),
            json.len()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Content-Length: {}\r\nContent-Length: {}\r\n\r\n{json}{smuggled}",
            auth(),
            json.len(),
            json.len() + smuggled.len()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Content-Length: {}, {}\r\n\r\n{json}{smuggled}",
            auth(),
            json.len(),
            json.len() + smuggled.len()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: gzip\r\n\r\n{json}{smuggled}",
            auth()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: gzip, chunked\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n{smuggled}",
            auth(),
            json.len()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n{smuggled}",
            auth(),
            json.len()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\n\r\nzz\r\n{json}\r\n0\r\n\r\n{smuggled}",
            auth()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\n\r\n-{:x}\r\n{json}\r\n0\r\n\r\n{smuggled}",
            auth(),
            json.len()
        ),
        format!(
            "POST /sse/environments/s/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\n\r\n0x{:x}\r\n{json}\r\n0\r\n\r\n{smuggled}",
            auth(),
            json.len()
        ),
    ];
    for raw in &cases {
        // `refused` insists on exactly one response and a graceful close: the smuggled request
        // after the body must not be answered.
        let r = refused(server.addr, raw.as_bytes(), 400);
        assert!(!r.text().is_empty(), "{raw:?}");
    }
    // Nothing was stored by any of them, and the server is still serving.
    let mut sub = Subscriber::connect(server.addr, "s");
    assert_eq!(sub.next(Duration::from_millis(500)), None);
    let r = request(
        server.addr,
        b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
}

#[test]
fn time_formats_are_delivered_with_the_right_updated_at() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let table: &[(&str, &str)] = &[
        (r#""2025-01-12T18:06:42.028060+00:00""#, "1736705202.02806"),
        (r#""2025-01-12T18:06:42.028060Z""#, "1736705202.02806"),
        (r#""2025-01-12T23:36:42.028060+05:30""#, "1736705202.02806"),
        (r#""2025-01-12T10:06:42.028060-08:00""#, "1736705202.02806"),
        (r#""2025-01-12T18:06:42.028060""#, "1736705202.02806"),
        (r#""2025-01-12T18:06:42+00:00""#, "1736705202.0"),
        (r#""2025-01-12T18:06:42Z""#, "1736705202.0"),
        (r#""2025-01-12T23:36:42+05:30""#, "1736705202.0"),
        (r#""2025-01-12T10:06:42-08:00""#, "1736705202.0"),
        (r#""2025-01-12T18:06:42""#, "1736705202.0"),
        (r#""2025-01-12T18:06:42.5+00:00""#, "1736705202.5"),
        (r#""2024-12-26T16:18:08.760412+00:00""#, "1735229888.760412"),
        (r#""2024-12-26T16:18:08.000001+00:00""#, "1735229888.000001"),
        ("1735229888", "1735229888.0"),
        ("1735229888.760412", "1735229888.760412"),
        ("1735229888.5", "1735229888.5"),
    ];
    for (i, (value, want)) in table.iter().enumerate() {
        let key = format!("fmt-{i}");
        let mut sub = Subscriber::connect(server.addr, &key);
        let body = format!(r#"{{"updated_at": {value}, "extra": [1, {{"x": null}}]}}"#);
        let r = queue_change(server.addr, &key, &body);
        assert_eq!(r.status, 200, "{value}: {}", r.text());
        assert_eq!(
            sub.next(Duration::from_secs(5)),
            Some(Item::Update((*want).into())),
            "{value}"
        );
    }
}

#[test]
fn queue_change_body_framings() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let json = r#"{"updated_at": "2025-01-12T18:06:42.028060+00:00"}"#;

    // Content-Length.
    let mut sub = Subscriber::connect(server.addr, "cl");
    let mut s = connect(server.addr);
    s.write_all(post_raw("cl", &auth(), json).as_bytes())
        .unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        sub.next_update(Duration::from_secs(5)).as_deref(),
        Some("1736705202.02806")
    );

    // Chunked, in chunks of several sizes, with an extension and a trailer, sent in pieces.
    let mut sub = Subscriber::connect(server.addr, "chunked");
    let mut s = connect(server.addr);
    let head = format!(
        "POST /sse/environments/chunked/queue-change HTTP/1.1\r\nHost: t\r\n{}Transfer-Encoding: chunked\r\n\r\n",
        auth()
    );
    s.write_all(head.as_bytes()).unwrap();
    let (a, b) = json.split_at(7);
    let (b, c) = b.split_at(20);
    let body = format!(
        "{:x}\r\n{a}\r\n{:X};name=value\r\n{b}\r\n{:x}\r\n{c}\r\n0\r\nX-Trailer: 1\r\n\r\n",
        a.len(),
        b.len(),
        c.len()
    );
    for piece in body.as_bytes().chunks(9) {
        s.write_all(piece).unwrap();
        s.flush().unwrap();
    }
    let r = read_response(&mut s);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sub.next_update(Duration::from_secs(5)).as_deref(),
        Some("1736705202.02806")
    );
    // The connection is still usable.
    s.write_all(b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).status, 200);

    // Expect: 100-continue: the interim response comes before the body is sent.
    for framing in ["cl", "chunked"] {
        let key = format!("expect-{framing}");
        let mut sub = Subscriber::connect(server.addr, &key);
        let mut s = connect(server.addr);
        let (framing_header, body) = if framing == "cl" {
            (format!("Content-Length: {}", json.len()), json.to_owned())
        } else {
            (
                "Transfer-Encoding: chunked".to_owned(),
                format!("{:x}\r\n{json}\r\n0\r\n\r\n", json.len()),
            )
        };
        let head = format!(
            "POST /sse/environments/{key}/queue-change HTTP/1.1\r\nHost: t\r\n{}{framing_header}\r\nExpect: 100-continue\r\n\r\n",
            auth()
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut interim = [0u8; 25];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut interim)
            .expect("100 Continue before the body");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(body.as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            sub.next_update(Duration::from_secs(5)).as_deref(),
            Some("1736705202.02806")
        );
    }

    // A query string on the queue-change path is ignored.
    let mut sub = Subscriber::connect(server.addr, "query");
    let mut s = connect(server.addr);
    let raw = post_raw("query", &auth(), json).replacen(
        "/queue-change HTTP",
        "/queue-change?source=task-processor&x=%20 HTTP",
        1,
    );
    s.write_all(raw.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).status, 200);
    assert_eq!(
        sub.next_update(Duration::from_secs(5)).as_deref(),
        Some("1736705202.02806")
    );

    // Expect: 100-continue with a body over the limit: 413 at once instead of 100.
    let head = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\n{}Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
        auth()
    );
    refused(server.addr, head.as_bytes(), 413);

    // Expect: 100-continue with a bad token: 401 at once, no 100, the body is not awaited.
    let mut s = connect(server.addr);
    let head = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token nope\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        json.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), UNAUTHORIZED);
}

#[test]
fn keep_alive_and_pipelining() {
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let mut sub = Subscriber::connect(server.addr, "pipe");

    // Several requests one after the other on one connection.
    let mut s = connect(server.addr);
    for sec in 0..3 {
        s.write_all(b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"));
        let body = format!(r#"{{"updated_at": "2025-01-12T18:00:0{sec}Z"}}"#);
        s.write_all(post_raw("pipe", &auth(), &body).as_bytes())
            .unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            sub.next_update(Duration::from_secs(5)),
            Some(format!("17367048{sec:02}.0"))
        );
    }

    // Health, queue-change, health, in one write: answered in order on the same connection.
    let body = r#"{"updated_at": "2025-01-12T18:00:09.5Z"}"#;
    let raw = format!(
        "GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n{}GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
        post_raw("pipe", &auth(), body)
    );
    s.write_all(raw.as_bytes()).unwrap();
    let first = read_response(&mut s);
    assert_eq!(
        (first.status, first.text()),
        (200, r#"{"status": "ok"}"#.into())
    );
    let second = read_response(&mut s);
    assert_eq!(second.status, 200, "{}", second.text());
    assert!(second.text().contains("1736704809.5"), "{}", second.text());
    let third = read_response(&mut s);
    assert_eq!(third.status, 200);
    assert_eq!(
        sub.next_update(Duration::from_secs(5)).as_deref(),
        Some("1736704809.5")
    );

    // Many pipelined requests, the last one asking to close.
    let mut raw = String::new();
    for _ in 0..20 {
        raw.push_str("GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n");
    }
    raw.push_str("GET /health/readiness/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(raw.as_bytes()).unwrap();
    let bytes = read_to_close(&mut s, Duration::from_secs(10));
    let mut rest = bytes.as_slice();
    for i in 0..21 {
        let (r, tail) = parse_response(rest);
        assert_eq!(r.status, 200, "response {i}");
        rest = tail;
    }
    assert!(rest.is_empty(), "extra bytes: {rest:?}");

    // An HTTP/1.0 request without keep-alive is answered, then the connection is closed.
    let mut s = connect(server.addr);
    s.write_all(b"GET /health/liveness/ HTTP/1.0\r\n\r\n")
        .unwrap();
    let bytes = read_to_close(&mut s, Duration::from_secs(10));
    assert_eq!(parse_response(&bytes).0.status, 200);
}

#[test]
fn health_endpoints() {
    let server = Server::start(&[]);
    for target in ["/health/liveness/", "/health/readiness/", "/health"] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let r = request(server.addr, raw.as_bytes());
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_cors(&r);
    }
}

#[test]
fn configuration_errors_exit_2_naming_the_variable() {
    let (code, err) = run_binary(&[("PORT", "0"), ("BIND_ADDRESS", "127.0.0.1")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("SSE_AUTHENTICATION_TOKEN"), "{err}");

    let (code, err) = run_binary(&[
        ("SSE_AUTHENTICATION_TOKEN", TOKEN),
        ("PORT", "abc"),
        ("BIND_ADDRESS", "127.0.0.1"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("PORT"), "{err}");
    assert!(err.contains("abc"), "{err}");

    // An empty token counts as missing.
    let (code, err) = run_binary(&[
        ("SSE_AUTHENTICATION_TOKEN", ""),
        ("PORT", "0"),
        ("BIND_ADDRESS", "127.0.0.1"),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("SSE_AUTHENTICATION_TOKEN"), "{err}");
}
