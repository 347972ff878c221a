//! Taking clients on: accepting from the listener (a capped number per turn, its readiness
//! remembered), registering a new connection, and refusing a client with a 503 when the
//! connection limit is reached or descriptors run out (a reserve descriptor is freed for that).

use super::*;

/// Connections accepted per loop turn before other work gets a go.
const MAX_ACCEPTS_PER_TURN: usize = 512;
/// Retry delay when accepting failed for lack of descriptors (ms).
const ACCEPT_RETRY_MS: u64 = 100;

impl Server {
    /// Accepts waiting clients until the listener is drained, the per-turn cap or the turn's
    /// budget is reached, or descriptors run out.
    pub(super) fn accept(&mut self) {
        for accepted in 0..MAX_ACCEPTS_PER_TURN {
            if accepted >= MIN_ITEMS_PER_PART && self.turn_over() {
                // Still ready: more next turn.
                return;
            }
            let Some(listener) = &self.listener else {
                self.listener_ready = false;
                return;
            };
            match listener.accept() {
                Ok((sock, _)) => {
                    if self.conns.len() >= self.max_conns {
                        self.metrics.reject(Rejection::MaxConnections);
                        refuse(sock);
                        continue;
                    }
                    self.add_conn(sock);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // Free the reserve descriptor to take the client off the queue and tell it.
                    // accept(2) runs out of descriptors before it looks at the queue, so the
                    // queue may be empty: then the listener is drained, as after WouldBlock.
                    if let Some(spare) = self.spare_fd.take() {
                        drop(spare);
                        let drained = match self.listener.as_ref().map(|l| l.accept()) {
                            Some(Ok((sock, _))) => {
                                self.metrics.reject(Rejection::NoDescriptors);
                                refuse(sock);
                                false
                            }
                            Some(Err(e)) => e.kind() == io::ErrorKind::WouldBlock,
                            None => true,
                        };
                        self.spare_fd = std::fs::File::open("/dev/null").ok();
                        if drained {
                            self.listener_ready = false;
                            return;
                        }
                        if self.spare_fd.is_some() {
                            continue;
                        }
                    }
                    warn!("out of file descriptors ({e}); accepting again in {ACCEPT_RETRY_MS} ms");
                    self.accept_retry_at = self.now() + ACCEPT_RETRY_MS;
                    return;
                }
                Err(e) => {
                    debug!("accept: {e}");
                }
            }
        }
        // Still ready: more next turn, after the other work.
    }

    /// Registers an accepted socket as a new HTTP connection with its request deadline.
    pub(super) fn add_conn(&mut self, mut sock: TcpStream) {
        let _ = sock.set_nodelay(true);
        let token = self.conns.vacant_key();
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("register: {e}");
            return;
        }
        let now = self.now();
        let deadline = now + ms(self.cfg.request_timeout);
        let serial = self.next_serial;
        self.next_serial += 1;
        self.conns.insert(Conn {
            sock,
            serial,
            timer_at: u64::MAX,
            readable: true,
            state: State::Http(Box::new(Http::new(deadline, &self.budget))),
        });
        self.schedule(token, deadline);
        self.drive(token);
    }
}

/// Tells a client that could not be taken on to come back later, without keeping it.
fn refuse(mut sock: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 34\r\nRetry-After: 1\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{\"detail\": \"too many connections\"}";
    let _ = conn::write_all_nb(&mut sock, BUSY);
    let _ = sock.shutdown(Shutdown::Write);
    // Read what already arrived so that closing sends FIN rather than RST.
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        if !matches!(conn::read_nb(&mut sock, &mut buf), (_, Io::Done)) {
            break;
        }
    }
}
