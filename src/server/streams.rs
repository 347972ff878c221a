//! Environments and their subscribers: subscribing and leaving, coalescing, times from the
//! store, and fan-out.
//!
//! Nothing here writes to every subscriber at once. A broadcast starts (or redirects) a fan-out:
//! an entry in the server's queue that walks the environment's subscriber list for at most
//! [`FANOUT_SLICE`] per loop turn, always with the environment's newest event, and carries on
//! in the next turn. Times from the store wait in a queue of their own and are applied while the
//! turn's budget lasts. A stream's own decisions (what follows a write, keep-alives, age limit,
//! stalls) are [`Stream`]'s; the server only acts on them here.

use super::*;
use crate::conn::{Due, Next};
use std::collections::VecDeque;

/// Longest a fan-out writes to subscribers in one loop turn; then the loop polls (with a zero
/// timeout) and the fan-out carries on in the next turn.
pub(super) const FANOUT_SLICE: Duration = Duration::from_millis(1);
/// Subscribers visited between two looks at the clock during a fan-out.
const FANOUT_CLOCK_EVERY: usize = 16;
/// Input a subscriber may send after its request before it is disconnected.
const MAX_STREAM_INPUT: usize = 4 * 1024;
/// Store times applied between two looks at the clock.
const TIMES_CLOCK_EVERY: usize = 64;

/// A fan-out under way: how far it has walked the environment's subscriber list.
pub(super) struct Fan {
    /// The next position to visit. Every subscriber before it was visited in this pass, every
    /// one at or after it was not; `unsubscribe` keeps both true.
    next: usize,
    /// A newer time arrived after this pass began: once it reaches the end, a pass from the
    /// start follows, for the subscribers passed with the older time.
    again: bool,
    /// When the current time's fan-out began, for the duration histogram.
    started: Instant,
}

/// Work that waits for its turn: fan-outs under way, and times from the store not yet applied.
#[derive(Default)]
pub(super) struct Backlog {
    /// Environments with a fan-out under way, in the order they started.
    fanouts: VecDeque<u32>,
    /// Batches of times from the store (a snapshot, a page of changes, stored writes), in the
    /// order they arrived.
    times: VecDeque<std::vec::IntoIter<Change>>,
}

impl Backlog {
    /// Whether work is left for the next turn.
    pub(super) fn is_empty(&self) -> bool {
        self.fanouts.is_empty() && self.times.is_empty()
    }
}

impl Server {
    /// Writes what a subscriber has queued and acts on what the stream says follows.
    pub(super) fn flush_stream(&mut self, token: usize, now: u64) {
        let keepalive = ms(self.cfg.keepalive);
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let State::Stream(s) = &mut c.state else {
            return;
        };
        let next = s.write(&mut c.sock, now, c.serial, keepalive);
        self.after_write(token, next);
    }

    fn after_write(&mut self, token: usize, next: Next) {
        match next {
            Next::WakeAt(at) => self.schedule(token, at),
            Next::Finished => self.linger(token, Vec::new()),
            Next::Gone => self.close(token, Why::Peer),
            Next::Failed(e) => self.stream_failed(token, &e),
        }
    }

    /// A stream's deadline passed: let it work out what is due, then act on it.
    pub(super) fn stream_due(&mut self, token: usize, now: u64) {
        let keepalive = ms(self.cfg.keepalive);
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let State::Stream(s) = &mut c.state else {
            return;
        };
        match s.due(&c.sock, now, c.serial, keepalive) {
            Due::Stalled(pending) => {
                debug!("closing a stalled reader ({pending} bytes pending)");
                self.metrics.reject(Rejection::Stalled);
                self.close(token, Why::Stalled);
            }
            Due::Write { pinged } => {
                if pinged {
                    self.metrics.pings_sent_total += 1;
                }
                self.flush_stream(token, now);
            }
        }
    }

    pub(super) fn env_id(&mut self, key: &str, now: u64) -> u32 {
        if let Some(&id) = self.env_ids.get(key) {
            return id;
        }
        let id = self.envs.insert(Env {
            key: key.into(),
            time: None,
            event: None,
            subs: Vec::new(),
            window_end: now,
            pending: false,
            timer_at: u64::MAX,
            fan: None,
        }) as u32;
        self.env_ids.insert(key.into(), id);
        id
    }

    pub(super) fn subscribe(&mut self, token: usize, key: &str, chunked: bool, now: u64) {
        let env_id = self.env_id(key, now);
        let end_at = match self.cfg.max_stream_age {
            None => u64::MAX,
            Some(age) => {
                let age = ms(age);
                let spread = age / 5;
                let jitter = if spread > 0 {
                    self.random() % (spread + 1)
                } else {
                    0
                };
                now + age - age / 10 + jitter
            }
        };
        let Some(env) = self.envs.get_mut(env_id as usize) else {
            return;
        };
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let _ = sys::set_send_buffer(&c.sock, STREAM_SNDBUF);
        // A reader that acknowledges nothing for a keep-alive interval (closed window included)
        // is dropped by the kernel; output stuck in user space is watched by the stall mark.
        let _ = sys::set_user_timeout(&c.sock, ms(self.cfg.keepalive));
        let pos = env.subs.len() as u32;
        env.subs.push(token);
        let mut s = Stream::new(env_id, pos, chunked, now, end_at);
        // The newest time, even one a coalescing window holds back or a fan-out has not
        // reached yet: a fan-out under way skips this subscriber, which has it.
        if let Some(t) = env.time {
            let ev = env.event.get_or_insert_with(|| Event::new(t));
            if ev.time != t {
                *ev = Event::new(t);
            }
            if s.offer(ev) {
                self.metrics.events_sent_total += 1;
            }
        }
        c.state = State::Stream(s);
        self.log_stream_open(token);
        self.streams += 1;
        self.metrics.subscribers_total += 1;
        self.flush_stream(token, now);
    }

    /// Removes a stream connection from its environment's subscriber list.
    ///
    /// A plain swap-remove moves the last subscriber into the gap. While a fan-out walks the
    /// list, a gap before its position would move a subscriber it has not visited into the part
    /// it has, and it would be skipped: so the gap is first swapped with the last visited
    /// subscriber, and the fan-out's position steps back by one onto the one moved in.
    pub(super) fn unsubscribe(&mut self, token: usize) {
        let Some(c) = self.conns.get(token) else {
            return;
        };
        let State::Stream(s) = &c.state else { return };
        let (env_id, pos) = (s.env(), s.pos());
        self.streams -= 1;
        let Some(env) = self.envs.get_mut(env_id as usize) else {
            return;
        };
        if env.subs.get(pos) == Some(&token) {
            let mut gap = pos;
            if let Some(fan) = env.fan.as_mut()
                && pos < fan.next
            {
                fan.next -= 1;
                env.subs.swap(pos, fan.next);
                gap = fan.next;
            }
            env.subs.swap_remove(gap);
            for p in [pos, gap] {
                if let Some(&moved) = env.subs.get(p)
                    && let Some(State::Stream(ms)) = self.conns.get_mut(moved).map(|c| &mut c.state)
                {
                    ms.set_pos(p);
                }
            }
        }
        if env.subs.is_empty() && env.time.is_none() {
            let key = env.key.clone();
            self.env_ids.remove(&key);
            self.envs.remove(env_id as usize);
        }
    }

    /// Queues a batch of times from the store; they are applied in order, a budget per turn.
    pub(super) fn queue_times(&mut self, batch: Vec<Change>) {
        if !batch.is_empty() {
            self.backlog.times.push_back(batch.into_iter());
        }
    }

    /// Applies queued times from the store until the turn's budget is spent.
    pub(super) fn apply_times(&mut self, now: u64) {
        let mut applied = 0usize;
        while let Some(batch) = self.backlog.times.front_mut() {
            let Some(ch) = batch.next() else {
                self.backlog.times.pop_front();
                continue;
            };
            self.apply_time(&ch.key, ch.time, now);
            applied += 1;
            if applied.is_multiple_of(TIMES_CLOCK_EVERY) && self.turn_over() {
                return;
            }
        }
    }

    /// Records a newer time for `key` and sends it, now or at the end of the coalescing window.
    pub(super) fn apply_time(&mut self, key: &str, time: Micros, now: u64) {
        let id = self.env_id(key, now);
        let delay = ms(self.cfg.stream_delay);
        let Some(env) = self.envs.get_mut(id as usize) else {
            return;
        };
        if env.time.is_some_and(|t| t >= time) {
            return;
        }
        env.time = Some(time);
        if delay == 0 || now >= env.window_end {
            env.window_end = now + delay;
            self.broadcast(id, now);
        } else {
            env.pending = true;
            if env.timer_at != env.window_end {
                env.timer_at = env.window_end;
                self.timers.push(Reverse((env.window_end, Timer::Env(id))));
            }
        }
    }

    /// Starts sending the environment's newest time to every subscriber that has not had it.
    /// With a fan-out already under way, that one carries on with the newer event, and goes
    /// over the subscribers it had passed once more.
    pub(super) fn broadcast(&mut self, id: u32, now: u64) {
        let delay = ms(self.cfg.stream_delay);
        let Some(env) = self.envs.get_mut(id as usize) else {
            return;
        };
        let Some(time) = env.time else { return };
        env.pending = false;
        env.window_end = now + delay;
        if env.subs.is_empty() {
            return;
        }
        env.event = Some(Event::new(time));
        match env.fan.as_mut() {
            Some(fan) => {
                // The older time's fan-out ends here: its last write is behind us.
                self.metrics.fanout(fan.started.elapsed().as_secs_f64());
                fan.started = Instant::now();
                fan.again |= fan.next > 0;
            }
            None => {
                env.fan = Some(Fan {
                    next: 0,
                    again: false,
                    started: Instant::now(),
                });
                self.backlog.fanouts.push_back(id);
            }
        }
    }

    /// Works on the fan-outs under way, oldest first, for at most [`FANOUT_SLICE`]. Each
    /// subscriber is offered the environment's newest event (it takes it only if it is newer
    /// than what it has) and written to once; a write that would block or fails is acted on at
    /// once, like any other write.
    pub(super) fn fan_out(&mut self, now: u64) {
        let until = Instant::now() + FANOUT_SLICE;
        let keepalive = ms(self.cfg.keepalive);
        let mut visited = 0usize;
        while let Some(&id) = self.backlog.fanouts.front() {
            let env = self.envs.get_mut(id as usize);
            let Some((fan, event, subs)) =
                env.and_then(|e| Some((e.fan.as_mut()?, e.event.as_ref()?, &e.subs)))
            else {
                if let Some(e) = self.envs.get_mut(id as usize) {
                    e.fan = None;
                }
                self.backlog.fanouts.pop_front();
                continue;
            };
            let Some(&token) = subs.get(fan.next) else {
                if fan.again {
                    fan.again = false;
                    fan.next = 0;
                    continue;
                }
                let took = fan.started.elapsed();
                if let Some(e) = self.envs.get_mut(id as usize) {
                    e.fan = None;
                }
                self.backlog.fanouts.pop_front();
                self.metrics.fanout(took.as_secs_f64());
                continue;
            };
            visited += 1;
            if visited.is_multiple_of(FANOUT_CLOCK_EVERY) && Instant::now() >= until {
                return;
            }
            fan.next += 1;
            let Some(c) = self.conns.get_mut(token) else {
                continue;
            };
            let State::Stream(s) = &mut c.state else {
                continue;
            };
            if !s.offer(event) {
                continue;
            }
            self.metrics.events_sent_total += 1;
            let next = s.write(&mut c.sock, now, c.serial, keepalive);
            self.after_write(token, next);
        }
    }

    /// Reads and drops what a subscriber sends; EOF or an error ends the stream, and so does
    /// more than [`MAX_STREAM_INPUT`] bytes (a stream client has nothing more to say).
    pub(super) fn discard_input(&mut self, token: usize) {
        for _ in 0..MAX_READS_PER_TURN {
            let Some(c) = self.conns.get_mut(token) else {
                return;
            };
            if !c.readable {
                return;
            }
            match conn::read_nb(&mut c.sock, &mut self.scratch) {
                (n, Io::Done) => {
                    if !self.stray_input(token, n) {
                        return;
                    }
                }
                (_, Io::WouldBlock) => c.readable = false,
                (_, Io::Closed) => return self.close(token, Why::Peer),
                (_, Io::Error(e)) => return self.stream_failed(token, &e),
            }
        }
        if let Some(c) = self.conns.get(token) {
            self.revisit.push((token, c.serial));
        }
    }

    /// Counts `n` bytes a subscriber sent after its request; past [`MAX_STREAM_INPUT`] the
    /// stream is closed (and false returned).
    pub(super) fn stray_input(&mut self, token: usize, n: usize) -> bool {
        let Some(State::Stream(s)) = self.conns.get_mut(token).map(|c| &mut c.state) else {
            return false;
        };
        let sent = s.stray_input(n);
        if sent as usize <= MAX_STREAM_INPUT {
            return true;
        }
        debug!("closing a stream whose client sent {sent} bytes after its request");
        self.metrics.reject(Rejection::StreamInput);
        self.close(token, Why::Peer);
        false
    }
}
