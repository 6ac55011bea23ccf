//! A coordinator and nodes on one underlay bridge, each in its own namespace, running
//! the real binary. Logs of every process are printed if the test fails; processes
//! stop and namespaces go on every exit path.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nexodus::join::status::Status;

use super::BIN;
use super::netns::{Lan, Netns, state_dir};

pub use super::wait_until;

pub struct Coord {
    pub ns: Netns,
    pub dir: PathBuf,
    /// Address the coordinator listens on (QUIC port 4443, STUN 3478/3479).
    pub ip: String,
    logdir: PathBuf,
    starts: usize,
    child: Option<Child>,
}

impl Coord {
    /// Starts (again) on the same state; returns the log file of this run.
    pub fn start(&mut self) -> PathBuf {
        let log = self.logdir.join(format!("coord.{}.log", self.starts));
        self.starts += 1;
        let listen = format!("{}:4443", self.ip);
        let stun = format!("{}:3478", self.ip);
        self.child = Some(self.ns.spawn_nexodus(
            &[
                "serve",
                "--listen",
                &listen,
                "--stun-listen",
                &stun,
                "--state-dir",
                self.dir.to_str().expect("utf-8 path"),
            ],
            &log,
        ));
        wait_until("coordinator to start", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("coordinator running"))
                .map(|_| ())
        });
        log
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
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
        self.log = self
            .logdir
            .join(format!("{}.{}.log", self.name, self.starts));
        self.starts += 1;
        self.child = Some(self.ns.spawn_nexodus(&args, &self.log));
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().expect("wait").is_none() {
                assert!(
                    Instant::now() < deadline,
                    "{} did not stop on SIGTERM",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn status(&self) -> Option<Status> {
        let out = Command::new(BIN)
            .args(["status", "--json", "--state-dir"])
            .arg(&self.dir)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("status json"))
    }

    /// Waits until the node runs with exactly `peers` peers listed.
    pub fn wait_peers(&self, peers: usize) -> Status {
        wait_until(
            &format!("{} to have {peers} peers", self.name),
            Duration::from_secs(30),
            || self.status().filter(|s| s.peers.len() == peers),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fields drop in order: logs print first (on failure), then processes stop, then the
/// namespaces and files go.
pub struct Cluster {
    logs: Logs,
    pub nodes: Vec<Node>,
    pub coord: Coord,
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

impl Cluster {
    /// A bridge named after `tag` with the coordinator at `coord_cidr` (e.g.
    /// "203.0.113.1/24") running, and a reusable token.
    pub fn new(tag: &str, coord_cidr: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let logdir = state_dir(tmp.path(), "logs");
        let mut lan = Lan::new(tag);
        let ip = coord_cidr.split('/').next().expect("address").to_string();
        let mut coord = Coord {
            ns: lan.host("c", coord_cidr, true),
            dir: state_dir(tmp.path(), "coord"),
            ip,
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
            lan,
            token,
            tmp,
        }
    }

    /// Adds a (not yet started) node; returns its index.
    pub fn add_node(&mut self, name: &str, cidr: &str, ipv6: bool, flags: &[&str]) -> usize {
        let ns = self.lan.host(name, cidr, ipv6);
        let node = Node {
            name: name.into(),
            ns,
            dir: state_dir(self.tmp.path(), name),
            flags: flags.iter().map(ToString::to_string).collect(),
            coordinator: format!("{}:4443", self.coord.ip),
            log: PathBuf::new(),
            logdir: self.logs.0[0].clone(),
            starts: 0,
            child: None,
        };
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Adds a (not yet started) node that runs in a namespace made elsewhere (e.g. the
    /// `node` of a [`super::netns::NatSite`]); returns its index.
    pub fn add_node_in(&mut self, name: &str, ns: Netns, flags: &[&str]) -> usize {
        let node = Node {
            name: name.into(),
            ns,
            dir: state_dir(self.tmp.path(), name),
            flags: flags.iter().map(ToString::to_string).collect(),
            coordinator: format!("{}:4443", self.coord.ip),
            log: PathBuf::new(),
            logdir: self.logs.0[0].clone(),
            starts: 0,
            child: None,
        };
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Starts a node with the cluster's token.
    pub fn start(&mut self, i: usize) {
        let token = self.token.clone();
        self.nodes[i].start(Some(&token));
    }

    /// A scratch directory that lives as long as the cluster.
    pub fn scratch(&self, name: &str) -> PathBuf {
        state_dir(self.tmp.path(), name)
    }
}
