//! How a connection ends: the closing state (write the last response, shut down writing, read
//! until the peer hangs up or [`LINGER_MS`] passes), a failed stream socket, and `close`, the one
//! place a connection is removed.

use super::*;

/// Time a closing connection gets to take its response and hang up (ms).
const LINGER_MS: u64 = 2_000;

impl Server {
    /// Writes a closing connection's last response, shuts down writing, then reads and drops
    /// input until the peer hangs up.
    pub(super) fn drive_closing(&mut self, token: usize) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let State::Closing(cl) = &mut c.state else {
            return;
        };
        if cl.out_pos < cl.out.len() {
            let (n, io) = conn::write_all_nb(&mut c.sock, &cl.out[cl.out_pos..]);
            cl.out_pos += n;
            match io {
                Io::Done => {}
                Io::WouldBlock => return,
                Io::Closed | Io::Error(_) => return self.close(token, Why::Peer),
            }
        }
        if !cl.shut {
            cl.shut = true;
            cl.out = Vec::new();
            let _ = c.sock.shutdown(Shutdown::Write);
        }
        for _ in 0..MAX_READS_PER_TURN {
            if !c.readable {
                return;
            }
            match conn::read_nb(&mut c.sock, &mut self.scratch) {
                (_, Io::Done) => {}
                (_, Io::WouldBlock) => {
                    c.readable = false;
                    return;
                }
                (_, Io::Closed | Io::Error(_)) => return self.close(token, Why::Done),
            }
        }
        let serial = c.serial;
        self.revisit.push((token, serial));
    }

    /// Turns the connection into a closing one that writes `out`, then hangs up gracefully.
    pub(super) fn linger(&mut self, token: usize, out: Vec<u8>) {
        let deadline = self.now() + LINGER_MS;
        let reason = if self.shutdown_at.is_some() {
            "shutdown"
        } else {
            "ended"
        };
        self.leave_stream(token, reason);
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.state = State::Closing(Closing {
            out,
            out_pos: 0,
            shut: false,
            deadline,
        });
        self.schedule(token, deadline);
        self.drive_closing(token);
    }

    /// Ends a stream whose socket failed. ETIMEDOUT is the kernel's TCP_USER_TIMEOUT: the
    /// reader acknowledged nothing for a keep-alive interval.
    pub(super) fn stream_failed(&mut self, token: usize, e: &io::Error) {
        if e.raw_os_error() == Some(libc::ETIMEDOUT) {
            debug!(
                "closing a stalled reader (nothing acknowledged within the keep-alive interval)"
            );
            self.metrics.reject(Rejection::Stalled);
            self.close(token, Why::Stalled);
        } else {
            debug!("stream socket: {e}");
            self.close(token, Why::Error);
        }
    }

    /// Removes connection `token`: the one place a connection ends.
    pub(super) fn close(&mut self, token: usize, why: Why) {
        self.leave_stream(token, access::why_name(why));
        if let Some(c) = self.conns.remove(token) {
            debug!("closing connection {token}: {why:?}");
            drop(c);
            // A descriptor came free: if accepting was paused for lack of them, try again now.
            self.accept_retry_at = 0;
        }
    }

    /// If connection `token` is a stream: writes its access-log line with `reason` and takes it
    /// off its environment's subscriber list.
    fn leave_stream(&mut self, token: usize, reason: &str) {
        if let Some(State::Stream(_)) = self.conns.get(token).map(|c| &c.state) {
            self.log_stream_closed(token, reason);
            self.unsubscribe(token);
        }
    }
}
