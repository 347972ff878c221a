//! The store under failure, with the real binary and real `redis-server` processes: a primary
//! demoted to a read-only replica and promoted again, `REDIS_WAIT_REPLICAS` with a real replica
//! that stops or dies, a store that stops answering in the middle of a reply, and times too far
//! in the future (refused, and the repair documented in docs/REDIS.md of one already stored).
//!
//! The tests run one at a time (they measure latencies, and the machine may be small).

mod common;
use common::*;
use flagsmith_sse::store::redis::TIMES_KEY;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A time with non-zero microseconds (2025-01-12T18:06:42.028061Z).
const BASE: i64 = 1_736_705_202_028_061;

/// An instance on `redis_url` fetching every 0.2 s, with `extra` settings.
#[track_caller]
fn instance(redis_url: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("REDIS_URL", redis_url),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
    ];
    env.extend_from_slice(extra);
    Server::start(&env)
}

fn now_micros() -> i64 {
    flagsmith_sse::timestamp::now_micros()
}

#[test]
fn a_primary_demoted_to_replica_gets_503s_until_promoted_again() {
    let _serial = serial();
    let a = Redis::start();
    let b = Redis::start();
    let server = instance(&a.url(), &[]);
    wait_ready(&server);
    let mut sub = Subscriber::connect(server.addr, "failover");
    post_ok(server.addr, "failover", BASE, BASE);
    assert_next_update(&mut sub, BASE, Duration::from_secs(3));
    let connects = "flagsmith_sse_redis_commands_total{command=\"connect\"}";
    let connects_before = metric(&server, connects);

    // A becomes a replica of B: what the old primary looks like after a failover.
    let b_port = b.port.to_string();
    a.cli(&["REPLICAOF", "127.0.0.1", &b_port]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || a
        .cli(&["INFO", "replication"])
        .is_some_and(|i| i.contains("role:slave"))));
    let demoted = Instant::now();
    // Readiness says so before any queue-change tries: fetches check that writes work.
    assert!(
        readiness_within(server.addr, 503, Duration::from_secs(3)),
        "readiness stays 200 while the node refuses writes"
    );
    println!(
        "readiness 503 {:?} after A became a replica",
        demoted.elapsed()
    );
    let mut statuses = Vec::new();
    for i in 0..5 {
        let r = post_micros(server.addr, "failover", BASE + 1 + i);
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
        statuses.push(r.text());
    }
    println!("queue-changes while A is a replica: {statuses:?}");
    assert!(
        statuses.iter().all(|t| t.contains("cannot take writes")),
        "{statuses:?}"
    );
    // It stays 503 while the node refuses writes (fetches keep finding it read-only).
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(2) {
        assert_eq!(readiness(server.addr), 503);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!sub.ended, "the stream was closed during the failover");
    server.assert_log("READONLY", Duration::from_secs(1));

    // A is promoted again: 200s within a few seconds, and the subscriber gets the change.
    a.cli(&["REPLICAOF", "NO", "ONE"]).unwrap();
    let promoted = Instant::now();
    let t = BASE + 1_000_001;
    let mut first_ok = None;
    let mut posts = 0;
    while promoted.elapsed() < Duration::from_secs(10) {
        posts += 1;
        let r = post_micros(server.addr, "failover", t);
        if r.status == 200 {
            first_ok = Some(promoted.elapsed());
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_ok = first_ok.expect("no 200 within 10 s of REPLICAOF NO ONE");
    println!("REPLICAOF NO ONE to the first 200: {first_ok:?} ({posts} posts)");
    assert!(first_ok < Duration::from_secs(5), "{first_ok:?}");
    assert_next_update(&mut sub, t, Duration::from_secs(3));
    assert!(
        readiness_within(server.addr, 200, Duration::from_secs(3)),
        "readiness not back"
    );
    assert!(
        metric(&server, connects) > connects_before,
        "the connection was not replaced"
    );
    assert!(
        metric(
            &server,
            "flagsmith_sse_redis_errors_total{command=\"xtrim\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &server,
            "flagsmith_sse_queue_changes_total{result=\"unavailable\"}"
        ) >= 5.0
    );
}

#[test]
fn redis_wait_replicas_answers_200_only_once_a_replica_acknowledged() {
    let _serial = serial();
    let primary = Redis::start();
    let primary_port = primary.port.to_string();
    let mut replica = Redis::start_args(&["--replicaof", "127.0.0.1", &primary_port]);
    replica.wait_linked(Duration::from_secs(10));
    let server = instance(&primary.url(), &[("REDIS_WAIT_REPLICAS", "1")]);
    wait_ready(&server);
    let mut sub = Subscriber::connect(server.addr, "waited");
    let wait = "flagsmith_sse_redis_commands_total{command=\"wait\"}";

    let mut ok_times = Vec::new();
    for i in 0..3 {
        let asked = Instant::now();
        post_ok(server.addr, "waited", BASE + i, BASE + i);
        ok_times.push(asked.elapsed());
    }
    println!("200 with the replica up: {ok_times:?}");
    assert_eq!(
        replica.cli(&["HGET", TIMES_KEY, "waited"]).as_deref(),
        Some(format!("{}\n", BASE + 2).as_str()),
        "the replica does not hold the acknowledged write"
    );
    assert!(metric(&server, wait) >= 3.0);

    // The replica stops answering: the write is made on the primary, but not acknowledged.
    signal_pid(replica.pid(), "STOP");
    let mut refused = Vec::new();
    for i in 0..3 {
        let asked = Instant::now();
        let r = post_micros(server.addr, "waited", BASE + 10 + i);
        refused.push(asked.elapsed());
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        assert!(r.text().contains("0 of 1 replicas"), "{}", r.text());
    }
    println!("503 with the replica stopped: {refused:?}");
    assert!(
        refused.iter().all(|d| *d < Duration::from_millis(2500)),
        "{refused:?}"
    );
    // Nothing is lost: the unacknowledged writes are in the primary, and fetches deliver them.
    let mut last = String::new();
    while let Some(v) = sub.next_update(Duration::from_millis(1500)) {
        last = v;
    }
    assert_eq!(last, epoch_text(BASE + 12));

    signal_pid(replica.pid(), "CONT");
    assert!(
        accepted_within(server.addr, "waited", BASE + 20, Duration::from_secs(10)),
        "no 200 after the replica resumed"
    );

    // The replica dies.
    replica.stop();
    let asked = Instant::now();
    let r = post_micros(server.addr, "waited", BASE + 30);
    let took = asked.elapsed();
    println!("503 with the replica killed: {took:?}");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert!(metric(&server, wait) >= 8.0);
}

/// A TCP relay in front of a real `redis-server` that can be told to pass Redis's replies on
/// one byte every 700 ms: the server's Redis client keeps getting bytes within its read
/// timeout, so the store helper stays inside one call for as long as the relay is slow.
struct SlowRelay {
    port: u16,
    slow: Arc<AtomicBool>,
}

impl SlowRelay {
    fn start(redis_port: u16) -> SlowRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let slow = Arc::new(AtomicBool::new(false));
        let flag = slow.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                let (mut c_in, mut u_out) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n @ 1..) = c_in.read(&mut buf) {
                        if u_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = u_out.shutdown(std::net::Shutdown::Both);
                });
                let (mut u_in, mut c_out) = (upstream, client);
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n @ 1..) = u_in.read(&mut buf) {
                        let mut rest = &buf[..n];
                        while !rest.is_empty() && flag.load(Ordering::SeqCst) {
                            if c_out.write_all(&rest[..1]).is_err() {
                                return;
                            }
                            rest = &rest[1..];
                            std::thread::sleep(Duration::from_millis(700));
                        }
                        if c_out.write_all(rest).is_err() {
                            return;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        SlowRelay { port, slow }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// Sends one request on a keep-alive connection and reads its response.
fn exchange(sock: &mut TcpStream, raw: &str) -> Response {
    sock.write_all(raw.as_bytes()).expect("send");
    read_response(sock)
}

fn queue_change_request(key: &str, micros: i64) -> String {
    let body = format!("{{\"updated_at\": {}}}", epoch_text(micros));
    format!(
        "POST /sse/environments/{key}/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn a_store_stuck_inside_a_call_gets_503s_and_its_late_answer_is_not_lost() {
    let _serial = serial();
    let redis = Redis::start();
    let relay = SlowRelay::start(redis.port);
    let server = instance(&relay.url(), &[]);
    wait_ready(&server);
    let mut sub = Subscriber::connect(server.addr, "stuck");
    let mut poster = TcpStream::connect(server.addr).unwrap();
    let r = exchange(&mut poster, &queue_change_request("stuck", BASE));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_next_update(&mut sub, BASE, Duration::from_secs(3));
    let unavailable = "flagsmith_sse_queue_changes_total{result=\"unavailable\"}";
    let ok = "flagsmith_sse_queue_changes_total{result=\"ok\"}";
    let (unavailable_before, ok_before) = (metric(&server, unavailable), metric(&server, ok));

    // From now on every Redis reply crawls: the helper is stuck inside its next call.
    relay.slow.store(true, Ordering::SeqCst);
    let stuck = Instant::now();
    assert!(
        readiness_within(server.addr, 503, Duration::from_secs(5)),
        "readiness stays 200 while the store helper is stuck"
    );
    println!(
        "readiness 503 {:?} after the store got stuck",
        stuck.elapsed()
    );
    let asked = Instant::now();
    let r = exchange(&mut poster, &queue_change_request("stuck", BASE + 1));
    let took = asked.elapsed();
    println!(
        "queue-change with the store stuck: {} after {took:?}",
        r.status
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert!(r.text().contains("did not answer"), "{}", r.text());
    assert!(took >= Duration::from_millis(2500), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The loop itself is not waiting: probes and new streams are answered meanwhile.
    assert_eq!(readiness(server.addr), 503);
    assert_eq!(stream_head(server.addr, "stuck-new"), (503, true));

    // Redis answers at full speed again: the late write completes and reaches the subscriber,
    // and the queue-change it belonged to is not answered a second time.
    relay.slow.store(false, Ordering::SeqCst);
    assert_next_update(&mut sub, BASE + 1, Duration::from_secs(10));
    let r = exchange(
        &mut poster,
        "GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "{\"status\": \"ok\"}");
    poster
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut extra = [0u8; 64];
    match poster.read(&mut extra) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("unexpected bytes after the last response: {other:?}"),
    }
    let r = exchange(&mut poster, &queue_change_request("stuck", BASE + 2));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_next_update(&mut sub, BASE + 2, Duration::from_secs(3));
    assert!(readiness_within(server.addr, 200, Duration::from_secs(5)));
    assert_eq!(metric(&server, unavailable) - unavailable_before, 1.0);
    assert_eq!(metric(&server, ok) - ok_before, 1.0);
}

#[test]
fn a_time_far_in_the_future_is_refused() {
    let _serial = serial();
    let server = Server::start(&[("STREAM_DELAY", "0")]);
    let bad = "flagsmith_sse_queue_changes_total{result=\"bad_request\"}";
    let r = queue_change(
        server.addr,
        "future",
        "{\"updated_at\": \"9999-01-01T00:00:00+00:00\"}",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.text(),
        "{\"detail\": \"updated_at is more than 3600 s in the future\"}"
    );
    let in_an_hour_and_a_minute = now_micros() + 3_660_000_000;
    assert_eq!(
        post_micros(server.addr, "future", in_an_hour_and_a_minute).status,
        400
    );
    assert_eq!(metric(&server, bad), 2.0);
    let in_59_minutes = now_micros() + 3_540_000_000;
    post_ok(server.addr, "future", in_59_minutes, in_59_minutes);
    let now = now_micros();
    post_ok(server.addr, "present", now, now);

    let off = Server::start(&[("MAX_FUTURE_SECONDS", "0")]);
    let r = queue_change(
        off.addr,
        "future",
        "{\"updated_at\": \"9999-01-01T00:00:00+00:00\"}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let limited = Server::start(&[("MAX_FUTURE_SECONDS", "10")]);
    let r = post_micros(limited.addr, "future", now_micros() + 60_000_000);
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("more than 10 s in the future"),
        "{}",
        r.text()
    );
}

#[test]
fn the_readme_repair_of_a_stored_future_time_works() {
    let _serial = serial();
    let redis = Redis::start();
    let url = redis.url();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
    ];
    // An instance without the check (or from before it) stored a time in year 9999.
    let mut old_env = env.to_vec();
    old_env.push(("MAX_FUTURE_SECONDS", "0"));
    let a = Server::start(&old_env);
    let b = Server::start(&env);
    wait_ready(&a);
    wait_ready(&b);
    let r = queue_change(
        a.addr,
        "frozen",
        "{\"updated_at\": \"9999-01-01T00:00:00+00:00\"}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let year_9999 = 253_370_764_800_000_000;
    let now = now_micros();
    // The environment is frozen: a real change stores nothing new, anywhere.
    post_ok(b.addr, "frozen", now, year_9999);
    let mut on_b = Subscriber::connect(b.addr, "frozen");
    assert_next_update(&mut on_b, year_9999, Duration::from_secs(3));

    // The documented repair (docs/REDIS.md): put a sane time into the hash ...
    let repaired = now_micros();
    redis
        .cli(&[
            "HSET",
            "{flagsmith_sse}:times",
            "frozen",
            &repaired.to_string(),
        ])
        .expect("redis-cli HSET");
    // ... (a running instance keeps its newer cached time: that is why each one restarts) ...
    let mut still = Subscriber::connect(b.addr, "frozen");
    assert_next_update(&mut still, year_9999, Duration::from_secs(3));
    // (Nor does a new epoch help: the instances load a snapshot, and keep their newer time.)
    b.assert_log(
        "loaded a snapshot of 1 environments",
        Duration::from_secs(3),
    );
    redis
        .cli(&["SET", "{flagsmith_sse}:epoch", "operator-repair"])
        .unwrap();
    b.assert_log("epoch changed", Duration::from_secs(3));
    let mut after_epoch = Subscriber::connect(b.addr, "frozen");
    assert_next_update(&mut after_epoch, year_9999, Duration::from_secs(3));
    // ... and restart every instance.
    drop((a, b, on_b, still, after_epoch));
    let a = Server::start(&env);
    let b = Server::start(&env);
    wait_ready(&a);
    wait_ready(&b);
    let mut on_a = Subscriber::connect(a.addr, "frozen");
    let mut on_b = Subscriber::connect(b.addr, "frozen");
    assert_next_update(&mut on_a, repaired, Duration::from_secs(3));
    assert_next_update(&mut on_b, repaired, Duration::from_secs(3));
    let next = repaired + 1_000_001;
    post_ok(a.addr, "frozen", next, next);
    assert_next_update(&mut on_a, next, Duration::from_secs(3));
    assert_next_update(&mut on_b, next, Duration::from_secs(3));
}

#[test]
fn in_a_cluster_wait_goes_to_the_node_holding_the_slot() {
    let _serial = serial();
    let cluster = Cluster::start();
    let replica = cluster.add_replica(cluster.owner_of(TIMES_KEY));
    assert!(cluster.wait_ok(Duration::from_secs(20)));
    let urls = cluster.urls();
    let server = Server::start(&[
        ("USE_CLUSTER_MODE", "true"),
        ("REDIS_URL", urls.as_str()),
        ("REDIS_WAIT_REPLICAS", "1"),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
    ]);
    wait_ready(&server);
    post_ok(server.addr, "clustered", BASE, BASE);
    post_ok(server.addr, "clustered", BASE + 1, BASE + 1);
    // A cluster replica answers reads only after READONLY on the same connection.
    let mut cli = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &replica.port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    cli.stdin
        .take()
        .unwrap()
        .write_all(format!("READONLY\nHGET {TIMES_KEY} clustered\n").as_bytes())
        .unwrap();
    let out = cli.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&(BASE + 1).to_string()),
        "the replica does not hold the acknowledged write: {text}"
    );
    signal_pid(replica.pid(), "STOP");
    let asked = Instant::now();
    let r = post_micros(server.addr, "clustered", BASE + 2);
    let took = asked.elapsed();
    signal_pid(replica.pid(), "CONT");
    println!("cluster, replica stopped: {} after {took:?}", r.status);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("0 of 1 replicas"), "{}", r.text());
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert!(
        accepted_within(server.addr, "clustered", BASE + 3, Duration::from_secs(10)),
        "no 200 after the replica resumed"
    );
    assert!(
        metric(
            &server,
            "flagsmith_sse_redis_commands_total{command=\"wait\"}"
        ) >= 4.0
    );
    assert_eq!(
        metric(
            &server,
            "flagsmith_sse_redis_errors_total{command=\"wait\"}"
        ),
        0.0
    );
}

#[test]
fn readiness_follows_the_time_since_the_last_fetch_not_only_its_errors() {
    let _serial = serial();
    let redis = Redis::start();
    let pid = redis.process_id();
    let url = redis.url();
    let server = Server::start(&[
        ("REDIS_URL", url.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
    ]);
    wait_ready(&server);
    // A hung Redis: the helper sits in a read that times out only after 2 s, but three
    // intervals (0.6 s) without a completed fetch are enough for readiness to say 503.
    signal_pid(pid, "STOP");
    let stopped = Instant::now();
    let went = readiness_within(server.addr, 503, Duration::from_secs(5));
    let after = stopped.elapsed();
    let r = post_micros(server.addr, "hung", BASE);
    let post_took = stopped.elapsed() - after;
    signal_pid(pid, "CONT");
    println!(
        "readiness 503 {after:?} after Redis was stopped; queue-change {} in {post_took:?}",
        r.status
    );
    assert!(went, "readiness stayed 200 with Redis stopped");
    assert!(after < Duration::from_millis(1900), "{after:?}");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(post_took < Duration::from_millis(3500), "{post_took:?}");
    assert!(readiness_within(server.addr, 200, Duration::from_secs(8)));
    post_ok(server.addr, "hung", BASE + 1, BASE + 1);
}

#[test]
fn a_primary_short_of_replicas_for_min_replicas_to_write_is_not_writable_either() {
    let _serial = serial();
    let redis = Redis::start();
    let url = redis.url();
    let server = Server::start(&[
        ("REDIS_URL", url.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
    ]);
    wait_ready(&server);
    post_ok(server.addr, "norep", BASE, BASE);
    redis
        .cli(&["CONFIG", "SET", "min-replicas-to-write", "1"])
        .unwrap();
    let r = post_micros(server.addr, "norep", BASE + 1);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("NOREPLICAS"), "{}", r.text());
    assert!(readiness_within(server.addr, 503, Duration::from_secs(3)));
    redis
        .cli(&["CONFIG", "SET", "min-replicas-to-write", "0"])
        .unwrap();
    let lifted = Instant::now();
    assert!(
        accepted_within(server.addr, "norep", BASE + 2, Duration::from_secs(5)),
        "no 200 once writes were allowed again"
    );
    assert!(readiness_within(server.addr, 200, Duration::from_secs(3)));
    println!(
        "200 and ready again {:?} after the limit was lifted",
        lifted.elapsed()
    );
}
