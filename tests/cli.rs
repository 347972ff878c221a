//! The binary's command line: `--help`, `--version`, `--healthcheck`, start-up errors, and
//! two processes sharing one port with REUSE_PORT (on Redis; refused with the embedded store).

mod common;
use common::*;
use std::time::Duration;

/// Runs `flagsmith-sse --healthcheck` with `env`: its exit code and its stderr.
fn healthcheck(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = binary()
        .arg("--healthcheck")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_variable_with_its_default() {
    let out = binary().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for (name, default, _) in flagsmith_sse::config::VARIABLES {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing from --help"));
        assert!(
            line.contains(default),
            "{name}: default {default} missing in {line:?}"
        );
    }
}

#[test]
fn version_prints_the_crate_version() {
    let out = binary().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("flagsmith-sse {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_argument_exits_2() {
    let out = binary().arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
}

#[test]
fn healthcheck_probes_a_live_server_and_fails_without_one() {
    let server = Server::start(&[]);
    let port = server.addr.port().to_string();
    let (code, stderr) = healthcheck(&[("PORT", &port)]);
    assert_eq!(code, Some(0), "{stderr}");
    drop(server);
    let (code, stderr) = healthcheck(&[("PORT", &port)]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("unhealthy"));
}

#[test]
fn first_log_lines_show_the_configuration_without_secrets() {
    let redis = Redis::start();
    let server = Server::start(&[
        ("REDIS_HOST", "127.0.0.1"),
        ("REDIS_PORT", &redis.port.to_string()),
        ("REDIS_PASSWORD", "hunter2-secret"),
    ]);
    assert!(server.wait_log("configuration:", Duration::from_secs(5)));
    let log = server.log();
    assert!(!log.contains(TOKEN), "token leaked: {log}");
    assert!(!log.contains("hunter2-secret"), "password leaked: {log}");
    assert!(log.contains("***@127.0.0.1"), "{log}");
}

#[test]
fn embedded_store_is_announced() {
    let server = Server::start(&[]);
    server.assert_log("embedded in-memory store", Duration::from_secs(5));
}

#[test]
fn reuse_port_lets_two_processes_share_a_port() {
    let redis = Redis::start();
    let port = free_port().to_string();
    let url = redis.url();
    // A long fetch interval: what reaches the other process comes through its wake-up.
    let env = [
        ("PORT", port.as_str()),
        ("REUSE_PORT", "true"),
        ("REDIS_URL", url.as_str()),
        ("CACHE_UPDATE_INTERVAL_SECONDS", "30"),
        ("STREAM_DELAY", "0"),
    ];
    let a = Server::start(&env);
    let b = Server::start(&env);
    for s in [&a, &b] {
        s.assert_log("listening for wake-ups", Duration::from_secs(10));
    }
    assert_eq!(a.addr, b.addr);
    // The kernel spreads connections over both processes; keep subscribing until each holds
    // some (counted by each process's own open descriptors, since a request to the shared port
    // may reach either).
    let (base_a, base_b) = (a.open_fds(), b.open_fds());
    let mut subs = Vec::new();
    let spread = wait_until(Duration::from_secs(20), || {
        subs.push(Subscriber::connect(a.addr, "shared"));
        a.open_fds() > base_a && b.open_fds() > base_b
    });
    assert!(spread, "connections did not reach both processes");
    // One change, posted to whichever process the kernel picks, reaches every subscriber on
    // both processes: the other process hears of it through Redis.
    let body = "{\"updated_at\": 1700000001.5}";
    assert_eq!(queue_change(a.addr, "shared", body).status, 200);
    for (i, s) in subs.iter_mut().enumerate() {
        assert_eq!(
            s.next_update(Duration::from_secs(3)).as_deref(),
            Some("1700000001.5"),
            "subscriber {i} of {}",
            a.addr
        );
    }
}

#[test]
fn reuse_port_with_the_embedded_store_exits_2_naming_the_problem() {
    let out = binary()
        .env("SSE_AUTHENTICATION_TOKEN", "t")
        .env("PORT", free_port().to_string())
        .env("REUSE_PORT", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("REUSE_PORT"), "{err}");
    assert!(
        err.contains("needs Redis (REDIS_URL or REDIS_HOST)"),
        "{err}"
    );
    assert!(err.contains("embedded store"), "{err}");
}

#[test]
fn bad_configuration_exits_2_naming_the_variable() {
    let out = binary().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SSE_AUTHENTICATION_TOKEN"));
    let out = binary()
        .env("SSE_AUTHENTICATION_TOKEN", "t")
        .env("STREAM_DELAY", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("STREAM_DELAY"));
}

#[test]
fn readme_configuration_table_lists_every_variable() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (name, _, _) in flagsmith_sse::config::VARIABLES {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README's configuration table lacks {name}"
        );
    }
}

#[test]
fn healthcheck_probes_the_bound_address() {
    for bind in ["::1", "127.0.0.2"] {
        let server = Server::start(&[("BIND_ADDRESS", bind)]);
        assert_eq!(server.addr.ip().to_string(), bind);
        let port = server.addr.port().to_string();
        let (code, stderr) = healthcheck(&[("PORT", &port), ("BIND_ADDRESS", bind)]);
        assert_eq!(code, Some(0), "{bind}: {stderr}");
        // Nothing listens on that port at 127.0.0.1: the probe went to the bound address.
        let (elsewhere, _) = healthcheck(&[("PORT", &port), ("BIND_ADDRESS", "127.0.0.1")]);
        assert_eq!(elsewhere, Some(1), "{bind}");
    }
    // An unspecified IPv6 address is probed at ::1.
    let server = Server::start(&[("BIND_ADDRESS", "::")]);
    let port = server.addr.port().to_string();
    let (code, stderr) = healthcheck(&[("PORT", &port), ("BIND_ADDRESS", "::")]);
    assert_eq!(code, Some(0), "{stderr}");
}
