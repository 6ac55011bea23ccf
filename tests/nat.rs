//! End-to-end: NAT traversal and relaying. An "internet" bridge (203.0.113.0/24) holds
//! the coordinator, a relay and a public node; sites sit behind nftables NAT routers
//! (endpoint-independent `masquerade`, or symmetric `masquerade fully-random`) on LANs
//! from 192.0.2.0/24. Nothing routes out of the test's namespaces. Needs root.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Node, tunnel_addr};
use common::netns::{Lan, Nat, NatSite, Netns};
use common::probe::{self, EchoServer};
use common::proc::Proc;
use common::{Deadline, wait_until};
use ipnet::IpNet;
use nexodus::join::status::{PeerStatus, Status};
use nexodus::wire::control::Device;

const COORD: &str = "203.0.113.1";
const RELAY: &str = "relay";

/// The two sites behind endpoint-independent NATs: name, WAN address, LAN.
const CONE_SITES: [(&str, &str, &str); 2] = [
    ("site1", "203.0.113.11/24", "192.0.2.0/26"),
    ("site2", "203.0.113.12/24", "192.0.2.64/26"),
];

const PROBE_PORT: u16 = 40000;

/// The public addresses one local port of `site` gets towards each of `servers`.
fn mappings(site: &NatSite, servers: &[SocketAddr]) -> Vec<SocketAddr> {
    let m = probe::mappings(&site.node, PROBE_PORT, servers, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("probe from {} failed: {e}", site.node.name));
    assert_eq!(m.len(), 3, "{m:?}");
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
fn punch(a: &NatSite, a_peer: SocketAddr, b: &NatSite, b_peer: SocketAddr, secs: u64) -> bool {
    let limit = Duration::from_secs(secs);
    let (ok_a, ok_b) = std::thread::scope(|s| {
        let pa = s.spawn(|| probe::punch(&a.node, PROBE_PORT, a_peer, limit));
        let pb = s.spawn(|| probe::punch(&b.node, PROBE_PORT, b_peer, limit));
        (pa.join().unwrap(), pb.join().unwrap())
    });
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
    let [s1, s2] =
        CONE_SITES.map(|(name, wan, net)| lan.nat_site(name, wan, net, Nat::EndpointIndependent));
    let sy = lan.nat_site("sy", "203.0.113.13/24", "192.0.2.128/26", Nat::Symmetric);
    let _echo1 = EchoServer::start(&e1, &["203.0.113.3:5001", "203.0.113.3:5002"]);
    let _echo2 = EchoServer::start(&e2, &["203.0.113.4:5001"]);

    // One local port towards two ports of one host and a second host.
    let servers = ["203.0.113.3:5001", "203.0.113.3:5002", "203.0.113.4:5001"]
        .map(|a| a.parse::<SocketAddr>().unwrap());
    let [m1, m2, msy] = std::thread::scope(|s| {
        [&s1, &s2, &sy]
            .map(|site| s.spawn(|| mappings(site, &servers)))
            .map(|h| h.join().unwrap())
    });
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

/// Nodes site1 and site2 behind endpoint-independent NATs ([`CONE_SITES`]).
fn cone_sites(w: &mut Cluster) -> (usize, usize) {
    let [s1, s2] = CONE_SITES
        .map(|(name, wan, net)| w.add_behind_nat(name, wan, net, Nat::EndpointIndependent));
    (s1, s2)
}

/// The relay (203.0.113.2) and a public node "pub" (.3) on the internet.
fn relay_and_public(w: &mut Cluster) -> (usize, usize) {
    let relay = w.add_node(RELAY, "203.0.113.2/24", true, &["--relay"]);
    (relay, w.add_node("pub", "203.0.113.3/24", true, &[]))
}

/// The internet bridge with the coordinator at 203.0.113.1.
fn world(tag: &str) -> Cluster {
    Cluster::new(tag, &format!("{COORD}/24"))
}

/// Every node pings every other over v4 and v6.
fn ping_all(w: &Cluster, st: &[Status], deadline: Deadline) {
    for (i, from) in w.nodes.iter().enumerate() {
        for (j, to) in st.iter().enumerate() {
            if i != j {
                from.ping_node(to, false, deadline.left(Duration::from_secs(30)));
                from.ping_node(to, true, deadline.left(Duration::from_secs(30)));
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
        spoke.ping_node(t, false, deadline.left(Duration::from_secs(30)));
        spoke.ping_node(t, true, deadline.left(Duration::from_secs(30)));
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

/// Waits until node `a` lists node `b` (status `b_st`) on a direct path with a
/// handshake, and checks that path leads to `b_wan`, the public address of `b`'s NAT.
fn assert_direct(
    w: &Cluster,
    a: usize,
    b: usize,
    b_st: &Status,
    b_wan: Ipv4Addr,
    timeout: Duration,
) {
    let (a, b_name, b_key) = (&w.nodes[a], &w.nodes[b].name, &b_st.device.public_key);
    let peer = wait_until(
        &format!("{} to reach {b_name} directly", a.name),
        timeout,
        || {
            let s = a.status()?;
            let p = s.peers.into_iter().find(|p| p.public_key == *b_key)?;
            (p.path == "direct" && p.last_handshake_secs.is_some()).then_some(p)
        },
    );
    assert_eq!(
        peer.endpoint.map(|e| e.ip()),
        Some(IpAddr::V4(b_wan)),
        "{}: direct path to {b_name} is not its NAT's public address: {peer:?}",
        a.name,
    );
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

/// The nodes of `nat_traversal_and_relay`: a relay and a public node on the internet,
/// two sites behind endpoint-independent NATs, one behind a symmetric NAT.
#[derive(Clone, Copy)]
struct Ntr {
    relay: usize,
    public: usize,
    s1: usize,
    s2: usize,
    sym: usize,
}

#[test]
fn nat_traversal_and_relay() {
    let deadline = Deadline::after(Duration::from_secs(180));
    let mut w = world("ntr");
    let (relay, public) = relay_and_public(&mut w);
    let (s1, s2) = cone_sites(&mut w);
    let sym = w.add_behind_nat("sym", "203.0.113.13/24", "192.0.2.128/26", Nat::Symmetric);
    w.start_all();
    let n = Ntr {
        relay,
        public,
        s1,
        s2,
        sym,
    };
    let st = ntr_mesh(&w, n, deadline);
    ntr_direct_paths(&w, n, &st, deadline);
    ntr_relay_counters(&w, n, &st, deadline);
    ntr_relay_restart(&mut w, n, &st, deadline);
}

/// Everyone meshes (the symmetric node with the relay only) and pings everyone.
fn ntr_mesh(w: &Cluster, n: Ntr, deadline: Deadline) -> Vec<Status> {
    // Everyone but the symmetric node meshes with everyone else but it.
    let meshed = [n.relay, n.public, n.s1, n.s2];
    let names: Vec<&str> = meshed.iter().map(|&i| w.nodes[i].name.as_str()).collect();
    let mut st: Vec<Option<Status>> = vec![None; w.nodes.len()];
    for &i in &meshed {
        let others: Vec<&str> = names
            .iter()
            .copied()
            .filter(|name| *name != w.nodes[i].name)
            .collect();
        st[i] = Some(w.nodes[i].wait_named(&others, deadline.left(Duration::from_secs(40))));
    }
    st[n.sym] = Some(w.nodes[n.sym].wait_only_peer(RELAY, deadline.left(Duration::from_secs(40))));
    let st: Vec<Status> = st.into_iter().map(Option::unwrap).collect();
    for s in &st {
        assert!(
            s.device.tunnel_ip_v6.is_some(),
            "{} has no v6 tunnel address",
            s.device.hostname
        );
    }
    assert_relay_carries_org(&st[n.sym]);

    ping_all(w, &st, deadline);

    st
}

/// Direct paths where NATs allow them; the coordinator's view of every node.
fn ntr_direct_paths(w: &Cluster, n: Ntr, st: &[Status], deadline: Deadline) {
    // The two endpoint-independent sites punched through to each other, and both reach
    // the public node directly.
    for (a, b, b_wan) in [
        (n.s1, n.s2, Ipv4Addr::new(203, 0, 113, 12)),
        (n.s2, n.s1, Ipv4Addr::new(203, 0, 113, 11)),
        (n.s1, n.public, Ipv4Addr::new(203, 0, 113, 3)),
        (n.public, n.s1, Ipv4Addr::new(203, 0, 113, 11)),
        (n.s2, n.public, Ipv4Addr::new(203, 0, 113, 3)),
        (n.public, n.s2, Ipv4Addr::new(203, 0, 113, 12)),
    ] {
        assert_direct(
            w,
            a,
            b,
            &st[b],
            b_wan,
            deadline.left(Duration::from_secs(30)),
        );
    }

    // The coordinator sees every node online, with the mapping its STUN probes found.
    let list = wait_until(
        "the coordinator to list every node online with its NAT mapping",
        deadline.left(Duration::from_secs(40)),
        || {
            let list = w.coord.devices();
            let ready = w.nodes.iter().all(|n| {
                list.iter()
                    .any(|d| d.hostname == n.name && d.online && d.reflexive_endpoint.is_some())
            });
            ready.then_some(list)
        },
    );
    for (i, wan, symmetric) in [
        (n.relay, Ipv4Addr::new(203, 0, 113, 2), false),
        (n.public, Ipv4Addr::new(203, 0, 113, 3), false),
        (n.s1, Ipv4Addr::new(203, 0, 113, 11), false),
        (n.s2, Ipv4Addr::new(203, 0, 113, 12), false),
        (n.sym, Ipv4Addr::new(203, 0, 113, 13), true),
    ] {
        let d = device(&list, &w.nodes[i].name);
        assert_eq!(d.relay, i == n.relay, "{d:?}");
        assert_eq!(d.symmetric_nat, symmetric, "{d:?}");
        assert_eq!(
            d.reflexive_endpoint.map(|e| e.ip()),
            Some(IpAddr::V4(wan)),
            "{d:?}"
        );
    }
}

/// Direct traffic leaves the relay's counters alone, the symmetric node's moves them.
fn ntr_relay_counters(w: &Cluster, n: Ntr, st: &[Status], deadline: Deadline) {
    // Direct traffic does not pass the relay: cone <-> cone, cone <-> public (and to
    // the relay itself) leave its forwarding counters as they are.
    let before = relayed(&w.nodes[n.relay]);
    let mut answered = 0;
    for (a, b) in [
        (n.s1, n.s2),
        (n.s2, n.s1),
        (n.s1, n.public),
        (n.public, n.s1),
        (n.s2, n.public),
        (n.public, n.s2),
        (n.s1, n.relay),
        (n.relay, n.s2),
    ] {
        for v6 in [false, true] {
            let addr = tunnel_addr(&st[b], v6);
            let n = burst(&w.nodes[a].ns, &addr, 5);
            assert!(n > 0, "{} -> {addr}: no answer", w.nodes[a].name);
            answered += n;
        }
    }
    let after = relayed(&w.nodes[n.relay]);
    assert_eq!(
        after, before,
        "direct pings ({answered} answered) moved the relay's (packets, bytes) counters"
    );

    // The symmetric node's pings do: each request and each reply is forwarded.
    let (mut packets, mut bytes) = (0, 0);
    for t in [n.s1, n.public] {
        for v6 in [false, true] {
            let addr = tunnel_addr(&st[t], v6);
            let n = u64::from(burst(&w.nodes[n.sym].ns, &addr, 5));
            assert!(n > 0, "sym -> {addr}: no answer");
            packets += 2 * n;
            bytes += 2 * n * echo_bytes(v6);
        }
    }
    let moved = relayed(&w.nodes[n.relay]);
    assert!(
        moved.0 >= after.0 + packets && moved.1 >= after.1 + bytes,
        "the symmetric node's pings did not pass the n.relay: (packets, bytes) {after:?} -> \
         {moved:?}, expected at least +({packets}, {bytes})"
    );
    eprintln!(
        "relay counters: {before:?} before {answered} direct echoes, {after:?} after; \
         {moved:?} after the symmetric node's"
    );
    // ...by itself, not through kernel forwarding.
    assert_no_kernel_forwarding(&w.nodes[n.relay]);

    // The symmetric node peers only with the relay, and its traffic passes it.
    assert_pings_pass_relay(&w.nodes[n.sym], &[&st[n.s1], &st[n.public]], deadline);
    assert_relay_carries_org(&w.nodes[n.sym].current());
    for &i in &[n.public, n.s1, n.s2] {
        assert_reaches_via_relay(&w.nodes[i].current(), &st[n.sym]);
    }
}

/// The relay dies and comes back on its state.
fn ntr_relay_restart(w: &mut Cluster, n: Ntr, st: &[Status], deadline: Deadline) {
    // The relay dies: direct peers are untouched, the symmetric node is cut off.
    w.nodes[n.relay].kill();
    for _ in 0..3 {
        for (a, b) in [
            (n.s1, n.s2),
            (n.s2, n.s1),
            (n.s1, n.public),
            (n.public, n.s1),
        ] {
            w.nodes[a].ping_node(&st[b], false, deadline.left(Duration::from_secs(5)));
            w.nodes[a].ping_node(&st[b], true, deadline.left(Duration::from_secs(5)));
        }
    }
    assert!(
        !w.nodes[n.sym]
            .ns
            .ping(&st[n.s1].device.tunnel_ip.to_string()),
        "the symmetric node reached site1 with the relay down: not through the relay"
    );

    // The relay comes back on its state: the symmetric node is reached again, through
    // a new session with the new relay process.
    let restarted = Instant::now();
    w.nodes[n.relay].start(None);
    w.nodes[n.sym].ping_node(&st[n.s1], false, deadline.left(Duration::from_secs(60)));
    w.nodes[n.s1].ping_node(&st[n.sym], false, deadline.left(Duration::from_secs(30)));
    w.nodes[n.s1].ping_node(&st[n.sym], true, deadline.left(Duration::from_secs(30)));
    assert_pings_pass_relay(&w.nodes[n.sym], &[&st[n.s1]], deadline);
    let after = w.nodes[n.sym].current();
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
    let mut w = world("rlo");
    let (relay, public) = relay_and_public(&mut w);
    let spoke = w.add_node("spoke", "203.0.113.4/24", true, &["--relay-only"]);
    w.start_all();
    let st_relay =
        w.nodes[relay].wait_named(&["pub", "spoke"], deadline.left(Duration::from_secs(40)));
    let st_pub = w.nodes[public].wait_named(&[RELAY], deadline.left(Duration::from_secs(40)));
    let st_spoke = w.nodes[spoke].wait_only_peer(RELAY, deadline.left(Duration::from_secs(40)));
    assert!(st_spoke.device.tunnel_ip_v6.is_some());
    assert_relay_carries_org(&st_spoke);

    // Both ways, v4 and v6, through the relay.
    w.nodes[public].ping_node(&st_spoke, false, deadline.left(Duration::from_secs(30)));
    w.nodes[public].ping_node(&st_spoke, true, deadline.left(Duration::from_secs(30)));
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
    let mut w = world("srt");
    let r1 = w.add_node("relay1", "203.0.113.2/24", true, &["--relay"]);
    let r2 = w.add_node("relay2", "203.0.113.4/24", true, &["--relay"]);
    let public = w.add_node("pub", "203.0.113.3/24", true, &[]);
    let spoke = w.add_behind_nat("sym", "203.0.113.13/24", "192.0.2.128/26", Nat::Symmetric);

    // relay1 registers first, so it has the lower device id.
    let running = |w: &Cluster, i: usize| {
        wait_until(
            &format!("{} to run", w.nodes[i].name),
            deadline.left(Duration::from_secs(30)),
            || w.nodes[i].status(),
        )
    };
    w.start(r1);
    let id1 = running(&w, r1).device.id;
    w.start(r2);
    let id2 = running(&w, r2).device.id;
    assert!(id1 < id2, "relay1 has id {id1}, relay2 {id2}");
    w.start(public);
    w.start(spoke);

    let st_pub = w.nodes[public].wait_named(
        &["relay1", "relay2"],
        deadline.left(Duration::from_secs(40)),
    );
    let st_spoke = w.nodes[spoke].wait_only_peer("relay1", deadline.left(Duration::from_secs(40)));
    assert!(st_spoke.device.tunnel_ip_v6.is_some() && st_pub.device.tunnel_ip_v6.is_some());
    let both_ways = |w: &Cluster, bound: Duration| {
        for v6 in [false, true] {
            w.nodes[spoke].ping_node(&st_pub, v6, deadline.left(bound));
        }
        for v6 in [false, true] {
            w.nodes[public].ping_node(&st_spoke, v6, deadline.left(bound));
        }
    };
    both_ways(&w, Duration::from_secs(30));
    assert_reaches_via(&w.nodes[public].current(), &st_spoke, "relay1");
    let list = w.coord.devices();
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
    let list = w.coord.devices();
    assert!(!device(&list, "relay1").online, "{list:#?}");
    assert!(device(&list, "relay2").online, "{list:#?}");
    for v6 in [false, true] {
        w.nodes[spoke].ping_node(&st_pub, v6, deadline.left(Duration::from_secs(30)));
    }
    let reached = killed.elapsed();
    for v6 in [false, true] {
        w.nodes[public].ping_node(&st_spoke, v6, deadline.left(Duration::from_secs(30)));
    }
    assert_reaches_via(&w.nodes[public].current(), &st_spoke, "relay2");
    let via2 = relayed(&w.nodes[r2]);
    assert!(via2.0 >= 8, "relay2 did not carry the pings: {via2:?}");

    // relay1 comes back on its state (no token): everyone moves back to it.
    let restarted = Instant::now();
    w.nodes[r1].start(None);
    w.nodes[spoke].wait_only_peer("relay1", deadline.left(Duration::from_secs(60)));
    let back = restarted.elapsed();
    let again = running(&w, r1);
    assert_eq!(again.device.id, id1, "relay1 came back as another device");
    assert!(device(&w.coord.devices(), "relay1").online);
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
    Proc::quiet(ns.cmd(&["ping", "-q", "-n", "-i", "0.2", addr]))
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
    let mut w = world("ctf");
    let relay = w.add_node(RELAY, "203.0.113.2/24", true, &["--relay"]);
    let (s1, s2) = cone_sites(&mut w);
    w.start_all();
    let st1 = w.nodes[s1].wait_named(&["site2"], deadline.left(Duration::from_secs(40)));
    let st2 = w.nodes[s2].wait_named(&["site1"], deadline.left(Duration::from_secs(40)));
    let wan1 = Ipv4Addr::new(203, 0, 113, 11);
    let wan2 = Ipv4Addr::new(203, 0, 113, 12);
    let node1 = Ipv4Addr::new(192, 0, 2, 2);
    let assert_direct = |w: &Cluster, bound: Duration| {
        for (a, b, b_st, b_wan) in [(s1, s2, &st2, wan2), (s2, s1, &st1, wan1)] {
            assert_direct(w, a, b, b_st, b_wan, deadline.left(bound));
        }
    };
    w.nodes[s1].ping_node(&st2, false, deadline.left(Duration::from_secs(30)));
    w.nodes[s2].ping_node(&st1, false, deadline.left(Duration::from_secs(30)));
    assert_direct(&w, Duration::from_secs(30));

    // Pings run both ways through the flushes.
    let _pings = [
        ping_forever(&w.nodes[s1].ns, &tunnel_addr(&st2, false)),
        ping_forever(&w.nodes[s2].ns, &tunnel_addr(&st1, false)),
        ping_forever(&w.nodes[s1].ns, &tunnel_addr(&st2, true)),
        ping_forever(&w.nodes[s2].ns, &tunnel_addr(&st1, true)),
    ];
    let relay_before = relayed(&w.nodes[relay]);
    let (gw1, gw2) = (&w.aux[0], &w.aux[1]);
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
                w.nodes[a].ping_node(b_st, v6, deadline.left(bound));
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
