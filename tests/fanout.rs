//! Fan-out in slices (SPEC section 4, "No loop turn runs long"), against the real binary over
//! real sockets: a fan-out to thousands of subscribers is worked through over several loop
//! turns, while subscribers join and leave and newer times arrive, and other clients are
//! answered in the meantime. The tests assert the order of what happened, not durations.
//!
//! The tests here take turns (one lock): each holds thousands of connections.

mod common;
use common::*;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Base of the epoch-second times these tests send.
const BASE: u64 = 1_700_000_000;

/// The epoch seconds of an update text written by [`update_text`].
fn secs(text: &str) -> u64 {
    text.trim_end_matches(".25")
        .parse()
        .unwrap_or_else(|_| panic!("not an update of these tests: {text:?}"))
}

fn server() -> Server {
    Server::start(&[
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
        ("KEEPALIVE_SECONDS", "60"),
        ("LOG_LEVEL", "info"),
    ])
}

/// Posts an update and checks that it was stored.
#[track_caller]
fn post(poster: &mut Poster, key: &str, secs: u64) {
    let r = poster.post(key, &update_body(secs));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_fan_out_interrupted_by_joins_leaves_and_newer_times_ends_with_the_newest_everywhere() {
    let _turn = serial();
    const CROWD: usize = 3000;
    const JOINERS: usize = 50;
    const ROUNDS: u64 = 3;
    let server = server();
    let key = "interrupted";
    let mut crowd = Crowd::connect(server.addr, key, CROWD);
    let mut poster = Poster::connect(server.addr);
    let mut interrupted = 0;
    let mut left = 0;
    for round in 0..ROUNDS {
        let t = BASE + round * 10;
        let before = crowd.len();
        // A newer time while the fan-out of the first is under way, subscribers leaving (every
        // 13th, some before and some after the fan-out's position), subscribers joining (who
        // get the newest time on connect), and a newer time again, with more leaving.
        post(&mut poster, key, t + 1);
        for i in (round as usize..before).step_by(13).take(100) {
            if crowd.socks[i].is_some() {
                crowd.close(i);
                left += 1;
            }
        }
        post(&mut poster, key, t + 2);
        crowd.add(server.addr, key, JOINERS);
        for i in (before..crowd.len()).step_by(7) {
            crowd.close(i);
            left += 1;
        }
        post(&mut poster, key, t + 3);
        // Leaving while the newest goes out, near the start of the list: most of them behind
        // the fan-out's position, where a plain swap-remove would hide the last subscriber.
        for i in (round as usize + 1..before.min(600)).step_by(7) {
            if crowd.socks[i].is_some() {
                crowd.close(i);
                left += 1;
            }
        }
        crowd.add(server.addr, key, JOINERS);
        let newest = update_text(t + 3);
        let ok = crowd.pump_until(Duration::from_secs(30), |c| {
            (0..c.len()).all(|i| c.socks[i].is_none() || c.latest(i) == Some(newest.as_str()))
        });
        let open: Vec<usize> = (0..crowd.len())
            .filter(|&i| crowd.socks[i].is_some())
            .collect();
        let behind = open
            .iter()
            .filter(|&&i| crowd.latest(i) != Some(newest.as_str()))
            .count();
        assert!(
            ok,
            "round {round}: {behind} of {} open subscribers do not have the newest time",
            open.len()
        );
        for &i in &open {
            assert!(!crowd.ended[i], "subscriber {i} lost its stream");
            let seen: Vec<u64> = crowd.history[i].iter().map(|v| secs(v)).collect();
            assert!(
                seen.windows(2).all(|w| w[0] < w[1]),
                "subscriber {i} got a time twice or an older one after a newer one: {seen:?}"
            );
        }
        // Those that were there before the round and skipped a time were passed on with a
        // newer one: the fan-out of the older time was still under way when it came.
        let skipped = open
            .iter()
            .filter(|&&i| i < before)
            .filter(|&&i| {
                let seen = &crowd.history[i];
                !seen.contains(&update_text(t + 1)) || !seen.contains(&update_text(t + 2))
            })
            .count();
        println!(
            "round {round}: {} open, {skipped} of the earlier ones passed over an older time",
            open.len()
        );
        if skipped > 0 {
            interrupted += 1;
        }
    }
    assert!(
        interrupted > 0,
        "no fan-out was still under way when a newer time came, in {ROUNDS} rounds"
    );
    let active = server.metrics()["flagsmith_sse_subscribers_active"];
    let open = crowd.socks.iter().filter(|s| s.is_some()).count();
    assert!(
        wait_until(
            Duration::from_secs(10),
            || server.metrics()["flagsmith_sse_subscribers_active"] == open as f64
        ),
        "{active} subscribers active on the server, {open} open here ({left} left)"
    );
}

#[test]
fn a_health_probe_is_answered_while_a_fan_out_is_under_way() {
    let _turn = serial();
    const CROWD: usize = 4000;
    const ROUNDS: u64 = 3;
    let server = server();
    let key = "probed";
    let mut crowd = Crowd::connect(server.addr, key, CROWD);
    let mut poster = Poster::connect(server.addr);
    let mut probe = TcpStream::connect(server.addr).expect("connect");
    probe.set_nodelay(true).unwrap();
    let liveness = b"GET /health/liveness/ HTTP/1.1\r\nHost: t\r\n\r\n";
    probe.write_all(liveness).unwrap();
    assert_eq!(read_response(&mut probe).status, 200);
    let mut answered_first = false;
    for round in 0..ROUNDS {
        let t = BASE + round;
        // The fan-out starts in the turn that answers the post; the probe is sent after that.
        post(&mut poster, key, t);
        probe.write_all(liveness).unwrap();
        let r = read_response(&mut probe);
        assert_eq!(r.status, 200, "{}", r.text());
        // Which subscribers have nothing yet, now that the probe is answered? Look from the
        // newest (the end of the subscriber list, written to last) back.
        let mut waiting = 0;
        let mut peek = [0u8; 1];
        for s in crowd.socks.iter().rev().flatten() {
            match s.peek(&mut peek) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => waiting += 1,
                _ => {}
            }
        }
        let newest = update_text(t);
        let ok = crowd.pump_until(Duration::from_secs(30), |c| c.all_have(&newest));
        assert!(ok, "round {round}: not every subscriber got {newest}");
        println!(
            "round {round}: the probe was answered while {waiting} of {CROWD} subscribers had \
             not yet got the event"
        );
        if waiting > 0 {
            answered_first = true;
            break;
        }
    }
    assert!(
        answered_first,
        "in {ROUNDS} rounds the probe was answered only after every subscriber had the event"
    );
}

#[test]
fn a_large_snapshot_is_applied_over_several_turns_while_requests_are_answered() {
    let _turn = serial();
    const ENVS: usize = 100_000;
    let time: i64 = 1_736_705_202_028_061;
    let redis = Redis::start();
    let filled = redis.cli(&[
        "EVAL",
        "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'env-' .. i, ARGV[2]) end \
         return redis.call('HLEN', KEYS[1])",
        "1",
        "{flagsmith_sse}:times",
        &ENVS.to_string(),
        &time.to_string(),
    ]);
    assert_eq!(filled.as_deref().map(str::trim), Some("100000"));
    let server = Server::start(&[("REDIS_URL", &redis.url()), ("LOG_LEVEL", "info")]);
    // Readiness and the cached-environment gauge, asked together (pipelined) over and over
    // while the server starts: once ready, is the snapshot all in, or still being applied?
    let mut probe = TcpStream::connect(server.addr).expect("connect");
    let pair = b"GET /health/readiness/ HTTP/1.1\r\nHost: t\r\n\r\nGET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";
    let cached = |r: &Response| -> usize {
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix("flagsmith_sse_environments_cached "))
            .and_then(|v| v.trim().parse().ok())
            .expect("flagsmith_sse_environments_cached in /metrics")
    };
    let mut partial = Vec::new();
    let all_in = wait_until(Duration::from_secs(60), || {
        probe.write_all(pair).unwrap();
        let ready = read_response(&mut probe).status == 200;
        let n = cached(&read_response(&mut probe));
        if ready && n < ENVS {
            partial.push(n);
        }
        ready && n == ENVS
    });
    assert!(
        all_in,
        "the snapshot of {ENVS} environments was not all applied"
    );
    println!(
        "ready with {} of the snapshot's {ENVS} environments applied, in {} answers",
        partial.first().map_or(ENVS, |&n| n),
        partial.len()
    );
    assert!(
        !partial.is_empty(),
        "every request answered once ready saw the whole snapshot applied: it was applied in \
         one turn"
    );
    assert!(
        partial.windows(2).all(|w| w[0] <= w[1]),
        "the count went down: {partial:?}"
    );
    // And the times are the stored ones.
    let mut s = Subscriber::connect(server.addr, "env-77777");
    assert_eq!(
        s.next_update(Duration::from_secs(10)).as_deref(),
        Some(epoch_text(time).as_str())
    );
}
