//! The `flagsmith-sse` binary: reads the configuration, starts the server, maps errors to exit
//! codes (2: configuration, 1: anything else at start-up or run time).

use flagsmith_sse::{Config, Server, config};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    match std::env::args().nth(1).as_deref() {
        // `serve`: what Flagsmith's Helm chart passes to its SSE image; the same as no argument.
        None | Some("serve") => {}
        Some("--help" | "-h") => {
            print!("{}", config::help());
            return 0;
        }
        Some("--version" | "-V") => {
            println!("flagsmith-sse {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Some("--healthcheck") => return healthcheck(),
        Some(other) => {
            eprintln!("flagsmith-sse: unknown argument {other:?}; see --help");
            return 2;
        }
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flagsmith-sse: configuration error: {e}");
            return 2;
        }
    };
    if let Err(e) = simple_logger::SimpleLogger::new()
        .with_level(cfg.log_level)
        .with_module_level("redis", log::LevelFilter::Warn)
        .with_utc_timestamps()
        .init()
    {
        eprintln!("flagsmith-sse: cannot start logging: {e}");
    }
    log::info!("flagsmith-sse {} starting", env!("CARGO_PKG_VERSION"));
    if matches!(cfg.store, config::StoreConfig::Embedded) {
        log::info!(
            "no REDIS_URL or REDIS_HOST: using the embedded in-memory store (one instance, nothing shared)"
        );
    }
    log::info!("configuration: {cfg:?}");
    let server = match Server::new(cfg) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot start: {e}");
            return 1;
        }
    };
    match server.run() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("event loop failed: {e}");
            1
        }
    }
}

/// Probes `/health/liveness/` on the configured port: exit 0 when it answers 200, else 1.
fn healthcheck() -> i32 {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(8000);
    let host = match std::env::var("BIND_ADDRESS")
        .ok()
        .and_then(|a| a.trim().parse().ok())
    {
        Some(std::net::IpAddr::V4(a)) if !a.is_unspecified() => std::net::IpAddr::V4(a),
        Some(std::net::IpAddr::V6(a)) if !a.is_unspecified() => std::net::IpAddr::V6(a),
        Some(std::net::IpAddr::V6(_)) => std::net::IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        _ => std::net::IpAddr::from([127, 0, 0, 1]),
    };
    let probe = || -> std::io::Result<bool> {
        let timeout = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(host, port), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(
            b"GET /health/liveness/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(&head == b"HTTP/1.1 200")
    };
    match probe() {
        Ok(true) => 0,
        Ok(false) => {
            eprintln!("unhealthy: /health/liveness/ did not answer 200");
            1
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            1
        }
    }
}
