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
/// Another exit, with a lower id than [`EXIT`] (relayed-client test).
const OTHER_EXIT_V4: &str = "203.0.113.11";
const OTHER_EXIT_V6: &str = "2001:db8:e0::11";
const LAN_V4: &str = "192.0.2.10:7007";
const LAN_V6: &str = "[2001:db8:5::10]:7007";

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

/// The router on the bridge (203.0.113.254, 2001:db8:e0::fe) and "the internet"
/// behind it: the echo server at [`SERVER_V4`] and [`SERVER_V6`].
fn internet(c: &mut Cluster) -> EchoServer {
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

    server
}

/// A LAN behind node `ns` (`lan0`, 192.0.2.1/24 and 2001:db8:5::1/64 on its side)
/// holding a host with an echo server at [`LAN_V4`] and [`LAN_V6`], whose default
/// routes point back at the node.
fn lan_behind(c: &mut Cluster, node: usize) -> EchoServer {
    let host = c.lan.netns("lanh");
    let ns = &c.nodes[node].ns;
    ns.ok(&[
        "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &host.name,
    ]);
    ns.ok(&["ip", "addr", "add", "192.0.2.1/24", "dev", "lan0"]);
    ns.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8:5::1/64",
        "dev",
        "lan0",
        "nodad",
    ]);
    ns.ok(&["ip", "link", "set", "lan0", "up"]);
    host.ok(&["ip", "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    host.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8:5::10/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    host.ok(&["ip", "link", "set", "eth0", "up"]);
    host.ok(&["ip", "route", "add", "default", "via", "192.0.2.1"]);
    host.ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:5::1",
    ]);
    let server = EchoServer::start(&host, &[LAN_V4, LAN_V6]);
    c.aux.push(host);
    server
}

/// Counts, in `ns`, what leaves its uplink `eth0` for the internet (the echo
/// server's prefixes), both families: a leak shows as packets here.
fn count_uplink(ns: &Netns) {
    ns.ok_with_stdin(
        &["nft", "-f", "-"],
        "table inet nxexleak {\n  chain post {\n    type filter hook postrouting priority 0; policy accept;\n    oifname \"eth0\" ip daddr 198.51.100.0/24 counter\n    oifname \"eth0\" ip6 daddr 2001:db8:100::/64 counter\n  }\n}\n",
    );
}

/// Packets [`count_uplink`] counted, per family.
fn uplink_packets(ns: &Netns) -> Vec<u64> {
    ns.ok(&["nft", "list", "chain", "inet", "nxexleak", "post"])
        .split("packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A strict reverse-path filter, as many distributions set it.
fn strict_rp_filter(ns: &Netns) {
    for key in ["all", "default", "eth0"] {
        ns.ok(&["sysctl", "-qw", &format!("net.ipv4.conf.{key}.rp_filter=1")]);
    }
}

#[test]
fn exit_carries_both_families_and_fails_closed() {
    let mut c = Cluster::new("ex", "203.0.113.1/24");
    let server = internet(&mut c);

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
    // A strict reverse-path filter: peers' datagrams must still get in while
    // everything else is routed into the tunnel (or, exit down, nowhere).
    strict_rp_filter(&c.nodes[laptop].ns);
    let valid_mark = "net.ipv4.conf.all.src_valid_mark";
    c.nodes[laptop]
        .ns
        .ok(&["sysctl", "-qw", &format!("{valid_mark}=0")]);
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
    count_uplink(&c.nodes[laptop].ns);

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

    assert!(
        c.nodes[laptop].ns.ok(&["sysctl", "-n", valid_mark]).trim() == "1",
        "src_valid_mark is set while an exit is used"
    );

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
    let tables = c.nodes[laptop].ns.ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("nexodus"), "{tables}");
    assert_eq!(
        c.nodes[laptop].ns.ok(&["sysctl", "-n", valid_mark]).trim(),
        "0",
        "src_valid_mark is put back"
    );
    // Nothing for the internet left the laptop's uplink while nexodus ran.
    assert!(
        uplink_packets(&c.nodes[laptop].ns).iter().all(|&n| n == 0),
        "{:?}",
        uplink_packets(&c.nodes[laptop].ns)
    );
    // Without the exit, the laptop's own uplink works again.
    wait_from(&c.nodes[laptop].ns, SERVER_V4, LAPTOP_V4, t);
}

/// A client behind the relay only (`--relay-only`, as behind a symmetric NAT)
/// reaches the internet through relay and the exit it chose (not the other,
/// lower-id exit), both families, under a strict reverse-path filter; with its
/// exit gone its requests are dropped (not sent through the other exit), and
/// nothing leaves its own uplink.
#[test]
fn a_relayed_client_uses_the_exit_through_the_relay() {
    let mut c = Cluster::new("exr", "203.0.113.1/24");
    let server = internet(&mut c);
    let relay = c.add_relay("relay", "203.0.113.5/24", "nxexr");
    let other = c.add_node(
        "exita",
        &format!("{OTHER_EXIT_V4}/24"),
        true,
        &["--exit-node"],
    );
    let exit = c.add_node(EXIT, &format!("{EXIT_V4}/24"), true, &["--exit-node"]);
    let laptop = c.add_node(
        "laptop",
        &format!("{LAPTOP_V4}/24"),
        true,
        &["--relay-only", "--use-exit-node", EXIT],
    );
    underlay_v6(&c.nodes[relay].ns, "2001:db8:e0::5", false);
    underlay_v6(&c.nodes[other].ns, OTHER_EXIT_V6, true);
    underlay_v6(&c.nodes[exit].ns, EXIT_V6, true);
    underlay_v6(&c.nodes[laptop].ns, LAPTOP_V6, true);
    strict_rp_filter(&c.nodes[laptop].ns);
    let ten = Duration::from_secs(10);
    wait_from(&c.nodes[laptop].ns, SERVER_V4, LAPTOP_V4, ten);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, LAPTOP_V6, ten);
    let before = server.seen().len();
    count_uplink(&c.nodes[laptop].ns);

    c.start(relay);
    // The other exit registers first: the lowest id, the one a relay used to pick.
    c.start(other);
    c.approve(other, &["--exit"]);
    c.start(exit);
    c.start(laptop);
    c.approve(exit, &["--exit"]);
    let t = Duration::from_secs(30);
    c.nodes[laptop].wait_status("exit active through the relay", t, |s| {
        s.exit_node
            .as_ref()
            .is_some_and(|e| e.state == ExitState::Active)
    });
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, EXIT_V6, t);
    assert!(
        c.nodes[relay].current().relayed_packets > 0,
        "the relay carried it"
    );
    assert_no_leak(&server, before, "relayed, through the exit");

    // With a policy, the internet needs a rule whose `to` is "internet" (the exit
    // enforces it on what the relay brings).
    let file = c.scratch("policy").join("policy.toml");
    let mesh_only = "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\n";
    std::fs::write(&file, mesh_only).unwrap();
    c.coord.admin(&["policy", "set", file.to_str().unwrap()]);
    wait_until("the policy blocks the internet", t, || {
        (ask(&c.nodes[laptop].ns, SERVER_V4).is_none()
            && ask(&c.nodes[laptop].ns, SERVER_V6).is_none())
        .then_some(())
    });
    assert_blocked(
        &c.nodes[laptop].ns,
        SERVER_V4,
        "policy without internet, v4",
    );
    assert_blocked(
        &c.nodes[laptop].ns,
        SERVER_V6,
        "policy without internet, v6",
    );
    std::fs::write(
        &file,
        format!("{mesh_only}\n[[allow]]\nfrom = [\"laptop\"]\nto = [\"internet\"]\n"),
    )
    .unwrap();
    c.coord.admin(&["policy", "set", file.to_str().unwrap()]);
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, EXIT_V6, t);
    assert_no_leak(&server, before, "relayed, policy");

    // The exit dies: dropped on both families, never leaked nor sent through the
    // other exit, until it is back.
    let killed_at = server.seen().len();
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
    assert_no_leak(&server, before, "relayed, exit killed");
    let via_other: Vec<SocketAddr> = server
        .seen()
        .into_iter()
        .skip(killed_at)
        .filter(|s| [OTHER_EXIT_V4, OTHER_EXIT_V6].contains(&s.ip().to_string().as_str()))
        .collect();
    assert!(
        via_other.is_empty(),
        "exit killed: sent through the other exit: {via_other:?}"
    );
    c.start(exit);
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, EXIT_V6, t);
    let counted = uplink_packets(&c.nodes[laptop].ns);
    assert!(
        counted.len() == 2 && counted.iter().all(|&n| n == 0),
        "left the laptop's uplink for the internet: {counted:?}"
    );
    assert_no_leak(&server, before, "relayed");
}

/// One node is both the exit and a subnet router: the client reaches the LAN by
/// its own route (longest prefix, whether the exit role is approved or not) and
/// the internet through the exit, both families.
#[test]
fn an_exit_that_also_routes_a_subnet() {
    let mut c = Cluster::new("exs", "203.0.113.1/24");
    let server = internet(&mut c);
    let exit = c.add_node(
        EXIT,
        &format!("{EXIT_V4}/24"),
        true,
        &[
            "--exit-node",
            "--advertise-cidr",
            "192.0.2.0/24,2001:db8:5::/64",
        ],
    );
    let laptop = c.add_node(
        "laptop",
        &format!("{LAPTOP_V4}/24"),
        true,
        &["--use-exit-node", EXIT],
    );
    underlay_v6(&c.nodes[exit].ns, EXIT_V6, true);
    underlay_v6(&c.nodes[laptop].ns, LAPTOP_V6, true);
    let lan = lan_behind(&mut c, exit);
    strict_rp_filter(&c.nodes[laptop].ns);
    let before = server.seen().len();

    c.start(exit);
    c.start(laptop);
    let t = Duration::from_secs(30);
    c.nodes[laptop].wait_named(&[EXIT], t);
    c.approve_routes(exit, "192.0.2.0/24,2001:db8:5::/64");
    let me = c.nodes[laptop].current();
    let (me4, me6) = (tunnel_addr(&me, false), tunnel_addr(&me, true));
    // The subnet alone: the LAN answers the laptop's tunnel addresses, the
    // internet stays dropped.
    wait_from(&c.nodes[laptop].ns, LAN_V4, &me4, t);
    wait_from(&c.nodes[laptop].ns, LAN_V6, &me6, t);
    assert_blocked(&c.nodes[laptop].ns, SERVER_V4, "exit not approved, v4");
    assert_blocked(&c.nodes[laptop].ns, SERVER_V6, "exit not approved, v6");

    // Both: the internet leaves through the exit, the LAN keeps its route.
    c.approve(exit, &["--exit"]);
    wait_from(&c.nodes[laptop].ns, SERVER_V4, EXIT_V4, t);
    wait_from(&c.nodes[laptop].ns, SERVER_V6, EXIT_V6, t);
    for (server, want) in [(LAN_V4, &me4), (LAN_V6, &me6)] {
        let want: IpAddr = want.parse().unwrap();
        assert_eq!(ask(&c.nodes[laptop].ns, server), Some(want), "{server}");
    }
    assert!(lan.seen().len() >= 4);
    let text = c.nodes[laptop].status_text();
    assert!(text.contains("exit node: exit1 active"), "{text}");
    assert_no_leak(&server, before, "exit and subnet");
}
