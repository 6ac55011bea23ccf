//! End-to-end: exit nodes (DESIGN §8). The underlay bridge (203.0.113.0/24,
//! 2001:db8:e0::/64) holds the coordinator, an exit, a client ("laptop"), a mesh
//! peer and a router; behind the router is "the internet", a server at 198.51.100.10
//! and 2001:db8:100::10 that answers each UDP datagram with the source address it
//! saw and remembers every one. The exit and the laptop have default routes (both
//! families) via the router, so a leak would arrive from the laptop's own address.
//! Namespaces `nx-ex-*`. Needs root.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::cluster::{Cluster, tunnel_addr};
use common::netns::{Netns, in_ns};
use common::probe::EchoServer;
use common::wait_until;
use nexodus::node::mesh::ExitState;

const SERVER_V4: &str = "198.51.100.10:7007";
const SERVER_V6: &str = "[2001:db8:100::10]:7007";
const EXIT_V4: &str = "203.0.113.10";
const EXIT_V6: &str = "2001:db8:e0::10";
const LAPTOP_V4: &str = "203.0.113.20";
const LAPTOP_V6: &str = "2001:db8:e0::20";
const EXIT: &str = "exit1";

/// One request from `ns` to `server`: the source address the server saw, or None
/// (no answer within 400 ms, or the send was refused: an unreachable route).
fn ask(ns: &Netns, server: &str) -> Option<IpAddr> {
    let server: SocketAddr = server.parse().unwrap();
    in_ns(&ns.name, move || {
        let bind: SocketAddr = if server.is_ipv6() {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(400))).ok()?;
        s.send_to(b"who am i", server).ok()?;
        let mut buf = [0u8; 128];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        let seen: SocketAddr = std::str::from_utf8(&buf[..n]).ok()?.parse().ok()?;
        Some(seen.ip())
    })
}

/// Waits until `ns`'s requests to `server` arrive from `want`.
fn wait_from(ns: &Netns, server: &str, want: &str, timeout: Duration) {
    let want: IpAddr = want.parse().unwrap();
    wait_until(
        &format!("{server} sees {want} from {}", ns.name),
        timeout,
        || (ask(ns, server) == Some(want)).then_some(()),
    );
}

/// Several requests from `ns` to `server`, none answered.
fn assert_blocked(ns: &Netns, server: &str, what: &str) {
    for _ in 0..3 {
        let got = ask(ns, server);
        assert_eq!(
            got, None,
            "{what}: a request to {server} got out as {got:?}"
        );
    }
}

/// Nothing arrived at the server from the laptop's own addresses after the first
/// `since` requests (the topology check before nexodus ran).
fn assert_no_leak(server: &EchoServer, since: usize, what: &str) {
    let leaked: Vec<SocketAddr> = server
        .seen()
        .into_iter()
        .skip(since)
        .filter(|s| s.ip().to_string() == LAPTOP_V4 || s.ip().to_string() == LAPTOP_V6)
        .collect();
    assert!(
        leaked.is_empty(),
        "{what}: leaked from the laptop's uplink: {leaked:?}"
    );
}

/// Our rules (priorities 5265-5273) and our table's routes, both families.
fn policy_state(ns: &Netns) -> (Vec<String>, Vec<String>) {
    let mut rules = Vec::new();
    let mut routes = Vec::new();
    for fam in ["-4", "-6"] {
        rules.extend(
            ns.ok(&["ip", fam, "rule", "show"])
                .lines()
                .filter(|l| l.starts_with("526") || l.starts_with("527"))
                .map(|l| format!("{fam} {l}")),
        );
        routes.extend(
            ns.ok(&["ip", fam, "route", "show", "table", "28280"])
                .lines()
                .map(|l| format!("{fam} {l}")),
        );
    }
    (rules, routes)
}

/// A host on the bridge with a v6 underlay address and, if `gateway`, default
/// routes via the router for both families.
fn underlay_v6(ns: &Netns, v6: &str, gateway: bool) {
    ns.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    if gateway {
        ns.ok(&["ip", "route", "add", "default", "via", "203.0.113.254"]);
        ns.ok(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:e0::fe",
        ]);
    }
}

#[test]
fn exit_carries_both_families_and_fails_closed() {
    let mut c = Cluster::new("ex", "203.0.113.1/24");
    // The router and the internet behind it.
    let rt = c.lan.host("rt", "203.0.113.254/24", true);
    rt.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8:e0::fe/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let inet = c.lan.netns("inet");
    rt.ok(&[
        "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &inet.name,
    ]);
    rt.ok(&["ip", "addr", "add", "198.51.100.1/24", "dev", "lan0"]);
    rt.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8:100::1/64",
        "dev",
        "lan0",
        "nodad",
    ]);
    rt.ok(&["ip", "link", "set", "lan0", "up"]);
    rt.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    rt.ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    inet.ok(&["ip", "addr", "add", "198.51.100.10/24", "dev", "eth0"]);
    inet.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8:100::10/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    inet.ok(&["ip", "link", "set", "eth0", "up"]);
    inet.ok(&["ip", "route", "add", "default", "via", "198.51.100.1"]);
    inet.ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:100::1",
    ]);
    let server = EchoServer::start(&inet, &[SERVER_V4, SERVER_V6]);
    c.aux.push(inet);
    c.aux.push(rt);

    let exit = c.add_node(EXIT, &format!("{EXIT_V4}/24"), true, &["--exit-node"]);
    let laptop = c.add_node(
        "laptop",
        &format!("{LAPTOP_V4}/24"),
        true,
        &["--use-exit-node", EXIT],
    );
    let peer = c.add_node("peer", "203.0.113.30/24", true, &[]);
    underlay_v6(&c.nodes[exit].ns, EXIT_V6, true);
    underlay_v6(&c.nodes[laptop].ns, LAPTOP_V6, true);
    // A loose reverse-path filter, as systemd sets it: peers' answers must still get
    // in while everything else is routed into the tunnel (or, exit down, nowhere).
    for key in ["all", "eth0"] {
        c.nodes[laptop]
            .ns
            .ok(&["sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=2")]);
    }
    underlay_v6(&c.nodes[peer].ns, "2001:db8:e0::30", false);
    // The topology works without nexodus: the laptop's own address, both families.
    wait_from(
        &c.nodes[laptop].ns,
        SERVER_V4,
        LAPTOP_V4,
        Duration::from_secs(10),
    );
    wait_from(
        &c.nodes[laptop].ns,
        SERVER_V6,
        LAPTOP_V6,
        Duration::from_secs(10),
    );
    let before = server.seen().len();

    c.start(exit);
    c.start(peer);
    c.start(laptop);
    let t = Duration::from_secs(20);
    c.nodes[laptop].wait_named(&["peer", EXIT], t);
    c.nodes[peer].wait_named(&["laptop", EXIT], t);

    // Not approved yet: the exit is not used, and nothing leaks.
    c.nodes[laptop].wait_status("exit not approved", t, |s| {
        s.exit_node
            .as_ref()
            .is_some_and(|e| e.state == ExitState::NotApproved)
    });
    assert_blocked(&c.nodes[laptop].ns, SERVER_V4, "unapproved exit, v4");
    assert_blocked(&c.nodes[laptop].ns, SERVER_V6, "unapproved exit, v6");
    assert!(server.seen().len() == before, "{:?}", server.seen());
    // The coordinator stays reachable, and so do mesh peers.
    assert!(c.nodes[laptop].current().coordinator_connected);
    let peer_st = c.nodes[peer].current();
    c.nodes[laptop].ping_node(&peer_st, false, t);
    c.nodes[laptop].ping_node(&peer_st, true, t);

    // Approved: both families leave with the exit's addresses.
    c.approve(exit, &["--exit"]);
    c.nodes[laptop].wait_status("exit active", t, |s| {
        s.exit_node
            .as_ref()
            .is_some_and(|e| e.state == ExitState::Active)
    });
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, EXIT_V6, t);
    let text = c.nodes[laptop].status_text();
    assert!(text.contains("exit node: exit1 active"), "{text}");
    // Ordinary peers never install the exit's routes.
    let (v4, v6) = c.nodes[peer].routes();
    assert!(
        !v4.contains("default") && !v6.contains("default"),
        "{v4}{v6}"
    );
    assert!(c.nodes[peer].current().exit_node.is_none());
    // Mesh peers and the coordinator stay reachable.
    c.nodes[laptop].ping_node(&peer_st, false, t);
    c.nodes[laptop].ping_node(&peer_st, true, t);
    let exit_st = c.nodes[exit].current();
    c.nodes[laptop].ping(&tunnel_addr(&exit_st, true), t);
    assert!(c.nodes[laptop].current().coordinator_connected);
    assert_no_leak(&server, before, "through the exit");

    // The exit dies: both families fail, nothing leaks, until it is back.
    c.nodes[exit].kill();
    assert_blocked(&c.nodes[laptop].ns, SERVER_V4, "exit killed, v4");
    assert_blocked(&c.nodes[laptop].ns, SERVER_V6, "exit killed, v6");
    c.nodes[laptop].wait_status("exit offline", Duration::from_secs(60), |s| {
        s.exit_node
            .as_ref()
            .is_some_and(|e| e.state == ExitState::Offline)
    });
    assert_blocked(&c.nodes[laptop].ns, SERVER_V4, "exit offline, v4");
    assert_blocked(&c.nodes[laptop].ns, SERVER_V6, "exit offline, v6");
    c.nodes[laptop].ping_node(&peer_st, false, t);
    assert_no_leak(&server, before, "exit killed");
    c.start(exit);
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, EXIT_V6, t);

    // The laptop is SIGKILLed: its rules stay (still failing closed); the next start
    // cleans them up and installs one set.
    let (rules, _) = policy_state(&c.nodes[laptop].ns);
    assert!(!rules.is_empty());
    c.nodes[laptop].kill();
    assert_blocked(&c.nodes[laptop].ns, SERVER_V4, "laptop killed, v4");
    assert_blocked(&c.nodes[laptop].ns, SERVER_V6, "laptop killed, v6");
    assert_no_leak(&server, before, "laptop killed");
    c.start(laptop);
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, EXIT_V6, t);
    assert_no_leak(&server, before, "laptop restarted");
    let (again, _) = policy_state(&c.nodes[laptop].ns);
    assert_eq!(
        again, rules,
        "a restart after SIGKILL leaves exactly one set of rules"
    );

    // A v4-only exit: v4 goes through it, v6 is blocked, not leaked.
    c.nodes[exit].stop();
    c.nodes[exit]
        .ns
        .ok(&["ip", "-6", "route", "del", "default"]);
    c.start(exit);
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    assert_blocked(&c.nodes[laptop].ns, SERVER_V6, "v4-only exit, v6");
    assert_no_leak(&server, before, "v4-only exit");

    // A clean stop leaves nothing behind, on the laptop and on the exit.
    c.nodes[laptop].stop();
    let (rules, routes) = policy_state(&c.nodes[laptop].ns);
    assert!(
        rules.is_empty() && routes.is_empty(),
        "{rules:?} {routes:?}"
    );
    c.nodes[exit].stop();
    let tables = c.nodes[exit].ns.ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("nexodus"), "{tables}");
    // Without the exit, the laptop's own uplink works again.
    wait_from(&c.nodes[laptop].ns, SERVER_V4, LAPTOP_V4, t);
}
