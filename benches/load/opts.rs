//! Command-line options of the load harness.

use std::path::PathBuf;

/// Which store the harness starts our server with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// No Redis: the server's embedded in-memory store.
    Embedded,
    /// A `redis-server` the harness starts on a free port.
    Redis,
}

/// What is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Our release binary, started by the harness.
    Ours,
    /// nginx with the nchan module, started by the harness.
    Nchan,
    /// Any SSE server someone else started (`--target`).
    Foreign,
}

/// Everything the harness can be told.
#[derive(Debug, Clone)]
pub struct Opts {
    pub mode: Mode,
    pub subscribers: usize,
    pub envs: usize,
    pub workers: usize,
    /// Connects per second over all workers; 0: as fast as the in-flight cap allows.
    pub rate: f64,
    pub max_inflight: usize,
    pub idle_seconds: f64,
    pub store: StoreKind,
    /// Stream URL template with `{env}`.
    pub target: Option<String>,
    /// Publish URL template with `{env}`.
    pub publish_url: Option<String>,
    pub publish_token: Option<String>,
    /// Publish body template (`{iso}`, `{epoch}`, `{env}`).
    pub publish_body: Option<String>,
    /// Shell command template (`{env}`, `{iso}`, `{epoch}`) that publishes one change.
    pub publish_cmd: Option<String>,
    pub server_pid: Option<u32>,
    pub metrics_url: Option<String>,
    pub json: PathBuf,
    pub quick: bool,
    pub rounds: usize,
    pub many_rounds: usize,
    pub round_gap: f64,
    pub qc_seconds: f64,
    pub qc_conns: usize,
    pub floor_pairs: usize,
    pub server_bin: PathBuf,
    pub server_env: Vec<(String, String)>,
    pub prefix: String,
    pub reconnects: u32,
    pub connect_timeout_ms: u64,
    /// Two instances on one Redis: subscribers on B, publishes to A.
    pub second_instance: bool,
    /// Server processes on one port (REUSE_PORT) and one Redis; 0: one, without REUSE_PORT.
    pub instances: usize,
    /// Every latency sample is written here (CSV).
    pub csv: PathBuf,
    /// The latency CDF chart (SVG).
    pub svg: PathBuf,
    /// Only draw `svg` from these CSV files (samples or CDF summaries), measuring nothing.
    pub chart_from: Vec<PathBuf>,
    /// Also write the chart's CDF points (a small CSV) here.
    pub cdf_csv: Option<PathBuf>,
    /// Name of the server in the CSV and the chart's legend (default: derived from the target).
    pub label: Option<String>,
    /// The responsiveness scenario instead of the standard measures (`responsive.rs`).
    pub responsive: bool,
}

pub const USAGE: &str = "\
usage: cargo bench --bench load -- [options]

Starts the release server (and a redis-server with --store redis) on free loopback ports, opens
subscribers from worker processes, and measures connect rate, idle memory and CPU,
publish-to-delivery latency, fan-out time, queue-change throughput and this machine's floor.

  --subscribers N      subscribers to open (default 15000; --quick: 500)
  --envs K             environments they are spread over (default 10)
  --workers W          worker processes, each bound to its own 127.0.0.(2+i) (default N/5000, at least 2)
  --rate R             connects per second over all workers, 0 = unpaced (default 5000)
  --inflight M         connects in flight per worker (default 256)
  --idle-seconds S     idle period for the CPU measure (default 30; --quick: 3)
  --store S            embedded | redis (default redis)
  --rounds R           single-environment latency rounds (default 5)
  --many-rounds R      all-environments latency rounds (default 3)
  --round-gap S        seconds from one round's start to the next (default 1.5; > STREAM_DELAY)
  --qc-seconds S       duration of the queue-change throughput run (default 5; 0: skip)
  --qc-conns C         keep-alive connections for it (default 64)
  --floor-pairs P      loopback socket pairs for the floor measure (default 4000; 0: skip)
  --server-bin PATH    server binary (default: the one cargo built for this bench)
  --server-env K=V     extra environment for our server (repeatable), e.g. STREAM_DELAY=0
  --second-instance    with --store redis: start two instances on the redis-server, connect every
                       subscriber to B and publish to A, so that changes reach B by its periodic
                       fetch; latency rounds start at --round-gap spacing (default 1.37 s, not a
                       multiple of CACHE_UPDATE_INTERVAL_SECONDS) so that publishes fall at every
                       phase of B's fetch cycle; --rounds and --many-rounds default to 10
                       (--quick: 4 and 3); then the same rounds are published to B itself (the
                       local path, same run), and the target for the p99 via A is the local p99
                       plus 30 ms; RSS and CPU are reported per instance
  --instances N        with --store redis: start N instances on one port with REUSE_PORT=true and
                       one redis-server; the kernel spreads subscribers over them, and each
                       publish goes to the same port on a fresh connection (so to any instance);
                       RSS and CPU are reported per instance and in total, Redis commands per
                       idle second and per change from INFO commandstats
  --responsive         the responsiveness scenario instead: every subscriber on one environment,
                       --rounds updates (default 12) --round-gap apart (default 0.5 s) while
                       /health/liveness/ is probed every 5 ms over one keep-alive connection
                       and a new subscriber opens every 100 ms; reports p50/p99/max of both,
                       the mean fan-out time and publish-to-delivery latency (our server gets
                       STREAM_DELAY=0 unless --server-env sets it)
  --nchan              measure nginx + nchan instead (packages nginx-light, libnginx-mod-nchan)
  --target URL         measure a running server: stream URL with {env}, e.g.
                       http://127.0.0.1:8000/sse/environments/{env}/stream
  --publish-url URL    its publish URL with {env} (POST; body from --publish-body)
  --publish-token T    sent as 'Authorization: Token T'
  --publish-body B     body template; {iso}, {epoch}, {env} (default {\"updated_at\": \"{iso}\"})
  --publish-cmd CMD    shell command that publishes instead; {env}, {iso}, {epoch}
  --server-pid PID     process to read RSS and CPU of (foreign targets)
  --metrics-url URL    Prometheus endpoint with flagsmith_sse_fanout_duration_seconds
  --prefix P           environment keys are P-0, P-1, ... (default bench)
  --reconnects N       reconnects per subscriber after its stream ends (default 3)
  --json PATH          result file (default target/load-result.json)
  --csv PATH           every latency sample: scenario,server,round,env,subscriber,latency_ms
                       (default target/load-latency.csv)
  --svg PATH           latency CDF chart, one line per scenario and server (default
                       target/load-latency.svg)
  --label NAME         the server's name in the CSV and the chart (default from the target)
  --chart-from A,B,..  measure nothing: draw --svg from these CSV files (sample files or CDF
                       files written by --cdf-csv), every series of every file on one chart;
                       FILE@NAME draws that file's series under the server name NAME
  --cdf-csv PATH       also write the chart's CDF points per series (a small CSV)
  --quick              small smoke run
";

impl Opts {
    /// Parses the arguments after `--`; cargo's own `--bench` flag is ignored.
    pub fn parse(args: &[String]) -> Result<Opts, String> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut o = Opts {
            mode: Mode::Ours,
            subscribers: 15_000,
            envs: 10,
            workers: 0,
            rate: 5000.0,
            max_inflight: 256,
            idle_seconds: 30.0,
            store: StoreKind::Redis,
            target: None,
            publish_url: None,
            publish_token: None,
            publish_body: None,
            publish_cmd: None,
            server_pid: None,
            metrics_url: None,
            json: root.join("target/load-result.json"),
            quick: false,
            rounds: 5,
            many_rounds: 3,
            round_gap: 1.5,
            qc_seconds: 5.0,
            qc_conns: 64,
            floor_pairs: 4000,
            server_bin: PathBuf::from(env!("CARGO_BIN_EXE_flagsmith-sse")),
            server_env: Vec::new(),
            prefix: "bench".into(),
            reconnects: 3,
            connect_timeout_ms: 10_000,
            second_instance: false,
            instances: 0,
            csv: root.join("target/load-latency.csv"),
            svg: root.join("target/load-latency.svg"),
            chart_from: Vec::new(),
            cdf_csv: None,
            label: None,
            responsive: false,
        };
        if args.iter().any(|a| a == "--quick") {
            o.quick = true;
            o.subscribers = 500;
            o.envs = 5;
            o.idle_seconds = 3.0;
            o.rounds = 3;
            o.many_rounds = 2;
            o.qc_seconds = 2.0;
            o.floor_pairs = 500;
        }
        let (mut rounds_set, mut many_set, mut gap_set) = (false, false, false);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--bench" | "--quick" => {}
                "--help" | "-h" => return Err(String::new()),
                "--subscribers" => o.subscribers = num(&val(a)?, a)?,
                "--envs" => o.envs = num(&val(a)?, a)?,
                "--workers" => o.workers = num(&val(a)?, a)?,
                "--rate" => o.rate = num(&val(a)?, a)?,
                "--inflight" => o.max_inflight = num(&val(a)?, a)?,
                "--idle-seconds" => o.idle_seconds = num(&val(a)?, a)?,
                "--store" => {
                    o.store = match val(a)?.as_str() {
                        "embedded" => StoreKind::Embedded,
                        "redis" => StoreKind::Redis,
                        other => return Err(format!("--store: embedded or redis, not {other:?}")),
                    }
                }
                "--rounds" => {
                    o.rounds = num(&val(a)?, a)?;
                    rounds_set = true;
                }
                "--many-rounds" => {
                    o.many_rounds = num(&val(a)?, a)?;
                    many_set = true;
                }
                "--round-gap" => {
                    o.round_gap = num(&val(a)?, a)?;
                    gap_set = true;
                }
                "--second-instance" => o.second_instance = true,
                "--responsive" => o.responsive = true,
                "--qc-seconds" => o.qc_seconds = num(&val(a)?, a)?,
                "--qc-conns" => o.qc_conns = num(&val(a)?, a)?,
                "--floor-pairs" => o.floor_pairs = num(&val(a)?, a)?,
                "--server-bin" => o.server_bin = PathBuf::from(val(a)?),
                "--server-env" => {
                    let kv = val(a)?;
                    let (k, v) = kv
                        .split_once('=')
                        .ok_or_else(|| format!("--server-env wants K=V, not {kv:?}"))?;
                    o.server_env.push((k.to_owned(), v.to_owned()));
                }
                "--nchan" => o.mode = Mode::Nchan,
                "--target" => {
                    o.target = Some(val(a)?);
                    o.mode = Mode::Foreign;
                }
                "--publish-url" => o.publish_url = Some(val(a)?),
                "--publish-token" => o.publish_token = Some(val(a)?),
                "--publish-body" => o.publish_body = Some(val(a)?),
                "--publish-cmd" => o.publish_cmd = Some(val(a)?),
                "--server-pid" => o.server_pid = Some(num(&val(a)?, a)?),
                "--metrics-url" => o.metrics_url = Some(val(a)?),
                "--prefix" => o.prefix = val(a)?,
                "--reconnects" => o.reconnects = num(&val(a)?, a)?,
                "--json" => o.json = PathBuf::from(val(a)?),
                "--csv" => o.csv = PathBuf::from(val(a)?),
                "--svg" => o.svg = PathBuf::from(val(a)?),
                "--cdf-csv" => o.cdf_csv = Some(PathBuf::from(val(a)?)),
                "--label" => o.label = Some(val(a)?),
                "--instances" => o.instances = num(&val(a)?, a)?,
                "--chart-from" => {
                    o.chart_from = val(a)?
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(PathBuf::from)
                        .collect();
                }
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if o.second_instance {
            if o.mode != Mode::Ours || o.store != StoreKind::Redis {
                return Err("--second-instance needs our server with --store redis".into());
            }
            if !rounds_set {
                o.rounds = if o.quick { 4 } else { 10 };
            }
            if !many_set {
                o.many_rounds = if o.quick { 3 } else { 10 };
            }
            if !gap_set {
                o.round_gap = 1.37;
            }
            if o.cache_interval().is_none() {
                return Err("CACHE_UPDATE_INTERVAL_SECONDS must be a positive number".into());
            }
        }
        if o.instances > 0 {
            if o.mode != Mode::Ours || o.store != StoreKind::Redis || o.second_instance {
                return Err(
                    "--instances needs our server with --store redis, without --second-instance"
                        .into(),
                );
            }
            if o.instances > 32 {
                return Err("--instances must be at most 32".into());
            }
        }
        if o.responsive {
            if o.second_instance || o.instances > 0 {
                return Err(
                    "--responsive goes with neither --second-instance nor --instances".into(),
                );
            }
            o.envs = 1;
            if !rounds_set {
                o.rounds = 12;
            }
            if !gap_set {
                o.round_gap = 0.5;
            }
            if !o.server_env.iter().any(|(k, _)| k == "STREAM_DELAY") {
                o.server_env.push(("STREAM_DELAY".into(), "0".into()));
            }
        }
        if o.workers == 0 {
            o.workers = o.subscribers.div_ceil(5000).max(2);
        }
        o.workers = o.workers.min(o.subscribers.max(1));
        if o.subscribers == 0 || o.subscribers > 200_000 {
            return Err("--subscribers must be 1..=200000".into());
        }
        if o.envs == 0 || o.envs > 100_000 {
            return Err("--envs must be 1..=100000".into());
        }
        if o.workers > 250 {
            return Err("--workers must be at most 250 (one source address each)".into());
        }
        if o.subscribers.div_ceil(o.workers) > 19_000 {
            return Err(format!(
                "{} subscribers over {} workers is more than 19000 sockets per worker; add workers",
                o.subscribers, o.workers
            ));
        }
        if o.floor_pairs > 9000 {
            return Err("--floor-pairs must be at most 9000 (two descriptors each)".into());
        }
        if !(0.0..=3600.0).contains(&o.idle_seconds) || !(0.0..=600.0).contains(&o.qc_seconds) {
            return Err("--idle-seconds up to 3600, --qc-seconds up to 600".into());
        }
        if o.rounds > 1000 || o.many_rounds > 1000 || !(0.0..=60.0).contains(&o.round_gap) {
            return Err("--rounds/--many-rounds up to 1000, --round-gap up to 60".into());
        }
        if o.qc_conns == 0 || o.qc_conns > 4096 || o.max_inflight == 0 {
            return Err("--qc-conns must be 1..=4096 and --inflight at least 1".into());
        }
        if o.rate < 0.0 {
            return Err("--rate must not be negative".into());
        }
        if !o
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            || o.prefix.is_empty()
        {
            return Err("--prefix: [A-Za-z0-9._-]+".into());
        }
        if o.mode == Mode::Foreign && o.publish_url.is_none() && o.publish_cmd.is_none() {
            return Err("--target needs --publish-url or --publish-cmd".into());
        }
        Ok(o)
    }

    /// `CACHE_UPDATE_INTERVAL_SECONDS` as our server will see it (default 1 s); `None` if
    /// `--server-env` sets it to something that is not a positive number of seconds.
    pub fn cache_interval(&self) -> Option<f64> {
        match self
            .server_env
            .iter()
            .rev()
            .find(|(k, _)| k == "CACHE_UPDATE_INTERVAL_SECONDS")
        {
            None => Some(1.0),
            Some((_, v)) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0),
        }
    }

    /// The key of environment `i`.
    pub fn env_key(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }
}

fn num<T: std::str::FromStr>(s: &str, name: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{name}: not a valid number: {s:?}"))
}
