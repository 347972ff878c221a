//! A worker process: holds thousands of SSE subscribers in one thread with mio, decodes just
//! enough of each stream (head, chunked framing, `data:` lines) to timestamp every event's
//! arrival on `CLOCK_MONOTONIC`, and answers the parent's commands on stdin:
//!
//! - `status`: one line `status key=value ...`;
//! - `counts`: one line `counts c0 c1 ...`, open streams per environment;
//! - `flush`: one line `r <sub> <env> <updated_at µs> <arrival ns>` per event since the last
//!   flush, then `end`;
//! - `quit`: close everything and exit.
//!
//! It exits by itself at its deadline or when stdin closes (the parent is gone).

use crate::clock::mono_ns;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufWriter, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{FromRawFd, OwnedFd};

const STDIN: Token = Token(usize::MAX - 1);
/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest SSE line kept (longer ones are cut; only `data:` lines matter).
const MAX_LINE: usize = 4096;
/// Reads per socket per readiness event before moving on.
const MAX_READS: usize = 64;
/// Largest chunk size accepted.
const MAX_CHUNK: usize = 1 << 24;
/// Events recorded between flushes before further ones are only counted.
const MAX_RECORDS: usize = 4_000_000;

/// What the parent tells a worker on its command line (`key=value` words).
#[derive(Debug, Clone)]
pub struct Config {
    pub dst: SocketAddrV4,
    pub src: Ipv4Addr,
    pub host: String,
    /// Request path with `{env}`.
    pub path: String,
    pub prefix: String,
    pub first_id: u32,
    pub count: u32,
    pub envs: u32,
    /// Connects per second for this worker; 0: unpaced.
    pub rate: f64,
    pub max_inflight: usize,
    pub connect_timeout_ms: u64,
    pub deadline_ms: u64,
    pub reconnects: u32,
}

impl Config {
    /// The command-line words for this configuration.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("dst={}", self.dst),
            format!("src={}", self.src),
            format!("host={}", self.host),
            format!("path={}", self.path),
            format!("prefix={}", self.prefix),
            format!("first={}", self.first_id),
            format!("count={}", self.count),
            format!("envs={}", self.envs),
            format!("rate={}", self.rate),
            format!("inflight={}", self.max_inflight),
            format!("timeout={}", self.connect_timeout_ms),
            format!("deadline={}", self.deadline_ms),
            format!("reconnects={}", self.reconnects),
        ]
    }

    fn parse(args: &[String]) -> Result<Config, String> {
        let get = |k: &str| -> Result<&str, String> {
            args.iter()
                .find_map(|a| a.strip_prefix(k)?.strip_prefix('='))
                .ok_or_else(|| format!("worker: missing {k}="))
        };
        fn p<T: std::str::FromStr>(s: &str, k: &str) -> Result<T, String> {
            s.parse().map_err(|_| format!("worker: bad {k}={s}"))
        }
        Ok(Config {
            dst: p(get("dst")?, "dst")?,
            src: p(get("src")?, "src")?,
            host: get("host")?.to_owned(),
            path: get("path")?.to_owned(),
            prefix: get("prefix")?.to_owned(),
            first_id: p(get("first")?, "first")?,
            count: p(get("count")?, "count")?,
            envs: p::<u32>(get("envs")?, "envs")?.max(1),
            rate: p(get("rate")?, "rate")?,
            max_inflight: p::<usize>(get("inflight")?, "inflight")?.max(1),
            connect_timeout_ms: p(get("timeout")?, "timeout")?,
            deadline_ms: p(get("deadline")?, "deadline")?,
            reconnects: p(get("reconnects")?, "reconnects")?,
        })
    }
}

/// Entry point of `--worker`.
pub fn main(args: &[String]) -> i32 {
    let cfg = match Config::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    crate::procs::raise_nofile();
    match Worker::new(cfg).and_then(Worker::run) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("worker: {e}");
            1
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Head,
    Open,
}

/// Chunked-framing decoder state.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading a size line: value so far, inside an extension.
    Size(usize, bool),
    /// Inside chunk data: bytes left.
    Data(usize),
    /// After chunk data, before its CRLF ends.
    DataEnd,
    /// The last chunk came: the stream is over.
    Done,
}

struct Sub {
    id: u32,
    env: u32,
    sock: TcpStream,
    phase: Phase,
    started: u64,
    reconnects: u32,
    head: Vec<u8>,
    chunked: bool,
    chunk: Chunk,
    line: Vec<u8>,
}

/// One event's arrival.
#[derive(Debug, Clone, Copy)]
struct Rec {
    id: u32,
    env: u32,
    time: i64,
    at: u64,
}

#[derive(Debug, Default)]
struct Counters {
    established: u64,
    open: u64,
    failed: u64,
    dropped: u64,
    reconnected: u64,
    events: u64,
    records_lost: u64,
    bytes: u64,
    first_attempt: u64,
    last_established: u64,
    reasons: BTreeMap<String, u64>,
}

struct Worker {
    cfg: Config,
    poll: Poll,
    subs: Vec<Option<Sub>>,
    free: Vec<usize>,
    pending: VecDeque<(u32, u32)>,
    inflight: VecDeque<(usize, u64)>,
    inflight_n: usize,
    issued: u64,
    paced_from: u64,
    per_env_open: Vec<u64>,
    requests: Vec<Vec<u8>>,
    records: Vec<Rec>,
    c: Counters,
    scratch: Vec<u8>,
    stdin_buf: Vec<u8>,
    out: BufWriter<io::Stdout>,
    deadline: u64,
}

enum Next {
    Go,
    Quit,
}

impl Worker {
    fn new(cfg: Config) -> Result<Worker, String> {
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        set_nonblocking(0).map_err(|e| format!("stdin: {e}"))?;
        poll.registry()
            .register(&mut SourceFd(&0), STDIN, Interest::READABLE)
            .map_err(|e| format!("register stdin: {e}"))?;
        let requests = (0..cfg.envs)
            .map(|e| {
                let key = format!("{}-{e}", cfg.prefix);
                format!(
                    "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: flagsmith-sse-load\r\n\r\n",
                    cfg.path.replace("{env}", &key),
                    cfg.host
                )
                .into_bytes()
            })
            .collect();
        let pending = (cfg.first_id..cfg.first_id + cfg.count)
            .map(|id| (id, 0))
            .collect();
        let now = mono_ns();
        Ok(Worker {
            per_env_open: vec![0; cfg.envs as usize],
            deadline: now + cfg.deadline_ms * 1_000_000,
            cfg,
            poll,
            subs: Vec::new(),
            free: Vec::new(),
            pending,
            inflight: VecDeque::new(),
            inflight_n: 0,
            issued: 0,
            paced_from: now,
            requests,
            records: Vec::new(),
            c: Counters::default(),
            scratch: vec![0; 64 * 1024],
            stdin_buf: Vec::new(),
            out: BufWriter::with_capacity(1 << 20, io::stdout()),
        })
    }

    fn run(mut self) -> Result<(), String> {
        let mut events = Events::with_capacity(4096);
        loop {
            let now = mono_ns();
            if now >= self.deadline {
                eprintln!("worker {}: deadline reached; exiting", self.cfg.src);
                return Ok(());
            }
            let wait_ms = self.connect_more(now);
            self.expire(now);
            let timeout = std::time::Duration::from_millis(wait_ms);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            for ev in events.iter() {
                match ev.token() {
                    STDIN => {
                        if let Next::Quit = self.commands()? {
                            return Ok(());
                        }
                    }
                    Token(t) => self.drive(t, ev.is_read_closed()),
                }
            }
        }
    }

    /// Starts connects the pacing allows; returns how long the loop may sleep (ms).
    fn connect_more(&mut self, now: u64) -> u64 {
        let mut budget = 4 * self.cfg.max_inflight;
        while let Some(&(id, rc)) = self.pending.front() {
            if self.inflight_n >= self.cfg.max_inflight || budget == 0 {
                return 5;
            }
            if self.cfg.rate > 0.0 {
                let due = self.paced_from + (self.issued as f64 * 1e9 / self.cfg.rate) as u64;
                if now < due {
                    return ((due - now) / 1_000_000).clamp(1, 50);
                }
            }
            budget -= 1;
            self.pending.pop_front();
            self.issued += 1;
            if self.c.first_attempt == 0 {
                self.c.first_attempt = now;
            }
            self.open(id, rc, now);
        }
        if self.inflight_n > 0 { 50 } else { 1000 }
    }

    fn open(&mut self, id: u32, reconnects: u32, now: u64) {
        let sock = match connect_from(self.cfg.src, self.cfg.dst) {
            Ok(s) => s,
            Err(e) => {
                self.fail(&format!("connect: {}", errno_name(&e)));
                return;
            }
        };
        let mut sock = TcpStream::from_std(sock);
        let token = self.free.pop().unwrap_or(self.subs.len());
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.fail(&format!("register: {e}"));
            return;
        }
        let sub = Sub {
            id,
            env: id % self.cfg.envs,
            sock,
            phase: Phase::Connecting,
            started: now,
            reconnects,
            head: Vec::new(),
            chunked: false,
            chunk: Chunk::Size(0, false),
            line: Vec::new(),
        };
        if token == self.subs.len() {
            self.subs.push(Some(sub));
        } else {
            self.subs[token] = Some(sub);
        }
        self.inflight_n += 1;
        self.inflight.push_back((token, now));
    }

    fn fail(&mut self, reason: &str) {
        self.c.failed += 1;
        *self.c.reasons.entry(reason.to_owned()).or_default() += 1;
    }

    /// Fails connects that have not produced a response head in time.
    fn expire(&mut self, now: u64) {
        let limit = self.cfg.connect_timeout_ms * 1_000_000;
        while let Some(&(token, started)) = self.inflight.front() {
            let live = self
                .subs
                .get(token)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.started == started && s.phase != Phase::Open);
            if !live {
                self.inflight.pop_front();
                continue;
            }
            if now.saturating_sub(started) < limit {
                break;
            }
            self.inflight.pop_front();
            self.close(token, Some("timeout"));
        }
    }

    /// Removes a subscriber; `Some(reason)`: it never got a stream (a failure).
    fn close(&mut self, token: usize, failure: Option<&str>) {
        let Some(sub) = self.subs.get_mut(token).and_then(Option::take) else {
            return;
        };
        self.free.push(token);
        let mut sock = sub.sock;
        let _ = self.poll.registry().deregister(&mut sock);
        drop(sock);
        if sub.phase == Phase::Open {
            self.c.open -= 1;
            if let Some(n) = self.per_env_open.get_mut(sub.env as usize) {
                *n -= 1;
            }
            self.c.dropped += 1;
            if sub.reconnects < self.cfg.reconnects {
                self.c.reconnected += 1;
                self.pending.push_back((sub.id, sub.reconnects + 1));
            }
        } else {
            self.inflight_n -= 1;
            self.fail(failure.unwrap_or("closed before the response head"));
        }
    }

    /// Handles an event of subscriber `token`; `read_closed`: the peer's FIN had arrived.
    fn drive(&mut self, token: usize, read_closed: bool) {
        let Some(sub) = self.subs.get_mut(token).and_then(Option::as_mut) else {
            return;
        };
        if sub.phase == Phase::Connecting {
            match sub.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let why = format!("connect: {}", errno_name(&e));
                    return self.close(token, Some(&why));
                }
            }
            match sub.sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => {
                    let why = format!("connect: {}", errno_name(&e));
                    return self.close(token, Some(&why));
                }
            }
            let req = &self.requests[sub.env as usize];
            match sub.sock.write(req) {
                Ok(n) if n == req.len() => sub.phase = Phase::Head,
                _ => return self.close(token, Some("request write")),
            }
        }
        for _ in 0..MAX_READS {
            let Some(sub) = self.subs.get_mut(token).and_then(Option::as_mut) else {
                return;
            };
            match sub.sock.read(&mut self.scratch) {
                Ok(0) => return self.close(token, None),
                Ok(n) => {
                    let at = mono_ns();
                    self.c.bytes += n as u64;
                    let data = std::mem::take(&mut self.scratch);
                    let r = self.take(token, &data[..n], at);
                    let drained = n < data.len();
                    self.scratch = data;
                    if let Err(why) = r {
                        return self.close(token, Some(&why));
                    }
                    // A TCP read that returns less than asked for has emptied the receive
                    // queue, and anything arriving later raises a new edge: no read to see
                    // WouldBlock (one system call less per event on the measuring side). Not
                    // when the event came with the peer's FIN: that read consumed the FIN
                    // without an edge to follow, and only the next read returns the end.
                    if drained && !read_closed {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = format!("read: {}", errno_name(&e));
                    return self.close(token, Some(&why));
                }
            }
        }
    }

    /// Handles bytes received at `at`.
    fn take(&mut self, token: usize, mut data: &[u8], at: u64) -> Result<(), String> {
        let Some(sub) = self.subs.get_mut(token).and_then(Option::as_mut) else {
            return Ok(());
        };
        if sub.phase == Phase::Head {
            sub.head.extend_from_slice(data);
            let Some(end) = sub.head.windows(4).position(|w| w == b"\r\n\r\n") else {
                return if sub.head.len() > MAX_HEAD {
                    Err("response head too large".into())
                } else {
                    Ok(())
                };
            };
            let head = String::from_utf8_lossy(&sub.head[..end]).to_ascii_lowercase();
            let status = head.get(9..12).unwrap_or("???").to_owned();
            if !head.starts_with("http/1.") || status != "200" {
                return Err(format!("status {status}"));
            }
            sub.chunked = head
                .lines()
                .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
            let rest = sub.head.split_off(end + 4);
            sub.head = Vec::new();
            sub.phase = Phase::Open;
            self.inflight_n -= 1;
            self.c.established += 1;
            self.c.open += 1;
            self.c.last_established = at;
            if let Some(n) = self.per_env_open.get_mut(sub.env as usize) {
                *n += 1;
            }
            return self.body(token, &rest, at);
        }
        while !data.is_empty() {
            let n = data.len().min(64 * 1024);
            self.body(token, &data[..n], at)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Decodes body bytes (chunked or not) into lines.
    fn body(&mut self, token: usize, data: &[u8], at: u64) -> Result<(), String> {
        let Some(sub) = self.subs.get_mut(token).and_then(Option::as_mut) else {
            return Ok(());
        };
        let mut found: Vec<i64> = Vec::new();
        if !sub.chunked {
            lines(&mut sub.line, data, &mut found);
        } else {
            let mut i = 0;
            while i < data.len() {
                match sub.chunk {
                    Chunk::Size(v, ext) => {
                        let b = data[i];
                        i += 1;
                        sub.chunk = match b {
                            b'\n' if v == 0 => Chunk::Done,
                            b'\n' => Chunk::Data(v),
                            b'\r' => Chunk::Size(v, ext),
                            b';' => Chunk::Size(v, true),
                            _ if ext => Chunk::Size(v, ext),
                            _ => {
                                let d = (b as char)
                                    .to_digit(16)
                                    .ok_or_else(|| "bad chunk size".to_owned())?;
                                let v = v * 16 + d as usize;
                                if v > MAX_CHUNK {
                                    return Err("chunk too large".into());
                                }
                                Chunk::Size(v, false)
                            }
                        };
                    }
                    Chunk::Data(left) => {
                        let n = left.min(data.len() - i);
                        lines(&mut sub.line, &data[i..i + n], &mut found);
                        i += n;
                        sub.chunk = if n == left {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - n)
                        };
                    }
                    Chunk::DataEnd => {
                        if data[i] == b'\n' {
                            sub.chunk = Chunk::Size(0, false);
                        }
                        i += 1;
                    }
                    Chunk::Done => break,
                }
            }
        }
        let (id, env) = (sub.id, sub.env);
        for time in found {
            self.c.events += 1;
            if self.records.len() < MAX_RECORDS {
                self.records.push(Rec { id, env, time, at });
            } else {
                self.c.records_lost += 1;
            }
        }
        Ok(())
    }

    fn commands(&mut self) -> Result<Next, String> {
        let mut buf = [0u8; 4096];
        for _ in 0..1024 {
            // SAFETY: read(2) into a buffer of the given length; fd 0 is our stdin pipe.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                return Ok(Next::Quit);
            }
            if n > 0 {
                self.stdin_buf.extend_from_slice(&buf[..n as usize]);
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => break,
                io::ErrorKind::Interrupted => {}
                _ => return Err(format!("stdin: {e}")),
            }
        }
        while let Some(nl) = self.stdin_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=nl).collect();
            let cmd = String::from_utf8_lossy(&line).trim().to_owned();
            let r = match cmd.as_str() {
                "status" => self.status(),
                "counts" => {
                    let mut s = String::from("counts");
                    for n in &self.per_env_open {
                        s.push(' ');
                        s.push_str(&n.to_string());
                    }
                    writeln!(self.out, "{s}")
                }
                "flush" => self.flush_records(),
                "quit" => return Ok(Next::Quit),
                other => writeln!(self.out, "error unknown command {other:?}"),
            };
            r.and_then(|()| self.out.flush())
                .map_err(|e| format!("stdout: {e}"))?;
        }
        Ok(Next::Go)
    }

    fn status(&mut self) -> io::Result<()> {
        let reasons: Vec<String> = self
            .c
            .reasons
            .iter()
            .map(|(k, v)| format!("{}:{v}", k.replace([' ', ','], "_")))
            .collect();
        writeln!(
            self.out,
            "status established={} open={} failed={} dropped={} reconnected={} inflight={} pending={} events={} lost={} bytes={} first={} last={} reasons={}",
            self.c.established,
            self.c.open,
            self.c.failed,
            self.c.dropped,
            self.c.reconnected,
            self.inflight_n,
            self.pending.len(),
            self.c.events,
            self.c.records_lost,
            self.c.bytes,
            self.c.first_attempt,
            self.c.last_established,
            if reasons.is_empty() {
                "-".to_owned()
            } else {
                reasons.join(",")
            }
        )
    }

    fn flush_records(&mut self) -> io::Result<()> {
        for r in std::mem::take(&mut self.records) {
            writeln!(self.out, "r {} {} {} {}", r.id, r.env, r.time, r.at)?;
        }
        writeln!(self.out, "end")
    }
}

/// Splits `data` into SSE lines (continuing `line`), collecting `updated_at` of `data:` lines.
fn lines(line: &mut Vec<u8>, data: &[u8], found: &mut Vec<i64>) {
    let mut rest = data;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let part = &rest[..nl];
        if line.is_empty() {
            data_line(part, found);
        } else {
            extend_capped(line, part);
            data_line(line, found);
            line.clear();
        }
        rest = &rest[nl + 1..];
    }
    extend_capped(line, rest);
}

fn extend_capped(line: &mut Vec<u8>, part: &[u8]) {
    let room = MAX_LINE.saturating_sub(line.len());
    line.extend_from_slice(&part[..part.len().min(room)]);
}

/// If `line` is a `data:` line with an `updated_at`, collects the time in microseconds.
fn data_line(line: &[u8], found: &mut Vec<i64>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    if let Some(t) = updated_at(data) {
        found.push(t);
    }
}

/// The `updated_at` value of a JSON text: a number of epoch seconds or an ISO-8601 string.
pub fn updated_at(json: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"updated_at\"";
    let at = json.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = std::str::from_utf8(&json[at..]).ok()?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        let end = s.find('"')?;
        flagsmith_sse::timestamp::parse_iso8601(&s[..end]).ok()
    } else {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
            .unwrap_or(rest.len());
        flagsmith_sse::timestamp::parse_epoch_seconds(&rest[..end]).ok()
    }
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns, with integer arguments.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A non-blocking TCP socket bound to `src` (port chosen at connect time, so that one source
/// address serves many destinations) with its connect to `dst` under way.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<std::net::TcpStream> {
    // SAFETY: plain socket creation; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a c_int and its size. Failure only costs ports.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let local = sin(SocketAddrV4::new(src, 0));
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: local is a sockaddr_in of length len.
    if unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sin(dst);
    // SAFETY: remote is a sockaddr_in of length len.
    if unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(std::net::TcpStream::from(owned))
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EMFILE) => "EMFILE".into(),
        Some(libc::ENFILE) => "ENFILE".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(n) => format!("errno{n}"),
        None => e.kind().to_string(),
    }
}
