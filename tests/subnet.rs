//! End-to-end: subnet routers (`nexodus join --advertise-cidr`). An "internet" bridge
//! (203.0.113.0/24) holds the coordinator, a relay and the nodes; the router node has a
//! second veth to a LAN namespace holding 198.51.100.0/24 and 2001:db8:100::/64. The
//! LAN host has no default route, only (where a test says so) return routes to the
//! mesh prefixes via the router. Nothing routes out of the test's namespaces. Needs
//! root.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::cluster::{Cluster, Node, has_peers};
use common::netns::Netns;
use common::{BIN, Deadline, proc, wait_until};
use ipnet::IpNet;
use nexodus::join::status::{PeerStatus, Status};

const COORD: &str = "203.0.113.1:4443";
const LAN_V4: &str = "198.51.100.0/24";
const LAN_V6: &str = "2001:db8:100::/64";
const ROUTER_LAN_V4: &str = "198.51.100.1";
const ROUTER_LAN_V6: &str = "2001:db8:100::1";
const LAN_HOST_V4: &str = "198.51.100.10";
const LAN_HOST_V6: &str = "2001:db8:100::10";
const ADVERTISE: &str = "198.51.100.0/24,2001:db8:100::/64";
/// The router's hostname: distinctive, so a message naming it is unambiguous.
const ROUTER: &str = "subnet-gw";
const RELAY: &str = "relay";

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// True when `routes` (`ip route` output) routes `prefix` into the tunnel.
fn routed_to_nx0(routes: &str, prefix: &str) -> bool {
    let want = format!("{prefix} dev nx0");
    routes
        .lines()
        .any(|l| l == want || l.starts_with(&format!("{want} ")))
}

/// Waits until `node` routes both LAN prefixes into the tunnel.
fn wait_lan_routes(node: &Node, timeout: Duration) {
    node.wait_routes("routes for both LAN prefixes via nx0", timeout, |v4, v6| {
        routed_to_nx0(v4, LAN_V4) && routed_to_nx0(v6, LAN_V6)
    });
}

fn link_names(ns: &Netns) -> Vec<String> {
    ns.ok(&["ip", "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn sysctl(ns: &Netns, key: &str) -> String {
    ns.ok(&["sysctl", "-n", key]).trim().to_string()
}

fn peer<'a>(s: &'a Status, hostname: &str) -> Option<&'a PeerStatus> {
    s.peers.iter().find(|p| p.hostname == hostname)
}

/// The peer `hostname` lists every prefix of `nets` among its allowed IPs.
fn peer_carries(s: &Status, hostname: &str, nets: &[&str]) -> bool {
    peer(s, hostname).is_some_and(|p| nets.iter().all(|n| p.allowed_ips.contains(&net(n))))
}

/// No peer of `s` carries either advertised prefix.
fn nobody_carries_lan(s: &Status) -> bool {
    s.peers
        .iter()
        .all(|p| !p.allowed_ips.contains(&net(LAN_V4)) && !p.allowed_ips.contains(&net(LAN_V6)))
}

/// The internet bridge with the coordinator at 203.0.113.1 and a reusable token, and
/// the router's node (not started) at 203.0.113.3; with the router's index.
fn world(tag: &str) -> (Cluster, usize) {
    let mut w = Cluster::new(tag, "203.0.113.1/24");
    let router = w.add_node(ROUTER, "203.0.113.3/24", true, &[]);
    (w, router)
}

/// Gives node `router` a LAN: `lan0` (198.51.100.1/24, 2001:db8:100::1/64) to a
/// host `nx-<tag>-lanh` (198.51.100.10/24, 2001:db8:100::10/64) with no default
/// route; with `return_routes` the host routes the mesh prefixes via the router.
fn lan_site(w: &mut Cluster, router: usize, return_routes: bool, deadline: Deadline) -> usize {
    let host = w.lan.netns("lanh");
    let r = &w.nodes[router].ns;
    r.ok(&[
        "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &host.name,
    ]);
    // No duplicate address detection: the addresses are usable at once.
    r.ok(&["sysctl", "-qw", "net.ipv6.conf.lan0.accept_dad=0"]);
    host.ok(&["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
    for (ns, dev, v4, v6) in [
        (r, "lan0", ROUTER_LAN_V4, ROUTER_LAN_V6),
        (&host, "eth0", LAN_HOST_V4, LAN_HOST_V6),
    ] {
        ns.ok(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
        ns.ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            dev,
            "nodad",
        ]);
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
    if return_routes {
        host.ok(&["ip", "route", "add", "100.64.0.0/10", "via", ROUTER_LAN_V4]);
        host.ok(&["ip", "-6", "route", "add", "200::/64", "via", ROUTER_LAN_V6]);
    }
    for ns in [r, &host] {
        wait_until(
            &format!("IPv6 addresses of {} to leave tentative", ns.name),
            deadline.left(Duration::from_secs(10)),
            || {
                ns.ok(&["ip", "-6", "addr", "show", "tentative"])
                    .trim()
                    .is_empty()
                    .then_some(())
            },
        );
    }
    // The LAN itself works, and leads nowhere else.
    assert!(r.ping_until(LAN_HOST_V4, deadline.left(Duration::from_secs(10))));
    assert!(r.ping_until(LAN_HOST_V6, deadline.left(Duration::from_secs(10))));
    for fam in ["-4", "-6"] {
        let routes = host.ok(&["ip", fam, "route"]);
        assert!(!routes.contains("default"), "{routes}");
    }
    w.aux.push(host);
    w.aux.len() - 1
}

#[test]
fn subnet_router_dual_stack() {
    let deadline = Deadline::after(Duration::from_secs(170));
    let (mut w, router) = world("snr");
    let relay = w.add_node(RELAY, "203.0.113.2/24", true, &[]);
    let direct = w.add_node("direct", "203.0.113.4/24", true, &[]);
    let spoke = w.add_node("spoke", "203.0.113.5/24", true, &[]);
    let v4only = w.add_node("v4only", "203.0.113.6/24", false, &[]);
    let lanh = lan_site(&mut w, router, true, deadline);

    w.start_with(relay, &["--relay"]);
    w.start_with(router, &["--advertise-cidr", ADVERTISE]);
    // Peers install the prefixes only once an admin approved them.
    w.approve_routes(router, ADVERTISE);
    w.start(direct);
    w.start_with(spoke, &["--relay-only"]);
    w.start(v4only);

    // Every peer routes the advertised prefixes into the mesh (v4-only: the v4 one).
    let cap = Duration::from_secs(40);
    w.nodes[direct].wait_status(
        "router peer carrying both LAN prefixes",
        deadline.left(cap),
        |s| has_peers(s, &[RELAY, "v4only"]) && peer_carries(s, ROUTER, &[LAN_V4, LAN_V6]),
    );
    wait_lan_routes(&w.nodes[direct], deadline.left(cap));
    let st_spoke = w.nodes[spoke].wait_status(
        "the relay as only peer, carrying both LAN prefixes",
        deadline.left(cap),
        |s| s.peers.len() == 1 && peer_carries(s, RELAY, &[LAN_V4, LAN_V6]),
    );
    assert!(st_spoke.device.tunnel_ip_v6.is_some());
    wait_lan_routes(&w.nodes[spoke], deadline.left(cap));
    let st_v4 = w.nodes[v4only].wait_status(
        "router peer carrying the v4 LAN prefix",
        deadline.left(cap),
        |s| peer_carries(s, ROUTER, &[LAN_V4]),
    );
    assert!(!st_v4.device.ipv6_supported);
    let rp = peer(&st_v4, ROUTER).unwrap();
    assert!(
        rp.allowed_ips.iter().all(|n| n.addr().is_ipv4()),
        "v4-only node got v6 allowed IPs for the router: {:?}",
        rp.allowed_ips
    );
    w.nodes[v4only].wait_routes(
        "a route for the v4 LAN prefix via nx0",
        deadline.left(cap),
        |v4, _| routed_to_nx0(v4, LAN_V4),
    );
    let (_, v6) = w.nodes[v4only].routes();
    assert!(
        !v6.contains("2001:db8:100"),
        "v4-only node has a v6 LAN route: {v6}"
    );

    // The router forwards both families; a plain node does not.
    let rns = &w.nodes[router].ns;
    wait_until(
        "the router to enable IPv4 and IPv6 forwarding",
        deadline.left(Duration::from_secs(10)),
        || {
            (sysctl(rns, "net.ipv4.ip_forward") == "1"
                && sysctl(rns, "net.ipv6.conf.all.forwarding") == "1")
                .then_some(())
        },
    );
    assert_eq!(sysctl(&w.nodes[direct].ns, "net.ipv4.ip_forward"), "0");

    // The LAN host answers the direct node, the relay-only spoke and the v4-only node.
    let ping_cap = Duration::from_secs(30);
    for (i, v6) in [(direct, true), (spoke, true), (v4only, false)] {
        w.nodes[i].ping(LAN_HOST_V4, deadline.left(ping_cap));
        if v6 {
            w.nodes[i].ping(LAN_HOST_V6, deadline.left(ping_cap));
        }
    }
    // The spoke's pings went through the relay: it is still its only peer.
    let st = w.nodes[spoke].status().unwrap();
    assert!(
        st.peers.len() == 1 && peer(&st, RELAY).is_some(),
        "the relay-only spoke peers directly: {:?}",
        st.peers
    );

    // No masquerade without --masquerade: the LAN host needs its return route.
    let host = &w.aux[lanh];
    host.ok(&["ip", "route", "del", "100.64.0.0/10"]);
    assert!(
        !w.nodes[direct].ns.ping(LAN_HOST_V4),
        "LAN host answered without a route back to the mesh: the router masquerades"
    );
    host.ok(&["ip", "route", "add", "100.64.0.0/10", "via", ROUTER_LAN_V4]);
    w.nodes[direct].ping(LAN_HOST_V4, deadline.left(ping_cap));

    // The router restarts without --advertise-cidr (no token: its state dir has the
    // credential): the prefixes are withdrawn everywhere.
    w.nodes[router].stop_within(deadline.left(Duration::from_secs(10)));
    w.nodes[router].start(None);
    w.nodes[router].wait_status(
        "to run again",
        deadline.left(Duration::from_secs(30)),
        |s| has_peers(s, &["direct"]),
    );
    let gone = |v4: &str, v6: &str| !v4.contains("198.51.100.") && !v6.contains("2001:db8:100:");
    for i in [direct, spoke, v4only] {
        w.nodes[i].wait_routes(
            "the LAN routes to disappear",
            deadline.left(Duration::from_secs(30)),
            gone,
        );
        w.nodes[i].wait_status(
            "no peer carrying a LAN prefix",
            deadline.left(Duration::from_secs(10)),
            nobody_carries_lan,
        );
    }
    let d = w.coord.device(ROUTER).unwrap();
    assert!(d.advertise_cidrs.is_empty(), "{:?}", d.advertise_cidrs);
    assert!(
        !w.nodes[direct].ns.ping(LAN_HOST_V4),
        "LAN host still reached after the prefixes were withdrawn"
    );
    assert!(
        !w.nodes[direct].ns.ping(LAN_HOST_V6),
        "LAN host still reached over v6 after the prefixes were withdrawn"
    );
    // The router itself is still a peer.
    let st_router = w.nodes[router].status().unwrap();
    w.nodes[direct].ping(
        &st_router.device.tunnel_ip.to_string(),
        deadline.left(ping_cap),
    );
}

#[test]
fn subnet_router_masquerade() {
    let deadline = Deadline::after(Duration::from_secs(120));
    let (mut w, router) = world("snm");
    let direct = w.add_node("direct", "203.0.113.4/24", true, &[]);
    // The LAN host has no route back to the mesh at all.
    lan_site(&mut w, router, false, deadline);
    w.start_with(router, &["--advertise-cidr", ADVERTISE, "--masquerade"]);
    w.approve_routes(router, ADVERTISE);
    w.start(direct);
    wait_lan_routes(&w.nodes[direct], deadline.left(Duration::from_secs(40)));
    let rns = &w.nodes[router].ns;
    wait_until(
        "an nftables masquerade rule on the router",
        deadline.left(Duration::from_secs(10)),
        || {
            rns.ok(&["nft", "list", "ruleset"])
                .contains("masquerade")
                .then_some(())
        },
    );
    let cap = Duration::from_secs(30);
    w.nodes[direct].ping(LAN_HOST_V4, deadline.left(cap));
    w.nodes[direct].ping(LAN_HOST_V6, deadline.left(cap));
}

/// Runs `nexodus join` with `--advertise-cidr value` in `ns` with a fresh state dir;
/// it must refuse within seconds, with `message` on stderr, having changed nothing.
fn assert_refused_locally(w: &Cluster, ns: &Netns, value: &str, message: &str) {
    let dir = tempfile::tempdir_in(w.scratch("refused")).unwrap();
    let mut cmd = ns.cmd(&[BIN, "join", COORD, "--token", &w.token]);
    cmd.args(["--hostname", "val", "--interface", "nxval0", "--state-dir"])
        .arg(dir.path())
        .args(["--advertise-cidr", value]);
    let what = format!("--advertise-cidr {value}");
    let stderr = proc::assert_fails_within(cmd, Duration::from_secs(10), &what);
    assert!(
        stderr.contains(message),
        "--advertise-cidr {value}: expected {message:?} in: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "--advertise-cidr {value}: state dir written before the refusal: {left:?}"
    );
    let links = link_names(ns);
    assert!(
        !links.iter().any(|l| l.starts_with("nx")),
        "--advertise-cidr {value}: interface created: {links:?}"
    );
}

/// `node` was started with a prefix overlapping the router's: the coordinator refuses
/// it, naming the router, and the node exits without making its interface.
fn assert_overlap_refused(node: &mut Node, deadline: Deadline) {
    let code = node
        .exit_within(deadline.left(Duration::from_secs(30)))
        .expect("node with an overlapping prefix still running");
    assert!(!code.success());
    let log = node.log_text();
    assert!(
        log.contains("advertised by device") && log.contains(ROUTER),
        "refusal does not name the router: {log}"
    );
    assert!(!link_names(&node.ns).iter().any(|l| l == "nx0"));
}

#[test]
fn advertise_cidr_input_is_validated() {
    let deadline = Deadline::after(Duration::from_secs(120));
    let (mut w, router) = world("snv");
    let ovl = w.add_node("ovl", "203.0.113.4/24", true, &[]);
    let late = w.add_node("late", "203.0.113.5/24", true, &[]);
    // Refused by the CLI itself, before any state or contact: run on the bridge with a
    // real coordinator and token, so a missing check would show (state, interface).
    let val = w.lan.host("val", "203.0.113.9/24", true);
    for (value, message) in [
        ("198.51.100.5/24", "did you mean 198.51.100.0/24"),
        ("2001:db8:100::5/64", "did you mean 2001:db8:100::/64"),
        ("0.0.0.0/0", "default route"),
        ("::/0", "default route"),
        ("198.51.100.0/24,0.0.0.0/0", "default route"),
        ("198.51.100.0/33", "invalid value"),
        ("198.51.100.0", "invalid value"),
        ("not-a-prefix", "invalid value"),
    ] {
        assert_refused_locally(&w, &val, value, message);
    }
    assert!(
        w.coord.device("val").is_none(),
        "a refused node reached the coordinator: {:?}",
        w.coord.devices()
    );

    // Overlap with another device's prefix: refused by the coordinator, naming it.
    w.start_with(router, &["--advertise-cidr", ADVERTISE]);
    w.nodes[router].wait_status("to run", deadline.left(Duration::from_secs(30)), |_| true);
    let d = w.coord.device(ROUTER).unwrap();
    assert_eq!(d.advertise_cidrs, vec![net(LAN_V4), net(LAN_V6)]);

    // A new device registering with an overlapping prefix.
    w.start_with(ovl, &["--advertise-cidr", "198.51.100.128/25"]);
    assert_overlap_refused(&mut w.nodes[ovl], deadline);
    assert!(w.coord.device("ovl").is_none());

    // A registered device that starts advertising an overlapping prefix.
    w.start(late);
    w.nodes[late].wait_status(
        "the router as peer",
        deadline.left(Duration::from_secs(30)),
        |s| has_peers(s, &[ROUTER]),
    );
    w.nodes[late].stop_within(deadline.left(Duration::from_secs(10)));
    w.nodes[late].start_with(None, &["--advertise-cidr", "2001:db8:100::/48"]);
    assert_overlap_refused(&mut w.nodes[late], deadline);
    let d = w.coord.device("late").unwrap();
    assert!(d.advertise_cidrs.is_empty(), "{:?}", d.advertise_cidrs);
    // The router keeps its prefixes.
    let d = w.coord.device(ROUTER).unwrap();
    assert_eq!(d.advertise_cidrs, vec![net(LAN_V4), net(LAN_V6)]);
}
