//! Wake-ups between instances: two instances of the real binary on one `redis-server` of the
//! test's own. A change posted to one reaches the other's subscribers at once through Redis
//! Pub/Sub, not a fetch interval later; without wake-ups (`REDIS_NOTIFY=false`), a lost
//! listener connection, or an ACL user without the channel, the periodic fetch still delivers.
//!
//! The tests run one at a time (each starts a Redis and two instances; the machine may be
//! small). Latency bounds are generous against a loaded machine but far below the fetch
//! interval they are told apart from.

mod common;
use common::*;
use flagsmith_sse::store::notify::CHANNEL;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A time with non-zero microseconds (2025-01-12T18:06:42.028061Z).
const BASE: i64 = 1_736_705_202_028_061;
/// The fetch interval of the instances whose deliveries must come from wake-ups.
const SLOW_FETCH: &str = "30";
/// A change must reach the other instance's subscriber within this (the interval is 30 s).
const WAKE_LIMIT: Duration = Duration::from_secs(1);

/// An instance on `redis` with the fetch interval given and `extra` settings.
#[track_caller]
fn instance(redis_url: &str, interval: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("REDIS_URL", redis_url),
        ("CACHE_UPDATE_INTERVAL_SECONDS", interval),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
    ];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// Two instances on `redis_url` (see [`instance`]), each ready and its listener subscribed.
#[track_caller]
fn listening_pair(redis_url: &str, interval: &str, extra: &[(&str, &str)]) -> (Server, Server) {
    let a = instance(redis_url, interval, extra);
    let b = instance(redis_url, interval, extra);
    wait_listening(&a);
    wait_listening(&b);
    (a, b)
}

/// Two changes posted on `a`, each reaching `on_b` within [`WAKE_LIMIT`].
#[track_caller]
fn two_changes_wake_b(a: &Server, on_b: &mut Subscriber, key: &str) {
    for i in 0..2 {
        let t = BASE + i;
        post_ok(a.addr, key, t, t);
        let took = time_to(on_b, t, Duration::from_secs(5)).expect("delivered");
        assert!(took < WAKE_LIMIT, "{took:?}");
    }
}

/// `flagsmith_sse_fetches_total` by trigger.
fn fetches(server: &Server) -> HashMap<&'static str, f64> {
    let m = server.metrics();
    ["interval", "wakeup", "snapshot"]
        .into_iter()
        .map(|t| {
            let series = format!("flagsmith_sse_fetches_total{{trigger=\"{t}\"}}");
            (t, m.get(&series).copied().unwrap_or(-1.0))
        })
        .collect()
}

/// Log lines containing `needle`.
fn count_lines(server: &Server, needle: &str) -> usize {
    server.log().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_change_on_one_instance_reaches_the_other_within_a_second_five_times_in_a_row() {
    let _serial = serial();
    let redis = Redis::start();
    let started = Instant::now();
    let (a, b) = listening_pair(&redis.url(), SLOW_FETCH, &[]);
    assert_eq!(
        redis.subscribers(CHANNEL),
        Some(2),
        "both listeners subscribed"
    );
    let mut on_b = Subscriber::connect(b.addr, "wake-env");
    let mut on_a = Subscriber::connect(a.addr, "wake-env");
    let mut waits = Vec::new();
    for i in 0..5 {
        let t = BASE + i * 1_000_001;
        let posted = Instant::now();
        post_ok(a.addr, "wake-env", t, t);
        let took = time_to(&mut on_b, t, Duration::from_secs(5))
            .map(|_| posted.elapsed())
            .unwrap_or_else(|| panic!("change {i} did not reach b:\n{}", b.log()));
        assert!(
            took < WAKE_LIMIT,
            "change {i} took {took:?} to reach b (waits so far {waits:?})"
        );
        waits.push(took);
        assert!(time_to(&mut on_a, t, Duration::from_secs(2)).is_some());
    }
    let (median, max) = median_max(&waits);
    println!("post on a to event on b: median {median:?}, max {max:?} ({waits:?})");

    // Each change moved a time: five wake-ups were published (by the write script, in the
    // write's round trip). An older time moves nothing and publishes nothing.
    assert_eq!(redis.calls("publish"), 5);
    let r = post_micros(a.addr, "wake-env", BASE);
    assert_eq!(r.status, 200);
    assert_eq!(redis.calls("publish"), 5);

    // b fetched once per wake-up (each came after the previous fetch had returned); a skipped
    // its own. Apart from the first, no interval fetch happened unless 30 s went by.
    let periodic = 1.0 + (started.elapsed().as_secs() / 30) as f64;
    let (fa, fb) = (fetches(&a), fetches(&b));
    assert_eq!(fb["wakeup"], 5.0, "b: {fb:?}");
    assert_eq!(fa["wakeup"], 0.0, "a: {fa:?}");
    assert!(
        fa["interval"] >= 1.0 && fa["interval"] <= periodic,
        "{fa:?}"
    );
    assert!(
        fb["interval"] >= 1.0 && fb["interval"] <= periodic,
        "{fb:?}"
    );
    // a: its first fetch (an empty Redis). b: that too, and the fetch after a's first write,
    // which created the data's epoch.
    assert_eq!(fa["snapshot"], 1.0, "a: {fa:?}");
    assert_eq!(fb["snapshot"], 2.0, "b: {fb:?}");

    // A burst of changes: at most one fetch in flight, wake-ups meanwhile make one more fetch
    // after it, not one each; the newest time arrives all the same.
    let n = 20;
    let before = fetches(&b)["wakeup"];
    let mut poster = Poster::connect(a.addr);
    let mut newest = 0;
    for i in 0..n {
        newest = BASE + 10_000_000 + i;
        let r = poster.post(
            "wake-env",
            &format!("{{\"updated_at\": {}}}", epoch_text(newest)),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(
        time_to(&mut on_b, newest, Duration::from_secs(5)).is_some(),
        "the newest time of the burst did not reach b"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        let after = fetches(&b)["wakeup"];
        after > before
    }));
    let during = fetches(&b)["wakeup"] - before;
    println!("{n} changes on a: {during} wake-up fetches on b");
    assert!(during >= 1.0 && during <= n as f64, "{during}");
}

#[test]
fn with_redis_notify_off_a_change_waits_for_the_periodic_fetch() {
    let _serial = serial();
    let redis = Redis::start();
    let off = [("REDIS_NOTIFY", "false")];
    let a = instance(&redis.url(), SLOW_FETCH, &off);
    let b = instance(&redis.url(), SLOW_FETCH, &off);
    wait_ready(&a);
    wait_ready(&b);
    let mut on_b = Subscriber::connect(b.addr, "quiet-env");
    post_ok(a.addr, "quiet-env", BASE, BASE);
    post_ok(a.addr, "quiet-env", BASE + 1, BASE + 1);
    assert_eq!(
        on_b.next_update(Duration::from_secs(2)),
        None,
        "b heard of a's change without a fetch"
    );
    // Neither published nor listened.
    assert_eq!(redis.calls("publish"), 0);
    assert_eq!(redis.calls("subscribe"), 0);
    for s in [&a, &b] {
        assert!(!s.log().contains("listening for wake-ups"), "{}", s.log());
        assert_eq!(fetches(s)["wakeup"], 0.0);
    }
    // a's own subscribers are served at once as always.
    let mut on_a = Subscriber::connect(a.addr, "quiet-env");
    assert_eq!(
        on_a.next_update(Duration::from_secs(2)),
        Some(epoch_text(BASE + 1))
    );
}

#[test]
fn a_killed_listener_connection_loses_no_change() {
    let _serial = serial();
    let redis = Redis::start();
    // A short interval: the periodic fetch is the safety net this test relies on.
    let (a, b) = listening_pair(&redis.url(), "1", &[]);
    let mut on_b = Subscriber::connect(b.addr, "kill-env");
    for i in 0..3 {
        let t = BASE + i * 1_000_001;
        let killed = redis
            .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .unwrap_or_default();
        assert!(
            killed.trim().parse::<u32>().is_ok_and(|n| n >= 1),
            "CLIENT KILL: {killed:?}"
        );
        post_ok(a.addr, "kill-env", t, t);
        assert!(
            time_to(&mut on_b, t, Duration::from_secs(5)).is_some(),
            "change {i} lost after the listener's connection was killed:\n{}",
            b.log()
        );
    }
    b.assert_log(
        "wake-up listener lost its Redis connection",
        Duration::from_secs(5),
    );
    // The listener is back (within the backoff cap) and wake-ups work again.
    assert!(
        wait_until(Duration::from_secs(5), || redis.subscribers(CHANNEL)
            == Some(2)),
        "the listeners did not subscribe again:\n{}",
        b.log()
    );
    assert!(
        b.log()
            .contains(&format!("listening for wake-ups on {CHANNEL} again"))
    );
    assert!(on_b.next_update(Duration::from_millis(300)).is_none());
    let t = BASE + 10_000_000;
    post_ok(a.addr, "kill-env", t, t);
    assert!(time_to(&mut on_b, t, Duration::from_secs(3)).is_some());
    assert!(!on_b.ended);
}

#[test]
fn a_listener_whose_connection_keeps_being_killed_backs_off() {
    let _serial = serial();
    let redis = Redis::start();
    let (a, b) = listening_pair(&redis.url(), "1", &[]);
    let before = redis.calls("subscribe");
    // Kill every subscriber connection as soon as it appears, for two seconds.
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let n: u32 = redis
            .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .and_then(|o| o.trim().parse().ok())
            .unwrap_or(0);
        kills += n;
        std::thread::sleep(Duration::from_millis(10));
    }
    let subscribes = redis.calls("subscribe") - before;
    println!("{kills} listener connections killed in 2 s; {subscribes} SUBSCRIBEs");
    // Backoff (0, 100, 200, 400, 800 ms ...) allows about six attempts each in 2 s; a tight
    // loop would make hundreds.
    assert!(kills >= 2, "{kills}");
    assert!(subscribes <= 20, "{subscribes} SUBSCRIBEs in 2 s");
    // Left alone, both subscribe again, and changes are delivered.
    assert!(
        wait_until(Duration::from_secs(5), || redis.subscribers(CHANNEL)
            == Some(2)),
        "{}",
        b.log()
    );
    let mut on_b = Subscriber::connect(b.addr, "flap-env");
    post_ok(a.addr, "flap-env", BASE, BASE);
    assert!(time_to(&mut on_b, BASE, Duration::from_secs(3)).is_some());
}

/// The ACL rules of the README's `ACL SETUSER sse ...` line (after the user name); docs/REDIS.md
/// must show the same line.
fn readme_acl_rules() -> Vec<String> {
    let line = |file: &str| {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        text.lines()
            .find(|l| l.starts_with("ACL SETUSER sse "))
            .unwrap_or_else(|| panic!("{file} has an `ACL SETUSER sse ...` line"))
            .to_owned()
    };
    let readme = line("README.md");
    assert_eq!(
        readme,
        line("docs/REDIS.md"),
        "README.md and docs/REDIS.md show different ACL lines"
    );
    readme
        .split_whitespace()
        .skip(3)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_acl_user_gets_wake_ups_and_nothing_is_denied() {
    let _serial = serial();
    let redis = Redis::start_acl(&[]);
    let mut args = vec!["ACL", "SETUSER", "sse"];
    let rules = readme_acl_rules();
    args.extend(rules.iter().map(String::as_str));
    assert_eq!(redis.cli(&args).unwrap_or_default().trim(), "OK");
    assert!(
        redis
            .cli(&["ACL", "SETUSER", "sse", ">S3cret-pw"])
            .is_some()
    );
    let url = format!("redis://sse:S3cret-pw@127.0.0.1:{}/0", redis.port);
    let (a, b) = listening_pair(&url, SLOW_FETCH, &[]);
    let mut on_b = Subscriber::connect(b.addr, "acl-wake");
    two_changes_wake_b(&a, &mut on_b, "acl-wake");
    let denied = redis.cli(&["ACL", "LOG"]).unwrap_or_default();
    assert!(denied.trim().is_empty(), "ACL LOG:\n{denied}");
}

#[test]
fn an_acl_user_without_the_channel_is_warned_once_and_served_by_the_periodic_fetch() {
    let _serial = serial();
    let redis = Redis::start_acl(&[]);
    // Every command, every key, but no channel (`resetchannels`): PUBLISH and SUBSCRIBE are
    // refused with -NOPERM.
    let ok = redis.cli(&[
        "ACL",
        "SETUSER",
        "nochan",
        "on",
        ">pw",
        "~*",
        "resetchannels",
        "+@all",
    ]);
    assert_eq!(ok.unwrap_or_default().trim(), "OK");
    let url = format!("redis://nochan:pw@127.0.0.1:{}/0", redis.port);
    let a = instance(&url, "0.5", &[]);
    let b = instance(&url, "0.5", &[]);
    wait_ready(&a);
    wait_ready(&b);
    let warning = "Redis refused the wake-up channel";
    for s in [&a, &b] {
        s.assert_log(warning, Duration::from_secs(5));
    }
    let mut on_b = Subscriber::connect(b.addr, "nochan-env");
    for i in 0..3 {
        let t = BASE + i;
        // The write stands although its wake-up was refused.
        post_ok(a.addr, "nochan-env", t, t);
        assert!(
            time_to(&mut on_b, t, Duration::from_secs(5)).is_some(),
            "change {i} not delivered by the periodic fetch:\n{}",
            b.log()
        );
    }
    for s in [&a, &b] {
        let log = s.log();
        assert_eq!(count_lines(s, warning), 1, "{log}");
        assert!(
            log.lines()
                .any(|l| l.contains(warning) && l.contains("WARN")),
            "{log}"
        );
        assert!(!log.contains("listening for wake-ups"), "{log}");
        assert_eq!(fetches(s)["wakeup"], 0.0);
    }
    assert!(
        redis
            .cli(&["ACL", "LOG"])
            .unwrap_or_default()
            .contains("channel"),
        "the refusals are Redis's channel denials"
    );
}

#[cfg(feature = "tls")]
#[test]
fn wake_ups_travel_over_tls() {
    let _serial = serial();
    let certs = Certs::generate("wakeup");
    let redis = Redis::start_tls(&certs);
    let ca = certs.path("ca.crt");
    let url = format!("rediss://localhost:{}/0", redis.port);
    let tls = [("SSL_CERT_FILE", ca.as_str())];
    let (a, b) = listening_pair(&url, SLOW_FETCH, &tls);
    let mut on_b = Subscriber::connect(b.addr, "tls-wake");
    two_changes_wake_b(&a, &mut on_b, "tls-wake");
    assert_eq!(fetches(&b)["wakeup"], 2.0);
}
