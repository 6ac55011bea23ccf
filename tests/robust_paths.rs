//! Robustness of the data path, after the WireGuard selftest scenarios, against the
//! real binary in network namespaces: endpoint roaming without the coordinator,
//! persistent keepalives through a NAT that forgets UDP flows after 2 s, the inner
//! source check against a stock WireGuard peer that spoofs, a peer endpoint routed
//! into the tunnel itself, and restart/link-flap churn with resource-leak checks.
//! Needs root, nftables, wireguard-go and wireguard-tools.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Deadline;
use common::cluster::{Cluster, Node, wait_until};
use common::netns::{Nat, Netns};
use common::proc::Proc;
use common::stock::stock_host;
use nexodus::join::status::{PeerStatus, Status};

const PING_WAIT: Duration = Duration::from_secs(30);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn peer<'a>(s: &'a Status, key: &str) -> Option<&'a PeerStatus> {
    s.peers.iter().find(|p| p.public_key == key)
}

fn drops(s: &Status, reason: &str) -> u64 {
    s.drops.get(reason).copied().unwrap_or(0)
}

fn total_drops(s: &Status) -> u64 {
    s.drops.values().sum()
}

/// Waits until `viewer` lists the peer with key `key` at endpoint `want`.
fn wait_endpoint(viewer: &Node, key: &str, want: SocketAddr, timeout: Duration) -> Status {
    wait_until(
        &format!("{} to show the peer at {want}", viewer.name),
        timeout,
        || {
            viewer
                .status()
                .filter(|s| peer(s, key).and_then(|p| p.endpoint) == Some(want))
        },
    )
}

/// `ping -D -i 0.2` running in a namespace, its output (receive times of the
/// replies) in a log file.
struct PingFlow {
    _proc: Proc,
    log: PathBuf,
}

impl PingFlow {
    fn start(ns: &Netns, addr: &str, log: PathBuf) -> Self {
        let proc = Proc::spawn(
            ns.cmd(&["ping", "-D", "-n", "-i", "0.2", addr]),
            log.clone(),
        );
        Self { _proc: proc, log }
    }

    /// Unix times at which echo replies arrived.
    fn replies(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect()
    }

    fn first_reply_after(&self, t: f64) -> Option<f64> {
        self.replies().into_iter().find(|&r| r > t)
    }
}

/// Open fds, threads and resident memory of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Usage {
        fds,
        threads: field("Threads:") as usize,
        rss_kib: field("VmRSS:"),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Roaming: the peer learns a new endpoint from authenticated packets alone.

const ROAM_NAT_PORT: u16 = 51999;

/// A's own namespace turns into a NAT: its WireGuard datagrams leave from
/// `nat_port`, and, as behind a real NAT, nothing reaches the real port directly.
fn port_nat_ruleset(port: u16, nat_port: u16) -> String {
    format!(
        "table ip rproamnat {{\n\
         \tchain pre {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tiifname \"eth0\" udp dport {port} drop\n\
         \t}}\n\
         \tchain post {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"eth0\" udp sport {port} masquerade to :{nat_port}\n\
         \t}}\n\
         }}\n"
    )
}

/// Seconds from `start` until the ping flow got a reply that left A after
/// `changed` (an echo round trip here takes well under `IN_FLIGHT`).
fn recovery(flow: &PingFlow, start: f64, changed: f64, what: &str, d: Deadline) -> f64 {
    const IN_FLIGHT: f64 = 0.05;
    let r = wait_until(
        &format!("pings from B to resume after {what}"),
        d.left(Duration::from_secs(20)),
        || flow.first_reply_after(changed + IN_FLIGHT),
    );
    r - start
}

#[test]
fn roaming() {
    let d = Deadline::after(Duration::from_secs(170));
    let mut c = Cluster::new("rproam", "203.0.113.1/24");
    let a = c.add_node(
        "a",
        "203.0.113.3/24",
        true,
        &["--keepalive", "1", "--interface", "rproama0"],
    );
    let b = c.add_node("b", "203.0.113.4/24", true, &["--interface", "rproamb0"]);
    c.start(a);
    c.start(b);
    let sa = c.nodes[a].wait_peer_count(1, d.left(PING_WAIT));
    c.nodes[b].wait_peer_count(1, d.left(PING_WAIT));
    let a_ip = sa.device.tunnel_ip.to_string();
    let a_key = sa.device.public_key.clone();
    let port = sa.device.listen_port;
    assert!(
        c.nodes[b].ns.ping_until(&a_ip, d.left(PING_WAIT)),
        "B cannot ping A"
    );
    let old: SocketAddr = format!("203.0.113.3:{port}").parse().unwrap();
    wait_endpoint(&c.nodes[b], &a_key, old, d.left(Duration::from_secs(10)));

    // From here on only the data plane can tell B where A is.
    c.coord.kill();
    let flow = PingFlow::start(
        &c.nodes[b].ns,
        &a_ip,
        c.scratch("logs").join("ping-b-to-a.log"),
    );
    wait_until(
        "the ping flow to get replies",
        d.left(Duration::from_secs(20)),
        || flow.first_reply_after(0.0),
    );

    // A new underlay address, same port.
    let ns_a = &c.nodes[a].ns;
    let t0 = unix_now();
    ns_a.ok(&["ip", "addr", "del", "203.0.113.3/24", "dev", "eth0"]);
    ns_a.ok(&["ip", "addr", "add", "203.0.113.33/24", "dev", "eth0"]);
    let changed = unix_now();
    assert!(
        !ns_a.ok(&["ip", "-4", "route"]).contains("default"),
        "a route out of the test"
    );
    let rec_addr = recovery(&flow, t0, changed, "A's address change", d);
    let moved: SocketAddr = format!("203.0.113.33:{port}").parse().unwrap();
    wait_endpoint(&c.nodes[b], &a_key, moved, d.left(Duration::from_secs(10)));
    let text = c.nodes[b].status_text();
    assert!(text.contains(&moved.to_string()), "{text}");

    // A new source port as seen by B; the process keeps its listen port.
    let t1 = unix_now();
    ns_a.ok_with_stdin(&["nft", "-f", "-"], &port_nat_ruleset(port, ROAM_NAT_PORT));
    let changed = unix_now();
    let rec_port = recovery(&flow, t1, changed, "A's port change", d);
    let mapped: SocketAddr = format!("203.0.113.33:{ROAM_NAT_PORT}").parse().unwrap();
    wait_endpoint(&c.nodes[b], &a_key, mapped, d.left(Duration::from_secs(10)));
    let text = c.nodes[b].status_text();
    assert!(text.contains(&mapped.to_string()), "{text}");
    assert_eq!(c.nodes[a].current().device.listen_port, port);
    // And both ways: A reaches B through its NAT.
    let b_ip = c.nodes[b].current().device.tunnel_ip.to_string();
    assert!(
        c.nodes[a]
            .ns
            .ping_until(&b_ip, d.left(Duration::from_secs(10))),
        "A cannot ping B after roaming"
    );
    eprintln!(
        "roaming: pings B->A resumed {rec_addr:.2} s after A's address change, \
         {rec_port:.2} s after its port change (A keepalive 1 s)"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Persistent keepalive keeps a node behind a forgetful NAT reachable.

/// Whether a router's conntrack table holds a UDP flow to `dst`:`dport`.
fn has_flow(router: &Netns, dst: &str, dport: u16) -> bool {
    router
        .ok(&["cat", "/proc/net/nf_conntrack"])
        .lines()
        .any(|l| {
            l.contains(" udp ")
                && l.contains(&format!(" dst={dst} "))
                && l.contains(&format!(" dport={dport} "))
        })
}

#[test]
fn nat_keepalive() {
    let d = Deadline::after(Duration::from_secs(170));
    let mut c = Cluster::new("rpnat", "203.0.113.1/24");
    let p = c.add_node("p", "203.0.113.2/24", true, &["--interface", "rpnatp0"]);
    // k1 keeps its mapping open with a keepalive every second; k0 has none.
    let s1 = c.lan.nat_site(
        "k1",
        "203.0.113.11/24",
        "192.0.2.0/26",
        Nat::EndpointIndependent,
    );
    let s0 = c.lan.nat_site(
        "k0",
        "203.0.113.12/24",
        "192.0.2.64/26",
        Nat::EndpointIndependent,
    );
    let (r1, r0) = (s1.router, s0.router);
    for r in [&r1, &r0] {
        r.ok(&["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=2"]);
        r.ok(&[
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout_stream=2",
        ]);
    }
    let k1 = c.add_node_in(
        "k1",
        s1.node,
        &["--keepalive", "1", "--interface", "rpnatk1"],
    );
    let k0 = c.add_node_in(
        "k0",
        s0.node,
        &["--keepalive", "0", "--interface", "rpnatk0"],
    );
    for i in [p, k1, k0] {
        c.start(i);
    }
    let sp = c.nodes[p].wait_peer_count(2, d.left(Duration::from_secs(40)));
    let s_k1 = c.nodes[k1].wait_peer_count(2, d.left(Duration::from_secs(40)));
    let s_k0 = c.nodes[k0].wait_peer_count(2, d.left(Duration::from_secs(40)));
    let (p_ip, p_port) = (sp.device.tunnel_ip.to_string(), sp.device.listen_port);
    let k1_ip = s_k1.device.tunnel_ip.to_string();
    let k0_ip = s_k0.device.tunnel_ip.to_string();
    let ping = |from: usize, to: &str, t: Duration| c.nodes[from].ns.ping_until(to, d.left(t));

    // k1 opens its mapping by itself; k0 only once it sends something.
    assert!(
        ping(p, &k1_ip, PING_WAIT),
        "P cannot reach k1 behind its NAT"
    );
    assert!(ping(k0, &p_ip, PING_WAIT), "k0 cannot ping P");
    assert!(
        ping(p, &k0_ip, Duration::from_secs(10)),
        "P cannot reach k0 right after k0 spoke"
    );
    let sp = c.nodes[p].current();
    for (s, wan) in [(&s_k1, "203.0.113.11"), (&s_k0, "203.0.113.12")] {
        let ep = peer(&sp, &s.device.public_key).and_then(|x| x.endpoint);
        assert_eq!(
            ep.map(|e| e.ip()),
            Some(wan.parse::<IpAddr>().unwrap()),
            "P does not reach {} at its NAT mapping",
            s.device.hostname
        );
    }

    // No user traffic for 10 s: k0's mapping towards P expires (2 s), k1's does not.
    let idle_from = Instant::now();
    wait_until(
        "k0's NAT to forget its flow to P",
        d.left(Duration::from_secs(20)),
        || (!has_flow(&r0, "203.0.113.2", p_port)).then_some(()),
    );
    let idle = Duration::from_secs(10);
    std::thread::sleep(idle.saturating_sub(idle_from.elapsed()));
    assert!(
        has_flow(&r1, "203.0.113.2", p_port),
        "k1's NAT forgot its flow to P despite --keepalive 1:\n{}",
        r1.ok(&["cat", "/proc/net/nf_conntrack"])
    );
    assert!(
        !has_flow(&r0, "203.0.113.2", p_port),
        "k0's flow to P came back without traffic"
    );

    let idled = idle_from.elapsed();
    let t = Instant::now();
    assert!(
        c.nodes[p]
            .ns
            .try_run(&["ping", "-c", "1", "-W", "2", &k1_ip]),
        "after 10 s idle, P's ping to k1 (keepalive 1 s) behind a 2 s NAT went unanswered"
    );
    let k1_answer = t.elapsed();
    // Negative control: without the keepalive the same ping cannot get in.
    assert!(
        !ping(p, &k0_ip, Duration::from_secs(5)),
        "P reached k0 (keepalive off) through an expired NAT mapping: \
         something other than the keepalive keeps it open"
    );
    // And k0 is otherwise fine: once it speaks, P gets in again.
    assert!(ping(k0, &p_ip, Duration::from_secs(15)), "k0 cannot ping P");
    assert!(
        ping(p, &k0_ip, Duration::from_secs(10)),
        "P cannot reach k0 after it spoke again"
    );
    eprintln!(
        "nat_keepalive: after {idled:.1?} idle behind a 2 s UDP NAT timeout, P reached k1 \
         (keepalive 1 s) in {k1_answer:.2?}; k0 (keepalive off) unreachable for 5 s"
    );
    drop((r1, r0));
}

// ---------------------------------------------------------------------------------------
// 3. Inner source check against a stock WireGuard peer.

#[test]
fn reverse_path_filter() {
    let d = Deadline::after(Duration::from_secs(170));
    let mut c = Cluster::new("rprpf", "203.0.113.1/24");
    let relay = c.add_relay("relay", "203.0.113.2/24", "rprpfr0");
    c.start(relay);
    c.nodes[relay].wait_peer_count(0, d.left(PING_WAIT));

    let (_config, stock, _wggo) = stock_host(
        &mut c,
        "203.0.113.5/24",
        "rprpfs0",
        d.left(Duration::from_secs(10)),
    );

    let sr = c.nodes[relay].wait_peer_count(1, d.left(PING_WAIT));
    let relay_v4 = sr.device.tunnel_ip.to_string();
    let relay_v6 = sr.device.tunnel_ip_v6.unwrap().to_string();
    assert!(
        stock.ping_until(&relay_v4, d.left(PING_WAIT)),
        "stock peer cannot ping the relay"
    );
    assert!(
        stock.ping_until(&relay_v6, d.left(PING_WAIT)),
        "stock peer cannot ping the relay over v6"
    );
    let before = c.nodes[relay].current();
    let stock_peer = before
        .peers
        .iter()
        .find(|p| p.hostname == "stock")
        .unwrap()
        .clone();

    // Spoofed inner sources, outside the stock peer's allowed IPs: inside the
    // organization's prefixes, but nobody's (v4), and not its own (v6).
    let spoof_v4 = "100.127.0.9";
    let spoof_v6 = "200::ffff:9";
    for a in stock_peer.allowed_ips.iter() {
        for s in [spoof_v4, spoof_v6] {
            assert!(!a.contains(&s.parse::<IpAddr>().unwrap()), "{a} has {s}");
        }
    }
    stock.ok(&[
        "ip",
        "addr",
        "add",
        &format!("{spoof_v4}/32"),
        "dev",
        "rprpfs0",
    ]);
    stock.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{spoof_v6}/128"),
        "dev",
        "rprpfs0",
        "nodad",
    ]);
    const SPOOFED: u64 = 3;
    let count = SPOOFED.to_string();
    assert!(
        !stock.try_run(&[
            "ping", "-c", &count, "-i", "0.2", "-W", "1", "-I", spoof_v4, &relay_v4
        ]),
        "a ping from a spoofed v4 source was answered"
    );
    assert!(
        !stock.try_run(&[
            "ping", "-6", "-c", &count, "-i", "0.2", "-W", "1", "-I", spoof_v6, &relay_v6
        ]),
        "a ping from a spoofed v6 source was answered"
    );
    let after = wait_until(
        "the relay to count the spoofed packets as bad_source",
        d.left(Duration::from_secs(10)),
        || {
            c.nodes[relay]
                .status()
                .filter(|s| drops(s, "bad_source") >= drops(&before, "bad_source") + 2 * SPOOFED)
        },
    );
    // The legitimate pings still work, v4 and v6.
    assert!(
        stock.ping_until(&relay_v4, d.left(Duration::from_secs(10))),
        "stock peer lost the relay after spoofing"
    );
    assert!(
        stock.ping_until(&relay_v6, d.left(Duration::from_secs(10))),
        "stock peer lost the relay (v6) after spoofing"
    );
    let again = c.nodes[relay].current();
    assert_eq!(
        drops(&again, "bad_source"),
        drops(&after, "bad_source"),
        "legitimate packets counted as bad_source"
    );
    eprintln!(
        "reverse_path_filter: relay bad_source {} -> {} after {} spoofed echo requests; \
         legitimate pings still answered",
        drops(&before, "bad_source"),
        drops(&after, "bad_source"),
        2 * SPOOFED
    );
}

// ---------------------------------------------------------------------------------------
// 4. A peer's endpoint routed into the tunnel itself.

/// What A did while pinging a peer whose endpoint is routed into A's own tunnel.
struct LoopRun {
    cores: f64,
    /// Drops by reason before and after.
    drops: (Status, Status),
    /// Bytes A sent to the peer per echo request.
    bytes_per_request: u64,
}

const LOOP_PINGS: u64 = 25;

/// Routes `underlay` into A's tunnel, pings `peer_ip` from A, measures, and takes
/// the route away again.
fn loop_run(a: &mut Node, iface: &str, underlay: &str, peer_key: &str, peer_ip: &str) -> LoopRun {
    let route = ["ip", "route", "add", underlay, "dev", iface];
    a.ns.ok(&route);
    let before = a.current();
    let pid = a.pid();
    let (cpu0, t0) = (common::cpu_ticks(pid).expect("node alive"), Instant::now());
    let count = LOOP_PINGS.to_string();
    // Bounded: 25 requests 0.2 s apart, one second for the last answer.
    let answered =
        a.ns.try_run(&["ping", "-c", &count, "-i", "0.2", "-W", "1", peer_ip]);
    let cores = (common::cpu_ticks(pid).expect("node alive") - cpu0) as f64
        / common::clock_ticks_per_sec()
        / t0.elapsed().as_secs_f64();
    assert!(
        !answered,
        "{peer_ip} answered through a route into A's own tunnel"
    );
    assert!(a.alive(), "A died with {underlay} routed into its tunnel");
    let after = a.current();
    a.ns.ok(&["ip", "route", "del", underlay, "dev", iface]);
    let tx = |s: &Status| peer(s, peer_key).map_or(0, |p| p.tx_bytes);
    LoopRun {
        cores,
        bytes_per_request: (tx(&after) - tx(&before)) / LOOP_PINGS,
        drops: (before, after),
    }
}

#[test]
fn routing_loop() {
    let d = Deadline::after(Duration::from_secs(170));
    let mut c = Cluster::new("rploop", "203.0.113.1/24");
    let a = c.add_node("a", "203.0.113.3/24", true, &["--interface", "rploopa0"]);
    let b = c.add_node("b", "203.0.113.4/24", true, &["--interface", "rploopb0"]);
    // A subnet router whose advertised prefix holds its own endpoint: its peers route
    // their datagrams to it into their own tunnels, where its allowed IPs send them
    // round again.
    let s = c.add_node(
        "s",
        "203.0.113.5/24",
        true,
        &[
            "--interface",
            "rploops0",
            "--advertise-cidr",
            "203.0.113.5/32",
        ],
    );
    for i in [a, b, s] {
        c.start(i);
    }
    // An admin approved it (peers carry only approved prefixes).
    c.approve_routes(s, "203.0.113.5/32");
    let sa = c.nodes[a].wait_peer_count(2, d.left(PING_WAIT));
    let sb = c.nodes[b].wait_peer_count(2, d.left(PING_WAIT));
    let ss = c.nodes[s].wait_peer_count(2, d.left(PING_WAIT));
    let a_ip = sa.device.tunnel_ip.to_string();
    let (b_ip, b_key) = (
        sb.device.tunnel_ip.to_string(),
        sb.device.public_key.clone(),
    );
    let (s_ip, s_key) = (
        ss.device.tunnel_ip.to_string(),
        ss.device.public_key.clone(),
    );
    // A refuses to route S's advertised prefix: it holds S's own endpoint, so the
    // route would loop. S's allowed IPs keep it; A and S have a session.
    let routes = wait_until(
        "A to route S's tunnel address",
        d.left(Duration::from_secs(10)),
        || {
            let r = c.nodes[a].ns.ok(&["ip", "-4", "route"]);
            r.contains(&format!("{s_ip} dev rploopa0")).then_some(r)
        },
    );
    assert!(
        !routes.contains("203.0.113.5 dev rploopa0"),
        "A routed a prefix over S's endpoint: {routes}"
    );
    for (from, to) in [(a, &b_ip), (b, &a_ip), (a, &s_ip)] {
        assert!(
            c.nodes[from].ns.ping_until(to, d.left(PING_WAIT)),
            "{} cannot ping {to} ({routes})",
            c.nodes[from].name
        );
    }

    // B's endpoint routed into A's tunnel, outside every allowed IP: each datagram
    // comes back once and is dropped.
    let to_b = loop_run(&mut c.nodes[a], "rploopa0", "203.0.113.4/32", &b_key, &b_ip);
    // S's endpoint routed into A's tunnel, inside S's allowed IPs: each datagram is
    // encrypted again until it no longer fits.
    let to_s = loop_run(&mut c.nodes[a], "rploopa0", "203.0.113.5/32", &s_key, &s_ip);
    for (name, r) in [("B", &to_b), ("S", &to_s)] {
        let (before, after) = &r.drops;
        assert!(
            total_drops(after) > total_drops(before),
            "looped datagrams to {name} were not counted as drops: {:?} -> {:?}",
            before.drops,
            after.drops
        );
        assert!(
            total_drops(after) - total_drops(before) < 100 * LOOP_PINGS,
            "drops ran away in the loop to {name}: {:?} -> {:?}",
            before.drops,
            after.drops
        );
        // An echo request grows by at least 32 bytes a round: under 64 KiB in all
        // before it exceeds the MTU.
        assert!(
            r.bytes_per_request < 64 * 1024,
            "A's transmit to {name} ran away: {} bytes per echo request",
            r.bytes_per_request
        );
        assert!(
            r.cores < 0.9,
            "A used {:.2} cores with {name}'s endpoint routed into its tunnel",
            r.cores
        );
    }

    // The bad routes are gone: A reaches B and S again, both ways.
    for (from, to) in [(a, &b_ip), (b, &a_ip), (a, &s_ip), (s, &a_ip)] {
        assert!(
            c.nodes[from].ns.ping_until(to, d.left(PING_WAIT)),
            "{} cannot ping {to} after the loop route went",
            c.nodes[from].name
        );
    }
    for (name, r) in [("B (no allowed IP)", &to_b), ("S (own allowed IP)", &to_s)] {
        eprintln!(
            "routing_loop: endpoint of {name} routed into A's tunnel: {LOOP_PINGS} pings, \
             A used {:.3} cores, drops {:?} -> {:?}, {} bytes sent per echo request",
            r.cores, r.drops.0.drops, r.drops.1.drops, r.bytes_per_request
        );
    }
}

// ---------------------------------------------------------------------------------------
// 5. Restart and link-flap churn: no leaks on the long-running node.

/// Processes with `arg` as one of their command-line arguments.
fn processes_with(arg: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).into_owned();
        if cmd.split('\0').any(|a| a == arg) {
            out.push((pid, cmd));
        }
    }
    out
}

fn bridge_ports(hub: &Netns) -> usize {
    hub.ok(&["ip", "-o", "link", "show", "master", "br0"])
        .lines()
        .count()
}

#[test]
fn churn_and_leaks() {
    const CYCLES: usize = 50;
    let d = Deadline::after(Duration::from_secs(175));
    let mut c = Cluster::new("rpchurn", "203.0.113.1/24");
    let l = c.add_node("l", "203.0.113.3/24", true, &["--interface", "rpchurnl0"]);
    let ch = c.add_node("c", "203.0.113.4/24", true, &["--interface", "rpchurnc0"]);
    c.start(l);
    c.start(ch);
    let sl = c.nodes[l].wait_peer_count(1, d.left(PING_WAIT));
    let sc = c.nodes[ch].wait_peer_count(1, d.left(PING_WAIT));
    let l_ip = sl.device.tunnel_ip.to_string();
    let c_ip = sc.device.tunnel_ip.to_string();
    assert!(c.nodes[ch].ns.ping_until(&l_ip, d.left(PING_WAIT)));
    let l_pid = c.nodes[l].pid();

    let mut baseline = None;
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for cycle in 0..CYCLES {
        d.check(&format!("churn cycle {cycle}"));
        let t = Instant::now();
        // Restart C (SIGTERM, then without the token).
        c.nodes[ch].stop();
        c.nodes[ch].start(None);
        c.nodes[ch].wait_peer_count(1, d.left(PING_WAIT));
        assert!(
            c.nodes[ch]
                .ns
                .ping_until(&l_ip, d.left(Duration::from_secs(20))),
            "cycle {cycle}: restarted C cannot ping L"
        );
        // Flap C's underlay link.
        c.nodes[ch].ns.ok(&["ip", "link", "set", "eth0", "down"]);
        c.nodes[ch].ns.ok(&["ip", "link", "set", "eth0", "up"]);
        assert!(
            c.nodes[l]
                .ns
                .ping_until(&c_ip, d.left(Duration::from_secs(20))),
            "cycle {cycle}: L cannot ping C after its link flapped"
        );
        // L's status and UAPI sockets answer every cycle (and must not leak either).
        let st = c.nodes[l].current();
        assert!(
            peer(&st, &sc.device.public_key).is_some_and(|p| p.last_handshake_secs.is_some()),
            "cycle {cycle}: L lost C: {:?}",
            st.peers
        );
        let wg = Command::new("wg")
            .args(["show", "rpchurnl0", "dump"])
            .output()
            .unwrap();
        assert!(
            wg.status.success()
                && String::from_utf8_lossy(&wg.stdout).contains(&sc.device.public_key),
            "cycle {cycle}: wg show on L: {}",
            String::from_utf8_lossy(&wg.stderr)
        );
        assert!(c.nodes[l].alive(), "cycle {cycle}: L died");
        slowest = slowest.max(t.elapsed());
        // Warm-up cycles first: lazily made buffers and threads are not leaks.
        if cycle == 2 {
            baseline = Some(usage(l_pid));
        }
    }
    let churn = started.elapsed();
    let base = baseline.unwrap();
    // Idle blocking-pool threads and closing connections take a moment to go.
    let after = wait_until(
        "L's fds, threads and memory to return to their baseline",
        d.left(Duration::from_secs(20)),
        || {
            let u = usage(l_pid);
            (u.fds <= base.fds + 2
                && u.threads <= base.threads + 2
                && u.rss_kib <= base.rss_kib + 10 * 1024)
                .then_some(u)
        },
    );
    eprintln!(
        "churn_and_leaks: {CYCLES} cycles in {churn:.1?} (slowest {slowest:.1?}); L fds {} -> {}, \
         threads {} -> {}, RSS {} KiB -> {} KiB",
        base.fds, after.fds, base.threads, after.threads, base.rss_kib, after.rss_kib
    );

    // C's namespace goes while its tunnel is live: everything in it is killed and the
    // namespace deleted, as the harness does.
    assert!(
        c.nodes[ch]
            .ns
            .ping_until(&l_ip, d.left(Duration::from_secs(10)))
    );
    let c_dir = c.nodes[ch].dir.clone();
    let c_ns = c.nodes[ch].ns.name.clone();
    let ports = bridge_ports(&c.lan.hub);
    let mut c_child = c.nodes[ch].child.take().unwrap();
    drop(c.nodes.remove(ch));
    let code = wait_until(
        "C to die with its namespace",
        d.left(Duration::from_secs(10)),
        || c_child.try_wait().unwrap(),
    );
    assert!(!code.success(), "C exited cleanly: {code:?}");
    let stray = processes_with(c_dir.to_str().unwrap());
    assert!(stray.is_empty(), "stray processes of C: {stray:?}");
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(&c_ns),
        "{c_ns} still listed"
    );
    // Nothing pins the namespace: it is destroyed, and its veth with it.
    wait_until(
        "C's namespace (and its veth on the bridge) to be destroyed",
        d.left(Duration::from_secs(10)),
        || (bridge_ports(&c.lan.hub) == ports - 1).then_some(()),
    );
    // L keeps running and answering, C still listed (still registered), unreachable.
    assert!(c.nodes[l].alive(), "L died when C's namespace went");
    let sl = c.nodes[l].current();
    assert_eq!(sl.peers.len(), 1, "{:?}", sl.peers);
    assert!(
        !c.nodes[l].ns.ping(&c_ip),
        "C answered from a deleted namespace"
    );
    assert!(c.nodes[l].alive(), "L died pinging the vanished C");
    let u = usage(l_pid);
    assert!(
        u.fds <= base.fds + 2 && u.threads <= base.threads + 2,
        "L after C vanished: {u:?} vs baseline {base:?}"
    );
}
