//! Work coming back from the store helper: fetched times, acknowledged writes, counters; and
//! what the loop does when the helper does not come back: queue-changes answered 503 after
//! [`STORE_TIMEOUT`], readiness 503 once no fetch has completed for three intervals.

use super::*;

impl Server {
    /// Takes every reply the helper has sent: fetched times are queued, acknowledged writes
    /// wait for [`Server::answer_writes`].
    pub(super) fn drain_replies(&mut self) {
        while let Ok(reply) = self.helper.rx.try_recv() {
            let now = self.now();
            match reply {
                Reply::Fetched(Ok(fetched)) => {
                    self.fetch_in_flight = false;
                    self.wakeup_retry_at = u64::MAX;
                    if !self.store_ready {
                        info!("store is available");
                    }
                    self.store_ready = true;
                    self.last_fetch_ok = now;
                    if fetched.snapshot {
                        self.metrics.fetch(FetchTrigger::Snapshot);
                        debug!(
                            "loaded a snapshot of {} environments",
                            fetched.changes.len()
                        );
                    }
                    self.queue_times(fetched.changes);
                }
                Reply::Fetched(Err(e)) => {
                    self.fetch_in_flight = false;
                    if self.fetch_for_wakeup {
                        // A change is known to be waiting: do not leave it to the interval.
                        self.wakeup_retry_at = now + WAKEUP_RETRY_MS;
                    }
                    if self.store_ready || self.last_fetch_ok == 0 {
                        warn!("fetch from {} failed: {e}", self.store_hosts);
                    }
                    self.store_ready = false;
                }
                Reply::Written(results) => {
                    self.writes_at_helper = self.writes_at_helper.saturating_sub(results.len());
                    // Answered by `answer_writes`, a budget per turn.
                    self.acknowledged.extend(results);
                }
                Reply::Stats(stats) => self.metrics.store_commands = stats,
            }
        }
    }

    /// Answers the queue-changes the store acknowledged, in the order it acknowledged them,
    /// until the turn's budget is spent (after at least [`MIN_ITEMS_PER_PART`]); the rest wait
    /// for the next turn. Every publisher in this turn is answered before its stored time joins
    /// the times from the store: its 200 need not wait for the fan-out.
    pub(super) fn answer_writes(&mut self) {
        let now = self.now();
        let mut stored_times = Vec::new();
        let mut answered = 0;
        while let Some((id, change, result)) = self.acknowledged.pop_front() {
            let stored = result.as_ref().ok().copied();
            let out = result.map(|stored| {
                let mut body = b"{\"status\": \"ok\", \"updated_at\": ".to_vec();
                timestamp::write_epoch_seconds(stored, &mut body);
                body.push(b'}');
                body
            });
            // A write answered 503 already (it took too long) is not answered again; its
            // stored time still goes to subscribers.
            if !self.finish_write(id, Some(&change.key), out, now) {
                debug!("a late store reply arrived for a queue-change answered 503");
            }
            if let Some(time) = stored {
                stored_times.push(Change {
                    key: change.key,
                    time,
                });
            }
            answered += 1;
            if answered >= MIN_ITEMS_PER_PART && self.turn_over() {
                break;
            }
        }
        self.queue_times(stored_times);
    }

    /// Whether readiness is 200: the last fetch succeeded and one completed within the last
    /// three intervals (a helper stuck inside a call answers nothing, so time decides).
    pub(super) fn ready(&self, now: u64) -> bool {
        self.store_ready && !self.fetch_stale(now)
    }

    /// No fetch has completed for three intervals.
    pub(super) fn fetch_stale(&self, now: u64) -> bool {
        now.saturating_sub(self.last_fetch_ok) > 3 * ms(self.cfg.cache_update_interval).max(1)
    }

    /// Registers a queue-change write for connection `token`: its id, and its deadline.
    pub(super) fn track_write(&mut self, token: usize, serial: u64, now: u64) -> store::WriteId {
        let id = self.next_write_id;
        self.next_write_id += 1;
        self.writes.insert(id, (token, serial));
        self.write_deadlines
            .push_back((now + ms(store::STORE_TIMEOUT), id));
        id
    }

    /// Answers 503 to queue-changes whose writes are past [`STORE_TIMEOUT`].
    pub(super) fn expire_writes(&mut self, now: u64) {
        while let Some(&(at, id)) = self.write_deadlines.front() {
            if at > now {
                break;
            }
            self.write_deadlines.pop_front();
            self.finish_write(id, None, Err(StoreError::Stalled), now);
        }
    }

    /// When the next write times out (ms), if any is waiting.
    pub(super) fn next_write_deadline(&self) -> Option<u64> {
        self.write_deadlines.front().map(|&(at, _)| at)
    }

    /// Hands this turn's queue-change writes to the helper, which takes them as one batch.
    /// While too many writes are at the helper already (it stopped answering), new ones are
    /// answered 503 at once rather than queued without bound.
    pub(super) fn flush_writes(&mut self) {
        let now = self.now();
        for (id, change) in std::mem::take(&mut self.pending_writes) {
            let err = if self.writes_at_helper >= MAX_WRITES_AT_STORE {
                StoreError::Stalled
            } else if self.helper.send(Command::Write(id, change)) {
                self.writes_at_helper += 1;
                continue;
            } else {
                StoreError::Stopped
            };
            self.finish_write(id, None, Err(err), now);
        }
    }

    /// Answers the queue-change that write `id` (for environment `key`, when known) belongs
    /// to, if it is still waiting: logs and counts the result and writes the response (if the
    /// client is still there). False when the write was answered already.
    pub(super) fn finish_write(
        &mut self,
        id: store::WriteId,
        key: Option<&str>,
        out: Result<Vec<u8>, StoreError>,
        now: u64,
    ) -> bool {
        self.log_queue_change(id, key, out.is_ok());
        let Some((token, serial)) = self.writes.remove(&id) else {
            return false;
        };
        match &out {
            Ok(_) => self.metrics.queue_change(QueueResult::Ok),
            Err(e) => {
                self.metrics.queue_change(QueueResult::Unavailable);
                warn!("queue-change not stored in {}: {e}", self.store_hosts);
            }
        }
        let keep_alive = self.shutdown_at.is_none();
        let Some(c) = self.conns.get_mut(token) else {
            return true;
        };
        if c.serial != serial {
            return true;
        }
        let State::Http(h) = &mut c.state else {
            return true;
        };
        h.awaiting_store = false;
        let keep_alive = keep_alive && !h.close_after;
        let resp = match out {
            Ok(body) => http::response(200, "application/json", "", &body, keep_alive, false),
            Err(e) => http::response(
                503,
                "application/json",
                "Retry-After: 1\r\n",
                &http::detail_json(&e.to_string()),
                keep_alive,
                false,
            ),
        };
        h.respond(&resp);
        let deadline = h.deadline;
        self.schedule(token, deadline);
        self.drive_http(token, now);
        true
    }
}
