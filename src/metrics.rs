//! Counters and gauges for `/metrics`, in Prometheus text format 0.0.4.
//!
//! They are plain integers owned by the event loop: no locks. The store's command counters
//! arrive with the helper thread's replies; the dropped log lines are an atomic counter kept by
//! [`crate::logging`], read when the metrics are rendered. The build-info series and the
//! standard `process_*` series (CPU, resident memory, descriptors, start time) are read from the
//! kernel only when `/metrics` is scraped: a few small `/proc` reads and two system calls.

use crate::store::CommandStats;
use std::fmt::Write;

/// Outcomes of queue-change requests, the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueResult {
    /// 200: stored.
    Ok,
    /// 401: missing or wrong token.
    Unauthorized,
    /// 400: malformed body.
    BadRequest,
    /// 413: body too large.
    TooLarge,
    /// 503: the store is unavailable.
    Unavailable,
}

impl QueueResult {
    const ALL: [QueueResult; 5] = [
        QueueResult::Ok,
        QueueResult::Unauthorized,
        QueueResult::BadRequest,
        QueueResult::TooLarge,
        QueueResult::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            QueueResult::Ok => "ok",
            QueueResult::Unauthorized => "unauthorized",
            QueueResult::BadRequest => "bad_request",
            QueueResult::TooLarge => "too_large",
            QueueResult::Unavailable => "unavailable",
        }
    }
}

/// Why a connection or subscription was refused, the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// MAX_CONNECTIONS reached.
    MaxConnections,
    /// The process ran out of file descriptors.
    NoDescriptors,
    /// A subscription while the store has not answered for three intervals.
    StoreUnavailable,
    /// A reader that stopped reading.
    Stalled,
    /// A request not complete in time.
    Timeout,
    /// A request that could not be parsed or was too large.
    BadRequest,
    /// A subscriber that sent more than it may after its request.
    StreamInput,
    /// A request refused because buffering it would pass `MAX_BUFFERED_REQUEST_BYTES`.
    RequestBudget,
}

impl Rejection {
    const ALL: [Rejection; 8] = [
        Rejection::MaxConnections,
        Rejection::NoDescriptors,
        Rejection::StoreUnavailable,
        Rejection::Stalled,
        Rejection::Timeout,
        Rejection::BadRequest,
        Rejection::StreamInput,
        Rejection::RequestBudget,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejection::MaxConnections => "max_connections",
            Rejection::NoDescriptors => "no_descriptors",
            Rejection::StoreUnavailable => "store_unavailable",
            Rejection::Stalled => "stalled",
            Rejection::Timeout => "timeout",
            Rejection::BadRequest => "bad_request",
            Rejection::StreamInput => "stream_input",
            Rejection::RequestBudget => "request_budget",
        }
    }
}

/// What started a fetch from the store, the `trigger` label of `flagsmith_sse_fetches_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchTrigger {
    /// The periodic fetch (`CACHE_UPDATE_INTERVAL_SECONDS`), the first one included.
    Interval,
    /// Another instance's wake-up, or the wake-up listener reconnecting.
    Wakeup,
    /// Not a trigger: a fetch (started by either) that loaded a full snapshot instead of the
    /// changes since the previous fetch; counted when it returns.
    Snapshot,
}

impl FetchTrigger {
    const ALL: [FetchTrigger; 3] = [
        FetchTrigger::Interval,
        FetchTrigger::Wakeup,
        FetchTrigger::Snapshot,
    ];

    fn label(self) -> &'static str {
        match self {
            FetchTrigger::Interval => "interval",
            FetchTrigger::Wakeup => "wakeup",
            FetchTrigger::Snapshot => "snapshot",
        }
    }
}

/// Upper bounds of the fan-out histogram, in seconds.
const FANOUT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Streams opened since start.
    pub subscribers_total: u64,
    /// Update events written since start.
    pub events_sent_total: u64,
    /// Keep-alive comments written since start.
    pub pings_sent_total: u64,
    queue_changes: [u64; QueueResult::ALL.len()],
    rejected: [u64; Rejection::ALL.len()],
    fetches: [u64; FetchTrigger::ALL.len()],
    fanout_counts: [u64; FANOUT_BUCKETS.len()],
    fanout_count: u64,
    fanout_sum: f64,
    /// Store command counters, as last reported by the helper.
    pub store_commands: Vec<(&'static str, CommandStats)>,
}

/// Values that are read off the server when `/metrics` is asked for.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Open streams.
    pub subscribers_active: usize,
    /// Open client connections of any kind.
    pub connections_open: usize,
    /// Environments whose update time is known.
    pub environments_cached: usize,
    /// Seconds since the last successful fetch (or since start).
    pub last_fetch_age_seconds: f64,
    /// Whether the last fetch succeeded.
    pub store_ready: bool,
}

impl Metrics {
    /// Counts a queue-change outcome.
    pub fn queue_change(&mut self, r: QueueResult) {
        self.queue_changes[r as usize] += 1;
    }

    /// Counts a refused connection or subscription.
    pub fn reject(&mut self, r: Rejection) {
        self.rejected[r as usize] += 1;
    }

    /// Counts a fetch by what started it, or one that loaded a snapshot.
    pub fn fetch(&mut self, t: FetchTrigger) {
        self.fetches[t as usize] += 1;
    }

    /// Records one fan-out's duration.
    pub fn fanout(&mut self, seconds: f64) {
        self.fanout_count += 1;
        self.fanout_sum += seconds;
        for (i, le) in FANOUT_BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.fanout_counts[i] += 1;
            }
        }
    }

    /// The exposition text.
    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::with_capacity(4096);
        single(
            &mut s,
            "flagsmith_sse_subscribers_active",
            "gauge",
            "Open event streams.",
            g.subscribers_active.to_string(),
        );
        single(
            &mut s,
            "flagsmith_sse_connections_open",
            "gauge",
            "Open client connections.",
            g.connections_open.to_string(),
        );
        single(
            &mut s,
            "flagsmith_sse_subscribers_total",
            "counter",
            "Event streams opened since start.",
            self.subscribers_total.to_string(),
        );
        single(
            &mut s,
            "flagsmith_sse_events_sent_total",
            "counter",
            "Update events written to subscribers.",
            self.events_sent_total.to_string(),
        );
        single(
            &mut s,
            "flagsmith_sse_pings_sent_total",
            "counter",
            "Keep-alive comments written to subscribers.",
            self.pings_sent_total.to_string(),
        );
        single(
            &mut s,
            "flagsmith_sse_log_lines_dropped_total",
            "counter",
            "Log lines lost because stderr did not keep up or could not be written.",
            crate::logging::lines_dropped().to_string(),
        );
        single(
            &mut s,
            "flagsmith_sse_environments_cached",
            "gauge",
            "Environments whose update time is known.",
            g.environments_cached.to_string(),
        );
        single(
            &mut s,
            "flagsmith_sse_last_fetch_age_seconds",
            "gauge",
            "Seconds since the last successful fetch from the store.",
            format!("{:.3}", g.last_fetch_age_seconds),
        );
        single(
            &mut s,
            "flagsmith_sse_store_ready",
            "gauge",
            "1 if the store answered its last fetch.",
            u8::from(g.store_ready).to_string(),
        );
        counters(
            &mut s,
            "flagsmith_sse_queue_changes_total",
            "Queue-change requests by result.",
            "result",
            QueueResult::ALL.map(|r| (r.label(), self.queue_changes[r as usize])),
        );
        counters(
            &mut s,
            "flagsmith_sse_connections_rejected_total",
            "Connections and subscriptions refused, by reason.",
            "reason",
            Rejection::ALL.map(|r| (r.label(), self.rejected[r as usize])),
        );
        counters(
            &mut s,
            "flagsmith_sse_fetches_total",
            "Fetches from the store started by the interval or by a wake-up; snapshot: those (of either) that loaded a full snapshot.",
            "trigger",
            FetchTrigger::ALL.map(|t| (t.label(), self.fetches[t as usize])),
        );
        let by_command = |f: fn(&CommandStats) -> u64| {
            self.store_commands
                .iter()
                .map(move |(cmd, st)| (format!("{{command=\"{cmd}\"}}"), f(st).to_string()))
        };
        family(
            &mut s,
            "flagsmith_sse_redis_commands_total",
            "counter",
            "Store commands sent, by command.",
            by_command(|st| st.sent),
        );
        family(
            &mut s,
            "flagsmith_sse_redis_errors_total",
            "counter",
            "Store commands failed, by command.",
            by_command(|st| st.failed),
        );
        let name = "flagsmith_sse_fanout_duration_seconds";
        let _ = write!(
            s,
            "# HELP {name} Time to write one update to every subscriber of its environment, from its release (after any coalescing window) to the last socket write.\n# TYPE {name} histogram\n"
        );
        for (le, n) in FANOUT_BUCKETS.iter().zip(self.fanout_counts) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", self.fanout_count);
        let _ = writeln!(s, "{name}_sum {}", self.fanout_sum);
        let _ = writeln!(s, "{name}_count {}", self.fanout_count);
        family(
            &mut s,
            "flagsmith_sse_build_info",
            "gauge",
            "Always 1; the version label says which build is running.",
            [(
                format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
                "1".to_owned(),
            )],
        );
        process(&mut s);
        s
    }
}

/// Writes the standard process series, each only when the kernel tells its value.
fn process(s: &mut String) {
    if let Some(cpu) = cpu_seconds() {
        single(
            s,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            format!("{cpu:.6}"),
        );
    }
    if let Some(rss) = resident_bytes() {
        single(
            s,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss.to_string(),
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        single(
            s,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count().to_string(),
        );
    }
    if let Some(max) = max_fds() {
        single(
            s,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max.to_string(),
        );
    }
    if let Some(start) = start_time_seconds() {
        single(
            s,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            format!("{start:.2}"),
        );
    }
}

/// User plus system CPU time of the process, from `getrusage`.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(ru.ru_utime) + secs(ru.ru_stime))
}

/// Resident set size: the second field of `/proc/self/statm`, in pages.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0)?)
}

/// The soft open-file limit.
fn max_fds() -> Option<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    Some(lim.rlim_cur)
}

/// Start time as Unix seconds: the boot time from `/proc/stat` plus the process's start, in
/// clock ticks after boot, from field 22 of `/proc/self/stat`.
fn start_time_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let after = stat.rsplit_once(')')?.1;
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(btime as f64 + ticks as f64 / hz as f64)
}

/// Writes a metric family of one sample without labels.
fn single(s: &mut String, name: &str, kind: &str, help: &str, value: String) {
    family(s, name, kind, help, [(String::new(), value)]);
}

/// Writes a counter family with one label, `label`: one sample per (label value, count).
fn counters(
    s: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'static str, u64)>,
) {
    let samples = samples
        .into_iter()
        .map(|(v, n)| (format!("{{{label}=\"{v}\"}}"), n.to_string()));
    family(s, name, "counter", help, samples);
}

/// Writes one metric family: its HELP and TYPE lines, then one sample per (labels, value).
fn family(
    s: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, String)>,
) {
    let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    for (labels, value) in samples {
        let _ = writeln!(s, "{name}{labels} {value}");
    }
}
