//! The access log, at debug level (module `flagsmith_sse::server::access`): one line per
//! answered or refused request, and one when a stream opens and when it closes. Each line
//! carries its fields (method, path, status, peer, duration; environment and reason for
//! streams), which `LOG_FORMAT=json` writes as JSON fields. The path is the request's own (see
//! [`crate::http::log_path`]). Nothing here runs unless debug logging is on.

use super::*;
use log::Level;

/// The method's name as on the wire.
fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Options => "OPTIONS",
        Method::Other => "OTHER",
    }
}

/// The status code at the start of an HTTP/1.x response.
fn response_status(out: &[u8]) -> u16 {
    out.get(9..12)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

impl Server {
    fn peer(&self, token: usize) -> String {
        self.conns
            .get(token)
            .and_then(|c| c.sock.peer_addr().ok())
            .map_or_else(|| "-".to_owned(), |a| a.to_string())
    }

    /// Logs an answered request: `out` is the response, `started` when its first byte came.
    pub(super) fn log_request(&self, token: usize, head: &Head, out: &[u8], started: u64) {
        if !log::log_enabled!(Level::Debug) {
            return;
        }
        self.log_answer(
            token,
            method_name(head.method),
            head.log_path.as_deref().unwrap_or("-"),
            response_status(out),
            started,
        );
    }

    /// Logs a request refused with `response` (the connection closes after it): its method
    /// and path when its head was read, else `-`.
    pub(super) fn log_refusal(&self, token: usize, response: &[u8]) {
        if !log::log_enabled!(Level::Debug) {
            return;
        }
        let Some(State::Http(h)) = self.conns.get(token).map(|c| &c.state) else {
            return;
        };
        let head = h.reader.head.as_ref();
        let method = head.map_or("-", |head| method_name(head.method));
        let path = head
            .and_then(|head| head.log_path.as_deref())
            .unwrap_or("-");
        let started = h.started.unwrap_or_else(|| self.now());
        self.log_answer(token, method, path, response_status(response), started);
    }

    /// Logs an answered request given its parts (its callers have checked that debug logging
    /// is on).
    fn log_answer(&self, token: usize, method: &str, path: &str, status: u16, started: u64) {
        let peer = self.peer(token);
        let duration_ms = self.now().saturating_sub(started);
        debug!(
            method = method, path = path, status = status, peer = peer.as_str(), duration_ms = duration_ms;
            "request"
        );
    }

    /// Logs a queue-change about to be answered: 200 when stored, else 503, with the path it
    /// was sent to. `key`, its environment when known, stands in for the path should that not
    /// have been kept.
    pub(super) fn log_queue_change(&mut self, id: store::WriteId, key: Option<&str>, ok: bool) {
        let now = self.now();
        let Some(&(token, serial)) = self.writes.get(&id) else {
            return;
        };
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if c.serial != serial {
            return;
        }
        let State::Http(h) = &mut c.state else { return };
        let started = h.started.take().unwrap_or(now);
        let path = h.log_path.take();
        if !log::log_enabled!(Level::Debug) {
            return;
        }
        let path = match (path, key) {
            (Some(p), _) => p.into_string(),
            (None, Some(k)) => format!("/sse/environments/{k}/queue-change"),
            (None, None) => "-".to_owned(),
        };
        self.log_answer(token, "POST", &path, if ok { 200 } else { 503 }, started);
    }

    /// What a stream's access-log lines show: the stream, its environment's key and its peer.
    /// `None` when debug logging is off or `token` is not a stream.
    fn stream_fields(&self, token: usize) -> Option<(&Stream, &str, String)> {
        if !log::log_enabled!(Level::Debug) {
            return None;
        }
        let Some(State::Stream(s)) = self.conns.get(token).map(|c| &c.state) else {
            return None;
        };
        let env = self.envs.get(s.env() as usize).map_or("-", |e| &e.key);
        Some((s, env, self.peer(token)))
    }

    /// Logs a stream that just opened.
    pub(super) fn log_stream_open(&self, token: usize) {
        let Some((_, env, peer)) = self.stream_fields(token) else {
            return;
        };
        debug!(
            event = "stream_open", environment = env, peer = peer.as_str();
            "stream opened"
        );
    }

    /// Logs a stream that is closing, and why.
    pub(super) fn log_stream_closed(&self, token: usize, reason: &str) {
        let Some((s, env, peer)) = self.stream_fields(token) else {
            return;
        };
        let duration_ms = self.now().saturating_sub(s.opened());
        debug!(
            event = "stream_close", environment = env, peer = peer.as_str(), reason = reason,
            duration_ms = duration_ms;
            "stream closed"
        );
    }
}

/// A close reason's name in the access log.
pub(super) fn why_name(why: Why) -> &'static str {
    match why {
        Why::Peer => "peer",
        Why::Done => "done",
        Why::Error => "error",
        Why::Stalled => "stalled",
        Why::Deadline => "deadline",
    }
}
