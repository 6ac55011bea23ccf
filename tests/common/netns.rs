//! Network namespaces for end-to-end tests: made by the test, deleted on drop (every
//! exit path), named after the test so tests run in parallel. Underlay addresses come
//! from the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24);
//! nothing routes out of the namespaces.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{BIN, Deadline, DieWithParent};

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

/// Moves the calling thread into network namespace `ns` (made by `ip netns add`).
pub fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Starts `f` on a fresh thread that has entered namespace `ns`: sockets it creates
/// belong to that namespace for their whole life (they may then be used anywhere).
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
}

/// Runs `f` on a fresh thread inside namespace `ns` and returns its result.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in_ns(ns, f).join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
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

    /// Fails the test unless each of `addrs` answers a ping within `cap` (or what is
    /// left of the test's `deadline`).
    pub fn assert_pings(&self, addrs: &[&str], deadline: Deadline, cap: Duration) {
        for addr in addrs {
            assert!(
                self.ping_until(addr, deadline.left(cap)),
                "{} cannot ping {addr}",
                self.name
            );
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

    /// A namespace `nx-<tag>-<name>`, not attached to the bridge.
    pub fn netns(&self, name: &str) -> Netns {
        Netns::new(&format!("nx-{}-{name}", self.tag))
    }

    /// A host with `eth0` at `addr` (CIDR) on the bridge.
    pub fn host(&mut self, name: &str, addr: &str, ipv6: bool) -> Netns {
        let ns = self.netns(name);
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
        if addr.contains(':') {
            // No duplicate address detection: usable at once.
            ns.ok(&["ip", "addr", "add", addr, "dev", "eth0", "nodad"]);
        } else {
            ns.ok(&["ip", "addr", "add", addr, "dev", "eth0"]);
        }
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

/// How a NAT router maps the UDP flows of its LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// nftables `masquerade`: one local port keeps one public port whatever the
    /// destination (endpoint-independent mapping), so hole punching works.
    EndpointIndependent,
    /// nftables `masquerade fully-random`: a new random public port for every
    /// destination (symmetric NAT), so hole punching cannot work.
    Symmetric,
}

/// A site behind a NAT router: `router` has its WAN `eth0` on the internet bridge and
/// its LAN `lan0`; `node` has `eth0` on that LAN and its default route via the router.
/// The router forwards, masquerades on the WAN and, like a home router, drops
/// unsolicited packets from the WAN (so they leave no conntrack entry behind).
/// Fields drop in order: the node, then the router.
pub struct NatSite {
    pub node: Netns,
    pub router: Netns,
    /// The node's LAN address.
    pub node_ip: std::net::Ipv4Addr,
    /// The router's public (WAN) address.
    pub wan_ip: std::net::Ipv4Addr,
}

fn nft_ruleset(nat: Nat) -> String {
    let masquerade = match nat {
        Nat::EndpointIndependent => "masquerade",
        Nat::Symmetric => "masquerade fully-random",
    };
    format!(
        "table ip nxnat {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"eth0\" {masquerade}\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"eth0\" ct state new drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"eth0\" ct state new drop\n\
         \t}}\n\
         }}\n"
    )
}

impl Netns {
    /// Runs a command in the namespace with `input` on its stdin; panics if it fails.
    pub fn ok_with_stdin(&self, args: &[&str], input: &str) -> String {
        use std::io::Write;
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn command");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait command");
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Lan {
    /// A NAT site `name`: router `nx-<tag>-<name>gw` with WAN address `wan` (CIDR) on
    /// the bridge, and node `nx-<tag>-<name>` on the LAN `lan` (an IPv4 prefix such as
    /// 192.0.2.0/26: router on its first host address, node on the second). The node
    /// keeps IPv6 (for tunnel addresses); the underlay is IPv4 only.
    pub fn nat_site(&mut self, name: &str, wan: &str, lan: &str, nat: Nat) -> NatSite {
        let lan: ipnet::Ipv4Net = lan.parse().expect("LAN prefix");
        let wan_ip: std::net::Ipv4Addr = wan
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("WAN address");
        let mut hosts = lan.hosts();
        let router_ip = hosts.next().expect("router address");
        let node_ip = hosts.next().expect("node address");
        let router = self.host(&format!("{name}gw"), wan, false);
        let node = self.netns(name);
        router.ok(&[
            "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns",
            &node.name,
        ]);
        let plen = lan.prefix_len();
        router.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{router_ip}/{plen}"),
            "dev",
            "lan0",
        ]);
        router.ok(&["ip", "link", "set", "lan0", "up"]);
        router.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        router.ok_with_stdin(&["nft", "-f", "-"], &nft_ruleset(nat));
        node.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{node_ip}/{plen}"),
            "dev",
            "eth0",
        ]);
        node.ok(&["ip", "link", "set", "eth0", "up"]);
        node.ok(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &router_ip.to_string(),
        ]);
        NatSite {
            node,
            router,
            node_ip,
            wan_ip,
        }
    }
}
