//! Operations: shell completions, JSON logs and the systemd units, as a packager or an
//! operator uses them (the real binary, the real `systemd-analyze`).

mod common;

use common::systemd::SystemdContainer;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nexodus");

fn completions(shell: &str) -> String {
    let out = Command::new(BIN)
        .args(["completions", shell])
        .output()
        .expect("run nexodus completions");
    assert!(out.status.success(), "completions {shell}: {out:?}");
    String::from_utf8(out.stdout).expect("completion script is UTF-8")
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let bash = completions("bash");
    assert!(
        bash.contains("complete -F _nexodus"),
        "bash script: {bash:.200}"
    );
    let zsh = completions("zsh");
    assert!(
        zsh.starts_with("#compdef nexodus"),
        "zsh script: {zsh:.200}"
    );
    let fish = completions("fish");
    assert!(
        fish.contains("complete -c nexodus"),
        "fish script: {fish:.200}"
    );
    for script in [&bash, &zsh, &fish] {
        for sub in ["serve", "join", "status", "token", "devices"] {
            assert!(script.contains(sub), "a completion script lacks {sub}");
        }
    }
    let bad = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .expect("run nexodus completions tcsh");
    assert!(!bad.status.success());
}

/// `--log-format json`: every line on stderr is one JSON object with level and message.
#[test]
fn json_log_lines_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(["--stun-listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nexodus serve");
    let stderr = child.stderr.take().expect("stderr");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = BufReader::new(stderr).lines();
    let mut parsed = 0;
    while parsed < 2 && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "no level: {line}");
        assert!(v["message"].is_string(), "no message: {line}");
        parsed += 1;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(parsed, 2, "expected two JSON log lines from serve");
}

/// Both units pass `systemd-analyze verify`, with ExecStart pointed at the binary under
/// test (the package installs it as /usr/bin/nexodus).
#[test]
fn systemd_units_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["nexodus-serve.service", "nexodus-join.service"] {
        let text = std::fs::read_to_string(units.join(name)).expect("read unit");
        assert!(text.contains("ExecStart=/usr/bin/nexodus "), "{name}");
        assert!(text.contains("NoNewPrivileges=yes"), "{name}");
        assert!(text.contains("ProtectSystem=strict"), "{name}");
        assert!(
            text.contains("EnvironmentFile=-/etc/default/nexodus"),
            "{name}"
        );
        std::fs::write(dir.path().join(name), text.replace("/usr/bin/nexodus", BIN))
            .expect("write unit");
    }
    let serve = std::fs::read_to_string(units.join("nexodus-serve.service")).expect("read");
    assert!(
        serve.contains("CapabilityBoundingSet=\n"),
        "serve keeps no capabilities"
    );
    let join = std::fs::read_to_string(units.join("nexodus-join.service")).expect("read");
    assert!(
        join.contains("CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE\n")
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("nexodus-serve.service"))
        .arg(dir.path().join("nexodus-join.service"))
        .output()
        .expect("systemd-analyze (scripts/test installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Debian package under a real systemd as PID 1: a throwaway container
/// (`systemd-nspawn`, booted from a copy-on-write overlay of this host's root, with
/// a private network) installs the package with apt, then `systemctl enable --now`
/// starts the coordinator, whose `/metrics` passes `promtool`, and a node, which
/// joins it and comes up on `nx0`; stopping the node removes its interface. Uses the
/// package `scripts/test` builds (`NEXODUS_DEB`, else the newest in target/debian).
#[test]
fn packaged_units_run_under_systemd() {
    let deb = package_path();
    let container = SystemdContainer::boot(&[(deb.as_path(), "/run/nexodus.deb")]);
    let root = container.root();

    container.expect(&["apt-get", "install", "-y", "-q", "/run/nexodus.deb"]);
    std::fs::write(
        root.join("etc/default/nexodus-serve"),
        "NEXODUS_METRICS_LISTEN=127.0.0.1:9464\n",
    )
    .expect("write /etc/default/nexodus-serve");
    container.expect(&["systemctl", "enable", "--now", "nexodus-serve"]);
    let metrics = container.wait_for("coordinator metrics", || {
        let body = container.run(&["curl", "-sf", "http://127.0.0.1:9464/metrics"]);
        body.contains("nexodus_devices{").then_some(body)
    });
    promtool_check(&metrics);

    let token = container.expect(&["nexodus", "token", "create"]);
    let token = token.lines().last().unwrap_or_default().trim().to_owned();
    assert!(token.starts_with("nx1."), "token create printed {token:?}");
    std::fs::write(
        root.join("etc/default/nexodus-join"),
        format!(
            "NEXODUS_COORDINATOR=127.0.0.1:4443\nNEXODUS_TOKEN={token}\n\
             NEXODUS_METRICS_LISTEN=127.0.0.1:9465\n"
        ),
    )
    .expect("write /etc/default/nexodus-join");
    container.expect(&["systemctl", "enable", "--now", "nexodus-join"]);
    container.wait_for("nx0 with a tunnel address", || {
        let addrs = container.run(&["ip", "-brief", "address", "show", "dev", "nx0"]);
        (addrs.contains("100.64.") && addrs.contains("200::")).then_some(())
    });
    container.wait_for("the node counted online", || {
        let body = container.run(&["curl", "-sf", "http://127.0.0.1:9464/metrics"]);
        body.lines()
            .any(|l| l.starts_with("nexodus_devices_online{") && l.ends_with(" 1"))
            .then_some(())
    });
    let node_metrics = container.expect(&["curl", "-sf", "http://127.0.0.1:9465/metrics"]);
    promtool_check(&node_metrics);
    for unit in ["nexodus-serve", "nexodus-join"] {
        let state = container.run(&["systemctl", "is-enabled", unit]);
        assert_eq!(state.trim(), "enabled", "{unit}");
    }

    container.expect(&["systemctl", "stop", "nexodus-join"]);
    let links = container.expect(&["ip", "-brief", "link"]);
    assert!(!links.contains("nx0"), "nx0 left after stop: {links}");
    let state = container.run(&["systemctl", "is-active", "nexodus-serve"]);
    assert_eq!(state.trim(), "active", "the coordinator kept running");
}

fn package_path() -> std::path::PathBuf {
    if let Some(deb) = std::env::var_os("NEXODUS_DEB") {
        return deb.into();
    }
    let pattern = concat!(env!("CARGO_MANIFEST_DIR"), "/target/debian/nexodus_*.deb");
    let newest = glob::glob(pattern)
        .expect("glob pattern")
        .filter_map(Result::ok)
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    newest.expect(
        "no Debian package: run scripts/test (it builds one with `cargo deb`) or set NEXODUS_DEB",
    )
}

fn promtool_check(body: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test installs prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
