//! HTTP/1.x requests: the head (with httparse), the body's framing, routing, and responses.
//!
//! Everything here is a pure function of bytes, so it can be tested and fuzzed without sockets.
//! "Not yet" is a value (`Ok(None)`), not an error; the caller bounds buffer sizes and time.

use std::fmt;

/// Largest request head accepted (request line and headers); 431 above.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted; 413 above.
pub const MAX_BODY: usize = 64 * 1024;
/// Most header lines accepted; 431 above.
pub const MAX_HEADERS: usize = 64;
/// Largest chunked body on the wire (data plus chunk framing) accepted before 413.
pub const MAX_CHUNKED_WIRE: usize = MAX_BODY + 16 * 1024;

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
    /// 505: an HTTP version other than 1.0 and 1.1.
    VersionNotSupported,
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
            HttpError::VersionNotSupported => {
                f.write_str("only HTTP/1.0 and HTTP/1.1 are supported")
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
    /// Anything else: 404.
    NotFound,
}

impl Route {
    /// Parses a request target; the query string is ignored.
    pub fn parse(target: &str) -> Route {
        let path = target.split(['?', '#']).next().unwrap_or("");
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
}

/// Parses a request head from the start of `buf`. `Ok(None)`: not complete yet.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
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
    let route = Route::parse(req.path.unwrap_or(""));
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
        } else if name.eq_ignore_ascii_case("access-control-request-headers") {
            cors_request_headers = std::str::from_utf8(h.value).ok().map(str::to_owned);
        }
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
        (Some(n), None) => {
            if n > MAX_BODY {
                return Err(HttpError::PayloadTooLarge);
            }
            BodyFraming::Length(n)
        }
    };
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
    }))
}

/// Reads a body framed as `framing` from the start of `buf` (the bytes after the head).
/// `Ok(None)`: not complete yet. `Ok(Some((body, consumed)))`: the decoded body and how many
/// bytes of `buf` it took.
pub fn parse_body(framing: BodyFraming, buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    match framing {
        BodyFraming::None => Ok(Some((Vec::new(), 0))),
        BodyFraming::Length(n) => Ok(buf.get(..n).map(|b| (b.to_vec(), n))),
        BodyFraming::Chunked => parse_chunked(buf),
    }
}

fn parse_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let rest = buf.get(i..).unwrap_or(&[]);
        let (hdr, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(v)) => v,
            Ok(httparse::Status::Partial) => return partial_chunked(buf),
            Err(_) => return Err(HttpError::BadRequest("malformed chunk size")),
        };
        i += hdr;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| HttpError::PayloadTooLarge)?;
        if size > MAX_BODY || body.len() + size > MAX_BODY {
            return Err(HttpError::PayloadTooLarge);
        }
        let Some(data) = buf.get(i..i + size) else {
            return partial_chunked(buf);
        };
        body.extend_from_slice(data);
        i += size;
        match buf.get(i..i + 2) {
            Some(b"\r\n") => i += 2,
            Some(_) => return Err(HttpError::BadRequest("chunk data not followed by CRLF")),
            None => return partial_chunked(buf),
        }
    }
    // Trailer section: header lines until an empty line.
    loop {
        let rest = buf.get(i..).unwrap_or(&[]);
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return partial_chunked(buf);
        };
        i += eol + 2;
        if eol == 0 {
            return Ok(Some((body, i)));
        }
        if i > MAX_CHUNKED_WIRE {
            return Err(HttpError::PayloadTooLarge);
        }
    }
}

fn partial_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    if buf.len() > MAX_CHUNKED_WIRE {
        Err(HttpError::PayloadTooLarge)
    } else {
        Ok(None)
    }
}

/// What [`Reader::poll`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A head is complete and its body is not yet (the caller may refuse early or send
    /// `100 Continue`); the head is in [`Reader::head`].
    Head,
    /// A whole request: head and decoded body.
    Request(Head, Vec<u8>),
}

/// Turns received bytes into requests, one at a time: the pure half of a connection.
///
/// The buffer holds only bytes not yet consumed; once a request is taken and nothing is left,
/// the allocation is released, so an idle keep-alive connection holds no memory.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    /// The head of the request whose body is being read.
    pub head: Option<Head>,
}

impl Reader {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether no request is in progress (nothing buffered, no head pending).
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.head.is_none()
    }

    /// Whether received bytes wait beyond the current head.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next step of parsing. `Ok(None)`: more bytes are needed.
    pub fn poll(&mut self) -> Result<Option<Parsed>, HttpError> {
        match &self.head {
            None => {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let Some(head) = parse_head(&self.buf)? else {
                    return Ok(None);
                };
                self.buf.drain(..head.len);
                self.head = Some(head);
                Ok(Some(Parsed::Head))
            }
            Some(head) => {
                let Some((body, used)) = parse_body(head.body, &self.buf)? else {
                    return Ok(None);
                };
                self.buf.drain(..used);
                if self.buf.is_empty() {
                    self.buf = Vec::new();
                }
                Ok(self.head.take().map(|head| Parsed::Request(head, body)))
            }
        }
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
    s.push_str("{\"detail\": \"");
    for c in detail.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => s.push_str(&format!("\\u{:04x}", c as u32)),
            c => s.push(c),
        }
    }
    s.push_str("\"}");
    s.into_bytes()
}

/// The response for a refused request; it always closes the connection.
pub fn error_response(e: &HttpError) -> Vec<u8> {
    response(
        e.status(),
        "application/json",
        "",
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
        wire.extend_from_slice(b"GET /health HTTP/1.1\r\n\r\n");
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
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 413),
            (b"GET / HTTP/1.1\r\nExpect: something\r\n\r\n", 417),
            (b"GET / HTTP/2.0\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
            (b"GET /\x00 HTTP/1.1\r\n\r\n", 400),
        ];
        for (req, status) in table {
            let e = parse_head(req).unwrap_err();
            assert_eq!(e.status(), *status, "{}: {e}", String::from_utf8_lossy(req));
        }
        let same_twice = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
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
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        assert_eq!(parse_head(&big), Err(HttpError::HeadersTooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("X-{i}: y\r\n").bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(parse_head(&many), Err(HttpError::HeadersTooLarge));
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |req: &[u8]| parse_head(req).unwrap().unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
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
}
