//! Counters and gauges for `/metrics`, in Prometheus text format 0.0.4.
//!
//! They are plain integers owned by the event loop: no atomics, no locks. The store's command
//! counters arrive with the helper thread's replies.

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
}

impl Rejection {
    const ALL: [Rejection; 6] = [
        Rejection::MaxConnections,
        Rejection::NoDescriptors,
        Rejection::StoreUnavailable,
        Rejection::Stalled,
        Rejection::Timeout,
        Rejection::BadRequest,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejection::MaxConnections => "max_connections",
            Rejection::NoDescriptors => "no_descriptors",
            Rejection::StoreUnavailable => "store_unavailable",
            Rejection::Stalled => "stalled",
            Rejection::Timeout => "timeout",
            Rejection::BadRequest => "bad_request",
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
    queue_changes: [u64; 5],
    rejected: [u64; 6],
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
        let gauge = |s: &mut String, name: &str, help: &str, kind: &str, value: String| {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        gauge(
            &mut s,
            "flagsmith_sse_subscribers_active",
            "Open event streams.",
            "gauge",
            g.subscribers_active.to_string(),
        );
        gauge(
            &mut s,
            "flagsmith_sse_connections_open",
            "Open client connections.",
            "gauge",
            g.connections_open.to_string(),
        );
        gauge(
            &mut s,
            "flagsmith_sse_subscribers_total",
            "Event streams opened since start.",
            "counter",
            self.subscribers_total.to_string(),
        );
        gauge(
            &mut s,
            "flagsmith_sse_events_sent_total",
            "Update events written to subscribers.",
            "counter",
            self.events_sent_total.to_string(),
        );
        gauge(
            &mut s,
            "flagsmith_sse_pings_sent_total",
            "Keep-alive comments written to subscribers.",
            "counter",
            self.pings_sent_total.to_string(),
        );
        gauge(
            &mut s,
            "flagsmith_sse_environments_cached",
            "Environments whose update time is known.",
            "gauge",
            g.environments_cached.to_string(),
        );
        gauge(
            &mut s,
            "flagsmith_sse_last_fetch_age_seconds",
            "Seconds since the last successful fetch from the store.",
            "gauge",
            format!("{:.3}", g.last_fetch_age_seconds),
        );
        gauge(
            &mut s,
            "flagsmith_sse_store_ready",
            "1 if the store answered its last fetch.",
            "gauge",
            u8::from(g.store_ready).to_string(),
        );
        let _ = write!(
            s,
            "# HELP flagsmith_sse_queue_changes_total Queue-change requests by result.\n# TYPE flagsmith_sse_queue_changes_total counter\n"
        );
        for r in QueueResult::ALL {
            let _ = writeln!(
                s,
                "flagsmith_sse_queue_changes_total{{result=\"{}\"}} {}",
                r.label(),
                self.queue_changes[r as usize]
            );
        }
        let _ = write!(
            s,
            "# HELP flagsmith_sse_connections_rejected_total Connections and subscriptions refused, by reason.\n# TYPE flagsmith_sse_connections_rejected_total counter\n"
        );
        for r in Rejection::ALL {
            let _ = writeln!(
                s,
                "flagsmith_sse_connections_rejected_total{{reason=\"{}\"}} {}",
                r.label(),
                self.rejected[r as usize]
            );
        }
        let _ = write!(
            s,
            "# HELP flagsmith_sse_redis_commands_total Store commands sent, by command.\n# TYPE flagsmith_sse_redis_commands_total counter\n"
        );
        for (cmd, st) in &self.store_commands {
            let _ = writeln!(
                s,
                "flagsmith_sse_redis_commands_total{{command=\"{cmd}\"}} {}",
                st.sent
            );
        }
        let _ = write!(
            s,
            "# HELP flagsmith_sse_redis_errors_total Store commands failed, by command.\n# TYPE flagsmith_sse_redis_errors_total counter\n"
        );
        for (cmd, st) in &self.store_commands {
            let _ = writeln!(
                s,
                "flagsmith_sse_redis_errors_total{{command=\"{cmd}\"}} {}",
                st.failed
            );
        }
        let name = "flagsmith_sse_fanout_duration_seconds";
        let _ = write!(
            s,
            "# HELP {name} Time from an update entering the cache to its last socket write.\n# TYPE {name} histogram\n"
        );
        for (le, n) in FANOUT_BUCKETS.iter().zip(self.fanout_counts) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", self.fanout_count);
        let _ = writeln!(s, "{name}_sum {}", self.fanout_sum);
        let _ = writeln!(s, "{name}_count {}", self.fanout_count);
        s
    }
}
