//! The server under test: our release binary (with the embedded store or a `redis-server`),
//! nginx with nchan, or a server someone else runs; how changes are published to it, and what
//! its own /metrics say about fan-out.

use crate::clock::mono_ns;
use crate::opts::{Mode, Opts, StoreKind};
use crate::{clock, httpc, procs, say};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The token our server is started with.
const TOKEN: &str = "load-harness-token";
/// Longest a publish command may run.
const PUBLISH_CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// How one change is published.
pub enum Publisher {
    /// POST to a URL template.
    Http {
        url: httpc::Url,
        headers: String,
        body: String,
        client: httpc::Client,
    },
    /// A shell command template.
    Cmd(String),
}

fn fill(template: &str, key: &str, t: i64) -> String {
    template
        .replace("{env}", key)
        .replace("{iso}", &clock::iso8601(t))
        .replace("{epoch}", &clock::epoch_text(t))
}

impl Publisher {
    /// Publishes time `t` for environment `key`; returns the monotonic times it was sent at and
    /// answered at.
    pub fn publish(&mut self, key: &str, t: i64) -> Result<(u64, u64), String> {
        match self {
            Publisher::Http {
                url,
                headers,
                body,
                client,
            } => {
                let req = httpc::post(
                    &url.host,
                    &url.path.replace("{env}", key),
                    headers,
                    fill(body, key, t).as_bytes(),
                );
                let at = mono_ns();
                let r = client.send(&req)?;
                if !(200..300).contains(&r.status) {
                    return Err(format!(
                        "publish to {key} answered {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                }
                Ok((at, mono_ns()))
            }
            Publisher::Cmd(template) => {
                let cmd = fill(template, key, t);
                let at = mono_ns();
                let mut child = Command::new("sh")
                    .arg("-c")
                    .arg(&cmd)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("publish command: {e}"))?;
                let deadline = Instant::now() + PUBLISH_CMD_TIMEOUT;
                loop {
                    if let Ok(Some(st)) = child.try_wait() {
                        if !st.success() {
                            return Err(format!("publish command {cmd:?} failed: {st}"));
                        }
                        return Ok((at, mono_ns()));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("publish command {cmd:?} took over 10 s"));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// Where publish throughput is measured: URL template, headers, body template.
pub struct QcTarget {
    pub url: httpc::Url,
    pub headers: String,
    pub body: String,
    pub what: String,
}

/// The instance that takes publishes when subscribers are on another one (`--second-instance`).
pub struct PublishSide {
    pub proc: procs::Proc,
    pub addr: SocketAddr,
}

/// The server under test and the processes the harness started for it.
pub struct Target {
    pub name: String,
    pub stream: httpc::Url,
    pub publisher: Publisher,
    pub pid: Option<u32>,
    pub metrics: Option<httpc::Url>,
    pub qc: Option<QcTarget>,
    pub server: Option<procs::Proc>,
    pub redis: Option<procs::Proc>,
    pub nginx: Option<procs::Nginx>,
    /// Instance A with `--second-instance` (`server` is then instance B, the subscribers' one).
    pub publish_side: Option<PublishSide>,
    /// With `--second-instance`: publishes to instance B itself (the local path).
    pub local_publisher: Option<Publisher>,
    /// With `--instances N`: instances 2..=N (`server` is instance 1), all on one port.
    pub more_instances: Vec<procs::Proc>,
    /// The port of the redis-server the harness started.
    pub redis_port: Option<u16>,
}

impl Target {
    /// Pids of every instance of our server (or the one process measured), in order.
    pub fn server_pids(&self) -> Vec<u32> {
        self.pid
            .into_iter()
            .chain(self.more_instances.iter().map(procs::Proc::pid))
            .collect()
    }

    /// A short name for the CSV and the chart.
    pub fn label(&self, o: &Opts) -> String {
        if let Some(l) = &o.label {
            return l.clone();
        }
        match o.mode {
            Mode::Nchan => "nginx + nchan".into(),
            Mode::Foreign => "foreign server".into(),
            Mode::Ours => {
                let store = match o.store {
                    StoreKind::Redis => "Redis",
                    StoreKind::Embedded => "embedded",
                };
                if o.instances > 0 {
                    format!("flagsmith-sse ×{} REUSE_PORT ({store})", o.instances)
                } else if o.second_instance {
                    format!("flagsmith-sse two instances ({store})")
                } else {
                    format!("flagsmith-sse ({store})")
                }
            }
        }
    }
}

const DEFAULT_BODY: &str = "{\"updated_at\": \"{iso}\"}";

pub fn setup(o: &Opts) -> Result<Target, String> {
    match o.mode {
        Mode::Ours => {
            let redis = match o.store {
                StoreKind::Redis => {
                    say("starting redis-server");
                    Some(procs::start_redis()?)
                }
                StoreKind::Embedded => None,
            };
            let redis_port = redis.as_ref().map(|r| r.1);
            let (server, addr, more_instances) = match (o.instances, redis_port) {
                (n, Some(rp)) if n > 0 => {
                    let (mut all, addr) =
                        crate::instances::start(n, &o.server_bin, TOKEN, rp, &o.server_env)?;
                    let first = all.remove(0);
                    (first, addr, all)
                }
                _ => {
                    say(&format!("starting {}", o.server_bin.display()));
                    let (p, a) =
                        procs::start_server(&o.server_bin, TOKEN, redis_port, &o.server_env)?;
                    (p, a, Vec::new())
                }
            };
            let url = |path: &str| httpc::Url {
                addr,
                host: addr.to_string(),
                path: path.to_owned(),
            };
            let publish_side = if o.second_instance {
                say(&format!(
                    "starting a second instance of {} on the same redis-server",
                    o.server_bin.display()
                ));
                let (proc, a) =
                    procs::start_server(&o.server_bin, TOKEN, redis_port, &o.server_env)?;
                Some(PublishSide { proc, addr: a })
            } else {
                None
            };
            let pub_addr = publish_side.as_ref().map_or(addr, |p| p.addr);
            let pub_url = httpc::Url {
                addr: pub_addr,
                host: pub_addr.to_string(),
                path: "/sse/environments/{env}/queue-change".into(),
            };
            let headers = format!("Authorization: Token {TOKEN}\r\n");
            // Over several instances on one port, each publish takes a fresh connection, so
            // the kernel hands it to any instance.
            let pub_headers = if more_instances.is_empty() {
                headers.clone()
            } else {
                format!("{headers}Connection: close\r\n")
            };
            let body = o.publish_body.clone().unwrap_or(DEFAULT_BODY.into());
            let local_publisher = publish_side.as_ref().map(|_| Publisher::Http {
                url: url(&pub_url.path),
                headers: headers.clone(),
                body: body.clone(),
                client: httpc::Client::new(addr),
            });
            let store = match &redis {
                Some((_, port)) => format!("Redis store (redis-server on 127.0.0.1:{port})"),
                None => "embedded store".into(),
            };
            let name = match &publish_side {
                Some(p) => format!(
                    "flagsmith-sse {}, two instances on one {store}: subscribers on B ({addr}), \
                     publishes to A ({})",
                    env!("CARGO_PKG_VERSION"),
                    p.addr
                ),
                None if !more_instances.is_empty() => format!(
                    "flagsmith-sse {}, {} instances on {addr} (REUSE_PORT), one {store}",
                    env!("CARGO_PKG_VERSION"),
                    more_instances.len() + 1
                ),
                None => format!("flagsmith-sse {}, {store}", env!("CARGO_PKG_VERSION")),
            };
            let what = match &publish_side {
                Some(p) => format!("queue-change to instance A ({}), {store}", p.addr),
                None => format!("queue-change, {store}"),
            };
            Ok(Target {
                name,
                stream: url("/sse/environments/{env}/stream"),
                publisher: Publisher::Http {
                    url: pub_url.clone(),
                    headers: pub_headers,
                    body: body.clone(),
                    client: httpc::Client::new(pub_addr),
                },
                pid: Some(server.pid()),
                metrics: Some(url("/metrics")),
                qc: Some(QcTarget {
                    url: pub_url,
                    headers,
                    body,
                    what,
                }),
                server: Some(server),
                redis: redis.map(|r| r.0),
                nginx: None,
                publish_side,
                local_publisher,
                more_instances,
                redis_port,
            })
        }
        Mode::Nchan => {
            say("starting nginx with nchan");
            let ng = procs::start_nginx(o.subscribers)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], ng.port));
            let url = |path: &str| httpc::Url {
                addr,
                host: addr.to_string(),
                path: path.to_owned(),
            };
            let body = o
                .publish_body
                .clone()
                .unwrap_or("{\"updated_at\": {epoch}}".into());
            let version = Command::new("nginx")
                .arg("-v")
                .output()
                .map(|out| String::from_utf8_lossy(&out.stderr).trim().to_owned())
                .unwrap_or_default();
            Ok(Target {
                name: format!(
                    "{} + nchan (one worker, in-memory)",
                    version.trim_start_matches("nginx version: ")
                ),
                stream: url("/sse/environments/{env}/stream"),
                publisher: Publisher::Http {
                    url: url("/pub/{env}"),
                    headers: String::new(),
                    body: body.clone(),
                    client: httpc::Client::new(addr),
                },
                pid: Some(ng.worker_pid),
                metrics: None,
                qc: Some(QcTarget {
                    url: url("/pub/{env}"),
                    headers: String::new(),
                    body,
                    what: "nchan publisher endpoint, in memory".into(),
                }),
                server: None,
                redis: None,
                nginx: Some(ng),
                publish_side: None,
                local_publisher: None,
                more_instances: Vec::new(),
                redis_port: None,
            })
        }
        Mode::Foreign => {
            let target = o.target.as_deref().unwrap_or("");
            let stream = httpc::parse_url(target)?;
            if !stream.path.contains("{env}") {
                return Err("--target must contain {env} in its path".into());
            }
            let headers = o
                .publish_token
                .as_ref()
                .map(|t| format!("Authorization: Token {t}\r\n"))
                .unwrap_or_default();
            let body = o.publish_body.clone().unwrap_or(DEFAULT_BODY.into());
            let (publisher, qc) = match (&o.publish_url, &o.publish_cmd) {
                (Some(u), _) => {
                    let url = httpc::parse_url(u)?;
                    (
                        Publisher::Http {
                            url: url.clone(),
                            headers: headers.clone(),
                            body: body.clone(),
                            client: httpc::Client::new(url.addr),
                        },
                        Some(QcTarget {
                            url,
                            headers,
                            body,
                            what: format!("POST {u}"),
                        }),
                    )
                }
                (None, Some(c)) => (Publisher::Cmd(c.clone()), None),
                (None, None) => return Err("no publisher".into()),
            };
            let metrics = o.metrics_url.as_deref().map(httpc::parse_url).transpose()?;
            Ok(Target {
                name: format!("SSE server at {target}"),
                stream,
                publisher,
                pid: o.server_pid,
                metrics,
                qc,
                server: None,
                redis: None,
                nginx: None,
                publish_side: None,
                local_publisher: None,
                more_instances: Vec::new(),
                redis_port: None,
            })
        }
    }
}

/// `flagsmith_sse_*` series from the target's /metrics.
pub fn scrape(t: &Target) -> Option<HashMap<String, f64>> {
    let url = t.metrics.as_ref()?;
    let r = httpc::get(url, &url.path).ok()?;
    if r.status != 200 {
        return None;
    }
    Some(
        httpc::prometheus(&String::from_utf8_lossy(&r.body))
            .into_iter()
            .filter(|(k, _)| k.starts_with("flagsmith_sse_"))
            .collect(),
    )
}

/// Fan-out histogram sum and count.
fn fanout(m: &Option<HashMap<String, f64>>) -> Option<(f64, f64)> {
    let m = m.as_ref()?;
    Some((
        *m.get("flagsmith_sse_fanout_duration_seconds_sum")?,
        *m.get("flagsmith_sse_fanout_duration_seconds_count")?,
    ))
}

/// Mean fan-out duration (s) between two scrapes, and the number of fan-outs.
pub fn fanout_between(
    a: &Option<HashMap<String, f64>>,
    b: &Option<HashMap<String, f64>>,
) -> Option<(f64, u64)> {
    let ((s0, c0), (s1, c1)) = (fanout(a)?, fanout(b)?);
    let n = c1 - c0;
    (n > 0.0).then(|| ((s1 - s0) / n, n as u64))
}
