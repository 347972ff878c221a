//! Many instances sharing one real `redis-server`: propagation between instances, snapshots for
//! late starters and trimmed logs, out-of-order notifications, Redis outages and batching.
//!
//! The tests run one at a time (they measure latencies, and the machine may be small).

mod common;
use common::*;
use flagsmith_sse::timestamp::parse_epoch_seconds;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A time with non-zero microseconds (2025-01-12T18:06:42.028061Z).
const BASE: i64 = 1_736_705_202_028_061;

fn micros_of(text: &str) -> i64 {
    parse_epoch_seconds(text).unwrap_or_else(|e| panic!("{text:?} is not a time: {e:?}"))
}

/// Starts an instance on `redis` with `extra` settings.
#[track_caller]
fn instance(redis: &Redis, extra: &[(&str, &str)]) -> Server {
    let url = redis.url();
    let mut env = vec![("REDIS_URL", url.as_str())];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// Every update until none comes for `quiet`.
fn updates_until_quiet(sub: &mut Subscriber, quiet: Duration) -> Vec<i64> {
    let mut out = Vec::new();
    while let Some(v) = sub.next_update(quiet) {
        out.push(micros_of(&v));
    }
    out
}

#[test]
fn a_change_reaches_subscribers_on_both_instances() {
    let _serial = serial();
    let redis = Redis::start();
    let settings = [
        ("CACHE_UPDATE_INTERVAL_SECONDS", "1"),
        ("STREAM_DELAY", "0"),
    ];
    let a = instance(&redis, &settings);
    let b = instance(&redis, &settings);
    wait_ready(&a);
    wait_ready(&b);
    let mut on_a = Subscriber::connect(a.addr, "latency");
    let mut on_b = Subscriber::connect(b.addr, "latency");
    let (mut worst_a, mut worst_b) = (Duration::ZERO, Duration::ZERO);
    for round in 0..6 {
        // Not a synchronisation: it moves each post to a different phase of B's fetch timer
        // (every round would otherwise start just after B's previous fetch).
        std::thread::sleep(Duration::from_millis(170 * round as u64));
        let t = BASE + round * 1_000_003;
        let posted = Instant::now();
        post_ok(a.addr, "latency", t, t);
        assert_eq!(
            on_a.next_update(Duration::from_secs(5)),
            Some(epoch_text(t))
        );
        let lat_a = posted.elapsed();
        assert_eq!(
            on_b.next_update(Duration::from_secs(5)),
            Some(epoch_text(t))
        );
        let lat_b = posted.elapsed();
        println!("round {round}: instance A {lat_a:?}, instance B {lat_b:?}");
        worst_a = worst_a.max(lat_a);
        worst_b = worst_b.max(lat_b);
    }
    println!("worst: receiving instance {worst_a:?}, other instance {worst_b:?} (interval 1 s)");
    assert!(worst_a < Duration::from_millis(250), "{worst_a:?}");
    assert!(worst_b <= Duration::from_millis(1500), "{worst_b:?}");
    assert!(
        metric(
            &a,
            "flagsmith_sse_redis_commands_total{command=\"evalsha\"}"
        ) >= 6.0
    );
    assert!(metric(&b, "flagsmith_sse_redis_commands_total{command=\"xrange\"}") >= 1.0);
    assert_eq!(
        metric(&b, "flagsmith_sse_redis_errors_total{command=\"xrange\"}"),
        0.0
    );
}

#[test]
fn an_instance_started_later_sends_the_snapshot_time() {
    let _serial = serial();
    let redis = Redis::start();
    let a = instance(&redis, &[]);
    wait_ready(&a);
    post_ok(a.addr, "late", BASE + 30, BASE + 30);
    post_ok(a.addr, "late", BASE + 10, BASE + 30);
    post_ok(a.addr, "other", BASE + 5, BASE + 5);
    let started = Instant::now();
    let b = instance(&redis, &[("CACHE_UPDATE_INTERVAL_SECONDS", "60")]);
    wait_ready(&b);
    let mut sub = Subscriber::connect(b.addr, "late");
    assert_eq!(
        sub.next_update(Duration::from_secs(2)),
        Some(epoch_text(BASE + 30))
    );
    println!(
        "initial event from the snapshot {:?} after the instance was started",
        started.elapsed()
    );
    assert_eq!(
        metric(&b, "flagsmith_sse_redis_commands_total{command=\"hscan\"}"),
        1.0
    );
    assert_eq!(metric(&b, "flagsmith_sse_environments_cached"), 2.0);
}

#[test]
fn out_of_order_and_repeated_notifications_never_go_backwards() {
    let _serial = serial();
    let redis = Redis::start();
    let settings = [
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.3"),
        ("STREAM_DELAY", "0"),
    ];
    let a = instance(&redis, &settings);
    let b = instance(&redis, &settings);
    wait_ready(&a);
    wait_ready(&b);
    let mut on_a = Subscriber::connect(a.addr, "order");
    let mut on_b = Subscriber::connect(b.addr, "order");
    let (t1, t2, t3) = (BASE + 1, BASE + 2, BASE + 3);
    // (instance, time sent, time stored afterwards)
    let steps = [
        (&a, t2, t2),
        (&b, t1, t2),
        (&a, t2, t2),
        (&b, t2, t2),
        (&b, t3, t3),
        (&a, t1, t3),
        (&a, t3, t3),
        (&b, t2, t3),
        (&b, t3, t3),
    ];
    for (server, sent, stored) in steps {
        post_ok(server.addr, "order", sent, stored);
    }
    let quiet = Duration::from_millis(1500);
    let seen_a = updates_until_quiet(&mut on_a, quiet);
    let seen_b = updates_until_quiet(&mut on_b, quiet);
    println!("events on A: {seen_a:?}; on B: {seen_b:?}");
    assert_eq!(seen_a, [t2, t3]);
    assert_eq!(seen_b, [t2, t3]);
    for server in [&a, &b] {
        let mut late = Subscriber::connect(server.addr, "order");
        assert_eq!(updates_until_quiet(&mut late, quiet), [t3]);
    }
}

#[test]
fn a_redis_outage_keeps_streams_open_and_recovers() {
    let _serial = serial();
    let mut redis = Redis::start();
    let port = redis.port;
    let settings = [
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
    ];
    let a = instance(&redis, &settings);
    let b = instance(&redis, &settings);
    wait_ready(&a);
    wait_ready(&b);
    let mut on_a = Subscriber::connect(a.addr, "outage");
    let mut on_b = Subscriber::connect(b.addr, "outage");
    let (t0, t1, t2, t3) = (BASE, BASE + 1_000_001, BASE + 2_000_001, BASE + 3_000_001);
    post_ok(a.addr, "outage", t1, t1);
    assert_eq!(
        on_a.next_update(Duration::from_secs(2)),
        Some(epoch_text(t1))
    );
    assert_eq!(
        on_b.next_update(Duration::from_secs(2)),
        Some(epoch_text(t1))
    );
    // a applied its own write without a fetch: let both fetch once, so that each knows the
    // data's epoch before Redis loses it.
    wait_fetched(&a);
    wait_fetched(&b);

    redis.stop();
    let killed = Instant::now();
    for server in [&a, &b] {
        assert!(
            readiness_within(server.addr, 503, Duration::from_secs(3)),
            "readiness stays 200 with Redis down"
        );
    }
    println!(
        "readiness 503 {:?} after Redis was killed",
        killed.elapsed()
    );
    for server in [&a, &b] {
        let asked = Instant::now();
        let r = post_micros(server.addr, "outage", t2);
        let took = asked.elapsed();
        println!("queue-change with Redis down: {} in {took:?}", r.status);
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    for server in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(3), || stream_head(
                server.addr,
                "outage-new"
            ) == (503, true)),
            "new subscriptions are still accepted with Redis down"
        );
    }
    println!(
        "new subscriptions refused {:?} after Redis was killed",
        killed.elapsed()
    );
    // The open streams carry nothing but keep-alives while Redis is down, and stay open.
    let outage = Duration::from_millis(2500);
    for sub in [&mut on_a, &mut on_b] {
        let left = outage.saturating_sub(killed.elapsed());
        match sub.next(left.max(Duration::from_millis(100))) {
            None | Some(Item::Ping) => {}
            other => panic!("unexpected stream content during the outage: {other:?}"),
        }
        assert!(!sub.ended, "a stream was closed during the outage");
    }

    let _redis = Redis::start_on(port, &[]);
    let restarted = Instant::now();
    // Redis came back empty: an older time is stored again, but no client may see it.
    let mut stored_old = false;
    let mut stored_new = false;
    assert!(
        wait_until(Duration::from_secs(5), || {
            stored_old = stored_old || post_micros(b.addr, "outage", t0).status == 200;
            stored_new =
                stored_old && (stored_new || post_micros(a.addr, "outage", t3).status == 200);
            stored_new
        }),
        "queue-change not accepted again after Redis came back"
    );
    println!(
        "queue-change accepted {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(
        on_a.next_update(Duration::from_secs(3)),
        Some(epoch_text(t3))
    );
    let on_a_at = restarted.elapsed();
    assert_eq!(
        on_b.next_update(Duration::from_secs(3)),
        Some(epoch_text(t3))
    );
    let on_b_at = restarted.elapsed();
    println!("after the restart: new change on A in {on_a_at:?}, on B in {on_b_at:?}");
    assert!(on_b_at <= Duration::from_secs(3), "{on_b_at:?}");
    for server in [&a, &b] {
        assert_resynchronised(server, "outage", t3);
    }
    let quiet = Duration::from_millis(800);
    assert_eq!(updates_until_quiet(&mut on_a, quiet), Vec::<i64>::new());
    assert_eq!(updates_until_quiet(&mut on_b, quiet), Vec::<i64>::new());
    assert!(metric(&a, "flagsmith_sse_redis_errors_total{command=\"connect\"}") >= 1.0);
}

#[test]
fn an_instance_behind_a_trimmed_log_recovers_from_the_snapshot() {
    let _serial = serial();
    let redis = Redis::start_args(&["--stream-node-max-entries", "8"]);
    let a = instance(
        &redis,
        &[
            ("REDIS_CHANGELOG_MAXLEN", "16"),
            ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ],
    );
    let b = instance(
        &redis,
        &[
            ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
            ("STREAM_DELAY", "0"),
        ],
    );
    wait_ready(&a);
    wait_ready(&b);
    // B learns a position in the log.
    let mut seed = Subscriber::connect(b.addr, "seed");
    post_ok(a.addr, "seed", BASE, BASE);
    assert_eq!(
        seed.next_update(Duration::from_secs(3)),
        Some(epoch_text(BASE))
    );
    let keys: Vec<String> = (0..10)
        .map(|i| format!("early-{i}"))
        .chain((0..5).map(|i| format!("late-{i}")))
        .collect();
    let mut subs: Vec<Subscriber> = keys
        .iter()
        .map(|k| Subscriber::connect(b.addr, k))
        .collect();

    // B cannot fetch while the log moves on far past its position.
    b.signal("STOP");
    let newest = |i: usize| BASE + 1_000 + i as i64;
    for (i, key) in keys.iter().enumerate().take(10) {
        post_ok(a.addr, key, newest(i) - 500, newest(i) - 500);
        post_ok(a.addr, key, newest(i), newest(i));
    }
    for j in 0..200 {
        post_ok(a.addr, &format!("filler-{j}"), BASE + j, BASE + j);
    }
    for (i, key) in keys.iter().enumerate().skip(10) {
        post_ok(a.addr, key, newest(i), newest(i));
    }
    let log = redis
        .cli(&["XRANGE", "{flagsmith_sse}:log", "-", "+"])
        .unwrap();
    let len = redis.cli(&["XLEN", "{flagsmith_sse}:log"]).unwrap();
    let len = len.trim();
    assert!(
        !log.contains("early-") && !log.contains("seed"),
        "the log was not trimmed: {len} entries"
    );
    println!("log trimmed to about {len} entries after 226 changes");

    b.signal("CONT");
    let resumed = Instant::now();
    for (i, sub) in subs.iter_mut().enumerate() {
        assert_eq!(
            sub.next_update(Duration::from_secs(5)),
            Some(epoch_text(newest(i))),
            "{}",
            keys[i]
        );
    }
    println!(
        "every subscriber had its newest time {:?} after the instance resumed",
        resumed.elapsed()
    );
    b.assert_log(
        "trimmed past this instance's position",
        Duration::from_secs(2),
    );
    for sub in subs.iter_mut() {
        assert_eq!(updates_until_quiet(sub, Duration::from_millis(100)), []);
    }
}

#[test]
fn a_burst_of_changes_is_batched_and_every_subscriber_ends_newest() {
    let _serial = serial();
    const ENVS: usize = 1000;
    const CONNS: usize = 16;
    let redis = Redis::start();
    let settings = [
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.5"),
        ("MAX_STREAM_AGE", "-1"),
    ];
    let a = instance(&redis, &settings);
    let b = instance(&redis, &settings);
    wait_ready(&a);
    wait_ready(&b);
    let key = |i: usize| format!("burst-{i}");
    let newest = |i: usize| BASE + 10_000 + i as i64;
    let mut subs: Vec<(usize, Subscriber)> = Vec::with_capacity(2 * ENVS);
    for i in 0..ENVS {
        subs.push((i, Subscriber::connect(a.addr, &key(i))));
        subs.push((i, Subscriber::connect(b.addr, &key(i))));
    }
    let evalsha = "flagsmith_sse_redis_commands_total{command=\"evalsha\"}";
    let a_before = metric(&a, evalsha);
    redis.cli(&["CONFIG", "RESETSTAT"]).unwrap();

    let started = Instant::now();
    let threads: Vec<_> = (0..CONNS)
        .map(|c| {
            let addr = a.addr;
            std::thread::spawn(move || {
                let mut sock = TcpStream::connect(addr).unwrap();
                sock.set_nodelay(true).unwrap();
                let mut posts = 0;
                for i in (c..ENVS).step_by(CONNS) {
                    // Half the environments get the older time second: out of order.
                    let times = if i % 2 == 0 {
                        [newest(i) - 7, newest(i)]
                    } else {
                        [newest(i), newest(i) - 7]
                    };
                    for t in times {
                        let body = format!("{{\"updated_at\": {}}}", epoch_text(t));
                        let req = format!(
                            "POST /sse/environments/{}/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
                            key(i),
                            body.len()
                        );
                        sock.write_all(req.as_bytes()).unwrap();
                        let r = read_response(&mut sock);
                        assert_eq!(r.status, 200, "{}", r.text());
                        posts += 1;
                    }
                }
                posts
            })
        })
        .collect();
    let posts: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let burst = started.elapsed();
    assert_eq!(posts, 2 * ENVS);

    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, sub) in subs.iter_mut() {
        let want = newest(*i);
        let mut last = 0;
        while last != want {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = sub
                .next_update(left)
                .unwrap_or_else(|| panic!("{} never got {}", key(*i), epoch_text(want)));
            let got = micros_of(&got);
            assert!(got > last, "{}: {got} after {last}", key(*i));
            assert!(
                got <= want,
                "{}: {got} is newer than anything sent",
                key(*i)
            );
            last = got;
        }
    }
    let delivered = started.elapsed();
    let calls = redis.calls("evalsha");
    let a_calls = metric(&a, evalsha) - a_before;
    println!(
        "{posts} queue-changes for {ENVS} environments over {CONNS} connections in {burst:?}; \
         every one of {} subscribers had its newest time after {delivered:?}; \
         {calls} EVALSHA round trips (Redis INFO commandstats; the instance counted {a_calls}), \
         {:.1} changes per round trip",
        subs.len(),
        posts as f64 / calls.max(1) as f64
    );
    assert!(calls > 0);
    assert_eq!(
        calls as f64, a_calls,
        "the store's counter and Redis disagree"
    );
    assert!(
        calls <= (posts / 3) as u64,
        "{calls} round trips for {posts} changes: not batched"
    );
    for (i, sub) in subs.iter_mut() {
        match sub.next(Duration::from_millis(1)) {
            None | Some(Item::Ping) => {}
            other => panic!("{}: unexpected {other:?} after the newest time", key(*i)),
        }
    }
}

#[test]
fn a_hung_redis_makes_requests_fail_within_seconds() {
    let _serial = serial();
    let redis = Redis::start();
    let pid = redis.process_id();
    let a = instance(
        &redis,
        &[
            ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
            ("STREAM_DELAY", "0"),
        ],
    );
    wait_ready(&a);
    let mut sub = Subscriber::connect(a.addr, "hung");
    post_ok(a.addr, "hung", BASE + 1, BASE + 1);
    assert_eq!(
        sub.next_update(Duration::from_secs(2)),
        Some(epoch_text(BASE + 1))
    );

    signal_pid(pid, "STOP");
    let stopped = Instant::now();
    let mut waits = Vec::new();
    for i in 0..3 {
        let asked = Instant::now();
        let r = post_micros(a.addr, "hung", BASE + 2 + i);
        waits.push(asked.elapsed());
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
    }
    println!("queue-change with Redis hung: 503 after {waits:?}");
    // At most one read timeout (2 s) and one connect timeout (1 s), plus slack.
    assert!(
        waits.iter().all(|w| *w < Duration::from_secs(4)),
        "{waits:?}"
    );
    assert!(readiness_within(a.addr, 503, Duration::from_secs(6)));
    println!("readiness 503 {:?} after Redis hung", stopped.elapsed());
    assert!(!sub.ended);

    signal_pid(pid, "CONT");
    let resumed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(8), || post_micros(
            a.addr,
            "hung",
            BASE + 9
        )
        .status
            == 200),
        "queue-change not accepted after Redis resumed"
    );
    assert_eq!(
        sub.next_update(Duration::from_secs(3)),
        Some(epoch_text(BASE + 9))
    );
    assert!(readiness_within(a.addr, 200, Duration::from_secs(3)));
    println!(
        "accepted and delivered again {:?} after Redis resumed",
        resumed.elapsed()
    );
}

#[test]
fn an_instance_starts_without_redis_and_serves_once_it_is_up() {
    let _serial = serial();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let a = Server::start(&[
        ("REDIS_URL", url.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "0.2"),
        ("STREAM_DELAY", "0"),
    ]);
    assert_eq!(readiness(a.addr), 503);
    let asked = Instant::now();
    let r = post_micros(a.addr, "boot", BASE);
    println!(
        "queue-change with no Redis: {} in {:?}",
        r.status,
        asked.elapsed()
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert!(wait_until(Duration::from_secs(3), || stream_head(
        a.addr, "boot"
    ) == (503, true)));

    let _redis = Redis::start_on(port, &[]);
    let up = Instant::now();
    wait_ready(&a);
    println!("ready {:?} after Redis came up", up.elapsed());
    assert!(up.elapsed() < Duration::from_secs(4), "{:?}", up.elapsed());
    let mut sub = Subscriber::connect(a.addr, "boot");
    post_ok(a.addr, "boot", BASE, BASE);
    assert_eq!(
        sub.next_update(Duration::from_secs(2)),
        Some(epoch_text(BASE))
    );
}
