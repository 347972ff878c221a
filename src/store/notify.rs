//! Wake-ups between instances: the listener thread that hears other instances' writes.
//!
//! Every write that moves a time forward also publishes a tiny message on [`CHANNEL`] (the
//! write script does it, in the same round trip; see [`super::redis::WRITE_SCRIPT`]). Its
//! payload is the writer's instance id, so that an instance can skip its own wake-ups: it
//! already applied the change. This module owns the other end: a thread of its own with a
//! blocking connection of its own, subscribed to the channel, that tells the event loop "fetch
//! now" through a callback (the server sets an atomic flag and wakes its `mio::Waker`).
//!
//! The listener is a shortcut, never the only path: while it reconnects, or when Redis refuses
//! it the channel, changes still arrive with the periodic fetch. It reconnects with backoff
//! (capped at [`super::redis::BACKOFF_CAP`]), trying the seed nodes in turn in a Redis Cluster,
//! and after every reconnection asks for one fetch, since wake-ups may have been missed in the
//! gap. A user that lacks the channel permission (`-NOPERM`) is logged once, as a warning, and
//! tried again only every [`NOPERM_RETRY`], silently. While idle, the connection is checked with
//! a `PING` every [`HEARTBEAT`], so that a hung node is noticed and left.

use super::redis::{CONNECT_TIMEOUT, IO_TIMEOUT};
use ::redis::{Client, RedisError, RedisResult, Value};
use log::{debug, info, warn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The Pub/Sub channel wake-ups travel on. It carries the keys' hash tag, although plain
/// `PUBLISH` ignores slots: see `docs/ARCHITECTURE.md` for why not sharded Pub/Sub.
pub const CHANNEL: &str = "{flagsmith_sse}:wake";
/// Idle time after which the listener checks its connection with a `PING`.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Wait before subscribing again after Redis refused the channel (`-NOPERM`).
pub const NOPERM_RETRY: Duration = Duration::from_secs(60);
/// A subscription that lasted this long ends the backoff; one that ends sooner counts as a
/// failed attempt, so that a connection dropped right after each subscription (by a proxy, or
/// `CLIENT KILL` in a loop) is retried with backoff, not in a tight loop.
const STABLE: Duration = Duration::from_secs(1);

/// A fresh id for this process, carried by its wake-ups: unique among instances (time and pid).
pub fn instance_id() -> String {
    format!(
        "{:x}-{:x}",
        crate::timestamp::now_micros(),
        std::process::id()
    )
}

/// The running listener; dropping it asks the thread to stop (it notices within
/// [`HEARTBEAT`], and is not waited for).
pub struct Listener {
    stop: Arc<AtomicBool>,
}

/// How one connection's life ended.
enum Ended {
    /// The listener was asked to stop.
    Stopped,
    /// Redis refused the channel to this user.
    NoPermission(RedisError),
    /// Connecting, subscribing or reading failed; `subscribed` says since when the connection
    /// had been subscribed, if it got that far.
    Failed(RedisError, Option<Instant>),
}

impl Listener {
    /// Starts the listener thread. `urls` is one `redis://` / `rediss://` URL, or for a Redis
    /// Cluster one or more comma-separated seed nodes (plain `PUBLISH` reaches every node, so
    /// any one will do). Wake-ups whose payload is `own_id` are skipped. `wake` is called for
    /// every other wake-up, and once after each reconnection.
    pub fn start(
        urls: &str,
        cluster: bool,
        own_id: String,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<Listener> {
        let seeds: Vec<&str> = if cluster {
            urls.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .collect()
        } else {
            vec![urls]
        };
        let mut clients = Vec::with_capacity(seeds.len());
        for seed in seeds {
            let client = Client::open(seed).map_err(|e| {
                std::io::Error::other(format!("{}: {e}", crate::config::redact_url(seed)))
            })?;
            clients.push((client, crate::config::url_hosts(seed)));
        }
        if clients.is_empty() {
            return Err(std::io::Error::other("no Redis node to listen on"));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                // SIGTERM and SIGINT are the event loop's: they must not land here.
                crate::sys::block_termination_signals();
                run(&clients, &own_id, &stopped, &wake);
            })?;
        Ok(Listener { stop })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sleeps for `d` in short steps; false if asked to stop meanwhile.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// The wait before the next attempt after `failures` failures in a row: none after the first
/// (a connection that dropped is replaced at once), then the store's backoff
/// ([`super::redis::BACKOFF_FIRST`] doubling up to [`super::redis::BACKOFF_CAP`]).
fn backoff(failures: u32) -> Duration {
    super::redis::backoff(failures.saturating_sub(1))
}

/// Listens until asked to stop, going round `clients` (each with its `host:port` for log lines)
/// after each failure.
fn run(clients: &[(Client, String)], own_id: &str, stop: &AtomicBool, wake: &dyn Fn()) {
    // Failed attempts in a row (a subscription shorter than STABLE counts as one).
    let mut failures: u32 = 0;
    let mut next = 0;
    let mut subscribed_before = false;
    let mut refused_before = false;
    loop {
        let Some((client, host)) = clients.get(next % clients.len()) else {
            return;
        };
        let mut on_subscribed = || {
            if subscribed_before {
                info!("listening for wake-ups on {CHANNEL} again at {host}");
                // Wake-ups may have been published while this connection was down.
                wake();
            } else {
                info!("listening for wake-ups on {CHANNEL} at {host}");
            }
            subscribed_before = true;
            refused_before = false;
        };
        match listen(client, own_id, stop, wake, &mut on_subscribed) {
            Ended::Stopped => return,
            Ended::NoPermission(e) => {
                if !refused_before {
                    refused_before = true;
                    warn!(
                        "Redis refused the wake-up channel {CHANNEL} on {host} ({e}); changes from \
                         other instances arrive with the periodic fetch only. Allow the channel in \
                         the ACL (&{CHANNEL} or allchannels, with +publish +subscribe)"
                    );
                }
                if !pause(NOPERM_RETRY, stop) {
                    return;
                }
            }
            Ended::Failed(e, subscribed) => {
                if subscribed.is_some_and(|at| at.elapsed() >= STABLE) {
                    failures = 0;
                }
                failures = failures.saturating_add(1);
                next += 1;
                if failures == 1 {
                    warn!("wake-up listener lost its Redis connection to {host}: {e}");
                } else {
                    debug!(
                        "wake-up listener still not connected to {host} ({failures} failures): {e}"
                    );
                }
                if !pause(backoff(failures), stop) {
                    return;
                }
            }
        }
    }
}

/// One connection: subscribe, then pass wake-ups on until something fails.
fn listen(
    client: &Client,
    own_id: &str,
    stop: &AtomicBool,
    wake: &dyn Fn(),
    on_subscribed: &mut dyn FnMut(),
) -> Ended {
    if stop.load(Ordering::Relaxed) {
        return Ended::Stopped;
    }
    let setup = || -> RedisResult<::redis::Connection> {
        let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(conn)
    };
    let mut conn = match setup() {
        Ok(c) => c,
        Err(e) => return Ended::Failed(e, None),
    };
    // SUBSCRIBE as a plain command, so that a refusal comes back as an error to look at.
    match ::redis::cmd("SUBSCRIBE")
        .arg(CHANNEL)
        .query::<Value>(&mut conn)
    {
        Ok(Value::ServerError(e)) => {
            let e = RedisError::from(e);
            return if is_noperm(&e) {
                Ended::NoPermission(e)
            } else {
                Ended::Failed(e, None)
            };
        }
        Ok(_) => {}
        Err(e) if is_noperm(&e) => return Ended::NoPermission(e),
        Err(e) => return Ended::Failed(e, None),
    }
    on_subscribed();
    let since = Some(Instant::now());
    if let Err(e) = conn.set_read_timeout(Some(HEARTBEAT)) {
        return Ended::Failed(e, since);
    }
    let mut pubsub = conn.as_pubsub();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ended::Stopped;
        }
        match pubsub.get_message() {
            Ok(msg) => {
                if msg.get_channel_name() != CHANNEL {
                    continue;
                }
                match msg.get_payload_bytes() {
                    p if p == own_id.as_bytes() => {}
                    _ => wake(),
                }
            }
            // Quiet for a heartbeat: is the node still there? (A PING reply is read within
            // the same timeout; messages that come before it are kept for the next read.)
            Err(e) if e.is_timeout() => {
                if let Err(e) = pubsub.ping::<Value>() {
                    return Ended::Failed(e, since);
                }
            }
            Err(e) => return Ended::Failed(e, since),
        }
    }
}

fn is_noperm(e: &RedisError) -> bool {
    e.code() == Some("NOPERM")
}

#[cfg(test)]
mod tests {
    use super::super::redis::BACKOFF_CAP;
    use super::*;

    #[test]
    fn backoff_retries_at_once_then_doubles_up_to_the_cap() {
        let waits: Vec<u128> = (0..=9).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [0, 0, 100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn instance_ids_differ_over_time() {
        let a = instance_id();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && instance_id() == a {
            thread::yield_now();
        }
        assert_ne!(instance_id(), a);
        assert!(a.ends_with(&format!("-{:x}", std::process::id())));
    }

    #[test]
    fn the_write_script_publishes_on_the_channel() {
        assert!(super::super::redis::WRITE_SCRIPT.contains(&format!("'{CHANNEL}'")));
    }
}
