//! End-to-end: a coordinator and nodes in network namespaces on one underlay bridge,
//! running the real binary. Needs root (namespaces, TUN).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::BIN;
use common::netns::{Lan, Netns, state_dir};
use nexodus::join::status::Status;

const PING_WAIT: Duration = Duration::from_secs(30);

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints every log file of the test if it fails.
struct Logs(Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.0 {
                eprintln!("===== {} =====", p.display());
                eprintln!("{}", std::fs::read_to_string(p).unwrap_or_default());
            }
        }
    }
}

struct Coord {
    ns: Netns,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Coord {
    fn start(&mut self) {
        let n = std::fs::read_to_string(&self.log)
            .map(|s| s.matches("coordinator running").count())
            .unwrap_or(0);
        let log = self.log.with_extension(format!("{n}.log"));
        self.child = Some(self.ns.spawn_nexodus(
            &[
                "serve",
                "--listen",
                "192.0.2.1:4443",
                "--stun-listen",
                "192.0.2.1:3478",
                "--state-dir",
                self.dir.to_str().unwrap(),
            ],
            &log,
        ));
        wait_until("coordinator to start", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("coordinator running"))
                .map(|_| ())
        });
        let _ = std::fs::copy(&log, &self.log);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .arg("--state-dir")
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

struct Node {
    ns: Netns,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self, token: Option<&str>) {
        let mut args = vec![
            "join",
            "192.0.2.1:4443",
            "--state-dir",
            self.dir.to_str().unwrap(),
        ];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        let n = std::fs::read_dir(self.log.parent().unwrap())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = self.log.with_extension(format!("{n}.log"));
        self.child = Some(self.ns.spawn_nexodus(&args, &log));
        self.log = log;
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn status(&self) -> Option<Status> {
        let out = Command::new(BIN)
            .args(["status", "--json", "--state-dir"])
            .arg(&self.dir)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Waits until the node is up with `peers` peers installed.
    fn wait_peers(&self, peers: usize) -> Status {
        wait_until(
            &format!("{} to have {peers} peers", self.ns.name),
            Duration::from_secs(30),
            || self.status().filter(|s| s.peers.len() == peers),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Fields drop in order: logs are printed first, then processes stop, then the
/// namespaces and files go.
struct Mesh {
    logs: Logs,
    nodes: Vec<Node>,
    coord: Coord,
    lan: Lan,
    token: String,
    _tmp: tempfile::TempDir,
}

impl Mesh {
    /// Coordinator at 192.0.2.1 and nodes at 192.0.2.11, .12, ... (`v6[i]` = node i has
    /// IPv6). Nodes are created but not started.
    fn new(tag: &str, v6: &[bool]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut lan = Lan::new(tag);
        let cns = lan.host("c", "192.0.2.1/24", true);
        let mut logs = Logs(Vec::new());
        let mut coord = Coord {
            ns: cns,
            dir: state_dir(tmp.path(), "coord"),
            log: tmp.path().join("coord.log"),
            child: None,
        };
        logs.0.push(coord.log.clone());
        coord.start();
        let token = coord
            .admin(&["token", "create", "--reusable"])
            .trim()
            .to_string();
        let mut nodes = Vec::new();
        for (i, &has_v6) in v6.iter().enumerate() {
            let name = format!("n{i}");
            let ns = lan.host(&name, &format!("192.0.2.{}/24", 11 + i), has_v6);
            let logdir = state_dir(tmp.path(), &format!("{name}-logs"));
            let node = Node {
                ns,
                dir: state_dir(tmp.path(), &name),
                log: logdir.join("join"),
                child: None,
            };
            nodes.push(node);
        }
        Self {
            lan,
            coord,
            nodes,
            token,
            _tmp: tmp,
            logs,
        }
    }

    fn start_all(&mut self) {
        for n in &mut self.nodes {
            n.start(Some(&self.token.clone()));
        }
        self.refresh_logs();
    }

    fn refresh_logs(&mut self) {
        for n in &self.nodes {
            if !self.logs.0.contains(&n.log) {
                self.logs.0.push(n.log.clone());
            }
        }
    }
}

fn has_line(text: &str, needle: &str) -> bool {
    text.lines().any(|l| l.contains(needle))
}

fn link_exists(ns: &Netns, dev: &str) -> bool {
    ns.try_run(&["ip", "link", "show", dev])
}

#[test]
fn dual_stack_mesh_with_a_v4_only_node() {
    let mut mesh = Mesh::new("ds", &[true, true, true, false]);
    mesh.start_all();
    let statuses: Vec<Status> = mesh.nodes.iter().map(|n| n.wait_peers(3)).collect();
    let v4_only = &statuses[3];
    assert!(!v4_only.device.ipv6_supported);
    assert_eq!(v4_only.device.tunnel_ip_v6, None);

    // Every pair pings over v4; every dual-stack pair over v6.
    for (i, from) in mesh.nodes.iter().enumerate() {
        for (j, to) in statuses.iter().enumerate() {
            if i == j {
                continue;
            }
            let v4 = to.device.tunnel_ip.to_string();
            assert!(
                from.ns.ping_until(&v4, PING_WAIT),
                "node {i} cannot ping {v4}"
            );
            if let (Some(v6), Some(_)) = (to.device.tunnel_ip_v6, statuses[i].device.tunnel_ip_v6) {
                let v6 = v6.to_string();
                assert!(
                    from.ns.ping_until(&v6, PING_WAIT),
                    "node {i} cannot ping {v6}"
                );
            }
        }
    }

    // The seed's shapes: v4 /32 and v6 /64 on nx0, host routes /32 and /128 per peer.
    let a = &mesh.nodes[0];
    let addr = a.ns.ok(&["ip", "addr", "show", "nx0"]);
    let me = &statuses[0].device;
    assert!(
        has_line(&addr, &format!("inet {}/32", me.tunnel_ip)),
        "{addr}"
    );
    assert!(
        has_line(&addr, &format!("inet6 {}/64", me.tunnel_ip_v6.unwrap())),
        "{addr}"
    );
    let routes4 = a.ns.ok(&["ip", "-4", "route"]);
    let routes6 = a.ns.ok(&["ip", "-6", "route"]);
    for s in &statuses[1..] {
        assert!(
            has_line(&routes4, &format!("{} dev nx0", s.device.tunnel_ip)),
            "{routes4}"
        );
    }
    for s in &statuses[1..3] {
        let v6 = s.device.tunnel_ip_v6.unwrap();
        assert!(has_line(&routes6, &format!("{v6} dev nx0")), "{routes6}");
    }
    assert!(has_line(&routes6, "200::/64 dev nx0"), "{routes6}");

    // Nobody has a v6 route or allowed IP for the v4-only node, and it has no v6 at all.
    let d_v4 = v4_only.device.tunnel_ip;
    for s in &statuses[..3] {
        let peer = s.peers.iter().find(|p| p.tunnel_ip == d_v4).unwrap();
        assert!(
            peer.allowed_ips.iter().all(|n| n.addr().is_ipv4()),
            "{:?}",
            peer.allowed_ips
        );
    }
    let d_addr = mesh.nodes[3].ns.ok(&["ip", "addr", "show", "nx0"]);
    assert!(!d_addr.contains("inet6"), "{d_addr}");
    for p in &v4_only.peers {
        assert!(
            p.allowed_ips.iter().all(|n| n.addr().is_ipv4()),
            "{:?}",
            p.allowed_ips
        );
    }
    // Traffic counters moved and handshakes happened.
    let after = mesh.nodes[0].status().unwrap();
    assert!(
        after
            .peers
            .iter()
            .all(|p| p.last_handshake_secs.is_some() && p.rx_bytes > 0)
    );
}

#[test]
fn restart_outage_and_removal() {
    let mut mesh = Mesh::new("ro", &[true, true, true]);
    let (first, rest) = mesh.nodes.split_at_mut(1);
    first[0].start(Some(&mesh.token));
    rest[0].start(Some(&mesh.token));
    mesh.refresh_logs();
    let a0 = mesh.nodes[0].wait_peers(1);
    let b0 = mesh.nodes[1].wait_peers(1);
    let b_v6 = b0.device.tunnel_ip_v6.unwrap().to_string();
    assert!(mesh.nodes[0].ns.ping_until(&b_v6, PING_WAIT));

    // Restart A: same key, addresses and port; the interface goes away in between.
    mesh.nodes[0].stop();
    assert!(
        !link_exists(&mesh.nodes[0].ns, "nx0"),
        "nx0 left behind after SIGTERM"
    );
    mesh.nodes[0].start(None);
    mesh.refresh_logs();
    let a1 = mesh.nodes[0].wait_peers(1);
    assert_eq!(a1.device.public_key, a0.device.public_key);
    assert_eq!(a1.device.tunnel_ip, a0.device.tunnel_ip);
    assert_eq!(a1.device.tunnel_ip_v6, a0.device.tunnel_ip_v6);
    assert_eq!(a1.device.listen_port, a0.device.listen_port);
    assert!(
        mesh.nodes[0].ns.ping_until(&b_v6, PING_WAIT),
        "no ping after restart"
    );

    // Coordinator down: tunnels keep answering.
    mesh.coord.kill();
    let b_v4 = b0.device.tunnel_ip.to_string();
    for _ in 0..5 {
        assert!(mesh.nodes[0].ns.ping_until(&b_v4, Duration::from_secs(5)));
    }
    wait_until("A to notice the outage", Duration::from_secs(60), || {
        mesh.nodes[0].status().filter(|s| !s.coordinator_connected)
    });
    // Coordinator back: a new node joins and is reached.
    mesh.coord.start();
    let token = mesh.token.clone();
    mesh.nodes[2].start(Some(&token));
    mesh.refresh_logs();
    let c = mesh.nodes[2].wait_peers(2);
    mesh.nodes[0].wait_peers(2);
    let c_v6 = c.device.tunnel_ip_v6.unwrap().to_string();
    assert!(
        mesh.nodes[0].ns.ping_until(&c_v6, PING_WAIT),
        "new node not reached"
    );

    // Remove B with the admin command: A drops it, routes included.
    mesh.coord
        .admin(&["devices", "remove", &b0.device.id.to_string()]);
    mesh.nodes[0].wait_peers(1);
    let routes = mesh.nodes[0].ns.ok(&["ip", "-6", "route"]);
    assert!(!has_line(&routes, &format!("{b_v6} dev nx0")), "{routes}");
    let routes = mesh.nodes[0].ns.ok(&["ip", "-4", "route"]);
    assert!(!has_line(&routes, &format!("{b_v4} dev nx0")), "{routes}");
    // B learns it was removed and exits with an error.
    let b = &mut mesh.nodes[1];
    let code = wait_until("B to exit", Duration::from_secs(20), || {
        b.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(!code.success());
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("removed from its organization"), "{log}");
    let _ = &mesh.lan;
    let _ = Path::new("");
}
