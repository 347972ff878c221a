//! Test helpers: the real binary on a free port, a real `redis-server`, and small HTTP and SSE
//! clients over real sockets. Every wait is bounded.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The token every test server is started with.
pub const TOKEN: &str = "test-token";

/// Runs a test binary's tests one at a time (each test binary has its own lock): for tests that
/// start many processes or sockets, or print timings.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A value from the server's /metrics (0 when absent).
pub fn metric(server: &Server, series: &str) -> f64 {
    server.metrics().get(series).copied().unwrap_or(0.0)
}

/// `flagsmith_sse_connections_rejected_total{reason}` of the server.
pub fn rejected(server: &Server, reason: &str) -> f64 {
    metric(
        server,
        &format!("flagsmith_sse_connections_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// Reads until EOF. An error (a reset, or nothing for `timeout`) is returned as such: a server
/// that closes gracefully never causes one.
pub fn read_to_eof(s: &mut TcpStream, timeout: Duration) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(timeout))?;
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// The `flagsmith-sse` binary, to run with no environment but `PATH` and what the test adds.
pub fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flagsmith-sse"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

/// A running `flagsmith-sse` binary.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the binary with the test token, on 127.0.0.1 and a free port, plus `env`.
    #[track_caller]
    pub fn start(env: &[(&str, &str)]) -> Server {
        Server::start_with(env, |_| {})
    }

    /// Like [`Server::start`], with a hook to adjust the command (e.g. wrap it in prlimit).
    #[track_caller]
    pub fn start_with(env: &[(&str, &str)], adjust: impl FnOnce(&mut Command)) -> Server {
        let mut cmd = binary();
        cmd.env("SSE_AUTHENTICATION_TOKEN", TOKEN)
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("PORT", "0")
            .env("LOG_LEVEL", "debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        adjust(&mut cmd);
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("start flagsmith-sse");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1) {
                    // A JSON line (LOG_FORMAT=json) closes the message with a quote.
                    let addr = rest.split('"').next().unwrap_or(rest);
                    let _ = tx.send(addr.trim().to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Server { child, addr, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`.
    #[track_caller]
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.log.lock().unwrap().iter().any(|l| l.contains(needle))
        })
    }

    /// Waits until a log line contains `needle`; fails the test, showing the log, if none does
    /// within `timeout`.
    #[track_caller]
    pub fn assert_log(&self, needle: &str, timeout: Duration) {
        assert!(
            self.wait_log(needle, timeout),
            "no log line with {needle:?} within {timeout:?}:\n{}",
            self.log()
        );
    }

    /// Sends a signal to the process.
    #[track_caller]
    pub fn signal(&self, sig: &str) {
        signal_pid(self.pid(), sig);
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Reads a field of /proc/<pid>/status, in kB (e.g. "VmRSS").
    pub fn proc_status_kb(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = text.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Number of open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time (user + system) of the process so far, from /proc/<pid>/stat.
    pub fn cpu_time(&self) -> Duration {
        let text =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = text.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    /// Scrapes /metrics into a map from series (name with labels) to value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let r = request(
            self.addr,
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        String::from_utf8_lossy(&r.body)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 10 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `sig` (e.g. "STOP", "CONT", "TERM") to a process of the test's own, by pid.
#[track_caller]
pub fn signal_pid(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// Waits (polling every 20 ms) until `child` exits: its status, or `None` after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for a child server started at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of our own on a free port, stopped by its pid on drop.
pub struct Redis {
    child: Child,
    /// Its port.
    pub port: u16,
    dir: std::path::PathBuf,
    /// Its arguments after the common ones, for [`Redis::restart`].
    extra: Vec<String>,
    /// What `redis-cli` needs besides host and port (TLS, credentials).
    cli_args: Vec<String>,
}

impl Redis {
    /// Starts `redis-server` with no persistence and waits until it answers PING.
    #[track_caller]
    pub fn start() -> Redis {
        Redis::start_args(&[])
    }

    /// Starts `redis-server` with extra arguments.
    #[track_caller]
    pub fn start_args(extra: &[&str]) -> Redis {
        let port = free_port();
        Redis::start_on(port, extra)
    }

    /// Starts `redis-server` on `port` (e.g. again after [`Redis::stop`]).
    #[track_caller]
    pub fn start_on(port: u16, extra: &[&str]) -> Redis {
        Redis::start_with_cli(port, extra, &[])
    }

    /// Starts `redis-server` on `port`; `redis-cli` gets `cli_args` (e.g. `--tls`, `--user`).
    #[track_caller]
    pub fn start_with_cli(port: u16, extra: &[&str], cli_args: &[&str]) -> Redis {
        let dir = std::env::temp_dir().join(format!("fsse-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut r = Redis {
            child: Redis::spawn(port, &dir, extra),
            port,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            cli_args: cli_args.iter().map(|a| a.to_string()).collect(),
        };
        r.wait_up();
        r
    }

    /// Stops the server and starts it again with the same arguments and directory.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Redis::spawn(self.port, &self.dir, &extra);
        self.wait_up();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process id the server reports in `INFO server`.
    #[track_caller]
    pub fn process_id(&self) -> u32 {
        self.cli(&["INFO", "server"])
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("process_id in INFO server")
    }

    #[track_caller]
    fn wait_up(&mut self) {
        let up = wait_until(Duration::from_secs(10), || {
            self.cli(&["PING"]).is_some_and(|o| o.contains("PONG"))
        });
        if !up {
            self.stop();
            panic!("redis-server did not start");
        }
    }

    fn spawn(port: u16, dir: &std::path::Path, extra: &[&str]) -> Child {
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)")
    }

    /// The URL to give the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.cli_args)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// How many clients are subscribed to `channel` (`PUBSUB NUMSUB`); `None` if the node did
    /// not answer.
    pub fn subscribers(&self, channel: &str) -> Option<u32> {
        self.cli(&["PUBSUB", "NUMSUB", channel])?
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until this replica reports its link to the primary up; fails the test after
    /// `timeout`.
    #[track_caller]
    pub fn wait_linked(&self, timeout: Duration) {
        assert!(
            wait_until(timeout, || self
                .cli(&["INFO", "replication"])
                .is_some_and(|i| i.contains("master_link_status:up"))),
            "the replica did not connect to its primary"
        );
    }

    /// `calls` of a command in `INFO commandstats`.
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]).unwrap_or_default();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Stops the server (SIGKILL to its own pid) and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What `redis-cli` needs to act as the `admin` user of [`Redis::start_acl`].
pub const ADMIN: &[&str] = &["--user", "admin", "--pass", "admin-pw", "--no-auth-warning"];

impl Redis {
    /// Starts `redis-server` whose default user is off, with an `admin` user (all commands,
    /// keys and channels; password `admin-pw`) for the test's `redis-cli`, plus `users`
    /// (further `--user NAME RULES...` arguments).
    #[track_caller]
    pub fn start_acl(users: &[&str]) -> Redis {
        let mut args = vec![
            "--user",
            "default",
            "off",
            "--user",
            "admin",
            "on",
            ">admin-pw",
            "~*",
            "&*",
            "+@all",
        ];
        args.extend_from_slice(users);
        Redis::start_with_cli(free_port(), &args, ADMIN)
    }
}

/// A response read from a socket.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response with a Content-Length body (or up to EOF) from `s`.
#[track_caller]
pub fn read_response(s: &mut TcpStream) -> Response {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => panic!(
                "connection closed in the response head: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(_) => buf.push(byte[0]),
            Err(e) => panic!(
                "reading the response head: {e}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            s.read_exact(&mut body).expect("response body");
        }
        None if status == 100 || status == 204 => {}
        None => {
            let _ = s.read_to_end(&mut body);
        }
    }
    Response {
        status,
        headers,
        body,
    }
}

/// Sends raw bytes on a new connection and reads one response.
#[track_caller]
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(raw).expect("send request");
    read_response(&mut s)
}

/// POSTs a queue-change with the test token.
#[track_caller]
pub fn queue_change(addr: SocketAddr, key: &str, body: &str) -> Response {
    queue_change_with(addr, key, body, Some(TOKEN))
}

/// POSTs a queue-change with the given token (or none).
#[track_caller]
pub fn queue_change_with(addr: SocketAddr, key: &str, body: &str, token: Option<&str>) -> Response {
    let auth = token
        .map(|t| format!("Authorization: Token {t}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "POST /sse/environments/{key}/queue-change HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    request(addr, raw.as_bytes())
}

/// One item of an event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An `environment_updated` event with its raw `updated_at` text.
    Update(String),
    /// The `: ping` keep-alive comment.
    Ping,
    /// Anything else (test failure material).
    Other(String),
}

/// A subscriber: reads the stream head, then decodes chunks into events.
pub struct Subscriber {
    /// The socket.
    pub sock: TcpStream,
    /// Response head.
    pub head: String,
    chunked: bool,
    /// Decoded but not yet consumed event text.
    text: String,
    /// Raw bytes not yet decoded.
    raw: Vec<u8>,
    /// The final chunk arrived or the connection closed.
    pub ended: bool,
    /// Every raw byte received after the head, for exact-byte checks.
    pub wire: Vec<u8>,
}

impl Subscriber {
    /// Subscribes with HTTP/1.1.
    #[track_caller]
    pub fn connect(addr: SocketAddr, key: &str) -> Subscriber {
        Subscriber::connect_version(addr, key, "1.1")
    }

    /// Subscribes with the given HTTP version ("1.0" or "1.1").
    #[track_caller]
    pub fn connect_version(addr: SocketAddr, key: &str, version: &str) -> Subscriber {
        let mut sock = TcpStream::connect(addr).expect("connect");
        let req = format!(
            "GET /sse/environments/{key}/stream HTTP/{version}\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n"
        );
        sock.write_all(req.as_bytes()).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match sock.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                other => panic!(
                    "stream head incomplete ({other:?}): {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "not a stream: {head}");
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Subscriber {
            sock,
            head,
            chunked,
            text: String::new(),
            raw: Vec::new(),
            ended: false,
            wire: Vec::new(),
        }
    }

    fn decode(&mut self) {
        if !self.chunked {
            self.text.push_str(&String::from_utf8_lossy(&self.raw));
            self.raw.clear();
            return;
        }
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = String::from_utf8_lossy(&self.raw[..eol]).into_owned();
            let size = usize::from_str_radix(size_line.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
            if size == 0 {
                if self.raw.len() >= eol + 4 {
                    self.ended = true;
                    self.raw.drain(..eol + 4);
                }
                return;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            let data = String::from_utf8_lossy(&self.raw[eol + 2..eol + 2 + size]).into_owned();
            assert_eq!(
                &self.raw[eol + 2 + size..eol + 4 + size],
                b"\r\n",
                "chunk not followed by CRLF"
            );
            self.text.push_str(&data);
            self.raw.drain(..eol + 4 + size);
        }
    }

    fn take_item(&mut self) -> Option<Item> {
        let end = self.text.find("\n\n")?;
        let block: String = self.text.drain(..end + 2).collect();
        if block == ": ping\n\n" {
            return Some(Item::Ping);
        }
        let prefix = "event: environment_updated\ndata: {\"updated_at\": ";
        let suffix = "}\nretry: 15000\n\n";
        if let Some(v) = block
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
        {
            return Some(Item::Update(v.to_owned()));
        }
        Some(Item::Other(block))
    }

    /// The next item, or `None` if none arrives within `timeout` or the stream ended.
    pub fn next(&mut self, timeout: Duration) -> Option<Item> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(item) = self.take_item() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 4096];
            match self.sock.read(&mut buf) {
                Ok(0) => {
                    self.ended = true;
                }
                Ok(n) => {
                    self.wire.extend_from_slice(&buf[..n]);
                    self.raw.extend_from_slice(&buf[..n]);
                    self.decode();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                Err(_) => self.ended = true,
            }
        }
    }

    /// The next update's `updated_at` text, skipping pings.
    pub fn next_update(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left)? {
                Item::Update(v) => return Some(v),
                Item::Ping => {}
                Item::Other(o) => panic!("unexpected stream content {o:?}"),
            }
        }
    }

    /// Waits for the stream to end (final chunk or EOF); true if it did within `timeout`.
    pub fn wait_end(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.next(left);
        }
        true
    }
}

/// A client socket with a small receive buffer (SO_RCVBUF set before connecting, so the
/// advertised window stays small): a reader that can be made to stall.
#[track_caller]
pub fn connect_small_rcvbuf(addr: SocketAddr, bytes: usize) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket creation; the descriptor is owned by the TcpStream below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is fresh and nobody else owns it.
    let sock = unsafe { TcpStream::from_raw_fd(fd) };
    let size = bytes as libc::c_int;
    // SAFETY: the option value is a c_int that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sin is a valid sockaddr_in of the length given.
    let rc = unsafe {
        libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    sock
}

/// Closes `sock` with SO_LINGER 0, so that the peer gets a RST instead of a FIN.
pub fn reset(sock: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value is a linger struct that lives across the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(sock);
}

/// A subscription request for `key` (HTTP/1.1).
pub fn stream_request(key: &str) -> String {
    format!(
        "GET /sse/environments/{key}/stream HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n"
    )
}

/// A queue-change body whose time is `secs + 0.25` epoch seconds; the event carries
/// [`update_text`] of the same `secs`.
pub fn update_body(secs: u64) -> String {
    format!("{{\"updated_at\": {secs}.25}}")
}

/// The `updated_at` text an event carries for [`update_body`] of `secs`.
pub fn update_text(secs: u64) -> String {
    format!("{secs}.25")
}

/// A keep-alive connection that POSTs queue-changes one after another.
pub struct Poster {
    /// The socket.
    pub sock: TcpStream,
}

impl Poster {
    /// Connects.
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Poster {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_nodelay(true).unwrap();
        Poster { sock }
    }

    /// POSTs `body` for `key` and reads the response; the connection stays open.
    #[track_caller]
    pub fn post(&mut self, key: &str, body: &str) -> Response {
        let raw = format!(
            "POST /sse/environments/{key}/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.sock.write_all(raw.as_bytes()).expect("send");
        read_response(&mut self.sock)
    }
}

/// Many subscribers read by one `mio::Poll`: each remembers the newest `updated_at` text it
/// got and how many updates it saw.
pub struct Crowd {
    poll: mio::Poll,
    events: mio::Events,
    /// The sockets (None once closed).
    pub socks: Vec<Option<mio::net::TcpStream>>,
    bufs: Vec<Vec<u8>>,
    /// Whether each one's response head is in.
    pub headed: Vec<bool>,
    /// Every update each one got, in order.
    pub history: Vec<Vec<String>>,
    /// Whether each one saw its stream end (final chunk, EOF or reset).
    pub ended: Vec<bool>,
    /// Whether each one got the final chunk of its stream.
    pub finished: Vec<bool>,
}

impl Crowd {
    /// Connects `n` subscribers to `key` and waits until every one has its response head.
    #[track_caller]
    pub fn connect(addr: SocketAddr, key: &str, n: usize) -> Crowd {
        let mut c = Crowd {
            poll: mio::Poll::new().unwrap(),
            events: mio::Events::with_capacity(1024),
            socks: Vec::new(),
            bufs: Vec::new(),
            headed: Vec::new(),
            history: Vec::new(),
            ended: Vec::new(),
            finished: Vec::new(),
        };
        c.add(addr, key, n);
        c
    }

    /// Adds `n` subscribers to `key` and waits for their heads.
    #[track_caller]
    pub fn add(&mut self, addr: SocketAddr, key: &str, n: usize) {
        let req = stream_request(key);
        for _ in 0..n {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(req.as_bytes()).expect("send");
            s.set_nonblocking(true).unwrap();
            let mut s = mio::net::TcpStream::from_std(s);
            let i = self.socks.len();
            self.poll
                .registry()
                .register(&mut s, mio::Token(i), mio::Interest::READABLE)
                .unwrap();
            self.socks.push(Some(s));
            self.bufs.push(Vec::new());
            self.headed.push(false);
            self.history.push(Vec::new());
            self.ended.push(false);
            self.finished.push(false);
        }
        let ok = self.pump_until(Duration::from_secs(30), |c| c.headed.iter().all(|&h| h));
        let missing = self.headed.iter().filter(|&&h| !h).count();
        assert!(
            ok,
            "{missing} of {} subscribers got no stream head",
            self.len()
        );
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.socks.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }

    /// Reads whatever is ready, waiting at most `wait` for something.
    pub fn pump(&mut self, wait: Duration) {
        if self.poll.poll(&mut self.events, Some(wait)).is_err() {
            return;
        }
        let ready: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        for i in ready {
            self.read(i);
        }
    }

    /// Pumps until `done` holds or `timeout` passes; true if it held.
    pub fn pump_until(&mut self, timeout: Duration, mut done: impl FnMut(&Crowd) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.pump(left.min(Duration::from_millis(50)));
        }
    }

    /// The newest update subscriber `i` got.
    pub fn latest(&self, i: usize) -> Option<&str> {
        self.history.get(i)?.last().map(String::as_str)
    }

    /// How many updates subscriber `i` got.
    pub fn count(&self, i: usize) -> usize {
        self.history.get(i).map_or(0, Vec::len)
    }

    /// Whether every open subscriber's newest update is `text`.
    pub fn all_have(&self, text: &str) -> bool {
        (0..self.history.len()).all(|i| self.ended[i] || self.latest(i) == Some(text))
    }

    /// Closes subscriber `i` (FIN).
    pub fn close(&mut self, i: usize) {
        if let Some(mut s) = self.socks.get_mut(i).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut s);
        }
    }

    fn read(&mut self, i: usize) {
        let Some(Some(s)) = self.socks.get_mut(i) else {
            return;
        };
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => {
                    self.ended[i] = true;
                    break;
                }
                Ok(n) => self.bufs[i].extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.ended[i] = true;
                    break;
                }
            }
        }
        let buf = &mut self.bufs[i];
        let mut used = 0;
        if !self.headed[i] {
            match buf.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(p) => {
                    assert!(
                        buf.starts_with(b"HTTP/1.1 200 "),
                        "not a stream: {:?}",
                        String::from_utf8_lossy(&buf[..p])
                    );
                    self.headed[i] = true;
                    used = p + 4;
                }
                None => return,
            }
        }
        const KEY: &[u8] = b"{\"updated_at\": ";
        loop {
            let rest = &buf[used..];
            let Some(start) = rest.windows(KEY.len()).position(|w| w == KEY) else {
                break;
            };
            let Some(len) = rest[start + KEY.len()..].iter().position(|&b| b == b'}') else {
                break;
            };
            let v = &rest[start + KEY.len()..start + KEY.len() + len];
            let text = String::from_utf8_lossy(v).into_owned();
            self.history[i].push(text);
            used += start + KEY.len() + len + 1;
        }
        if buf[used..].ends_with(b"\r\n0\r\n\r\n") || buf[used..] == *b"0\r\n\r\n" {
            self.finished[i] = true;
            self.ended[i] = true;
        }
        // Keep a possible partial event; everything before it is consumed.
        let keep_from = buf[used..]
            .iter()
            .position(|&b| b == b'{')
            .map_or(buf.len(), |p| used + p);
        buf.drain(..keep_from);
    }
}

/// Sets the open-file limit (soft and hard) of the command's process before it starts.
pub fn limit_nofile(cmd: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Changes the open-file limit of a running process.
#[track_caller]
pub fn set_nofile_of(pid: u32, soft: u64, hard: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit reads the struct we pass and writes nothing (old limit pointer is null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The median and the maximum of `samples`.
pub fn median_max(samples: &[Duration]) -> (Duration, Duration) {
    let mut v = samples.to_vec();
    v.sort();
    (
        v.get(v.len() / 2).copied().unwrap_or_default(),
        v.last().copied().unwrap_or_default(),
    )
}

/// A test CA and a server certificate it signed for `localhost` and `127.0.0.1`, made with
/// `openssl` in a temporary directory that is removed on drop.
pub struct Certs {
    /// The directory holding `ca.crt`, `server.crt` and `server.key`.
    pub dir: std::path::PathBuf,
}

impl Certs {
    /// Generates the certificates (ECDSA P-256, valid for a day); `name` keeps sets apart.
    #[track_caller]
    pub fn generate(name: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("fsse-certs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("certificate directory");
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        let ca_subject = format!("/CN=flagsmith-sse test CA {name}");
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let steps = [
            format!("req -x509 {ec} -keyout ca.key -out ca.crt -days 1 -subj"),
            format!("req -new {ec} -keyout server.key -out server.csr -subj /CN=localhost"),
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
             -days 1 -extfile server.ext"
                .to_owned(),
        ];
        for (i, step) in steps.iter().enumerate() {
            let mut cmd = Command::new("openssl");
            cmd.current_dir(&dir).args(step.split_whitespace());
            if i == 0 {
                cmd.arg(&ca_subject);
            }
            let out = cmd
                .output()
                .expect("openssl must be installed (the README's test command installs it)");
            assert!(
                out.status.success(),
                "openssl {step}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Certs { dir }
    }

    /// A file in the directory, as a string.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Redis {
    /// Starts `redis-server` that speaks only TLS, on a free port, with `certs`' server
    /// certificate; clients need no certificate of their own.
    #[track_caller]
    pub fn start_tls(certs: &Certs) -> Redis {
        let (cert, key, ca) = (
            certs.path("server.crt"),
            certs.path("server.key"),
            certs.path("ca.crt"),
        );
        // The common `--port` is overridden: no plain-text port, TLS on this one.
        let port = free_port();
        let tls_port = port.to_string();
        Redis::start_with_cli(
            port,
            &[
                "--port",
                "0",
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ],
            &["--tls", "--cacert", &ca],
        )
    }
}

/// A Redis Cluster of three primaries on free ports (client and bus), joined with
/// `redis-cli --cluster create`. Its nodes are stopped by pid on drop.
pub struct Cluster {
    /// The nodes.
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// Starts three nodes, creates the cluster and waits until every node says it is ok.
    #[track_caller]
    pub fn start() -> Cluster {
        let nodes: Vec<Redis> = (0..3).map(|_| Cluster::start_node()).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let c = Cluster { nodes };
        assert!(
            c.wait_ok(Duration::from_secs(20)),
            "the cluster did not become ok"
        );
        c
    }

    /// Starts a cluster-enabled `redis-server` on free ports (client and bus), not yet joined.
    #[track_caller]
    fn start_node() -> Redis {
        let bus = free_port().to_string();
        Redis::start_on(
            free_port(),
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus,
                // No node is marked as failed while a test stops or restarts one.
                "--cluster-node-timeout",
                "60000",
            ],
        )
    }

    /// Adds a replica of node `primary` to the cluster and waits (20 s at most) until its
    /// link to the primary is up. The replica is not in [`Cluster::nodes`].
    #[track_caller]
    pub fn add_replica(&self, primary: usize) -> Redis {
        let replica = Cluster::start_node();
        let primary = &self.nodes[primary];
        let id = primary
            .cli(&["CLUSTER", "MYID"])
            .expect("CLUSTER MYID")
            .trim()
            .to_owned();
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node"])
            .arg(format!("127.0.0.1:{}", replica.port))
            .arg(format!("127.0.0.1:{}", primary.port))
            .args(["--cluster-slave", "--cluster-master-id", &id])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "add-node: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        replica.wait_linked(Duration::from_secs(20));
        replica
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            })
        })
    }

    /// Every node's URL, comma-separated: the seed list for `REDIS_URL`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node that holds `key`'s slot.
    #[track_caller]
    pub fn owner_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT");
        let owns = |n: &Redis| {
            let nodes = n.cli(&["CLUSTER", "NODES"]).unwrap_or_default();
            let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
                return false;
            };
            me.split_whitespace().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            })
        };
        self.nodes
            .iter()
            .position(owns)
            .unwrap_or_else(|| panic!("no node holds slot {slot}"))
    }
}

/// The status `/health/readiness/` answers.
#[track_caller]
pub fn readiness(addr: SocketAddr) -> u16 {
    request(
        addr,
        b"GET /health/readiness/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .status
}

/// Whether `/health/readiness/` answers `status` within `timeout` (asking every 10 ms).
pub fn readiness_within(addr: SocketAddr, status: u16, timeout: Duration) -> bool {
    wait_until(timeout, || readiness(addr) == status)
}

/// Waits (10 s at most) until the server's readiness is 200.
#[track_caller]
pub fn wait_ready(server: &Server) {
    assert!(
        readiness_within(server.addr, 200, Duration::from_secs(10)),
        "instance not ready; log:\n{}",
        server.log()
    );
}

/// Waits (10 s at most each) until the instance is ready and its wake-up listener subscribed.
#[track_caller]
pub fn wait_listening(server: &Server) {
    wait_ready(server);
    assert!(
        server.wait_log("listening for wake-ups on", Duration::from_secs(10)),
        "the wake-up listener did not subscribe:\n{}",
        server.log()
    );
}

/// `micros` as epoch seconds, the way the server writes `updated_at`.
pub fn epoch_text(micros: i64) -> String {
    let mut out = Vec::new();
    flagsmith_sse::timestamp::write_epoch_seconds(micros, &mut out);
    String::from_utf8(out).unwrap()
}

/// POSTs `micros` (as epoch seconds) for `key`.
#[track_caller]
pub fn post_micros(addr: SocketAddr, key: &str, micros: i64) -> Response {
    queue_change(
        addr,
        key,
        &format!("{{\"updated_at\": {}}}", epoch_text(micros)),
    )
}

/// POSTs `micros` and expects a 200 whose body names the stored time.
#[track_caller]
pub fn post_ok(addr: SocketAddr, key: &str, micros: i64, stored: i64) {
    let r = post_micros(addr, key, micros);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains(&epoch_text(stored)),
        "stored time {} not in {}",
        epoch_text(stored),
        r.text()
    );
}

/// Asks for a stream and reads only the response head: (status, whether Retry-After is set).
#[track_caller]
pub fn stream_head(addr: SocketAddr, key: &str) -> (u16, bool) {
    let mut sock = TcpStream::connect(addr).expect("connect");
    let req = format!("GET /sse/environments/{key}/stream HTTP/1.1\r\nHost: t\r\n\r\n");
    sock.write_all(req.as_bytes()).expect("send request");
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match sock.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!("response head incomplete: {other:?}"),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head.contains("\r\nretry-after:"))
}

/// After Redis lost its data: the instance is ready again, logged that it resynchronised, and a
/// new subscriber of `key` gets `newest` at once.
#[track_caller]
pub fn assert_resynchronised(server: &Server, key: &str, newest: i64) {
    assert!(readiness_within(server.addr, 200, Duration::from_secs(3)));
    assert!(
        server.wait_log("Redis lost or replaced its data", Duration::from_secs(3)),
        "no resynchronisation logged:\n{}",
        server.log()
    );
    let mut late = Subscriber::connect(server.addr, key);
    assert_eq!(
        late.next_update(Duration::from_secs(2)),
        Some(epoch_text(newest))
    );
}

/// Waits (5 s at most) until the server has completed a fetch that started after this call:
/// two more fetches started (at most one is in flight, so the first of them has returned).
#[track_caller]
pub fn wait_fetched(server: &Server) {
    let started = |s: &Server| {
        let m = s.metrics();
        ["interval", "wakeup"]
            .iter()
            .map(|t| {
                m.get(&format!("flagsmith_sse_fetches_total{{trigger=\"{t}\"}}"))
                    .copied()
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let before = started(server);
    assert!(
        wait_until(Duration::from_secs(5), || started(server) >= before + 2.0),
        "no fetch completed; log:\n{}",
        server.log()
    );
}

/// Whether a queue-change of `micros` for `key` is answered 200 within `timeout` (posting
/// again every 10 ms while it is not).
#[track_caller]
pub fn accepted_within(addr: SocketAddr, key: &str, micros: i64, timeout: Duration) -> bool {
    wait_until(timeout, || post_micros(addr, key, micros).status == 200)
}

/// Reads updates until `micros` arrives: how long that took, or `None` after `timeout` (or
/// when the stream ends first).
pub fn time_to(sub: &mut Subscriber, micros: i64, timeout: Duration) -> Option<Duration> {
    let want = epoch_text(micros);
    let started = Instant::now();
    let deadline = started + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match sub.next_update(left) {
            Some(got) if got == want => return Some(started.elapsed()),
            Some(_) => {}
            None => return None,
        }
    }
    None
}

/// Asserts that the next update `sub` gets within `timeout` is `micros`.
#[track_caller]
pub fn assert_next_update(sub: &mut Subscriber, micros: i64, timeout: Duration) {
    assert_eq!(sub.next_update(timeout), Some(epoch_text(micros)));
}
