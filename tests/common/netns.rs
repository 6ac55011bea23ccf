//! Network namespaces for end-to-end tests: made by the test, deleted on drop (every
//! exit path), named after the test so tests run in parallel. Underlay addresses come
//! from 192.0.2.0/24; nothing routes out of the namespaces.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{BIN, DieWithParent};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests need root (network namespaces, TUN); run them with sudo"
    );
}

/// One namespace; deleted (with everything in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        require_root();
        // A namespace left by a crashed earlier run of the same test.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Self { name: name.into() };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs a command in the namespace; panics if it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&run(&mut self.cmd(args)).stdout).into_owned()
    }

    /// Runs a command in the namespace; true if it succeeded.
    pub fn try_run(&self, args: &[&str]) -> bool {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// One ping with a one-second deadline.
    pub fn ping(&self, addr: &str) -> bool {
        self.try_run(&["ping", "-c", "1", "-W", "1", addr])
    }

    /// Pings until one answers or `timeout` passes.
    pub fn ping_until(&self, addr: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ping(addr) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the nexodus binary in the namespace with its log in `log`.
    pub fn spawn_nexodus(&self, args: &[&str], log: &Path) -> Child {
        let file = std::fs::File::create(log).expect("log file");
        self.cmd(&[BIN])
            .args(args)
            .env("RUST_LOG", "info,nexodus=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .die_with_parent()
            .spawn()
            .expect("spawn nexodus")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill what still runs inside, then delete.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A bridge namespace ("the internet") and hosts attached to it.
pub struct Lan {
    pub hub: Netns,
    tag: String,
    next: u32,
}

impl Lan {
    pub fn new(tag: &str) -> Self {
        let hub = Netns::new(&format!("nx-{tag}-hub"));
        hub.ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        hub.ok(&["ip", "link", "set", "br0", "up"]);
        Self {
            hub,
            tag: tag.into(),
            next: 0,
        }
    }

    /// A host with `eth0` at `addr` (CIDR) on the bridge.
    pub fn host(&mut self, name: &str, addr: &str, ipv6: bool) -> Netns {
        let ns = Netns::new(&format!("nx-{}-{name}", self.tag));
        if !ipv6 {
            for key in ["all", "default", "lo"] {
                ns.ok(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
                ]);
            }
        }
        self.next += 1;
        let port = format!("p{}", self.next);
        self.hub.ok(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        self.hub.ok(&["ip", "link", "set", &port, "master", "br0"]);
        self.hub.ok(&["ip", "link", "set", &port, "up"]);
        ns.ok(&["ip", "addr", "add", addr, "dev", "eth0"]);
        ns.ok(&["ip", "link", "set", "eth0", "up"]);
        ns
    }
}

/// A temporary directory for a node's or coordinator's state and logs.
pub fn state_dir(base: &Path, name: &str) -> PathBuf {
    let d = base.join(name);
    std::fs::create_dir_all(&d).expect("state dir");
    d
}
