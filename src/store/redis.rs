//! The Redis store: the state many stateless instances share.
//!
//! Three keys, all with the hash tag `{flagsmith_sse}` so that they live in one cluster slot:
//!
//! - `{flagsmith_sse}:times`, a hash from environment key to its latest update time (decimal
//!   microseconds since the epoch): the snapshot.
//! - `{flagsmith_sse}:log`, a stream with one entry `k <key> t <time>` per time that moved
//!   forward: the change log, trimmed approximately to `REDIS_CHANGELOG_MAXLEN` entries.
//! - `{flagsmith_sse}:epoch`, a value set by the first write into an empty Redis; a different
//!   (or missing) epoch tells an instance that Redis lost or replaced its data.
//!
//! One Lua script writes a whole batch: for each item it moves the hash entry forward only and
//! appends to the log only when it did, so the hash and the log never disagree. When a time
//! moved, it also publishes a wake-up for the other instances ([`super::notify`]). A fetch reads
//! the log from the last entry this instance saw (inclusive: that entry must still be there,
//! else the log was trimmed past it) plus the epoch, in one pipelined round trip per page; its
//! cost grows with the changes since the previous fetch. With no position, a trimmed position
//! or a changed epoch, the store notes the newest log entry first and then scans the hash, so
//! a write the scan misses is in the log after that entry and comes with the next fetch.
//!
//! The blocking client lives on the helper thread only. It connects lazily with a connect
//! timeout, reads and writes with timeouts, and after a failure waits with exponential backoff
//! (capped at [`BACKOFF_CAP`]) before it tries again, answering errors at once meanwhile.
//! Failures are sorted into [`StoreError`] variants. An error reply meaning "not this node, not
//! now" (`READONLY` from a demoted primary, `MASTERDOWN`, `LOADING`, `BUSY`, `NOREPLICAS`,
//! `TRYAGAIN`, `CLUSTERDOWN`, `MOVED`, `ASK`) counts as a connection failure: the connection is dropped and opened again
//! later, which resolves the host name again. Each fetch carries a harmless write (the `XTRIM`
//! every write does anyway) after its reads, so that fetches fail, and readiness is 503, for as
//! long as the node cannot take writes, although its reads would succeed.
//!
//! With `REDIS_WAIT_REPLICAS=n`, each write is followed by `WAIT n 1000` on the same connection
//! (in a cluster: to the node holding the slot); fewer acknowledgements fail the write with
//! [`StoreError::Replicas`]. Writes are built in one place ([`RedisStore::write`] with
//! `write_batch`), where anything else that must follow a write belongs.
//!
//! With the `tls` feature, `rediss://` URLs connect over TLS (rustls; the trusted CAs are the
//! system's, or those in `SSL_CERT_FILE` / `SSL_CERT_DIR`). With the `cluster` feature the same
//! store runs against a Redis Cluster: every key sits in the slot of `{flagsmith_sse}`, so each
//! command goes to the one node that holds it, and the other nodes are never needed.

use super::{Change, CommandStats, Fetched, Store, StoreError};
use crate::timestamp::Micros;
use ::redis::{
    Client, Connection, ConnectionLike, ErrorKind, FromRedisValue, RedisError, RedisResult, Value,
};
use log::{debug, info, warn};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The hash of each environment's latest time.
pub const TIMES_KEY: &str = "{flagsmith_sse}:times";
/// The change log stream.
pub const LOG_KEY: &str = "{flagsmith_sse}:log";
/// The epoch: which incarnation of the data this is.
pub const EPOCH_KEY: &str = "{flagsmith_sse}:epoch";

/// Time allowed to open a connection, including its handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for each read or write on an open connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait after the first failure; it doubles with each further failure in a row.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between connection attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// How long Redis `WAIT` waits for replicas (ms).
pub const WAIT_TIMEOUT_MS: u64 = 1000;

/// Log entries read per round trip.
const LOG_PAGE: usize = 1000;
/// Pages read per fetch at most; anything left comes with the next fetch.
const MAX_LOG_PAGES: usize = 100;
/// `COUNT` hint for each `HSCAN` of a snapshot.
const SCAN_COUNT: usize = 1000;

/// Moves times forward and logs each move. KEYS: times, log, epoch. ARGV: log length, epoch
/// candidate, wake-up payload (empty: publish none), then key and time pairs. Returns the time
/// stored for each pair, in order. Times are compared as canonical decimal integers, exactly
/// (no floating point). When a time moved, the payload is published on
/// [`super::notify::CHANNEL`]; a refusal (an ACL user without the channel) is ignored: the
/// write stands, and other instances find it with their periodic fetch.
pub const WRITE_SCRIPT: &str = r#"
local function newer(a, b)
  local an, bn = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if an ~= bn then return bn end
  if a == b then return false end
  if #a ~= #b then return (#a > #b) ~= an end
  return (a > b) ~= an
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[3], ARGV[2])
end
local out = {}
local added = 0
for i = 4, #ARGV - 1, 2 do
  local k, t = ARGV[i], ARGV[i + 1]
  local cur = redis.call('HGET', KEYS[1], k)
  if not cur or newer(t, cur) then
    redis.call('HSET', KEYS[1], k, t)
    redis.call('XADD', KEYS[2], '*', 'k', k, 't', t)
    added = added + 1
    cur = t
  end
  out[#out + 1] = cur
end
if added > 0 then
  redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', ARGV[1])
  if ARGV[3] ~= '' then
    redis.pcall('PUBLISH', '{flagsmith_sse}:wake', ARGV[3])
  end
end
return out
"#;

/// The commands counted for `/metrics`, in report order.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Connect,
    ScriptLoad,
    Evalsha,
    Get,
    Xrange,
    Xrevrange,
    Hscan,
    Wait,
    Xtrim,
}

const CMD_NAMES: [&str; 9] = [
    "connect",
    "script_load",
    "evalsha",
    "get",
    "xrange",
    "xrevrange",
    "hscan",
    "wait",
    "xtrim",
];

type Stats = [CommandStats; CMD_NAMES.len()];

/// Where this instance is in the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    /// The epoch seen with the position.
    epoch: Option<Vec<u8>>,
    /// The last log entry seen; `None`: the log was empty.
    last: Option<String>,
}

/// What reading the log found.
enum Delta {
    /// The changes after the cursor, and the new cursor.
    Changes(Vec<Change>, Cursor),
    /// The log no longer continues from the cursor: load a snapshot.
    Lost {
        why: &'static str,
        /// Whether an operator should hear of it (data loss, trimming) or not (first write).
        notable: bool,
    },
}

/// Update times in Redis.
pub struct RedisStore {
    url: String,
    cluster: bool,
    changelog_maxlen: u64,
    link: Link,
    cursor: Option<Cursor>,
    /// Distinguishes this process's epoch candidates from other instances'.
    instance_id: String,
    /// Write batches sent, for fresh epoch candidates.
    writes: u64,
    /// SHA1 of [`WRITE_SCRIPT`], for EVALSHA.
    script_sha: String,
    /// What writes publish as a wake-up; empty: none.
    wake_payload: String,
    /// Replicas that must acknowledge each write (Redis `WAIT`); 0: none.
    wait_replicas: u32,
}

impl RedisStore {
    /// Checks `url` and prepares a client; the connection is opened by the first command.
    pub fn new(url: &str, changelog_maxlen: u64) -> Result<RedisStore, StoreError> {
        check_tls(url)?;
        let client = Client::open(url)
            .map_err(|e| StoreError::Config(format!("{}: {e}", crate::config::redact_url(url))))?;
        Ok(RedisStore::with_target(
            url,
            Target::Node(client),
            changelog_maxlen,
        ))
    }

    /// Like [`RedisStore::new`] for a Redis Cluster: `nodes` is one or more comma-separated
    /// seed URLs, from which the client learns the rest of the cluster. Needs the `cluster`
    /// feature.
    pub fn new_cluster(nodes: &str, changelog_maxlen: u64) -> Result<RedisStore, StoreError> {
        check_tls(nodes)?;
        #[cfg(feature = "cluster")]
        {
            let seeds: Vec<&str> = nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .collect();
            // No retries inside the client: a timed-out command retried on the same connection
            // would read the late reply of the first one. Errors come back to `Link`, which
            // drops the whole connection and reconnects (with a fresh slot map).
            let client = ::redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(IO_TIMEOUT)
                .retries(0)
                .build()
                .map_err(|e| {
                    StoreError::Config(format!("{}: {e}", crate::config::redact_url(nodes)))
                })?;
            Ok(RedisStore::with_target(
                nodes,
                Target::Cluster(client),
                changelog_maxlen,
            ))
        }
        #[cfg(not(feature = "cluster"))]
        {
            let _ = changelog_maxlen;
            Err(StoreError::Config(
                "Redis Cluster support is not in this build (cargo feature `cluster`)".into(),
            ))
        }
    }

    /// Makes every write that moves a time publish a wake-up carrying `instance_id` (see
    /// [`super::notify`]); `None` publishes nothing.
    pub fn with_wakeups(mut self, instance_id: Option<String>) -> RedisStore {
        self.wake_payload = instance_id.unwrap_or_default();
        self
    }

    fn with_target(url: &str, target: Target, changelog_maxlen: u64) -> RedisStore {
        let instance_id = super::notify::instance_id();
        RedisStore {
            url: url.to_owned(),
            cluster: !matches!(target, Target::Node(_)),
            changelog_maxlen: changelog_maxlen.max(1),
            link: Link::new(target, crate::config::url_hosts(url)),
            cursor: None,
            instance_id,
            writes: 0,
            script_sha: ::redis::Script::new(WRITE_SCRIPT).get_hash().to_owned(),
            wake_payload: String::new(),
            wait_replicas: 0,
        }
    }

    /// Makes every write wait until `n` replicas acknowledged it (Redis `WAIT n 1000`); a
    /// write that fewer acknowledge within [`WAIT_TIMEOUT_MS`] fails with
    /// [`StoreError::Replicas`].
    pub fn wait_for_replicas(mut self, n: u32) -> RedisStore {
        self.wait_replicas = n;
        self
    }

    /// The write script's command for `batch`: the one place a write is built.
    fn write_command(&mut self, batch: &[Change]) -> ::redis::Cmd {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(&self.script_sha)
            .arg(3)
            .arg(TIMES_KEY)
            .arg(LOG_KEY)
            .arg(EPOCH_KEY)
            .arg(self.changelog_maxlen)
            .arg(format!(
                "{}-{:x}-{:x}",
                self.instance_id,
                crate::timestamp::now_micros(),
                self.writes
            ))
            .arg(&self.wake_payload);
        self.writes += 1;
        for c in batch {
            cmd.arg(c.key.as_bytes()).arg(c.time);
        }
        cmd
    }

    fn snapshot(&mut self) -> Result<Fetched, StoreError> {
        let maxlen = self.changelog_maxlen;
        let (cursor, times) = self.link.run(|conn, stats| snapshot(conn, stats, maxlen))?;
        let changes: Vec<Change> = times
            .into_iter()
            .map(|(key, time)| Change { key, time })
            .collect();
        debug!(
            "Redis snapshot: {} environments, log position {}",
            changes.len(),
            cursor.last.as_deref().unwrap_or("(empty)")
        );
        self.cursor = Some(cursor);
        Ok(Fetched {
            changes,
            snapshot: true,
        })
    }
}

impl Store for RedisStore {
    fn describe(&self) -> String {
        format!(
            "Redis{} at {} (change log ~{} entries)",
            if self.cluster { " Cluster" } else { "" },
            crate::config::redact_url(&self.url),
            self.changelog_maxlen
        )
    }

    fn fetch(&mut self) -> Result<Fetched, StoreError> {
        let Some(cursor) = self.cursor.clone() else {
            return self.snapshot();
        };
        match self
            .link
            .run(|conn, stats| read_log(conn, stats, &cursor, self.changelog_maxlen))?
        {
            Delta::Changes(changes, cursor) => {
                self.cursor = Some(cursor);
                Ok(Fetched {
                    changes,
                    snapshot: false,
                })
            }
            Delta::Lost { why, notable } => {
                if notable {
                    warn!("{why}; loading a snapshot");
                } else {
                    debug!("{why}; loading a snapshot");
                }
                self.cursor = None;
                self.snapshot()
            }
        }
    }

    fn write(&mut self, batch: &[Change]) -> Result<Vec<Micros>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let cmd = self.write_command(batch);
        let wait = self.wait_replicas;
        let (reply, acknowledged) = self
            .link
            .run(|conn, stats| write_batch(conn, stats, &cmd, wait))?;
        if reply.len() != batch.len() {
            return Err(StoreError::Unexpected(format!(
                "Redis answered {} items for a batch of {}",
                reply.len(),
                batch.len()
            )));
        }
        if let Some(acknowledged) = acknowledged
            && acknowledged < i64::from(wait)
        {
            return Err(StoreError::Replicas {
                wanted: wait,
                acknowledged: u32::try_from(acknowledged).unwrap_or(0),
            });
        }
        reply
            .iter()
            .map(|v| micros(v).ok_or_else(|| StoreError::Unexpected(format!("time {v:?}"))))
            .collect()
    }

    fn stats(&self) -> Vec<(&'static str, CommandStats)> {
        CMD_NAMES.iter().copied().zip(self.link.stats).collect()
    }
}

/// Refuses `rediss://` when TLS is not compiled in (the configuration refuses it first).
fn check_tls(url: &str) -> Result<(), StoreError> {
    if cfg!(not(feature = "tls")) && url.contains("rediss://") {
        return Err(StoreError::Config(
            "TLS to Redis (rediss:// or REDIS_USE_SSL) is not in this build (cargo feature `tls`)"
                .into(),
        ));
    }
    Ok(())
}

/// Where to connect.
enum Target {
    /// One Redis server.
    Node(Client),
    /// A Redis Cluster.
    #[cfg(feature = "cluster")]
    Cluster(::redis::cluster::ClusterClient),
}

impl Target {
    /// Opens a connection whose reads and writes time out.
    fn open(&self) -> RedisResult<Conn> {
        match self {
            Target::Node(client) => {
                let c = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Conn::Node(c))
            }
            // Each node's connection is opened, its set-up round trip included, within the
            // connect timeout (the client's PING that follows has none, but comes right after
            // the node answered); the cluster connection keeps these read and write timeouts
            // for every node it adds later.
            #[cfg(feature = "cluster")]
            Target::Cluster(client) => {
                let c = client.get_connection()?;
                c.set_read_timeout(Some(IO_TIMEOUT))?;
                c.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Conn::Cluster(Box::new(c)))
            }
        }
    }
}

/// An open connection.
enum Conn {
    Node(Connection),
    #[cfg(feature = "cluster")]
    Cluster(Box<::redis::cluster::ClusterConnection>),
}

impl Conn {
    fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Node(c) => c,
            #[cfg(feature = "cluster")]
            Conn::Cluster(c) => c,
        }
    }
}

/// The connection, its backoff state and its counters.
struct Link {
    target: Target,
    /// Where it connects, for log lines: `host:port`, or a cluster's seed list (no secrets).
    hosts: String,
    conn: Option<Conn>,
    /// Connection-level failures in a row.
    failures: u32,
    /// No connection attempt before this time.
    retry_at: Option<Instant>,
    /// Why the last attempt failed: what callers get while the backoff lasts.
    last_error: StoreError,
    stats: Stats,
}

impl Link {
    fn new(target: Target, hosts: String) -> Link {
        Link {
            target,
            hosts,
            conn: None,
            failures: 0,
            retry_at: None,
            last_error: StoreError::Unreachable("not connected yet".into()),
            stats: Stats::default(),
        }
    }

    /// Opens a connection unless one is open or the backoff says wait. Each new connection
    /// resolves the host name again, so that a primary that moved is found.
    fn connect(&mut self) -> Result<(), StoreError> {
        if self.conn.is_none() {
            if let Some(left) = self
                .retry_at
                .and_then(|at| at.checked_duration_since(Instant::now()))
            {
                let note = format!("next attempt in {} ms", left.as_millis());
                return Err(with_note(&self.last_error, &note));
            }
            count(&mut self.stats, Cmd::Connect);
            let mut conn = match self.target.open() {
                Ok(c) => c,
                Err(e) => {
                    fail(&mut self.stats, Cmd::Connect);
                    return Err(self.failed(&e));
                }
            };
            // Loaded up front so that writes do not pay for a NOSCRIPT round trip.
            if let Err(e) = load_script(&mut conn, &mut self.stats) {
                return Err(self.failed(&e));
            }
            if self.failures > 0 {
                info!("connected to Redis at {} again", self.hosts);
            } else {
                info!("connected to Redis at {}", self.hosts);
            }
            self.conn = Some(conn);
        }
        Ok(())
    }

    /// Records a connection-level failure: drops the connection and schedules the next attempt.
    fn failed(&mut self, e: &RedisError) -> StoreError {
        let err = StoreError::from(e);
        self.conn = None;
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 {
            warn!("Redis connection failed at {}: {err}", self.hosts);
        } else {
            debug!(
                "Redis connection still failing at {} ({} failures in a row): {err}",
                self.hosts, self.failures
            );
        }
        self.retry_at = Some(Instant::now() + backoff(self.failures));
        self.last_error = err.clone();
        err
    }

    /// Runs `op` on the connection. A connection that went stale while idle (Redis restarted)
    /// gets one immediate retry on a new connection. An error reply meaning "not this node, not
    /// now" (see [`StoreError::NotWritable`]) and every other connection-level failure drop
    /// the connection and start the backoff; other error replies leave the connection as it is.
    fn run<T>(
        &mut self,
        mut op: impl FnMut(&mut Conn, &mut Stats) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let reused = self.conn.is_some();
            self.connect()?;
            let Some(conn) = self.conn.as_mut() else {
                return Err(StoreError::Unreachable("no connection".into()));
            };
            match op(conn, &mut self.stats) {
                Ok(v) => {
                    self.failures = 0;
                    self.retry_at = None;
                    return Ok(v);
                }
                Err(e) => {
                    let err = StoreError::from(&e);
                    if let StoreError::Script(_) = err {
                        // An error reply: the connection is fine and in step.
                        return Err(err);
                    }
                    let err = self.failed(&e);
                    // MOVED and ASK name the right node: a new connection (with a fresh slot
                    // map) can take the command at once.
                    let stale = (e.is_connection_dropped() && !e.is_timeout())
                        || matches!(
                            e.kind(),
                            ErrorKind::Server(
                                ::redis::ServerErrorKind::Moved | ::redis::ServerErrorKind::Ask
                            )
                        );
                    if reused && !retried && stale {
                        retried = true;
                        self.retry_at = None;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }
}

/// `err` with `note` added to its text.
fn with_note(err: &StoreError, note: &str) -> StoreError {
    let add = |s: &String| format!("{s}; {note}");
    match err {
        StoreError::Unreachable(s) => StoreError::Unreachable(add(s)),
        StoreError::Timeout(s) => StoreError::Timeout(add(s)),
        StoreError::NotWritable(s) => StoreError::NotWritable(add(s)),
        StoreError::Script(s) => StoreError::Script(add(s)),
        StoreError::Unexpected(s) => StoreError::Unexpected(add(s)),
        StoreError::Config(s) => StoreError::Config(add(s)),
        other => other.clone(),
    }
}

impl From<&RedisError> for StoreError {
    /// Sorts a Redis failure by what the caller should do about it.
    fn from(e: &RedisError) -> StoreError {
        use ::redis::ServerErrorKind as S;
        // "Redis READONLY: You can't write ...", also for the first failure in a pipeline.
        let first = e.clone().into_server_errors().and_then(|errs| {
            errs.first()
                .map(|(_, se)| format!("Redis {}: {}", se.code(), se.details().unwrap_or("")))
        });
        let text = first.unwrap_or_else(|| format!("Redis: {e}"));
        match e.kind() {
            ErrorKind::Server(
                S::ReadOnly
                | S::MasterDown
                | S::BusyLoading
                | S::TryAgain
                | S::ClusterDown
                | S::Moved
                | S::Ask,
            ) => StoreError::NotWritable(text),
            // A script running too long, or a primary short of the replicas that
            // `min-replicas-to-write` asks for: not now either.
            ErrorKind::Extension if matches!(e.code(), Some("BUSY" | "NOREPLICAS")) => {
                StoreError::NotWritable(text)
            }
            ErrorKind::Io | ErrorKind::ClusterConnectionNotFound if e.is_timeout() => {
                StoreError::Timeout(text)
            }
            ErrorKind::Io
            | ErrorKind::ClusterConnectionNotFound
            | ErrorKind::AuthenticationFailed
            | ErrorKind::RESP3NotSupported => StoreError::Unreachable(text),
            ErrorKind::InvalidClientConfig => StoreError::Config(text),
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType | ErrorKind::Client => {
                StoreError::Unexpected(text)
            }
            _ if e.code().is_some() => StoreError::Script(text),
            _ => StoreError::Unexpected(text),
        }
    }
}

/// Runs the write script (loading it again if Redis lost it), then, with `wait` above zero,
/// Redis `WAIT`. Returns the script's reply and how many replicas acknowledged.
fn write_batch(
    conn: &mut Conn,
    stats: &mut Stats,
    script: &::redis::Cmd,
    wait: u32,
) -> RedisResult<(Vec<Value>, Option<i64>)> {
    let reply = match query::<Vec<Value>>(conn, stats, Cmd::Evalsha, script) {
        Err(e) if e.kind() == ErrorKind::Server(::redis::ServerErrorKind::NoScript) => {
            load_script(conn, stats)?;
            query(conn, stats, Cmd::Evalsha, script)?
        }
        other => other?,
    };
    if wait == 0 {
        return Ok((reply, None));
    }
    let mut cmd = ::redis::cmd("WAIT");
    cmd.arg(wait).arg(WAIT_TIMEOUT_MS);
    let acknowledged = match conn {
        Conn::Node(_) => query::<i64>(conn, stats, Cmd::Wait, &cmd)?,
        // WAIT names no key: it must go to the node that took the write, on the same
        // connection, which is the one holding the slot of the keys.
        #[cfg(feature = "cluster")]
        Conn::Cluster(c) => {
            use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            count(stats, Cmd::Wait);
            let route = Route::with_key(TIMES_KEY, SlotAddr::Master);
            c.route_command(
                &cmd,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
            )
            .and_then(|v| match v {
                Value::Int(n) => Ok(n),
                _ => Err(unexpected("WAIT reply is not an integer")),
            })
            .inspect_err(|_| fail(stats, Cmd::Wait))?
        }
    };
    Ok((reply, Some(acknowledged)))
}

/// The wait before the next attempt after `failures` failures in a row: [`BACKOFF_FIRST`],
/// doubling up to [`BACKOFF_CAP`].
pub(super) fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = (failures - 1).min(16);
    (BACKOFF_FIRST * (1u32 << doublings)).min(BACKOFF_CAP)
}

fn load_script(conn: &mut Conn, stats: &mut Stats) -> RedisResult<()> {
    let mut cmd = ::redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(WRITE_SCRIPT);
    match conn {
        Conn::Node(_) => query::<String>(conn, stats, Cmd::ScriptLoad, &cmd).map(|_| ()),
        // Left to itself the cluster client sends SCRIPT LOAD to every node and fails while
        // any one is down; only the node holding the keys runs the script.
        #[cfg(feature = "cluster")]
        Conn::Cluster(c) => {
            use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
            count(stats, Cmd::ScriptLoad);
            let route = Route::with_key(TIMES_KEY, SlotAddr::Master);
            c.route_command(
                &cmd,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
            )
            .and_then(|v| match text(&v) {
                Some(_) => Ok(()),
                None => Err(unexpected("SCRIPT LOAD reply is not a hash")),
            })
            .inspect_err(|_| fail(stats, Cmd::ScriptLoad))
        }
    }
}

fn count(stats: &mut Stats, c: Cmd) {
    stats[c as usize].sent += 1;
}

fn fail(stats: &mut Stats, c: Cmd) {
    stats[c as usize].failed += 1;
}

fn query<T: FromRedisValue>(
    conn: &mut Conn,
    stats: &mut Stats,
    c: Cmd,
    cmd: &::redis::Cmd,
) -> RedisResult<T> {
    count(stats, c);
    cmd.query(conn.like()).inspect_err(|_| fail(stats, c))
}

/// Sends `pipe` (made of `cmds`, in order) in one round trip.
fn query_pipe(
    conn: &mut Conn,
    stats: &mut Stats,
    cmds: &[Cmd],
    pipe: &::redis::Pipeline,
) -> RedisResult<Vec<Value>> {
    for &c in cmds {
        count(stats, c);
    }
    let out: RedisResult<Vec<Value>> = match conn {
        Conn::Node(c) => pipe.query(c),
        // The commands share a slot, so the cluster pipeline sends them to one node together.
        #[cfg(feature = "cluster")]
        Conn::Cluster(c) => {
            let mut cluster_pipe = ::redis::cluster::cluster_pipe();
            for cmd in pipe.cmd_iter() {
                cluster_pipe.add_command(cmd.clone());
            }
            cluster_pipe.query(c)
        }
    };
    match out {
        Ok(v) if v.len() == cmds.len() => Ok(v),
        Ok(_) => {
            for &c in cmds {
                fail(stats, c);
            }
            Err(unexpected("a pipeline reply of the wrong length"))
        }
        Err(e) => {
            for &c in cmds {
                fail(stats, c);
            }
            Err(e)
        }
    }
}

fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::UnexpectedReturnType, what))
}

/// Adds a harmless write command to a fetch's pipeline, after its reads: the approximate trim
/// every write does anyway (it trims nothing, so nothing is replicated, unless the log grew
/// past its length). A read-only replica (a primary demoted by a failover) refuses it with
/// `READONLY`, so the fetch fails and readiness says 503 for as long as the node cannot take
/// writes, although its reads would succeed.
fn writability_check(pipe: &mut ::redis::Pipeline, cmds: &mut Vec<Cmd>, maxlen: u64) {
    pipe.cmd("XTRIM")
        .arg(LOG_KEY)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen);
    cmds.push(Cmd::Xtrim);
}

/// Reads the log from the cursor, page by page.
fn read_log(
    conn: &mut Conn,
    stats: &mut Stats,
    cursor: &Cursor,
    maxlen: u64,
) -> RedisResult<Delta> {
    let mut changes = Vec::new();
    let mut last = cursor.last.clone();
    for page in 0..MAX_LOG_PAGES {
        let want = LOG_PAGE + usize::from(last.is_some());
        let mut pipe = ::redis::pipe();
        pipe.cmd("GET").arg(EPOCH_KEY);
        pipe.cmd("XRANGE")
            .arg(LOG_KEY)
            .arg(last.as_deref().unwrap_or("-"))
            .arg("+")
            .arg("COUNT")
            .arg(want);
        let mut cmds = vec![Cmd::Get, Cmd::Xrange];
        if page == 0 {
            writability_check(&mut pipe, &mut cmds, maxlen);
        }
        let mut replies = query_pipe(conn, stats, &cmds, &pipe)?.into_iter();
        let epoch = bytes(&replies.next().unwrap_or(Value::Nil)).map(<[u8]>::to_vec);
        let entries = stream_entries(replies.next().unwrap_or(Value::Nil))?;
        if epoch != cursor.epoch {
            return Ok(match cursor.epoch {
                None => Delta::Lost {
                    why: "Redis got its first data since the previous fetch",
                    notable: false,
                },
                Some(_) => Delta::Lost {
                    why: "Redis lost or replaced its data (its epoch changed)",
                    notable: true,
                },
            });
        }
        let got = entries.len();
        let mut entries = entries.into_iter();
        match &last {
            Some(p) => match entries.next() {
                Some((id, _)) if id == *p => {}
                _ => {
                    return Ok(Delta::Lost {
                        why: "the Redis change log was trimmed past this instance's position",
                        notable: true,
                    });
                }
            },
            None if got > 0 => {
                return Ok(Delta::Lost {
                    why: "the Redis change log was empty at the previous fetch and may have been trimmed since",
                    notable: false,
                });
            }
            None => {}
        }
        for (id, change) in entries {
            if let Some(c) = change {
                changes.push(c);
            }
            last = Some(id);
        }
        if got < want {
            break;
        }
    }
    Ok(Delta::Changes(
        changes,
        Cursor {
            epoch: cursor.epoch.clone(),
            last,
        },
    ))
}

/// Notes the epoch and the newest log entry, then scans the hash.
fn snapshot(
    conn: &mut Conn,
    stats: &mut Stats,
    maxlen: u64,
) -> RedisResult<(Cursor, HashMap<Box<str>, Micros>)> {
    let mut pipe = ::redis::pipe();
    pipe.cmd("GET").arg(EPOCH_KEY);
    pipe.cmd("XREVRANGE")
        .arg(LOG_KEY)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
    let mut cmds = vec![Cmd::Get, Cmd::Xrevrange];
    writability_check(&mut pipe, &mut cmds, maxlen);
    let mut replies = query_pipe(conn, stats, &cmds, &pipe)?.into_iter();
    let epoch = bytes(&replies.next().unwrap_or(Value::Nil)).map(<[u8]>::to_vec);
    let last = stream_entries(replies.next().unwrap_or(Value::Nil))?
        .into_iter()
        .next()
        .map(|(id, _)| id);
    let mut times: HashMap<Box<str>, Micros> = HashMap::new();
    let mut scan_cursor = String::from("0");
    loop {
        let mut cmd = ::redis::cmd("HSCAN");
        cmd.arg(TIMES_KEY)
            .arg(&scan_cursor)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let reply: Value = query(conn, stats, Cmd::Hscan, &cmd)?;
        let Value::Array(mut parts) = reply else {
            return Err(unexpected("HSCAN reply is not an array"));
        };
        if parts.len() != 2 {
            return Err(unexpected("HSCAN reply is not [cursor, items]"));
        }
        let items = parts.pop().unwrap_or(Value::Nil);
        scan_cursor = parts
            .pop()
            .as_ref()
            .and_then(text)
            .ok_or_else(|| unexpected("HSCAN cursor"))?
            .to_owned();
        for (k, v) in pairs(items) {
            let (Some(key), Some(time)) = (text(&k), micros(&v)) else {
                continue;
            };
            let t = times.entry(key.into()).or_insert(time);
            *t = (*t).max(time);
        }
        if scan_cursor == "0" {
            break;
        }
    }
    Ok((Cursor { epoch, last }, times))
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

fn micros(v: &Value) -> Option<Micros> {
    match v {
        Value::Int(i) => Some(*i),
        _ => text(v)?.parse().ok(),
    }
}

/// Flat `[k, v, k, v, ...]` arrays and maps alike, as pairs.
fn pairs(v: Value) -> Vec<(Value, Value)> {
    match v {
        Value::Map(m) => m,
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Stream entries as (id, change); an entry without a key and a time gives `None`.
fn stream_entries(v: Value) -> RedisResult<Vec<(String, Option<Change>)>> {
    let items = match v {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        _ => return Err(unexpected("stream reply is not an array")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            return Err(unexpected("stream entry is not an array"));
        };
        if parts.len() != 2 {
            return Err(unexpected("stream entry is not [id, fields]"));
        }
        let fields = parts.pop().unwrap_or(Value::Nil);
        let id = parts
            .pop()
            .as_ref()
            .and_then(text)
            .ok_or_else(|| unexpected("stream entry id"))?
            .to_owned();
        let mut key = None;
        let mut time = None;
        for (f, v) in pairs(fields) {
            match bytes(&f) {
                Some(b"k") => key = text(&v).map(Box::<str>::from),
                Some(b"t") => time = micros(&v),
                _ => {}
            }
        }
        let change = match (key, time) {
            (Some(key), Some(time)) => Some(Change { key, time }),
            _ => None,
        };
        out.push((id, change));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};

    /// A `redis-server` on a free port, killed by pid on drop.
    struct TestRedis {
        child: Child,
        port: u16,
    }

    impl TestRedis {
        fn start() -> TestRedis {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port");
            TestRedis::start_on(port)
        }

        fn start_on(port: u16) -> TestRedis {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--stream-node-max-entries", "8"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            let r = TestRedis { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while r.cli(&["PING"]).as_deref() != Some("PONG") {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            r
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        fn cli(&self, args: &[&str]) -> Option<String> {
            let out = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(args)
                .stderr(Stdio::null())
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }

        fn stop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn change(key: &str, time: Micros) -> Change {
        Change {
            key: key.into(),
            time,
        }
    }

    fn sorted(mut changes: Vec<Change>) -> Vec<Change> {
        changes.sort_by(|a, b| a.key.cmp(&b.key).then(a.time.cmp(&b.time)));
        changes
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let waits: Vec<u128> = (0..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [0, 100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn writes_move_times_forward_only_and_fetches_read_the_log() {
        let redis = TestRedis::start();
        let mut a = RedisStore::new(&redis.url(), 1000).unwrap();
        let mut b = RedisStore::new(&redis.url(), 1000).unwrap();
        let first = b.fetch().unwrap();
        assert!(first.snapshot);
        assert!(first.changes.is_empty());
        let big = 9_007_199_254_740_993; // 2^53 + 1: floating point would lose it.
        assert_eq!(
            a.write(&[
                change("x", 5),
                change("x", 3),
                change("y", -20),
                change("y", -30),
                change("z", big - 2),
                change("z", big),
                change("x", 5),
            ])
            .unwrap(),
            vec![5, 5, -20, -20, big - 2, big, 5]
        );
        assert_eq!(a.write(&[change("y", -3)]).unwrap(), vec![-3]);
        assert_eq!(a.write(&[change("z", big - 1)]).unwrap(), vec![big]);
        // b saw an empty Redis; the first write created the epoch, so b loads a snapshot.
        let next = b.fetch().unwrap();
        assert!(next.snapshot);
        assert_eq!(
            sorted(next.changes),
            vec![change("x", 5), change("y", -3), change("z", big)]
        );
        assert!(!b.fetch().unwrap().snapshot);
        a.write(&[change("x", 7), change("x", 6), change("w", 1)])
            .unwrap();
        let delta = b.fetch().unwrap();
        assert!(!delta.snapshot);
        assert_eq!(delta.changes, vec![change("x", 7), change("w", 1)]);
        let quiet = b.fetch().unwrap();
        assert!(!quiet.snapshot && quiet.changes.is_empty());
        let stats: HashMap<_, _> = a.stats().into_iter().collect();
        assert_eq!(stats["evalsha"].sent, 4);
        assert_eq!(stats["evalsha"].failed, 0);
        let stats: HashMap<_, _> = b.stats().into_iter().collect();
        assert_eq!(stats["hscan"].sent, 2);
        assert_eq!(stats["xrange"].sent, 4);
    }

    #[test]
    fn many_pages_of_changes_are_read_in_one_fetch() {
        let redis = TestRedis::start();
        let mut a = RedisStore::new(&redis.url(), 100_000).unwrap();
        a.write(&[change("seed", 1)]).unwrap();
        assert!(a.fetch().unwrap().snapshot);
        let batch: Vec<Change> = (0..2500)
            .map(|i| change(&format!("e{i}"), 10 + i))
            .collect();
        a.write(&batch).unwrap();
        let delta = a.fetch().unwrap();
        assert!(!delta.snapshot);
        assert_eq!(delta.changes, batch);
        let stats: HashMap<_, _> = a.stats().into_iter().collect();
        assert_eq!(stats["xrange"].sent, 3, "pages of {LOG_PAGE}");
    }

    #[test]
    fn a_trimmed_log_or_lost_data_loads_a_snapshot() {
        let redis = TestRedis::start();
        let mut writer = RedisStore::new(&redis.url(), 10).unwrap();
        let mut reader = RedisStore::new(&redis.url(), 10).unwrap();
        writer.write(&[change("early", 1)]).unwrap();
        assert_eq!(reader.fetch().unwrap().changes, vec![change("early", 1)]);
        writer.write(&[change("early", 2)]).unwrap();
        for i in 0..100 {
            writer.write(&[change(&format!("f{i}"), 100 + i)]).unwrap();
        }
        let len: u64 = redis.cli(&["XLEN", LOG_KEY]).unwrap().parse().unwrap();
        assert!(len < 50, "the log was trimmed to {len}");
        let after = reader.fetch().unwrap();
        assert!(after.snapshot, "trimming noticed");
        assert_eq!(after.changes.len(), 101);
        assert!(after.changes.contains(&change("early", 2)));
        assert!(!reader.fetch().unwrap().snapshot);

        // Redis loses everything, then gets a write: new epoch.
        redis.cli(&["FLUSHALL"]).unwrap();
        writer.write(&[change("new", 1)]).unwrap();
        let after = reader.fetch().unwrap();
        assert!(after.snapshot, "data loss noticed");
        assert_eq!(after.changes, vec![change("new", 1)]);

        // Flushed and nothing written since: the empty snapshot is taken too.
        redis.cli(&["FLUSHALL"]).unwrap();
        let after = reader.fetch().unwrap();
        assert!(after.snapshot && after.changes.is_empty());

        // A flushed script cache costs one reload, not a failed write.
        redis.cli(&["SCRIPT", "FLUSH"]).unwrap();
        assert_eq!(writer.write(&[change("new", 2)]).unwrap(), vec![2]);
        let stats: HashMap<_, _> = writer.stats().into_iter().collect();
        assert_eq!(stats["script_load"].sent, 2);
        assert_eq!(stats["evalsha"].failed, 1);
    }

    #[test]
    fn an_unreachable_redis_fails_fast_and_backs_off() {
        let mut redis = TestRedis::start();
        let port = redis.port;
        let mut s = RedisStore::new(&redis.url(), 100).unwrap();
        s.write(&[change("e", 1)]).unwrap();
        s.fetch().unwrap();
        redis.stop();
        let started = Instant::now();
        let mut errors = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            let t = Instant::now();
            assert!(s.fetch().is_err());
            assert!(s.write(&[change("e", 2)]).is_err());
            assert!(t.elapsed() < Duration::from_secs(2));
            errors += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        let stats: HashMap<_, _> = s.stats().into_iter().collect();
        // The stale connection is replaced at once; then waits of 200, 400, 800 ms allow three
        // more attempts in 1.5 s, not one per call.
        assert!(errors > 30, "{errors}");
        assert!(
            (3..=5).contains(&stats["connect"].failed),
            "{:?}",
            stats["connect"]
        );
        let _redis = TestRedis::start_on(port);
        let deadline = Instant::now() + BACKOFF_CAP + Duration::from_secs(2);
        let fetched = loop {
            match s.fetch() {
                Ok(f) => break f,
                Err(e) => assert!(Instant::now() < deadline, "not back: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        println!(
            "Redis back {:?} after it was stopped; counters {:?}",
            started.elapsed(),
            s.stats()
        );
        assert!(fetched.snapshot, "an empty Redis is a lost epoch");
        assert_eq!(s.write(&[change("e", 3)]).unwrap(), vec![3]);
    }

    #[test]
    fn failures_are_sorted_by_what_to_do_about_them() {
        use ::redis::ServerErrorKind as S;
        use std::io;
        let server = |k| StoreError::from(&RedisError::from((ErrorKind::Server(k), "x")));
        for k in [
            S::ReadOnly,
            S::MasterDown,
            S::BusyLoading,
            S::TryAgain,
            S::ClusterDown,
            S::Moved,
            S::Ask,
        ] {
            assert!(
                matches!(server(k), StoreError::NotWritable(_)),
                "{k:?}: {}",
                server(k)
            );
        }
        assert!(matches!(server(S::ResponseError), StoreError::Script(_)));
        let extension =
            |code: &str| StoreError::from(&::redis::make_extension_error(code.to_owned(), None));
        assert!(matches!(
            extension("NOREPLICAS"),
            StoreError::NotWritable(_)
        ));
        assert!(matches!(extension("BUSY"), StoreError::NotWritable(_)));
        assert!(matches!(extension("WHATEVER"), StoreError::Script(_)));
        assert!(matches!(server(S::NoPerm), StoreError::Script(_)));
        let io_err = |k| StoreError::from(&RedisError::from(io::Error::new(k, "x")));
        assert!(matches!(
            io_err(io::ErrorKind::TimedOut),
            StoreError::Timeout(_)
        ));
        assert!(matches!(
            io_err(io::ErrorKind::WouldBlock),
            StoreError::Timeout(_)
        ));
        assert!(matches!(
            io_err(io::ErrorKind::ConnectionRefused),
            StoreError::Unreachable(_)
        ));
        assert!(matches!(
            StoreError::from(&unexpected("odd")),
            StoreError::Unexpected(_)
        ));
    }

    #[test]
    fn a_demoted_primary_fails_writes_and_fetches_until_it_is_promoted() {
        let a = TestRedis::start();
        let b = TestRedis::start();
        let mut s = RedisStore::new(&a.url(), 100).unwrap();
        s.write(&[change("e", 1)]).unwrap();
        s.fetch().unwrap();
        a.cli(&["REPLICAOF", "127.0.0.1", &b.port.to_string()])
            .unwrap();
        let e = s.write(&[change("e", 2)]).unwrap_err();
        assert!(matches!(e, StoreError::NotWritable(_)), "{e}");
        assert!(e.to_string().contains("READONLY"), "{e}");
        // Fetches fail while the node refuses writes, whether in the backoff or connected.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let e = s.fetch().unwrap_err();
            assert!(matches!(e, StoreError::NotWritable(_)), "{e}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let stats: HashMap<_, _> = s.stats().into_iter().collect();
        assert!(stats["xtrim"].failed >= 2, "{:?}", stats["xtrim"]);
        assert!(stats["connect"].sent >= 3, "{:?}", stats["connect"]);
        a.cli(&["REPLICAOF", "NO", "ONE"]).unwrap();
        let deadline = Instant::now() + BACKOFF_CAP + Duration::from_secs(2);
        loop {
            match s.fetch() {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "not writable again: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.write(&[change("e", 3)]).unwrap(), vec![3]);
    }

    #[test]
    fn bad_urls_are_refused_at_start() {
        assert!(RedisStore::new("redis://[bad", 10).is_err());
        assert_eq!(
            RedisStore::new("rediss://127.0.0.1:6379/0", 10).is_ok(),
            cfg!(feature = "tls")
        );
        assert_eq!(
            RedisStore::new_cluster("redis://127.0.0.1:1,redis://127.0.0.1:2", 10).is_ok(),
            cfg!(feature = "cluster")
        );
        let s = RedisStore::new("redis://user:secret@127.0.0.1:1/0", 10).unwrap();
        assert!(!s.describe().contains("secret"));
        if cfg!(feature = "cluster") {
            let s = RedisStore::new_cluster("redis://:secret@a:1,redis://:secret@b:2", 10).unwrap();
            assert_eq!(
                s.describe(),
                "Redis Cluster at redis://***@a:1,redis://***@b:2 (change log ~10 entries)"
            );
        }
    }
}
