//! Several instances of our server on one port (`REUSE_PORT=true`) and one `redis-server`, and
//! what the machine says about a run: each instance's memory, CPU and open descriptors, the
//! Redis commands the instances send (`INFO commandstats`), and the kernel's memory for sockets
//! (`/proc/net/sockstat`, `/proc/slabinfo`, `/proc/meminfo`).

use crate::procs::{self, Proc};
use crate::say;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Starts `n` instances on one free port with `REUSE_PORT=true`, each connected to the Redis
/// on `redis_port`. Returns them and the shared address.
pub fn start(
    n: usize,
    bin: &Path,
    token: &str,
    redis_port: u16,
    extra_env: &[(String, String)],
) -> Result<(Vec<Proc>, SocketAddr), String> {
    let port = procs::free_port()?;
    let mut env = extra_env.to_vec();
    env.push(("PORT".into(), port.to_string()));
    env.push(("REUSE_PORT".into(), "true".into()));
    let mut out: Vec<Proc> = Vec::with_capacity(n);
    let mut addr = None;
    for i in 0..n {
        say(&format!(
            "starting instance {}/{n} on 127.0.0.1:{port} (REUSE_PORT)",
            i + 1
        ));
        let (p, a) = procs::start_server(bin, token, Some(redis_port), &env)?;
        // With one port for all, a readiness answer may come from an earlier instance: wait
        // for this one's own word that it reached Redis.
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.log_matching("connected to Redis").is_empty() {
            if Instant::now() > deadline {
                return Err(format!(
                    "instance {} did not log \"connected to Redis\" within 20 s; log:\n{}",
                    i + 1,
                    p.log_matching("").join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        addr = Some(a);
        out.push(p);
    }
    let addr = addr.ok_or("--instances 0")?;
    Ok((out, addr))
}

/// Open descriptors of `pid` (each subscriber holds one).
pub fn fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Memory (KiB) and CPU time of each process, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snap {
    /// Resident set: counts the pages of the binary and libraries, which every instance
    /// shares, once per process.
    pub rss_kib: Vec<Option<u64>>,
    /// Anonymous resident memory (`RssAnon`): the process's own heap and stacks.
    pub anon_kib: Vec<Option<u64>>,
    /// Proportional set size (`Pss` of smaps_rollup): shared pages split between sharers, so
    /// the sum over processes is what they use together.
    pub pss_kib: Vec<Option<u64>>,
    pub cpu: Vec<Option<Duration>>,
}

pub fn snap(pids: &[u32]) -> Snap {
    Snap {
        rss_kib: pids.iter().map(|&p| procs::rss_kb(p)).collect(),
        anon_kib: pids
            .iter()
            .map(|&p| procs::kib_field(&format!("/proc/{p}/status"), "RssAnon:"))
            .collect(),
        pss_kib: pids
            .iter()
            .map(|&p| procs::kib_field(&format!("/proc/{p}/smaps_rollup"), "Pss:"))
            .collect(),
        cpu: pids.iter().map(|&p| procs::cpu_time(p)).collect(),
    }
}

impl Snap {
    /// Total RSS, if every process could be read.
    pub fn rss_total(&self) -> Option<u64> {
        self.rss_kib.iter().copied().sum()
    }

    /// Total anonymous RSS, if every process could be read.
    pub fn anon_total(&self) -> Option<u64> {
        self.anon_kib.iter().copied().sum()
    }

    /// Total PSS, if every process could be read.
    pub fn pss_total(&self) -> Option<u64> {
        self.pss_kib.iter().copied().sum()
    }

    /// Each process's CPU between `self` and `later`, as fractions of one core over `wall`.
    pub fn cpu_shares(&self, later: &Snap, wall: f64) -> Vec<Option<f64>> {
        self.cpu
            .iter()
            .zip(&later.cpu)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) if wall > 0.0 => Some(b.saturating_sub(*a).as_secs_f64() / wall),
                _ => None,
            })
            .collect()
    }
}

/// Sum of known shares (`None` if any is unknown).
pub fn total(shares: &[Option<f64>]) -> Option<f64> {
    shares.iter().copied().sum()
}

/// `calls` per command from Redis's `INFO commandstats` (the `info` command itself left out).
pub fn commandstats(port: u16) -> Result<BTreeMap<String, u64>, String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .map_err(|e| format!("redis: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(b"INFO commandstats\r\n")
        .map_err(|e| format!("redis: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        if Instant::now() > deadline {
            return Err("redis: INFO commandstats did not arrive within 5 s".into());
        }
        let n = s.read(&mut chunk).map_err(|e| format!("redis: {e}"))?;
        if n == 0 {
            return Err("redis closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Err("redis: INFO answer over 1 MiB".into());
        }
        let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..nl]).into_owned();
        let len: usize = head
            .strip_prefix('$')
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| format!("redis: unexpected answer {head:?}"))?;
        if let Some(b) = buf.get(nl + 2..nl + 2 + len) {
            break String::from_utf8_lossy(b).into_owned();
        }
    };
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if name == "info" {
            continue;
        }
        let calls = rest
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.insert(name.to_owned(), calls);
    }
    Ok(out)
}

/// Commands called between two `commandstats` readings, per command.
pub fn calls_between(
    a: &BTreeMap<String, u64>,
    b: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// `get 12, xread 3` and so on.
pub fn calls_text(c: &BTreeMap<String, u64>) -> String {
    if c.is_empty() {
        return "none".into();
    }
    let mut v: Vec<(&String, &u64)> = c.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the kernel holds for sockets, machine-wide, at one moment.
#[derive(Debug, Clone, Default)]
pub struct KernelMem {
    /// TCP sockets in use (`/proc/net/sockstat`).
    pub tcp_inuse: u64,
    /// Pages charged to TCP socket buffers (`/proc/net/sockstat` `mem`).
    pub tcp_mem_pages: u64,
    /// Bytes per slab cache (active objects × object size, `/proc/slabinfo`; root only).
    pub slabs: BTreeMap<String, u64>,
    /// `Slab:` of /proc/meminfo, bytes.
    pub slab_total: u64,
    /// `MemAvailable:` of /proc/meminfo, bytes.
    pub mem_available: u64,
}

pub fn kernel_mem() -> KernelMem {
    let mut k = KernelMem::default();
    if let Ok(t) = std::fs::read_to_string("/proc/net/sockstat")
        && let Some(line) = t.lines().find(|l| l.starts_with("TCP:"))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let get = |name: &str| {
            f.iter()
                .position(|w| *w == name)
                .and_then(|i| f.get(i + 1)?.parse().ok())
                .unwrap_or(0)
        };
        k.tcp_inuse = get("inuse");
        k.tcp_mem_pages = get("mem");
    }
    if let Ok(t) = std::fs::read_to_string("/proc/slabinfo") {
        for line in t.lines().skip(2) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(name), Some(active), Some(size)) = (f.first(), f.get(1), f.get(3)) else {
                continue;
            };
            if let (Ok(a), Ok(s)) = (active.parse::<u64>(), size.parse::<u64>()) {
                k.slabs.insert((*name).to_owned(), a * s);
            }
        }
    }
    k.slab_total = procs::slab_bytes().unwrap_or(0);
    k.mem_available = procs::meminfo_bytes("MemAvailable:").unwrap_or(0);
    k
}

/// How the kernel's memory grew from `a` to `b` with `conns` more connections (each with two
/// ends on this machine, over loopback).
pub struct KernelGrowth {
    pub conns: u64,
    pub tcp_sockets: i64,
    pub tcp_buffer_bytes: i64,
    pub slab_bytes: i64,
    pub mem_available_drop: i64,
    /// Slab caches that grew by at least 64 bytes per connection, largest first.
    pub top_slabs: Vec<(String, i64)>,
}

pub fn growth(a: &KernelMem, b: &KernelMem, conns: u64) -> KernelGrowth {
    let page = 4096i64;
    let mut top: Vec<(String, i64)> = b
        .slabs
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                *v as i64 - a.slabs.get(k).copied().unwrap_or(0) as i64,
            )
        })
        .filter(|(_, d)| conns > 0 && *d >= 64 * conns as i64)
        .collect();
    top.sort_by_key(|y| std::cmp::Reverse(y.1));
    KernelGrowth {
        conns,
        tcp_sockets: b.tcp_inuse as i64 - a.tcp_inuse as i64,
        tcp_buffer_bytes: (b.tcp_mem_pages as i64 - a.tcp_mem_pages as i64) * page,
        slab_bytes: b.slab_total as i64 - a.slab_total as i64,
        mem_available_drop: a.mem_available as i64 - b.mem_available as i64,
        top_slabs: top,
    }
}

impl KernelGrowth {
    /// Per socket: by the growth of TCP sockets in use if there was any (sockets of an
    /// earlier phase that were still closing are then not counted twice), else two per
    /// connection.
    fn per(&self, v: i64) -> f64 {
        let sockets = if self.tcp_sockets > 0 {
            self.tcp_sockets
        } else {
            2 * self.conns as i64
        };
        v as f64 / sockets.max(1) as f64
    }

    /// Table rows.
    pub fn rows(&self) -> Vec<(String, String)> {
        let slabs = self
            .top_slabs
            .iter()
            .map(|(k, v)| format!("{k} {:.0}", self.per(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        vec![
            (
                "kernel memory per TCP socket (a subscriber is two on loopback: sockstat, Slab, MemAvailable)"
                    .into(),
                format!(
                    "{} more TCP sockets for {} connections; per socket: TCP buffers {:.0} B, slab {:.0} B, MemAvailable drop {:.0} B (MemAvailable also counts the workers' memory)",
                    self.tcp_sockets,
                    self.conns,
                    self.per(self.tcp_buffer_bytes),
                    self.per(self.slab_bytes),
                    self.per(self.mem_available_drop)
                ),
            ),
            (
                "slab caches that grew, bytes per TCP socket".into(),
                if slabs.is_empty() {
                    "none readable (/proc/slabinfo needs root)".into()
                } else {
                    slabs
                },
            ),
        ]
    }

    pub fn json(&self) -> crate::json::Json {
        use crate::json::Json;
        let mut j = Json::obj();
        j.set("connections", self.conns)
            .set("tcp_sockets_more", self.tcp_sockets)
            .set(
                "tcp_buffer_bytes_per_socket",
                self.per(self.tcp_buffer_bytes),
            )
            .set("slab_bytes_per_socket", self.per(self.slab_bytes))
            .set(
                "mem_available_drop_per_socket",
                self.per(self.mem_available_drop),
            )
            .set(
                "slab_caches_per_socket",
                Json::Obj(
                    self.top_slabs
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::from(self.per(*v))))
                        .collect(),
                ),
            );
        j
    }
}
