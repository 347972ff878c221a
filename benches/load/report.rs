//! The result of a run: a Markdown table for people and one JSON document for tools.

use crate::floor::Floor;
use crate::json::Json;
use crate::opts::{Mode, Opts, StoreKind};
use crate::phases::{Connected, Latency, ms};
use crate::pool::Status;
use crate::qc::QcResult;
use std::collections::HashMap;

/// Memory and CPU of one of two instances.
#[derive(Debug, Clone, Default)]
pub struct InstanceUse {
    pub rss_before_kib: Option<u64>,
    pub rss_with_kib: Option<u64>,
    pub rss_after_idle_kib: Option<u64>,
    /// CPU over the idle period, as a fraction of one core.
    pub idle_cpu: Option<f64>,
    pub exit: Option<String>,
}

/// What a `--second-instance` run measured: instance A takes the publishes, instance B holds
/// every subscriber and learns of changes by its periodic fetch from Redis.
pub struct Second {
    /// `CACHE_UPDATE_INTERVAL_SECONDS` of both instances.
    pub interval_s: f64,
    /// Spacing of round starts.
    pub gap_s: f64,
    pub one_env: Latency,
    pub all_envs: Latency,
    /// The same rounds published to B itself, in the same run: the local path.
    pub local_one_env: Latency,
    pub local_all_envs: Latency,
    pub a: InstanceUse,
    pub b: InstanceUse,
}

impl Second {
    /// The p99 target for rounds via A: the local path's p99 in the same run plus 30 ms, or,
    /// without local rounds, one fetch interval plus 100 ms.
    pub fn target_ms(&self, local: &Latency) -> f64 {
        if local.received > 0 {
            ms(local.summary.p99) + 30.0
        } else {
            self.interval_s * 1000.0 + 100.0
        }
    }
}

/// Where each round's first publish fell in a cycle of `period_s` seconds, as a fraction of
/// the cycle, counted from the first round's.
pub fn phases(l: &Latency, period_s: f64) -> Vec<f64> {
    let Some(&first) = l.round_starts_ns.first() else {
        return Vec::new();
    };
    let period = (period_s * 1e9).max(1.0);
    l.round_starts_ns
        .iter()
        .map(|&t| (t.saturating_sub(first) as f64 % period) / period)
        .collect()
}

/// How many of the ten tenths of the cycle hold at least one round's start.
pub fn tenths_covered(phases: &[f64]) -> usize {
    let mut hit = [false; 10];
    for p in phases {
        hit[((p * 10.0) as usize).min(9)] = true;
    }
    hit.iter().filter(|&&h| h).count()
}

/// Everything a run measured.
pub struct Results {
    pub machine: Json,
    pub target: String,
    pub floor: Option<Floor>,
    pub connected: Connected,
    /// Streams open after connecting.
    pub open: u64,
    pub rss_before_kib: Option<u64>,
    pub rss_with_kib: Option<u64>,
    pub rss_after_idle_kib: Option<u64>,
    pub slab_before: Option<u64>,
    pub slab_with: Option<u64>,
    pub idle_seconds: f64,
    /// Server CPU over the idle period, as a fraction of one core.
    pub idle_cpu: Option<f64>,
    pub single: Latency,
    pub many: Latency,
    /// Mean fan-out (s) and count, from the server's /metrics.
    pub fan_single: Option<(f64, u64)>,
    pub fan_many: Option<(f64, u64)>,
    /// With `--second-instance`: latency via the second instance and per-instance use.
    pub second: Option<Second>,
    pub qc: Option<(QcResult, String)>,
    /// Worker totals at the end.
    pub end: Status,
    pub server_log: Vec<String>,
    pub server_exit: Option<String>,
    pub metrics_at_end: Option<HashMap<String, f64>>,
    /// Rows and JSON fields measured outside the fields above (instances, Redis, kernel).
    pub extra_rows: Vec<(String, String)>,
    pub extra_json: Vec<(String, Json)>,
}

impl Results {
    /// Open streams per environment.
    pub fn per_env(&self, o: &Opts) -> f64 {
        self.open as f64 / o.envs.max(1) as f64
    }

    /// Subscribers of one environment that one instance's fan-out serves: over several
    /// instances, each one's /metrics count its share.
    pub fn fan_per_instance(&self, o: &Opts) -> f64 {
        self.per_env(o) / o.instances.max(1) as f64
    }

    /// Growth of the server's RSS per open stream, in bytes.
    pub fn rss_per_subscriber(&self) -> Option<f64> {
        match (self.rss_before_kib, self.rss_with_kib) {
            (Some(a), Some(b)) if self.open > 0 => {
                Some((b as f64 - a as f64) * 1024.0 / self.open as f64)
            }
            _ => None,
        }
    }

    /// Growth of the machine's kernel slab memory per connection (both ends), in bytes.
    pub fn slab_per_connection(&self) -> Option<f64> {
        match (self.slab_before, self.slab_with) {
            (Some(a), Some(b)) if self.open > 0 => Some((b as f64 - a as f64) / self.open as f64),
            _ => None,
        }
    }
}

/// Rows of the Markdown table: measure, value.
pub fn table(o: &Opts, r: &Results) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let n = o.subscribers;
    let (rss0, rss1) = (r.rss_before_kib, r.rss_with_kib);
    let (open, idle_cpu, idle_wall) = (r.open, r.idle_cpu, r.idle_seconds);
    let (single, many) = (&r.single, &r.many);
    let (fan_single, fan_many) = (r.fan_single, r.fan_many);
    let (floor, connected, qc, end_status) = (r.floor, &r.connected, &r.qc, &r.end);
    let per_env = r.per_env(o);
    let fan_per = r.fan_per_instance(o);
    let per_sub_rss = r.rss_per_subscriber();
    let st = &connected.status;
    let mut add = |k: &str, v: String| rows.push((k.to_owned(), v));
    add("target", r.target.clone());
    add(
        "subscribers connected / failed",
        format!(
            "{} / {} of {n} ({} envs, {} workers); failures: {}",
            st.open,
            st.failed,
            o.envs,
            o.workers,
            st.reasons_text()
        ),
    );
    add(
        "connect rate (accepted streams per second)",
        format!(
            "{:.0}/s ({} streams in {:.2} s; asked for {})",
            connected.rate,
            st.established,
            connected.seconds,
            if o.rate > 0.0 {
                format!("{}/s", o.rate)
            } else {
                "unpaced".into()
            }
        ),
    );
    if let (Some(a), Some(b)) = (rss0, rss1) {
        add(
            "server RSS: before → with subscribers",
            format!(
                "{:.1} MiB → {:.1} MiB ({:.0} bytes per idle subscriber)",
                a as f64 / 1024.0,
                b as f64 / 1024.0,
                per_sub_rss.unwrap_or(0.0)
            ),
        );
    }
    if let Some(c) = idle_cpu {
        add(
            &format!(
                "server CPU, idle {:.0} s with {open} subscribers",
                idle_wall
            ),
            format!("{:.2} % of one core", c * 100.0),
        );
    }
    let lat_row = |l: &Latency| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({}/{} deliveries, {} rounds; publish answered in {:.2} ms median)",
            ms(l.summary.p50),
            ms(l.summary.p99),
            ms(l.summary.max),
            l.received,
            l.expected,
            l.rounds,
            ms(l.answered.p50)
        )
    };
    if single.rounds > 0 {
        add(
            &format!("publish → delivery, one environment (~{per_env:.0} subscribers)"),
            lat_row(single),
        );
    }
    if many.rounds > 0 {
        add(
            &format!("publish → delivery, all {} environments at once", o.envs),
            lat_row(many),
        );
    }
    if let Some(sec) = &r.second {
        let via = |l: &Latency, local: &Latency| {
            let target = sec.target_ms(local);
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {}/{} deliveries in {} rounds; \
                 target p99 ≤ {target:.0} ms: {}",
                ms(l.summary.p50),
                ms(l.summary.p99),
                ms(l.summary.max),
                l.received,
                l.expected,
                l.rounds,
                if l.received > 0 && ms(l.summary.p99) <= target && l.received == l.expected {
                    "met"
                } else {
                    "not met"
                }
            )
        };
        if sec.one_env.rounds > 0 {
            add(
                &format!(
                    "publish to A → delivery by B, one environment (~{per_env:.0} subscribers)"
                ),
                via(&sec.one_env, &sec.local_one_env),
            );
        }
        if sec.local_one_env.rounds > 0 {
            add(
                &format!(
                    "publish to B → delivery by B (local path, same run), one environment (~{per_env:.0} subscribers)"
                ),
                lat_row(&sec.local_one_env),
            );
        }
        if sec.all_envs.rounds > 0 {
            add(
                &format!(
                    "publish to A → delivery by B, all {} environments at once",
                    o.envs
                ),
                via(&sec.all_envs, &sec.local_all_envs),
            );
        }
        if sec.local_all_envs.rounds > 0 {
            add(
                &format!(
                    "publish to B → delivery by B (local path, same run), all {} environments at once",
                    o.envs
                ),
                lat_row(&sec.local_all_envs),
            );
        }
        let cover = |l: &Latency| tenths_covered(&phases(l, sec.interval_s));
        add(
            "CACHE_UPDATE_INTERVAL_SECONDS; round spacing; publish phases in B's fetch cycle",
            format!(
                "{} s; {} s; tenths of the cycle with a round start: {}/10 (one env){}",
                sec.interval_s,
                sec.gap_s,
                cover(&sec.one_env),
                if sec.all_envs.rounds > 0 {
                    format!(", {}/10 (all envs)", cover(&sec.all_envs))
                } else {
                    String::new()
                }
            ),
        );
        let use_row = |u: &InstanceUse| {
            format!(
                "RSS {} → {} MiB with subscribers, {} MiB after idle; idle CPU {}",
                u.rss_before_kib
                    .map_or("?".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
                u.rss_with_kib
                    .map_or("?".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
                u.rss_after_idle_kib
                    .map_or("?".into(), |v| format!("{:.1}", v as f64 / 1024.0)),
                u.idle_cpu
                    .map_or("?".into(), |c| format!("{:.2} % of one core", c * 100.0))
            )
        };
        add("instance B (every subscriber)", use_row(&sec.b));
        add("instance A (publishes only)", use_row(&sec.a));
    }
    if let Some((mean, count)) = fan_single {
        add(
            if o.instances > 1 {
                "server fan-out, one environment (one instance's /metrics, its share of the subscribers)"
            } else {
                "server fan-out, one environment (its /metrics)"
            },
            format!(
                "mean {:.0} µs over {count} fan-outs = {:.0} ns per subscriber",
                mean * 1e6,
                mean * 1e9 / fan_per.max(1.0)
            ),
        );
    }
    if let Some((mean, count)) = fan_many {
        add(
            "server fan-out, all environments (its /metrics)",
            format!(
                "mean {:.0} µs over {count} fan-outs = {:.0} ns per subscriber",
                mean * 1e6,
                mean * 1e9 / fan_per.max(1.0)
            ),
        );
    }
    if let Some(f) = &floor {
        add(
            "machine floor: one write per socket, one thread, nobody waiting to read",
            format!(
                "{:.0} ns per write (best pass {:.0} ns; {} pairs, {}-byte frame) = {:.2} ms for {n}",
                f.per_write_ns,
                f.best_per_write_ns,
                f.pairs,
                f.frame_len,
                f.per_write_ns * n as f64 / 1e6
            ),
        );
        add(
            "machine floor, receivers watched by an epoll reader thread",
            format!(
                "{:.0} ns per write (best pass {:.0} ns) = {:.2} ms for {n}",
                f.epoll_per_write_ns,
                f.epoll_best_per_write_ns,
                f.epoll_per_write_ns * n as f64 / 1e6
            ),
        );
        if let Some((mean, _)) = fan_single {
            let per_sub = mean * 1e9 / fan_per.max(1.0);
            add(
                "server fan-out per subscriber / floor per write (bare, with reader)",
                format!(
                    "{:.2}×, {:.2}×",
                    per_sub / f.per_write_ns.max(1e-9),
                    per_sub / f.epoll_per_write_ns.max(1e-9)
                ),
            );
        }
    }
    if let Some((q, what)) = &qc {
        add(
            &format!("publish throughput, {} keep-alive connections", q.conns),
            format!(
                "{:.0} requests/s ({} ok, {} failed; latency p50 {:.2} ms, p99 {:.2} ms) — {what}",
                q.rps(),
                q.ok,
                q.failed,
                ms(q.latency.p50),
                ms(q.latency.p99)
            ),
        );
    }
    for (k, v) in &r.extra_rows {
        add(k, v.clone());
    }
    add(
        "streams dropped during the run",
        format!(
            "{} (reconnected {}); {} events received",
            end_status.dropped, end_status.reconnected, end_status.events
        ),
    );
    if !r.server_log.is_empty() {
        add(
            "server warnings/errors in its log",
            format!("{} lines (first: {})", r.server_log.len(), r.server_log[0]),
        );
    }

    rows
}

/// The JSON document.
pub fn json(o: &Opts, r: &Results) -> Json {
    let mut out = Json::obj();
    out.set("harness", "flagsmith-sse load harness")
        .set("machine", r.machine.clone());
    let n = o.subscribers;
    let (open, idle_cpu, idle_wall) = (r.open, r.idle_cpu, r.idle_seconds);
    let (single, many) = (&r.single, &r.many);
    let (fan_single, fan_many) = (r.fan_single, r.fan_many);
    let (floor, connected, qc, end_status) = (r.floor, &r.connected, &r.qc, &r.end);
    let per_env = r.per_env(o);
    let fan_per = r.fan_per_instance(o);
    let st = &connected.status;
    let mut opts_j = Json::obj();
    opts_j
        .set("subscribers", n)
        .set("envs", o.envs)
        .set("workers", o.workers)
        .set("rate", o.rate)
        .set("idle_seconds", o.idle_seconds)
        .set(
            "mode",
            match o.mode {
                Mode::Ours => "ours",
                Mode::Nchan => "nchan",
                Mode::Foreign => "foreign",
            },
        )
        .set(
            "store",
            match o.store {
                StoreKind::Embedded => "embedded",
                StoreKind::Redis => "redis",
            },
        )
        .set("rounds", o.rounds)
        .set("many_rounds", o.many_rounds)
        .set("round_gap_seconds", o.round_gap)
        .set("second_instance", o.second_instance)
        .set("quick", o.quick)
        .set(
            "server_env",
            Json::Arr(
                o.server_env
                    .iter()
                    .map(|(k, v)| Json::from(format!("{k}={v}")))
                    .collect(),
            ),
        );
    out.set("options", opts_j).set("target", r.target.clone());
    let mut c = Json::obj();
    c.set("connected", st.open)
        .set("established", st.established)
        .set("failed", st.failed)
        .set(
            "failure_reasons",
            Json::Obj(
                st.reasons
                    .iter()
                    .map(|(k, v)| (k.clone(), Json::from(*v)))
                    .collect(),
            ),
        )
        .set("seconds", connected.seconds)
        .set("accept_rate_per_s", connected.rate);
    out.set("connect", c);
    let mut mem = Json::obj();
    mem.set("rss_before_kib", r.rss_before_kib)
        .set("rss_with_subscribers_kib", r.rss_with_kib)
        .set("rss_after_idle_kib", r.rss_after_idle_kib)
        .set("rss_per_idle_subscriber_bytes", r.rss_per_subscriber())
        .set(
            "kernel_slab_bytes_per_connection_both_ends",
            r.slab_per_connection(),
        );
    out.set("memory", mem);
    let mut idle = Json::obj();
    idle.set("seconds", idle_wall)
        .set("subscribers", open)
        .set("cpu_fraction_of_one_core", idle_cpu);
    out.set("idle", idle);
    let lat_json = |l: &Latency| {
        let mut j = Json::obj();
        j.set("rounds", l.rounds)
            .set("publishes", l.publishes)
            .set("expected", l.expected)
            .set("received", l.received)
            .set("p50_ms", ms(l.summary.p50))
            .set("p99_ms", ms(l.summary.p99))
            .set("max_ms", ms(l.summary.max))
            .set("mean_ms", l.summary.mean / 1e6)
            .set(
                "round_p99_ms",
                Json::Arr(l.round_p99_ns.iter().map(|&v| Json::from(ms(v))).collect()),
            )
            .set("publish_spread_ms", ms(l.publish_spread_ns))
            .set("publish_answered_p50_ms", ms(l.answered.p50))
            .set("publish_answered_max_ms", ms(l.answered.max));
        j
    };
    let mut lat = Json::obj();
    lat.set("one_env", lat_json(single))
        .set("all_envs", lat_json(many))
        .set("subscribers_per_env", per_env);
    out.set("latency", lat);
    let fan_json = |f: Option<(f64, u64)>| {
        f.map_or(Json::Null, |(mean, count)| {
            let mut j = Json::obj();
            j.set("fanouts", count)
                .set("mean_us", mean * 1e6)
                .set("per_subscriber_ns", mean * 1e9 / fan_per.max(1.0));
            j
        })
    };
    let mut fan = Json::obj();
    fan.set("one_env", fan_json(fan_single))
        .set("all_envs", fan_json(fan_many));
    out.set("fanout", fan);
    let use_json = |u: &InstanceUse| {
        let mut j = Json::obj();
        j.set("rss_before_kib", u.rss_before_kib)
            .set("rss_with_subscribers_kib", u.rss_with_kib)
            .set("rss_after_idle_kib", u.rss_after_idle_kib)
            .set("idle_cpu_fraction_of_one_core", u.idle_cpu)
            .set("exit", u.exit.clone());
        j
    };
    out.set(
        "second_instance",
        r.second.as_ref().map_or(Json::Null, |sec| {
            let via = |l: &Latency, local: &Latency| {
                let target = sec.target_ms(local);
                let ph = phases(l, sec.interval_s);
                let mut j = lat_json(l);
                j.set("p99_target_ms", target)
                    .set(
                        "p99_target_met",
                        l.received > 0 && l.received == l.expected && ms(l.summary.p99) <= target,
                    )
                    .set("fetch_cycle_tenths_covered", tenths_covered(&ph))
                    .set(
                        "round_start_phases",
                        Json::Arr(ph.into_iter().map(Json::from).collect()),
                    );
                j
            };
            let mut j = Json::obj();
            j.set("cache_update_interval_seconds", sec.interval_s)
                .set("round_gap_seconds", sec.gap_s)
                .set("one_env", via(&sec.one_env, &sec.local_one_env))
                .set("all_envs", via(&sec.all_envs, &sec.local_all_envs))
                .set("local_one_env", lat_json(&sec.local_one_env))
                .set("local_all_envs", lat_json(&sec.local_all_envs))
                .set("instance_a_publishes", use_json(&sec.a))
                .set("instance_b_subscribers", use_json(&sec.b));
            j
        }),
    );
    out.set(
        "floor",
        floor.map_or(Json::Null, |f| {
            let mut j = Json::obj();
            j.set("pairs", f.pairs)
                .set("frame_bytes", f.frame_len)
                .set("per_write_ns", f.per_write_ns)
                .set("best_per_write_ns", f.best_per_write_ns)
                .set("scaled_to_n_ms", f.per_write_ns * n as f64 / 1e6)
                .set("epoll_reader_per_write_ns", f.epoll_per_write_ns)
                .set("epoll_reader_best_per_write_ns", f.epoll_best_per_write_ns)
                .set(
                    "epoll_reader_scaled_to_n_ms",
                    f.epoll_per_write_ns * n as f64 / 1e6,
                );
            j
        }),
    );
    out.set(
        "publish_throughput",
        qc.as_ref().map_or(Json::Null, |(q, what)| {
            let mut j = Json::obj();
            j.set("what", what.clone())
                .set("connections", q.conns)
                .set("seconds", q.seconds)
                .set("ok", q.ok)
                .set("failed", q.failed)
                .set("reconnects", q.reconnects)
                .set("requests_per_s", q.rps())
                .set("p50_ms", ms(q.latency.p50))
                .set("p99_ms", ms(q.latency.p99))
                .set("max_ms", ms(q.latency.max))
                .set(
                    "statuses",
                    Json::Obj(
                        q.statuses
                            .iter()
                            .map(|(k, v)| (k.to_string(), Json::from(*v)))
                            .collect(),
                    ),
                );
            j
        }),
    );
    let mut run_j = Json::obj();
    run_j
        .set("dropped", end_status.dropped)
        .set("reconnected", end_status.reconnected)
        .set("events_received", end_status.events)
        .set("records_lost", end_status.lost)
        .set("server_exit", r.server_exit.clone())
        .set(
            "server_log_warnings",
            Json::Arr(
                r.server_log
                    .iter()
                    .take(50)
                    .map(|l| Json::from(l.clone()))
                    .collect(),
            ),
        );
    out.set("run", run_j);
    for (k, v) in &r.extra_json {
        out.set(k, v.clone());
    }
    out.set(
        "server_metrics_at_end",
        r.metrics_at_end.as_ref().map_or(Json::Null, |m| {
            let mut v: Vec<(String, f64)> = m.iter().map(|(k, x)| (k.clone(), *x)).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Obj(v.into_iter().map(|(k, x)| (k, Json::from(x))).collect())
        }),
    );
    out
}
