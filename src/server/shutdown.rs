//! Shutting down on SIGTERM or SIGINT: stop accepting, give every stream an end time spread
//! over the grace period, let in-flight requests finish with `Connection: close`. The walk over
//! the connections is work of the turn like any other: it visits connections while the turn's
//! budget lasts and carries on in the next turn.

use super::*;

impl Server {
    /// Stops accepting and starts the walk that ends every connection (see [`Server::end_some`]).
    pub(super) fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        info!(
            "shutting down: ending {} streams over {:?}",
            self.streams, self.cfg.shutdown_grace
        );
        self.shutdown_at = Some(self.now());
        self.listener = None;
        self.listener_ready = false;
        // No connection is added from now on, so these are all there will be.
        self.shutdown_walk = self
            .conns
            .keys()
            .filter_map(|t| self.conns.get(t).map(|c| (t, c.serial)))
            .collect();
    }

    /// Whether connections are still to be visited by the shutdown walk.
    pub(super) fn shutdown_walk_left(&self) -> bool {
        !self.shutdown_walk.is_empty()
    }

    /// Visits connections of the shutdown walk until the turn's budget is spent (after at least
    /// [`MIN_ITEMS_PER_PART`]): a stream is given its end time, a random point of the grace
    /// period counted from the signal; an idle keep-alive connection is closed; one with a
    /// request under way is closed after its response.
    pub(super) fn end_some(&mut self) {
        let Some(at) = self.shutdown_at else {
            return;
        };
        if self.shutdown_walk.is_empty() {
            return;
        }
        self.shutdown_walk_turns += 1;
        let grace = ms(self.cfg.shutdown_grace);
        let mut visited = 0;
        while let Some((token, serial)) = self.shutdown_walk.pop() {
            visited += 1;
            let end = at + if grace > 0 { self.random() % grace } else { 0 };
            if let Some(c) = self.conns.get_mut(token)
                && c.serial == serial
            {
                match &mut c.state {
                    State::Stream(s) => {
                        s.end_by(end);
                        self.schedule(token, end);
                    }
                    State::Http(h) => {
                        if h.awaiting_store || h.has_output() {
                            h.close_after = true;
                        } else if h.reader.is_idle() {
                            self.close(token, Why::Done);
                        }
                        // Otherwise a request is arriving: it is served, with `Connection:
                        // close` like every response from now on, and the connection closed
                        // after it.
                    }
                    State::Closing(_) => {}
                }
            }
            if visited >= MIN_ITEMS_PER_PART && self.turn_over() {
                return;
            }
        }
        debug!(
            "shutdown: every connection has its end (visited over {} turns)",
            self.shutdown_walk_turns
        );
    }
}
