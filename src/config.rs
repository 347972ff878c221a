//! Configuration from environment variables, with the names Flagsmith's own image uses.
//!
//! Everything is read and checked once at start-up; a bad value stops the server with a message
//! that names the variable, so that a typo never turns into a silently different default.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Every variable the server reads: name, default, meaning. `--help` prints this table.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "SSE_AUTHENTICATION_TOKEN",
        "required",
        "shared secret for queue-change (Authorization: Token <it>)",
    ),
    ("PORT", "8000", "TCP port to listen on"),
    (
        "BIND_ADDRESS",
        "0.0.0.0",
        "address to listen on (IPv4 or IPv6)",
    ),
    (
        "REDIS_URL",
        "unset",
        "redis:// or rediss:// URL; overrides the REDIS_* parts",
    ),
    (
        "REDIS_HOST",
        "unset",
        "Redis host; with neither this nor REDIS_URL the embedded store is used",
    ),
    ("REDIS_PORT", "6379", "Redis port"),
    ("REDIS_USERNAME", "none", "Redis ACL user name"),
    ("REDIS_PASSWORD", "none", "Redis password"),
    ("REDIS_DB", "0", "Redis database number"),
    (
        "REDIS_USE_SSL",
        "false",
        "connect to Redis over TLS (needs the tls feature; trusted CAs: SSL_CERT_FILE)",
    ),
    (
        "USE_CLUSTER_MODE",
        "false",
        "Redis Cluster; REDIS_URL may list seed nodes, comma-separated (needs the cluster feature)",
    ),
    (
        "REDIS_CHANGELOG_MAXLEN",
        "10000",
        "approximate length the Redis change log is trimmed to",
    ),
    (
        "REDIS_WAIT_REPLICAS",
        "0",
        "replicas that must acknowledge a write before its 200 (Redis WAIT, 1 s; else 503)",
    ),
    (
        "CACHE_UPDATE_INTERVAL_SECONDS",
        "1",
        "seconds between fetches from the store (fractions allowed)",
    ),
    (
        "STREAM_DELAY",
        "1",
        "coalescing window per environment in seconds; 0 turns it off",
    ),
    (
        "MAX_STREAM_AGE",
        "30",
        "seconds before a stream is ended for rebalancing (+-10% jitter); negative: never",
    ),
    (
        "KEEPALIVE_SECONDS",
        "15",
        "idle seconds before a ': ping' comment; also the stalled-reader limit",
    ),
    (
        "MAX_CONNECTIONS",
        "open-file limit - 64",
        "open client connections allowed; the next one gets 503 (under 256 open files, a quarter of the limit is kept back, at least 16)",
    ),
    (
        "REQUEST_TIMEOUT_SECONDS",
        "10",
        "seconds allowed to send a complete request (408 after)",
    ),
    (
        "MAX_BUFFERED_REQUEST_BYTES",
        "67108864 (64 MiB)",
        "all connections' buffered request bytes together; past it a request gets 503 + Retry-After",
    ),
    (
        "SHUTDOWN_GRACE_SECONDS",
        "5",
        "window over which open streams are ended on SIGTERM",
    ),
    (
        "REUSE_PORT",
        "false",
        "set SO_REUSEPORT, to run one process per core on one port",
    ),
    ("LOG_LEVEL", "info", "error, warn, info, debug or trace"),
    (
        "REDIS_NOTIFY",
        "true",
        "publish a wake-up after every write and fetch at once on other instances' wake-ups (Redis Pub/Sub); false: the periodic fetch only",
    ),
    (
        "MAX_FUTURE_SECONDS",
        "3600",
        "how far ahead of the server's clock a queue-change time may be (400 beyond); 0: no limit",
    ),
    (
        "LOG_FORMAT",
        "text",
        "text, or json: one JSON object per line (time, level, module, message, fields)",
    ),
];

/// Where the store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process only: one instance, nothing shared.
    Embedded,
    /// A Redis server, by URL (credentials included, so never print it: see [`redact_url`]).
    Redis {
        /// `redis://` or `rediss://` URL; in cluster mode, one or more comma-separated seed nodes.
        url: String,
        /// Approximate number of entries kept in the change log.
        changelog_maxlen: u64,
        /// Whether Redis is a Redis Cluster.
        cluster: bool,
    },
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Embedded => f.write_str("embedded"),
            StoreConfig::Redis {
                url,
                changelog_maxlen,
                cluster,
            } => {
                write!(
                    f,
                    "redis {}{} (change log ~{changelog_maxlen})",
                    if *cluster { "cluster " } else { "" },
                    redact_url(url)
                )
            }
        }
    }
}

impl StoreConfig {
    /// The Redis host(s) and port(s), without credentials, for log lines: `cache:6379`, or
    /// `a:7000,b:7001` for cluster seeds; `embedded` for the embedded store.
    pub fn hosts(&self) -> String {
        match self {
            StoreConfig::Embedded => "embedded".to_owned(),
            StoreConfig::Redis { url, .. } => url_hosts(url),
        }
    }
}

/// The host(s) and port(s) of a Redis URL (or a comma-separated list), without credentials.
pub fn url_hosts(url: &str) -> String {
    redact_url(url)
        .split(',')
        .map(|node| {
            let rest = node.split_once("://").map_or(node, |(_, r)| r);
            let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            rest.split('/').next().unwrap_or(rest)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The server's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Shared secret for queue-change.
    pub token: Token,
    /// Listening address.
    pub bind: SocketAddr,
    /// Which store to use.
    pub store: StoreConfig,
    /// Time between fetches from the store.
    pub cache_update_interval: Duration,
    /// Coalescing window per environment; zero turns coalescing off.
    pub stream_delay: Duration,
    /// Age after which a stream is ended; `None`: never.
    pub max_stream_age: Option<Duration>,
    /// Idle time before a keep-alive comment; also how long a reader may stall.
    pub keepalive: Duration,
    /// Client connections allowed; `None`: derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// Time allowed to send a complete request.
    pub request_timeout: Duration,
    /// Budget for the request bytes buffered by all connections together.
    pub max_buffered_request_bytes: usize,
    /// Window over which streams are ended at shutdown.
    pub shutdown_grace: Duration,
    /// Whether to set SO_REUSEPORT on the listener.
    pub reuse_port: bool,
    /// Whether to publish and listen for wake-ups between instances (Redis only).
    pub redis_notify: bool,
    /// Log verbosity.
    pub log_level: log::LevelFilter,
    /// Replicas that must acknowledge a write before its 200 (Redis `WAIT`); 0: none.
    pub wait_replicas: u32,
    /// How far ahead of the server's clock a queue-change time may be; `None`: no limit.
    pub max_future: Option<Duration>,
    /// How log lines look.
    pub log_format: crate::logging::Format,
}

/// The authentication token; its `Debug` form is redacted so that it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// A variable that is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable's name.
    pub var: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn bad(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

/// Reads variables through `get`, treating empty values as unset.
struct Vars<F>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    fn get(&self, var: &str) -> Option<String> {
        (self.0)(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| bad(var, format!("{v:?} is not {what}"))),
        }
    }

    fn seconds(
        &self,
        var: &'static str,
        default: f64,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let secs: f64 = self.parse(var, default, "a number of seconds")?;
        if !secs.is_finite() || secs < 0.0 || (secs == 0.0 && !allow_zero) || secs > 1e9 {
            let range = if allow_zero {
                "zero or more"
            } else {
                "more than zero"
            };
            return Err(bad(
                var,
                format!("{secs} seconds is out of range: give {range}"),
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
        self.flag_or(var, false)
    }

    fn flag_or(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.to_ascii_lowercase()).as_deref() {
            None => Ok(default),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some(v) => Err(bad(var, format!("{v:?} is not true or false"))),
        }
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the configuration through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let v = Vars(get);
        let token = v.get("SSE_AUTHENTICATION_TOKEN").ok_or_else(|| {
            bad(
                "SSE_AUTHENTICATION_TOKEN",
                "is required: set it to the token Flagsmith's task processor sends",
            )
        })?;
        let port: u16 = v.parse("PORT", 8000, "a port number (0-65535)")?;
        let ip: IpAddr = v.parse("BIND_ADDRESS", IpAddr::from([0, 0, 0, 0]), "an IP address")?;
        let max_stream_age = match v.get("MAX_STREAM_AGE") {
            None => Some(Duration::from_secs(30)),
            Some(s) => match s.parse::<f64>() {
                Ok(secs) if secs < 0.0 => None,
                Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= 1e9 => {
                    Some(Duration::from_secs_f64(secs))
                }
                _ => {
                    return Err(bad(
                        "MAX_STREAM_AGE",
                        format!("{s:?} is not a positive or negative number of seconds"),
                    ));
                }
            },
        };
        let max_connections = match v.get("MAX_CONNECTIONS") {
            None => None,
            Some(s) => match s.parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(bad(
                        "MAX_CONNECTIONS",
                        format!("{s:?} is not a positive whole number"),
                    ));
                }
            },
        };
        let log_level = match v
            .get("LOG_LEVEL")
            .map(|l| l.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("info") => log::LevelFilter::Info,
            Some("error") => log::LevelFilter::Error,
            Some("warn" | "warning") => log::LevelFilter::Warn,
            Some("debug") => log::LevelFilter::Debug,
            Some("trace") => log::LevelFilter::Trace,
            Some(l) => {
                return Err(bad(
                    "LOG_LEVEL",
                    format!("{l:?} is not one of error, warn, info, debug, trace"),
                ));
            }
        };
        let store = store_config(&v)?;
        let reuse_port = v.flag("REUSE_PORT")?;
        if reuse_port && store == StoreConfig::Embedded {
            return Err(bad(
                "REUSE_PORT",
                "true needs Redis (REDIS_URL or REDIS_HOST): with the embedded store, \
                 processes on one port would share nothing and subscribers would miss changes \
                 posted to another process",
            ));
        }
        let wait_replicas: u32 = v.parse("REDIS_WAIT_REPLICAS", 0, "a whole number")?;
        if wait_replicas > 0 && store == StoreConfig::Embedded {
            return Err(bad(
                "REDIS_WAIT_REPLICAS",
                "needs Redis (REDIS_URL or REDIS_HOST): the embedded store has no replicas",
            ));
        }
        let max_future: u64 = v.parse(
            "MAX_FUTURE_SECONDS",
            3600,
            "a whole number of seconds (0: no limit)",
        )?;
        let log_format = match v
            .get("LOG_FORMAT")
            .map(|l| l.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("text") => crate::logging::Format::Text,
            Some("json") => crate::logging::Format::Json,
            Some(f) => {
                return Err(bad("LOG_FORMAT", format!("{f:?} is not one of text, json")));
            }
        };
        Ok(Config {
            token: Token(token),
            bind: SocketAddr::new(ip, port),
            store,
            cache_update_interval: v.seconds("CACHE_UPDATE_INTERVAL_SECONDS", 1.0, false)?,
            stream_delay: v.seconds("STREAM_DELAY", 1.0, true)?,
            max_stream_age,
            keepalive: v.seconds("KEEPALIVE_SECONDS", 15.0, false)?,
            max_connections,
            request_timeout: v.seconds("REQUEST_TIMEOUT_SECONDS", 10.0, false)?,
            max_buffered_request_bytes: match v.parse(
                "MAX_BUFFERED_REQUEST_BYTES",
                64 << 20,
                "a whole number of bytes",
            )? {
                0 => return Err(bad("MAX_BUFFERED_REQUEST_BYTES", "must be at least 1")),
                n => n,
            },
            shutdown_grace: v.seconds("SHUTDOWN_GRACE_SECONDS", 5.0, true)?,
            reuse_port,
            redis_notify: v.flag_or("REDIS_NOTIFY", true)?,
            log_level,
            wait_replicas,
            max_future: (max_future > 0).then(|| Duration::from_secs(max_future.min(1 << 40))),
            log_format,
        })
    }

    /// The configuration as one line for the start-up log: every variable the server reads,
    /// by name, with its effective value (secrets redacted). `max_connections` is the limit in
    /// force, once the server derived it from the open-file limit; `env` reads the variables
    /// that have no field of their own (the environment, or a map in tests).
    pub fn summary(
        &self,
        max_connections: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> String {
        let secs = |d: Duration| {
            let s = d.as_secs_f64();
            format!("{s}")
        };
        let set = |k: &str| {
            env(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut out = String::new();
        for (name, default, _) in VARIABLES {
            let value = match *name {
                "SSE_AUTHENTICATION_TOKEN" | "REDIS_PASSWORD" => match set(name) {
                    Some(_) => "<redacted>".to_owned(),
                    None if *name == "REDIS_PASSWORD" => "none".to_owned(),
                    None => "unset".to_owned(),
                },
                "PORT" => self.bind.port().to_string(),
                "BIND_ADDRESS" => self.bind.ip().to_string(),
                "REDIS_URL" => match &self.store {
                    StoreConfig::Embedded => "unset".to_owned(),
                    StoreConfig::Redis { url, .. } => redact_url(url),
                },
                "REDIS_CHANGELOG_MAXLEN" => match &self.store {
                    StoreConfig::Redis {
                        changelog_maxlen, ..
                    } => changelog_maxlen.to_string(),
                    StoreConfig::Embedded => default.to_string(),
                },
                "USE_CLUSTER_MODE" => {
                    matches!(self.store, StoreConfig::Redis { cluster: true, .. }).to_string()
                }
                "CACHE_UPDATE_INTERVAL_SECONDS" => secs(self.cache_update_interval),
                "STREAM_DELAY" => secs(self.stream_delay),
                "MAX_STREAM_AGE" => self.max_stream_age.map_or_else(|| "never".to_owned(), secs),
                "KEEPALIVE_SECONDS" => secs(self.keepalive),
                "MAX_CONNECTIONS" => match (max_connections, self.max_connections) {
                    (Some(n), _) | (None, Some(n)) => n.to_string(),
                    (None, None) => default.to_string(),
                },
                "REQUEST_TIMEOUT_SECONDS" => secs(self.request_timeout),
                "SHUTDOWN_GRACE_SECONDS" => secs(self.shutdown_grace),
                "REUSE_PORT" => self.reuse_port.to_string(),
                "REDIS_NOTIFY" => self.redis_notify.to_string(),
                "REDIS_WAIT_REPLICAS" => self.wait_replicas.to_string(),
                "MAX_FUTURE_SECONDS" => self
                    .max_future
                    .map_or_else(|| "0".to_owned(), |d| d.as_secs().to_string()),
                "LOG_LEVEL" => self.log_level.as_str().to_ascii_lowercase(),
                "LOG_FORMAT" => self.log_format.name().to_owned(),
                _ => set(name).unwrap_or_else(|| default.to_string()),
            };
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(name);
            out.push('=');
            if value.is_empty() || value.contains([' ', '"', '=']) {
                out.push_str(&format!("{value:?}"));
            } else {
                out.push_str(&value);
            }
        }
        out
    }
}

fn store_config<F: Fn(&str) -> Option<String>>(v: &Vars<F>) -> Result<StoreConfig, ConfigError> {
    let changelog_maxlen: u64 = v.parse("REDIS_CHANGELOG_MAXLEN", 10_000, "a whole number")?;
    if changelog_maxlen == 0 {
        return Err(bad("REDIS_CHANGELOG_MAXLEN", "must be at least 1"));
    }
    let use_ssl = v.flag("REDIS_USE_SSL")?;
    let cluster = v.flag("USE_CLUSTER_MODE")?;
    if cluster && !cfg!(feature = "cluster") {
        return Err(bad(
            "USE_CLUSTER_MODE",
            "Redis Cluster support is not in this build: build with `--features cluster` \
             (the Docker image has it)",
        ));
    }
    let url = if let Some(url) = v.get("REDIS_URL") {
        // Only a cluster takes a list of seed nodes; elsewhere a comma is part of the URL.
        let nodes: Vec<&str> = if cluster {
            url.split(',').map(str::trim).collect()
        } else {
            vec![url.as_str()]
        };
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            let node = match node.strip_prefix("redis://") {
                Some(rest) if use_ssl => format!("rediss://{rest}"),
                _ => node.to_owned(),
            };
            if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                return Err(bad(
                    "REDIS_URL",
                    format!(
                        "{:?} must start with redis:// or rediss://",
                        redact_url(&node)
                    ),
                ));
            }
            out.push(node);
        }
        if out.iter().any(|n| n.starts_with("rediss://"))
            && out.iter().any(|n| n.starts_with("redis://"))
        {
            return Err(bad(
                "REDIS_URL",
                "mixes redis:// and rediss:// nodes: use one for all",
            ));
        }
        out.join(",")
    } else if let Some(host) = v.get("REDIS_HOST") {
        let port: u16 = v.parse("REDIS_PORT", 6379, "a port number (0-65535)")?;
        let db: u32 = v.parse("REDIS_DB", 0, "a database number")?;
        if cluster && db != 0 {
            return Err(bad("REDIS_DB", "a Redis Cluster has only database 0"));
        }
        let mut url = String::from(if use_ssl { "rediss://" } else { "redis://" });
        let user = v.get("REDIS_USERNAME");
        let password = v.get("REDIS_PASSWORD");
        if user.is_some() || password.is_some() {
            url.push_str(&percent_encode(user.as_deref().unwrap_or("")));
            if let Some(p) = &password {
                url.push(':');
                url.push_str(&percent_encode(p));
            }
            url.push('@');
        }
        if host.contains(':') && !host.starts_with('[') {
            url.push_str(&format!("[{host}]"));
        } else {
            url.push_str(&host);
        }
        url.push_str(&format!(":{port}/{db}"));
        url
    } else if cluster {
        return Err(bad(
            "USE_CLUSTER_MODE",
            "needs REDIS_URL or REDIS_HOST: the cluster's nodes",
        ));
    } else {
        return Ok(StoreConfig::Embedded);
    };
    if url.starts_with("rediss://") && !cfg!(feature = "tls") {
        let var = if use_ssl {
            "REDIS_USE_SSL"
        } else {
            "REDIS_URL"
        };
        return Err(bad(
            var,
            "TLS to Redis is not in this build: build with `--features tls` \
             (the Docker image has it)",
        ));
    }
    Ok(StoreConfig::Redis {
        url,
        changelog_maxlen,
        cluster,
    })
}

/// Escapes everything but RFC 3986 unreserved characters, for user names and passwords in URLs.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URL, or a comma-separated list of them, with passwords (and user names) replaced by `***`,
/// fit for logs.
pub fn redact_url(url: &str) -> String {
    let nodes: Vec<&str> = url.split(',').collect();
    if nodes.len() > 1 && nodes.iter().all(|n| n.contains("://")) {
        return nodes
            .iter()
            .map(|n| redact_one(n))
            .collect::<Vec<_>>()
            .join(",");
    }
    // Not a list (perhaps a comma in a password): hide everything up to the last `@`.
    redact_one(url)
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparseable URL>".to_owned();
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}

/// The text of `--help`.
pub fn help() -> String {
    let mut s = format!(
        "flagsmith-sse {}\n\
         Flagsmith real-time flag updates over server-sent events.\n\n\
         USAGE:\n    flagsmith-sse [--help | --version | --healthcheck]\n\n\
         Configured by environment variables:\n\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, default, meaning) in VARIABLES {
        s.push_str(&format!("    {name:<30} {default:<22} {meaning}\n"));
    }
    s.push_str(
        "\nWith neither REDIS_URL nor REDIS_HOST set, the embedded in-memory store is used\n\
         (one instance, nothing shared).\n\n\
         --healthcheck probes http://$BIND_ADDRESS:$PORT/health/liveness/ (127.0.0.1 or ::1\n\
         for an unspecified address) and exits 0 or 1.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let c = cfg(&[("SSE_AUTHENTICATION_TOKEN", "t")]).unwrap();
        assert_eq!(c.bind, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(c.store, StoreConfig::Embedded);
        assert_eq!(c.cache_update_interval, Duration::from_secs(1));
        assert_eq!(c.stream_delay, Duration::from_secs(1));
        assert_eq!(c.max_stream_age, Some(Duration::from_secs(30)));
        assert_eq!(c.keepalive, Duration::from_secs(15));
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.max_connections, None);
        assert_eq!(c.max_buffered_request_bytes, 64 << 20);
        assert!(!c.reuse_port);
        assert!(c.redis_notify);
        assert_eq!(c.wait_replicas, 0);
        assert_eq!(c.max_future, Some(Duration::from_secs(3600)));
        assert!(!format!("{c:?}").contains("\"t\""));
    }

    #[test]
    fn reuse_port_needs_redis_and_notify_can_be_turned_off() {
        let e = cfg(&[("SSE_AUTHENTICATION_TOKEN", "t"), ("REUSE_PORT", "true")]).unwrap_err();
        assert_eq!(e.var, "REUSE_PORT");
        assert!(e.problem.contains("needs Redis"), "{e}");
        let c = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REUSE_PORT", "true"),
            ("REDIS_HOST", "cache"),
            ("REDIS_NOTIFY", "false"),
        ])
        .unwrap();
        assert!(c.reuse_port && !c.redis_notify);
        let e = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_NOTIFY", "sometimes"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "REDIS_NOTIFY");
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(cfg(&[]).unwrap_err().var, "SSE_AUTHENTICATION_TOKEN");
        assert_eq!(
            cfg(&[("SSE_AUTHENTICATION_TOKEN", "")]).unwrap_err().var,
            "SSE_AUTHENTICATION_TOKEN"
        );
        for (var, val) in [
            ("PORT", "abc"),
            ("PORT", "70000"),
            ("BIND_ADDRESS", "localhost:1"),
            ("CACHE_UPDATE_INTERVAL_SECONDS", "0"),
            ("STREAM_DELAY", "-1"),
            ("MAX_STREAM_AGE", "soon"),
            ("KEEPALIVE_SECONDS", "NaN"),
            ("MAX_CONNECTIONS", "0"),
            ("MAX_BUFFERED_REQUEST_BYTES", "lots"),
            ("MAX_BUFFERED_REQUEST_BYTES", "0"),
            ("REUSE_PORT", "maybe"),
            ("LOG_LEVEL", "loud"),
            ("LOG_FORMAT", "xml"),
            ("REDIS_URL", "http://x"),
            ("REDIS_WAIT_REPLICAS", "-1"),
            ("REDIS_WAIT_REPLICAS", "1"),
            ("MAX_FUTURE_SECONDS", "1.5"),
        ] {
            let e = cfg(&[("SSE_AUTHENTICATION_TOKEN", "t"), (var, val)]).unwrap_err();
            assert_eq!(e.var, var, "{e}");
        }
    }

    #[test]
    fn redis_from_parts_and_url() {
        let c = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_HOST", "cache"),
            ("REDIS_USERNAME", "sse"),
            ("REDIS_PASSWORD", "p@ss:w/rd"),
            ("REDIS_DB", "2"),
        ])
        .unwrap();
        let StoreConfig::Redis { url, cluster, .. } = &c.store else {
            panic!("not redis")
        };
        assert_eq!(url, "redis://sse:p%40ss%3Aw%2Frd@cache:6379/2");
        assert!(!cluster);
        assert_eq!(
            format!("{:?}", c.store),
            "redis redis://***@cache:6379/2 (change log ~10000)"
        );
        let c = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_URL", "redis://h:1/0"),
            ("REDIS_HOST", "x"),
        ])
        .unwrap();
        assert!(matches!(c.store, StoreConfig::Redis { ref url, .. } if url == "redis://h:1/0"));
        assert_eq!(c.store.hosts(), "h:1");
        assert_eq!(StoreConfig::Embedded.hosts(), "embedded");
    }

    #[test]
    fn tls_needs_the_tls_feature() {
        let parts = [
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_HOST", "cache"),
            ("REDIS_PASSWORD", "secret"),
            ("REDIS_USE_SSL", "true"),
        ];
        let url = [
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_URL", "rediss://cache:6380/0"),
        ];
        let url_and_flag = [
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_URL", "redis://cache:6380/0"),
            ("REDIS_USE_SSL", "1"),
        ];
        if cfg!(feature = "tls") {
            let c = cfg(&parts).unwrap();
            assert!(
                matches!(&c.store, StoreConfig::Redis { url, .. } if url == "rediss://:secret@cache:6379/0")
            );
            assert_eq!(
                format!("{:?}", c.store),
                "redis rediss://***@cache:6379/0 (change log ~10000)"
            );
            let c = cfg(&url_and_flag).unwrap();
            assert!(
                matches!(&c.store, StoreConfig::Redis { url, .. } if url == "rediss://cache:6380/0")
            );
            assert!(cfg(&url).is_ok());
        } else {
            let e = cfg(&parts).unwrap_err();
            assert_eq!(e.var, "REDIS_USE_SSL");
            assert!(e.problem.contains("--features tls"), "{e}");
            assert_eq!(cfg(&url_and_flag).unwrap_err().var, "REDIS_USE_SSL");
            assert_eq!(cfg(&url).unwrap_err().var, "REDIS_URL");
        }
    }

    #[test]
    fn cluster_mode() {
        let seeds = [
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("USE_CLUSTER_MODE", "true"),
            ("REDIS_URL", "redis://:pw@a:7000, redis://:pw@b:7001"),
        ];
        if !cfg!(feature = "cluster") {
            let e = cfg(&seeds).unwrap_err();
            assert_eq!(e.var, "USE_CLUSTER_MODE");
            assert!(e.problem.contains("--features cluster"), "{e}");
            return;
        }
        let c = cfg(&seeds).unwrap();
        let StoreConfig::Redis { url, cluster, .. } = &c.store else {
            panic!("not redis")
        };
        assert_eq!(url, "redis://:pw@a:7000,redis://:pw@b:7001");
        assert_eq!(c.store.hosts(), "a:7000,b:7001");
        assert!(cluster);
        assert_eq!(
            format!("{:?}", c.store),
            "redis cluster redis://***@a:7000,redis://***@b:7001 (change log ~10000)"
        );
        for (var, val, wrong) in [
            ("REDIS_URL", "redis://a:1,http://b:2", "REDIS_URL"),
            ("REDIS_URL", "redis://a:1,rediss://b:2", "REDIS_URL"),
            ("REDIS_DB", "3", "REDIS_DB"),
            ("USE_CLUSTER_MODE", "maybe", "USE_CLUSTER_MODE"),
        ] {
            let mut env = vec![
                ("SSE_AUTHENTICATION_TOKEN", "t"),
                ("USE_CLUSTER_MODE", "true"),
                ("REDIS_HOST", "a"),
            ];
            env.retain(|(k, _)| *k != var);
            env.push((var, val));
            assert_eq!(cfg(&env).unwrap_err().var, wrong, "{var}={val}");
        }
        let e = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("USE_CLUSTER_MODE", "yes"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "USE_CLUSTER_MODE");
        // Without cluster mode a comma belongs to the URL.
        let c = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_URL", "redis://:a,b@h:1/0"),
        ])
        .unwrap();
        assert!(
            matches!(&c.store, StoreConfig::Redis { url, cluster: false, .. } if url == "redis://:a,b@h:1/0")
        );
    }

    #[test]
    fn redacted_urls_hide_every_password() {
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(
            redact_url("rediss://:p@a:1,rediss://:p@b:2"),
            "rediss://***@a:1,rediss://***@b:2"
        );
        assert_eq!(redact_url("redis://:se,cret@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("nonsense"), "<unparseable URL>");
    }

    #[test]
    fn summary_names_every_variable_with_its_effective_value_and_no_secret() {
        let pairs = [
            ("SSE_AUTHENTICATION_TOKEN", "top-secret-token"),
            ("REDIS_HOST", "cache"),
            ("REDIS_PASSWORD", "hunter2"),
            ("LOG_FORMAT", "JSON"),
            ("MAX_STREAM_AGE", "-1"),
        ];
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let c = Config::from_lookup(|k| map.get(k).cloned()).unwrap();
        let line = c.summary(Some(19936), |k| map.get(k).cloned());
        for (name, _, _) in VARIABLES {
            assert!(line.contains(&format!("{name}=")), "{name} missing: {line}");
        }
        for part in [
            "SSE_AUTHENTICATION_TOKEN=<redacted>",
            "REDIS_PASSWORD=<redacted>",
            "REDIS_URL=redis://***@cache:6379/0",
            "MAX_CONNECTIONS=19936",
            "MAX_STREAM_AGE=never",
            "CACHE_UPDATE_INTERVAL_SECONDS=1 ",
            "LOG_FORMAT=json",
            "LOG_LEVEL=info",
        ] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
        assert!(
            !line.contains("top-secret") && !line.contains("hunter2"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let c = cfg(&[("SSE_AUTHENTICATION_TOKEN", "t")]).unwrap();
        let line = c.summary(None, |_| None);
        assert!(
            line.contains("MAX_CONNECTIONS=\"open-file limit - 64\""),
            "{line}"
        );
        assert!(line.contains("REDIS_PASSWORD=none"), "{line}");
    }

    #[test]
    fn fractions_and_never() {
        let c = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("CACHE_UPDATE_INTERVAL_SECONDS", "0.1"),
            ("STREAM_DELAY", "0"),
            ("MAX_STREAM_AGE", "-1"),
        ])
        .unwrap();
        assert_eq!(c.cache_update_interval, Duration::from_millis(100));
        assert_eq!(c.stream_delay, Duration::ZERO);
        assert_eq!(c.max_stream_age, None);
        let c = cfg(&[
            ("SSE_AUTHENTICATION_TOKEN", "t"),
            ("REDIS_HOST", "h"),
            ("REDIS_WAIT_REPLICAS", "2"),
            ("MAX_FUTURE_SECONDS", "0"),
        ])
        .unwrap();
        assert_eq!(c.wait_replicas, 2);
        assert_eq!(c.max_future, None);
    }
}
