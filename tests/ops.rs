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
