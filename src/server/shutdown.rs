//! Shutting down on SIGTERM or SIGINT: stop accepting, give every stream an end time spread
//! over the grace period, let in-flight requests finish with `Connection: close`.

use super::*;

impl Server {
    pub(super) fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        let now = self.now();
        info!(
            "shutting down: ending {} streams over {:?}",
            self.streams, self.cfg.shutdown_grace
        );
        self.shutdown_at = Some(now);
        self.listener = None;
        self.listener_ready = false;
        let grace = ms(self.cfg.shutdown_grace);
        let tokens: Vec<usize> = self.conns.keys().collect();
        for token in tokens {
            let end = now + if grace > 0 { self.random() % grace } else { 0 };
            let Some(c) = self.conns.get_mut(token) else {
                continue;
            };
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
                    // Otherwise a request is arriving: it is served, with `Connection: close`
                    // like every response from now on, and the connection closed after it.
                }
                State::Closing(_) => {}
            }
        }
    }
}
