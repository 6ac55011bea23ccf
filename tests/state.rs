//! Who owns the state: admin commands never create coordinator state, a first start
//! racing an admin command makes one identity, one `serve` per state directory, one
//! `join` per node state directory, `--org` after the subcommand, and the README's
//! admin and `devices add` examples run as written. Coordinators on loopback
//! (127.44.0.N), nodes in namespaces (bridge "st").

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::{Cluster, wait_until};
use common::{BIN, Coordinator, admin_command, proc, register_request, wait_for};
use nexodus::client::ControlClient;
use nexodus::coord::token::JoinToken;
use nexodus::wire::control::{Device, Request, Response};

/// Every file under `dir` (recursively), for "nothing was created" checks.
fn files_under(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        out.push(e.path().display().to_string());
        out.extend(files_under(&e.path()));
    }
    out
}

#[tokio::test]
async fn admin_commands_never_create_state() {
    let logs = tempfile::tempdir().unwrap();
    // The newcomer's mistake: no --state-dir, so the default is used: under a fresh
    // XDG_STATE_HOME for a user; for root /var/lib/nexodus, on a tmpfs of a private
    // mount namespace (the host's /var/lib is never touched), listed afterwards.
    let home = tempfile::tempdir().unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let default = if root {
        std::path::PathBuf::from("/var/lib/nexodus")
    } else {
        home.path().join("state/nexodus")
    };
    for args in [
        &["devices"][..],
        &["token", "create"],
        &["org", "create", "lab"],
    ] {
        let mut cmd = if root {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(
                    "mount -t tmpfs tmpfs /var/lib && \"$0\" \"$@\"; rc=$?; \
                     echo \"LEFT:[$(ls -A /var/lib)]\" >&2; exit $rc",
                )
                .arg(BIN);
            c
        } else {
            Command::new(BIN)
        };
        let out = cmd
            .args(args)
            .env_remove("NEXODUS_STATE_DIR")
            .env_remove("NEXODUS_DB")
            .env("HOME", home.path())
            .env("XDG_STATE_HOME", home.path().join("state"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded: {err}");
        assert!(
            err.contains(&format!(
                "error: no coordinator database at {}: start `nexodus serve --state-dir {}` \
                 first, or pass the --state-dir (or NEXODUS_STATE_DIR) that `nexodus serve` uses",
                default.join("nexodus.db").display(),
                default.display()
            )),
            "{args:?}: {err}"
        );
        assert_eq!(files_under(home.path()), Vec::<String>::new(), "{args:?}");
        assert!(!root || err.contains("LEFT:[]"), "{args:?} created: {err}");
    }

    // `devices` before the first `serve` does not steal the first start: serve still
    // creates the state and prints its token.
    let mut coord = Coordinator::unstarted("127.44.0.1", logs.path());
    let err = coord.admin(&["devices"]).unwrap_err();
    assert!(err.contains("no coordinator database at"), "{err}");
    assert_eq!(files_under(coord.state_dir()), Vec::<String>::new());
    coord.spawn().await;
    let log = coord.log_text();
    assert!(log.contains("first start: created database"), "{log}");
    let token = log
        .lines()
        .find_map(|l| JoinToken::parse(l.trim()).ok())
        .unwrap_or_else(|| panic!("no token printed: {log}"));
    assert_eq!(token.fingerprint, coord.fingerprint());
    // And the admin commands now work on it.
    coord.admin(&["devices"]).unwrap();
}

#[tokio::test]
async fn first_start_racing_token_create_makes_one_identity() {
    let logs = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let mut coord = Coordinator::unstarted("127.44.0.2", logs.path());
        let dir = coord.state_dir().to_string_lossy().into_owned();
        let admin = move || admin_command(&["token", "create"], &["--state-dir", &dir]);
        // Either one may be first.
        let text = if round % 2 == 0 {
            let admin = std::thread::spawn(admin);
            coord.spawn_process();
            admin.join().unwrap()
        } else {
            coord.spawn_process();
            admin()
        };
        let text = text.unwrap_or_else(|e| panic!("round {round}: token create: {e}"));
        let token = JoinToken::parse(text.trim()).unwrap();
        assert_eq!(
            token.fingerprint,
            coord.fingerprint(),
            "round {round}: token pinned to another certificate"
        );
        // A node joins with it: the certificate served is the one pinned.
        let addr = coord.addr;
        let client = wait_for("coordinator to answer", Duration::from_secs(20), || {
            let fp = token.fingerprint;
            async move { ControlClient::connect(addr, fp).await.ok() }
        })
        .await;
        match client
            .call(&Request::Register(register_request(&token, "racer", round)))
            .await
        {
            Ok(Response::Registered { .. }) => {}
            other => panic!("round {round}: registration failed: {other:?}"),
        }
        client.close().await;
        let log = coord.log_text();
        assert_eq!(
            log.matches("created coordinator TLS identity").count(),
            1,
            "round {round}: {log}"
        );
        coord.kill();
    }
}

#[tokio::test]
async fn second_serve_on_one_state_is_refused() {
    let logs = tempfile::tempdir().unwrap();
    let mut coord = Coordinator::unstarted("127.44.0.3", logs.path());
    coord.spawn().await;
    let pid = coord.pid().unwrap();
    let dir = coord.state_dir().to_string_lossy().into_owned();
    let db = format!("{dir}/nexodus.db");
    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().to_string_lossy().into_owned();
    // The same state directory, and the same SQLite file from another state directory.
    for store in [
        vec!["--state-dir", dir.as_str()],
        vec!["--state-dir", other_dir.as_str(), "--db", db.as_str()],
    ] {
        let mut second = Command::new(BIN)
            .args(["serve", "--listen", "127.44.0.4:4443"])
            .args(["--stun-listen", "127.44.0.4:3478"])
            .args(&store)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let Some(status) = proc::exit_within(&mut second, Duration::from_secs(5)) else {
            proc::kill(second);
            panic!("{store:?}: the second serve did not stop");
        };
        let out = second.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "{store:?}: {err}");
        assert!(
            err.contains(&format!(
                "another `nexodus serve` (pid {pid}) is already running on {db}"
            )),
            "{store:?}: {err}"
        );
    }
    // The first one serves on.
    let client = coord.client().await;
    assert!(matches!(
        client.call(&Request::Ping).await,
        Ok(Response::Pong)
    ));
}

#[test]
fn second_join_on_one_node_state_dir_is_refused() {
    let mut c = Cluster::new("st", "203.0.113.1/24");
    let a = c.add_node("a", "203.0.113.2/24", true, &["--interface", "sta0"]);
    c.start(a);
    wait_until("node a to run", Duration::from_secs(20), || {
        c.nodes[a].status()
    });
    let pid = c.nodes[a].pid();
    let dir = c.nodes[a].dir.to_str().unwrap().to_string();
    let log = c.scratch("clone").join("clone.log");
    let coordinator = c.nodes[a].coordinator.clone();
    // The clone: same state directory, another interface, started as the first was.
    let mut clone = c.nodes[a].ns.spawn_nexodus(
        &[
            "join",
            &coordinator,
            "--hostname",
            "a",
            "--interface",
            "sta1",
            "--state-dir",
            &dir,
            "--token",
            &c.token,
        ],
        &log,
    );
    let status = proc::exit_within(&mut clone, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the clone still runs"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "node state directory {dir} is in use by another `nexodus join` (pid {pid}); \
             a cloned machine or container must join with a state directory of its own \
             (--state-dir) and its own --token"
        )),
        "{text}"
    );
    // The first node keeps working: its status socket answers, it stays registered once.
    assert!(c.nodes[a].alive());
    assert!(c.nodes[a].status().is_some(), "status socket gone");
    assert_eq!(c.coord.devices().len(), 1);
}

/// The lines of the README's `sh` block that contains `needle`.
fn readme_block(needle: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut blocks = readme.split("```sh\n").skip(1);
    let block = blocks
        .find_map(|b| {
            let body = b.split("```").next()?;
            body.contains(needle).then_some(body)
        })
        .unwrap_or_else(|| panic!("README has no sh block with {needle:?}"));
    block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Runs one README line with `sh` in `cwd`, `nexodus` on the PATH; returns stdout.
fn run_line(cwd: &Path, line: &str) -> String {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-c", line])
        .current_dir(cwd)
        .env("PATH", path)
        .env_remove("NEXODUS_STATE_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "README line failed: {line}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn readme_admin_and_devices_add_examples_run_as_written() {
    let mut c = Cluster::new("str", "203.0.113.1/24");
    // The quick start's state directory, where the README's commands run.
    let cwd = c.scratch("quickstart");
    std::os::unix::fs::symlink(&c.coord.dir, cwd.join("nexodus-state")).unwrap();
    let mut lab_token = None;
    for line in readme_block("nexodus org create lab") {
        let out = run_line(&cwd, &line);
        if line.contains("token create --org lab") {
            lab_token = Some(out.trim().to_string());
        }
    }
    let lab_token = lab_token.expect("the README makes a token for lab");
    JoinToken::parse(&lab_token).unwrap();

    // The relay the README asks for, in lab.
    let relay = c.add_relay("relay", "203.0.113.2/24", "strr0");
    c.nodes[relay].start(Some(&lab_token));
    let lab = |c: &Cluster| -> Vec<Device> {
        serde_json::from_str(&c.coord.admin(&["devices", "--org", "lab", "--json"])).unwrap()
    };
    // The relay role takes effect once approved (as the README says).
    let id = wait_until(
        "the relay to register in lab",
        Duration::from_secs(20),
        || lab(&c).iter().find(|d| d.hostname == "relay").map(|d| d.id),
    );
    c.coord.admin(&[
        "devices",
        "approve",
        &id.to_string(),
        "--relay",
        "--org",
        "lab",
    ]);
    wait_until(
        "the relay to be online in lab",
        Duration::from_secs(20),
        || lab(&c).iter().any(|d| d.relay && d.online).then_some(()),
    );

    let lines = readme_block("nexodus devices add");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("devices add --org lab"), "{lines:?}");
    run_line(&cwd, &lines[0]);
    let conf = std::fs::read_to_string(cwd.join("phone.conf")).unwrap();
    assert!(
        conf.contains("[Interface]") && conf.contains("PrivateKey") && conf.contains("[Peer]"),
        "{conf}"
    );
    let phone = lab(&c).into_iter().find(|d| d.hostname == "phone");
    assert!(phone.is_some_and(|d| d.unmanaged), "phone not in lab");
    assert!(
        c.coord.device("phone").is_none(),
        "phone in the default org"
    );

    // --org after `remove` means something too: the device must be in that org.
    let id = lab(&c)
        .into_iter()
        .find(|d| d.hostname == "phone")
        .unwrap()
        .id
        .to_string();
    let err = c
        .coord
        .admin_result(&["devices", "remove", &id, "--org", "default"])
        .unwrap_err();
    assert!(
        err.contains(&format!("device {id} is not in organization \"default\"")),
        "{err}"
    );
    c.coord.admin(&["devices", "remove", &id, "--org", "lab"]);
    assert!(lab(&c).iter().all(|d| d.hostname != "phone"));
    // And `token --org lab create` (before the subcommand) as `token create --org lab`.
    JoinToken::parse(c.coord.admin(&["token", "--org", "lab", "create"]).trim()).unwrap();
}

#[test]
fn admin_commands_on_an_uninitialised_postgres_database_refuse() {
    let logs = tempfile::tempdir().unwrap();
    let pg = nexodus::store::testpg::TempPostgres::start().unwrap();
    let url = pg.fresh_database("nx").unwrap();
    let err = admin_command(&["token", "create"], &["--database-url", &url]).unwrap_err();
    assert!(
        err.contains(
            "has no coordinator yet: start `nexodus serve --database-url ...` on it first"
        ),
        "{err}"
    );
    assert!(
        !pg.query("nx", "SELECT count(*) FROM cluster_identity")
            .unwrap_or_default()
            .iter()
            .any(|n| n.trim() != "0"),
        "an identity was created"
    );
    // Once a replica made it, the same command works.
    let _replica = Coordinator::replica("127.44.0.5", &url, logs.path());
    let text = admin_command(&["token", "create"], &["--database-url", &url]).unwrap();
    JoinToken::parse(text.trim()).unwrap();
}

/// The README line that starts with `prefix`.
fn readme_line(prefix: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("README has no line starting {prefix:?}"))
        .to_string()
}

/// Starts one README line with `sh` in namespace `ns`, in `cwd`, `nexodus` on the
/// PATH, with `env`; stdout and stderr go to `log`.
fn spawn_line(
    ns: &common::netns::Netns,
    cwd: &Path,
    line: &str,
    env: &[(&str, &Path)],
    out: &Path,
) -> std::process::Child {
    use common::DieWithParent;
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let file = std::fs::File::create(out).unwrap();
    let mut cmd = ns.cmd(&["sh", "-c", line]);
    cmd.current_dir(cwd)
        .env("PATH", path)
        .env_remove("NEXODUS_STATE_DIR")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .die_with_parent();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// The README followed as written, in order, on fresh namespaces: the quick start's
/// `serve`, the admin commands, then the Nodes section's `join` on two hosts (one with
/// `--token`, one with `--token-file`), its placeholders (`coordinator.example`,
/// `nx1.…`, `[--hostname web1]`) filled in. The two nodes reach each other, and the
/// `status` and `devices` tables have the README's headers. If the README drifts from
/// the binary, this fails.
#[test]
fn readme_quick_start_admin_and_join_run_in_order() {
    use common::netns::Lan;
    let tmp = tempfile::tempdir().unwrap();
    let mut lan = Lan::new("srd");
    let coord_ns = lan.host("c", "203.0.113.1/24", true);
    let a_ns = lan.host("a", "203.0.113.2/24", true);
    let b_ns = lan.host("b", "203.0.113.3/24", true);
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let (cwd, a_cwd, b_cwd) = (dir("quickstart"), dir("a"), dir("b"));
    let mut children = Vec::new();

    // 1. The quick start: build (done: this is the test binary) and serve.
    let quick = readme_block("serve --state-dir ./nexodus-state");
    assert_eq!(quick.len(), 2, "{quick:?}");
    assert!(quick[1].contains("./scripts/test"), "{quick:?}");
    let serve = quick[0]
        .strip_prefix("cargo build --release && ")
        .unwrap_or_else(|| panic!("quick start changed: {}", quick[0]))
        .replace("./target/release/nexodus", "nexodus");
    let serve_out = tmp.path().join("serve.log");
    children.push(spawn_line(&coord_ns, &cwd, &serve, &[], &serve_out));
    let first = wait_until(
        "serve to print its first-start token",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&serve_out).ok()?;
            text.contains("coordinator running").then_some(())?;
            text.lines()
                .find(|l| l.starts_with("nx1."))
                .map(str::to_string)
        },
    );
    JoinToken::parse(&first).unwrap();
    assert!(
        std::fs::read_to_string(&serve_out)
            .unwrap()
            .contains("listen=[::]:4443"),
        "serve does not listen dual stack by default"
    );

    // 2. The admin commands, as written, from where the quick start ran.
    let (mut single, mut reusable) = (None, None);
    for line in readme_block("nexodus org create lab") {
        let out = run_line(&cwd, &line);
        if line.starts_with("nexodus token create --state-dir") {
            single = Some(out.trim().to_string());
        } else if line.starts_with("nexodus token create --reusable") {
            reusable = Some(out.trim().to_string());
        }
    }
    let (single, reusable) = (single.unwrap(), reusable.unwrap());

    // 3. Nodes: `join` with --token on a, with --token-file on b.
    let nodes = readme_block("--token-file ./token");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let fill = |line: &str, token: &str| {
        line.replace("coordinator.example", "203.0.113.1")
            .replace("nx1.…", token)
            .replace("[--hostname web1]", "--hostname web1")
    };
    assert!(nodes[0].starts_with("nexodus join coordinator.example:4443 --token nx1.…"));
    let (a_state, b_state) = (a_cwd.join("state"), b_cwd.join("state"));
    children.push(spawn_line(
        &a_ns,
        &a_cwd,
        &fill(&nodes[0], &single),
        &[("NEXODUS_STATE_DIR", &a_state)],
        &tmp.path().join("a.log"),
    ));
    run_line(&b_cwd, &fill(&nodes[1], &reusable));
    children.push(spawn_line(
        &b_ns,
        &b_cwd,
        &fill(&nodes[2], &reusable),
        &[("NEXODUS_STATE_DIR", &b_state)],
        &tmp.path().join("b.log"),
    ));
    let state = cwd.join("nexodus-state");
    let flags = ["--state-dir", state.to_str().unwrap()];
    let devices = wait_until("both nodes online", Duration::from_secs(30), || {
        let json = admin_command(&["devices", "--json"], &flags).ok()?;
        let list: Vec<Device> = serde_json::from_str(&json).ok()?;
        (list.len() == 2 && list.iter().all(|d| d.online)).then_some(list)
    });
    let web1 = devices.iter().find(|d| d.hostname == "web1").unwrap();
    let other = devices.iter().find(|d| d.hostname != "web1").unwrap();
    assert!(
        a_ns.ping_until(&other.tunnel_ip.to_string(), Duration::from_secs(20)),
        "web1 cannot reach the --token-file node"
    );
    assert!(b_ns.ping_until(&web1.tunnel_ip.to_string(), Duration::from_secs(20)));

    // The tables read as the README shows them.
    let status = a_ns
        .cmd(&[BIN, "status"])
        .env("NEXODUS_STATE_DIR", &a_state)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.starts_with("device web1 ("), "{status}");
    assert!(
        status.lines().any(|l| l == readme_line("PEER ")),
        "status header differs from the README's:\n{status}"
    );
    let table = admin_command(&["devices"], &flags).unwrap();
    assert_eq!(
        table.lines().next().unwrap(),
        readme_line("ID    HOSTNAME"),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains(" online ")).count(),
        2,
        "{table}"
    );
    for c in children {
        proc::kill(c);
    }
}
