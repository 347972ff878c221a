//! `USE_CLUSTER_MODE=true` against a real three-node Redis Cluster started by the test on free
//! ports: changes between instances, all keys in the one slot of `{flagsmith_sse}`, and the
//! node holding that slot restarting empty.
//!
//! The tests run one at a time (each starts three redis-server processes and two instances).
#![cfg(feature = "cluster")]

mod common;
use common::*;
use flagsmith_sse::store::notify::CHANNEL;
use flagsmith_sse::store::redis::{EPOCH_KEY, LOG_KEY, TIMES_KEY};
use std::time::{Duration, Instant};

/// A time with non-zero microseconds (2025-01-12T18:06:42.028061Z).
const BASE: i64 = 1_736_705_202_028_061;

/// An instance in cluster mode with `nodes` as its seeds and a fetch every `interval` seconds.
#[track_caller]
fn instance_every(nodes: &str, interval: &str) -> Server {
    Server::start(&[
        ("USE_CLUSTER_MODE", "true"),
        ("REDIS_URL", nodes),
        ("CACHE_UPDATE_INTERVAL_SECONDS", interval),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
    ])
}

/// An instance in cluster mode with `nodes` as its seeds.
#[track_caller]
fn instance(nodes: &str) -> Server {
    instance_every(nodes, "0.2")
}

/// Every update until none comes for `quiet`.
fn updates_until_quiet(sub: &mut Subscriber, quiet: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(v) = sub.next_update(quiet) {
        out.push(v);
    }
    out
}

#[test]
fn changes_cross_instances_through_the_node_holding_the_slot() {
    let _serial = serial();
    let cluster = Cluster::start();
    let owner = cluster.owner_of("{flagsmith_sse}");
    // One instance knows a single node, and not the one with the keys: it finds the rest.
    let seed = (owner + 1) % cluster.nodes.len();
    let a = instance(&cluster.nodes[seed].url());
    let b = instance(&cluster.urls());
    wait_ready(&a);
    wait_ready(&b);
    assert!(
        a.log().contains("REDIS_URL=redis://127.0.0.1:")
            && a.log().contains("USE_CLUSTER_MODE=true"),
        "{}",
        a.log()
    );
    assert!(a.log().contains("using Redis Cluster at"), "{}", a.log());

    let mut on_b = Subscriber::connect(b.addr, "cluster-env");
    post_ok(a.addr, "cluster-env", BASE, BASE);
    assert_next_update(&mut on_b, BASE, Duration::from_secs(3));
    let mut on_a = Subscriber::connect(a.addr, "cluster-env");
    assert_next_update(&mut on_a, BASE, Duration::from_secs(2));
    post_ok(b.addr, "cluster-env", BASE + 1_000_001, BASE + 1_000_001);
    post_ok(b.addr, "other-env", BASE + 2, BASE + 2);
    assert_next_update(&mut on_a, BASE + 1_000_001, Duration::from_secs(3));
    // Older and repeated times move nothing.
    let r = post_micros(a.addr, "cluster-env", BASE);
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains(&epoch_text(BASE + 1_000_001)),
        "{}",
        r.text()
    );
    assert_eq!(
        updates_until_quiet(&mut on_b, Duration::from_millis(600)),
        vec![epoch_text(BASE + 1_000_001)]
    );

    // Every key is on the owner of the hash tag's slot; the other nodes hold nothing.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let keys = node.cli(&["DBSIZE"]).unwrap_or_default();
        let want = if i == owner { "3" } else { "0" };
        assert_eq!(keys.trim(), want, "node {i} (owner {owner})");
    }
    let holder = &cluster.nodes[owner];
    for key in [TIMES_KEY, LOG_KEY, EPOCH_KEY] {
        assert_eq!(
            holder.cli(&["EXISTS", key]).unwrap_or_default().trim(),
            "1",
            "{key}"
        );
    }
    assert_eq!(
        holder
            .cli(&["HGET", TIMES_KEY, "cluster-env"])
            .unwrap_or_default()
            .trim(),
        (BASE + 1_000_001).to_string()
    );
    assert_eq!(
        holder.cli(&["XLEN", LOG_KEY]).unwrap_or_default().trim(),
        "3"
    );
    let m = b.metrics();
    assert_eq!(
        m["flagsmith_sse_redis_errors_total{command=\"evalsha\"}"],
        0.0
    );
    assert_eq!(
        m["flagsmith_sse_redis_commands_total{command=\"evalsha\"}"],
        2.0
    );
}

#[test]
fn the_node_holding_the_slot_restarts_empty_and_instances_resynchronise() {
    let _serial = serial();
    let mut cluster = Cluster::start();
    let owner = cluster.owner_of("{flagsmith_sse}");
    let a = instance(&cluster.urls());
    let b = instance(&cluster.urls());
    wait_ready(&a);
    wait_ready(&b);
    let mut on_a = Subscriber::connect(a.addr, "restart-env");
    let mut on_b = Subscriber::connect(b.addr, "restart-env");
    let (t0, t1, t2, t3) = (BASE, BASE + 1_000_001, BASE + 2_000_001, BASE + 3_000_001);
    post_ok(a.addr, "restart-env", t1, t1);
    assert_next_update(&mut on_a, t1, Duration::from_secs(2));
    assert_next_update(&mut on_b, t1, Duration::from_secs(3));
    // a applied its own write without a fetch: let both fetch once, so that each knows the
    // data's epoch before the node loses it.
    wait_fetched(&a);
    wait_fetched(&b);

    // The owner dies (SIGKILL to its pid). It keeps no data (no RDB, no AOF).
    cluster.nodes[owner].stop();
    let killed = Instant::now();
    for server in [&a, &b] {
        assert!(
            readiness_within(server.addr, 503, Duration::from_secs(4)),
            "readiness stays 200 with the slot's node down:\n{}",
            server.log()
        );
        let asked = Instant::now();
        let r = post_micros(server.addr, "restart-env", t2);
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "{:?}",
            asked.elapsed()
        );
        assert!(
            wait_until(Duration::from_secs(3), || stream_head(
                server.addr,
                "restart-env-new"
            ) == (503, true)),
            "new subscriptions still accepted"
        );
    }
    println!(
        "both instances unavailable {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        !on_a.ended && !on_b.ended,
        "a stream was closed during the outage"
    );

    // It comes back on the same ports with its cluster configuration, and no data.
    cluster.nodes[owner].restart();
    let restarted = Instant::now();
    assert!(
        cluster.wait_ok(Duration::from_secs(20)),
        "the cluster did not recover"
    );
    assert_eq!(cluster.owner_of("{flagsmith_sse}"), owner);
    // An older time is stored again in the empty Redis; no client may see it.
    assert!(
        accepted_within(b.addr, "restart-env", t0, Duration::from_secs(10)),
        "queue-change not accepted after the restart:\n{}",
        b.log()
    );
    // a may still be waiting out its backoff.
    assert!(
        accepted_within(a.addr, "restart-env", t3, Duration::from_secs(5)),
        "queue-change not accepted after the restart:\n{}",
        a.log()
    );
    println!(
        "writes accepted {:?} after the restart",
        restarted.elapsed()
    );
    assert_next_update(&mut on_a, t3, Duration::from_secs(3));
    assert_next_update(&mut on_b, t3, Duration::from_secs(3));
    for server in [&a, &b] {
        assert_resynchronised(server, "restart-env", t3);
    }
    let quiet = Duration::from_millis(800);
    assert_eq!(updates_until_quiet(&mut on_a, quiet), Vec::<String>::new());
    assert_eq!(updates_until_quiet(&mut on_b, quiet), Vec::<String>::new());
    let errors: f64 = a
        .metrics()
        .into_iter()
        .filter(|(k, _)| k.starts_with("flagsmith_sse_redis_errors_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(errors >= 1.0, "no Redis errors counted");
}

#[test]
fn a_hung_node_holding_the_slot_makes_requests_fail_within_seconds() {
    let _serial = serial();
    let cluster = Cluster::start();
    let owner = cluster.owner_of("{flagsmith_sse}");
    let pid = cluster.nodes[owner].pid();
    let a = instance(&cluster.urls());
    wait_ready(&a);
    let mut sub = Subscriber::connect(a.addr, "hung-env");
    post_ok(a.addr, "hung-env", BASE, BASE);
    assert_next_update(&mut sub, BASE, Duration::from_secs(2));

    // The node still accepts connections (the kernel does) but answers nothing. For five
    // seconds, queue-changes keep coming (paced, not synchronised): each must be answered
    // within a read timeout plus one reconnection, whose handshakes with the hung node time
    // out, even after the backoff lets the instance try that node again.
    signal_pid(pid, "STOP");
    let stopped = Instant::now();
    let mut waits = Vec::new();
    let mut i = 0;
    while stopped.elapsed() < Duration::from_secs(5) {
        i += 1;
        let asked = Instant::now();
        let r = post_micros(a.addr, "hung-env", BASE + i);
        waits.push(asked.elapsed());
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        std::thread::sleep(Duration::from_millis(250));
    }
    let slowest = waits.iter().max().copied().unwrap_or_default();
    println!(
        "{} queue-changes with the slot's node hung: 503 within {slowest:?}",
        waits.len()
    );
    assert!(slowest < Duration::from_secs(6), "{waits:?}");
    assert!(readiness_within(a.addr, 503, Duration::from_secs(8)));
    assert!(!sub.ended);

    signal_pid(pid, "CONT");
    let resumed = Instant::now();
    assert!(
        accepted_within(a.addr, "hung-env", BASE + 99, Duration::from_secs(10)),
        "queue-change not accepted after the node resumed:\n{}",
        a.log()
    );
    assert_next_update(&mut sub, BASE + 99, Duration::from_secs(3));
    assert!(readiness_within(a.addr, 200, Duration::from_secs(3)));
    println!(
        "accepted and delivered again {:?} after the node resumed",
        resumed.elapsed()
    );
}

/// A cluster-mode instance with a fetch interval of 30 s: what it delivers within a second of
/// another instance's write came through the wake-up.
#[track_caller]
fn slow_instance(nodes: &str) -> Server {
    instance_every(nodes, "30")
}

/// Three more changes posted on `a`, each reaching `on_b` within a second of its post.
#[track_caller]
fn three_cross_at_once(a: &Server, on_b: &mut Subscriber, key: &str, mut t: i64) {
    for _ in 0..3 {
        t += 1_000_001;
        let posted = Instant::now();
        post_ok(a.addr, key, t, t);
        assert!(time_to(on_b, t, Duration::from_secs(5)).is_some());
        let took = posted.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}

#[test]
fn a_wake_up_crosses_nodes_between_instances_seeded_with_different_nodes() {
    let _serial = serial();
    let cluster = Cluster::start();
    let owner = cluster.owner_of("{flagsmith_sse}");
    // Neither instance's seed holds the keys; each listens on its own seed.
    let (x, y) = ((owner + 1) % 3, (owner + 2) % 3);
    let a = slow_instance(&cluster.nodes[x].url());
    let b = slow_instance(&cluster.nodes[y].url());
    wait_listening(&a);
    wait_listening(&b);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let want = if i == owner { 0 } else { 1 };
        assert_eq!(node.subscribers(CHANNEL), Some(want), "node {i}");
    }
    let mut on_b = Subscriber::connect(b.addr, "cross-env");
    let mut waits = Vec::new();
    for i in 0..5 {
        let t = BASE + i * 1_000_001;
        let posted = Instant::now();
        post_ok(a.addr, "cross-env", t, t);
        assert!(
            time_to(&mut on_b, t, Duration::from_secs(5)).is_some(),
            "change {i} did not reach b:\n{}",
            b.log()
        );
        waits.push(posted.elapsed());
    }
    let (median, max) = median_max(&waits);
    println!("post on a to event on b across nodes: median {median:?}, max {max:?}");
    assert!(max < Duration::from_secs(1), "{waits:?}");
    let m = b.metrics();
    assert_eq!(m["flagsmith_sse_fetches_total{trigger=\"wakeup\"}"], 5.0);
}

#[test]
fn wake_ups_resume_after_the_node_carrying_them_restarts() {
    let _serial = serial();
    let mut cluster = Cluster::start();
    let owner = cluster.owner_of("{flagsmith_sse}");
    // b knows only the node that holds the keys, runs the write script and publishes: its
    // listener is on the node that restarts.
    let a = slow_instance(&cluster.urls());
    let b = slow_instance(&cluster.nodes[owner].url());
    wait_listening(&a);
    wait_listening(&b);
    let mut on_b = Subscriber::connect(b.addr, "failover-env");
    post_ok(a.addr, "failover-env", BASE, BASE);
    let took = time_to(&mut on_b, BASE, Duration::from_secs(5)).expect("delivered");
    assert!(took < Duration::from_secs(1), "{took:?}");

    cluster.nodes[owner].restart();
    assert!(
        cluster.wait_ok(Duration::from_secs(20)),
        "the cluster did not recover"
    );
    b.assert_log(
        "wake-up listener lost its Redis connection",
        Duration::from_secs(5),
    );
    assert!(
        b.wait_log(
            "listening for wake-ups on {flagsmith_sse}:wake again",
            Duration::from_secs(10)
        ),
        "the listener did not come back:\n{}",
        b.log()
    );
    // The node came back empty: the first write after it may wait for the instances' store
    // connections to recover; then each change crosses at once again.
    let t = BASE + 1_000_001;
    assert!(
        accepted_within(a.addr, "failover-env", t, Duration::from_secs(10)),
        "{}",
        a.log()
    );
    assert!(
        time_to(&mut on_b, t, Duration::from_secs(5)).is_some(),
        "{}",
        b.log()
    );
    three_cross_at_once(&a, &mut on_b, "failover-env", t);
}

#[test]
fn wake_ups_survive_a_failover_of_the_node_the_listener_is_on() {
    let _serial = serial();
    let mut cluster = Cluster::start();
    let owner = cluster.owner_of("{flagsmith_sse}");
    let replica = cluster.add_replica(owner);
    // b's first seed is the primary of the keys: its listener subscribes there.
    let others: Vec<String> = (0..3)
        .filter(|i| *i != owner)
        .map(|i| cluster.nodes[i].url())
        .collect();
    let b_seeds = format!("{},{}", cluster.nodes[owner].url(), others.join(","));
    let a = slow_instance(&cluster.urls());
    let b = slow_instance(&b_seeds);
    wait_listening(&a);
    wait_listening(&b);
    assert!(
        cluster.nodes[owner]
            .subscribers(CHANNEL)
            .is_some_and(|n| n >= 1)
    );
    let mut on_b = Subscriber::connect(b.addr, "failover-wake");
    post_ok(a.addr, "failover-wake", BASE, BASE);
    let took = time_to(&mut on_b, BASE, Duration::from_secs(5)).expect("delivered");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // The primary dies; its replica takes over without it.
    cluster.nodes[owner].stop();
    let killed = Instant::now();
    assert_eq!(
        replica
            .cli(&["CLUSTER", "FAILOVER", "TAKEOVER"])
            .unwrap_or_default()
            .trim(),
        "OK"
    );
    assert!(
        wait_until(Duration::from_secs(20), || replica
            .cli(&["ROLE"])
            .is_some_and(|r| r.starts_with("master"))),
        "the replica did not take over"
    );
    assert!(
        b.wait_log(
            "listening for wake-ups on {flagsmith_sse}:wake again",
            Duration::from_secs(10)
        ),
        "the listener did not move to another node:\n{}",
        b.log()
    );
    let t = BASE + 1_000_001;
    assert!(
        accepted_within(a.addr, "failover-wake", t, Duration::from_secs(15)),
        "writes did not resume after the failover:\n{}",
        a.log()
    );
    println!(
        "writes accepted {:?} after the primary died",
        killed.elapsed()
    );
    assert!(
        time_to(&mut on_b, t, Duration::from_secs(5)).is_some(),
        "{}",
        b.log()
    );
    three_cross_at_once(&a, &mut on_b, "failover-wake", t);
}
