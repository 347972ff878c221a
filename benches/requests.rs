//! Measures what a flagsmith-sse binary spends on the request path, so that two builds can be
//! compared on the same machine in the same session:
//!
//! - `trickle`: server CPU time (utime + stime from /proc) for one request whose 64 KB body
//!   arrives six bytes per write over about nine seconds: one-byte chunks (`1\r\nx\r\n`), an
//!   endless trailer line, a long chunk extension, and the Content-Length control (the same
//!   bytes in the same pieces).
//! - `wave`: peak and after-wave resident memory for 4,000 connections that each send a
//!   queue-change head and 60 KB of a 61,440-byte body, then leave.
//! - `pipeline`: server CPU time and write system calls for 100 writes of 64 KiB of small
//!   pipelined requests on one connection.
//!
//! ```text
//! cargo bench --bench requests -- <path to flagsmith-sse> [trickle] [wave] [pipeline]
//! ```
//!
//! With no measurement named, all three run. The system-call count needs `strace` (skipped
//! when it cannot attach).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token";

/// The binary under test, on 127.0.0.1 and a free port.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(bin: &str, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("SSE_AUTHENTICATION_TOKEN", TOKEN)
            .env("BIND_ADDRESS", "127.0.0.1")
            .env("PORT", "0")
            .env("LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the binary");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.trim().to_owned());
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(20)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not start (no 'listening on' line at LOG_LEVEL=info)");
        };
        let addr = addr.parse().expect("listening address");
        Server { child, addr }
    }

    /// CPU time (user + system) so far.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<u64> = after
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    /// A field of /proc/<pid>/status in kB (VmRSS, VmHWM).
    fn status_kb(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether bytes (a response) are waiting on `s`, without blocking.
fn answered(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 1];
    // Bytes or EOF: the server has answered or closed.
    let got = s.peek(&mut b).is_ok();
    let _ = s.set_nonblocking(false);
    got
}

/// The status of the response on `s` (0 if none within two seconds).
fn status(s: &mut TcpStream) -> u16 {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    String::from_utf8_lossy(&buf[..n])
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Sends `head`, then `body` in `piece`-byte writes spread over `over`; stops early when the
/// server answers. Returns the server's CPU time over the request, the bytes sent and the
/// status.
fn trickle(
    bin: &str,
    head: &[u8],
    body: &[u8],
    piece: usize,
    over: Duration,
) -> (Duration, usize, u16) {
    let server = Server::start(bin, &[("REQUEST_TIMEOUT_SECONDS", "60")]);
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let cpu0 = server.cpu();
    s.write_all(head).expect("head");
    let pieces: Vec<&[u8]> = body.chunks(piece).collect();
    let pace = over / pieces.len().max(1) as u32;
    let t0 = Instant::now();
    let mut sent = 0;
    for (i, p) in pieces.iter().enumerate() {
        if i % 64 == 0 && answered(&s) {
            break;
        }
        if s.write_all(p).is_err() {
            break;
        }
        sent += p.len();
        // Pacing, not synchronisation: the pieces go out at a steady rate.
        let due = t0 + pace * (i as u32 + 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let code = status(&mut s);
    (server.cpu() - cpu0, sent, code)
}

fn trickle_all(bin: &str) {
    const SEGMENTS: usize = 10_900;
    let over = Duration::from_secs(9);
    let head = |framing: &str| {
        format!(
            "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: b\r\nAuthorization: Token {TOKEN}\r\n{framing}\r\n\r\n"
        )
        .into_bytes()
    };
    let mut chunked = b"1\r\nx\r\n".repeat(SEGMENTS);
    chunked.extend_from_slice(b"0\r\n\r\n");
    let wire = chunked.len();
    let mut trailer = b"0\r\nX-Trailer: ".to_vec();
    trailer.resize(wire, b'a');
    let mut extension = b"1;name=".to_vec();
    extension.resize(wire, b'v');
    let plain = vec![b' '; wire];
    let cases: [(&str, Vec<u8>, Vec<u8>); 4] = [
        (
            "chunked, 1-byte chunks",
            head("Transfer-Encoding: chunked"),
            chunked,
        ),
        (
            "endless trailer line",
            head("Transfer-Encoding: chunked"),
            trailer,
        ),
        (
            "long chunk extension",
            head("Transfer-Encoding: chunked"),
            extension,
        ),
        (
            "Content-Length control",
            head(&format!("Content-Length: {wire}")),
            plain,
        ),
    ];
    println!("trickle: {wire} body bytes, 6 bytes per write over {over:?}");
    for (name, head, body) in cases {
        let (cpu, sent, code) = trickle(bin, &head, &body, 6, over);
        println!(
            "  {name:<24} server CPU {:>7.3} s  sent {sent:>6} bytes  status {code}",
            cpu.as_secs_f64()
        );
    }
}

fn wave(bin: &str) {
    const CLIENTS: usize = 4000;
    const LEN: usize = 61_440;
    const SENT: usize = 60_000;
    let server = Server::start(bin, &[("REQUEST_TIMEOUT_SECONDS", "120")]);
    let mut wire = format!(
        "POST /sse/environments/k/queue-change HTTP/1.1\r\nHost: b\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {LEN}\r\n\r\n"
    )
    .into_bytes();
    wire.extend(std::iter::repeat_n(b' ', SENT));
    // Warm up with one whole request.
    {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        let mut whole = wire.clone();
        whole.extend(std::iter::repeat_n(b' ', LEN - SENT));
        s.write_all(&whole).expect("send");
        status(&mut s);
    }
    let settle = || std::thread::sleep(Duration::from_millis(500));
    settle();
    let (rss0, fds0) = (server.status_kb("VmRSS"), server.fds());
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&wire).expect("send");
        clients.push(s);
    }
    // Until the server has taken in or refused every client.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, Instant::now());
    while Instant::now() < deadline {
        let rss = server.status_kb("VmRSS");
        if rss != last.0 {
            last = (rss, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = clients.iter().filter(|s| answered(s)).count();
    let (rss1, peak) = (server.status_kb("VmRSS"), server.status_kb("VmHWM"));
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.fds() > fds0 + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    settle();
    settle();
    let rss2 = server.status_kb("VmRSS");
    println!(
        "wave: {CLIENTS} clients x {SENT} of {LEN} body bytes: {} held, {refused} refused",
        CLIENTS - refused
    );
    println!(
        "  RSS before {rss0} kB, with the wave {rss1} kB, peak (VmHWM) {peak} kB, after {rss2} kB"
    );
}

fn pipeline(bin: &str) {
    const ROUNDS: usize = 100;
    let server = Server::start(bin, &[]);
    let one = b"GET /health/liveness/ HTTP/1.1\r\nHost: b\r\n\r\n";
    let per_write = 64 * 1024 / one.len();
    let burst = one.repeat(per_write);
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // The size of one response, from a first request.
    s.write_all(one).expect("send");
    let mut first = vec![0u8; 4096];
    let n = s.read(&mut first).expect("response");
    let resp_len = n;
    let mut buf = vec![0u8; 1 << 20];
    let mut run = |rounds: usize| {
        for _ in 0..rounds {
            s.write_all(&burst).expect("send");
            let mut want = per_write * resp_len;
            while want > 0 {
                match s.read(&mut buf) {
                    Ok(0) => panic!("closed"),
                    Ok(k) => want = want.saturating_sub(k),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    };
    let cpu0 = server.cpu();
    let t0 = Instant::now();
    run(ROUNDS);
    let (wall, cpu) = (t0.elapsed(), server.cpu() - cpu0);
    println!(
        "pipeline: {ROUNDS} writes of {per_write} requests ({} bytes each): wall {:.3} s, server CPU {:.3} s",
        burst.len(),
        wall.as_secs_f64(),
        cpu.as_secs_f64()
    );
    // System calls, counted on a separate run (strace slows the server down).
    let Ok(mut st) = Command::new("strace")
        .args(["-f", "-c", "-e", "trace=write,writev,sendto,sendmsg", "-p"])
        .arg(server.child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return;
    };
    // strace needs a moment to attach; a few requests are lost to the count at worst.
    std::thread::sleep(Duration::from_millis(500));
    run(10);
    // SAFETY: kill with the pid of the strace we started; SIGINT makes it print its summary.
    unsafe {
        libc::kill(st.id() as libc::pid_t, libc::SIGINT);
    }
    let mut out = String::new();
    if let Some(mut e) = st.stderr.take() {
        let _ = e.read_to_string(&mut out);
    }
    let _ = st.wait();
    println!("  strace -c, 10 writes of {per_write} requests:");
    for l in out
        .lines()
        .filter(|l| l.contains("write") || l.contains("send") || l.contains("total"))
    {
        println!("    {l}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some((bin, which)) = args.split_first() else {
        eprintln!(
            "usage: cargo bench --bench requests -- <path to flagsmith-sse> [trickle] [wave] [pipeline]"
        );
        std::process::exit(2);
    };
    let all = which.is_empty();
    let wants = |name: &str| all || which.iter().any(|w| w == name);
    println!("binary: {bin}");
    if wants("trickle") {
        trickle_all(bin);
    }
    if wants("wave") {
        wave(bin);
    }
    if wants("pipeline") {
        pipeline(bin);
    }
}
