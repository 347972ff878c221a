//! Operations: `/metrics` scraped after known activity (exact values), Redis over TLS (with a
//! certificate made at test time), and Redis ACL users, each against a `redis-server` of the
//! test's own on a free port.
//!
//! The tests run one at a time (the machine may be small, and they wait on timeouts).

mod common;
use common::*;
use flagsmith_sse::store::redis::TIMES_KEY;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A time with non-zero microseconds (2025-01-12T18:06:42.028061Z).
const BASE: i64 = 1_736_705_202_028_061;

/// Reads updates until `micros` arrives (true) or `timeout` passes.
fn wait_update(sub: &mut Subscriber, micros: i64, timeout: Duration) -> bool {
    time_to(sub, micros, timeout).is_some()
}

/// Scrapes `/metrics`; `None` when the server refused the connection (or it failed).
fn scrape(addr: SocketAddr) -> Option<BTreeMap<String, f64>> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return None;
    }
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect(),
    )
}

/// The `want`ed series as `got` has them (absent: NaN, which equals nothing).
fn pick(got: &BTreeMap<String, f64>, want: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    want.keys()
        .map(|k| (k.clone(), got.get(k).copied().unwrap_or(f64::NAN)))
        .collect()
}

/// Scrapes until every series in `want` has exactly its value (5 s at most: the store's
/// counters arrive with the helper's replies), then asserts it. Returns how many scrapes the
/// server refused on the way (each one counts as a `max_connections` rejection).
#[track_caller]
fn expect_metrics(addr: SocketAddr, want: &[(&str, f64)]) -> u32 {
    let want: BTreeMap<String, f64> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut refused = 0;
    let mut last = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match scrape(addr) {
            Some(got) => {
                last = pick(&got, &want);
                if last == want {
                    return refused;
                }
            }
            None => refused += 1,
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let diff: Vec<String> = want
        .iter()
        .filter(|(k, v)| last.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v}, got {}", last[k]))
        .collect();
    panic!("metrics differ:\n{}", diff.join("\n"));
}

/// Sets the expected value of `series`.
fn set(want: &mut Vec<(String, f64)>, series: &str, value: f64) {
    match want.iter_mut().find(|(name, _)| name == series) {
        Some(e) => e.1 = value,
        None => want.push((series.to_owned(), value)),
    }
}

fn redis_series(command: &str, sent: f64, failed: f64) -> [(String, f64); 2] {
    [
        (
            format!("flagsmith_sse_redis_commands_total{{command=\"{command}\"}}"),
            sent,
        ),
        (
            format!("flagsmith_sse_redis_errors_total{{command=\"{command}\"}}"),
            failed,
        ),
    ]
}

/// Reads one response and returns its status, or `None` when the connection was closed
/// before a status line arrived.
fn status_of(s: &mut TcpStream) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n") {
        match s.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8_lossy(&raw)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn metrics_after_known_activity_are_exact() {
    let _serial = serial();
    let mut redis = Redis::start();
    let url = redis.url();
    // No fetch after the first (interval of an hour), no pings (keep-alive of a minute): every
    // count below comes from what the test does.
    let server = Server::start(&[
        ("REDIS_URL", url.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "3600"),
        ("KEEPALIVE_SECONDS", "60"),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
        ("REQUEST_TIMEOUT_SECONDS", "1"),
        ("MAX_CONNECTIONS", "8"),
    ]);
    wait_ready(&server);
    let addr = server.addr;

    let mut want: Vec<(String, f64)> = Vec::new();
    let check = |want: &Vec<(String, f64)>| {
        let w: Vec<(&str, f64)> = want.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        expect_metrics(addr, &w)
    };
    for (k, v) in [
        ("flagsmith_sse_subscribers_active", 0.0),
        ("flagsmith_sse_subscribers_total", 0.0),
        ("flagsmith_sse_events_sent_total", 0.0),
        ("flagsmith_sse_pings_sent_total", 0.0),
        ("flagsmith_sse_environments_cached", 0.0),
        ("flagsmith_sse_store_ready", 1.0),
        ("flagsmith_sse_fanout_duration_seconds_count", 0.0),
    ] {
        set(&mut want, k, v);
    }
    for result in [
        "ok",
        "unauthorized",
        "bad_request",
        "too_large",
        "unavailable",
    ] {
        let k = format!("flagsmith_sse_queue_changes_total{{result=\"{result}\"}}");
        set(&mut want, &k, 0.0);
    }
    for reason in [
        "max_connections",
        "no_descriptors",
        "store_unavailable",
        "stalled",
        "timeout",
        "bad_request",
        "stream_input",
        "request_budget",
    ] {
        let k = format!("flagsmith_sse_connections_rejected_total{{reason=\"{reason}\"}}");
        set(&mut want, &k, 0.0);
    }
    // The first fetch is a snapshot: GET and XREVRANGE in one pipeline, then one HSCAN.
    for (cmd, sent) in [
        ("connect", 1.0),
        ("script_load", 1.0),
        ("get", 1.0),
        ("xrevrange", 1.0),
        ("hscan", 1.0),
        ("xrange", 0.0),
        ("evalsha", 0.0),
    ] {
        for (k, v) in redis_series(cmd, sent, 0.0) {
            set(&mut want, &k, v);
        }
    }
    assert_eq!(check(&want), 0);

    // Subscribers and updates.
    let (t0, t1, t2) = (BASE, BASE + 1_000_001, BASE + 2_000_001);
    let mut a1 = Subscriber::connect(addr, "alpha");
    let mut a2 = Subscriber::connect(addr, "alpha");
    let mut b1 = Subscriber::connect(addr, "beta");
    post_ok(addr, "alpha", t1, t1);
    assert_eq!(a1.next_update(Duration::from_secs(2)), Some(epoch_text(t1)));
    assert_eq!(a2.next_update(Duration::from_secs(2)), Some(epoch_text(t1)));
    // An older time is acknowledged with the newer one stored, and sent to nobody.
    post_ok(addr, "alpha", t0, t1);
    post_ok(addr, "beta", t2, t2);
    assert_eq!(b1.next_update(Duration::from_secs(2)), Some(epoch_text(t2)));
    let mut late = Subscriber::connect(addr, "alpha");
    assert_eq!(
        late.next_update(Duration::from_secs(2)),
        Some(epoch_text(t1))
    );
    assert_eq!(redis.calls("evalsha"), 3);
    drop(a2);
    drop(late);

    // Refused queue-changes.
    let r = queue_change_with(
        addr,
        "alpha",
        &format!("{{\"updated_at\": {t2}}}"),
        Some("no"),
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        queue_change(addr, "alpha", r#"{"updated_at": "yesterday"}"#).status,
        400
    );
    assert_eq!(queue_change(addr, "alpha", "not json").status, 400);
    let big = format!("{{\"updated_at\": 1, \"pad\": \"{}\"}}", "x".repeat(70_000));
    assert_eq!(queue_change(addr, "alpha", &big).status, 413);
    // A request that is not HTTP.
    assert_eq!(request(addr, b"GARBAGE\r\n\r\n").status, 400);

    set(&mut want, "flagsmith_sse_subscribers_active", 2.0);
    set(&mut want, "flagsmith_sse_subscribers_total", 4.0);
    // a1, a2 and b1 got one update each; the late subscriber got alpha's time on connect.
    set(&mut want, "flagsmith_sse_events_sent_total", 4.0);
    set(&mut want, "flagsmith_sse_environments_cached", 2.0);
    set(
        &mut want,
        "flagsmith_sse_fanout_duration_seconds_count",
        2.0,
    );
    set(
        &mut want,
        "flagsmith_sse_queue_changes_total{result=\"ok\"}",
        3.0,
    );
    set(
        &mut want,
        "flagsmith_sse_queue_changes_total{result=\"unauthorized\"}",
        1.0,
    );
    set(
        &mut want,
        "flagsmith_sse_queue_changes_total{result=\"bad_request\"}",
        2.0,
    );
    set(
        &mut want,
        "flagsmith_sse_queue_changes_total{result=\"too_large\"}",
        1.0,
    );
    set(
        &mut want,
        "flagsmith_sse_connections_rejected_total{reason=\"bad_request\"}",
        1.0,
    );
    for (k, v) in redis_series("evalsha", 3.0, 0.0) {
        set(&mut want, &k, v);
    }
    assert_eq!(check(&want), 0);

    // Redis goes away: the stale connection fails the write, one reconnection is refused.
    redis.stop();
    let r = post_micros(addr, "alpha", t2);
    assert_eq!(r.status, 503, "{}", r.text());
    set(
        &mut want,
        "flagsmith_sse_queue_changes_total{result=\"unavailable\"}",
        1.0,
    );
    for (k, v) in redis_series("evalsha", 4.0, 1.0)
        .into_iter()
        .chain(redis_series("connect", 2.0, 1.0))
    {
        set(&mut want, &k, v);
    }
    assert_eq!(check(&want), 0);

    // Two streams are open and MAX_CONNECTIONS is 8: of seven more connections at least one
    // is refused at once (503); those taken on send nothing and time out (408). Connections
    // still closing from earlier requests may take a place too, so the test counts.
    let mut extra: Vec<TcpStream> = (0..7)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let statuses: Vec<Option<u16>> = extra.iter_mut().map(status_of).collect();
    let refused = statuses.iter().filter(|s| **s == Some(503)).count();
    let timed_out = statuses.iter().filter(|s| **s == Some(408)).count();
    assert_eq!(refused + timed_out, 7, "{statuses:?}");
    assert!(refused >= 1, "{statuses:?}");
    drop(extra);
    set(
        &mut want,
        "flagsmith_sse_connections_rejected_total{reason=\"timeout\"}",
        timed_out as f64,
    );
    // Scrapes refused while connections are still closing count as well: expect_metrics
    // returns how many there were, and the check is repeated with them included.
    let mut refused_scrapes = 0;
    loop {
        set(
            &mut want,
            "flagsmith_sse_connections_rejected_total{reason=\"max_connections\"}",
            (refused + refused_scrapes) as f64,
        );
        let more = check(&want) as usize;
        if more == 0 {
            break;
        }
        refused_scrapes += more;
    }
    println!("statuses of the extra connections: {statuses:?}; scrapes refused: {refused_scrapes}");
    assert!(!a1.ended && !b1.ended);
}

/// The `redis-server` argument for an ACL user `sse` allowed only the keys and commands the
/// service uses (given to [`Redis::start_acl`], which adds `admin` for the test).
const SSE_USER: &[&str] = &[
    "--user",
    "sse",
    "on",
    ">S3cret-pw",
    "resetkeys",
    "~{flagsmith_sse}:*",
    "-@all",
    "+evalsha",
    "+script|load",
    "+get",
    "+xrange",
    "+xrevrange",
    "+hscan",
    "+ping",
    // Wake-ups: the listener subscribes, the script publishes.
    "resetchannels",
    "&{flagsmith_sse}:wake",
    "+subscribe",
    "+publish",
    // Called by the Lua script.
    "+exists",
    "+set",
    "+hget",
    "+hset",
    "+xadd",
    "+xtrim",
];

#[test]
fn an_acl_user_limited_to_the_sse_keys_and_commands_is_enough() {
    let _serial = serial();
    let redis = Redis::start_acl(SSE_USER);
    let port = redis.port.to_string();
    let settings = [
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
    ];
    let mut a_env = vec![
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", port.as_str()),
        ("REDIS_USERNAME", "sse"),
        ("REDIS_PASSWORD", "S3cret-pw"),
    ];
    a_env.extend_from_slice(&settings);
    let a = Server::start(&a_env);
    let url = format!("redis://sse:S3cret-pw@127.0.0.1:{port}/0");
    let mut b_env = vec![("REDIS_URL", url.as_str())];
    b_env.extend_from_slice(&settings);
    let b = Server::start(&b_env);
    wait_ready(&a);
    wait_ready(&b);

    let mut on_b = Subscriber::connect(b.addr, "acl-env");
    post_ok(a.addr, "acl-env", BASE, BASE);
    assert_eq!(
        on_b.next_update(Duration::from_secs(3)),
        Some(epoch_text(BASE))
    );
    post_ok(b.addr, "acl-env", BASE + 5, BASE + 5);
    // a hears of b's write at its next fetch.
    let mut on_a = Subscriber::connect(a.addr, "acl-env");
    assert!(wait_update(&mut on_a, BASE + 5, Duration::from_secs(3)));
    assert_eq!(
        redis
            .cli(&["HGET", TIMES_KEY, "acl-env"])
            .unwrap_or_default()
            .trim(),
        (BASE + 5).to_string()
    );
    // Not one command of either instance was denied, not even one whose error is ignored.
    let denied = redis.cli(&["ACL", "LOG"]).unwrap_or_default();
    assert!(denied.trim().is_empty(), "ACL LOG:\n{denied}");
    for server in [&a, &b] {
        let log = server.log();
        assert!(log.contains("redis://***@127.0.0.1:"), "{log}");
        assert!(
            !log.contains("S3cret-pw"),
            "the password is in the log:\n{log}"
        );
    }
}

#[test]
fn a_wrong_redis_password_fails_cleanly_and_recovers_once_it_is_right() {
    let _serial = serial();
    let redis = Redis::start_acl(SSE_USER);
    let port = redis.port.to_string();
    let mut server = Server::start(&[
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", port.as_str()),
        ("REDIS_USERNAME", "sse"),
        ("REDIS_PASSWORD", "not-the-password"),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
    ]);
    server.assert_log("Redis connection failed", Duration::from_secs(5));
    assert!(
        server.log().contains("Password authentication failed"),
        "the log does not say why:\n{}",
        server.log()
    );
    assert_eq!(readiness(server.addr), 503);
    let asked = Instant::now();
    let r = post_micros(server.addr, "acl-env", BASE);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert!(wait_until(Duration::from_secs(3), || stream_head(
        server.addr,
        "acl-env"
    ) == (503, true)));
    let live = request(
        server.addr,
        b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(live.status, 200);
    assert!(
        server.wait_exit(Duration::ZERO).is_none(),
        "the server exited"
    );
    let m = server.metrics();
    assert_eq!(
        m["flagsmith_sse_queue_changes_total{result=\"unavailable\"}"],
        1.0
    );
    assert!(m["flagsmith_sse_redis_errors_total{command=\"connect\"}"] >= 1.0);
    assert_eq!(
        m["flagsmith_sse_redis_errors_total{command=\"connect\"}"],
        m["flagsmith_sse_redis_commands_total{command=\"connect\"}"]
    );
    assert!(!server.log().contains("not-the-password"));

    // The operator fixes the credentials on the Redis side: the server recovers by itself.
    assert!(
        redis
            .cli(&["ACL", "SETUSER", "sse", ">not-the-password"])
            .is_some_and(|o| o.contains("OK"))
    );
    let fixed = Instant::now();
    wait_ready(&server);
    println!(
        "ready {:?} after the password was accepted",
        fixed.elapsed()
    );
    assert!(
        fixed.elapsed() < Duration::from_secs(4),
        "{:?}",
        fixed.elapsed()
    );
    let mut sub = Subscriber::connect(server.addr, "acl-env");
    post_ok(server.addr, "acl-env", BASE, BASE);
    assert_eq!(
        sub.next_update(Duration::from_secs(2)),
        Some(epoch_text(BASE))
    );
}

#[cfg(feature = "tls")]
#[test]
fn redis_over_tls_by_url_and_by_redis_use_ssl() {
    let _serial = serial();
    let certs = Certs::generate("trusted");
    let redis = Redis::start_tls(&certs);
    let ca = certs.path("ca.crt");
    let port = redis.port.to_string();
    let url = format!("rediss://localhost:{port}/0");
    let settings = [
        ("SSL_CERT_FILE", ca.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
    ];
    let mut a_env = vec![("REDIS_URL", url.as_str())];
    a_env.extend_from_slice(&settings);
    let a = Server::start(&a_env);
    let mut b_env = vec![
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", port.as_str()),
        ("REDIS_USE_SSL", "true"),
    ];
    b_env.extend_from_slice(&settings);
    let b = Server::start(&b_env);
    wait_ready(&a);
    wait_ready(&b);
    assert!(a.log().contains(&format!("rediss://localhost:{port}/0")));
    assert!(b.log().contains(&format!("rediss://127.0.0.1:{port}/0")));

    let mut on_b = Subscriber::connect(b.addr, "tls-env");
    post_ok(a.addr, "tls-env", BASE, BASE);
    assert_eq!(
        on_b.next_update(Duration::from_secs(3)),
        Some(epoch_text(BASE))
    );
    post_ok(b.addr, "tls-env", BASE + 7, BASE + 7);
    let mut on_a = Subscriber::connect(a.addr, "tls-env");
    assert!(wait_update(&mut on_a, BASE + 7, Duration::from_secs(3)));
    // This redis-server has no plain-text port: the times went over TLS.
    assert_eq!(
        redis
            .cli(&["HGET", TIMES_KEY, "tls-env"])
            .unwrap_or_default()
            .trim(),
        (BASE + 7).to_string()
    );
}

#[cfg(feature = "tls")]
#[test]
fn redis_over_tls_refuses_an_untrusted_certificate_and_plain_text() {
    let _serial = serial();
    let certs = Certs::generate("server");
    let other = Certs::generate("other");
    let redis = Redis::start_tls(&certs);
    let port = redis.port;
    let settings = [
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
    ];
    let tls_url = format!("rediss://localhost:{port}/0");
    let plain_url = format!("redis://127.0.0.1:{port}/0");
    let other_ca = other.path("ca.crt");
    let cases = [
        (
            vec![
                ("REDIS_URL", tls_url.as_str()),
                ("SSL_CERT_FILE", other_ca.as_str()),
            ],
            "UnknownIssuer",
        ),
        (vec![("REDIS_URL", plain_url.as_str())], ""),
    ];
    for (env, why) in cases {
        let mut env = env;
        env.extend_from_slice(&settings);
        let mut server = Server::start(&env);
        server.assert_log("Redis connection failed", Duration::from_secs(5));
        assert!(server.log().contains(why), "{}", server.log());
        assert_eq!(readiness(server.addr), 503);
        let r = post_micros(server.addr, "tls-env", BASE);
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        assert!(
            server.wait_exit(Duration::ZERO).is_none(),
            "the server exited"
        );
    }
    // The same Redis with the right CA: the failures above were about trust alone.
    let ca = certs.path("ca.crt");
    let good = Server::start(&[
        ("REDIS_URL", tls_url.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
    ]);
    wait_ready(&good);
    post_ok(good.addr, "tls-env", BASE, BASE);
}

/// Runs the binary with only `env` and returns (exit code, stderr).
fn start_error(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = binary()
        .env("SSE_AUTHENTICATION_TOKEN", TOKEN)
        .env("PORT", "0")
        .envs(env.iter().copied())
        .output()
        .expect("run flagsmith-sse");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cluster_mode_that_cannot_work_exits_2_naming_the_variable() {
    let (code, err) = start_error(&[("USE_CLUSTER_MODE", "true")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("USE_CLUSTER_MODE"), "{err}");
    let why = if cfg!(feature = "cluster") {
        "needs REDIS_URL or REDIS_HOST"
    } else {
        "--features cluster"
    };
    assert!(err.contains(why), "{err}");
}

#[cfg(not(feature = "tls"))]
#[test]
fn tls_in_a_build_without_it_exits_2_naming_the_variable() {
    for (env, var) in [
        (
            [("REDIS_HOST", "127.0.0.1"), ("REDIS_USE_SSL", "true")],
            "REDIS_USE_SSL",
        ),
        (
            [
                ("REDIS_URL", "rediss://127.0.0.1:6380/0"),
                ("LOG_LEVEL", "info"),
            ],
            "REDIS_URL",
        ),
    ] {
        let (code, err) = start_error(&env);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(var) && err.contains("--features tls"), "{err}");
    }
}

/// GETs `/admin/environments` with the given `Authorization` header line (or none).
fn admin(addr: SocketAddr, auth: Option<&str>) -> Response {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    request(
        addr,
        format!("GET /admin/environments HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
}

/// Polls `/admin/environments` until its body starts with `prefix`; returns the last body.
#[track_caller]
fn admin_until(addr: SocketAddr, prefix: &str, timeout: Duration) -> String {
    let token = format!("Token {TOKEN}");
    let mut last = String::new();
    let ok = wait_until(timeout, || {
        let r = admin(addr, Some(&token));
        assert_eq!(r.status, 200, "{}", r.text());
        last = r.text();
        last.starts_with(prefix)
    });
    assert!(ok, "wanted a body starting with {prefix}\ngot {last}");
    last
}

#[test]
fn admin_environments_lists_subscribed_environments_largest_first() {
    let _serial = serial();
    let server = Server::start(&[("STREAM_DELAY", "0"), ("MAX_STREAM_AGE", "-1")]);
    let addr = server.addr;
    let empty = r#"{"environments_with_subscribers": 0, "subscribers": 0, "listed": 0, "environments": []}"#;
    assert_eq!(admin_until(addr, empty, Duration::from_secs(5)), empty);

    // A known time for "mid" only; "big" has more subscribers, "small" fewer.
    post_ok(addr, "mid", BASE, BASE);
    let mut subs: Vec<Subscriber> = Vec::new();
    for (key, n) in [("small", 1), ("mid", 2), ("big", 3)] {
        for _ in 0..n {
            subs.push(Subscriber::connect(addr, key));
        }
    }
    let want = format!(
        "{{\"environments_with_subscribers\": 3, \"subscribers\": 6, \"listed\": 3, \"environments\": [\
         {{\"key\": \"big\", \"subscribers\": 3, \"updated_at\": null}}, \
         {{\"key\": \"mid\", \"subscribers\": 2, \"updated_at\": {}}}, \
         {{\"key\": \"small\", \"subscribers\": 1, \"updated_at\": null}}]}}",
        epoch_text(BASE)
    );
    assert_eq!(admin_until(addr, &want, Duration::from_secs(10)), want);

    // The newest time is the one events carry; a closed subscriber leaves the count.
    post_ok(addr, "big", BASE + 1, BASE + 1);
    subs.remove(0);
    let want = format!(
        "{{\"environments_with_subscribers\": 2, \"subscribers\": 5, \"listed\": 2, \"environments\": [\
         {{\"key\": \"big\", \"subscribers\": 3, \"updated_at\": {}}}, \
         {{\"key\": \"mid\", \"subscribers\": 2, \"updated_at\": {}}}]}}",
        epoch_text(BASE + 1),
        epoch_text(BASE)
    );
    assert_eq!(admin_until(addr, &want, Duration::from_secs(10)), want);
    let r = admin(addr, Some(&format!("Token {TOKEN}")));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));

    // Without the token, with a wrong one or another scheme: the queue-change's 401.
    for auth in [None, Some("Token nope"), Some(&*format!("Bearer {TOKEN}"))] {
        let r = admin(addr, auth);
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(
            r.text(),
            r#"{"detail": "Invalid authorization header"}"#,
            "{auth:?}"
        );
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    }
    // Other methods: 405 with Allow; a preflight names the methods.
    let r = request(
        addr,
        b"DELETE /admin/environments HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, OPTIONS"));
    let r = request(
        addr,
        b"OPTIONS /admin/environments HTTP/1.1\r\nHost: t\r\nOrigin: http://x\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, OPTIONS")
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    drop(subs);
}

#[test]
fn admin_environments_lists_at_most_1000_and_counts_them_all() {
    let _serial = serial();
    let server = Server::start(&[("MAX_STREAM_AGE", "-1"), ("KEEPALIVE_SECONDS", "600")]);
    let addr = server.addr;
    // 1,001 environments with one subscriber each and one with two: 1,002 environments. The
    // list holds "top", then the single ones by key; the last two keys are left out.
    let mut socks = Vec::new();
    for key in (0..1001)
        .map(|i| format!("e{i:04}"))
        .chain(["top".to_owned(), "top".to_owned()])
    {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(stream_request(&key).as_bytes())
            .expect("subscribe");
        socks.push(s);
    }
    let body = admin_until(
        addr,
        r#"{"environments_with_subscribers": 1002, "subscribers": 1003, "listed": 1000, "environments": [{"key": "top", "subscribers": 2, "updated_at": null}, {"key": "e0000", "subscribers": 1, "updated_at": null}, "#,
        Duration::from_secs(60),
    );
    assert_eq!(body.matches("\"key\": ").count(), 1000);
    assert!(
        body.ends_with(r#"{"key": "e0998", "subscribers": 1, "updated_at": null}]}"#),
        "{}",
        &body[body.len().saturating_sub(200)..]
    );
    assert!(!body.contains("e0999") && !body.contains("e1000"));
}

#[test]
fn metrics_carry_build_info_and_the_process_series() {
    let _serial = serial();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let server = Server::start(&[]);
    let m = server.metrics();
    let version = format!(
        "flagsmith_sse_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(m.get(&version), Some(&1.0), "{m:?}");
    let get = |name: &str| *m.get(name).unwrap_or_else(|| panic!("no {name}: {m:?}"));

    let start = get("process_start_time_seconds");
    // The start time has a clock tick's resolution (and the boot time a second's).
    assert!(
        start > before - 2.0 && start < before + 30.0,
        "{start} vs {before}"
    );
    let rss = get("process_resident_memory_bytes");
    let vm_rss = server.proc_status_kb("VmRSS:").expect("VmRSS") as f64 * 1024.0;
    assert!(
        rss > 0.0 && rss < 4.0 * vm_rss && vm_rss < 4.0 * rss,
        "{rss} vs {vm_rss}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("soft open-file limit");
    assert_eq!(get("process_max_fds"), soft);

    // Ten more open connections show in process_open_fds; CPU time only grows.
    let fds = get("process_open_fds");
    let cpu = get("process_cpu_seconds_total");
    assert!(fds >= 5.0 && fds < soft, "{fds}");
    let held: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(server.addr).expect("connect"))
        .collect();
    let mut later = HashMap::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            later = server.metrics();
            later
                .get("process_open_fds")
                .is_some_and(|n| *n >= fds + 10.0)
        }),
        "{later:?}"
    );
    assert!(later["process_cpu_seconds_total"] >= cpu);
    drop(held);
}
