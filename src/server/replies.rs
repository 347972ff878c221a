//! Work coming back from the store helper: fetched times, acknowledged writes, counters.

use super::*;

impl Server {
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
                    for ch in fetched.changes {
                        self.apply_time(&ch.key, ch.time, now);
                    }
                }
                Reply::Fetched(Err(e)) => {
                    self.fetch_in_flight = false;
                    if self.fetch_for_wakeup {
                        // A change is known to be waiting: do not leave it to the interval.
                        self.wakeup_retry_at = now + WAKEUP_RETRY_MS;
                    }
                    if self.store_ready || self.last_fetch_ok == 0 {
                        warn!("fetch failed: {e}");
                    }
                    self.store_ready = false;
                }
                Reply::Written(results) => {
                    // Answer every publisher first: its 200 need not wait for the fan-out.
                    let mut stored_times = Vec::with_capacity(results.len());
                    for ((token, serial), change, result) in results {
                        let out = match result {
                            Ok(stored) => {
                                self.metrics.queue_change(QueueResult::Ok);
                                stored_times.push((change.key, stored));
                                let mut body = b"{\"status\": \"ok\", \"updated_at\": ".to_vec();
                                timestamp::write_epoch_seconds(stored, &mut body);
                                body.push(b'}');
                                Ok(body)
                            }
                            Err(e) => {
                                self.metrics.queue_change(QueueResult::Unavailable);
                                warn!("queue-change for {} not stored: {e}", change.key);
                                Err(e)
                            }
                        };
                        self.finish_write(token, serial, out, now);
                    }
                    for (key, stored) in stored_times {
                        self.apply_time(&key, stored, now);
                    }
                }
                Reply::Stats(stats) => self.metrics.store_commands = stats,
            }
        }
    }

    /// Hands this turn's queue-change writes to the helper, which takes them as one batch.
    pub(super) fn flush_writes(&mut self) {
        for (id, change) in std::mem::take(&mut self.pending_writes) {
            if !self.helper.send(Command::Write(id, change)) {
                self.metrics.queue_change(QueueResult::Unavailable);
                let now = self.now();
                let stopped = StoreError("the store helper stopped".into());
                self.finish_write(id.0, id.1, Err(stopped), now);
            }
        }
    }

    /// Answers a queue-change whose write the store finished (if the client is still there).
    pub(super) fn finish_write(
        &mut self,
        token: usize,
        serial: u64,
        out: Result<Vec<u8>, StoreError>,
        now: u64,
    ) {
        let keep_alive = self.shutdown_at.is_none();
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if c.serial != serial {
            return;
        }
        let State::Http(h) = &mut c.state else { return };
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
    }
}
