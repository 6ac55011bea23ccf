//! End-to-end: NAT traversal and relaying. An "internet" bridge (203.0.113.0/24) holds
//! the coordinator, a relay and a public node; sites sit behind nftables NAT routers
//! (endpoint-independent `masquerade`, or symmetric `masquerade fully-random`) on LANs
//! from 192.0.2.0/24. Nothing routes out of the test's namespaces. Needs root.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Lan, Nat, NatSite, Netns, state_dir};
use common::{BIN, Deadline, wait_until};
use ipnet::IpNet;
use nexodus::join::status::{PeerStatus, Status};
use nexodus::wire::control::Device;

const COORD: &str = "203.0.113.1";
const RELAY: &str = "relay";

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc(Option<Child>);

impl Proc {
    /// Waits at most `timeout` for the exit; kills it if it is still running then.
    /// Returns whether it exited successfully, and its stdout.
    fn finish(mut self, timeout: Duration) -> (bool, String) {
        use std::io::Read;
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + timeout;
        let ok = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        (ok, out)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a Python script in a namespace (stdout piped, stderr inherited).
fn python(ns: &Netns, script: &str, args: &[String]) -> Proc {
    let mut cmd = ns.cmd(&["python3", "-c", script]);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    use common::DieWithParent;
    Proc(Some(cmd.die_with_parent().spawn().expect("spawn python3")))
}

// ---------------------------------------------------------------------------------------
// NAT sanity: the topology itself, without nexodus.

/// UDP servers on every `HOST:PORT` argument that answer each datagram with the
/// sender's address as they see it ("IP:PORT"), until killed.
const ECHO_SERVER: &str = r#"
import select, socket, sys
socks = []
for a in sys.argv[1:]:
    h, p = a.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((h, int(p)))
    socks.append(s)
while True:
    ready, _, _ = select.select(socks, [], [])
    for s in ready:
        data, src = s.recvfrom(2048)
        s.sendto(("%s:%d" % src).encode(), src)
"#;

/// From local port argv[1], asks each echo server argv[3:] in turn (retrying every
/// 200 ms, at most argv[2] seconds in all) how it sees us; prints one line per server.
const PROBE: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[2])
for d in sys.argv[3:]:
    h, p = d.rsplit(":", 1)
    dst = (h, int(p))
    while True:
        if time.monotonic() > end:
            sys.exit("no answer from " + d)
        s.sendto(b"probe", dst)
        try:
            data, src = s.recvfrom(2048)
        except socket.timeout:
            continue
        if src == dst:
            print(data.decode(), flush=True)
            break
"#;

/// UDP hole punching from local port argv[1] to the peer's public address argv[2],
/// for at most argv[3] seconds. Each side sends "0" until it hears the peer, then "1";
/// it succeeds (exit 0) once it heard the peer say "1" (the peer heard it too).
const PUNCH: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.1)
h, p = sys.argv[2].rsplit(":", 1)
peer = (h, int(p))
end = time.monotonic() + float(sys.argv[3])
heard = False
while time.monotonic() < end:
    s.sendto(b"1" if heard else b"0", peer)
    try:
        data, src = s.recvfrom(64)
    except socket.timeout:
        continue
    if src != peer:
        continue
    heard = True
    if data == b"1":
        for _ in range(5):
            s.sendto(b"1", peer)
        print("punched", flush=True)
        sys.exit(0)
sys.exit(1)
"#;

const PROBE_PORT: u16 = 40000;

/// The public addresses one local port of `site` gets towards each of `servers`.
fn mappings(site: &NatSite, servers: &[&str]) -> Proc {
    let mut args = vec![PROBE_PORT.to_string(), "10".into()];
    args.extend(servers.iter().map(|s| s.to_string()));
    python(&site.node, PROBE, &args)
}

fn parse_mappings(site: &NatSite, p: Proc) -> Vec<SocketAddr> {
    let (ok, out) = p.finish(Duration::from_secs(15));
    assert!(ok, "probe from {} failed: {out}", site.node.name);
    let m: Vec<SocketAddr> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(m.len(), 3, "{out}");
    for a in &m {
        assert_eq!(
            a.ip(),
            IpAddr::V4(site.wan_ip),
            "{} not masqueraded to its router's WAN address: {m:?}",
            site.node.name
        );
    }
    m
}

/// Both sides try to punch through to the other's public address at once.
fn punch(a: &NatSite, a_peer: SocketAddr, b: &NatSite, b_peer: SocketAddr, secs: u32) -> bool {
    let args = |peer: SocketAddr| vec![PROBE_PORT.to_string(), peer.to_string(), secs.to_string()];
    let pa = python(&a.node, PUNCH, &args(a_peer));
    let pb = python(&b.node, PUNCH, &args(b_peer));
    let bound = Duration::from_secs(u64::from(secs) + 5);
    let (ok_a, _) = pa.finish(bound);
    let (ok_b, _) = pb.finish(bound);
    assert_eq!(
        ok_a, ok_b,
        "one side of the hole punch succeeded, the other did not"
    );
    ok_a
}

#[test]
fn nat_sanity() {
    let mut lan = Lan::new("nts");
    let e1 = lan.host("e1", "203.0.113.3/24", false);
    let e2 = lan.host("e2", "203.0.113.4/24", false);
    let s1 = lan.nat_site(
        "s1",
        "203.0.113.11/24",
        "192.0.2.0/26",
        Nat::EndpointIndependent,
    );
    let s2 = lan.nat_site(
        "s2",
        "203.0.113.12/24",
        "192.0.2.64/26",
        Nat::EndpointIndependent,
    );
    let sy = lan.nat_site("sy", "203.0.113.13/24", "192.0.2.128/26", Nat::Symmetric);
    let _echo1 = python(
        &e1,
        ECHO_SERVER,
        &["203.0.113.3:5001".into(), "203.0.113.3:5002".into()],
    );
    let _echo2 = python(&e2, ECHO_SERVER, &["203.0.113.4:5001".into()]);

    // One local port towards two ports of one host and a second host.
    let servers = ["203.0.113.3:5001", "203.0.113.3:5002", "203.0.113.4:5001"];
    let probes = [&s1, &s2, &sy].map(|s| (s, mappings(s, &servers)));
    let [m1, m2, msy] = probes.map(|(s, p)| parse_mappings(s, p));
    for (site, m) in [(&s1, &m1), (&s2, &m2)] {
        assert!(
            m.iter().all(|a| a.port() == m[0].port()),
            "{}: endpoint-independent NAT gave different ports: {m:?}",
            site.node.name
        );
    }
    assert!(
        msy.iter().any(|a| a.port() != msy[0].port()),
        "symmetric NAT gave one port for every destination: {msy:?}"
    );

    // Hole punching works between the two endpoint-independent sites...
    assert!(
        punch(&s1, m2[0], &s2, m1[0], 10),
        "no hole punching between the endpoint-independent sites"
    );
    // ...and not with the symmetric one (its mapping towards s1 is a new port).
    assert!(
        !punch(&s1, msy[0], &sy, m1[0], 3),
        "hole punching through the symmetric NAT worked"
    );

    // The internet has no route into the sites, and the routers no default route.
    assert!(!e1.ping(&s1.node_ip.to_string()));
    for r in [&s1.router, &s2.router, &sy.router] {
        let routes = r.ok(&["ip", "-4", "route"]);
        assert!(!routes.contains("default"), "{routes}");
    }
}

// ---------------------------------------------------------------------------------------
// nexodus through the NATs.

struct Coord {
    ns: Netns,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Coord {
    fn start(&mut self) {
        self.child = Some(self.ns.spawn_nexodus(
            &[
                "serve",
                "--listen",
                &format!("{COORD}:4443"),
                "--stun-listen",
                &format!("{COORD}:3478"),
                "--state-dir",
                self.dir.to_str().unwrap(),
            ],
            &self.log,
        ));
        let log = self.log.clone();
        wait_until("coordinator to start", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|s| s.contains("coordinator running"))
                .map(|_| ())
        });
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

impl Drop for Coord {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Node {
    name: String,
    ns: Netns,
    dir: PathBuf,
    logdir: PathBuf,
    /// Extra `join` flags (`--relay`, `--relay-only`).
    flags: Vec<&'static str>,
    child: Option<Child>,
    starts: usize,
}

impl Node {
    /// Starts `nexodus join`; returns the log file of this run.
    fn start(&mut self, token: Option<&str>) -> PathBuf {
        assert!(self.child.is_none(), "{} already running", self.name);
        let mut args = vec![
            "join",
            "203.0.113.1:4443",
            "--hostname",
            &self.name,
            "--state-dir",
            self.dir.to_str().unwrap(),
        ];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        args.extend(self.flags.iter().copied());
        let log = self
            .logdir
            .join(format!("{}.{}.log", self.name, self.starts));
        self.starts += 1;
        self.child = Some(self.ns.spawn_nexodus(&args, &log));
        log
    }

    /// SIGKILL: no chance to say goodbye.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `nexodus status --json`: the JSON, or why there is none.
    fn status_json(&self) -> Result<Vec<u8>, String> {
        // Bounded: a wedged node must not hang the test.
        let out = Command::new("timeout")
            .args(["-s", "KILL", "10", BIN, "status", "--json", "--state-dir"])
            .arg(&self.dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn status(&self) -> Option<Status> {
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
    fn current(&self) -> Status {
        wait_until(
            &format!("{} to answer status", self.name),
            Duration::from_secs(10),
            || self.status(),
        )
    }

    fn has_peers(s: &Status, names: &[&str]) -> bool {
        names
            .iter()
            .all(|n| s.peers.iter().any(|p| p.hostname == *n))
    }

    /// Waits until the node runs and lists (at least) the peers named.
    fn wait_peers(&self, names: &[&str], timeout: Duration) -> Status {
        wait_until(
            &format!("{} to list peers {names:?}", self.name),
            timeout,
            || self.status().filter(|s| Self::has_peers(s, names)),
        )
    }

    /// Waits until the node lists exactly one peer, the relay.
    fn wait_relay_only(&self, timeout: Duration) -> Status {
        self.wait_only_peer(RELAY, timeout)
    }

    /// Waits until the node lists exactly one peer, `name`.
    fn wait_only_peer(&self, name: &str, timeout: Duration) -> Status {
        wait_until(
            &format!("{} to list {name} as its only peer", self.name),
            timeout,
            || {
                self.status()
                    .filter(|s| s.peers.len() == 1 && s.peers[0].hostname == name)
            },
        )
    }

    fn ping(&self, to: &Status, v6: bool, timeout: Duration) {
        let addr = if v6 {
            to.device.tunnel_ip_v6.unwrap().to_string()
        } else {
            to.device.tunnel_ip.to_string()
        };
        assert!(
            self.ns.ping_until(&addr, timeout),
            "{} cannot ping {} at {addr} within {timeout:?}",
            self.name,
            to.device.hostname
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The one relay peer of a spoke.
fn relay_peer(s: &Status) -> &PeerStatus {
    assert_eq!(
        s.peers.len(),
        1,
        "{} should peer only with the relay: {:?}",
        s.device.hostname,
        s.peers
    );
    let p = &s.peers[0];
    assert_eq!(p.hostname, RELAY, "{:?}", s.peers);
    p
}

/// A spoke's relay peer carries the whole organization, v4 and v6.
fn assert_relay_carries_org(spoke: &Status) {
    let p = relay_peer(spoke);
    let v4: IpNet = nexodus::coord::ipam::DEFAULT_ORG_CIDR.parse().unwrap();
    let v6: IpNet = nexodus::coord::ipam::DEFAULT_ORG_CIDR_V6.parse().unwrap();
    for net in [v4, v6] {
        assert!(
            p.allowed_ips.contains(&net),
            "{}: relay peer lacks {net}: {:?}",
            spoke.device.hostname,
            p.allowed_ips
        );
    }
}

/// `viewer` reaches `spoke` through the relay: either it lists the spoke with path
/// "relay", or not at all and the relay peer's allowed IPs cover the spoke's addresses.
fn assert_reaches_via_relay(viewer: &Status, spoke: &Status) {
    assert_reaches_via(viewer, spoke, RELAY);
}

/// [`assert_reaches_via_relay`] with the relay named `relay`.
fn assert_reaches_via(viewer: &Status, spoke: &Status, relay: &str) {
    let d = &spoke.device;
    if let Some(p) = viewer.peers.iter().find(|p| p.public_key == d.public_key) {
        assert_eq!(
            p.path, "relay",
            "{} lists {} with a direct path: {p:?}",
            viewer.device.hostname, d.hostname
        );
        return;
    }
    let relay = viewer
        .peers
        .iter()
        .find(|p| p.hostname == relay)
        .unwrap_or_else(|| panic!("{} has no peer {relay}", viewer.device.hostname));
    let mut addrs = vec![IpAddr::V4(d.tunnel_ip)];
    if viewer.device.tunnel_ip_v6.is_some() {
        addrs.extend(d.tunnel_ip_v6.map(IpAddr::V6));
    }
    for a in addrs {
        assert!(
            relay.allowed_ips.iter().any(|n| n.contains(&a)),
            "{}: neither a peer {} nor {a} behind the relay: {:?}",
            viewer.device.hostname,
            d.hostname,
            viewer.peers
        );
    }
}

/// Fields drop in order: node processes stop, then the coordinator, then the
/// namespaces and files go. Logs and statuses print first if the test failed.
struct World {
    nodes: Vec<Node>,
    coord: Coord,
    routers: Vec<Netns>,
    lan: Lan,
    token: String,
    logs: Vec<PathBuf>,
    tmp: tempfile::TempDir,
}

impl World {
    /// The internet bridge with the coordinator at 203.0.113.1.
    fn new(tag: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut lan = Lan::new(tag);
        let ns = lan.host("c", &format!("{COORD}/24"), true);
        let log = tmp.path().join("coordinator.log");
        let coord = Coord {
            ns,
            dir: state_dir(tmp.path(), "coord"),
            log: log.clone(),
            child: None,
        };
        let mut w = Self {
            nodes: Vec::new(),
            coord,
            routers: Vec::new(),
            lan,
            token: String::new(),
            logs: vec![log],
            tmp,
        };
        w.coord.start();
        w.token = w
            .coord
            .admin(&["token", "create", "--reusable"])
            .trim()
            .to_string();
        w
    }

    fn add(&mut self, name: &str, ns: Netns, flags: &[&'static str]) -> usize {
        let logdir = state_dir(self.tmp.path(), "logs");
        self.nodes.push(Node {
            name: name.into(),
            ns,
            dir: state_dir(self.tmp.path(), name),
            logdir,
            flags: flags.to_vec(),
            child: None,
            starts: 0,
        });
        self.nodes.len() - 1
    }

    /// A node on the internet bridge at `addr` (CIDR), IPv6 on.
    fn public(&mut self, name: &str, addr: &str, flags: &[&'static str]) -> usize {
        let ns = self.lan.host(name, addr, true);
        self.add(name, ns, flags)
    }

    /// A node behind a NAT router (see [`Lan::nat_site`]).
    fn behind_nat(&mut self, name: &str, wan: &str, lan: &str, nat: Nat) -> usize {
        let site = self.lan.nat_site(name, wan, lan, nat);
        self.routers.push(site.router);
        self.add(name, site.node, &[])
    }

    fn start(&mut self, i: usize, with_token: bool) {
        let token = with_token.then(|| self.token.clone());
        let log = self.nodes[i].start(token.as_deref());
        self.logs.push(log);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for n in &mut self.nodes {
            let state = match n.child.as_mut().map(Child::try_wait) {
                None => "not running (stopped by the test)".to_string(),
                Some(Ok(None)) => "running".to_string(),
                Some(Ok(Some(code))) => format!("EXITED: {code}"),
                Some(Err(e)) => format!("unknown: {e}"),
            };
            let status = match n.status_json() {
                Ok(j) => String::from_utf8_lossy(&j).into_owned(),
                Err(e) => format!("no status: {e}"),
            };
            eprintln!("===== {}: process {state} =====\n{status}", n.name);
        }
        for p in &self.logs {
            eprintln!("===== {} =====", p.display());
            eprintln!("{}", std::fs::read_to_string(p).unwrap_or_default());
        }
    }
}

/// Every node pings every other over v4 and v6.
fn ping_all(w: &World, st: &[Status], deadline: Deadline) {
    for (i, from) in w.nodes.iter().enumerate() {
        for (j, to) in st.iter().enumerate() {
            if i != j {
                from.ping(to, false, deadline.left(Duration::from_secs(30)));
                from.ping(to, true, deadline.left(Duration::from_secs(30)));
            }
        }
    }
}

/// Pings from `spoke` to each of `targets` (v4 and v6) must pass the relay peer:
/// its counters grow by at least the echo requests and replies sent.
fn assert_pings_pass_relay(spoke: &Node, targets: &[&Status], deadline: Deadline) {
    let before = spoke.current();
    let b = relay_peer(&before);
    let (rx0, tx0) = (b.rx_bytes, b.tx_bytes);
    for t in targets {
        spoke.ping(t, false, deadline.left(Duration::from_secs(30)));
        spoke.ping(t, true, deadline.left(Duration::from_secs(30)));
    }
    let after = spoke.current();
    let a = relay_peer(&after);
    // An echo request or reply is at least 84 bytes (v4), 104 (v6).
    let min = targets.len() as u64 * (84 + 104);
    assert!(
        a.rx_bytes >= rx0 + min && a.tx_bytes >= tx0 + min,
        "{}: relay peer counters did not grow by {min} bytes: rx {rx0} -> {}, tx {tx0} -> {}",
        spoke.name,
        a.rx_bytes,
        a.tx_bytes
    );
}

/// `count` pings 100 ms apart from `ns` to `addr` (one burst); how many were answered.
fn burst(ns: &Netns, addr: &str, count: u32) -> u32 {
    let out = ns
        .cmd(&[
            "ping",
            "-q",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.1",
            "-W",
            "2",
            addr,
        ])
        .output()
        .expect("spawn ping");
    let text = String::from_utf8_lossy(&out.stdout);
    // "5 packets transmitted, 5 received, 0% packet loss, time 404ms"
    text.lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("transmitted, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("ping {addr} from {}: no summary: {text}", ns.name))
}

/// The tunnel address of a node's status, v4 or v6.
fn tunnel_addr(s: &Status, v6: bool) -> String {
    if v6 {
        s.device.tunnel_ip_v6.unwrap().to_string()
    } else {
        s.device.tunnel_ip.to_string()
    }
}

/// Bytes of one ICMP echo at the inner layer (`ping`'s 56 bytes of data): 84 (v4),
/// 104 (v6).
fn echo_bytes(v6: bool) -> u64 {
    if v6 { 104 } else { 84 }
}

/// What a relay has forwarded so far: (packets, bytes).
fn relayed(relay: &Node) -> (u64, u64) {
    let s = relay.current();
    assert!(s.relay, "{} does not report itself a relay", relay.name);
    (s.relayed_packets, s.relayed_bytes)
}

/// Waits until `a` lists the peer `b_key` on a direct path with a handshake.
fn wait_direct(a: &Node, b_key: &str, b_name: &str, timeout: Duration) -> PeerStatus {
    wait_until(
        &format!("{} to reach {b_name} directly", a.name),
        timeout,
        || {
            let s = a.status()?;
            let p = s.peers.into_iter().find(|p| p.public_key == b_key)?;
            (p.path == "direct" && p.last_handshake_secs.is_some()).then_some(p)
        },
    )
}

/// `nexodus devices --json` on the coordinator's state.
fn devices(coord: &Coord) -> Vec<Device> {
    let json = coord.admin(&["devices", "--json"]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("devices --json ({e}): {json}"))
}

fn device<'a>(list: &'a [Device], hostname: &str) -> &'a Device {
    list.iter()
        .find(|d| d.hostname == hostname)
        .unwrap_or_else(|| panic!("no device {hostname} in {list:#?}"))
}

/// The relay's namespace forwards nothing by itself: relaying happens in the process,
/// not by kernel forwarding or nftables rules.
fn assert_no_kernel_forwarding(relay: &Node) {
    for key in ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"] {
        let v = relay.ns.ok(&["sysctl", "-n", key]);
        assert_eq!(v.trim(), "0", "{}: {key} = {}", relay.name, v.trim());
    }
    let rules = relay.ns.ok(&["nft", "list", "ruleset"]);
    assert!(
        rules.trim().is_empty(),
        "{}: nftables rules in the relay's namespace:\n{rules}",
        relay.name
    );
}

#[test]
fn nat_traversal_and_relay() {
    let deadline = Deadline::after(Duration::from_secs(180));
    let mut w = World::new("ntr");
    let relay = w.public(RELAY, "203.0.113.2/24", &["--relay"]);
    let public = w.public("pub", "203.0.113.3/24", &[]);
    let s1 = w.behind_nat(
        "site1",
        "203.0.113.11/24",
        "192.0.2.0/26",
        Nat::EndpointIndependent,
    );
    let s2 = w.behind_nat(
        "site2",
        "203.0.113.12/24",
        "192.0.2.64/26",
        Nat::EndpointIndependent,
    );
    let sym = w.behind_nat("sym", "203.0.113.13/24", "192.0.2.128/26", Nat::Symmetric);
    for i in 0..w.nodes.len() {
        w.start(i, true);
    }

    // Everyone but the symmetric node meshes with everyone else but it.
    let meshed = [relay, public, s1, s2];
    let names: Vec<&str> = meshed.iter().map(|&i| w.nodes[i].name.as_str()).collect();
    let mut st: Vec<Option<Status>> = vec![None; w.nodes.len()];
    for &i in &meshed {
        let others: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| *n != w.nodes[i].name)
            .collect();
        st[i] = Some(w.nodes[i].wait_peers(&others, deadline.left(Duration::from_secs(40))));
    }
    st[sym] = Some(w.nodes[sym].wait_relay_only(deadline.left(Duration::from_secs(40))));
    let st: Vec<Status> = st.into_iter().map(Option::unwrap).collect();
    for s in &st {
        assert!(
            s.device.tunnel_ip_v6.is_some(),
            "{} has no v6 tunnel address",
            s.device.hostname
        );
    }
    assert_relay_carries_org(&st[sym]);

    ping_all(&w, &st, deadline);

    // The two endpoint-independent sites punched through to each other, and both reach
    // the public node directly.
    for (a, b, b_wan) in [
        (s1, s2, Ipv4Addr::new(203, 0, 113, 12)),
        (s2, s1, Ipv4Addr::new(203, 0, 113, 11)),
        (s1, public, Ipv4Addr::new(203, 0, 113, 3)),
        (public, s1, Ipv4Addr::new(203, 0, 113, 11)),
        (s2, public, Ipv4Addr::new(203, 0, 113, 3)),
        (public, s2, Ipv4Addr::new(203, 0, 113, 12)),
    ] {
        let peer = wait_direct(
            &w.nodes[a],
            &st[b].device.public_key,
            &w.nodes[b].name,
            deadline.left(Duration::from_secs(30)),
        );
        assert_eq!(
            peer.endpoint.map(|e| e.ip()),
            Some(IpAddr::V4(b_wan)),
            "{}: direct path to {} is not its NAT's public address: {peer:?}",
            w.nodes[a].name,
            w.nodes[b].name
        );
    }

    // The coordinator sees every node online, with the mapping its STUN probes found.
    let list = wait_until(
        "the coordinator to list every node online with its NAT mapping",
        deadline.left(Duration::from_secs(40)),
        || {
            let list = devices(&w.coord);
            let ready = w.nodes.iter().all(|n| {
                list.iter()
                    .any(|d| d.hostname == n.name && d.online && d.reflexive_endpoint.is_some())
            });
            ready.then_some(list)
        },
    );
    for (i, wan, symmetric) in [
        (relay, Ipv4Addr::new(203, 0, 113, 2), false),
        (public, Ipv4Addr::new(203, 0, 113, 3), false),
        (s1, Ipv4Addr::new(203, 0, 113, 11), false),
        (s2, Ipv4Addr::new(203, 0, 113, 12), false),
        (sym, Ipv4Addr::new(203, 0, 113, 13), true),
    ] {
        let d = device(&list, &w.nodes[i].name);
        assert_eq!(d.relay, i == relay, "{d:?}");
        assert_eq!(d.symmetric_nat, symmetric, "{d:?}");
        assert_eq!(
            d.reflexive_endpoint.map(|e| e.ip()),
            Some(IpAddr::V4(wan)),
            "{d:?}"
        );
    }

    // Direct traffic does not pass the relay: cone <-> cone, cone <-> public (and to
    // the relay itself) leave its forwarding counters as they are.
    let before = relayed(&w.nodes[relay]);
    let mut answered = 0;
    for (a, b) in [
        (s1, s2),
        (s2, s1),
        (s1, public),
        (public, s1),
        (s2, public),
        (public, s2),
        (s1, relay),
        (relay, s2),
    ] {
        for v6 in [false, true] {
            let addr = tunnel_addr(&st[b], v6);
            let n = burst(&w.nodes[a].ns, &addr, 5);
            assert!(n > 0, "{} -> {addr}: no answer", w.nodes[a].name);
            answered += n;
        }
    }
    let after = relayed(&w.nodes[relay]);
    assert_eq!(
        after, before,
        "direct pings ({answered} answered) moved the relay's (packets, bytes) counters"
    );

    // The symmetric node's pings do: each request and each reply is forwarded.
    let (mut packets, mut bytes) = (0, 0);
    for t in [s1, public] {
        for v6 in [false, true] {
            let addr = tunnel_addr(&st[t], v6);
            let n = u64::from(burst(&w.nodes[sym].ns, &addr, 5));
            assert!(n > 0, "sym -> {addr}: no answer");
            packets += 2 * n;
            bytes += 2 * n * echo_bytes(v6);
        }
    }
    let moved = relayed(&w.nodes[relay]);
    assert!(
        moved.0 >= after.0 + packets && moved.1 >= after.1 + bytes,
        "the symmetric node's pings did not pass the relay: (packets, bytes) {after:?} -> \
         {moved:?}, expected at least +({packets}, {bytes})"
    );
    eprintln!(
        "relay counters: {before:?} before {answered} direct echoes, {after:?} after; \
         {moved:?} after the symmetric node's"
    );
    // ...by itself, not through kernel forwarding.
    assert_no_kernel_forwarding(&w.nodes[relay]);

    // The symmetric node peers only with the relay, and its traffic passes it.
    assert_pings_pass_relay(&w.nodes[sym], &[&st[s1], &st[public]], deadline);
    assert_relay_carries_org(&w.nodes[sym].current());
    for &i in &[public, s1, s2] {
        assert_reaches_via_relay(&w.nodes[i].current(), &st[sym]);
    }

    // The relay dies: direct peers are untouched, the symmetric node is cut off.
    w.nodes[relay].kill();
    for _ in 0..3 {
        for (a, b) in [(s1, s2), (s2, s1), (s1, public), (public, s1)] {
            w.nodes[a].ping(&st[b], false, deadline.left(Duration::from_secs(5)));
            w.nodes[a].ping(&st[b], true, deadline.left(Duration::from_secs(5)));
        }
    }
    assert!(
        !w.nodes[sym].ns.ping(&st[s1].device.tunnel_ip.to_string()),
        "the symmetric node reached site1 with the relay down: not through the relay"
    );

    // The relay comes back on its state: the symmetric node is reached again, through
    // a new session with the new relay process.
    let restarted = Instant::now();
    w.start(relay, false);
    w.nodes[sym].ping(&st[s1], false, deadline.left(Duration::from_secs(60)));
    w.nodes[s1].ping(&st[sym], false, deadline.left(Duration::from_secs(30)));
    w.nodes[s1].ping(&st[sym], true, deadline.left(Duration::from_secs(30)));
    assert_pings_pass_relay(&w.nodes[sym], &[&st[s1]], deadline);
    let after = w.nodes[sym].current();
    let handshake = relay_peer(&after).last_handshake_secs;
    assert!(
        handshake.is_some_and(|s| s <= restarted.elapsed().as_secs()),
        "sym: no handshake with the restarted relay (last {handshake:?}s ago, restarted {:?} ago)",
        restarted.elapsed()
    );
}

#[test]
fn relay_only_spoke() {
    let deadline = Deadline::after(Duration::from_secs(120));
    let mut w = World::new("rlo");
    let relay = w.public(RELAY, "203.0.113.2/24", &["--relay"]);
    let public = w.public("pub", "203.0.113.3/24", &[]);
    let spoke = w.public("spoke", "203.0.113.4/24", &["--relay-only"]);
    for i in 0..w.nodes.len() {
        w.start(i, true);
    }
    let st_relay =
        w.nodes[relay].wait_peers(&["pub", "spoke"], deadline.left(Duration::from_secs(40)));
    let st_pub = w.nodes[public].wait_peers(&[RELAY], deadline.left(Duration::from_secs(40)));
    let st_spoke = w.nodes[spoke].wait_relay_only(deadline.left(Duration::from_secs(40)));
    assert!(st_spoke.device.tunnel_ip_v6.is_some());
    assert_relay_carries_org(&st_spoke);

    // Both ways, v4 and v6, through the relay.
    w.nodes[public].ping(&st_spoke, false, deadline.left(Duration::from_secs(30)));
    w.nodes[public].ping(&st_spoke, true, deadline.left(Duration::from_secs(30)));
    assert_pings_pass_relay(&w.nodes[spoke], &[&st_pub, &st_relay], deadline);
    assert_relay_carries_org(&w.nodes[spoke].current());
    assert_reaches_via_relay(&w.nodes[public].current(), &st_spoke);
}

/// Two relays: the spoke uses the lowest-id online one (relay1). When relay1 dies the
/// coordinator marks it offline once its QUIC connection times out, and everyone moves
/// to relay2; when relay1 comes back everyone moves back to it.
#[test]
fn second_relay_takes_over() {
    let deadline = Deadline::after(Duration::from_secs(170));
    let mut w = World::new("srt");
    let r1 = w.public("relay1", "203.0.113.2/24", &["--relay"]);
    let r2 = w.public("relay2", "203.0.113.4/24", &["--relay"]);
    let public = w.public("pub", "203.0.113.3/24", &[]);
    let spoke = w.behind_nat("sym", "203.0.113.13/24", "192.0.2.128/26", Nat::Symmetric);

    // relay1 registers first, so it has the lower device id.
    let running = |w: &World, i: usize| {
        wait_until(
            &format!("{} to run", w.nodes[i].name),
            deadline.left(Duration::from_secs(30)),
            || w.nodes[i].status(),
        )
    };
    w.start(r1, true);
    let id1 = running(&w, r1).device.id;
    w.start(r2, true);
    let id2 = running(&w, r2).device.id;
    assert!(id1 < id2, "relay1 has id {id1}, relay2 {id2}");
    w.start(public, true);
    w.start(spoke, true);

    let st_pub = w.nodes[public].wait_peers(
        &["relay1", "relay2"],
        deadline.left(Duration::from_secs(40)),
    );
    let st_spoke = w.nodes[spoke].wait_only_peer("relay1", deadline.left(Duration::from_secs(40)));
    assert!(st_spoke.device.tunnel_ip_v6.is_some() && st_pub.device.tunnel_ip_v6.is_some());
    let both_ways = |w: &World, bound: Duration| {
        for v6 in [false, true] {
            w.nodes[spoke].ping(&st_pub, v6, deadline.left(bound));
        }
        for v6 in [false, true] {
            w.nodes[public].ping(&st_spoke, v6, deadline.left(bound));
        }
    };
    both_ways(&w, Duration::from_secs(30));
    assert_reaches_via(&w.nodes[public].current(), &st_spoke, "relay1");
    let list = devices(&w.coord);
    for (name, relay) in [
        ("relay1", true),
        ("relay2", true),
        ("pub", false),
        ("sym", false),
    ] {
        let d = device(&list, name);
        assert!(d.online, "{d:?}");
        assert_eq!(d.relay, relay, "{d:?}");
    }
    let d = device(&list, "sym");
    assert!(d.symmetric_nat, "{d:?}");
    assert_eq!(
        d.reflexive_endpoint.map(|e| e.ip()),
        Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 13))),
        "{d:?}"
    );
    // relay2 is on standby: the spoke's traffic passes relay1 only.
    assert_eq!(relayed(&w.nodes[r2]), (0, 0), "relay2 forwarded traffic");
    assert!(relayed(&w.nodes[r1]).0 > 0, "relay1 forwarded nothing");

    // relay1 dies without a word: the coordinator notices when its connection times
    // out, and the spoke moves to relay2.
    let killed = Instant::now();
    w.nodes[r1].kill();
    w.nodes[spoke].wait_only_peer("relay2", deadline.left(Duration::from_secs(60)));
    let switched = killed.elapsed();
    let list = devices(&w.coord);
    assert!(!device(&list, "relay1").online, "{list:#?}");
    assert!(device(&list, "relay2").online, "{list:#?}");
    for v6 in [false, true] {
        w.nodes[spoke].ping(&st_pub, v6, deadline.left(Duration::from_secs(30)));
    }
    let reached = killed.elapsed();
    for v6 in [false, true] {
        w.nodes[public].ping(&st_spoke, v6, deadline.left(Duration::from_secs(30)));
    }
    assert_reaches_via(&w.nodes[public].current(), &st_spoke, "relay2");
    let via2 = relayed(&w.nodes[r2]);
    assert!(via2.0 >= 8, "relay2 did not carry the pings: {via2:?}");

    // relay1 comes back on its state (no token): everyone moves back to it.
    let restarted = Instant::now();
    w.start(r1, false);
    w.nodes[spoke].wait_only_peer("relay1", deadline.left(Duration::from_secs(60)));
    let back = restarted.elapsed();
    let again = running(&w, r1);
    assert_eq!(again.device.id, id1, "relay1 came back as another device");
    assert!(device(&devices(&w.coord), "relay1").online);
    both_ways(&w, Duration::from_secs(30));
    let reached_back = restarted.elapsed();
    assert_reaches_via(&w.nodes[public].current(), &st_spoke, "relay1");
    let via1 = relayed(&w.nodes[r1]);
    assert!(
        via1.0 >= 8,
        "the restarted relay1 did not carry the pings: {via1:?}"
    );
    eprintln!(
        "second_relay_takes_over: kill -> spoke on relay2 {switched:?}, -> pings again \
         {reached:?}; restart -> spoke on relay1 {back:?}, -> pings both ways {reached_back:?}"
    );
}

/// Runs `ping` from `ns` to `addr` every 200 ms until dropped.
fn ping_forever(ns: &Netns, addr: &str) -> Proc {
    use common::DieWithParent;
    let child = ns
        .cmd(&["ping", "-q", "-n", "-i", "0.2", addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .die_with_parent()
        .spawn()
        .expect("spawn ping");
    Proc(Some(child))
}

/// The public port `router` maps `node_ip`'s UDP flow to `dst_ip` on, if it has one.
fn mapped_port(router: &Netns, node_ip: Ipv4Addr, dst_ip: Ipv4Addr) -> Option<u16> {
    let out = router.ok(&["conntrack", "-L", "-p", "udp", "-s", &node_ip.to_string()]);
    // udp 17 29 src=192.0.2.2 dst=203.0.113.12 sport=51820 dport=40123 src=203.0.113.12
    //   dst=203.0.113.11 sport=40123 dport=51820 [ASSURED] mark=0 use=1
    out.lines()
        .filter(|l| l.contains(&format!(" dst={dst_ip} ")))
        .find_map(|l| {
            let dports: Vec<&str> = l
                .split_whitespace()
                .filter_map(|f| f.strip_prefix("dport="))
                .collect();
            dports.get(1)?.parse().ok()
        })
}

/// Two endpoint-independent sites meshed directly; their routers forget every
/// connection (`conntrack -F`) while pings run both ways: the pings recover and the
/// path stays direct.
#[test]
fn conntrack_flush_recovers() {
    let deadline = Deadline::after(Duration::from_secs(170));
    let mut w = World::new("ctf");
    let relay = w.public(RELAY, "203.0.113.2/24", &["--relay"]);
    let s1 = w.behind_nat(
        "site1",
        "203.0.113.11/24",
        "192.0.2.0/26",
        Nat::EndpointIndependent,
    );
    let s2 = w.behind_nat(
        "site2",
        "203.0.113.12/24",
        "192.0.2.64/26",
        Nat::EndpointIndependent,
    );
    for i in 0..w.nodes.len() {
        w.start(i, true);
    }
    let st1 = w.nodes[s1].wait_peers(&["site2"], deadline.left(Duration::from_secs(40)));
    let st2 = w.nodes[s2].wait_peers(&["site1"], deadline.left(Duration::from_secs(40)));
    let wan1 = Ipv4Addr::new(203, 0, 113, 11);
    let wan2 = Ipv4Addr::new(203, 0, 113, 12);
    let node1 = Ipv4Addr::new(192, 0, 2, 2);
    let assert_direct = |w: &World, bound: Duration| {
        for (a, b, b_st, b_wan) in [(s1, s2, &st2, wan2), (s2, s1, &st1, wan1)] {
            let p = wait_direct(
                &w.nodes[a],
                &b_st.device.public_key,
                &w.nodes[b].name,
                deadline.left(bound),
            );
            assert_eq!(
                p.endpoint.map(|e| e.ip()),
                Some(IpAddr::V4(b_wan)),
                "{}: {p:?}",
                w.nodes[a].name
            );
        }
    };
    w.nodes[s1].ping(&st2, false, deadline.left(Duration::from_secs(30)));
    w.nodes[s2].ping(&st1, false, deadline.left(Duration::from_secs(30)));
    assert_direct(&w, Duration::from_secs(30));

    // Pings run both ways through the flushes.
    let _pings = [
        ping_forever(&w.nodes[s1].ns, &tunnel_addr(&st2, false)),
        ping_forever(&w.nodes[s2].ns, &tunnel_addr(&st1, false)),
        ping_forever(&w.nodes[s1].ns, &tunnel_addr(&st2, true)),
        ping_forever(&w.nodes[s2].ns, &tunnel_addr(&st1, true)),
    ];
    let relay_before = relayed(&w.nodes[relay]);
    let (gw1, gw2) = (&w.routers[0], &w.routers[1]);
    let port_before = wait_until(
        "site1's router to track the flow to site2",
        deadline.left(Duration::from_secs(10)),
        || mapped_port(gw1, node1, wan2),
    );

    let mut report = Vec::new();
    for (what, routers) in [
        ("site1's router", vec![gw1]),
        ("both routers", vec![gw1, gw2]),
    ] {
        let flushed = Instant::now();
        for r in &routers {
            r.ok(&["conntrack", "-F"]);
        }
        let bound = Duration::from_secs(60);
        for (a, b_st) in [(s2, &st1), (s1, &st2)] {
            for v6 in [false, true] {
                w.nodes[a].ping(b_st, v6, deadline.left(bound));
            }
        }
        let recovered = flushed.elapsed();
        assert!(recovered <= bound, "recovery took {recovered:?}");
        let port = wait_until(
            "site1's router to track the flow to site2 again",
            deadline.left(Duration::from_secs(10)),
            || mapped_port(gw1, node1, wan2),
        );
        assert_direct(&w, Duration::from_secs(10));
        report.push(format!(
            "{what}: recovered in {recovered:?}, site1 mapped port {port_before} -> {port}"
        ));
    }
    // Nothing took the relay meanwhile, and both still hold their coordinator link.
    assert_eq!(
        relayed(&w.nodes[relay]),
        relay_before,
        "the relay carried traffic"
    );
    for i in [s1, s2] {
        assert!(
            w.nodes[i].current().coordinator_connected,
            "{} lost the coordinator",
            w.nodes[i].name
        );
    }
    eprintln!("conntrack_flush_recovers: {}", report.join("; "));
}
