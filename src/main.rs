//! The `flagsmith-sse` binary: reads the configuration, starts logging and the server, maps
//! errors to exit codes (2: configuration, 1: anything else at start-up or run time).
//!
//! SIGTERM and SIGINT are blocked here before any thread starts, so that every thread inherits
//! the block; the event loop's thread (this one) unblocks them once the server's helpers run.

use flagsmith_sse::{Config, Server, config, logging, sys};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long the last log lines may take to reach stderr at exit.
const EXIT_LOG_FLUSH: Duration = Duration::from_secs(1);

fn main() {
    sys::block_termination_signals();
    sys::ignore_sigpipe();
    let code = run();
    // Threads are not joined: a store helper stuck in a call must not hold the exit up.
    logging::flush(EXIT_LOG_FLUSH);
    std::process::exit(code);
}

/// Writes a line to stderr before logging runs; a failure to write is no reason to fail.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn run() -> i32 {
    match std::env::args().nth(1).as_deref() {
        // `serve`: what Flagsmith's Helm chart passes to its SSE image; the same as no argument.
        None | Some("serve") => {}
        Some("--help" | "-h") => {
            let _ = write!(std::io::stdout(), "{}", config::help());
            return 0;
        }
        Some("--version" | "-V") => {
            let _ = writeln!(
                std::io::stdout(),
                "flagsmith-sse {}",
                env!("CARGO_PKG_VERSION")
            );
            return 0;
        }
        Some("--healthcheck") => return healthcheck(),
        Some(other) => {
            say(&format!(
                "flagsmith-sse: unknown argument {other:?}; see --help"
            ));
            return 2;
        }
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            say(&format!("flagsmith-sse: configuration error: {e}"));
            return 2;
        }
    };
    if let Err(e) = logging::init(cfg.log_level, cfg.log_format) {
        say(&format!("flagsmith-sse: cannot start logging: {e}"));
    }
    log::info!("flagsmith-sse {} starting", env!("CARGO_PKG_VERSION"));
    let env = |k: &str| std::env::var(k).ok();
    let server = match Server::new(cfg.clone()) {
        Ok(s) => s,
        Err(e) => {
            log::info!("configuration: {}", cfg.summary(None, env));
            log::error!("cannot start: {e}");
            return 1;
        }
    };
    log::info!(
        "configuration: {}",
        cfg.summary(Some(server.max_connections()), env)
    );
    sys::unblock_termination_signals();
    match server.run() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("event loop failed: {e}");
            1
        }
    }
}

/// The address `--healthcheck` probes for a server bound to `bind`: the loopback address of
/// the same family for an unspecified address, the address itself otherwise.
fn probe_address(bind: IpAddr) -> IpAddr {
    match bind {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Probes `/health/liveness/` where the server listens (`BIND_ADDRESS`, `PORT`): exit 0 when
/// it answers 200, else 1.
fn healthcheck() -> i32 {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let port: u16 = match var("PORT").map(|p| p.trim().parse()) {
        None => 8000,
        Some(Ok(p)) => p,
        Some(Err(_)) => {
            say("unhealthy: PORT is not a port number");
            return 1;
        }
    };
    let bind: IpAddr = match var("BIND_ADDRESS").map(|a| a.trim().parse()) {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(Ok(a)) => a,
        Some(Err(_)) => {
            say("unhealthy: BIND_ADDRESS is not an IP address");
            return 1;
        }
    };
    let addr = SocketAddr::new(probe_address(bind), port);
    let probe = || -> std::io::Result<bool> {
        let timeout = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
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
            say(&format!(
                "unhealthy: http://{addr}/health/liveness/ did not answer 200"
            ));
            1
        }
        Err(e) => {
            say(&format!("unhealthy: http://{addr}/health/liveness/: {e}"));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::probe_address;
    use std::net::IpAddr;

    #[test]
    fn probes_loopback_of_the_same_family_for_unspecified_addresses() {
        let p = |a: &str| probe_address(a.parse::<IpAddr>().unwrap()).to_string();
        assert_eq!(p("0.0.0.0"), "127.0.0.1");
        assert_eq!(p("::"), "::1");
        assert_eq!(p("127.0.0.2"), "127.0.0.2");
        assert_eq!(p("::1"), "::1");
        assert_eq!(p("10.1.2.3"), "10.1.2.3");
    }
}
