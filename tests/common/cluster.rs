//! A coordinator and nodes on one underlay bridge, each in its own namespace, running
//! the real binary. Logs and statuses of every process are printed if the test fails;
//! processes stop and namespaces go on every exit path.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use nexodus::join::status::Status;
use nexodus::wire::control::Device;

use super::BIN;
use super::netns::{Lan, Nat, Netns, state_dir};
use super::proc;

pub use super::wait_until;

pub struct Coord {
    pub ns: Netns,
    pub dir: PathBuf,
    /// Address the coordinator listens on (QUIC port 4443, STUN 3478/3479).
    pub ip: String,
    /// Started without `--listen`/`--stun-listen`: the defaults (`[::]`, dual stack).
    pub listen_default: bool,
    /// More `serve` flags for the next start (e.g. `--api-listen`).
    pub serve_flags: Vec<String>,
    logdir: PathBuf,
    starts: usize,
    child: Option<Child>,
}

impl Coord {
    /// Starts (again) on the same state; returns the log file of this run.
    pub fn start(&mut self) -> PathBuf {
        self.start_within(Duration::from_secs(20))
    }

    /// [`Coord::start`], waiting at most `timeout` for it to run.
    pub fn start_within(&mut self, timeout: Duration) -> PathBuf {
        let log = self.logdir.join(format!("coord.{}.log", self.starts));
        self.starts += 1;
        let listen = format!("{}:4443", self.ip);
        let stun = format!("{}:3478", self.ip);
        let mut args = vec![
            "serve",
            "--state-dir",
            self.dir.to_str().expect("utf-8 path"),
        ];
        if !self.listen_default {
            args.extend(["--listen", &listen, "--stun-listen", &stun]);
        }
        args.extend(self.serve_flags.iter().map(String::as_str));
        self.child = Some(self.ns.spawn_nexodus(&args, &log));
        wait_until("coordinator to start", timeout, || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("coordinator running"))
                .map(|_| ())
        });
        log
    }

    /// Starts a PostgreSQL replica (`serve --database-url URL`) on `ip` in the
    /// coordinator's namespace (ports 4443 and 3478), logging to `logdir/replica-IP.log`,
    /// and waits until it runs. Returns the process and its log.
    pub fn spawn_replica(&self, ip: &str, url: &str, logdir: &Path) -> (Child, PathBuf) {
        let log = logdir.join(format!("replica-{ip}.log"));
        let listen = format!("{ip}:4443");
        let stun = format!("{ip}:3478");
        let args = [
            "serve",
            "--listen",
            &listen,
            "--stun-listen",
            &stun,
            "--database-url",
            url,
        ];
        let child = self.ns.spawn_nexodus(&args, &log);
        wait_until("replica to start", Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("coordinator running"))
                .map(|_| ())
        });
        (child, log)
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.child.take() {
            proc::kill(c);
        }
    }

    /// Runs an admin command on the coordinator's state.
    pub fn admin_result(&self, args: &[&str]) -> Result<String, String> {
        let dir = self.dir.to_str().expect("state dir is UTF-8");
        super::admin_command(args, &["--state-dir", dir])
    }

    pub fn admin(&self, args: &[&str]) -> String {
        self.admin_result(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The organization's devices as the coordinator stores them.
    pub fn devices(&self) -> Vec<Device> {
        let json = self.admin(&["devices", "--json"]);
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("devices --json ({e}): {json}"))
    }

    pub fn device(&self, hostname: &str) -> Option<Device> {
        self.devices().into_iter().find(|d| d.hostname == hostname)
    }

    /// Waits (bounded) until the device `hostname` is registered; returns its id.
    pub fn device_id(&self, hostname: &str) -> i64 {
        wait_until(
            &format!("{hostname} to register"),
            Duration::from_secs(30),
            || self.device(hostname).map(|d| d.id),
        )
    }

    /// `nexodus devices approve ID ARGS` for the device `hostname` (waiting for it
    /// to register); panics with the command's output on failure.
    pub fn approve(&self, hostname: &str, args: &[&str]) -> String {
        let id = self.device_id(hostname).to_string();
        let mut all = vec!["devices", "approve", &id];
        all.extend_from_slice(args);
        self.admin(&all)
    }

    /// `nexodus devices revoke ID ARGS` for the device `hostname`.
    pub fn revoke(&self, hostname: &str, args: &[&str]) -> String {
        let id = self.device_id(hostname).to_string();
        let mut all = vec!["devices", "revoke", &id];
        all.extend_from_slice(args);
        self.admin(&all)
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub dir: PathBuf,
    /// Extra `join` flags.
    pub flags: Vec<String>,
    pub coordinator: String,
    /// The log of the current (or last) run.
    pub log: PathBuf,
    logdir: PathBuf,
    starts: usize,
    pub child: Option<Child>,
}

impl Node {
    /// The running node's process id (`ip netns exec` execs in place, so the child is
    /// nexodus itself; checked).
    pub fn pid(&self) -> u32 {
        let pid = self.child.as_ref().expect("node running").id();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "nexodus", "pid {pid} is not the node");
        pid
    }

    /// Starts `nexodus join` (with the token the first time).
    pub fn start(&mut self, token: Option<&str>) {
        self.start_with(token, &[]);
    }

    /// [`Node::start`] with `extra` flags after the node's own for this run.
    pub fn start_with(&mut self, token: Option<&str>, extra: &[&str]) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let mut args: Vec<&str> = vec![
            "join",
            &self.coordinator,
            "--hostname",
            &self.name,
            "--state-dir",
            self.dir.to_str().expect("utf-8 path"),
        ];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        args.extend(self.flags.iter().map(String::as_str));
        args.extend_from_slice(extra);
        self.log = self
            .logdir
            .join(format!("{}.{}.log", self.name, self.starts));
        self.starts += 1;
        self.child = Some(self.ns.spawn_nexodus(&args, &self.log));
    }

    /// SIGTERM and wait (at most 10 s) for a clean exit.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(10));
    }

    /// SIGTERM and a bounded wait for the exit (SIGKILL after `timeout`, and fail).
    pub fn stop_within(&mut self, timeout: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        proc::signal(&c, libc::SIGTERM);
        let exited = proc::exit_within(&mut c, timeout);
        proc::kill(c);
        assert!(
            exited.is_some(),
            "{} did not stop within {timeout:?} of SIGTERM",
            self.name
        );
    }

    /// SIGKILL: no chance to say goodbye.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.take() {
            proc::kill(c);
        }
    }

    /// Waits for the process to exit on its own; None if it still runs after `timeout`.
    pub fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let code = proc::exit_within(self.child.as_mut().expect("node started"), timeout);
        if code.is_some() {
            self.child = None;
        }
        code
    }

    /// The process is running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("wait").is_none())
    }

    /// The log of the current (or last) run.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nexodus status ARGS --state-dir DIR`, bounded (a wedged node must not hang
    /// the test): stdout, or why there is none.
    pub fn status_output(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let out = Command::new("timeout")
            .args(["-s", "KILL", "10", BIN, "status"])
            .args(args)
            .arg("--state-dir")
            .arg(&self.dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `nexodus status --json`: the JSON, or why there is none.
    pub fn status_json(&self) -> Result<Vec<u8>, String> {
        self.status_output(&["--json"])
    }

    /// The human `nexodus status`; fails the test if there is none.
    pub fn status_text(&self) -> String {
        let out = self
            .status_output(&[])
            .unwrap_or_else(|e| panic!("{}: nexodus status failed: {e}", self.name));
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn status(&self) -> Option<Status> {
        let json = self.status_json().ok()?;
        Some(serde_json::from_slice(&json).unwrap_or_else(|e| {
            panic!(
                "{}: status does not parse ({e}): {}",
                self.name,
                String::from_utf8_lossy(&json)
            )
        }))
    }

    /// The status now (waiting a little if the node is between two states).
    pub fn current(&self) -> Status {
        wait_until(
            &format!("{} to answer status", self.name),
            Duration::from_secs(15),
            || self.status(),
        )
    }

    /// Waits until the node runs and `ok` holds for its status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Status) -> bool,
    ) -> Status {
        wait_until(&format!("{}: {what}", self.name), timeout, || {
            self.status().filter(|s| ok(s))
        })
    }

    /// Waits until the node runs with exactly `peers` peers listed.
    pub fn wait_peers(&self, peers: usize) -> Status {
        self.wait_peer_count(peers, Duration::from_secs(30))
    }

    /// Waits (at most `timeout`) until the node lists exactly `n` peers.
    pub fn wait_peer_count(&self, n: usize, timeout: Duration) -> Status {
        self.wait_status(&format!("to list {n} peers"), timeout, |s| {
            s.peers.len() == n
        })
    }

    /// Waits until the node lists (at least) the peers named.
    pub fn wait_named(&self, names: &[&str], timeout: Duration) -> Status {
        self.wait_status(&format!("to list peers {names:?}"), timeout, |s| {
            has_peers(s, names)
        })
    }

    /// Waits until the node lists exactly one peer, `name`.
    pub fn wait_only_peer(&self, name: &str, timeout: Duration) -> Status {
        self.wait_status(&format!("to list {name} as its only peer"), timeout, |s| {
            s.peers.len() == 1 && s.peers[0].hostname == name
        })
    }

    /// Pings `addr` until it answers; fails the test after `timeout`.
    pub fn ping(&self, addr: &str, timeout: Duration) {
        assert!(
            self.ns.ping_until(addr, timeout),
            "{} cannot ping {addr} within {timeout:?}",
            self.name
        );
    }

    /// Pings the node of status `to` at its tunnel address (v4 or v6).
    pub fn ping_node(&self, to: &Status, v6: bool, timeout: Duration) {
        let addr = tunnel_addr(to, v6);
        assert!(
            self.ns.ping_until(&addr, timeout),
            "{} cannot ping {} at {addr} within {timeout:?}",
            self.name,
            to.device.hostname
        );
    }

    /// `ip -4 route` and `ip -6 route` in the node's namespace.
    pub fn routes(&self) -> (String, String) {
        (
            self.ns.ok(&["ip", "-4", "route"]),
            self.ns.ok(&["ip", "-6", "route"]),
        )
    }

    pub fn wait_routes(&self, what: &str, timeout: Duration, ok: impl Fn(&str, &str) -> bool) {
        wait_until(&format!("{}: {what}", self.name), timeout, || {
            let (v4, v6) = self.routes();
            ok(&v4, &v6).then_some(())
        });
    }

    /// What a failed test prints about the node: process state, status, routes.
    fn report(&mut self) {
        let state = match self.child.as_mut().map(Child::try_wait) {
            None => "not running (stopped by the test)".to_string(),
            Some(Ok(None)) => "running".to_string(),
            Some(Ok(Some(code))) => format!("EXITED: {code}"),
            Some(Err(e)) => format!("unknown: {e}"),
        };
        let status = match self.status_json() {
            Ok(j) => String::from_utf8_lossy(&j).into_owned(),
            Err(e) => format!("no status: {e}"),
        };
        eprintln!("===== {}: process {state} =====\n{status}", self.name);
        for fam in ["-4", "-6"] {
            if let Ok(o) = self.ns.cmd(&["ip", fam, "route"]).output() {
                eprintln!(
                    "----- ip {fam} route in {} -----\n{}",
                    self.ns.name,
                    String::from_utf8_lossy(&o.stdout)
                );
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tunnel address of a node's status, v4 or v6.
pub fn tunnel_addr(s: &Status, v6: bool) -> String {
    if v6 {
        s.device
            .tunnel_ip_v6
            .unwrap_or_else(|| panic!("{} has no v6 tunnel address", s.device.hostname))
            .to_string()
    } else {
        s.device.tunnel_ip.to_string()
    }
}

/// `s` lists a peer with each of the hostnames.
pub fn has_peers(s: &Status, names: &[&str]) -> bool {
    names
        .iter()
        .all(|n| s.peers.iter().any(|p| p.hostname == *n))
}

/// Fields drop in order: statuses print (in `drop`) and logs print first (on
/// failure), then node processes stop, then the coordinator, then the namespaces
/// (the test's extra ones, then the bridge and its hosts) and files go.
pub struct Cluster {
    logs: Logs,
    pub nodes: Vec<Node>,
    pub coord: Coord,
    /// Namespaces the test made besides the nodes' (NAT routers, LAN hosts).
    pub aux: Vec<Netns>,
    pub lan: Lan,
    pub token: String,
    tmp: tempfile::TempDir,
}

struct Logs(Vec<PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for dir in &self.0 {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
                files.sort();
                for p in files {
                    eprintln!("===== {} =====", p.display());
                    eprintln!("{}", std::fs::read_to_string(&p).unwrap_or_default());
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &mut self.nodes {
                n.report();
            }
        }
    }
}

impl Cluster {
    /// A bridge named after `tag` with the coordinator at `coord_cidr` (e.g.
    /// "203.0.113.1/24") running, and a reusable token.
    pub fn new(tag: &str, coord_cidr: &str) -> Self {
        Self::new_with(tag, coord_cidr, true, false)
    }

    /// [`Cluster::new`] with the coordinator's host with or without IPv6, and the
    /// coordinator on its default listen addresses (`listen_default`) or on `coord_cidr`'s.
    pub fn new_with(tag: &str, coord_cidr: &str, coord_ipv6: bool, listen_default: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let logdir = state_dir(tmp.path(), "logs");
        let mut lan = Lan::new(tag);
        let ip = coord_cidr.split('/').next().expect("address").to_string();
        let mut coord = Coord {
            ns: lan.host("c", coord_cidr, coord_ipv6),
            dir: state_dir(tmp.path(), "coord"),
            ip,
            listen_default,
            serve_flags: Vec::new(),
            logdir: logdir.clone(),
            starts: 0,
            child: None,
        };
        coord.start();
        let token = coord
            .admin(&["token", "create", "--reusable"])
            .trim()
            .to_string();
        Self {
            logs: Logs(vec![logdir]),
            nodes: Vec::new(),
            coord,
            aux: Vec::new(),
            lan,
            token,
            tmp,
        }
    }

    /// Adds a (not yet started) node on the bridge at `cidr`; returns its index.
    pub fn add_node(&mut self, name: &str, cidr: &str, ipv6: bool, flags: &[&str]) -> usize {
        let ns = self.lan.host(name, cidr, ipv6);
        self.add_node_in(name, ns, flags)
    }

    /// Adds a (not yet started) relay (`--relay`, interface `iface`) on the bridge at
    /// `cidr`, IPv6 on; returns its index.
    pub fn add_relay(&mut self, name: &str, cidr: &str, iface: &str) -> usize {
        self.add_node(name, cidr, true, &["--relay", "--interface", iface])
    }

    /// Adds a (not yet started) node that runs in a namespace made elsewhere (e.g. the
    /// `node` of a [`super::netns::NatSite`]); returns its index.
    pub fn add_node_in(&mut self, name: &str, ns: Netns, flags: &[&str]) -> usize {
        let node = Node {
            name: name.into(),
            ns,
            dir: state_dir(self.tmp.path(), name),
            flags: flags.iter().map(ToString::to_string).collect(),
            coordinator: if self.coord.ip.contains(':') {
                format!("[{}]:4443", self.coord.ip)
            } else {
                format!("{}:4443", self.coord.ip)
            },
            log: PathBuf::new(),
            logdir: self.logs.0[0].clone(),
            starts: 0,
            child: None,
        };
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Adds a (not yet started) node behind a NAT router (see [`Lan::nat_site`]); the
    /// router joins [`Cluster::aux`]. Returns the node's index.
    pub fn add_behind_nat(&mut self, name: &str, wan: &str, lan: &str, nat: Nat) -> usize {
        let site = self.lan.nat_site(name, wan, lan, nat);
        self.aux.push(site.router);
        self.add_node_in(name, site.node, &[])
    }

    /// Starts a node with the cluster's token.
    pub fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    /// Starts a node with the cluster's token and `extra` flags for this run. A
    /// `--relay` is approved once the node registered (`nexodus devices approve ID
    /// --relay`, as the README tells users to).
    pub fn start_with(&mut self, i: usize, extra: &[&str]) {
        let token = self.token.clone();
        self.nodes[i].start_with(Some(&token), extra);
        let relay = self.nodes[i]
            .flags
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied());
        if relay.into_iter().any(|f| f == "--relay") {
            self.approve(i, &["--relay"]);
        }
    }

    /// `nexodus devices approve ID ARGS` for node `i` (waiting for it to register);
    /// panics with the command's output on failure.
    pub fn approve(&self, i: usize, args: &[&str]) -> String {
        self.coord.approve(&self.nodes[i].name, args)
    }

    /// Approves the prefixes `cidrs` (comma-separated) node `i` advertises.
    pub fn approve_routes(&self, node_idx: usize, cidrs: &str) {
        self.approve(node_idx, &["--routes", cidrs]);
    }

    /// `nexodus devices revoke ID ARGS` for node `i`.
    pub fn revoke(&self, i: usize, args: &[&str]) -> String {
        self.coord.revoke(&self.nodes[i].name, args)
    }

    /// Starts every node added so far, with the cluster's token.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// `nexodus devices approve ID --relay` for node `i` (a node started with
    /// `--relay` through [`Cluster::start_with`] is approved already).
    pub fn approve_relay(&self, i: usize) {
        self.approve(i, &["--relay"]);
    }

    /// A scratch directory that lives as long as the cluster.
    pub fn scratch(&self, name: &str) -> PathBuf {
        state_dir(self.tmp.path(), name)
    }
}
