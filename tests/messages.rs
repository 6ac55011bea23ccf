//! What the user reads: every message names what is wrong and how to fix it, says each
//! cause once, and hides secrets. The real binary, as a newcomer runs it; coordinators
//! on loopback (127.45.0.N), nodes rootless (`--userspace`) on loopback.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::proc::{Proc, assert_fails_within};
use common::{BIN, Coordinator, wait_until};
use nexodus::wire::control::Device;

fn nexodus(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env("RUST_LOG", "info");
    c
}

/// Runs a command that must fail within 30 s; returns its stderr.
fn fails(args: &[&str]) -> String {
    assert_fails_within(nexodus(args), Duration::from_secs(30), &args.join(" "))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// `--help` with the secrets in the environment prints their names, never their values.
#[test]
fn help_hides_secret_values() {
    for args in [
        &["join", "--help"][..],
        &["serve", "--help"],
        &["devices", "--help"],
        &["token", "create", "--help"],
        &["loadgen", "--help"],
    ] {
        let out = nexodus(args)
            .env("NEXODUS_TOKEN", "nx1.SECRETTOKENVALUE")
            .env("NEXODUS_DATABASE_URL", "postgres://app:hunter2@db/nexodus")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("SECRETTOKENVALUE"), "{args:?}: {text}");
        assert!(!text.contains("hunter2"), "{args:?}: {text}");
    }
    let join = nexodus(&["join", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&join.stdout);
    assert!(text.contains("[env: NEXODUS_TOKEN]"), "{text}");
    assert!(text.contains("--token-file <PATH>"), "{text}");
}

/// Mistakes caught before any network: each says what is wrong, its cause once.
#[test]
fn input_mistakes_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("node");
    let state = state.to_str().unwrap();
    // A name that does not resolve is not a syntax error.
    let err = fails(&[
        "join",
        "nosuch.invalid",
        "--token",
        "x",
        "--state-dir",
        state,
    ]);
    assert!(
        err.starts_with(
            "error: node failed: cannot resolve the coordinator name \"nosuch.invalid\": "
        ),
        "{err}"
    );
    let err = fails(&[
        "join",
        "127.45.0.1:http",
        "--token",
        "x",
        "--state-dir",
        state,
    ]);
    assert_eq!(
        err,
        "error: node failed: bad coordinator address \"127.45.0.1:http\": expected HOST:PORT or HOST\n"
    );
    // The cause once, not "...nx1.: join token must start with nx1.".
    let err = fails(&[
        "join",
        "127.45.0.1",
        "--token",
        "bogus",
        "--state-dir",
        state,
    ]);
    assert_eq!(
        err,
        "error: node failed: bad join token: join token must start with nx1.\n"
    );
    let err = fails(&[
        "join",
        "127.45.0.1",
        "--token",
        "x",
        "--advertise-cidr",
        "10.1.0.0",
    ]);
    assert!(
        err.starts_with(
            "error: invalid value '10.1.0.0' for '--advertise-cidr <ADVERTISE_CIDR>': \
             missing prefix length (e.g. 10.1.0.0/24)\n"
        ),
        "{err}"
    );
    let err = fails(&["org", "create", "lab", "--cidr-v6", "fd00:1::"]);
    assert!(
        err.contains("missing prefix length (e.g. fd00:1::/64)"),
        "{err}"
    );
    let err = fails(&["token", "create", "--expires", "0s", "--state-dir", state]);
    assert!(
        err.starts_with(
            "error: invalid value '0s' for '--expires <EXPIRES>': a token that expires at once \
             could never be used; give a lifetime such as 30m, 24h or 7d, or leave --expires \
             out for one that never expires\n"
        ),
        "{err}"
    );
    // A token file others can read is refused, naming the fix.
    let file = dir.path().join("token");
    std::fs::write(&file, "nx1.whatever\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = file.to_str().unwrap();
    let err = fails(&[
        "join",
        "127.45.0.1",
        "--token-file",
        f,
        "--state-dir",
        state,
    ]);
    assert_eq!(
        err,
        format!(
            "error: token file {f} can be read by group or others (mode 0644); \
             restrict it: chmod 600 {f}\n"
        )
    );
    let err = fails(&[
        "loadgen",
        "--coordinator",
        "127.45.0.1:4443",
        "--token-file",
        f,
    ]);
    assert!(
        err.starts_with(&format!("error: token file {f} can be read")),
        "{err}"
    );
    assert!(!Path::new(state).exists(), "nothing created");
}

/// A coordinator state directory others may write to, or a link in place of its key,
/// is refused with the path and the fix; nothing is changed.
#[test]
fn coordinator_state_is_checked_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("shared");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let s = state.to_str().unwrap();
    let serve = |s: &str| {
        fails(&[
            "serve",
            "--listen",
            "127.45.0.4:4443",
            "--stun-listen",
            "127.45.0.4:3478",
            "--state-dir",
            s,
        ])
    };
    let err = serve(s);
    assert!(
        err.contains(&format!(
            "state directory {s} is writable by group or others (mode 0777); \
             restrict it: chmod go-w {s}\n"
        )),
        "{err}"
    );
    assert_eq!(mode(&state), 0o777, "nothing tightened silently");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);

    // A private directory whose key file is a link to a file elsewhere.
    let state = dir.path().join("linked");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::write(&elsewhere, b"not a key").unwrap();
    std::fs::write(state.join("coordinator-cert.der"), b"cert").unwrap();
    let key = state.join("coordinator-key.der");
    std::os::unix::fs::symlink(&elsewhere, &key).unwrap();
    let err = serve(state.to_str().unwrap());
    assert!(
        err.contains(&format!(
            "{} is a symbolic link; state files are never read through links \
             (replace it with the file itself)\n",
            key.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"not a key");
    assert!(std::fs::symlink_metadata(&key).unwrap().is_symlink());
}

fn device(coord: &Coordinator, hostname: &str) -> Option<Device> {
    let json = coord.admin(&["devices", "--json"]).ok()?;
    let devices: Vec<Device> = serde_json::from_str(&json).ok()?;
    devices.into_iter().find(|d| d.hostname == hostname)
}

/// A rootless node joined with `--token-file`: a coordinator stopping is noticed at
/// once (closed with a reason), the removal is told once, and a coordinator that does
/// not answer is named in the timeout.
#[tokio::test(flavor = "multi_thread")]
async fn node_messages_with_a_coordinator() {
    let logs = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::unstarted("127.45.0.2", logs.path());
    // SAFETY: umask has no preconditions; the usual one, giving 0644 files.
    unsafe { libc::umask(0o022) };
    coord.spawn().await;
    let db = coord.state_dir().join("nexodus.db");
    assert_eq!(mode(&db), 0o600, "the database is private");
    let token = coord
        .admin(&["token", "create", "--reusable"])
        .unwrap()
        .trim()
        .to_string();
    let file = logs.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let join = |coordinator: &str, name: &str, port: &str| {
        let mut c = nexodus(&["join", coordinator, "--userspace", "--hostname", name]);
        c.args(["--listen-port", port, "--token-file"])
            .arg(&file)
            .arg("--state-dir")
            .arg(logs.path().join(name));
        Proc::spawn(c, logs.path().join(format!("{name}.log")))
    };
    // A node state directory others may write to: refused, named, left as it is.
    let shared = logs.path().join("shared-node");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sd = shared.to_str().unwrap();
    let err = fails(&[
        "join",
        "127.45.0.2:4443",
        "--token",
        &token,
        "--state-dir",
        sd,
    ]);
    assert_eq!(
        err,
        format!(
            "error: node failed: cannot read or write node state {sd}: state directory {sd} \
             is writable by group or others (mode 0777); restrict it: chmod go-w {sd}\n"
        )
    );
    assert_eq!(mode(&shared), 0o777);
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    // Nothing listens at .3: the timeout names the address.
    let silent = join("127.45.0.3:4443", "msg-silent", "45103");
    let node = join("127.45.0.2:4443", "msg-node", "45102");
    let d = wait_until("node registered", Duration::from_secs(20), || {
        device(&coord, "msg-node")
    });

    // serve stops: the node hears the reason at once, not after its idle timeout.
    let stopped = std::time::Instant::now();
    let status = coord.terminate(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "serve exit: {status:?}"
    );
    wait_until(
        "node to notice the shutdown",
        Duration::from_secs(3),
        || {
            node.output()
                .contains("closed by peer: coordinator shutting down")
                .then_some(())
        },
    );
    assert!(stopped.elapsed() < Duration::from_secs(5));
    coord.spawn().await;
    wait_until("node to reconnect", Duration::from_secs(20), || {
        node.output()
            .contains("reconnected to the coordinator")
            .then_some(())
    });

    // Removed: told once, without "device stays registered".
    coord
        .admin(&["devices", "remove", &d.id.to_string()])
        .unwrap();
    let (ok, out) = node.finish(Duration::from_secs(10));
    assert!(!ok, "{out}");
    assert!(
        out.ends_with(
            "error: node failed: this device was removed from its organization by an administrator\n"
        ),
        "{out}"
    );
    assert!(out.contains("interface removed"), "{out}");
    assert!(!out.contains("device stays registered"), "{out}");

    wait_until(
        "the timeout to name the address",
        Duration::from_secs(40),
        || {
            silent
                .output()
                .contains("cannot connect to the coordinator at 127.45.0.3:4443: timed out")
                .then_some(())
        },
    );
}
