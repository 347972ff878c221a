//! The responsiveness scenario (`--responsive`): does the server answer other clients while it
//! fans an update out to many subscribers?
//!
//! Every subscriber is on one environment. After one warm-up update (so that the environment
//! has a time to send on connect), it publishes an update every `--round-gap` seconds (0.5)
//! for `--rounds` rounds (12), and meanwhile, from threads of this process:
//!
//! - a prober sends `GET /health/liveness/` every [`PROBE_EVERY`] over one keep-alive
//!   connection and times each answer;
//! - a joiner opens a new subscriber every [`JOIN_EVERY`] and times it from `connect` to its
//!   initial event, then closes it.
//!
//! It reports p50/p99/max of both, the server's mean fan-out time from its /metrics over the
//! rounds, and publish-to-delivery latency over all subscribers. Our server runs with
//! `STREAM_DELAY=0` unless `--server-env` says otherwise: with the default one-second window,
//! every second update of a round every 0.5 s would wait for the window, and latency would
//! measure the window, not the server.

use crate::clock::TimeSource;
use crate::json::Json;
use crate::opts::Opts;
use crate::phases::{self, Pace, ms};
use crate::pool::{Status, Workers};
use crate::stats::Summary;
use crate::{httpc, print_table, say, target, write_file};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Time between two health probes.
pub const PROBE_EVERY: Duration = Duration::from_millis(5);
/// Time between two new subscribers.
pub const JOIN_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for one probe's answer or one joiner's initial event.
const WAIT_LIMIT: Duration = Duration::from_secs(5);
/// Largest response a joiner reads while looking for its initial event.
const MAX_JOIN_BYTES: usize = 64 * 1024;

/// Samples (ns) and failures of one background measure.
#[derive(Default)]
struct Samples {
    ns: Vec<u64>,
    failures: Vec<String>,
}

/// A background thread that measures until told to stop.
struct Meter {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Samples>,
}

impl Meter {
    fn start(
        every: Duration,
        mut once: impl FnMut() -> Result<u64, String> + Send + 'static,
    ) -> Meter {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut s = Samples::default();
            let start = Instant::now();
            let mut k: u32 = 0;
            while !flag.load(Ordering::Relaxed) {
                match once() {
                    Ok(ns) => s.ns.push(ns),
                    Err(e) => s.failures.push(e),
                }
                // A fixed cadence: a slow answer makes the next attempt go at once, not later.
                k += 1;
                let next = start + every * k;
                if let Some(rest) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(rest);
                } else {
                    k = (start.elapsed().as_nanos() / every.as_nanos().max(1)) as u32;
                }
            }
            s
        });
        Meter { stop, handle }
    }

    fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_else(|_| Samples {
            ns: Vec::new(),
            failures: vec!["the measuring thread panicked".into()],
        })
    }
}

/// One liveness probe over the keep-alive client: its round trip in ns.
fn probe(client: &mut httpc::Client, req: &[u8]) -> Result<u64, String> {
    let t0 = Instant::now();
    let r = client.send(req)?;
    let took = t0.elapsed().as_nanos() as u64;
    if r.status != 200 {
        return Err(format!("liveness answered {}", r.status));
    }
    Ok(took)
}

/// One new subscriber: ns from `connect` to its initial event.
fn join(addr: SocketAddr, req: &[u8]) -> Result<u64, String> {
    let t0 = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&addr, WAIT_LIMIT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT_LIMIT))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(req).map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 200") {
                let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
                return Err(format!("answered {:?}", String::from_utf8_lossy(line)));
            }
            let body = &buf[head_end..];
            if let Some(at) = body.windows(13).position(|w| w == b"\"updated_at\":")
                && body[at..].contains(&b'}')
            {
                return Ok(t0.elapsed().as_nanos() as u64);
            }
        }
        if buf.len() > MAX_JOIN_BYTES || t0.elapsed() > WAIT_LIMIT {
            return Err("no initial event".into());
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed before the initial event".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

fn summary_json(s: &Summary, n: usize, failures: &[String]) -> Json {
    let mut j = Json::obj();
    j.set("samples", n)
        .set("failures", failures.len())
        .set("p50_ms", ms(s.p50))
        .set("p99_ms", ms(s.p99))
        .set("max_ms", ms(s.max))
        .set("mean_ms", s.mean / 1e6);
    if let Some(first) = failures.first() {
        j.set("first_failure", first.as_str());
    }
    j
}

/// Runs the scenario against the target `o` names and prints and writes its results.
pub fn run(o: &Opts) -> Result<(), String> {
    let mut target = target::setup(o)?;
    say(&format!("target: {}", target.name));
    let addr = target.stream.addr;
    let key = o.env_key(0);
    let stream_req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        target.stream.path.replace("{env}", &key),
        target.stream.host
    );
    let probe_req = format!(
        "GET /health/liveness/ HTTP/1.1\r\nHost: {}\r\n\r\n",
        target.stream.host
    );

    let rounds_secs = (o.rounds + 1) as f64 * (o.round_gap + 12.0);
    let connect_secs = if o.rate > 0.0 {
        o.subscribers as f64 / o.rate * 2.0 + 30.0
    } else {
        o.subscribers as f64 / 1000.0 + 60.0
    };
    let deadline = Duration::from_secs_f64(connect_secs + rounds_secs + 120.0);
    say(&format!(
        "responsiveness: {} subscribers on {key} from {} workers",
        o.subscribers, o.workers
    ));
    let mut workers = Workers::spawn(o, &target, deadline)?;
    let connected = phases::connect_phase(&mut workers, o)?;
    std::thread::sleep(Duration::from_secs(1));
    let counts = workers.counts(1)?;
    let open: u64 = counts.iter().sum();
    let mut times = TimeSource::default();

    say("warm-up: one update, so that new subscribers get a time on connect");
    let warm = [vec![0]];
    phases::latency_rounds(
        &mut workers,
        &mut target,
        &mut times,
        o,
        &warm,
        &counts,
        Pace::Gap(Duration::ZERO),
    )?;

    let m0 = target::scrape(&target);
    let prober = {
        let mut client = httpc::Client::new(addr);
        let req = probe_req.into_bytes();
        Meter::start(PROBE_EVERY, move || probe(&mut client, &req))
    };
    let joiner = {
        let req = stream_req.into_bytes();
        Meter::start(JOIN_EVERY, move || join(addr, &req))
    };
    say(&format!(
        "{} rounds, one update every {} s, probing liveness every {:?} and adding a \
         subscriber every {:?}",
        o.rounds, o.round_gap, PROBE_EVERY, JOIN_EVERY
    ));
    let rounds: Vec<Vec<usize>> = (0..o.rounds).map(|_| vec![0]).collect();
    let latency = phases::latency_rounds(
        &mut workers,
        &mut target,
        &mut times,
        o,
        &rounds,
        &counts,
        Pace::Gap(Duration::from_secs_f64(o.round_gap)),
    );
    let mut probes = prober.finish();
    let mut joins = joiner.finish();
    let latency = latency?;
    let m1 = target::scrape(&target);
    let end = Status::total(&workers.status()?);
    workers.quit();
    let mut server_exit = None;
    let mut warnings = Vec::new();
    if let Some(mut s) = target.server.take() {
        warnings = s.log_matching(" WARN ");
        server_exit = Some(s.stop(Duration::from_secs(15)));
    }
    if let Some(mut r) = target.redis.take() {
        r.stop(Duration::from_secs(5));
    }

    let probe = Summary::of(&mut probes.ns);
    let joined = Summary::of(&mut joins.ns);
    let fan = target::fanout_between(&m0, &m1);
    let delivered = &latency.summary;
    let line = |s: &Summary, n: usize, failures: usize| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({n} samples, {failures} failed)",
            ms(s.p50),
            ms(s.p99),
            ms(s.max)
        )
    };
    let rows = [
        ("target", target.name.clone()),
        (
            "subscribers",
            format!(
                "{open} open on one environment ({} established, {} failed; at the end {} open, \
                 {} dropped)",
                connected.status.established, connected.status.failed, end.open, end.dropped
            ),
        ),
        (
            "rounds",
            format!(
                "{} updates, {} s apart ({}/{} deliveries)",
                latency.rounds, o.round_gap, latency.received, latency.expected
            ),
        ),
        (
            "liveness probe (every 5 ms, keep-alive)",
            line(&probe, probes.ns.len(), probes.failures.len()),
        ),
        (
            "new subscriber to its initial event (every 100 ms)",
            line(&joined, joins.ns.len(), joins.failures.len()),
        ),
        (
            "mean fan-out (server's /metrics)",
            match fan {
                Some((mean, n)) => format!("{:.2} ms over {n} fan-outs", mean * 1e3),
                None => "no /metrics".into(),
            },
        ),
        (
            "publish to delivery, all subscribers",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                ms(delivered.p50),
                ms(delivered.p99),
                ms(delivered.max)
            ),
        ),
        (
            "server exit",
            server_exit.clone().unwrap_or_else(|| "not ours".into()),
        ),
    ];
    print_table(&rows);
    for w in warnings.iter().take(10) {
        say(&format!("server warning: {w}"));
    }
    for f in probes.failures.iter().chain(&joins.failures).take(10) {
        say(&format!("failure: {f}"));
    }

    let mut j = Json::obj();
    j.set("scenario", "responsive")
        .set("target", target.name.as_str())
        .set("subscribers", open)
        .set("rounds", latency.rounds)
        .set("round_gap_s", o.round_gap)
        .set(
            "probe",
            summary_json(&probe, probes.ns.len(), &probes.failures),
        )
        .set(
            "join",
            summary_json(&joined, joins.ns.len(), &joins.failures),
        )
        .set(
            "fanout_mean_ms",
            fan.map_or(Json::from("n/a"), |(m, _)| Json::from(m * 1e3)),
        )
        .set("fanouts", fan.map_or(0, |(_, n)| n))
        .set(
            "delivery",
            summary_json(delivered, latency.received as usize, &[]),
        )
        .set("server_exit", server_exit.unwrap_or_default());
    write_file(&o.json, &j.pretty())?;
    say(&format!("result written to {}", o.json.display()));
    Ok(())
}
