//! The measuring phases that need the workers: connecting, and latency rounds.

use crate::clock::TimeSource;
use crate::opts::Opts;
use crate::pool::{Status, Workers};
use crate::say;
use crate::stats::Summary;
use crate::target::{Publisher, Target};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Longest wait for all subscribers of a round to get its event.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between collections of arrivals while a round is open.
const COLLECT_EVERY: Duration = Duration::from_millis(100);

pub struct Connected {
    pub status: Status,
    pub seconds: f64,
    pub rate: f64,
}

pub fn connect_phase(w: &mut Workers, o: &Opts) -> Result<Connected, String> {
    let n = o.subscribers as f64;
    let budget = if o.rate > 0.0 {
        n / o.rate * 2.0 + 30.0
    } else {
        n / 1000.0 + 60.0
    };
    let deadline = Instant::now() + Duration::from_secs_f64(budget.min(900.0));
    let mut last_print = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let all = w.status()?;
        let t = Status::total(&all);
        let done = all.iter().all(|s| s.pending == 0 && s.inflight == 0);
        if done || Instant::now() > deadline || last_print.elapsed() > Duration::from_secs(2) {
            say(&format!(
                "connecting: {} open, {} failed, {} in flight, {} waiting",
                t.open, t.failed, t.inflight, t.pending
            ));
            last_print = Instant::now();
        }
        if done || Instant::now() > deadline {
            let seconds = t.last.saturating_sub(t.first) as f64 / 1e9;
            return Ok(Connected {
                rate: if seconds > 0.0 {
                    t.established as f64 / seconds
                } else {
                    0.0
                },
                seconds,
                status: t,
            });
        }
    }
}

/// How latency rounds are spaced in time.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Each round starts `gap` after the previous one started, or at once if it took longer.
    Gap(Duration),
    /// Round r starts `r × gap` after the first. A round that cannot start on time is moved by
    /// whole periods, so that its start keeps its phase within a cycle of that period (a
    /// second instance's fetch cycle).
    Phased { gap: Duration, period: Duration },
}

#[derive(Default)]
pub struct Latency {
    pub rounds: usize,
    pub publishes: usize,
    pub expected: u64,
    pub received: u64,
    pub summary: Summary,
    pub round_p99_ns: Vec<u64>,
    /// Longest time from a round's first publish to its last.
    pub publish_spread_ns: u64,
    /// Time from sending a publish to its answer.
    pub answered: Summary,
    /// Each round's first publish time, on `CLOCK_MONOTONIC`.
    pub round_starts_ns: Vec<u64>,
    /// Every delivery: round, environment, subscriber, latency (ns).
    pub samples: Vec<(u32, u32, u32, u64)>,
}

/// Runs latency rounds: each publishes one new time to every environment in its list, then
/// collects arrivals until every open subscriber of those environments has it (or a timeout).
pub fn latency_rounds(
    w: &mut Workers,
    t: &mut Target,
    times: &mut TimeSource,
    o: &Opts,
    rounds: &[Vec<usize>],
    counts: &[u64],
    pace: Pace,
) -> Result<Latency, String> {
    latency_rounds_with(w, &mut t.publisher, times, o, rounds, counts, pace)
}

/// `latency_rounds` with the changes published by `publisher`.
pub fn latency_rounds_with(
    w: &mut Workers,
    publisher: &mut Publisher,
    times: &mut TimeSource,
    o: &Opts,
    rounds: &[Vec<usize>],
    counts: &[u64],
    pace: Pace,
) -> Result<Latency, String> {
    let mut res = Latency::default();
    let mut all = Vec::new();
    let mut answered = Vec::new();
    let t0 = Instant::now();
    let mut shift = Duration::ZERO;
    for (r, envs) in rounds.iter().enumerate() {
        if let Pace::Phased { gap, period } = pace {
            let mut at = t0 + gap * r as u32 + shift;
            let now = Instant::now();
            if now > at && !period.is_zero() {
                let late = (now - at).as_secs_f64();
                let k = (late / period.as_secs_f64()).ceil().max(1.0);
                shift += period.mul_f64(k);
                at += period.mul_f64(k);
            }
            if let Some(rest) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(rest);
            }
        }
        let started = Instant::now();
        let mut pubs: HashMap<u32, (i64, u64)> = HashMap::new();
        let mut first = u64::MAX;
        let mut last = 0;
        for &e in envs {
            let time = times.next();
            let (at, done) = publisher.publish(&o.env_key(e), time)?;
            answered.push(done.saturating_sub(at));
            first = first.min(at);
            last = last.max(at);
            pubs.insert(e as u32, (time, at));
        }
        res.publish_spread_ns = res.publish_spread_ns.max(last.saturating_sub(first));
        res.round_starts_ns.push(first);
        res.publishes += envs.len();
        let expected: u64 = envs
            .iter()
            .map(|&e| counts.get(e).copied().unwrap_or(0))
            .sum();
        let mut seen: HashSet<u32> = HashSet::new();
        let mut samples = Vec::with_capacity(expected as usize);
        let deadline = Instant::now() + ROUND_TIMEOUT;
        loop {
            std::thread::sleep(COLLECT_EVERY);
            for rec in w.flush()? {
                let Some(&(time, at)) = pubs.get(&rec.env) else {
                    continue;
                };
                if (rec.time - time).abs() <= 2 && seen.insert(rec.id) {
                    let lat = rec.at.saturating_sub(at);
                    samples.push(lat);
                    res.samples.push((r as u32, rec.env, rec.id, lat));
                }
            }
            if seen.len() as u64 >= expected || Instant::now() > deadline {
                break;
            }
        }
        res.expected += expected;
        res.received += samples.len() as u64;
        let s = Summary::of(&mut samples);
        res.round_p99_ns.push(s.p99);
        say(&format!(
            "round {}/{}: {} environment(s), {}/{} delivered, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            r + 1,
            rounds.len(),
            envs.len(),
            samples.len(),
            expected,
            ms(s.p50),
            ms(s.p99),
            ms(s.max)
        ));
        all.extend_from_slice(&samples);
        res.rounds += 1;
        if let Pace::Gap(gap) = pace
            && let Some(rest) = gap.checked_sub(started.elapsed())
        {
            std::thread::sleep(rest);
        }
    }
    res.summary = Summary::of(&mut all);
    res.answered = Summary::of(&mut answered);
    Ok(res)
}

/// Waits `seconds` while the subscribers sit idle, saying every few seconds how much CPU the
/// processes in `pids` used so far (so that a long idle phase is not silent).
pub fn idle(seconds: f64, pids: &[u32], open: u64) {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let cpu0 = crate::instances::snap(pids);
    let mut last = start;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(250)));
        if last.elapsed() >= PROGRESS_EVERY && Instant::now() < end {
            last = Instant::now();
            let wall = start.elapsed().as_secs_f64();
            let now = crate::instances::snap(pids);
            let cpu = crate::instances::total(&cpu0.cpu_shares(&now, wall));
            say(&format!(
                "idle: {wall:.0}/{seconds:.0} s, {open} subscribers, server CPU so far {}, RSS {}",
                cpu.map_or("?".into(), |c| format!("{:.2} % of one core", c * 100.0)),
                now.rss_total()
                    .map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
            ));
        }
    }
}

/// How often a long phase says how it is going.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}
