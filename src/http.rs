//! HTTP/1.x requests: the head (with httparse), the body's framing, routing, and responses.
//!
//! Everything here is a pure function of bytes (and of whether debug logging is on, which
//! decides whether a request keeps its path for the access log), so it can be tested and fuzzed
//! without sockets.
//! "Not yet" is a value (`Ok(None)`), not an error. The [`Reader`] keeps its place between reads
//! and bounds what it buffers (head, body, chunk lines, trailers, and a process-wide [`Budget`]);
//! the caller bounds time.

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;

/// Largest request head accepted (request line and headers); 431 above.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted; 413 above.
pub const MAX_BODY: usize = 64 * 1024;
/// Most header lines accepted; 431 above.
pub const MAX_HEADERS: usize = 64;
/// Largest chunked body on the wire (data plus chunk framing) accepted before 413.
pub const MAX_CHUNKED_WIRE: usize = MAX_BODY + 16 * 1024;
/// Longest chunk-size line (size, whitespace and extension) accepted; 400 above.
pub const MAX_CHUNK_LINE: usize = 1024;
/// Largest trailer section of a chunked body accepted; 431 above.
pub const MAX_TRAILERS: usize = MAX_HEAD;
/// Longest path the access log shows, in bytes as sent; a longer one is cut and ends in `...`.
pub const LOG_PATH_MAX: usize = 256;

/// Why a request was refused. Each variant is answered with its status and the connection is
/// closed after the response, because the rest of the byte stream can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// 400: not HTTP (a TLS handshake, garbage) or a framing violation; the text says which.
    BadRequest(&'static str),
    /// 408: the request was not complete within the request timeout.
    Timeout,
    /// 413: the body is larger than [`MAX_BODY`].
    PayloadTooLarge,
    /// 417: an `Expect` other than `100-continue`.
    ExpectationFailed,
    /// 431: the head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] lines.
    HeadersTooLarge,
    /// 505: an HTTP version other than 1.x.
    VersionNotSupported,
    /// 503 with `Retry-After`: buffering the request would pass the process-wide budget for
    /// buffered request bytes (`MAX_BUFFERED_REQUEST_BYTES`).
    Busy,
}

impl HttpError {
    /// The status code the client sees.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::Timeout => 408,
            HttpError::PayloadTooLarge => 413,
            HttpError::ExpectationFailed => 417,
            HttpError::HeadersTooLarge => 431,
            HttpError::VersionNotSupported => 505,
            HttpError::Busy => 503,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadRequest(why) => write!(f, "bad request: {why}"),
            HttpError::Timeout => f.write_str("request not complete within the request timeout"),
            HttpError::PayloadTooLarge => write!(f, "request body is larger than {MAX_BODY} bytes"),
            HttpError::ExpectationFailed => f.write_str("only Expect: 100-continue is supported"),
            HttpError::HeadersTooLarge => {
                write!(
                    f,
                    "request head is larger than {MAX_HEAD} bytes or has over {MAX_HEADERS} headers"
                )
            }
            HttpError::VersionNotSupported => f.write_str("only HTTP/1.x is supported"),
            HttpError::Busy => {
                f.write_str("too many requests are being received; try again shortly")
            }
        }
    }
}

impl std::error::Error for HttpError {}

/// Request methods the server distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD: a GET without a response body.
    Head,
    /// POST
    Post,
    /// OPTIONS (CORS preflight).
    Options,
    /// Anything else; answered with 405.
    Other,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/sse/environments/{key}/stream`
    Stream(Box<str>),
    /// `/sse/environments/{key}/queue-change`
    QueueChange(Box<str>),
    /// `/health/liveness/`
    Liveness,
    /// `/health/readiness/` and `/health`
    Readiness,
    /// `/metrics`
    Metrics,
    /// `/admin/environments`: the environments with subscribers on this instance.
    AdminEnvironments,
    /// `*` (asterisk-form, only with OPTIONS): the server as a whole.
    Asterisk,
    /// Anything else: 404.
    NotFound,
}

impl Route {
    /// Parses a request target (origin-form, absolute-form or `*`); the query string is ignored.
    pub fn parse(target: &str) -> Route {
        if target == "*" {
            return Route::Asterisk;
        }
        let path = target_path(target);
        match path {
            "/health" | "/health/" | "/health/readiness" | "/health/readiness/" => Route::Readiness,
            "/health/liveness" | "/health/liveness/" => Route::Liveness,
            "/metrics" => Route::Metrics,
            "/admin/environments" | "/admin/environments/" => Route::AdminEnvironments,
            _ => {
                let Some(rest) = path.strip_prefix("/sse/environments/") else {
                    return Route::NotFound;
                };
                let Some((key, action)) = rest.split_once('/') else {
                    return Route::NotFound;
                };
                if !valid_key(key) {
                    return Route::NotFound;
                }
                match action {
                    "stream" => Route::Stream(key.into()),
                    "queue-change" => Route::QueueChange(key.into()),
                    _ => Route::NotFound,
                }
            }
        }
    }

    /// The methods this route answers, for `Allow` and CORS preflight.
    pub fn allow(&self) -> &'static str {
        match self {
            Route::Stream(_) => "GET, OPTIONS",
            Route::QueueChange(_) => "POST, OPTIONS",
            Route::AdminEnvironments => "GET, OPTIONS",
            Route::Liveness | Route::Readiness | Route::Metrics => "GET, HEAD, OPTIONS",
            Route::Asterisk => "GET, HEAD, POST, OPTIONS",
            Route::NotFound => "",
        }
    }

    /// Whether `method` is served on this route.
    pub fn allows(&self, method: Method) -> bool {
        match (self, method) {
            (_, Method::Options) => !matches!(self, Route::NotFound),
            (Route::Stream(_) | Route::AdminEnvironments, Method::Get) => true,
            (Route::QueueChange(_), Method::Post) => true,
            (Route::Liveness | Route::Readiness | Route::Metrics, Method::Get | Method::Head) => {
                true
            }
            _ => false,
        }
    }
}

/// The path a route is chosen by: the target without its query string or fragment, and of an
/// absolute-form target only what follows the authority.
fn target_path(target: &str) -> &str {
    let path = target.split(['?', '#']).next().unwrap_or("");
    absolute_form_path(path).unwrap_or(path)
}

/// The path of an absolute-form target (`http://host/path`): what follows the authority, or
/// `/` when nothing does. `None` for any other form.
fn absolute_form_path(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    Some(rest.find('/').map_or("/", |i| &rest[i..]))
}

/// Whether `target` has the shape of a queue-change (`/sse/environments/.../queue-change`, its
/// key valid or not): the one place a request body is expected.
fn queue_change_target(target: &str) -> bool {
    let path = target_path(target);
    path.starts_with("/sse/environments/") && path.ends_with("/queue-change")
}

/// An environment key: `[A-Za-z0-9._-]`, 1 to 128 bytes.
pub fn valid_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The route of the target.
    pub route: Route,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// How the body is delimited.
    pub body: BodyFraming,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// The value of `Authorization`, if any.
    pub authorization: Option<Vec<u8>>,
    /// `Access-Control-Request-Headers`, echoed in preflight responses.
    pub cors_request_headers: Option<String>,
    /// Length of the head in bytes, including the blank line.
    pub len: usize,
    /// The target's path as the access log shows it (see [`log_path`]); kept only when debug
    /// logging is on, so that no request pays for it otherwise.
    pub log_path: Option<Box<str>>,
}

/// How the access log shows a request target: its path without the query string or fragment,
/// cut at [`LOG_PATH_MAX`] bytes, every byte outside visible ASCII and every `"` or `\`
/// percent-encoded. The result is one token that cannot end a log line, open a quoted string
/// or escape out of one, whatever the peer sent.
pub fn log_path(target: &str) -> Box<str> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let cut = path.len() > LOG_PATH_MAX;
    let mut out = String::with_capacity(path.len().min(LOG_PATH_MAX) + 3);
    for &b in path.as_bytes().iter().take(LOG_PATH_MAX) {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            out.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    if cut {
        out.push_str("...");
    }
    out.into_boxed_str()
}

/// Parses a request head from the start of `buf`. `Ok(None)`: not complete yet.
///
/// An HTTP/1.x version above 1.1 (which httparse refuses) is read as 1.1, as RFC 9110 asks of
/// a server that implements 1.1.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    match later_minor_version(buf) {
        Some(at) => {
            let mut patched = buf.to_vec();
            if let Some(digit) = patched.get_mut(at) {
                *digit = b'1';
            }
            parse_head_as_is(&patched)
        }
        None => parse_head_as_is(buf),
    }
}

/// Where the minor version digit of an `HTTP/1.2` to `HTTP/1.9` request line is.
fn later_minor_version(buf: &[u8]) -> Option<usize> {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let len = buf.get(start..)?.iter().position(|&b| b == b'\n')?;
    let line = buf.get(start..start + len)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (rest, digit) = line.split_at_checked(line.len().checked_sub(1)?)?;
    (rest.ends_with(b" HTTP/1.") && matches!(digit, [b'2'..=b'9'])).then_some(start + rest.len())
}

fn parse_head_as_is(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Err(HttpError::HeadersTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadersTooLarge),
        Err(httparse::Error::Version) => {
            return Err(if buf.starts_with(b"\x16\x03") {
                HttpError::BadRequest("not HTTP (a TLS handshake on the plain-text port?)")
            } else {
                HttpError::BadRequest("malformed request line")
            });
        }
        Err(_) => {
            return Err(if buf.first() == Some(&0x16) {
                HttpError::BadRequest("not HTTP (a TLS handshake on the plain-text port?)")
            } else {
                HttpError::BadRequest("malformed request")
            });
        }
    };
    if len > MAX_HEAD {
        return Err(HttpError::HeadersTooLarge);
    }
    let minor = match req.version {
        Some(0) => 0,
        Some(1) => 1,
        _ => return Err(HttpError::VersionNotSupported),
    };
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("");
    let route = Route::parse(target);
    if route == Route::Asterisk && method != Method::Options {
        return Err(HttpError::BadRequest("the target * is only for OPTIONS"));
    }
    let mut hosts = 0;
    let mut keep_alive = minor == 1;
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding: Option<Vec<u8>> = None;
    let mut expect_continue = false;
    let mut authorization = None;
    let mut cors_request_headers = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
            if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadRequest("invalid Content-Length"));
            }
            let n: usize = v
                .parse()
                .map_err(|_| HttpError::BadRequest("invalid Content-Length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(HttpError::BadRequest("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let te = transfer_encoding.get_or_insert_with(Vec::new);
            if !te.is_empty() {
                te.push(b',');
            }
            te.extend_from_slice(h.value);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                expect_continue = minor == 1;
            } else {
                return Err(HttpError::ExpectationFailed);
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(h.value.to_vec());
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("access-control-request-headers") {
            cors_request_headers = std::str::from_utf8(h.value).ok().map(str::to_owned);
        }
    }
    if minor == 1 && hosts != 1 {
        return Err(HttpError::BadRequest(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let body = match (content_length, transfer_encoding) {
        (Some(_), Some(_)) => {
            return Err(HttpError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        (None, Some(te)) => {
            if !te.trim_ascii().eq_ignore_ascii_case(b"chunked") || minor == 0 {
                return Err(HttpError::BadRequest(
                    "unsupported Transfer-Encoding (only chunked)",
                ));
            }
            BodyFraming::Chunked
        }
        (Some(0), None) | (None, None) => BodyFraming::None,
        (Some(n), None) => BodyFraming::Length(n),
    };
    // A body is read only where one is expected; anywhere else it is refused unread.
    if body != BodyFraming::None && !(method == Method::Post && queue_change_target(target)) {
        return Err(HttpError::BadRequest(
            "a request body is accepted only on a queue-change",
        ));
    }
    if matches!(body, BodyFraming::Length(n) if n > MAX_BODY) {
        return Err(HttpError::PayloadTooLarge);
    }
    Ok(Some(Head {
        method,
        route,
        minor,
        keep_alive,
        body,
        expect_continue: expect_continue && body != BodyFraming::None,
        authorization,
        cors_request_headers,
        len,
        log_path: (log::max_level() >= log::LevelFilter::Debug).then(|| log_path(target)),
    }))
}

/// Reads a body framed as `framing` from the start of `buf` (the bytes after the head).
/// `Ok(None)`: not complete yet. `Ok(Some((body, consumed)))`: the decoded body and how many
/// bytes of `buf` it took.
pub fn parse_body(framing: BodyFraming, buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let Some(mut d) = Decoder::new(framing, &Budget::unlimited()) else {
        return Ok(Some((Vec::new(), 0)));
    };
    let (used, done) = d.decode(buf)?;
    Ok(done.then(|| (d.body.take(), used)))
}

/// A process-wide budget for buffered request bytes, shared by every [`Reader`] of the loop.
///
/// Readers count the capacity of their buffers against it as they grow and give it back when
/// they shrink or are dropped; a reader whose next growth would pass the limit fails with
/// [`HttpError::Busy`]. Single-threaded by design, like the loop that owns it.
#[derive(Debug, Clone)]
pub struct Budget(Rc<BudgetInner>);

#[derive(Debug)]
struct BudgetInner {
    used: Cell<usize>,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Budget {
        Budget(Rc::new(BudgetInner {
            used: Cell::new(0),
            limit,
        }))
    }

    /// No limit (tests, benchmarks, pure parsing).
    pub fn unlimited() -> Budget {
        Budget::new(usize::MAX)
    }

    /// Bytes counted against the budget now.
    pub fn used(&self) -> usize {
        self.0.used.get()
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.0.limit
    }
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::unlimited()
    }
}

/// A byte buffer whose capacity is counted against a [`Budget`].
#[derive(Debug, Default)]
struct Counted {
    bytes: Vec<u8>,
    budget: Budget,
    counted: usize,
}

impl Counted {
    fn new(budget: &Budget) -> Counted {
        Counted {
            bytes: Vec::new(),
            budget: budget.clone(),
            counted: 0,
        }
    }

    /// Makes room for `extra` more bytes, growing by doubling up to `cap` bytes in all.
    fn reserve(&mut self, extra: usize, cap: usize) -> Result<(), HttpError> {
        let len = self.bytes.len();
        let have = self.bytes.capacity();
        if have - len >= extra {
            return Ok(());
        }
        let want = (len + extra)
            .max(have.saturating_mul(2).min(cap))
            .max(64.min(cap));
        let used = self.budget.used().saturating_sub(self.counted);
        if used.saturating_add(want) > self.budget.limit() {
            return Err(HttpError::Busy);
        }
        self.bytes.reserve_exact(want - len);
        self.sync();
        Ok(())
    }

    fn extend(&mut self, data: &[u8], cap: usize) -> Result<(), HttpError> {
        self.reserve(data.len(), cap)?;
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    /// Hands the bytes over; they no longer count.
    fn take(&mut self) -> Vec<u8> {
        let v = std::mem::take(&mut self.bytes);
        self.sync();
        v
    }

    /// Frees the allocation.
    fn release(&mut self) {
        self.bytes = Vec::new();
        self.sync();
    }

    fn sync(&mut self) {
        let now = self.bytes.capacity();
        let used = self.budget.used().saturating_sub(self.counted) + now;
        self.budget.0.used.set(used);
        self.counted = now;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let used = self.budget.used().saturating_sub(self.counted);
        self.budget.0.used.set(used);
    }
}

/// Whether `b` may appear in a method (an RFC 9110 token character).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Line state shared by the head and trailer scans: where the last byte left us.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LineAt {
    /// Just after a line feed: a line feed here (or CR LF) ends the section.
    #[default]
    Start,
    /// After a line feed and a carriage return.
    StartCr,
    /// Inside a line.
    Inside,
}

impl LineAt {
    /// Steps over `b`; true when `b` ends the section (an empty line).
    fn step(&mut self, b: u8) -> bool {
        match b {
            b'\n' if *self != LineAt::Inside => return true,
            b'\n' => *self = LineAt::Start,
            b'\r' if *self == LineAt::Start => *self = LineAt::StartCr,
            _ => *self = LineAt::Inside,
        }
        false
    }
}

/// How far the search for the end of a request head has got. Each byte is looked at once;
/// httparse runs when the request line is complete (to refuse garbage early) and when the
/// blank line ending the head has arrived.
#[derive(Debug, Default, Clone, Copy)]
struct HeadScan {
    /// Head bytes looked at so far (leading empty lines included).
    seen: usize,
    /// The request line has begun (empty lines before it are skipped, as httparse does).
    started: bool,
    /// The method is complete (its space was seen).
    method_done: bool,
    /// The request line is complete and not yet checked.
    line_pending: bool,
    /// Length of the request line (with its line feed) once it is complete; 0 before.
    line_len: usize,
    at: LineAt,
}

impl HeadScan {
    /// Looks at `bytes`, the head's next bytes. `Some(n)`: the head ends after `bytes[..n]`.
    fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, HttpError> {
        for (i, &b) in bytes.iter().enumerate() {
            self.seen += 1;
            if !self.started {
                if b == b'\r' || b == b'\n' {
                    continue;
                }
                if b == 0x16 {
                    return Err(HttpError::BadRequest(
                        "not HTTP (a TLS handshake on the plain-text port?)",
                    ));
                }
                self.started = true;
                self.at = LineAt::Inside;
            }
            if !self.method_done {
                if b == b' ' && self.seen > 1 {
                    self.method_done = true;
                } else if !is_tchar(b) {
                    return Err(HttpError::BadRequest("malformed request line"));
                }
            }
            if b == b'\n' && self.line_len == 0 {
                self.line_pending = true;
                self.line_len = self.seen;
            }
            if self.at.step(b) {
                return Ok(Some(i + 1));
            }
        }
        Ok(None)
    }
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size (so many read).
    Size(u8),
    /// Whitespace after the size.
    SizeSpace,
    /// A chunk extension, up to the end of the line.
    Extension,
    /// The line feed ending the size line.
    SizeLf,
    /// Chunk data, so many bytes left.
    Data(usize),
    /// The carriage return after chunk data.
    DataCr,
    /// The line feed after chunk data.
    DataLf,
    /// Trailer lines, up to an empty line.
    Trailer(LineAt),
}

/// Decodes one body incrementally: every byte is looked at once, however the body is split.
#[derive(Debug)]
struct Decoder {
    /// `Content-Length` bytes left, or the chunked state.
    state: Result<usize, Chunk>,
    /// The chunk size being read.
    size: u64,
    /// Bytes of the current chunk-size line.
    line: usize,
    /// Bytes of the trailer section.
    trailer: usize,
    /// Bytes of the chunked body on the wire.
    wire: usize,
    /// Largest the decoded body may get.
    cap: usize,
    body: Counted,
}

impl Decoder {
    fn new(framing: BodyFraming, budget: &Budget) -> Option<Decoder> {
        let (state, cap) = match framing {
            BodyFraming::None => return None,
            BodyFraming::Length(n) => (Ok(n), n),
            BodyFraming::Chunked => (Err(Chunk::Size(0)), MAX_BODY),
        };
        Some(Decoder {
            state,
            size: 0,
            line: 0,
            trailer: 0,
            wire: 0,
            cap,
            body: Counted::new(budget),
        })
    }

    /// Decodes from `data`: how many bytes it took, and whether the body is complete (it takes
    /// all of `data` unless it is).
    fn decode(&mut self, data: &[u8]) -> Result<(usize, bool), HttpError> {
        let mut i = 0;
        loop {
            match self.state {
                Ok(left) => {
                    let n = left.min(data.len() - i);
                    self.body.extend(&data[i..i + n], self.cap)?;
                    i += n;
                    self.state = Ok(left - n);
                    return Ok((i, left == n));
                }
                Err(Chunk::Data(left)) => {
                    let n = left.min(data.len() - i);
                    self.wire += n;
                    if self.wire > MAX_CHUNKED_WIRE {
                        return Err(HttpError::PayloadTooLarge);
                    }
                    self.body.extend(&data[i..i + n], self.cap)?;
                    i += n;
                    self.state = Err(if left == n {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left - n)
                    });
                    if i == data.len() {
                        return Ok((i, false));
                    }
                }
                Err(chunk) => {
                    let Some(&b) = data.get(i) else {
                        return Ok((i, false));
                    };
                    i += 1;
                    self.wire += 1;
                    if self.wire > MAX_CHUNKED_WIRE {
                        return Err(HttpError::PayloadTooLarge);
                    }
                    if self.chunk_byte(chunk, b)? {
                        return Ok((i, true));
                    }
                }
            }
        }
    }

    /// One framing byte of a chunked body; true when the body is complete.
    fn chunk_byte(&mut self, chunk: Chunk, b: u8) -> Result<bool, HttpError> {
        const BAD_SIZE: HttpError = HttpError::BadRequest("malformed chunk size");
        let mut next = chunk;
        if matches!(chunk, Chunk::Size(_) | Chunk::SizeSpace | Chunk::Extension) {
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err(HttpError::BadRequest("chunk extension too long"));
            }
        }
        match chunk {
            Chunk::Size(digits) => match (b as char).to_digit(16) {
                Some(_) if digits >= 16 => return Err(BAD_SIZE),
                Some(d) => {
                    self.size = self.size << 4 | u64::from(d);
                    next = Chunk::Size(digits + 1);
                }
                None if digits == 0 => return Err(BAD_SIZE),
                None => match b {
                    b' ' | b'\t' => next = Chunk::SizeSpace,
                    b';' => next = Chunk::Extension,
                    b'\r' => next = Chunk::SizeLf,
                    _ => return Err(BAD_SIZE),
                },
            },
            Chunk::SizeSpace => match b {
                b' ' | b'\t' => {}
                b';' => next = Chunk::Extension,
                b'\r' => next = Chunk::SizeLf,
                _ => return Err(BAD_SIZE),
            },
            Chunk::Extension => match b {
                b'\r' => next = Chunk::SizeLf,
                b'\n' => return Err(BAD_SIZE),
                _ => {}
            },
            Chunk::SizeLf => {
                if b != b'\n' {
                    return Err(BAD_SIZE);
                }
                let size = std::mem::take(&mut self.size);
                self.line = 0;
                let room = (self.cap - self.body.bytes.len()) as u64;
                next = match size {
                    0 => Chunk::Trailer(LineAt::Start),
                    n if n > room => return Err(HttpError::PayloadTooLarge),
                    n => Chunk::Data(n as usize),
                };
            }
            Chunk::Data(_) => {}
            Chunk::DataCr if b == b'\r' => next = Chunk::DataLf,
            Chunk::DataLf if b == b'\n' => next = Chunk::Size(0),
            Chunk::DataCr | Chunk::DataLf => {
                return Err(HttpError::BadRequest("chunk data not followed by CRLF"));
            }
            Chunk::Trailer(mut at) => {
                self.trailer += 1;
                if self.trailer > MAX_TRAILERS {
                    return Err(HttpError::HeadersTooLarge);
                }
                if at.step(b) {
                    return Ok(true);
                }
                next = Chunk::Trailer(at);
            }
        }
        self.state = Err(next);
        Ok(false)
    }
}

/// What [`Reader::poll`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A head announcing a body is complete and its body is not yet read (the caller may refuse
    /// early or send `100 Continue`); the head is in [`Reader::head`].
    Head,
    /// A whole request: head and decoded body.
    Request(Head, Vec<u8>),
}

/// Turns received bytes into requests, one at a time: the pure half of a connection.
///
/// The reader keeps its place between reads: how far the search for the end of the head got,
/// where a chunked body's decoder stands, and the body decoded so far. So each received byte is
/// looked at once (see [`Reader::work`]), however the request is split. Bytes can come from the
/// caller's own buffer ([`Reader::feed`]: only what is incomplete is copied) or be handed over
/// ([`Reader::push`]). Buffers count against a [`Budget`]; they are freed when a request is
/// taken or refused, so an idle keep-alive connection holds no memory.
#[derive(Debug, Default)]
pub struct Reader {
    /// Bytes handed over and not yet parsed start at `pos`: a partial head, or input that
    /// arrived while the caller was not ready for it.
    buf: Counted,
    pos: usize,
    scan: HeadScan,
    /// The head of the request whose body is being read.
    pub head: Option<Head>,
    body: Option<Decoder>,
    failed: Option<HttpError>,
    work: u64,
}

impl Reader {
    /// A reader whose buffers count against `budget`.
    pub fn new(budget: &Budget) -> Reader {
        Reader {
            buf: Counted::new(budget),
            ..Reader::default()
        }
    }

    /// Appends received bytes, to be parsed by the next [`Reader::poll`].
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() || self.failed.is_some() {
            return;
        }
        if let Err(e) = self.stash(bytes) {
            self.fail(e.clone());
        }
    }

    /// Whether no request is in progress (nothing buffered, no head pending).
    pub fn is_idle(&self) -> bool {
        !self.has_buffered() && self.head.is_none() && !self.scan.started
    }

    /// Whether handed-over bytes wait to be parsed.
    pub fn has_buffered(&self) -> bool {
        self.pos < self.buf.bytes.len()
    }

    /// Bytes handed over and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.bytes.len() - self.pos
    }

    /// Bytes of memory this reader holds (buffer capacities).
    pub fn footprint(&self) -> usize {
        self.buf.bytes.capacity() + self.body.as_ref().map_or(0, |d| d.body.bytes.capacity())
    }

    /// Bytes looked at so far, counting each run of httparse over the head as the head's
    /// length: a measure of parsing work that does not depend on the machine.
    pub fn work(&self) -> u64 {
        self.work
    }

    /// The next step of parsing the bytes handed over. `Ok(None)`: more bytes are needed.
    pub fn poll(&mut self) -> Result<Option<Parsed>, HttpError> {
        self.feed(&mut &[][..])
    }

    /// The next step of parsing: the bytes handed over first, then `input`, which is advanced
    /// past what was used. `Ok(None)`: more bytes are needed, and all of `input` was used (what
    /// is incomplete is kept). After an error every later call returns it again.
    pub fn feed(&mut self, input: &mut &[u8]) -> Result<Option<Parsed>, HttpError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.step(input) {
            Ok(p) => {
                if !self.has_buffered() {
                    self.buf.release();
                    self.pos = 0;
                } else if p.is_none() && self.pos > 0 {
                    // Compact once per read, not once per request.
                    self.buf.bytes.drain(..self.pos);
                    self.pos = 0;
                }
                Ok(p)
            }
            Err(e) => {
                self.fail(e.clone());
                Err(e)
            }
        }
    }

    fn fail(&mut self, e: HttpError) {
        self.failed = Some(e);
        self.buf.release();
        self.pos = 0;
        self.body = None;
    }

    fn stash(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        if self.pos > 0 && !self.has_buffered() {
            self.buf.bytes.clear();
            self.pos = 0;
        }
        self.buf.extend(bytes, usize::MAX)
    }

    fn step(&mut self, input: &mut &[u8]) -> Result<Option<Parsed>, HttpError> {
        if self.head.is_none() {
            return self.step_head(input);
        }
        let Some(d) = &mut self.body else {
            return Ok(self.finish());
        };
        if self.pos < self.buf.bytes.len() {
            let (used, done) = d.decode(&self.buf.bytes[self.pos..])?;
            self.work += used as u64;
            self.pos += used;
            if done {
                return Ok(self.finish());
            }
        }
        let (used, done) = d.decode(input)?;
        self.work += used as u64;
        *input = &input[used..];
        Ok(if done { self.finish() } else { None })
    }

    fn step_head(&mut self, input: &mut &[u8]) -> Result<Option<Parsed>, HttpError> {
        if !self.scan.started {
            // Empty lines between requests are skipped without being kept, wherever they are.
            let kept = self.buf.bytes.get(self.pos..).unwrap_or(&[]);
            let skip = kept
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
                .unwrap_or(kept.len());
            self.pos += skip;
            self.work += skip as u64;
        }
        if self.has_buffered() {
            // Part of a head is buffered: look at what was not looked at yet, then at `input`.
            let unscanned = self.pos + self.scan.seen;
            let found = match self
                .scan
                .scan(self.buf.bytes.get(unscanned..).unwrap_or(&[]))?
            {
                Some(n) => Some(unscanned + n),
                None => match self.scan.scan(input)? {
                    Some(n) => {
                        self.stash_head(&input[..n])?;
                        *input = &input[n..];
                        Some(self.buf.bytes.len())
                    }
                    None => {
                        self.stash_head(input)?;
                        *input = &[];
                        None
                    }
                },
            };
            self.work += (found.unwrap_or(self.buf.bytes.len()) - unscanned) as u64;
            let Some(end) = found else {
                self.check_line(self.pos)?;
                return Ok(None);
            };
            let head = self.parse(self.pos, end)?;
            self.pos = end;
            return Ok(self.start(head));
        }
        if !self.scan.started {
            let skip = input
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
                .unwrap_or(input.len());
            self.work += skip as u64;
            *input = &input[skip..];
            if input.is_empty() {
                return Ok(None);
            }
        }
        match self.scan.scan(input)? {
            Some(n) => {
                self.work += n as u64 * 2;
                let head =
                    parse_head(&input[..n])?.ok_or(HttpError::BadRequest("malformed request"))?;
                *input = &input[n..];
                self.scan = HeadScan::default();
                Ok(self.start(head))
            }
            None => {
                self.work += input.len() as u64;
                self.stash_head(input)?;
                *input = &[];
                self.check_line(0)
            }
        }
    }

    /// Keeps part of a head, refusing a head that has grown too large.
    fn stash_head(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        if self.buffered() + bytes.len() > MAX_HEAD {
            return Err(HttpError::HeadersTooLarge);
        }
        self.stash(bytes)
    }

    /// Once the request line is complete, refuses it at once if it is malformed (the line
    /// alone: what follows is checked when the head is complete, so that the outcome does not
    /// depend on how the head was split).
    fn check_line(&mut self, from: usize) -> Result<Option<Parsed>, HttpError> {
        if self.scan.line_pending {
            self.scan.line_pending = false;
            let line = self.buf.bytes.get(from..from + self.scan.line_len);
            let line = line.unwrap_or(&[]);
            self.work += line.len() as u64;
            parse_head(line)?;
        }
        Ok(None)
    }

    /// Parses the complete head in `buf[from..end]`.
    fn parse(&mut self, from: usize, end: usize) -> Result<Head, HttpError> {
        self.scan = HeadScan::default();
        let bytes = self.buf.bytes.get(from..end).unwrap_or(&[]);
        self.work += bytes.len() as u64;
        parse_head(bytes)?.ok_or(HttpError::BadRequest("malformed request"))
    }

    /// A head is complete: the request, or the start of its body.
    fn start(&mut self, head: Head) -> Option<Parsed> {
        self.body = Decoder::new(head.body, &self.buf.budget);
        if self.body.is_none() {
            return Some(Parsed::Request(head, Vec::new()));
        }
        self.head = Some(head);
        Some(Parsed::Head)
    }

    /// The body is complete: the request.
    fn finish(&mut self) -> Option<Parsed> {
        let body = self
            .body
            .take()
            .map(|mut d| d.body.take())
            .unwrap_or_default();
        self.head.take().map(|head| Parsed::Request(head, body))
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Whether an `Authorization` value is `Token <token>` (scheme case-insensitive).
pub fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(v) = header else { return false };
    let v = v.trim_ascii();
    if v.len() < 6 || !v[..5].eq_ignore_ascii_case(b"token") || v[5] != b' ' {
        return false;
    }
    constant_time_eq(v[6..].trim_ascii_start(), token.as_bytes())
}

/// The reason phrase of the statuses the server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A complete response with `Content-Length`, CORS and `Connection` headers.
///
/// `extra` is a block of additional header lines, each ending in CRLF. With `head_only` the body
/// is left out but its length is still announced (a response to HEAD).
pub fn response(
    status: u16,
    content_type: &str,
    extra: &str,
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(192 + extra.len() + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Access-Control-Allow-Origin: *\r\nConnection: {}\r\n{extra}\r\n",
            reason(status),
            body.len(),
            if keep_alive { "keep-alive" } else { "close" },
        )
        .as_bytes(),
    );
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// A JSON `{"detail": "..."}` body.
pub fn detail_json(detail: &str) -> Vec<u8> {
    let mut s = String::with_capacity(detail.len() + 16);
    s.push_str("{\"detail\": ");
    crate::json::write_string(&mut s, detail);
    s.push('}');
    s.into_bytes()
}

/// The response for a refused request; it always closes the connection.
pub fn error_response(e: &HttpError) -> Vec<u8> {
    response(
        e.status(),
        "application/json",
        if *e == HttpError::Busy {
            "Retry-After: 1\r\n"
        } else {
            ""
        },
        &detail_json(&e.to_string()),
        false,
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &[u8] = b"POST /sse/environments/abc/queue-change?x=1 HTTP/1.1\r\nHost: x\r\n\
        Authorization: Token secret\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello";

    #[test]
    fn parses_a_post() {
        let head = parse_head(POST).unwrap().unwrap();
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.route, Route::QueueChange("abc".into()));
        assert_eq!(head.body, BodyFraming::Length(5));
        assert!(head.keep_alive && head.expect_continue);
        assert!(authorized(head.authorization.as_deref(), "secret"));
        let (body, used) = parse_body(head.body, &POST[head.len..]).unwrap().unwrap();
        assert_eq!((body.as_slice(), used), (&b"hello"[..], 5));
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        let head_len = parse_head(POST).unwrap().unwrap().len;
        for n in 0..head_len {
            assert_eq!(parse_head(&POST[..n]), Ok(None), "prefix of {n} bytes");
        }
        let body = &POST[head_len..];
        for n in 0..body.len() {
            assert_eq!(parse_body(BodyFraming::Length(5), &body[..n]), Ok(None));
        }
        let chunked = b"5;ext=1\r\nhel\r\n\r\n2\r\nlo\r\n0\r\nTrailer: x\r\n\r\n";
        for n in 0..chunked.len() {
            assert_eq!(
                parse_body(BodyFraming::Chunked, &chunked[..n]),
                Ok(None),
                "chunked prefix {n}"
            );
        }
        let (body, used) = parse_body(BodyFraming::Chunked, chunked).unwrap().unwrap();
        assert_eq!((body.as_slice(), used), (&b"hel\r\nlo"[..], chunked.len()));
    }

    #[test]
    fn reader_yields_pipelined_requests_in_any_split() {
        let mut wire = POST.to_vec();
        wire.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        for split in 0..wire.len() {
            let mut r = Reader::default();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                r.push(part);
                while let Some(p) = r.poll().unwrap() {
                    if let Parsed::Request(head, body) = p {
                        got.push((head.route, body));
                    }
                }
            }
            assert_eq!(
                got,
                vec![
                    (Route::QueueChange("abc".into()), b"hello".to_vec()),
                    (Route::Readiness, vec![])
                ]
            );
            assert!(r.is_idle());
        }
    }

    #[test]
    fn log_paths_are_one_safe_token() {
        assert_eq!(&*log_path("/nowhere?token=secret#frag"), "/nowhere");
        assert_eq!(&*log_path("/a\"b\\c"), "/a%22b%5Cc");
        assert_eq!(&*log_path("/x\r\ny z\u{7f}"), "/x%0D%0Ay%20z%7F");
        assert_eq!(&*log_path("/\u{e9}"), "/%C3%A9");
        assert_eq!(&*log_path("http://h/p?q"), "http://h/p");
        let long = format!("/{}", "a".repeat(1000));
        let shown = log_path(&long);
        assert_eq!(shown.len(), LOG_PATH_MAX + 3);
        assert!(shown.ends_with("...") && shown.starts_with("/aaa"));
        assert_eq!(&*log_path(""), "");
    }

    #[test]
    fn routes() {
        let table = [
            ("/sse/environments/abc/stream", Route::Stream("abc".into())),
            (
                "/sse/environments/A-b_c.9/stream?since=1",
                Route::Stream("A-b_c.9".into()),
            ),
            (
                "/sse/environments/abc/queue-change",
                Route::QueueChange("abc".into()),
            ),
            ("/sse/environments//stream", Route::NotFound),
            ("/sse/environments/a%20b/stream", Route::NotFound),
            ("/sse/environments/abc/other", Route::NotFound),
            ("/sse/environments/abc", Route::NotFound),
            ("/health", Route::Readiness),
            ("/health/readiness/", Route::Readiness),
            ("/health/liveness/", Route::Liveness),
            ("/metrics", Route::Metrics),
            ("/admin/environments", Route::AdminEnvironments),
            ("/admin/environments?limit=5", Route::AdminEnvironments),
            ("/admin", Route::NotFound),
            ("/", Route::NotFound),
        ];
        for (target, want) in table {
            assert_eq!(Route::parse(target), want, "{target}");
        }
        let long = format!("/sse/environments/{}/stream", "k".repeat(128));
        assert!(matches!(Route::parse(&long), Route::Stream(_)));
        let too_long = format!("/sse/environments/{}/stream", "k".repeat(129));
        assert_eq!(Route::parse(&too_long), Route::NotFound);
    }

    #[test]
    fn refuses_smuggling_and_garbage() {
        let table: &[(&[u8], u16)] = &[
            (
                b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
            ),
            (b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
                400,
            ),
            (
                b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n",
                413,
            ),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n", 400),
            (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n", 400),
            (b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nExpect: something\r\n\r\n", 417),
            (b"GET / HTTP/2.0\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
            (b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ];
        for (req, status) in table {
            let e = parse_head(req).unwrap_err();
            assert_eq!(e.status(), *status, "{}: {e}", String::from_utf8_lossy(req));
        }
        let same_twice =
            b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            parse_head(same_twice).unwrap().unwrap().body,
            BodyFraming::Length(3)
        );
        assert_eq!(
            parse_body(BodyFraming::Chunked, b"zz\r\n"),
            Err(HttpError::BadRequest("malformed chunk size"))
        );
        assert_eq!(
            parse_body(BodyFraming::Chunked, b"2\r\nabcd"),
            Err(HttpError::BadRequest("chunk data not followed by CRLF"))
        );
    }

    #[test]
    fn head_size_limit() {
        let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        assert_eq!(parse_head(&big), Err(HttpError::HeadersTooLarge));
        let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("X-{i}: y\r\n").bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(parse_head(&many), Err(HttpError::HeadersTooLarge));
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |req: &[u8]| parse_head(req).unwrap().unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn token_check() {
        assert!(authorized(Some(b"Token abc"), "abc"));
        assert!(authorized(Some(b"token  abc "), "abc"));
        assert!(!authorized(Some(b"Token abd"), "abc"));
        assert!(!authorized(Some(b"Bearer abc"), "abc"));
        assert!(!authorized(Some(b"abc"), "abc"));
        assert!(!authorized(None, "abc"));
        assert!(!authorized(Some(b"Token "), "abc"));
    }

    /// Feeds `wire` one byte per poll until the reader answers or the bytes run out; returns
    /// the outcome, the bytes fed and the reader's work.
    /// The outcome is the decoded body's length.
    fn trickle(wire: &[u8]) -> (Result<Option<usize>, HttpError>, usize, u64) {
        let mut r = Reader::default();
        let mut fed = 0;
        let mut out = Ok(None);
        for b in wire.chunks(1) {
            r.push(b);
            fed += 1;
            match r.poll() {
                Ok(None) | Ok(Some(Parsed::Head)) => {}
                Ok(Some(Parsed::Request(_, body))) => {
                    out = Ok(Some(body.len()));
                    break;
                }
                Err(e) => {
                    out = Err(e);
                    break;
                }
            }
        }
        println!(
            "{fed} bytes one per read: {} units of work, {out:?}",
            r.work()
        );
        (out, fed, r.work())
    }

    /// [`trickle`], checking that the reader's work stayed within 4 units per byte fed; returns
    /// the outcome and the bytes fed.
    #[track_caller]
    fn trickle_linear(wire: &[u8]) -> (Result<Option<usize>, HttpError>, usize) {
        let (out, fed, work) = trickle(wire);
        assert!(
            work <= 4 * fed as u64,
            "{work} units of work for {fed} bytes"
        );
        (out, fed)
    }

    /// `parts` one after the other, then 80,000 times `byte`: a line that never ends.
    fn endless(parts: &[&[u8]], byte: u8) -> Vec<u8> {
        let mut wire = parts.concat();
        wire.extend(std::iter::repeat_n(byte, 80_000));
        wire
    }

    /// A chunked queue-change whose body is `n` one-byte chunks.
    fn one_byte_chunks(n: usize) -> Vec<u8> {
        let mut wire = CHUNKED_HEAD.to_vec();
        for _ in 0..n {
            wire.extend_from_slice(b"1\r\nx\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        wire
    }

    const CHUNKED_HEAD: &[u8] = b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\n\
        Transfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn parsing_work_is_linear_in_the_bytes_however_they_are_split() {
        // 84 KB of one-byte chunks, one byte per read: the wire limit ends it with 413.
        let (out, fed) = trickle_linear(&one_byte_chunks(14_000));
        assert_eq!(out, Err(HttpError::PayloadTooLarge));
        assert!(fed > MAX_CHUNKED_WIRE, "{fed}");

        // The same body a little shorter is read whole, with the same work per byte.
        let (out, _) = trickle_linear(&one_byte_chunks(13_000));
        assert_eq!(out, Ok(Some(13_000)));

        // An endless trailer line: 431 at the trailer limit.
        let (out, fed) = trickle_linear(&endless(&[CHUNKED_HEAD, b"0\r\nX-Trailer: "], b'a'));
        assert_eq!(out, Err(HttpError::HeadersTooLarge));
        assert!(fed < CHUNKED_HEAD.len() + MAX_TRAILERS + 16, "{fed}");

        // A long chunk extension: 400 at the chunk-line limit.
        let (out, fed) = trickle_linear(&endless(&[CHUNKED_HEAD, b"1;name="], b'v'));
        assert_eq!(out, Err(HttpError::BadRequest("chunk extension too long")));
        assert!(fed <= CHUNKED_HEAD.len() + MAX_CHUNK_LINE + 1, "{fed}");

        // A head that never ends: 431 at the head limit.
        let (out, fed) = trickle_linear(&endless(&[b"GET /health HTTP/1.1\r\nX-Long: "], b'a'));
        assert_eq!(out, Err(HttpError::HeadersTooLarge));
        assert!(fed <= MAX_HEAD + 1, "{fed}");

        // A Content-Length body, one byte per read.
        let mut cl = b"POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\n\
            Content-Length: 60000\r\n\r\n"
            .to_vec();
        cl.extend(std::iter::repeat_n(b' ', 60_000));
        let (out, _) = trickle_linear(&cl);
        assert_eq!(out, Ok(Some(60_000)));
    }

    #[test]
    fn input_fed_from_the_callers_buffer_is_copied_only_when_incomplete() {
        let one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        let wire: Vec<u8> = one.repeat(100);
        let mut r = Reader::default();
        let mut input = &wire[..wire.len() - 5];
        let mut n = 0;
        while let Some(p) = r.feed(&mut input).unwrap() {
            assert!(matches!(p, Parsed::Request(..)));
            // Complete requests are parsed in place: nothing is buffered.
            assert_eq!(r.footprint(), 0);
            n += 1;
        }
        assert_eq!(n, 99);
        assert!(input.is_empty());
        // The incomplete tail is kept, and completed by the next read.
        assert_eq!(r.buffered(), one.len() - 5);
        let mut rest = &wire[wire.len() - 5..];
        assert!(matches!(r.feed(&mut rest), Ok(Some(Parsed::Request(..)))));
        assert!(r.is_idle() && r.footprint() == 0);
    }

    #[test]
    fn buffers_count_against_the_budget_and_are_given_back() {
        let budget = Budget::new(40_000);
        let post = |n: usize| {
            let mut v = format!(
                "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n"
            )
            .into_bytes();
            v.extend(std::iter::repeat_n(b' ', n));
            v
        };
        let mut a = Reader::new(&budget);
        let wire = post(30_000);
        let mut input = &wire[..20_000];
        assert_eq!(a.feed(&mut input), Ok(Some(Parsed::Head)));
        assert_eq!(a.feed(&mut input), Ok(None));
        assert!(budget.used() >= 20_000 - 100 && budget.used() <= 30_000);
        // A second reader cannot take what is left.
        let mut b = Reader::new(&budget);
        let wire_b = post(30_000);
        let mut input = &wire_b[..];
        assert_eq!(b.feed(&mut input), Ok(Some(Parsed::Head)));
        assert_eq!(b.feed(&mut input), Err(HttpError::Busy));
        assert_eq!(b.footprint(), 0);
        // The first completes, and everything comes back.
        let mut input = &wire[20_000..];
        assert!(
            matches!(a.feed(&mut input), Ok(Some(Parsed::Request(_, body))) if body.len() == 30_000)
        );
        assert_eq!(budget.used(), 0);
        let mut c = Reader::new(&budget);
        c.push(&wire[..100]);
        assert!(budget.used() > 0);
        drop(c);
        assert_eq!(budget.used(), 0);
        assert_eq!(http_error_head(&error_response(&HttpError::Busy)), 503);
        assert!(
            String::from_utf8_lossy(&error_response(&HttpError::Busy))
                .contains("Retry-After: 1\r\n")
        );
    }

    fn http_error_head(resp: &[u8]) -> u16 {
        String::from_utf8_lossy(resp)
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn http_details() {
        let head = |req: &[u8]| parse_head(req);
        // A later HTTP/1.x is read as 1.1.
        let h = head(b"GET /health HTTP/1.2\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.minor, h.route), (1, Route::Readiness));
        assert_eq!(
            head(b"GET /health HTTP/1.2\r\n\r\n").unwrap_err().status(),
            400
        );
        // Absolute-form targets are routed by their path.
        let h = head(b"GET http://sse.example:8000/sse/environments/k/stream?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.route, Route::Stream("k".into()));
        assert_eq!(Route::parse("HTTPS://h"), Route::NotFound);
        assert_eq!(Route::parse("http://h/metrics"), Route::Metrics);
        // Exactly one Host in HTTP/1.1; none needed in 1.0.
        assert_eq!(
            head(b"GET /health HTTP/1.1\r\n\r\n").unwrap_err().status(),
            400
        );
        assert_eq!(
            head(b"GET /health HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert!(head(b"GET /health HTTP/1.0\r\n\r\n").unwrap().is_some());
        // The asterisk form, for OPTIONS only.
        let h = head(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.route, Route::Asterisk);
        assert_eq!(
            head(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn garbage_is_refused_before_the_head_ends() {
        for (bytes, status) in [
            (&b"\x16\x03\x01\x02\x00"[..], 400),
            (b"\x00\x01 hello", 400),
            (b"GET /health\r\n", 400),
            (b"PRI * HTTP/2.0\r\n", 400),
        ] {
            let mut r = Reader::default();
            r.push(bytes);
            assert_eq!(r.poll().map_err(|e| e.status()), Err(status), "{bytes:?}");
        }
        let mut r = Reader::default();
        r.push(b"\r\n\r\nGET /health HTTP/1.1\r\nHo");
        assert_eq!(r.poll(), Ok(None));
        r.push(b"st: x\r\n\r\n");
        assert!(matches!(r.poll(), Ok(Some(Parsed::Request(..)))));
    }

    /// Found by fuzzing: the outcome must not depend on how the bytes were split, nor on
    /// whether they were handed over or parsed in place.
    #[test]
    fn the_outcome_does_not_depend_on_the_split() {
        let cases: [&[u8]; 3] = [
            // Empty lines before a request are not part of its head.
            b"\r\n\r\nGET /metrics HTTP/1.0\r\n\r\n",
            // A bad header after a complete request line, in a head that never ends.
            b"POST /sse/environments/k/queue-change HTTP/1.1\r\nX-\xf1: y\r\nExpect: 100-conti",
            // The same, ended: refused however it arrives.
            b"POST /sse/environments/k/queue-change HTTP/1.1\r\nX-\xf1: y\r\n\r\n",
        ];
        for wire in cases {
            let whole = {
                let mut r = Reader::default();
                r.push(wire);
                r.poll()
            };
            for size in 1..wire.len() {
                for in_place in [false, true] {
                    let mut r = Reader::default();
                    let mut last = Ok(None);
                    for piece in wire.chunks(size) {
                        let mut input = piece;
                        if !in_place {
                            r.push(piece);
                            input = &[];
                        }
                        last = r.feed(&mut input);
                        if !matches!(last, Ok(None)) {
                            break;
                        }
                    }
                    assert_eq!(
                        last, whole,
                        "{wire:?} in pieces of {size}, in place: {in_place}"
                    );
                }
            }
        }
    }
}
