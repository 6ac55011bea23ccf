//! End-to-end: what a node refuses whatever the coordinator or the underlay sends it
//! (DESIGN §13). A peer's advertised prefixes that cover this host's underlay or the
//! coordinator are routed nowhere and the node stays connected; a subnet router
//! forwards from the mesh only towards its advertised prefixes; a million spoofed
//! STUN answers at the WireGuard port leave the node's memory flat. Namespaces and
//! interfaces are named `nx-gd-*`. Needs root.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::{Cluster, Node};
use common::netns::Netns;
use common::stock::stock_host;
use common::{Deadline, probe};
use ipnet::IpNet;
use nexodus::join::status::Status;

const PING: Duration = Duration::from_secs(30);

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

/// Every route through nx0 in the node's namespace, v4 and v6.
fn nx0_routes(node: &Node) -> String {
    let (v4, v6) = node.routes();
    format!("{v4}{v6}")
        .lines()
        .filter(|l| l.contains("dev nx0"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn refused(s: &Status) -> Vec<String> {
    s.routes_refused.iter().map(ToString::to_string).collect()
}

// ---------------------------------------------------------------------------------
// 1. Route guard

/// The advertiser's prefixes: the coordinator's address, a prefix around b's second
/// underlay LAN, all of global unicast IPv6 (which holds b's v6 underlay), and one
/// harmless prefix everyone may route.
const COORD_HOST: &str = "203.0.113.1/32";
const AROUND_B_LAN: &str = "198.51.100.0/23";
const GLOBAL_V6: &str = "2000::/3";
const HARMLESS: &str = "192.0.2.0/25";
/// A prefix c already routes on its own: its route must stay as it is.
const C_ROUTES_ITSELF: &str = "192.0.2.128/25";

#[test]
fn guard_refuses_routes_over_underlay_and_coordinator() {
    let deadline = Deadline::after(Duration::from_secs(150));
    let mut w = Cluster::new("gd-r", "203.0.113.1/24");
    let adv = w.add_node("adv", "203.0.113.2/24", true, &[]);
    let b = w.add_node("b", "203.0.113.3/24", true, &[]);
    let c = w.add_node("c", "203.0.113.4/24", true, &[]);
    // b has a second underlay: a LAN 198.51.100.0/24 and a global v6 address.
    let bns = &w.nodes[b].ns;
    // (A veth pair inside b: the kernel here has no dummy interfaces.)
    bns.ok(&[
        "ip", "link", "add", "lan9", "type", "veth", "peer", "name", "lan9p",
    ]);
    bns.ok(&["sysctl", "-qw", "net.ipv6.conf.lan9.accept_dad=0"]);
    bns.ok(&["ip", "addr", "add", "198.51.100.1/24", "dev", "lan9"]);
    bns.ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        "2001:db8:16::3/64",
        "dev",
        "lan9",
        "nodad",
    ]);
    bns.ok(&["ip", "link", "set", "lan9p", "up"]);
    bns.ok(&["ip", "link", "set", "lan9", "up"]);

    w.nodes[c]
        .ns
        .ok(&["ip", "route", "add", C_ROUTES_ITSELF, "via", "203.0.113.1"]);

    let cidrs = [
        COORD_HOST,
        AROUND_B_LAN,
        GLOBAL_V6,
        HARMLESS,
        C_ROUTES_ITSELF,
    ];
    w.start_with(adv, &["--advertise-cidr", &cidrs.join(",")]);
    w.start(b);
    w.start(c);
    w.nodes[adv].wait_peer_count(2, deadline.left(Duration::from_secs(30)));
    w.approve_routes(adv, &cidrs.join(","));

    // Both take the harmless prefix: they have seen the advertiser's list.
    for i in [b, c] {
        w.nodes[i].wait_routes(
            "the harmless advertised prefix via nx0",
            deadline.left(Duration::from_secs(30)),
            |v4, _| routed_to_nx0(v4, HARMLESS),
        );
    }
    // b refuses all three; c only the coordinator (and its own /24), routing the
    // prefixes that cover nothing of its own.
    let sb = w.nodes[b].wait_status(
        "to refuse three prefixes",
        deadline.left(Duration::from_secs(10)),
        |s| s.routes_refused.len() == 3,
    );
    assert_eq!(refused(&sb), [AROUND_B_LAN, COORD_HOST, GLOBAL_V6]);
    assert!(sb.routes_refused_total >= 3);
    let routes_b = nx0_routes(&w.nodes[b]);
    for p in [COORD_HOST, AROUND_B_LAN, GLOBAL_V6] {
        assert!(
            !routes_b.contains(p),
            "b routes {p} into the mesh:\n{routes_b}"
        );
    }
    let adv_peer = sb.peers.iter().find(|p| p.hostname == "adv").unwrap();
    for p in [COORD_HOST, AROUND_B_LAN, GLOBAL_V6] {
        assert!(
            !adv_peer.allowed_ips.contains(&net(p)),
            "{p} is an allowed IP of adv at b: {:?}",
            adv_peer.allowed_ips
        );
    }
    assert!(
        w.nodes[b].status_text().contains("routes refused: "),
        "{}",
        w.nodes[b].status_text()
    );

    w.nodes[c].wait_routes(
        "the prefixes covering nothing of c via nx0",
        deadline.left(Duration::from_secs(10)),
        |v4, v6| routed_to_nx0(v4, AROUND_B_LAN) && routed_to_nx0(v6, GLOBAL_V6),
    );
    let sc = w.nodes[c].current();
    assert_eq!(refused(&sc), [COORD_HOST]);
    assert!(!nx0_routes(&w.nodes[c]).contains(COORD_HOST));
    // A route the host already had is never replaced; b, without one, takes it.
    let (c_v4, _) = w.nodes[c].routes();
    assert!(
        c_v4.lines()
            .any(|l| l.starts_with(&format!("{C_ROUTES_ITSELF} via 203.0.113.1 "))),
        "c's own route for {C_ROUTES_ITSELF} was replaced:\n{c_v4}"
    );
    w.nodes[b].wait_routes(
        "a route for the prefix c routes itself",
        deadline.left(Duration::from_secs(10)),
        |v4, _| routed_to_nx0(v4, C_ROUTES_ITSELF),
    );

    // Still connected: a device that joins later reaches both, and they talk.
    let d = w.add_node("d", "203.0.113.5/24", true, &[]);
    w.start(d);
    for i in [b, c] {
        let s = w.nodes[i].wait_named(&["adv", "d"], deadline.left(Duration::from_secs(30)));
        assert!(
            s.coordinator_connected,
            "{} lost the coordinator",
            s.device.hostname
        );
    }
    let sc = w.nodes[c].current();
    w.nodes[b].ping_node(&sc, false, deadline.left(PING));
    w.nodes[b].ping_node(&sc, true, deadline.left(PING));
}

// ---------------------------------------------------------------------------------
// 2. Subnet router: no open exit

const INSIDE_HOST: &str = "198.51.100.10";
const OUTSIDE_HOST: &str = "192.0.2.10";

/// A host namespace behind node `router` on its own veth `dev`: the router at
/// `router_ip`/24, the host at `host_ip`/24, no default route on the host.
fn lan_host(
    w: &Cluster,
    router: usize,
    name: &str,
    dev: &str,
    router_ip: &str,
    host_ip: &str,
) -> Netns {
    let host = w.lan.netns(name);
    let r = &w.nodes[router].ns;
    r.ok(&[
        "ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", &host.name,
    ]);
    r.ok(&["ip", "addr", "add", &format!("{router_ip}/24"), "dev", dev]);
    r.ok(&["ip", "link", "set", dev, "up"]);
    host.ok(&["ip", "addr", "add", &format!("{host_ip}/24"), "dev", "eth0"]);
    host.ok(&["ip", "link", "set", "eth0", "up"]);
    host
}

/// Packets the router's table dropped (`counter packets N ... drop`).
fn router_drops(router: &Netns) -> u64 {
    let table = router.ok(&["nft", "list", "table", "inet", "nexodus_nx0"]);
    table
        .lines()
        .find(|l| l.contains("drop"))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no drop counter in:\n{table}"))
}

#[test]
fn subnet_router_forwards_only_to_its_prefixes() {
    let deadline = Deadline::after(Duration::from_secs(150));
    let mut w = Cluster::new("gd-s", "203.0.113.1/24");
    // The router is also the relay, so the stock device below peers with it and can
    // send it whatever it likes: a hostile peer, not a well-behaved node.
    let gw = w.add_node("gw", "203.0.113.3/24", true, &["--relay"]);
    let inside = lan_host(&w, gw, "in", "lan0", "198.51.100.1", INSIDE_HOST);
    let outside = lan_host(&w, gw, "out", "lan1", "192.0.2.1", OUTSIDE_HOST);
    w.aux.push(inside);
    w.aux.push(outside);
    w.start_with(gw, &["--advertise-cidr", "198.51.100.0/24", "--masquerade"]);
    let sgw = w.nodes[gw].current();
    w.approve_routes(gw, "198.51.100.0/24");
    w.approve_relay(gw);

    let (_config, stock, _wggo) = stock_host(
        &mut w,
        "203.0.113.5/24",
        "nx-gd-wg0",
        Duration::from_secs(10),
    );
    // The hostile peer routes both LANs to the router, not only the advertised one.
    stock.ok(&[
        "wg",
        "set",
        "nx-gd-wg0",
        "peer",
        &sgw.device.public_key,
        "allowed-ips",
        "100.64.0.0/10,200::/64,198.51.100.0/24,192.0.2.0/24",
    ]);
    for lan in ["198.51.100.0/24", "192.0.2.0/24"] {
        stock.ok(&["ip", "route", "add", lan, "dev", "nx-gd-wg0"]);
    }
    w.nodes[gw].wait_named(&["stock"], deadline.left(Duration::from_secs(30)));
    assert!(
        stock.ping_until(&sgw.device.tunnel_ip.to_string(), deadline.left(PING)),
        "stock cannot reach the router through the tunnel"
    );
    // Inside the advertised prefix: forwarded (and masqueraded).
    assert!(
        stock.ping_until(INSIDE_HOST, deadline.left(PING)),
        "the LAN host inside the advertised prefix does not answer"
    );
    // Outside: nothing comes back, and it is the router's table that drops it.
    for _ in 0..3 {
        assert!(
            !stock.ping(OUTSIDE_HOST),
            "the router forwarded to {OUTSIDE_HOST}, outside its advertised prefix"
        );
    }
    let dropped = router_drops(&w.nodes[gw].ns);
    assert!(dropped >= 3, "the router's table dropped {dropped} packets");
    // The inside still works.
    assert!(stock.ping(INSIDE_HOST) || stock.ping_until(INSIDE_HOST, deadline.left(PING)));
}

// ---------------------------------------------------------------------------------
// 3. Spoofed STUN answers

const SPOOFED: u64 = 1_000_000;
/// How much the node's resident memory may grow over the flood.
const RSS_BOUND_KIB: u64 = 8 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

#[test]
fn spoofed_stun_answers_leave_memory_flat() {
    let deadline = Deadline::after(Duration::from_secs(170));
    let mut w = Cluster::new("gd-t", "203.0.113.1/24");
    let a = w.add_node("a", "203.0.113.2/24", false, &[]);
    let b = w.add_node("b", "203.0.113.3/24", false, &[]);
    let atk = w.lan.host("atk", "203.0.113.9/24", false);
    w.start_all();
    w.nodes[a].wait_peers(1);
    let sb = w.nodes[b].wait_peers(1);
    w.nodes[a].ping_node(&sb, false, deadline.left(PING));
    let pid = w.nodes[a].pid();
    let base = rss_kib(pid);

    let to: SocketAddr = "203.0.113.2:51820".parse().unwrap();
    let mapped: SocketAddr = "198.51.100.66:4444".parse().unwrap();
    let started = std::time::Instant::now();
    let sent = probe::blast(
        &atk,
        "203.0.113.9:40000".parse().unwrap(),
        to,
        SPOOFED,
        deadline.left(Duration::from_secs(60)),
        |i, buf| {
            let mut txid = [0u8; 12];
            txid[..8].copy_from_slice(&i.to_le_bytes());
            nexodus::wire::stun::encode_binding_response(&txid, mapped, buf).unwrap()
        },
    );
    let took = started.elapsed();
    // The node is still busy with what its socket holds: watch its memory for two
    // seconds and take the peak.
    let watch = std::time::Instant::now();
    let mut after = rss_kib(pid);
    while watch.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
        after = after.max(rss_kib(pid));
    }
    let s = w.nodes[a].current();
    let unsolicited = s.drops.get("stun_unsolicited").copied().unwrap_or(0);
    eprintln!(
        "sent {sent} spoofed STUN answers in {took:?}; node RSS {base} KiB -> peak {after} KiB; dropped as unsolicited: {unsolicited}"
    );
    assert!(sent >= SPOOFED / 2, "only {sent} sent in {took:?}");
    assert!(
        after <= base + RSS_BOUND_KIB,
        "node RSS grew from {base} KiB to {after} KiB (bound +{RSS_BOUND_KIB} KiB)"
    );
    assert!(unsolicited > 0, "no spoofed answer counted: {:?}", s.drops);
    assert!(w.nodes[a].alive());
    w.nodes[a].ping_node(&sb, false, deadline.left(PING));
}
