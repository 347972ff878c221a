//! A small blocking HTTP/1.1 client for publishing and scraping, plus loopback URL parsing.
//!
//! Every read and write has a timeout, so no call waits for longer than a few seconds.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Longest response head or body read.
const MAX_RESPONSE: usize = 4 << 20;
/// Timeout of one connect, read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An `http://` URL on this machine. The path may hold placeholders.
#[derive(Debug, Clone)]
pub struct Url {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// Path and query.
    pub path: String,
}

/// Parses `http://HOST:PORT/path`, refusing anything not on the loopback interface.
pub fn parse_url(s: &str) -> Result<Url, String> {
    let rest = s
        .strip_prefix("http://")
        .ok_or_else(|| format!("{s:?}: only http:// URLs are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, p) = h
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: bad IPv6 host"))?;
        (h, p.strip_prefix(':').unwrap_or("80"))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => (hostport, "80"),
        }
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: bad port {port:?}"))?;
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .map_err(|_| format!("{s:?}: the host must be an IP address or localhost"))?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{s:?}: only loopback targets (127.0.0.0/8, ::1) are allowed"
        ));
    }
    Ok(Url {
        addr: SocketAddr::new(ip, port),
        host: hostport.to_owned(),
        path: path.to_owned(),
    })
}

/// A response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: Vec<u8>,
    /// The server will close the connection.
    pub close: bool,
}

/// A keep-alive connection to one server, reopened when the server closes it.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    /// A client for `addr`; connects on first use.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            conn: None,
            buf: Vec::new(),
        }
    }

    /// Sends a complete request (bytes as given) and reads the response. A connection that was
    /// closed while idle is reopened once.
    pub fn send(&mut self, request: &[u8]) -> Result<Response, String> {
        for attempt in 0..2 {
            let fresh = self.conn.is_none();
            match self.try_send(request) {
                Ok(r) => {
                    if r.close {
                        self.conn = None;
                    }
                    return Ok(r);
                }
                Err(e) => {
                    self.conn = None;
                    if fresh || attempt == 1 {
                        return Err(format!("{}: {e}", self.addr));
                    }
                }
            }
        }
        Err(format!("{}: no response", self.addr))
    }

    fn try_send(&mut self, request: &[u8]) -> io::Result<Response> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            self.conn = Some(s);
            self.buf.clear();
        }
        let Some(s) = self.conn.as_mut() else {
            return Err(io::Error::other("not connected"));
        };
        s.write_all(request)?;
        read_response(s, &mut self.buf)
    }
}

/// One request on a fresh connection, `Connection: close`.
pub fn get(url: &Url, path: &str) -> Result<Response, String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        url.host
    );
    Client::new(url.addr).send(req.as_bytes())
}

/// Builds a POST request.
pub fn post(host: &str, path: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Where a response head ends and what it says about the body.
#[derive(Debug, Clone, Copy)]
pub struct HeadInfo {
    /// Length of the head including the blank line.
    pub len: usize,
    /// Status code.
    pub status: u16,
    /// `Content-Length`, if given.
    pub content_length: Option<usize>,
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// `Connection: close`.
    pub close: bool,
}

/// Parses a response head from the start of `buf`; `None` until it is complete.
pub fn parse_head(buf: &[u8]) -> Option<Result<HeadInfo, String>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = match status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
    {
        Some(s) => s,
        None => return Some(Err(format!("bad status line {status_line:?}"))),
    };
    let mut info = HeadInfo {
        len: end,
        status,
        content_length: None,
        chunked: false,
        close: status_line.starts_with("HTTP/1.0"),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            info.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            info.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                info.close = true;
            } else if v.contains("keep-alive") {
                info.close = false;
            }
        }
    }
    Some(Ok(info))
}

fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.len() > MAX_RESPONSE {
        return Err(io::Error::other("response too large"));
    }
    let mut chunk = [0u8; 16 * 1024];
    let n = s.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Response> {
    let started = Instant::now();
    let bounded = |started: Instant| {
        if started.elapsed() > IO_TIMEOUT * 2 {
            Err(io::Error::new(io::ErrorKind::TimedOut, "response too slow"))
        } else {
            Ok(())
        }
    };
    loop {
        // 1xx responses (100 Continue) are skipped.
        let info = loop {
            bounded(started)?;
            if let Some(h) = parse_head(buf) {
                break h.map_err(io::Error::other)?;
            }
            if read_more(s, buf)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head",
                ));
            }
        };
        buf.drain(..info.len);
        if (100..200).contains(&info.status) {
            continue;
        }
        let body = if let Some(n) = info.content_length {
            while buf.len() < n {
                bounded(started)?;
                if read_more(s, buf)? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
                }
            }
            buf.drain(..n).collect()
        } else if info.chunked {
            loop {
                bounded(started)?;
                if let Some((body, used)) = dechunk(buf) {
                    buf.drain(..used);
                    break body;
                }
                if read_more(s, buf)? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
                }
            }
        } else if info.status == 204 || info.status == 304 {
            Vec::new()
        } else {
            while read_more(s, buf)? > 0 {
                bounded(started)?;
            }
            std::mem::take(buf)
        };
        return Ok(Response {
            status: info.status,
            body,
            close: info.close || (info.content_length.is_none() && !info.chunked),
        });
    }
}

/// Decodes a complete chunked body at the start of `buf`: `(body, bytes used)`.
fn dechunk(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let line_end = buf[i..].windows(2).position(|w| w == b"\r\n")? + i;
        let size_text = std::str::from_utf8(&buf[i..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            // Trailers end with a blank line.
            let end = buf[i..].windows(2).position(|w| w == b"\r\n")? + i;
            return Some((body, end + 2));
        }
        if buf.len() < i + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[i..i + size]);
        i += size + 2;
    }
}

/// Reads `name value` lines of a Prometheus exposition into pairs (series with labels).
pub fn prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}
