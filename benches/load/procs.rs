//! Processes the harness starts (our server, redis-server, nginx) and what /proc says about
//! them. Every child is stopped by its own pid, gracefully first, and is told to die with the
//! harness (PR_SET_PDEATHSIG) so that nothing outlives an aborted run.

use crate::httpc;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Log lines kept from a child's stderr.
const LOG_LINES: usize = 2000;

/// A child process, stopped (by pid) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    stop_signal: i32,
    stopped: bool,
    /// Lines the child wrote to stderr (the newest `LOG_LINES`).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd`, collecting its stderr; it gets `death_signal` if the harness dies.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        stop_signal: i32,
        death_signal: i32,
    ) -> Result<(Proc, std::sync::mpsc::Receiver<String>), String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line.clone());
                    if let Ok(mut l) = sink.lock() {
                        if l.len() >= LOG_LINES {
                            l.remove(0);
                        }
                        l.push(line);
                    }
                }
            });
        }
        Ok((
            Proc {
                name: name.to_owned(),
                child,
                stop_signal,
                stopped: false,
                log,
            },
            rx,
        ))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and how).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    /// Log lines containing `needle`.
    pub fn log_matching(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .map(|l| l.iter().filter(|x| x.contains(needle)).cloned().collect())
            .unwrap_or_default()
    }

    /// Sends the stop signal and waits up to `grace`, then kills. Returns the exit status text.
    pub fn stop(&mut self, grace: Duration) -> String {
        if self.stopped {
            return "stopped".into();
        }
        self.stopped = true;
        if let Some(st) = self.exited() {
            return format!("had already exited: {st}");
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(pid, self.stop_signal) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.exited() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
        "killed".into()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            crate::clock::mono_ns()
        ));
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(|d| Path::new(d).join(name)))
        .find(|p| p.is_file())
}

/// Raises this process's soft open-file limit to its hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
    }
    rl.rlim_cur
}

/// The number after `key` on the line of `path` that starts with it (a `/proc` file whose
/// lines read `Key:   123 kB`).
pub fn kib_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident set size of `pid` in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// CPU time (user + system, all threads) of `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = text.rsplit(')').next()?.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Kernel slab memory of the whole machine (bytes), from /proc/meminfo: sockets, their
/// files and epoll entries live there, not in any process's RSS.
pub fn slab_bytes() -> Option<u64> {
    meminfo_bytes("Slab:")
}

/// A `/proc/meminfo` field (`key` with its colon) in bytes.
pub fn meminfo_bytes(key: &str) -> Option<u64> {
    Some(kib_field("/proc/meminfo", key)? * 1024)
}

/// Children of `pid`, found by scanning /proc (bounded by the number of processes).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|t| {
                    t.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Starts `redis-server` on a free loopback port, without persistence, and waits for PONG.
pub fn start_redis() -> Result<(Proc, u16), String> {
    let bin = which("redis-server").ok_or(
        "redis-server not found: install it (apt-get install redis-server) or pass --store embedded",
    )?;
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
        "--maxclients",
        "1000",
    ]);
    let (mut p, _) = Proc::spawn("redis-server", &mut cmd, libc::SIGTERM, libc::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(st) = p.exited() {
            return Err(format!("redis-server exited at start: {st}"));
        }
        if redis_ping(port) {
            return Ok((p, port));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("redis-server did not answer PING within 10 s".into())
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// Starts our server binary on a free loopback port and waits until it is ready.
pub fn start_server(
    bin: &Path,
    token: &str,
    redis_port: Option<u16>,
    extra_env: &[(String, String)],
) -> Result<(Proc, SocketAddr), String> {
    if !bin.is_file() {
        return Err(format!(
            "server binary {} not found (cargo bench builds it; or pass --server-bin)",
            bin.display()
        ));
    }
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SSE_AUTHENTICATION_TOKEN", token)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("MAX_STREAM_AGE", "-1")
        .env("SHUTDOWN_GRACE_SECONDS", "1")
        .env("LOG_LEVEL", "info");
    if let Some(p) = redis_port {
        cmd.env("REDIS_URL", format!("redis://127.0.0.1:{p}/0"));
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let (mut p, lines) = Proc::spawn("flagsmith-sse", &mut cmd, libc::SIGTERM, libc::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the server did not say \"listening on\" within 20 s; log:\n{}",
                p.log_matching("").join("\n")
            ));
        }
        match lines.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    break rest
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad listening address in {line:?}"))?;
                }
            }
            Err(_) => {
                if let Some(st) = p.exited() {
                    return Err(format!(
                        "the server exited at start ({st}); log:\n{}",
                        p.log_matching("").join("\n")
                    ));
                }
            }
        }
    };
    let url = httpc::Url {
        addr,
        host: addr.to_string(),
        path: "/".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match httpc::get(&url, "/health/readiness/") {
            Ok(r) if r.status == 200 => return Ok((p, addr)),
            Ok(r) => last = format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the server is not ready 10 s after start (last readiness answer: {last}); warnings:\n{}",
        p.log_matching("WARN").join("\n")
    ))
}

/// nginx with nchan, in its own temp dir, one worker, on a free port.
pub struct Nginx {
    pub proc: Proc,
    pub port: u16,
    pub worker_pid: u32,
    pub dir: TempDir,
}

/// Where Debian's nchan module lives.
const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// Writes a config and starts nginx in the foreground (`daemon off`) with one worker.
pub fn start_nginx(max_conns: usize) -> Result<Nginx, String> {
    let missing = "nginx with the nchan module is not installed: \
                   apt-get install nginx-light libnginx-mod-nchan";
    let bin = which("nginx").ok_or(missing)?;
    if !Path::new(NCHAN_MODULE).is_file() {
        return Err(missing.into());
    }
    let dir = TempDir::new("flagsmith-sse-nchan")?;
    let port = free_port()?;
    let d = dir.0.display();
    let conns = max_conns + 1024;
    let conf = format!(
        r#"load_module {NCHAN_MODULE};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {rlimit};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections {conns};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/sse/environments/([A-Za-z0-9._-]+)/stream$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_eventsource_ping_interval 15;
        }}
        location ~ ^/pub/([A-Za-z0-9._-]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 1;
        }}
        location = /health {{
            return 200 "ok";
        }}
    }}
}}
"#,
        rlimit = conns + 64,
    );
    let conf_path = dir.0.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| format!("{}: {e}", conf_path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&dir.0)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.0.join("error.log"));
    let (mut p, _) = Proc::spawn("nginx", &mut cmd, libc::SIGTERM, libc::SIGTERM)?;
    let url = httpc::Url {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        host: format!("127.0.0.1:{port}"),
        path: "/".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(st) = p.exited() {
            let log = std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default();
            return Err(format!("nginx exited at start ({st}):\n{log}"));
        }
        if httpc::get(&url, "/health").is_ok_and(|r| r.status == 200) {
            let workers = children(p.pid());
            let Some(&worker_pid) = workers.first() else {
                return Err("nginx answers but has no worker process".into());
            };
            return Ok(Nginx {
                proc: p,
                port,
                worker_pid,
                dir,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = p.stop(Duration::from_secs(5));
    Err("nginx did not answer within 10 s".into())
}
