//! Operations: shell completions, JSON logs and the systemd units, as a packager or an
//! operator uses them (the real binary, the real `systemd-analyze`).

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
    let container = SystemdContainer::boot(&deb);
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

/// A booted systemd container on an overlay of `/` (changes go to a temporary upper
/// directory; the host is untouched). Dropped: killed, unmounted and removed.
struct SystemdContainer {
    dir: std::path::PathBuf,
    nspawn: std::process::Child,
    leader: u32,
}

const CONTAINER_DEADLINE: Duration = Duration::from_secs(90);

impl SystemdContainer {
    fn boot(deb: &Path) -> SystemdContainer {
        let dir =
            std::path::PathBuf::from(format!("/var/tmp/nexodus-ops-sd-{}", std::process::id()));
        let _ = Command::new("umount")
            .arg("-l")
            .arg(dir.join("root"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["up", "work", "root"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create overlay directories");
        }
        let options = format!(
            "lowerdir=/,upperdir={},workdir={}",
            dir.join("up").display(),
            dir.join("work").display()
        );
        let mounted = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(dir.join("root"))
            .status()
            .expect("mount");
        assert!(mounted.success(), "overlay mount of / failed");
        let log = std::fs::File::create(dir.join("console.log")).expect("console log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(dir.join("root"))
            .arg(format!("--machine=nxops{}", std::process::id()))
            .args(["--register=no", "--keep-unit", "--link-journal=no"])
            .arg("--private-network")
            .arg(format!("--bind-ro={}:/run/nexodus.deb", deb.display()))
            // Services of the host's own that need not start in the container.
            .args(["--boot", "systemd.mask=postgresql.service"])
            .arg("systemd.mask=prometheus.service")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn (scripts/test installs systemd-container)");
        let mut container = SystemdContainer {
            dir,
            nspawn,
            leader: 0,
        };
        let pid = container.nspawn.id();
        // nspawn forks a short-lived helper before the container's init; the init is
        // the child that is PID 1 in a PID namespace of its own.
        container.leader = container.wait_for("the container's PID 1", || {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|c| is_namespace_init(*c))
        });
        container.wait_for("systemd to finish booting", || {
            let state = container.run(&["systemctl", "is-system-running"]);
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        container
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.join("root")
    }

    /// Runs a command inside the container; its stdout (stderr is logged on failure).
    fn run(&self, args: &[&str]) -> String {
        self.run_status(args).1
    }

    fn expect(&self, args: &[&str]) -> String {
        let (ok, out) = self.run_status(args);
        assert!(
            ok,
            "in the container, {args:?} failed:\n{out}\n{}",
            self.console()
        );
        out
    }

    fn run_status(&self, args: &[&str]) -> (bool, String) {
        // Every command is bounded: a hung systemctl fails the test, never stalls it.
        let out = Command::new("timeout")
            .args(["60", "nsenter", "--target"])
            .arg(self.leader.to_string())
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--"])
            .args(args)
            .output()
            .expect("nsenter");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            text.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        (out.status.success(), text)
    }

    fn console(&self) -> String {
        let journal = if self.leader != 0 {
            self.run(&["journalctl", "--no-pager", "-n", "60", "-u", "nexodus-*"])
        } else {
            String::new()
        };
        let console = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        format!(
            "journal:\n{journal}\nconsole (last lines, newest first):\n{}",
            tail.join("\n")
        )
    }

    fn wait_for<T>(&self, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + CONTAINER_DEADLINE;
        let mut delay = Duration::from_millis(50);
        loop {
            if let Some(v) = probe() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.console()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }
}

/// Whether `pid` is PID 1 of a PID namespace below ours (`NSpid: <pid> 1`).
fn is_namespace_init(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|ids| {
            ids.split_whitespace().last() == Some("1") && ids.split_whitespace().count() > 1
        })
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        // SIGKILL to the container's PID 1 ends every process in it; then nspawn exits.
        if self.leader != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.leader.to_string()])
                .status();
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg("-l").arg(self.root()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
