//! The store: where update times live, behind one helper thread.
//!
//! The event loop never blocks on the store. It sends [`Command`]s over a channel to the helper
//! thread, which runs them against a blocking [`Store`] implementation and sends [`Reply`]s
//! back, waking the loop with its `mio::Waker`. Writes that queue up while the helper is busy
//! are sent to the store as one batch; at most one fetch is in flight because the loop only asks
//! for the next one after the previous reply. With Redis, a second thread ([`notify`]) listens
//! for other instances' wake-ups and asks the loop to fetch at once.

mod memory;
pub mod notify;
pub mod redis;

pub use memory::MemoryStore;

use crate::timestamp::Micros;
use std::fmt;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Most commands the helper takes from the channel into one batch.
const MAX_BATCH: usize = 4096;

/// An environment's update time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The environment key.
    pub key: Box<str>,
    /// Its update time.
    pub time: Micros,
}

/// What a fetch found.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Times that changed since the previous fetch (or every time, for a snapshot).
    pub changes: Vec<Change>,
    /// Whether this is a full snapshot rather than the changes since the previous fetch.
    pub snapshot: bool,
}

/// Per-command counters, reported with every reply for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommandStats {
    /// Commands sent to the store.
    pub sent: u64,
    /// Commands that failed.
    pub failed: u64,
}

/// Why the store could not do what was asked. Every variant but [`StoreError::Config`] reaches
/// a queue-change as 503 with `Retry-After` (the caller retries; the write is idempotent), with
/// the `Display` text as its `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be reached: connection refused or reset, name not resolved, TLS or
    /// authentication failed, or the connection is in its backoff after such a failure. The
    /// client sees 503; readiness follows once fetches fail.
    Unreachable(String),
    /// The store did not answer a command within its read or write timeout. The client sees
    /// 503; the connection is replaced.
    Timeout(String),
    /// The node cannot take the command now: it is a read-only replica (`READONLY`, what an old
    /// primary looks like after a failover), its primary is down (`MASTERDOWN`), it is loading
    /// its data (`LOADING`), it runs a long script (`BUSY`), it lacks the replicas that
    /// `min-replicas-to-write` asks for (`NOREPLICAS`), or the cluster is moving or lacks the
    /// slot (`TRYAGAIN`,
    /// `CLUSTERDOWN`, `MOVED`, `ASK`). The client sees 503 and readiness is 503; the
    /// connection is dropped and opened again (resolving the host again) with the usual
    /// backoff.
    NotWritable(String),
    /// The write was applied, but fewer replicas than `REDIS_WAIT_REPLICAS` acknowledged it
    /// within a second (Redis `WAIT`). The client sees 503 and retries; the retry is harmless.
    Replicas {
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged.
        acknowledged: u32,
    },
    /// The store answered with an error of its own (the write script failed, a command was
    /// refused by an ACL, ...). The client sees 503; the connection is kept.
    Script(String),
    /// The store answered something this server does not understand. The client sees 503;
    /// the connection is replaced.
    Unexpected(String),
    /// The store is misconfigured (bad URL, a feature missing from this build). Only at
    /// start-up: the server does not start.
    Config(String),
    /// The store helper did not answer within [`STORE_TIMEOUT`]: the client sees 503 at once;
    /// the late answer still reaches subscribers.
    Stalled,
    /// The store helper thread is gone. The client sees 503.
    Stopped,
}

/// Longest a queue-change waits for its write before it is answered 503 (the write may still
/// complete later; its time then reaches subscribers as usual).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(3);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unreachable(e) => write!(f, "store unreachable: {e}"),
            StoreError::Timeout(e) => write!(f, "store timed out: {e}"),
            StoreError::NotWritable(e) => write!(f, "store cannot take writes now: {e}"),
            StoreError::Replicas {
                wanted,
                acknowledged,
            } => write!(
                f,
                "store replication: {acknowledged} of {wanted} replicas acknowledged the write"
            ),
            StoreError::Script(e) => write!(f, "store error: {e}"),
            StoreError::Unexpected(e) => write!(f, "unexpected store reply: {e}"),
            StoreError::Config(e) => write!(f, "store configuration: {e}"),
            StoreError::Stalled => write!(
                f,
                "store did not answer within {} s",
                STORE_TIMEOUT.as_secs()
            ),
            StoreError::Stopped => write!(f, "store unavailable: the store helper stopped"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A place update times are kept. Implementations block; they run on the helper thread only.
pub trait Store: Send + 'static {
    /// Short description for the start-up log (no secrets).
    fn describe(&self) -> String;

    /// Times changed since the previous successful fetch, or a full snapshot when the store
    /// cannot tell (first fetch, lost position, lost data).
    fn fetch(&mut self) -> Result<Fetched, StoreError>;

    /// Moves each environment's time forward to the given one (never backwards) and returns the
    /// time stored for each, in order. Returns only once the store acknowledged the write.
    fn write(&mut self, batch: &[Change]) -> Result<Vec<Micros>, StoreError>;

    /// Counters by command name, for `/metrics`.
    fn stats(&self) -> Vec<(&'static str, CommandStats)> {
        Vec::new()
    }
}

/// Identifies a write: a number the event loop gives each queue-change it sends, never reused.
pub type WriteId = u64;

/// From the event loop to the helper.
#[derive(Debug)]
pub enum Command {
    /// Fetch changes.
    Fetch,
    /// Store a time on behalf of a queue-change request.
    Write(WriteId, Change),
}

/// From the helper to the event loop.
#[derive(Debug)]
pub enum Reply {
    /// The result of a fetch.
    Fetched(Result<Fetched, StoreError>),
    /// The results of a batch of writes: the time stored for each, or why it failed.
    Written(Vec<(WriteId, Change, Result<Micros, StoreError>)>),
    /// Current command counters.
    Stats(Vec<(&'static str, CommandStats)>),
}

/// The loop's end of the helper thread.
pub struct Helper {
    tx: Option<mpsc::Sender<Command>>,
    /// Replies, to be drained when the waker fires.
    pub rx: mpsc::Receiver<Reply>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Helper {
    /// Starts the helper thread running `store`; `wake` is called after each reply is sent.
    pub fn start(
        mut store: Box<dyn Store>,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<Helper> {
        let (tx, cmd_rx) = mpsc::channel::<Command>();
        let (reply_tx, rx) = mpsc::channel();
        let thread = thread::Builder::new().name("store".into()).spawn(move || {
            // SIGTERM and SIGINT are the event loop's: they must not interrupt a store call.
            crate::sys::block_termination_signals();
            while let Ok(first) = cmd_rx.recv() {
                let mut fetch = false;
                let mut writes = Vec::new();
                let mut next = Some(first);
                while let Some(cmd) = next {
                    match cmd {
                        Command::Fetch => fetch = true,
                        Command::Write(id, change) => writes.push((id, change)),
                    }
                    next = if writes.len() < MAX_BATCH {
                        cmd_rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                let mut replies = Vec::with_capacity(3);
                if !writes.is_empty() {
                    let batch: Vec<Change> = writes.iter().map(|(_, c)| c.clone()).collect();
                    let results: Vec<Result<Micros, StoreError>> = match store.write(&batch) {
                        Ok(times) if times.len() == batch.len() => {
                            times.into_iter().map(Ok).collect()
                        }
                        Ok(_) => vec![
                            Err(StoreError::Unexpected(
                                "an answer of the wrong length for a batch".into()
                            ));
                            batch.len()
                        ],
                        Err(e) => vec![Err(e); batch.len()],
                    };
                    let done = writes
                        .into_iter()
                        .zip(results)
                        .map(|((id, c), r)| (id, c, r))
                        .collect();
                    replies.push(Reply::Written(done));
                }
                if fetch {
                    replies.push(Reply::Fetched(store.fetch()));
                }
                replies.push(Reply::Stats(store.stats()));
                for r in replies {
                    if reply_tx.send(r).is_err() {
                        return;
                    }
                }
                wake();
            }
        })?;
        Ok(Helper {
            tx: Some(tx),
            rx,
            thread: Some(thread),
        })
    }

    /// Sends a command; false when the helper has gone (it never exits on its own).
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(cmd).is_ok())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing the channel ends the helper's loop after its current batch.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
