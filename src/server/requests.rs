//! Requests on HTTP connections: stepping the reader, refusing early, routing and answering.

use super::*;

impl Server {
    /// Answers a refused request and closes the connection.
    pub(super) fn fail(&mut self, token: usize, e: &HttpError) {
        debug!("refusing a request: {e}");
        match e {
            HttpError::BadRequest(_)
            | HttpError::HeadersTooLarge
            | HttpError::VersionNotSupported => self.metrics.reject(Rejection::BadRequest),
            HttpError::Busy => self.metrics.reject(Rejection::RequestBudget),
            _ => {}
        }
        self.refuse(token, &http::error_response(e));
    }

    /// Answers with `response` (after anything already queued) and closes the connection.
    fn refuse(&mut self, token: usize, response: &[u8]) {
        self.log_refusal(token, response);
        let mut out = Vec::new();
        if let Some(State::Http(h)) = self.conns.get_mut(token).map(|c| &mut c.state) {
            // Anything already queued (an earlier pipelined response) goes first.
            out = std::mem::take(&mut h.out);
            out.drain(..h.out_pos.min(out.len()));
        }
        out.extend_from_slice(response);
        self.linger(token, out);
    }

    /// Works through a connection's requests: reads, parses, answers, until it must wait.
    ///
    /// Bytes are read into the shared scratch buffer and parsed there; only what is left over
    /// when the connection must wait (a partial head, input behind a queue-change at the store)
    /// is copied into the connection's reader. The responses to the requests of one read are
    /// gathered and written together.
    pub(super) fn drive_http(&mut self, token: usize, now: u64) {
        // The part of `self.scratch` read for this connection and not parsed yet.
        let mut input = 0..0;
        for _ in 0..MAX_STEPS_PER_TURN {
            let Some(c) = self.conns.get_mut(token) else {
                return;
            };
            let step = http_step(c, &mut self.scratch, &mut input);
            match step {
                Step::Wait => return self.keep_input(token, input),
                Step::Again => {
                    if let Some(State::Http(h)) = self.conns.get_mut(token).map(|c| &mut c.state) {
                        h.started.get_or_insert(now);
                    }
                }
                Step::Close(why) => return self.close(token, why),
                Step::Finish => return self.linger(token, Vec::new()),
                Step::Fail(e) => {
                    if e == HttpError::PayloadTooLarge {
                        self.metrics.queue_change(QueueResult::TooLarge);
                    }
                    return self.fail(token, &e);
                }
                Step::Head => self.check_head(token, input.len()),
                Step::Request(head, body) => {
                    self.dispatch(token, &head, &body, now);
                    let timeout = ms(self.cfg.request_timeout);
                    let closing = self.shutdown_at.is_some();
                    match self.conns.get_mut(token) {
                        Some(Conn {
                            state: State::Http(h),
                            ..
                        }) => {
                            h.served += 1;
                            h.continued = false;
                            h.deadline = now + timeout;
                            if !head.keep_alive || closing {
                                h.close_after = true;
                            }
                            if !h.awaiting_store {
                                self.schedule(token, now + timeout);
                            }
                        }
                        Some(Conn {
                            state: State::Stream(_),
                            ..
                        }) => {
                            // Pipelined after a subscription: the stream's first stray input.
                            let stray = input.len();
                            input = 0..0;
                            if !self.stray_input(token, stray) {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.keep_input(token, input);
        if let Some(c) = self.conns.get(token) {
            self.revisit.push((token, c.serial));
        }
    }

    /// Hands input read but not parsed to the connection's reader, before the scratch buffer
    /// is used for another connection.
    fn keep_input(&mut self, token: usize, input: std::ops::Range<usize>) {
        if input.is_empty() {
            return;
        }
        if let Some(State::Http(h)) = self.conns.get_mut(token).map(|c| &mut c.state) {
            h.reader.push(self.scratch.get(input).unwrap_or(&[]));
        }
    }

    /// A queue-change head arrived and its body has not been read: refuse at once a request
    /// without the right token, and send `100 Continue` when the client waits for it.
    /// `arrived` is how many bytes after the head are at hand besides those the reader holds.
    pub(super) fn check_head(&mut self, token: usize, arrived: usize) {
        let Some(State::Http(h)) = self.conns.get_mut(token).map(|c| &mut c.state) else {
            return;
        };
        let Some(head) = &h.reader.head else { return };
        // Only a queue-change gets this far (the reader refuses a body anywhere else); its
        // body is read only with the right token, unless it is all here already (then the
        // 401 comes after it and the connection stays usable).
        let arrived = arrived + h.reader.buffered();
        let at_hand = matches!(head.body, BodyFraming::Length(n) if arrived >= n);
        if !http::authorized(head.authorization.as_deref(), &self.cfg.token.0) && !at_hand {
            self.metrics.queue_change(QueueResult::Unauthorized);
            return self.refuse(token, &unauthorized(false));
        }
        if head.expect_continue && !h.continued {
            h.continued = true;
            h.respond(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
    }

    pub(super) fn dispatch(&mut self, token: usize, head: &Head, body: &[u8], now: u64) {
        let keep_alive = head.keep_alive && self.shutdown_at.is_none();
        let head_only = head.method == Method::Head;
        let json = |status: u16, extra: &str, body: &[u8]| {
            http::response(
                status,
                "application/json",
                extra,
                body,
                keep_alive,
                head_only,
            )
        };
        let out = match (&head.route, head.method) {
            (Route::NotFound, _) => json(404, "", &http::detail_json("not found")),
            (Route::Asterisk, _) => http::response(
                200,
                "text/plain",
                &format!("Allow: {}\r\n", head.route.allow()),
                b"",
                keep_alive,
                true,
            ),
            (route, Method::Options) => {
                let allow_headers = head
                    .cors_request_headers
                    .as_deref()
                    .filter(|h| h.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
                    .unwrap_or("Authorization, Content-Type, Cache-Control, Last-Event-ID");
                let extra = format!(
                    "Allow: {0}\r\nAccess-Control-Allow-Methods: {0}\r\nAccess-Control-Allow-Headers: {allow_headers}\r\nAccess-Control-Max-Age: 86400\r\n",
                    route.allow()
                );
                http::response(204, "text/plain", &extra, b"", keep_alive, true)
            }
            (route, m) if !route.allows(m) => json(
                405,
                &format!("Allow: {}\r\n", route.allow()),
                &http::detail_json("method not allowed"),
            ),
            (Route::Liveness, _) => json(200, "", b"{\"status\": \"ok\"}"),
            (Route::Readiness, _) => {
                if self.ready(now) {
                    json(200, "", b"{\"status\": \"ok\"}")
                } else {
                    json(
                        503,
                        "Retry-After: 1\r\n",
                        &http::detail_json("store unavailable"),
                    )
                }
            }
            (Route::Metrics, _) => {
                let text = self.metrics.render(&self.gauges(now));
                http::response(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    "",
                    text.as_bytes(),
                    keep_alive,
                    head_only,
                )
            }
            (Route::AdminEnvironments, _) => {
                if http::authorized(head.authorization.as_deref(), &self.cfg.token.0) {
                    json(
                        200,
                        "Cache-Control: no-store\r\n",
                        &self.admin_environments(),
                    )
                } else {
                    unauthorized(keep_alive)
                }
            }
            (Route::Stream(key), _) => {
                if self.shutdown_at.is_some() {
                    json(
                        503,
                        "Retry-After: 1\r\n",
                        &http::detail_json("shutting down"),
                    )
                } else if self.fetch_stale(now) {
                    self.metrics.reject(Rejection::StoreUnavailable);
                    json(
                        503,
                        "Retry-After: 1\r\n",
                        &http::detail_json("store unavailable"),
                    )
                } else {
                    return self.subscribe(token, key, head.minor == 1, now);
                }
            }
            (Route::QueueChange(key), _) => {
                if !http::authorized(head.authorization.as_deref(), &self.cfg.token.0) {
                    self.metrics.queue_change(QueueResult::Unauthorized);
                    unauthorized(keep_alive)
                } else {
                    match crate::json::parse_queue_change(body) {
                        Err(e) => {
                            self.metrics.queue_change(QueueResult::BadRequest);
                            json(400, "", &http::detail_json(&e.to_string()))
                        }
                        Ok(time) if self.too_far_ahead(time) => {
                            self.metrics.queue_change(QueueResult::BadRequest);
                            let secs = self.cfg.max_future.map_or(0, |d| d.as_secs());
                            let detail = format!("updated_at is more than {secs} s in the future");
                            json(400, "", &http::detail_json(&detail))
                        }
                        Ok(time) => {
                            let Some(c) = self.conns.get_mut(token) else {
                                return;
                            };
                            let change = Change {
                                key: key.clone(),
                                time,
                            };
                            if let State::Http(h) = &mut c.state {
                                h.awaiting_store = true;
                                h.log_path.clone_from(&head.log_path);
                            }
                            let serial = c.serial;
                            let id = self.track_write(token, serial, now);
                            self.pending_writes.push((id, change));
                            return;
                        }
                    }
                }
            }
        };
        if let Some(State::Http(h)) = self.conns.get_mut(token).map(|c| &mut c.state) {
            h.respond(&out);
            let started = h.started.take().unwrap_or(now);
            self.log_request(token, head, &out, started);
        }
    }

    /// Whether a queue-change time is further ahead of this server's clock than
    /// `MAX_FUTURE_SECONDS` allows.
    fn too_far_ahead(&self, time: Micros) -> bool {
        self.cfg.max_future.is_some_and(|max| {
            let limit = i64::try_from(max.as_micros()).unwrap_or(i64::MAX);
            time > timestamp::now_micros().saturating_add(limit)
        })
    }

    pub(super) fn gauges(&self, now: u64) -> Gauges {
        Gauges {
            subscribers_active: self.streams,
            connections_open: self.conns.len(),
            environments_cached: self.env_ids.len(),
            last_fetch_age_seconds: now.saturating_sub(self.last_fetch_ok) as f64 / 1000.0,
            store_ready: self.ready(now),
        }
    }
}

/// The 401 answer to a queue-change without the right token.
fn unauthorized(keep_alive: bool) -> Vec<u8> {
    http::response(
        401,
        "application/json",
        "WWW-Authenticate: Token\r\n",
        b"{\"detail\": \"Invalid authorization header\"}",
        keep_alive,
        false,
    )
}

/// What one step of request processing came to.
enum Step {
    /// Nothing more to do until the socket is ready again.
    Wait,
    /// Progress was made; step again.
    Again,
    /// A head is complete and its body is not.
    Head,
    /// A whole request.
    Request(Head, Vec<u8>),
    /// Refuse with an error response, then close.
    Fail(HttpError),
    /// The last response is out: hang up gracefully.
    Finish,
    /// Close now.
    Close(Why),
}

/// Writes the responses `h` has gathered: `None` once all of them are out, else the step that
/// ends this one (wait for the socket, or close).
fn flush_step(h: &mut Http, sock: &mut TcpStream) -> Option<Step> {
    match h.flush(sock) {
        Io::Done => None,
        Io::WouldBlock => Some(Step::Wait),
        Io::Closed => Some(Step::Close(Why::Peer)),
        Io::Error(e) => {
            debug!("write: {e}");
            Some(Step::Close(Why::Error))
        }
    }
}

/// One step of an HTTP connection: parse the input at hand, write the responses gathered, or
/// read more. `input` is the part of `scratch` not parsed yet.
fn http_step(c: &mut Conn, scratch: &mut [u8], input: &mut std::ops::Range<usize>) -> Step {
    let State::Http(h) = &mut c.state else {
        return Step::Wait;
    };
    if h.held.is_some()
        || h.awaiting_store
        || h.close_after
        || h.pending_output() >= MAX_GATHERED_OUTPUT
    {
        if let Some(step) = flush_step(h, &mut c.sock) {
            return step;
        }
        if let Some(head) = h.held.take() {
            return Step::Request(*head, Vec::new());
        }
        if h.awaiting_store {
            return Step::Wait;
        }
        if h.close_after {
            return Step::Finish;
        }
    }
    let mut rest = scratch.get(input.clone()).unwrap_or(&[]);
    let parsed = h.reader.feed(&mut rest);
    input.start = input.end - rest.len();
    match parsed {
        Err(e) => return Step::Fail(e),
        Ok(Some(Parsed::Head)) => return Step::Head,
        Ok(Some(Parsed::Request(head, body))) => {
            if let (Route::Stream(_), Method::Get) = (&head.route, head.method)
                && h.has_output()
            {
                // The responses gathered so far go out before the connection becomes a stream.
                h.held = Some(Box::new(head));
                return Step::Again;
            }
            return Step::Request(head, body);
        }
        Ok(None) => {}
    }
    // Everything at hand is parsed: write the responses to it in one go, then read more.
    if let Some(step) = flush_step(h, &mut c.sock) {
        return step;
    }
    if !c.readable {
        return Step::Wait;
    }
    match conn::read_nb(&mut c.sock, scratch) {
        (n, Io::Done) => {
            *input = 0..n;
            Step::Again
        }
        (_, Io::WouldBlock) => {
            c.readable = false;
            Step::Wait
        }
        (_, Io::Closed) => {
            if h.reader.is_idle() {
                Step::Close(Why::Peer)
            } else {
                // The peer stopped sending halfway through a request.
                Step::Fail(HttpError::BadRequest(
                    "connection closed before the request was complete",
                ))
            }
        }
        (_, Io::Error(e)) => {
            debug!("read: {e}");
            Step::Close(Why::Error)
        }
    }
}
