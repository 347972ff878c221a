//! Publish throughput: C keep-alive connections, each sending one publish request at a time
//! (each a newer time for its own environment), for a fixed time, from one mio thread.

use crate::clock::{TimeSource, mono_ns};
use crate::httpc;
use crate::stats::Summary;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// Reconnects allowed over the whole run before giving up on a connection.
const MAX_RECONNECTS: u64 = 10_000;
/// Time given to requests in flight at the end.
const DRAIN_NS: u64 = 2_000_000_000;

/// How publishing requests are built.
pub struct Requests<'a> {
    pub addr: SocketAddr,
    pub host: &'a str,
    /// Path template with `{env}`.
    pub path: &'a str,
    /// Extra header lines (each ending in CRLF).
    pub headers: &'a str,
    /// Body template with `{iso}`, `{epoch}`, `{env}`.
    pub body: &'a str,
    /// Environment key prefix: connection `i` publishes to `{prefix}-qc-{i}`.
    pub prefix: &'a str,
}

/// What the run measured.
#[derive(Debug, Default)]
pub struct QcResult {
    pub conns: usize,
    pub seconds: f64,
    pub ok: u64,
    pub failed: u64,
    pub reconnects: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub latency: Summary,
}

impl QcResult {
    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }
}

struct Conn {
    sock: Option<TcpStream>,
    key: String,
    out: Vec<u8>,
    out_pos: usize,
    inbuf: Vec<u8>,
    sent_at: u64,
    busy: bool,
}

/// Runs the load for `seconds` over `conns` connections.
pub fn run(req: &Requests<'_>, conns: usize, seconds: f64) -> Result<QcResult, String> {
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let mut times = TimeSource::default();
    let mut res = QcResult {
        conns,
        ..QcResult::default()
    };
    let mut lat = Vec::new();
    let mut cs: Vec<Conn> = (0..conns)
        .map(|i| Conn {
            sock: None,
            key: format!("{}-qc-{i}", req.prefix),
            out: Vec::new(),
            out_pos: 0,
            inbuf: Vec::new(),
            sent_at: 0,
            busy: false,
        })
        .collect();
    let start = mono_ns();
    let end = start + (seconds * 1e9) as u64;
    for (i, c) in cs.iter_mut().enumerate() {
        connect(&mut poll, c, i, req.addr)?;
        next_request(c, req, &mut times);
        pump(c, &mut res, &mut lat, end, req, &mut times);
    }
    loop {
        let now = mono_ns();
        let busy = cs.iter().filter(|c| c.busy).count();
        if (now >= end && busy == 0) || now >= end + DRAIN_NS {
            break;
        }
        poll.poll(&mut events, Some(Duration::from_millis(20)))
            .or_else(|e| {
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(format!("poll: {e}"))
                }
            })?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = cs.get_mut(i) else { continue };
            if pump(c, &mut res, &mut lat, end, req, &mut times) == Pump::Reconnect {
                if res.reconnects >= MAX_RECONNECTS {
                    return Err("publish throughput: too many reconnects".into());
                }
                res.reconnects += 1;
                connect(&mut poll, c, i, req.addr)?;
                if mono_ns() < end {
                    next_request(c, req, &mut times);
                    pump(c, &mut res, &mut lat, end, req, &mut times);
                }
            }
        }
    }
    res.seconds = (mono_ns().min(end) - start) as f64 / 1e9;
    res.latency = Summary::of(&mut lat);
    Ok(res)
}

fn connect(poll: &mut Poll, c: &mut Conn, i: usize, addr: SocketAddr) -> Result<(), String> {
    if let Some(mut old) = c.sock.take() {
        let _ = poll.registry().deregister(&mut old);
    }
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("publish throughput: connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut s = TcpStream::from_std(s);
    poll.registry()
        .register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE)
        .map_err(|e| format!("register: {e}"))?;
    c.sock = Some(s);
    c.inbuf.clear();
    c.busy = false;
    Ok(())
}

fn next_request(c: &mut Conn, req: &Requests<'_>, times: &mut TimeSource) {
    let t = times.next();
    let body = req
        .body
        .replace("{iso}", &crate::clock::iso8601(t))
        .replace("{epoch}", &crate::clock::epoch_text(t))
        .replace("{env}", &c.key);
    c.out = httpc::post(
        req.host,
        &req.path.replace("{env}", &c.key),
        req.headers,
        body.as_bytes(),
    );
    c.out_pos = 0;
    c.busy = true;
    c.sent_at = mono_ns();
}

#[derive(PartialEq, Eq)]
enum Pump {
    Wait,
    Reconnect,
}

/// Writes what is pending, reads responses; sends the next request after each one until `end`.
fn pump(
    c: &mut Conn,
    res: &mut QcResult,
    lat: &mut Vec<u64>,
    end: u64,
    req: &Requests<'_>,
    times: &mut TimeSource,
) -> Pump {
    // Each call is bounded: one request per response, one response per read batch.
    for _ in 0..64 {
        let Some(s) = c.sock.as_mut() else {
            return Pump::Reconnect;
        };
        while c.out_pos < c.out.len() {
            match s.write(&c.out[c.out_pos..]) {
                Ok(n) => c.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return fail(c, res),
            }
        }
        let mut buf = [0u8; 16 * 1024];
        let mut eof = false;
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return fail(c, res),
            }
            if c.inbuf.len() > 1 << 20 {
                return fail(c, res);
            }
        }
        let head = match httpc::parse_head(&c.inbuf) {
            None => return if eof { fail(c, res) } else { Pump::Wait },
            Some(Err(_)) => return fail(c, res),
            Some(Ok(h)) => h,
        };
        if (100..200).contains(&head.status) {
            c.inbuf.drain(..head.len);
            continue;
        }
        let Some(body_len) = head.content_length else {
            return fail(c, res);
        };
        if c.inbuf.len() < head.len + body_len {
            return if eof { fail(c, res) } else { Pump::Wait };
        }
        c.inbuf.drain(..head.len + body_len);
        let now = mono_ns();
        c.busy = false;
        *res.statuses.entry(head.status).or_default() += 1;
        if (200..300).contains(&head.status) {
            if now <= end {
                res.ok += 1;
                lat.push(now - c.sent_at);
            }
        } else {
            res.failed += 1;
        }
        if head.close || eof {
            return Pump::Reconnect;
        }
        if now >= end {
            return Pump::Wait;
        }
        next_request(c, req, times);
    }
    Pump::Wait
}

fn fail(c: &mut Conn, res: &mut QcResult) -> Pump {
    if c.busy {
        res.failed += 1;
    }
    c.busy = false;
    Pump::Reconnect
}
