//! The event loop: one thread, one `mio::Poll`, every client socket, every timer.
//!
//! Tokens: connection tokens are slab keys; [`LISTENER`], [`WAKER`] and [`SIGNAL`] are special.
//! The loop's timeout comes from the earliest deadline (a heap of connection and environment
//! deadlines plus the store-fetch slot); there is no timer thread. Store work goes to the helper
//! thread ([`crate::store::Helper`]) and comes back over a channel and the waker. Updates are
//! written straight from here to the sockets. This file owns the server's state and the turn:
//! what one loop turn does, in which order, and how much of each (`TURN_BUDGET`); work left over
//! (connections, timers, store times, fan-outs, answers, the shutdown walk) makes the next `poll`
//! return at once. Each concern the turn calls on has a file of its own: `accept.rs` (taking
//! clients on), `timers.rs` (the timer heap and fetch scheduling), `requests.rs` (HTTP requests),
//! `streams.rs` (subscribers and fan-out), `replies.rs` (the store helper's answers),
//! `close.rs` (how a connection ends), `shutdown.rs` (SIGTERM), `access.rs` (the access log)
//! and `admin.rs`. See `docs/ARCHITECTURE.md` for the whole picture.

use crate::config::{Config, StoreConfig};
use crate::conn::{self, Closing, Conn, Http, Io, State, Stream};
use crate::http::{self, BodyFraming, Head, HttpError, Method, Parsed, Route};
use crate::metrics::{FetchTrigger, Gauges, Metrics, QueueResult, Rejection};
use crate::slab::Slab;
use crate::sse::Event;
use crate::store::{self, Change, Command, Helper, Reply, Store, StoreError};
use crate::sys;
use crate::timestamp::{self, Micros};
use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod accept;
mod access;
mod admin;
mod close;
mod replies;
mod requests;
mod shutdown;
mod streams;
mod timers;

use timers::Timer;

/// The listening socket.
pub const LISTENER: Token = Token(usize::MAX - 1);
/// The waker of the store helper and of the wake-up listener.
pub const WAKER: Token = Token(usize::MAX - 2);
/// SIGTERM / SIGINT.
pub const SIGNAL: Token = Token(usize::MAX - 3);

/// Reads (of the scratch buffer's size) per connection per turn.
const MAX_READS_PER_TURN: usize = 16;
/// Request-processing steps per connection per turn (bounds pipelining storms).
const MAX_STEPS_PER_TURN: usize = 64;
/// Size of the one read buffer shared by all connections.
const SCRATCH_SIZE: usize = 64 * 1024;
/// Allocations this large or larger (request bodies being read) get pages of their own from
/// glibc, which go back to the system when they are freed: memory taken by a wave of large
/// requests is returned once they are done, instead of staying in a fragmented heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 * 1024;
/// Responses gathered from one read of pipelined requests before they are written.
const MAX_GATHERED_OUTPUT: usize = 64 * 1024;
/// Send buffer of stream sockets: events are tiny, and a small buffer makes a stalled reader
/// visible instead of letting the kernel absorb megabytes for it.
const STREAM_SNDBUF: usize = 8 * 1024;
/// Descriptors kept back from MAX_CONNECTIONS for the listener, poll, store and logs, at most.
/// A low open-file limit keeps back a quarter of itself instead (at least
/// `MIN_RESERVED_FDS`), so that it still leaves room for more than a single client.
const RESERVED_FDS: u64 = 64;
/// Descriptors kept back at the least; about ten are in use before the first client.
const MIN_RESERVED_FDS: u64 = 16;
/// Wait before a wake-up whose fetch failed is tried again (ms): the change it announced is
/// known to be waiting, and the store's own backoff answers at once meanwhile.
const WAKEUP_RETRY_MS: u64 = 250;
/// Queue-change writes sent to the store helper and not answered by it, at most (timed-out
/// ones included); beyond it (the helper stopped answering) new ones are answered 503 at once
/// instead of queueing up in the channel without bound.
const MAX_WRITES_AT_STORE: usize = 4 * 4096;
/// How long the parts of one loop turn (ready connections, accepts, leftover connections,
/// timers, store times) may work together before each stops and leaves the rest for the next
/// turn; the fan-out has its own slice ([`streams::FANOUT_SLICE`]) on top.
const TURN_BUDGET: Duration = Duration::from_millis(1);
/// Items each part of a turn handles even when the budget is spent, so that none starves.
const MIN_ITEMS_PER_PART: usize = 8;
/// Hard limit after the shutdown grace period before the loop exits anyway (ms).
const SHUTDOWN_SLACK_MS: u64 = 3_000;

/// An environment the loop knows about.
struct Env {
    key: Box<str>,
    /// Newest update time known.
    time: Option<Micros>,
    /// The event for the newest broadcast time, shared by all subscribers.
    event: Option<Event>,
    /// Tokens of subscribed connections.
    subs: Vec<usize>,
    /// End of the current coalescing window (ms).
    window_end: u64,
    /// A newer time waits for the window to end.
    pending: bool,
    /// Deadline of this environment's timer entry, `u64::MAX` if none.
    timer_at: u64,
    /// The fan-out under way, if any.
    fan: Option<streams::Fan>,
}

/// Why the loop closes a connection, for the debug log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The peer hung up or reset.
    Peer,
    /// The work is done (lingering finished, idle keep-alive expired).
    Done,
    /// A socket error.
    Error,
    /// A reader that stopped taking data.
    Stalled,
    /// Shutdown or lingering deadline passed.
    Deadline,
}

/// The server: bind with [`Server::new`], then [`Server::run`].
pub struct Server {
    cfg: Arc<Config>,
    /// The store's host(s) for log lines (`StoreConfig::hosts`), worked out once.
    store_hosts: Box<str>,
    poll: Poll,
    listener: Option<TcpListener>,
    /// The listener may have connections waiting (edge-triggered: remembered, not re-reported).
    listener_ready: bool,
    /// Accepting paused for lack of descriptors until this time (ms).
    accept_retry_at: u64,
    /// A descriptor kept in reserve, closed to accept and refuse a client when out of them.
    spare_fd: Option<std::fs::File>,
    conns: Slab<Conn>,
    next_serial: u64,
    max_conns: usize,
    streams: usize,
    envs: Slab<Env>,
    env_ids: HashMap<Box<str>, u32>,
    timers: BinaryHeap<Reverse<(u64, Timer)>>,
    helper: Helper,
    signals: sys::SignalFd,
    fetch_in_flight: bool,
    /// Set by the wake-up listener thread: another instance wrote; fetch now.
    wakeup_flag: Arc<AtomicBool>,
    /// A wake-up arrived and its fetch has not started yet (one fetch covers any number).
    wakeup_pending: bool,
    /// The fetch in flight was started by a wake-up.
    fetch_for_wakeup: bool,
    /// A wake-up's fetch failed: try again at this time (ms); `u64::MAX`: nothing owed.
    wakeup_retry_at: u64,
    /// The wake-up listener, with Redis and `REDIS_NOTIFY` on.
    _notify: Option<store::notify::Listener>,
    next_fetch_at: u64,
    /// Last successful fetch (ms); start time until the first.
    last_fetch_ok: u64,
    store_ready: bool,
    clock: Instant,
    scratch: Vec<u8>,
    /// The budget every connection's request buffers count against.
    budget: http::Budget,
    /// Connections with work left over from a capped turn: (token, serial).
    revisit: Vec<(usize, u64)>,
    /// Queue-change writes parsed in this turn, handed to the helper together at its end so
    /// that concurrent requests share one store round trip.
    pending_writes: Vec<(store::WriteId, Change)>,
    /// Writes at the store not answered yet: id to (token, serial).
    writes: HashMap<store::WriteId, (usize, u64)>,
    /// When each write times out (ms), oldest first.
    write_deadlines: VecDeque<(u64, store::WriteId)>,
    next_write_id: store::WriteId,
    /// Writes the store acknowledged whose queue-changes are not answered yet, in order.
    acknowledged: VecDeque<(store::WriteId, Change, Result<Micros, StoreError>)>,
    /// Writes sent to the helper that it has not answered (timed out ones included).
    writes_at_helper: usize,
    /// Fan-outs under way and store times not yet applied.
    backlog: streams::Backlog,
    /// When the current turn's budget is spent.
    turn_ends: Instant,
    shutdown_at: Option<u64>,
    /// Connections the shutdown walk has not visited yet: (token, serial).
    shutdown_walk: Vec<(usize, u64)>,
    /// Turns the shutdown walk has worked in, for the debug log.
    shutdown_walk_turns: u32,
    rng: u64,
    metrics: Metrics,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX / 4)) as u64
}

/// Opens the store the configuration names; `wake_id`: publish wake-ups carrying it; with Redis,
/// each write waits for `wait_replicas`.
pub fn open_store(
    cfg: &StoreConfig,
    wake_id: Option<String>,
    wait_replicas: u32,
) -> Result<Box<dyn Store>, StoreError> {
    match cfg {
        StoreConfig::Embedded => Ok(Box::new(store::MemoryStore::default())),
        StoreConfig::Redis {
            url,
            changelog_maxlen,
            cluster: false,
        } => Ok(Box::new(
            store::redis::RedisStore::new(url, *changelog_maxlen)?
                .with_wakeups(wake_id)
                .wait_for_replicas(wait_replicas),
        )),
        StoreConfig::Redis {
            url,
            changelog_maxlen,
            cluster: true,
        } => Ok(Box::new(
            store::redis::RedisStore::new_cluster(url, *changelog_maxlen)?
                .with_wakeups(wake_id)
                .wait_for_replicas(wait_replicas),
        )),
    }
}

impl Server {
    /// Binds the listener, raises the open-file limit and starts the store helper.
    pub fn new(cfg: Config) -> io::Result<Server> {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt changes the allocator's tuning only; it takes the allocator's lock.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
        let nofile = sys::raise_nofile_limit().unwrap_or(1024);
        let reserved = RESERVED_FDS.min((nofile / 4).max(MIN_RESERVED_FDS));
        let derived = nofile.saturating_sub(reserved).max(1) as usize;
        let max_conns = match cfg.max_connections {
            Some(n) if n > derived => {
                warn!(
                    "MAX_CONNECTIONS={n} is above what the open-file limit ({nofile}) allows; using {derived}"
                );
                derived
            }
            Some(n) => n,
            None => derived,
        };
        info!("open-file limit {nofile}, MAX_CONNECTIONS {max_conns}");
        let poll = Poll::new()?;
        let std_listener = sys::listen(cfg.bind, cfg.reuse_port)?;
        let mut listener = TcpListener::from_std(std_listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let signals = sys::SignalFd::install()?;
        poll.registry().register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNAL,
            Interest::READABLE,
        )?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let instance_id = store::notify::instance_id();
        let notify = cfg.redis_notify && cfg.store != StoreConfig::Embedded;
        let store = open_store(
            &cfg.store,
            notify.then(|| instance_id.clone()),
            cfg.wait_replicas,
        )
        .map_err(|e| io::Error::other(e.to_string()))?;
        info!("using {}", store.describe());
        let wakeup_flag = Arc::new(AtomicBool::new(false));
        let notify = match &cfg.store {
            StoreConfig::Redis { url, cluster, .. } if notify => {
                let (flag, waker) = (wakeup_flag.clone(), waker.clone());
                Some(store::notify::Listener::start(
                    url,
                    *cluster,
                    instance_id,
                    move || {
                        flag.store(true, Ordering::Release);
                        let _ = waker.wake();
                    },
                )?)
            }
            _ => None,
        };
        let helper = Helper::start(store, move || {
            let _ = waker.wake();
        })?;
        let seed = timestamp::now_micros() as u64 ^ u64::from(std::process::id()) << 32;
        // The embedded store lives in this process and cannot be unavailable: ready at once,
        // rather than answering 503 to probes that arrive before the first fetch returns.
        let store_ready = cfg.store == StoreConfig::Embedded;
        let budget = http::Budget::new(cfg.max_buffered_request_bytes);
        Ok(Server {
            store_hosts: cfg.store.hosts().into(),
            cfg: Arc::new(cfg),
            poll,
            listener: Some(listener),
            listener_ready: true,
            accept_retry_at: 0,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            conns: Slab::default(),
            next_serial: 1,
            max_conns,
            streams: 0,
            envs: Slab::default(),
            env_ids: HashMap::new(),
            timers: BinaryHeap::new(),
            helper,
            signals,
            fetch_in_flight: false,
            wakeup_flag,
            wakeup_pending: false,
            fetch_for_wakeup: false,
            wakeup_retry_at: u64::MAX,
            _notify: notify,
            next_fetch_at: 0,
            last_fetch_ok: 0,
            store_ready,
            clock: Instant::now(),
            scratch: vec![0; SCRATCH_SIZE],
            budget,
            revisit: Vec::new(),
            pending_writes: Vec::new(),
            writes: HashMap::new(),
            write_deadlines: VecDeque::new(),
            next_write_id: 1,
            writes_at_helper: 0,
            acknowledged: VecDeque::new(),
            backlog: streams::Backlog::default(),
            turn_ends: Instant::now(),
            shutdown_at: None,
            shutdown_walk: Vec::new(),
            shutdown_walk_turns: 0,
            rng: seed | 1,
            metrics: Metrics::default(),
        })
    }

    /// Client connections allowed: `MAX_CONNECTIONS`, or what the open-file limit allows.
    pub fn max_connections(&self) -> usize {
        self.max_conns
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(io::Error::other("listener closed")),
        }
    }

    /// Milliseconds since the server started: the clock of every deadline.
    fn now(&self) -> u64 {
        ms(self.clock.elapsed())
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: jitter only, not for secrets.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Runs until a signal ends it. Returns once every connection is closed.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        info!("listening on {}", self.local_addr()?);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.turn_ends = Instant::now() + TURN_BUDGET;
            let mut driven = 0;
            // The budget, once spent, stays spent: the events after that do not read the clock.
            let mut over = false;
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.listener_ready = true,
                    WAKER => self.drain_replies(),
                    SIGNAL => {
                        if self.signals.take() > 1 && self.shutdown_at.is_some() {
                            warn!("second signal: exiting now");
                            // Nothing is closed or joined: the store helper may be stuck in a
                            // call, and the process is about to end anyway.
                            std::mem::forget(self);
                            return Ok(());
                        }
                        self.begin_shutdown();
                    }
                    Token(t) => {
                        over = over || (driven >= MIN_ITEMS_PER_PART && self.turn_over());
                        if let Some(c) = self.conns.get_mut(t) {
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                c.readable = true;
                            }
                            if over {
                                // Over budget: its readiness is remembered, it goes next turn.
                                let serial = c.serial;
                                self.revisit.push((t, serial));
                            } else {
                                driven += 1;
                                self.drive(t);
                            }
                        }
                    }
                }
            }
            // The waker may have fired before a reply was visible; replies are cheap to poll.
            self.drain_replies();
            self.answer_writes();
            let now = self.now();
            if self.listener_ready && now >= self.accept_retry_at {
                self.accept();
            }
            self.revisit_leftovers();
            self.end_some();
            self.run_timers();
            let now = self.now();
            self.apply_times(now);
            self.fan_out(now);
            self.flush_writes();
            if let Some(at) = self.shutdown_at {
                if self.conns.is_empty() {
                    info!("all connections closed; exiting");
                    return Ok(());
                }
                if self.now() > at + ms(self.cfg.shutdown_grace) + SHUTDOWN_SLACK_MS {
                    warn!(
                        "{} connections still open after the shutdown grace period; exiting",
                        self.conns.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    /// How long the next `poll` may sleep: zero while work is left over, else until the
    /// earliest deadline.
    fn poll_timeout(&self) -> Option<Duration> {
        let now = self.now();
        if !self.revisit.is_empty()
            || !self.backlog.is_empty()
            || self.shutdown_walk_left()
            || !self.acknowledged.is_empty()
            || (self.listener_ready && now >= self.accept_retry_at)
        {
            return Some(Duration::ZERO);
        }
        let mut next = self.timers.peek().map_or(u64::MAX, |Reverse((at, _))| *at);
        next = next.min(self.next_fetch_at).min(self.wakeup_retry_at);
        next = next.min(self.next_write_deadline().unwrap_or(u64::MAX));
        if self.listener_ready {
            next = next.min(self.accept_retry_at);
        }
        if let Some(at) = self.shutdown_at {
            next = next.min(at + ms(self.cfg.shutdown_grace) + SHUTDOWN_SLACK_MS);
        }
        // Round up so that a deadline is never woken for a millisecond early.
        Some(Duration::from_millis(
            next.saturating_sub(now).min(60_000) + u64::from(next > now),
        ))
    }

    /// Whether this turn's budget is spent.
    fn turn_over(&self) -> bool {
        Instant::now() >= self.turn_ends
    }

    /// Drives the connections left over from earlier turns, while the budget lasts.
    fn revisit_leftovers(&mut self) {
        let mut left = std::mem::take(&mut self.revisit).into_iter();
        let mut driven = 0;
        for (t, serial) in left.by_ref() {
            if self.conns.get(t).is_some_and(|c| c.serial == serial) {
                self.drive(t);
            }
            driven += 1;
            if driven >= MIN_ITEMS_PER_PART && self.turn_over() {
                break;
            }
        }
        self.revisit.extend(left);
    }

    /// Does what connection `token` is ready for, by its state.
    fn drive(&mut self, token: usize) {
        let now = self.now();
        match self.conns.get(token).map(|c| &c.state) {
            Some(State::Http(_)) => self.drive_http(token, now),
            Some(State::Stream(_)) => {
                self.discard_input(token);
                self.flush_stream(token, now);
            }
            Some(State::Closing(_)) => self.drive_closing(token),
            None => {}
        }
    }
}
