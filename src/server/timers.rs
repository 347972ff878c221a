//! The timer heap: connection and environment deadlines, what a connection's deadline brings
//! (request timeout, idle keep-alive, linger, a stream's keep-alive, age limit or stall), and
//! when the next store fetch starts (interval, wake-ups, retries).

use super::*;

/// A deadline in the timer heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// A connection's next deadline: (token, serial).
    Conn(usize, u64),
    /// The end of an environment's coalescing window.
    Env(u32),
}

impl Server {
    /// Makes sure connection `token` is woken at `at` or earlier.
    pub(super) fn schedule(&mut self, token: usize, at: u64) {
        if let Some(c) = self.conns.get_mut(token)
            && at < c.timer_at
        {
            c.timer_at = at;
            self.timers
                .push(Reverse((at, Timer::Conn(token, c.serial))));
        }
    }

    /// Starts a fetch when the interval is due or a wake-up came, unless one is in flight. A
    /// wake-up that finds a fetch in flight waits for it: any number of them make one fetch.
    pub(super) fn schedule_fetch(&mut self, now: u64) {
        if self.wakeup_flag.swap(false, Ordering::Acquire) || now >= self.wakeup_retry_at {
            self.wakeup_pending = true;
            self.wakeup_retry_at = u64::MAX;
        }
        if self.wakeup_pending && !self.fetch_in_flight && self.helper.send(Command::Fetch) {
            self.fetch_in_flight = true;
            self.fetch_for_wakeup = true;
            self.wakeup_pending = false;
            self.metrics.fetch(FetchTrigger::Wakeup);
        }
        if now >= self.next_fetch_at {
            let interval = ms(self.cfg.cache_update_interval).max(1);
            if !self.fetch_in_flight && self.helper.send(Command::Fetch) {
                self.fetch_in_flight = true;
                self.fetch_for_wakeup = false;
                self.metrics.fetch(FetchTrigger::Interval);
            }
            // A slow fetch makes the next one skip rather than queue up.
            self.next_fetch_at = if self.next_fetch_at + interval > now {
                self.next_fetch_at + interval
            } else {
                now + interval
            };
        }
    }

    /// Fires the deadlines due (while the turn's budget lasts), times out writes at the store
    /// and starts a fetch when one is due.
    pub(super) fn run_timers(&mut self) {
        let now = self.now();
        self.expire_writes(now);
        self.schedule_fetch(now);
        let mut fired = 0;
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now || (fired >= MIN_ITEMS_PER_PART && self.turn_over()) {
                // Deadlines still due keep the next poll from sleeping.
                break;
            }
            fired += 1;
            self.timers.pop();
            match timer {
                Timer::Conn(token, serial) => {
                    let Some(c) = self.conns.get_mut(token) else {
                        continue;
                    };
                    if c.serial != serial || c.timer_at != at {
                        continue;
                    }
                    c.timer_at = u64::MAX;
                    self.conn_timer(token, now);
                }
                Timer::Env(id) => {
                    let Some(env) = self.envs.get_mut(id as usize) else {
                        continue;
                    };
                    if env.timer_at != at {
                        continue;
                    }
                    env.timer_at = u64::MAX;
                    if env.pending {
                        self.broadcast(id, now);
                    }
                }
            }
        }
    }

    /// Acts on connection `token`'s deadline, by its state.
    pub(super) fn conn_timer(&mut self, token: usize, now: u64) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        match &mut c.state {
            State::Http(h) => {
                if h.awaiting_store {
                    return;
                }
                if now < h.deadline {
                    let at = h.deadline;
                    self.schedule(token, at);
                } else if h.served > 0 && h.reader.is_idle() && !h.has_output() {
                    self.close(token, Why::Done);
                } else if h.has_output() {
                    self.close(token, Why::Deadline);
                } else {
                    self.metrics.reject(Rejection::Timeout);
                    self.fail(token, &HttpError::Timeout);
                }
            }
            State::Closing(cl) => {
                if now >= cl.deadline {
                    self.close(token, Why::Deadline);
                } else {
                    let at = cl.deadline;
                    self.schedule(token, at);
                }
            }
            State::Stream(_) => self.stream_due(token, now),
        }
    }
}
