//! IPv6 underlay (DESIGN §9): a dual-stack coordinator on `[::]`, a dual-stack
//! relay, a dual-stack node, a node whose underlay has IPv4 only and a node with no
//! IPv4 address at all (joined by `[2001:db8::1]:4443`, behind an nftables firewall
//! that drops unsolicited inbound). Every pair pings over inner v4 and v6; the
//! v6-only node reaches the dual-stack node directly over a v6 endpoint (hole
//! punched through its firewall) and the v4-only node through the relay, at once.
//! Namespaces `nx-v6u-*`, interfaces `v6u*`, nftables table `v6ufw`.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, tunnel_addr};
use nexodus::join::status::{PeerStatus, Status};

fn peer<'a>(s: &'a Status, name: &str) -> Option<&'a PeerStatus> {
    s.peers.iter().find(|p| p.hostname == name)
}

/// The node's own underlay: `v4` and/or `v6` (CIDRs) on `eth0` of a new host.
fn host(c: &mut Cluster, name: &str, v4: Option<&str>, v6: Option<&str>) -> common::netns::Netns {
    let first = v4.or(v6).unwrap();
    let ns = c.lan.host(name, first, true);
    if let (Some(_), Some(v6)) = (v4, v6) {
        ns.ok(&["ip", "addr", "add", v6, "dev", "eth0", "nodad"]);
    }
    ns
}

/// Drops every packet arriving on the underlay (`eth0`) that is not part of a flow
/// the namespace started (ICMPv6 stays open: neighbour discovery needs it). No
/// NAT66. The tunnel's own traffic is not filtered.
fn firewall(ns: &common::netns::Netns) {
    ns.ok_with_stdin(
        &["nft", "-f", "-"],
        "table inet v6ufw {\n\
           chain input {\n\
             type filter hook input priority 0; policy drop;\n\
             iifname != \"eth0\" accept\n\
             ct state established,related accept\n\
             meta l4proto ipv6-icmp accept\n\
             udp dport 51820 counter drop\n\
           }\n\
         }\n",
    );
}

#[test]
fn v6_only_host_reaches_the_whole_organization() {
    let mut c = Cluster::new_with("v6u", "2001:db8::1/64", true, true);
    // The coordinator's host is dual stack; `serve` listens on [::].
    c.coord
        .ns
        .ok(&["ip", "addr", "add", "203.0.113.1/24", "dev", "eth0"]);

    let ns = host(&mut c, "r", Some("203.0.113.4/24"), Some("2001:db8::4/64"));
    let r = c.add_node_in("r", ns, &["--relay", "--interface", "v6u0"]);
    let ns = host(&mut c, "d", Some("203.0.113.2/24"), Some("2001:db8::2/64"));
    let d = c.add_node_in("d", ns, &["--interface", "v6u1"]);
    // The dual-stack node lists the coordinator at both addresses: STUN over each.
    c.nodes[d].coordinator = "[2001:db8::1]:4443,203.0.113.1:4443".into();
    let ns = host(&mut c, "f", Some("203.0.113.3/24"), None);
    let f = c.add_node_in("f", ns, &["--interface", "v6u2"]);
    // A v4-only underlay names the coordinator by its v4 address.
    c.nodes[f].coordinator = "203.0.113.1:4443".into();
    let ns = host(&mut c, "s", None, Some("2001:db8::5/64"));
    firewall(&ns);
    let s = c.add_node_in("s", ns, &["--interface", "v6u3"]);
    assert_eq!(c.nodes[s].coordinator, "[2001:db8::1]:4443");
    // No IPv4 address at all on the v6-only host (loopback aside).
    let v4 = c.nodes[s].ns.ok(&["ip", "-4", "-o", "addr", "show"]);
    assert!(
        v4.lines().all(|l| l.contains("127.0.0.1")),
        "v6-only host has IPv4: {v4}"
    );

    c.start(r);
    c.start(d);
    c.start(f);
    c.start(s);
    let statuses: Vec<Status> = [r, d, f, s]
        .iter()
        .map(|&i| c.nodes[i].wait_peer_count(3, Duration::from_secs(40)))
        .collect();
    let listed = Instant::now();

    // The v6-only and the v4-only node share no underlay family: the relay at once,
    // with no direct timeout first.
    let s_to_f = tunnel_addr(&statuses[2], false);
    let t = Instant::now();
    c.nodes[s].ping(&s_to_f, Duration::from_secs(30));
    let first_ping = t.elapsed();
    eprintln!(
        "v6-only → v4-only: first ping answered {first_ping:?} after the ping started ({:?} after all listed their peers)",
        listed.elapsed()
    );
    assert!(
        first_ping < Duration::from_secs(10),
        "v6-only → v4-only took {first_ping:?} (no 15-s direct timeout expected)"
    );

    // Every pair over inner v4 and v6.
    for (i, from) in [r, d, f, s].into_iter().enumerate() {
        for (j, to) in statuses.iter().enumerate() {
            if i == j {
                continue;
            }
            for v6 in [false, true] {
                c.nodes[from].ping_node(to, v6, Duration::from_secs(30));
            }
        }
    }

    // s ↔ d directly over v6 endpoints (through s's firewall: hole punched), s ↔ f
    // through the relay, d ↔ f directly over v4.
    let v6_endpoint = |e: Option<SocketAddr>, ip: &str| e.is_some_and(|e| e.ip().to_string() == ip);
    let st = c.nodes[s].wait_status(
        "d direct over v6, f via the relay",
        Duration::from_secs(20),
        |st| {
            peer(st, "d")
                .is_some_and(|p| p.path == "direct" && v6_endpoint(p.endpoint, "2001:db8::2"))
                && peer(st, "f").is_some_and(|p| p.path == "relay")
                && peer(st, "r").is_some_and(|p| v6_endpoint(p.endpoint, "2001:db8::4"))
        },
    );
    eprintln!("{}", c.nodes[s].status_text());
    assert!(peer(&st, "d").unwrap().last_handshake_secs.is_some());
    c.nodes[d].wait_status("s direct over v6", Duration::from_secs(20), |st| {
        peer(st, "s").is_some_and(|p| p.path == "direct" && v6_endpoint(p.endpoint, "2001:db8::5"))
    });
    c.nodes[f].wait_status(
        "s via the relay, d over v4",
        Duration::from_secs(20),
        |st| {
            peer(st, "s").is_some_and(|p| p.path == "relay")
                && peer(st, "d").is_some_and(|p| {
                    p.path == "direct"
                        && p.endpoint
                            .is_some_and(|e| e.ip().to_string() == "203.0.113.2")
                })
        },
    );
    let fw = c.nodes[s]
        .ns
        .ok(&["nft", "list", "chain", "inet", "v6ufw", "input"]);
    eprintln!("s's firewall after the punch: {fw}");
    // `status` text shows the v6 endpoint in use.
    let text = c.nodes[s].status_text();
    assert!(text.contains("[2001:db8::2]:"), "{text}");

    // The coordinator holds the v6 underlay: local_ip_v6 and the endpoints.
    let sd = c.coord.device("s").unwrap();
    assert_eq!(
        sd.local_ip_v6.map(|a| a.to_string()).as_deref(),
        Some("2001:db8::5")
    );
    assert_eq!(sd.local_ip, None);
    assert!(
        sd.reflexive_endpoint
            .is_some_and(|e| e.ip().to_string() == "2001:db8::5"),
        "STUN over v6: {:?}",
        sd.reflexive_endpoint
    );
    // The dual-stack node's two mappings: STUN over v4 and over v6.
    let t = Instant::now();
    let dd = common::cluster::wait_until(
        "d's v4 and v6 reflexive endpoints",
        Duration::from_secs(20),
        || {
            c.coord.device("d").filter(|dd| {
                dd.reflexive_endpoint
                    .is_some_and(|e| e.ip().to_string() == "203.0.113.2")
                    && dd
                        .reflexive_endpoint_v6
                        .is_some_and(|e| e.ip().to_string() == "2001:db8::2")
            })
        },
    );
    eprintln!(
        "d: reflexive {:?}, reflexive v6 {:?} (waited {:?})",
        dd.reflexive_endpoint,
        dd.reflexive_endpoint_v6,
        t.elapsed()
    );
    // The v4-only node has no v6 mapping.
    let fd = c.coord.device("f").unwrap();
    assert_eq!(fd.reflexive_endpoint_v6, None);
    assert!(
        fd.reflexive_endpoint
            .is_some_and(|e| e.ip().to_string() == "203.0.113.3")
    );
    assert_eq!(
        dd.local_ip_v6.map(|a| a.to_string()).as_deref(),
        Some("2001:db8::2")
    );
    assert_eq!(
        dd.local_ip.map(|a| a.to_string()).as_deref(),
        Some("203.0.113.2")
    );
    let fd = c.coord.device("f").unwrap();
    assert_eq!(fd.local_ip_v6, None);
    // `nexodus devices` shows the v6 endpoints.
    let table = c.coord.admin(&["devices"]);
    assert!(table.contains("ENDPOINT V6"), "{table}");
    assert!(table.contains("[2001:db8::5]:"), "{table}");
}

/// Two dual-stack nodes peer over v6; one loses its v6 underlay address: the other
/// moves to its v4 endpoint (no relay in between) within the bound.
#[test]
fn losing_the_v6_underlay_moves_peers_to_v4() {
    const BOUND: Duration = Duration::from_secs(30);
    let mut c = Cluster::new_with("v6ur", "2001:db8::1/64", true, true);
    c.coord
        .ns
        .ok(&["ip", "addr", "add", "203.0.113.1/24", "dev", "eth0"]);
    let ns = host(&mut c, "r", Some("203.0.113.4/24"), Some("2001:db8::4/64"));
    let r = c.add_node_in("r", ns, &["--relay", "--interface", "v6ur0"]);
    let ns = host(&mut c, "d", Some("203.0.113.2/24"), Some("2001:db8::2/64"));
    let d = c.add_node_in("d", ns, &["--interface", "v6ur1"]);
    let ns = host(&mut c, "e", Some("203.0.113.6/24"), Some("2001:db8::6/64"));
    let e = c.add_node_in("e", ns, &["--interface", "v6ur2"]);
    // d and e reach the coordinator over v4 (its v6 address stays on d to remove).
    c.nodes[d].coordinator = "203.0.113.1:4443".into();
    c.nodes[e].coordinator = "203.0.113.1:4443".into();
    c.start(r);
    c.start(d);
    c.start(e);
    let sd = c.nodes[d].wait_peer_count(2, Duration::from_secs(40));
    c.nodes[e].wait_peer_count(2, Duration::from_secs(40));
    let to_d = tunnel_addr(&sd, false);
    c.nodes[e].ping(&to_d, Duration::from_secs(20));
    c.nodes[e].wait_status("d direct over v6", Duration::from_secs(20), |st| {
        peer(st, "d").is_some_and(|p| {
            p.path == "direct"
                && p.endpoint
                    .is_some_and(|e| e.ip().to_string() == "2001:db8::2")
        })
    });

    c.nodes[d]
        .ns
        .ok(&["ip", "addr", "del", "2001:db8::2/64", "dev", "eth0"]);
    let t = Instant::now();
    // Traffic keeps flowing (the fallback watches unanswered data).
    let st = common::cluster::wait_until("e to reach d over v4", BOUND, || {
        c.nodes[e].ns.ping(&to_d);
        let st = c.nodes[e].status()?;
        let p = peer(&st, "d")?;
        (p.path == "direct"
            && p.endpoint
                .is_some_and(|e| e.ip().to_string() == "203.0.113.2"))
        .then_some(st)
    });
    c.nodes[e].ping(&to_d, Duration::from_secs(10));
    eprintln!(
        "v6 underlay address removed: peer on v4 after {:?}",
        t.elapsed()
    );
    assert!(peer(&st, "d").is_some());
}
