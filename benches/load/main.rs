//! Load harness for SSE servers: `cargo bench --bench load -- [options]` (`--help` lists them).
//!
//! The parent process starts the server under test (our release binary with an embedded store
//! or a `redis-server`, or nginx with nchan, or nothing for a server someone else runs), then
//! re-executes itself as worker processes (`--worker`) that each hold thousands of subscribers
//! from their own source address. It measures connecting, idle memory and CPU,
//! publish-to-delivery latency (publish and arrival times both on `CLOCK_MONOTONIC`), the
//! server's own fan-out time, publish throughput, and this machine's floor for the same writes;
//! prints a Markdown table and writes one JSON result. With `--second-instance` it starts two
//! of our servers on one `redis-server`, holds every subscriber on instance B and publishes to
//! instance A, so that latency is that of B's periodic fetch plus its fan-out. Only loopback
//! addresses are used, and every wait and loop is bounded in count and time.

mod clock;
mod floor;
mod httpc;
mod json;
mod opts;
mod phases;
mod pool;
mod procs;
mod qc;
mod report;
mod stats;
mod target;
mod worker;

use clock::TimeSource;
use json::Json;
use opts::{Opts, USAGE};
use phases::Pace;
use pool::{Status, Workers};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--worker") {
        std::process::exit(worker::main(&args[1..]));
    }
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("load: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&opts) {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}

/// A progress line on stderr.
pub fn say(msg: &str) {
    eprintln!("load: {msg}");
}

fn machine() -> Json {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let mut m = Json::obj();
    m.set("cpus", cpus)
        .set("cpu_model", model)
        .set("kernel", kernel)
        .set("memory_mib", mem / 1024);
    m
}

fn self_check() -> Result<(), String> {
    let t = clock::epoch_micros();
    let back = flagsmith_sse::timestamp::parse_iso8601(&clock::iso8601(t));
    if back != Ok(t) {
        return Err(format!(
            "self-check: {} parses back as {back:?}",
            clock::iso8601(t)
        ));
    }
    if worker::updated_at(b"{\"updated_at\": 1735229888.760412}") != Some(1_735_229_888_760_412) {
        return Err("self-check: cannot read updated_at".into());
    }
    Ok(())
}

fn run(o: &Opts) -> Result<(), String> {
    let nofile = procs::raise_nofile();
    self_check()?;

    // The floor, first, while nothing else runs.
    let frame = flagsmith_sse::sse::Event::new(clock::epoch_micros())
        .bytes(true)
        .to_vec();
    let pairs = o.floor_pairs.min((nofile as usize).saturating_sub(256) / 2);
    let floor = if pairs > 0 {
        say(&format!(
            "floor: writing one frame to each of {pairs} loopback sockets"
        ));
        Some(floor::measure(pairs, &frame)?)
    } else {
        None
    };

    let mut target = target::setup(o)?;
    say(&format!(
        "target: {}{}",
        target.name,
        target
            .pid
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default()
    ));
    std::thread::sleep(Duration::from_millis(500));
    let a_pid = target.publish_side.as_ref().map(|p| p.proc.pid());
    let rss0_a = a_pid.and_then(procs::rss_kb);
    let rss0 = target.pid.and_then(procs::rss_kb);
    let slab0 = procs::slab_bytes();

    let rounds_secs = (o.rounds + o.many_rounds) as f64 * (o.round_gap + 12.0);
    let connect_secs = if o.rate > 0.0 {
        o.subscribers as f64 / o.rate * 2.0 + 30.0
    } else {
        o.subscribers as f64 / 1000.0 + 60.0
    };
    let worker_deadline =
        Duration::from_secs_f64(connect_secs + o.idle_seconds + rounds_secs + 120.0);
    say(&format!(
        "{} subscribers over {} environments from {} workers ({}..), {} connects/s",
        o.subscribers,
        o.envs,
        o.workers,
        Ipv4Addr::new(127, 0, 0, 2),
        if o.rate > 0.0 {
            format!("{}", o.rate)
        } else {
            "unpaced".into()
        }
    ));
    let mut workers = Workers::spawn(o, &target, worker_deadline)?;
    let connected = phases::connect_phase(&mut workers, o)?;
    std::thread::sleep(Duration::from_secs(1));
    let counts = workers.counts(o.envs)?;
    let open: u64 = counts.iter().sum();
    let rss1 = target.pid.and_then(procs::rss_kb);
    let rss1_a = a_pid.and_then(procs::rss_kb);
    let slab1 = procs::slab_bytes();

    // Idle.
    say(&format!(
        "idle: {} s with {open} subscribers",
        o.idle_seconds
    ));
    let cpu0 = target.pid.and_then(procs::cpu_time);
    let cpu0_a = a_pid.and_then(procs::cpu_time);
    let idle_started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(o.idle_seconds));
    let cpu1 = target.pid.and_then(procs::cpu_time);
    let cpu1_a = a_pid.and_then(procs::cpu_time);
    let idle_wall = idle_started.elapsed().as_secs_f64();
    let share = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if idle_wall > 0.0 => Some((b - a).as_secs_f64() / idle_wall),
        _ => None,
    };
    let idle_cpu = share(cpu0, cpu1);
    let idle_cpu_a = share(cpu0_a, cpu1_a);
    let rss_idle_end = target.pid.and_then(procs::rss_kb);
    let rss_idle_end_a = a_pid.and_then(procs::rss_kb);

    // Latency.
    let _ = workers.flush()?;
    let mut times = TimeSource::default();
    let m0 = target::scrape(&target);
    let interval = o.cache_interval().unwrap_or(1.0);
    let pace = if o.second_instance {
        Pace::Phased {
            gap: Duration::from_secs_f64(o.round_gap),
            period: Duration::from_secs_f64(interval),
        }
    } else {
        Pace::Gap(Duration::from_secs_f64(o.round_gap))
    };
    let via = if o.second_instance {
        format!(
            ", published to instance A, delivered by instance B (rounds {} s apart, fetch every {} s)",
            o.round_gap, interval
        )
    } else {
        String::new()
    };
    let single_rounds: Vec<Vec<usize>> = (0..o.rounds).map(|r| vec![r % o.envs]).collect();
    say(&format!(
        "latency: {} rounds of one change to one environment{via}",
        o.rounds
    ));
    let single = phases::latency_rounds(
        &mut workers,
        &mut target,
        &mut times,
        o,
        &single_rounds,
        &counts,
        pace,
    )?;
    let m1 = target::scrape(&target);
    let many_rounds: Vec<Vec<usize>> = (0..o.many_rounds).map(|_| (0..o.envs).collect()).collect();
    say(&format!(
        "latency: {} rounds of one change to each of {} environments{via}",
        o.many_rounds, o.envs
    ));
    let many = phases::latency_rounds(
        &mut workers,
        &mut target,
        &mut times,
        o,
        &many_rounds,
        &counts,
        pace,
    )?;
    let m2 = target::scrape(&target);
    let end_status = Status::total(&workers.status()?);
    workers.quit();

    // Publish throughput, with the subscribers gone.
    let qc = match (&target.qc, o.qc_seconds > 0.0) {
        (Some(q), true) => {
            say(&format!(
                "publish throughput: {} s over {} keep-alive connections ({})",
                o.qc_seconds, o.qc_conns, q.what
            ));
            let req = qc::Requests {
                addr: q.url.addr,
                host: &q.url.host,
                path: &q.url.path,
                headers: &q.headers,
                body: &q.body,
                prefix: &o.prefix,
            };
            Some((qc::run(&req, o.qc_conns, o.qc_seconds)?, q.what.clone()))
        }
        _ => None,
    };
    let m_end = target::scrape(&target);

    // Stop what we started, by pid.
    let mut server_log: Vec<String> = Vec::new();
    let mut server_exit = None;
    if let Some(mut s) = target.server.take() {
        server_log = s
            .log_matching(" WARN ")
            .into_iter()
            .chain(s.log_matching(" ERROR "))
            .collect();
        server_exit = Some(s.stop(Duration::from_secs(15)));
    }
    if let Some(mut ng) = target.nginx.take() {
        let log = std::fs::read_to_string(ng.dir.0.join("error.log")).unwrap_or_default();
        server_log = log
            .lines()
            .filter(|l| !l.contains("[notice]"))
            .map(str::to_owned)
            .collect();
        server_exit = Some(ng.proc.stop(Duration::from_secs(15)));
    }
    let mut exit_a = None;
    if let Some(mut a) = target.publish_side.take() {
        server_log.extend(
            a.proc
                .log_matching(" WARN ")
                .into_iter()
                .chain(a.proc.log_matching(" ERROR "))
                .map(|l| format!("instance A: {l}")),
        );
        exit_a = Some(a.proc.stop(Duration::from_secs(15)));
    }
    if let Some(mut r) = target.redis.take() {
        r.stop(Duration::from_secs(5));
    }

    // With two instances, per-instance figures stay out of the single-instance ones.
    let (single, many, second) = if o.second_instance {
        let second = report::Second {
            interval_s: interval,
            gap_s: o.round_gap,
            one_env: single,
            all_envs: many,
            a: report::InstanceUse {
                rss_before_kib: rss0_a,
                rss_with_kib: rss1_a,
                rss_after_idle_kib: rss_idle_end_a,
                idle_cpu: idle_cpu_a,
                exit: exit_a,
            },
            b: report::InstanceUse {
                rss_before_kib: rss0,
                rss_with_kib: rss1,
                rss_after_idle_kib: rss_idle_end,
                idle_cpu,
                exit: server_exit.clone(),
            },
        };
        (Default::default(), Default::default(), Some(second))
    } else {
        (single, many, None)
    };
    let alone = |v: Option<u64>| if o.second_instance { None } else { v };
    let results = report::Results {
        machine: machine(),
        target: target.name.clone(),
        floor,
        connected,
        open,
        rss_before_kib: alone(rss0),
        rss_with_kib: alone(rss1),
        rss_after_idle_kib: alone(rss_idle_end),
        slab_before: slab0,
        slab_with: slab1,
        idle_seconds: idle_wall,
        idle_cpu: if o.second_instance { None } else { idle_cpu },
        fan_single: target::fanout_between(&m0, &m1),
        fan_many: target::fanout_between(&m1, &m2),
        single,
        many,
        second,
        qc,
        end: end_status,
        server_log,
        server_exit,
        metrics_at_end: m_end,
    };
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    for (k, v) in report::table(o, &results) {
        println!("| {k} | {v} |");
    }
    println!();
    if let Some(dir) = o.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&o.json, report::json(o, &results).pretty())
        .map_err(|e| format!("{}: {e}", o.json.display()))?;
    say(&format!("result written to {}", o.json.display()));
    Ok(())
}
