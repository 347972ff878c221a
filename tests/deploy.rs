//! The deployment files in `deploy/` and `.github/` against the real binary: the YAML parses,
//! every environment variable they set is one the server reads, every metric the dashboard and
//! the alert rules use is on `/metrics`, the nginx recipe streams through two instances sharing
//! one Redis, and the tools that check the rest (promtool, systemd-analyze) accept the files
//! where they are installed (a test without its tool says so and passes).

mod common;
use common::*;
use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` (recursively) whose name ends in one of `exts`.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if exts
                .iter()
                .any(|x| path.to_string_lossy().ends_with(&format!(".{x}")))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[track_caller]
fn parse(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Names of environment variables a YAML document sets: the keys of `environment` (Compose,
/// map or `NAME=value` list), `extraEnv` and `extraEnvFromSecret` (Flagsmith's Helm chart), and
/// the `name` of each entry of `env` (Kubernetes containers).
fn yaml_env_names(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                match (k.as_str(), child) {
                    (
                        Some("environment" | "extraEnv" | "extraEnvFromSecret"),
                        Value::Mapping(e),
                    ) => {
                        out.extend(e.keys().filter_map(|k| k.as_str()).map(str::to_owned));
                    }
                    (Some("environment"), Value::Sequence(e)) => out.extend(
                        e.iter()
                            .filter_map(|x| x.as_str())
                            .map(|x| x.split('=').next().unwrap_or(x).to_owned()),
                    ),
                    (Some("env"), Value::Sequence(e)) => out.extend(
                        e.iter()
                            .filter_map(|x| x.get("name"))
                            .filter_map(|n| n.as_str())
                            .map(str::to_owned),
                    ),
                    _ => yaml_env_names(child, out),
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|x| yaml_env_names(x, out)),
        _ => {}
    }
}

/// Names set by a systemd unit (`Environment=`) or an environment file (`NAME=value`).
fn systemd_env_names(text: &str, unit: bool) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let assignment = if unit {
            match line.strip_prefix("Environment=") {
                Some(rest) => rest.trim_matches('"'),
                None => continue,
            }
        } else {
            line
        };
        if let Some((name, _)) = assignment.split_once('=') {
            out.push(name.trim().to_owned());
        }
    }
    out
}

#[test]
fn yaml_files_parse() {
    let mut parsed = 0;
    for dir in ["deploy", ".github"] {
        for path in files(&root().join(dir), &["yml", "yaml"]) {
            let v = parse(&path);
            assert!(v.is_mapping(), "{}: not a mapping", path.display());
            parsed += 1;
        }
    }
    // Compose, six Kubernetes files, Helm values, alert rules and two workflows.
    assert!(parsed >= 11, "only {parsed} YAML files");
    // The dashboard is JSON, which YAML reads as well.
    let dash = parse(&root().join("deploy/grafana/flagsmith-sse.json"));
    let panels = dash["panels"].as_sequence().expect("panels");
    assert!(panels.len() >= 15, "{} panels", panels.len());
    for p in panels {
        let targets = p["targets"].as_sequence().expect("targets");
        assert!(!targets.is_empty(), "{p:?}");
        assert!(
            targets.iter().all(|t| t["expr"].as_str().is_some()),
            "{p:?}"
        );
    }
    // The compose file's nginx mounts a file that exists; both instances build this Dockerfile.
    let compose = parse(&root().join("deploy/docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    for name in ["redis", "sse-1", "sse-2", "nginx"] {
        assert!(services.contains_key(name), "no service {name}");
    }
    for name in ["sse-1", "sse-2"] {
        let build = &compose["services"][name]["build"];
        let context = root()
            .join("deploy")
            .join(build["context"].as_str().expect("context"));
        assert!(
            context
                .join(build["dockerfile"].as_str().expect("dockerfile"))
                .is_file()
        );
    }
    let volume = compose["services"]["nginx"]["volumes"][0]
        .as_str()
        .expect("nginx volume");
    let source = volume.split(':').next().unwrap_or_default();
    assert!(root().join("deploy").join(source).is_file(), "{volume}");
}

#[test]
fn every_environment_variable_in_deploy_is_one_the_server_reads() {
    let known: BTreeSet<&str> = flagsmith_sse::config::VARIABLES
        .iter()
        .map(|(name, _, _)| *name)
        .collect();
    let mut checked = 0;
    let mut seen = BTreeSet::new();
    let mut check = |path: &Path, names: Vec<String>| {
        assert!(!names.is_empty(), "{}: names no variable", path.display());
        for name in names {
            assert!(
                known.contains(name.as_str()),
                "{} sets {name}, which the server does not read (known: {known:?})",
                path.display()
            );
            seen.insert(name);
            checked += 1;
        }
    };
    for rel in [
        "deploy/docker-compose.yml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/helm/values-flagsmith-sse.yaml",
    ] {
        let path = root().join(rel);
        let mut names = Vec::new();
        yaml_env_names(&parse(&path), &mut names);
        check(&path, names);
    }
    let env_file = root().join("deploy/systemd/flagsmith-sse.env");
    check(
        &env_file,
        systemd_env_names(
            &std::fs::read_to_string(&env_file).expect("env file"),
            false,
        ),
    );
    let unit = root().join("deploy/systemd/flagsmith-sse.service");
    let unit_text = std::fs::read_to_string(&unit).expect("unit");
    for name in systemd_env_names(&unit_text, true) {
        assert!(
            known.contains(name.as_str()),
            "{} sets {name}",
            unit.display()
        );
    }
    assert!(checked >= 20, "only {checked} variables found");
    assert!(seen.contains("SSE_AUTHENTICATION_TOKEN") && seen.contains("REDIS_HOST"));
}

/// Every `flagsmith_sse_*` and `process_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["flagsmith_sse_", "process_"] {
        let mut rest = text;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().next_back();
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.insert(tail[..end].to_owned());
            }
            rest = &tail[end..];
        }
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_is_served() {
    // With Redis, so that the per-command series have samples.
    let redis = Redis::start();
    let url = redis.url();
    let server = Server::start(&[("REDIS_URL", url.as_str())]);
    wait_ready(&server);
    let served: BTreeSet<String> = server
        .metrics()
        .keys()
        .map(|series| series.split('{').next().unwrap_or(series).to_owned())
        .collect();
    for rel in [
        "deploy/grafana/flagsmith-sse.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(root().join(rel)).expect(rel);
        let used = metric_names(&text);
        assert!(used.len() >= 7, "{rel}: only {used:?}");
        let missing: Vec<&String> = used.difference(&served).collect();
        assert!(
            missing.is_empty(),
            "{rel} uses {missing:?}, which /metrics does not serve (it serves {served:?})"
        );
    }
}

/// Runs `tool` with `args` if it is installed: `None` (after saying why) when it is not.
fn run_tool(tool: &str, args: &[&str]) -> Option<std::process::Output> {
    match Command::new(tool).args(args).output() {
        Ok(out) => Some(out),
        Err(e) => {
            println!("skipped: {tool} is not available here ({e})");
            None
        }
    }
}

#[test]
fn promtool_accepts_the_alert_rules_and_they_fire_as_meant() {
    let dir = root().join("deploy/prometheus");
    let rules = dir.join("alerts.yml");
    let Some(out) = run_tool("promtool", &["check", "rules", &rules.to_string_lossy()]) else {
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 7 rules found"), "{text}");
    // alerts_test.yml: which alerts fire, when, with which labels and text, on given series.
    let tests = dir.join("alerts_test.yml");
    let out = run_tool("promtool", &["test", "rules", &tests.to_string_lossy()]).expect("promtool");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    // The unit as installed, but running the binary under test with the example environment.
    let unit =
        std::fs::read_to_string(root().join("deploy/systemd/flagsmith-sse.service")).expect("unit");
    let env_file = root().join("deploy/systemd/flagsmith-sse.env");
    let text: String = unit
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                format!("ExecStart={}", env!("CARGO_BIN_EXE_flagsmith-sse"))
            } else if l.starts_with("EnvironmentFile=") {
                format!("EnvironmentFile={}", env_file.display())
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();
    let dir = std::env::temp_dir().join(format!("fsse-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("flagsmith-sse.service");
    std::fs::write(&path, text).expect("write unit");
    let out = run_tool("systemd-analyze", &["verify", &path.to_string_lossy()]);
    let _ = std::fs::remove_dir_all(&dir);
    let Some(out) = out else { return };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Warnings about the unit itself (unknown settings, bad values) name its file.
    assert!(!stderr.contains("flagsmith-sse.service"), "{stderr}");
}

#[test]
fn the_binary_accepts_the_helm_charts_serve_argument() {
    let server = Server::start_with(&[], |cmd| {
        cmd.arg("serve");
    });
    assert_eq!(readiness(server.addr), 200);
}

/// nginx in the foreground, one process, killed on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_nginx_recipe_streams_updates_through_two_instances() {
    if Command::new("nginx").arg("-v").output().is_err() {
        println!("skipped: nginx is not installed here");
        return;
    }
    let redis = Redis::start();
    let url = redis.url();
    let env = [("REDIS_URL", url.as_str()), ("MAX_STREAM_AGE", "-1")];
    let (a, b) = (Server::start(&env), Server::start(&env));
    wait_ready(&a);
    wait_ready(&b);

    // deploy/nginx/flagsmith-sse.conf with the compose names replaced by the test's addresses.
    let port = free_port();
    let site = std::fs::read_to_string(root().join("deploy/nginx/flagsmith-sse.conf"))
        .expect("nginx recipe");
    let site = site
        .replace("sse-1:8000", &a.addr.to_string())
        .replace("sse-2:8000", &b.addr.to_string())
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    assert!(site.contains(&a.addr.to_string()) && site.contains(&b.addr.to_string()));
    let dir = std::env::temp_dir().join(format!("fsse-nginx-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("site.conf"), site).expect("site");
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\npid {0}/nginx.pid;\nerror_log {0}/error.log;\n\
             events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {0}/body;\n  \
             proxy_temp_path {0}/proxy;\n  fastcgi_temp_path {0}/fastcgi;\n  \
             uwsgi_temp_path {0}/uwsgi;\n  scgi_temp_path {0}/scgi;\n  include {0}/site.conf;\n}}\n",
            dir.display()
        ),
    )
    .expect("nginx.conf");
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let _nginx = Nginx {
        child,
        dir: dir.clone(),
    };
    let front: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let up = wait_until(Duration::from_secs(10), || {
        get_status(front, "/health") == 200
    });
    assert!(
        up,
        "nginx did not come up: {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );

    // least_conn: the second stream goes to the instance the first did not.
    let mut s1 = Subscriber::connect(front, "env-1");
    assert!(wait_until(Duration::from_secs(10), || {
        a.metrics()["flagsmith_sse_subscribers_active"]
            + b.metrics()["flagsmith_sse_subscribers_active"]
            == 1.0
    }));
    let mut s2 = Subscriber::connect(front, "env-1");
    assert!(
        wait_until(Duration::from_secs(10), || {
            a.metrics()["flagsmith_sse_subscribers_active"] == 1.0
                && b.metrics()["flagsmith_sse_subscribers_active"] == 1.0
        }),
        "the streams did not spread over both instances"
    );
    // A change posted through nginx reaches both, unbuffered.
    let micros = 1_736_705_202_028_061;
    let r = post_micros(front, "env-1", micros);
    assert_eq!(r.status, 200, "{}", r.text());
    for s in [&mut s1, &mut s2] {
        assert_next_update(s, micros, Duration::from_secs(10));
    }
    // The operator's endpoints are not routed to the public side.
    assert_eq!(get_status(front, "/metrics"), 404);
    assert_eq!(get_status(front, "/admin/environments"), 404);
}

/// The status of a GET for `path`.
fn get_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    use std::io::Write;
    if s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return 0;
    }
    read_response(&mut s).status
}
