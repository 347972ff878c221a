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
//! instance A, and in the same run also to B itself, so that the second instance's path is
//! compared with the local one. With `--instances N` it starts N of our servers on one port
//! (`REUSE_PORT`) and one `redis-server` and reports each one's and their total memory and CPU,
//! and the Redis commands they send. Every latency sample goes to a CSV file and into an SVG
//! chart of the latency distributions; `--chart-from` draws one chart from several runs' files.
//! Only loopback addresses are used, and every wait and loop is bounded in count and time. With
//! `--responsive` it runs the responsiveness scenario of `responsive.rs` instead.

mod clock;
mod csv;
mod floor;
mod httpc;
mod instances;
mod json;
mod opts;
mod phases;
mod pool;
mod procs;
mod qc;
mod report;
mod responsive;
mod stats;
mod svg;
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
    let result = if opts.chart_from.is_empty() {
        run(&opts)
    } else {
        chart_from(&opts)
    };
    if let Err(e) = result {
        eprintln!("load: {e}");
        std::process::exit(1);
    }
}

/// A progress line on stderr.
pub fn say(msg: &str) {
    eprintln!("load: {msg}");
}

/// Writes `text` to `path`, creating its directory first if need be.
pub fn write_file(path: &std::path::Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Prints `rows` as a Markdown table of measures and values, between blank lines.
pub fn print_table<K: std::fmt::Display, V: std::fmt::Display>(rows: &[(K, V)]) {
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    println!();
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

/// `--chart-from`: one chart (and optionally one CDF file) from several runs' CSV files.
fn chart_from(o: &Opts) -> Result<(), String> {
    let mut series = Vec::new();
    for p in &o.chart_from {
        // PATH@NAME: the series of that file are drawn under the server name NAME.
        let text = p.to_string_lossy();
        let (path, name) = match text.split_once('@') {
            Some((path, name)) => (std::path::PathBuf::from(path), Some(csv::field(name))),
            None => (p.clone(), None),
        };
        let mut s = csv::read(&path)?;
        if let Some(name) = name {
            for x in &mut s {
                x.server = name.clone();
            }
        }
        say(&format!("{}: {} series", path.display(), s.len()));
        series.extend(s);
    }
    write_chart(o, &series)
}

fn write_chart(o: &Opts, series: &[csv::Series]) -> Result<(), String> {
    let title = "Publish → delivery latency, cumulative distribution";
    write_file(&o.svg, &svg::cdf_chart(series, title))?;
    say(&format!("chart written to {}", o.svg.display()));
    if let Some(p) = &o.cdf_csv {
        csv::write_cdf(p, series)?;
        say(&format!("CDF points written to {}", p.display()));
    }
    Ok(())
}

fn self_check() -> Result<(), String> {
    csv::self_check()?;
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
    if o.responsive {
        return responsive::run(o);
    }

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
    let pids = target.server_pids();
    let fleet = o.instances > 0;
    let snap0 = instances::snap(&pids);
    let kmem0 = instances::kernel_mem();
    let redis_pid = target.redis.as_ref().map(procs::Proc::pid);
    let cmds = |t: &target::Target| t.redis_port.and_then(|p| instances::commandstats(p).ok());

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
    let snap1 = instances::snap(&pids);
    let kmem1 = instances::kernel_mem();
    let fds1: Vec<Option<usize>> = pids.iter().map(|&p| instances::fds(p)).collect();

    // Idle.
    say(&format!(
        "idle: {} s with {open} subscribers",
        o.idle_seconds
    ));
    let cpu0 = target.pid.and_then(procs::cpu_time);
    let cpu0_a = a_pid.and_then(procs::cpu_time);
    let idle_snap0 = instances::snap(&pids);
    let redis_cpu0 = redis_pid.and_then(procs::cpu_time);
    let cmds0 = cmds(&target);
    let idle_started = Instant::now();
    let mut watched = pids.clone();
    watched.extend(a_pid);
    phases::idle(o.idle_seconds, &watched, open);
    let cmds1 = cmds(&target);
    let cpu1 = target.pid.and_then(procs::cpu_time);
    let cpu1_a = a_pid.and_then(procs::cpu_time);
    let idle_snap1 = instances::snap(&pids);
    let redis_cpu1 = redis_pid.and_then(procs::cpu_time);
    let idle_wall = idle_started.elapsed().as_secs_f64();
    let share = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if idle_wall > 0.0 => {
            Some(b.saturating_sub(a).as_secs_f64() / idle_wall)
        }
        _ => None,
    };
    let idle_cpu = share(cpu0, cpu1);
    let idle_cpu_a = share(cpu0_a, cpu1_a);
    let rss_idle_end = target.pid.and_then(procs::rss_kb);
    let rss_idle_end_a = a_pid.and_then(procs::rss_kb);
    let idle_shares = idle_snap0.cpu_shares(&idle_snap1, idle_wall);
    let redis_idle_cpu = share(redis_cpu0, redis_cpu1);

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
    let single_started = Instant::now();
    let busy0 = instances::snap(&watched);
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
    let single_wall = single_started.elapsed().as_secs_f64();
    let busy1 = instances::snap(&watched);
    let many_rounds: Vec<Vec<usize>> = (0..o.many_rounds).map(|_| (0..o.envs).collect()).collect();
    say(&format!(
        "latency: {} rounds of one change to each of {} environments{via}",
        o.many_rounds, o.envs
    ));
    let many_started = Instant::now();
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
    let cmds3 = cmds(&target);
    let many_wall = many_started.elapsed().as_secs_f64();
    // The local path in the same run: the same rounds published to B itself.
    let (local_single, local_many) = match target.local_publisher.as_mut() {
        Some(p) => {
            say(&format!(
                "latency: {} rounds of one change to one environment, published to B itself",
                o.rounds
            ));
            let one = phases::latency_rounds_with(
                &mut workers,
                p,
                &mut times,
                o,
                &single_rounds,
                &counts,
                pace,
            )?;
            say(&format!(
                "latency: {} rounds of one change to each of {} environments, published to B itself",
                o.many_rounds, o.envs
            ));
            let all = phases::latency_rounds_with(
                &mut workers,
                p,
                &mut times,
                o,
                &many_rounds,
                &counts,
                pace,
            )?;
            (one, all)
        }
        None => Default::default(),
    };
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
    let mut more_exits = Vec::new();
    for (i, mut p) in std::mem::take(&mut target.more_instances)
        .into_iter()
        .enumerate()
    {
        server_log.extend(
            p.log_matching(" WARN ")
                .into_iter()
                .chain(p.log_matching(" ERROR "))
                .map(|l| format!("instance {}: {l}", i + 2)),
        );
        more_exits.push(p.stop(Duration::from_secs(15)));
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

    // Every sample to the CSV file and the chart.
    let label = target.label(o);
    let per_env = open as f64 / o.envs.max(1) as f64;
    let one_name = format!("one environment of ~{per_env:.0}");
    let all_name = format!("all {} environments at once", o.envs);
    let mut samples = Vec::new();
    let scenarios: [(&phases::Latency, String); 4] = if o.second_instance {
        [
            (&single, format!("A → B: {one_name}")),
            (&many, format!("A → B: {all_name}")),
            (&local_single, format!("B → B (local): {one_name}")),
            (&local_many, format!("B → B (local): {all_name}")),
        ]
    } else {
        [
            (&single, one_name.clone()),
            (&many, all_name.clone()),
            (&local_single, String::new()),
            (&local_many, String::new()),
        ]
    };
    for (l, name) in scenarios {
        samples.extend(
            l.samples
                .iter()
                .map(|&(round, env, subscriber, latency_ns)| csv::Sample {
                    scenario: name.clone(),
                    server: label.clone(),
                    round,
                    env,
                    subscriber,
                    latency_ns,
                }),
        );
    }
    csv::write_samples(&o.csv, &samples)?;
    say(&format!(
        "{} latency samples written to {}",
        samples.len(),
        o.csv.display()
    ));
    write_chart(o, &csv::series_of(&samples))?;

    // Instances, Redis and the kernel.
    let mut extra_rows: Vec<(String, String)> = Vec::new();
    let mut extra_json: Vec<(String, Json)> = Vec::new();
    if open > 0 {
        let mib =
            |v: Option<u64>| v.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
        let per = |v: Option<u64>| {
            v.map_or("?".into(), |k| {
                format!("{:.0} B", k as f64 * 1024.0 / open as f64)
            })
        };
        extra_rows.push((
            format!(
                "user-space memory of the {} server process(es) with {open} subscribers, in total",
                pids.len()
            ),
            format!(
                "RSS {} ({} per subscriber; counts shared code once per process), PSS {} ({}), anonymous {} ({}); before subscribers: RSS {}, PSS {}, anonymous {}",
                mib(snap1.rss_total()),
                per(snap1.rss_total()),
                mib(snap1.pss_total()),
                per(snap1.pss_total()),
                mib(snap1.anon_total()),
                per(snap1.anon_total()),
                mib(snap0.rss_total()),
                mib(snap0.pss_total()),
                mib(snap0.anon_total()),
            ),
        ));
        let mut j = Json::obj();
        j.set("subscribers", open)
            .set("rss_before_kib", snap0.rss_total())
            .set("rss_with_kib", snap1.rss_total())
            .set("pss_before_kib", snap0.pss_total())
            .set("pss_with_kib", snap1.pss_total())
            .set("anon_before_kib", snap0.anon_total())
            .set("anon_with_kib", snap1.anon_total())
            .set(
                "rss_total_bytes_per_subscriber",
                snap1.rss_total().map(|k| k as f64 * 1024.0 / open as f64),
            )
            .set(
                "pss_total_bytes_per_subscriber",
                snap1.pss_total().map(|k| k as f64 * 1024.0 / open as f64),
            )
            .set(
                "anon_total_bytes_per_subscriber",
                snap1.anon_total().map(|k| k as f64 * 1024.0 / open as f64),
            );
        extra_json.push(("server_memory_total".into(), j));
    }
    if let Some(busy) = instances::total(&busy0.cpu_shares(&busy1, 1.0))
        && single.received > 0
    {
        let idle = instances::total(&idle_shares).unwrap_or(0.0)
            + if o.second_instance {
                idle_cpu_a.unwrap_or(0.0)
            } else {
                0.0
            };
        let net = (busy - idle * single_wall).max(0.0);
        extra_rows.push((
            "server CPU per delivery, one-environment rounds (all instances, less the idle rate)"
                .into(),
            format!(
                "{:.2} µs ({net:.2} CPU-s over {single_wall:.1} s for {} deliveries)",
                net * 1e6 / single.received as f64,
                single.received
            ),
        ));
        let mut j = Json::obj();
        j.set("cpu_seconds", busy)
            .set("cpu_seconds_less_idle", net)
            .set("wall_seconds", single_wall)
            .set("deliveries", single.received)
            .set("us_per_delivery", net * 1e6 / single.received as f64);
        extra_json.push(("cpu_one_env_rounds".into(), j));
    }
    if fleet {
        let mut exits = vec![server_exit.clone().unwrap_or_default()];
        exits.extend(more_exits);
        let mib = |v: Option<u64>| v.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0));
        let per: Vec<String> = (0..pids.len())
            .map(|i| {
                format!(
                    "#{} {} fds, {} → {} MiB, {}",
                    i + 1,
                    fds1.get(i)
                        .copied()
                        .flatten()
                        .map_or("?".into(), |n| n.to_string()),
                    mib(snap0.rss_kib.get(i).copied().flatten()),
                    mib(snap1.rss_kib.get(i).copied().flatten()),
                    idle_shares
                        .get(i)
                        .copied()
                        .flatten()
                        .map_or("?".into(), |c| format!("{:.2} %", c * 100.0))
                )
            })
            .collect();
        extra_rows.push((
            format!(
                "per instance: open descriptors, RSS before → with subscribers, idle CPU ({} instances)",
                pids.len()
            ),
            per.join("; "),
        ));
        let mut arr = Vec::new();
        for (i, pid) in pids.iter().enumerate() {
            let mut j = Json::obj();
            j.set("pid", *pid)
                .set("open_fds", fds1.get(i).copied().flatten())
                .set("rss_before_kib", snap0.rss_kib.get(i).copied().flatten())
                .set(
                    "rss_with_subscribers_kib",
                    snap1.rss_kib.get(i).copied().flatten(),
                )
                .set(
                    "rss_after_idle_kib",
                    idle_snap1.rss_kib.get(i).copied().flatten(),
                )
                .set(
                    "idle_cpu_fraction_of_one_core",
                    idle_shares.get(i).copied().flatten(),
                )
                .set("exit", exits.get(i).cloned());
            arr.push(j);
        }
        extra_json.push(("instances".into(), Json::Arr(arr)));
    }
    if let (Some(c0), Some(c1)) = (&cmds0, &cmds1) {
        let n_inst = (pids.len() + usize::from(a_pid.is_some())).max(1) as f64;
        let idle_calls = instances::calls_between(c0, c1);
        let idle_total: u64 = idle_calls.values().sum();
        let idle_rate = idle_total as f64 / idle_wall.max(1e-9);
        extra_rows.push((
            format!("Redis commands per second, idle ({n_inst} instances; INFO commandstats)"),
            format!(
                "{idle_rate:.1}/s in total, {:.2}/s per instance ({} over {idle_wall:.1} s); redis-server CPU {}",
                idle_rate / n_inst,
                instances::calls_text(&idle_calls),
                redis_idle_cpu.map_or("?".into(), |c| format!("{:.2} % of one core", c * 100.0))
            ),
        ));
        let mut rj = Json::obj();
        rj.set("instances", n_inst)
            .set("idle_seconds", idle_wall)
            .set("idle_commands_per_s", idle_rate)
            .set("idle_commands_per_s_per_instance", idle_rate / n_inst)
            .set("redis_idle_cpu_fraction_of_one_core", redis_idle_cpu)
            .set(
                "idle_calls",
                Json::Obj(
                    idle_calls
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::from(*v)))
                        .collect(),
                ),
            );
        if let Some(c3) = &cmds3 {
            let changes = single.publishes + many.publishes;
            let wall = single_wall + many_wall;
            let during = instances::calls_between(c1, c3);
            let per_change: Vec<(String, f64)> = during
                .iter()
                .map(|(k, v)| {
                    let idle = idle_calls.get(k).copied().unwrap_or(0) as f64 / idle_wall.max(1e-9);
                    (k.clone(), (*v as f64 - idle * wall) / changes.max(1) as f64)
                })
                .collect();
            let total: f64 = per_change.iter().map(|x| x.1).sum();
            extra_rows.push((
                "Redis commands per change (latency rounds, less the idle rate)".into(),
                format!(
                    "{total:.1} per change over {changes} changes in {wall:.1} s ({})",
                    per_change
                        .iter()
                        .filter(|x| x.1.abs() >= 0.05)
                        .map(|(k, v)| format!("{k} {v:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            rj.set("changes", changes)
                .set("rounds_seconds", wall)
                .set("commands_per_change", total)
                .set(
                    "per_change_by_command",
                    Json::Obj(
                        per_change
                            .into_iter()
                            .map(|(k, v)| (k, Json::from(v)))
                            .collect(),
                    ),
                );
        }
        extra_json.push(("redis".into(), rj));
    }
    let kg = instances::growth(&kmem0, &kmem1, open);
    extra_rows.extend(kg.rows());
    extra_json.push(("kernel_memory".into(), kg.json()));

    // With two instances, per-instance figures stay out of the single-instance ones.
    let (single, many, second) = if o.second_instance {
        let second = report::Second {
            interval_s: interval,
            gap_s: o.round_gap,
            one_env: single,
            all_envs: many,
            local_one_env: local_single,
            local_all_envs: local_many,
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
    // Over several instances, the figures of the whole fleet.
    let (rss0, rss1, rss_idle_end, idle_cpu) = if fleet {
        (
            snap0.rss_total(),
            snap1.rss_total(),
            idle_snap1.rss_total(),
            instances::total(&idle_shares),
        )
    } else {
        (rss0, rss1, rss_idle_end, idle_cpu)
    };
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
        // Over several instances each scrape reaches any one of them: the first one counts
        // from zero on every instance, the second one would mix two instances' counts.
        fan_many: if fleet {
            None
        } else {
            target::fanout_between(&m1, &m2)
        },
        single,
        many,
        second,
        qc,
        end: end_status,
        server_log,
        server_exit,
        metrics_at_end: m_end,
        extra_rows,
        extra_json,
    };
    print_table(&report::table(o, &results));
    write_file(&o.json, &report::json(o, &results).pretty())?;
    say(&format!("result written to {}", o.json.display()));
    Ok(())
}
