//! The parent's side of the worker processes: starting them, asking them for their status,
//! their open streams per environment and the event arrivals they recorded.

use crate::opts::Opts;
use crate::target::Target;
use crate::worker;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Longest wait for the workers to answer one command.
const ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// One event arrival reported by a worker.
pub struct Rec {
    pub id: u32,
    pub env: u32,
    pub time: i64,
    pub at: u64,
}

/// What a worker said about its subscribers.
#[derive(Debug, Default, Clone)]
pub struct Status {
    pub established: u64,
    pub open: u64,
    pub failed: u64,
    pub dropped: u64,
    pub reconnected: u64,
    pub inflight: u64,
    pub pending: u64,
    pub events: u64,
    pub lost: u64,
    pub first: u64,
    pub last: u64,
    pub reasons: Vec<(String, u64)>,
}

impl Status {
    pub fn parse(line: &str) -> Status {
        let mut s = Status::default();
        for kv in line.split_whitespace().skip(1) {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let n = v.parse().unwrap_or(0);
            match k {
                "established" => s.established = n,
                "open" => s.open = n,
                "failed" => s.failed = n,
                "dropped" => s.dropped = n,
                "reconnected" => s.reconnected = n,
                "inflight" => s.inflight = n,
                "pending" => s.pending = n,
                "events" => s.events = n,
                "lost" => s.lost = n,
                "first" => s.first = n,
                "last" => s.last = n,
                "reasons" if v != "-" => {
                    s.reasons = v
                        .split(',')
                        .filter_map(|r| {
                            let (name, n) = r.rsplit_once(':')?;
                            Some((name.to_owned(), n.parse().ok()?))
                        })
                        .collect();
                }
                _ => {}
            }
        }
        s
    }

    /// Sum over workers; `first` is the earliest, `last` the latest.
    pub fn total(all: &[Status]) -> Status {
        let mut t = Status::default();
        let mut reasons: HashMap<String, u64> = HashMap::new();
        for s in all {
            t.established += s.established;
            t.open += s.open;
            t.failed += s.failed;
            t.dropped += s.dropped;
            t.reconnected += s.reconnected;
            t.inflight += s.inflight;
            t.pending += s.pending;
            t.events += s.events;
            t.lost += s.lost;
            if s.first > 0 && (t.first == 0 || s.first < t.first) {
                t.first = s.first;
            }
            t.last = t.last.max(s.last);
            for (k, v) in &s.reasons {
                *reasons.entry(k.clone()).or_default() += v;
            }
        }
        t.reasons = reasons.into_iter().collect();
        t.reasons.sort();
        t
    }

    pub fn reasons_text(&self) -> String {
        if self.reasons.is_empty() {
            return "none".into();
        }
        self.reasons
            .iter()
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub struct Workers {
    kids: Vec<(Child, ChildStdin)>,
    rx: Receiver<(usize, String)>,
}

impl Workers {
    pub fn spawn(o: &Opts, t: &Target, deadline: Duration) -> Result<Workers, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let dst = match t.stream.addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return Err("workers connect over IPv4 loopback only".into()),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let mut kids = Vec::new();
        let n = o.subscribers;
        let w = o.workers;
        for i in 0..w {
            let first = i * n / w;
            let count = (i + 1) * n / w - first;
            let cfg = worker::Config {
                dst,
                src: Ipv4Addr::new(127, 0, 0, 2 + i as u8),
                host: t.stream.host.clone(),
                path: t.stream.path.clone(),
                prefix: o.prefix.clone(),
                first_id: first as u32,
                count: count as u32,
                envs: o.envs as u32,
                rate: o.rate / w as f64,
                max_inflight: o.max_inflight,
                connect_timeout_ms: o.connect_timeout_ms,
                deadline_ms: deadline.as_millis() as u64,
                reconnects: o.reconnects,
            };
            let mut cmd = Command::new(&exe);
            cmd.arg("--worker")
                .args(cfg.to_args())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().map_err(|e| format!("start worker: {e}"))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                let _ = child.kill();
                return Err("worker without pipes".into());
            };
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            });
            kids.push((child, stdin));
        }
        Ok(Workers { kids, rx })
    }

    fn send(&mut self, cmd: &str) -> Result<(), String> {
        for (i, (_, stdin)) in self.kids.iter_mut().enumerate() {
            stdin
                .write_all(format!("{cmd}\n").as_bytes())
                .and_then(|()| stdin.flush())
                .map_err(|e| format!("worker {i} is gone ({e})"))?;
        }
        Ok(())
    }

    /// Sends `cmd` and hands every answer line to `each` until every worker sent a line that
    /// `last` accepts.
    fn ask(
        &mut self,
        cmd: &str,
        last: impl Fn(&str) -> bool,
        mut each: impl FnMut(usize, &str),
    ) -> Result<(), String> {
        self.send(cmd)?;
        let mut done = vec![false; self.kids.len()];
        let deadline = Instant::now() + ASK_TIMEOUT;
        while done.iter().any(|d| !d) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, line)) => {
                    each(i, &line);
                    if last(&line) {
                        done[i] = true;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "workers did not answer {cmd:?} within {ASK_TIMEOUT:?}"
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("all workers are gone".into());
                }
            }
        }
        Ok(())
    }

    pub fn status(&mut self) -> Result<Vec<Status>, String> {
        let mut out = vec![Status::default(); self.kids.len()];
        self.ask(
            "status",
            |l| l.starts_with("status "),
            |i, l| {
                if l.starts_with("status ") {
                    out[i] = Status::parse(l);
                }
            },
        )?;
        Ok(out)
    }

    /// Open streams per environment, over all workers.
    pub fn counts(&mut self, envs: usize) -> Result<Vec<u64>, String> {
        let mut sum = vec![0u64; envs];
        self.ask(
            "counts",
            |l| l.starts_with("counts"),
            |_, l| {
                for (e, n) in l.split_whitespace().skip(1).enumerate() {
                    if let Some(s) = sum.get_mut(e) {
                        *s += n.parse::<u64>().unwrap_or(0);
                    }
                }
            },
        )?;
        Ok(sum)
    }

    pub fn flush(&mut self) -> Result<Vec<Rec>, String> {
        let mut recs = Vec::new();
        self.ask(
            "flush",
            |l| l == "end",
            |_, l| {
                let mut f = l.split(' ');
                if f.next() != Some("r") {
                    return;
                }
                let mut num = || f.next().and_then(|x| x.parse::<i64>().ok());
                if let (Some(id), Some(env), Some(time), Some(at)) = (num(), num(), num(), num()) {
                    recs.push(Rec {
                        id: id as u32,
                        env: env as u32,
                        time,
                        at: at as u64,
                    });
                }
            },
        )?;
        Ok(recs)
    }

    pub fn quit(mut self) {
        let _ = self.send("quit");
        let deadline = Instant::now() + Duration::from_secs(10);
        for (child, _) in &mut self.kids {
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (child, _) in &mut self.kids {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
