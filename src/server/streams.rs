//! Environments and their subscribers: subscribing, coalescing, and writing one encoded
//! update to every subscriber.

use super::*;

impl Server {
    /// Writes what a subscriber has queued and handles the outcome.
    pub(super) fn flush_stream(&mut self, token: usize, now: u64) {
        let keepalive = ms(self.cfg.keepalive);
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let State::Stream(s) = &mut c.state else {
            return;
        };
        match s.flush(&mut c.sock, now) {
            Io::Done if s.finished => self.linger(token, Vec::new()),
            Io::Done => {
                let mut at = ping_due(s.last_write, c.serial, keepalive);
                if !s.ending {
                    at = at.min(s.end_at);
                }
                if let Some((t0, _)) = s.stall_mark {
                    at = at.min(t0 + keepalive);
                }
                self.schedule(token, at);
            }
            Io::WouldBlock => {
                let since = match s.stall_mark {
                    Some((t0, _)) => t0,
                    None => {
                        let queued = sys::unacked_bytes(&c.sock).unwrap_or(0) as u64;
                        s.stall_mark = Some((now, s.written.saturating_sub(queued)));
                        now
                    }
                };
                // The stall check is due a keep-alive interval after the stall began, not
                // after this attempt: a later attempt must not push it back.
                let at = (since + keepalive).min(if s.ending { u64::MAX } else { s.end_at });
                self.schedule(token, at);
            }
            Io::Closed => self.close(token, Why::Peer),
            Io::Error(e) => self.stream_failed(token, &e),
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
        let mut s = Stream {
            env: env_id,
            pos,
            chunked,
            ending: false,
            last_sent: Micros::MIN,
            out: Some((Piece::Head, 0)),
            next: None,
            last_write: now,
            end_at,
            written: 0,
            stall_mark: None,
            finished: false,
            opened: now,
        };
        if let Some(t) = env.time {
            let ev = env.event.get_or_insert_with(|| Event::new(t));
            if ev.time != t {
                *ev = Event::new(t);
            }
            s.enqueue(Piece::Event(ev.clone()));
            s.last_sent = t;
            self.metrics.events_sent_total += 1;
        }
        c.state = State::Stream(s);
        self.log_stream_open(token);
        self.streams += 1;
        self.metrics.subscribers_total += 1;
        self.flush_stream(token, now);
    }

    /// Removes a stream connection from its environment's subscriber list.
    pub(super) fn unsubscribe(&mut self, token: usize) {
        let Some(c) = self.conns.get(token) else {
            return;
        };
        let State::Stream(s) = &c.state else { return };
        let (env_id, pos) = (s.env, s.pos as usize);
        self.streams -= 1;
        let Some(env) = self.envs.get_mut(env_id as usize) else {
            return;
        };
        if env.subs.get(pos) == Some(&token) {
            env.subs.swap_remove(pos);
            if let Some(&moved) = env.subs.get(pos)
                && let Some(State::Stream(ms)) = self.conns.get_mut(moved).map(|c| &mut c.state)
            {
                ms.pos = pos as u32;
            }
        }
        if env.subs.is_empty() && env.time.is_none() {
            let key = env.key.clone();
            self.env_ids.remove(&key);
            self.envs.remove(env_id as usize);
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

    /// Writes the environment's newest time to every subscriber that has not had it.
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
        let started = Instant::now();
        let event = Event::new(time);
        env.event = Some(event.clone());
        let mut troubled = Vec::new();
        for &token in &env.subs {
            let Some(c) = self.conns.get_mut(token) else {
                continue;
            };
            let State::Stream(s) = &mut c.state else {
                continue;
            };
            if s.last_sent >= time || s.ending {
                continue;
            }
            s.last_sent = time;
            s.enqueue(Piece::Event(event.clone()));
            self.metrics.events_sent_total += 1;
            match s.flush(&mut c.sock, now) {
                Io::Done => {}
                _ => troubled.push(token),
            }
        }
        self.metrics.fanout(started.elapsed().as_secs_f64());
        // Sockets that would block or failed: the usual path sorts them out (stall marks,
        // closing) once the iteration over the subscriber list is over.
        for token in troubled {
            self.flush_stream(token, now);
        }
    }
}
