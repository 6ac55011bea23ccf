//! End-to-end: a coordinator and nodes in network namespaces on one underlay bridge,
//! running the real binary. Needs root (namespaces, TUN).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::cluster::{Cluster, wait_until};
use common::netns::Netns;
use common::probe::{TcpEcho, blast, tcp_echo, udp_socket};
use nexodus::join::status::Status;

const PING_WAIT: Duration = Duration::from_secs(30);

/// Coordinator at 192.0.2.1 and nodes n0, n1, ... at 192.0.2.11, .12, ... (`v6[i]`:
/// node i has IPv6). Nodes are created but not started.
fn mesh(tag: &str, v6: &[bool]) -> Cluster {
    let mut c = Cluster::new(tag, "192.0.2.1/24");
    for (i, &has_v6) in v6.iter().enumerate() {
        c.add_node(
            &format!("n{i}"),
            &format!("192.0.2.{}/24", 11 + i),
            has_v6,
            &[],
        );
    }
    c
}

/// The bytes of burst datagram `i` (its number first).
fn burst_datagram(i: u64, buf: &mut [u8]) -> usize {
    let len = 1200.min(buf.len());
    for (j, b) in buf[..len].iter_mut().enumerate() {
        *b = (i as usize * 7 + j * 13) as u8;
    }
    buf[..8].copy_from_slice(&i.to_be_bytes());
    len
}

/// Sends 2,000 datagrams of 1,200 bytes as fast as the sender can from `from` to a
/// socket on `to` in `at`; returns how many arrived and what arrived wrong
/// (another length, other bytes, a datagram twice).
fn udp_burst(from: &Netns, at: &Netns, to: std::net::SocketAddr) -> (usize, Vec<String>) {
    const COUNT: u64 = 2000;
    let rx = udp_socket(at, to);
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let reader = std::thread::spawn(move || {
        let (mut seen, mut bad) = (std::collections::HashSet::new(), Vec::new());
        let (mut buf, mut want) = ([0u8; 2048], [0u8; 2048]);
        while let Ok(n) = rx.recv(&mut buf) {
            let i = u64::from_be_bytes(buf[..8].try_into().unwrap());
            let len = burst_datagram(i, &mut want);
            if n != len || buf[..n] != want[..len] || i >= COUNT || !seen.insert(i) {
                bad.push(format!("datagram {i}: {n} bytes"));
            }
        }
        (seen.len(), bad)
    });
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sent = blast(
        from,
        bind.parse().unwrap(),
        to,
        COUNT,
        Duration::from_secs(10),
        burst_datagram,
    );
    assert!(sent > 0, "no datagram sent to {to}");
    reader.join().unwrap()
}

fn has_line(text: &str, needle: &str) -> bool {
    text.lines().any(|l| l.contains(needle))
}

fn link_exists(ns: &Netns, dev: &str) -> bool {
    ns.try_run(&["ip", "link", "show", dev])
}

#[test]
fn dual_stack_mesh_with_a_v4_only_node() {
    let mut mesh = mesh("ds", &[true, true, true, false]);
    for i in 0..mesh.nodes.len() {
        mesh.start(i);
    }
    let statuses: Vec<Status> = mesh.nodes.iter().map(|n| n.wait_peers(3)).collect();
    let v4_only = &statuses[3];
    assert!(!v4_only.device.ipv6_supported);
    assert_eq!(v4_only.device.tunnel_ip_v6, None);

    // Every pair pings over v4; every dual-stack pair over v6.
    for (i, from) in mesh.nodes.iter().enumerate() {
        for (j, to) in statuses.iter().enumerate() {
            if i == j {
                continue;
            }
            let v4 = to.device.tunnel_ip.to_string();
            assert!(
                from.ns.ping_until(&v4, PING_WAIT),
                "node {i} cannot ping {v4}"
            );
            if let (Some(v6), Some(_)) = (to.device.tunnel_ip_v6, statuses[i].device.tunnel_ip_v6) {
                let v6 = v6.to_string();
                assert!(
                    from.ns.ping_until(&v6, PING_WAIT),
                    "node {i} cannot ping {v6}"
                );
            }
        }
    }

    // Bulk TCP both ways over each family arrives byte for byte: the receiving
    // node's TUN write coalesces the segments into super-packets (wire::gro).
    let (v4, v6) = (
        statuses[1].device.tunnel_ip,
        statuses[1].device.tunnel_ip_v6.unwrap(),
    );
    let echo_at = [
        std::net::SocketAddr::from((v4, 7001)),
        std::net::SocketAddr::from((v6, 7001)),
    ];
    let _echo = TcpEcho::start(&mesh.nodes[1].ns, &echo_at);
    for to in echo_at {
        tcp_echo(&mesh.nodes[0].ns, to, 16 << 20, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("16 MiB echoed through {to}: {e}"));
    }
    let coalesced = |i: usize| mesh.nodes[i].status().map_or(0, |s| s.tun_coalesced);
    assert!(
        coalesced(1) > 0,
        "node 1 wrote no coalesced segments to TUN"
    );

    // Bursts of equal-sized UDP datagrams (which the receiver's TUN write may
    // coalesce into UDP super-packets) reach the socket one by one, each intact
    // and once.
    for to in [
        std::net::SocketAddr::from((v4, 7002)),
        std::net::SocketAddr::from((v6, 7002)),
    ] {
        let (got, bad) = udp_burst(&mesh.nodes[0].ns, &mesh.nodes[1].ns, to);
        assert!(
            bad.is_empty(),
            "UDP to {to}: {} wrong, the first {:?}",
            bad.len(),
            &bad[..bad.len().min(5)]
        );
        assert!(got > 0, "no UDP datagram reached {to}");
    }

    // The seed's shapes: v4 /32 and v6 /64 on nx0, host routes /32 and /128 per peer.
    let a = &mesh.nodes[0];
    let addr = a.ns.ok(&["ip", "addr", "show", "nx0"]);
    let me = &statuses[0].device;
    assert!(
        has_line(&addr, &format!("inet {}/32", me.tunnel_ip)),
        "{addr}"
    );
    assert!(
        has_line(&addr, &format!("inet6 {}/64", me.tunnel_ip_v6.unwrap())),
        "{addr}"
    );
    let routes4 = a.ns.ok(&["ip", "-4", "route"]);
    let routes6 = a.ns.ok(&["ip", "-6", "route"]);
    for s in &statuses[1..] {
        assert!(
            has_line(&routes4, &format!("{} dev nx0", s.device.tunnel_ip)),
            "{routes4}"
        );
    }
    for s in &statuses[1..3] {
        let v6 = s.device.tunnel_ip_v6.unwrap();
        assert!(has_line(&routes6, &format!("{v6} dev nx0")), "{routes6}");
    }
    assert!(has_line(&routes6, "200::/64 dev nx0"), "{routes6}");

    // Nobody has a v6 route or allowed IP for the v4-only node, and it has no v6 at all.
    let d_v4 = v4_only.device.tunnel_ip;
    for s in &statuses[..3] {
        let peer = s.peers.iter().find(|p| p.tunnel_ip == d_v4).unwrap();
        assert!(
            peer.allowed_ips.iter().all(|n| n.addr().is_ipv4()),
            "{:?}",
            peer.allowed_ips
        );
    }
    let d_addr = mesh.nodes[3].ns.ok(&["ip", "addr", "show", "nx0"]);
    assert!(!d_addr.contains("inet6"), "{d_addr}");
    for p in &v4_only.peers {
        assert!(
            p.allowed_ips.iter().all(|n| n.addr().is_ipv4()),
            "{:?}",
            p.allowed_ips
        );
    }
    // Traffic counters moved and handshakes happened.
    let after = mesh.nodes[0].status().unwrap();
    assert!(
        after
            .peers
            .iter()
            .all(|p| p.last_handshake_secs.is_some() && p.rx_bytes > 0)
    );
}

#[test]
fn restart_outage_and_removal() {
    let mut mesh = mesh("ro", &[true, true, true]);
    mesh.start(0);
    mesh.start(1);
    let a0 = mesh.nodes[0].wait_peers(1);
    let b0 = mesh.nodes[1].wait_peers(1);
    let b_v6 = b0.device.tunnel_ip_v6.unwrap().to_string();
    assert!(mesh.nodes[0].ns.ping_until(&b_v6, PING_WAIT));

    // Restart A: same key, addresses and port; the interface goes away in between.
    mesh.nodes[0].stop();
    assert!(
        !link_exists(&mesh.nodes[0].ns, "nx0"),
        "nx0 left behind after SIGTERM"
    );
    mesh.nodes[0].start(None);
    let a1 = mesh.nodes[0].wait_peers(1);
    assert_eq!(a1.device.public_key, a0.device.public_key);
    assert_eq!(a1.device.tunnel_ip, a0.device.tunnel_ip);
    assert_eq!(a1.device.tunnel_ip_v6, a0.device.tunnel_ip_v6);
    assert_eq!(a1.device.listen_port, a0.device.listen_port);
    assert!(
        mesh.nodes[0].ns.ping_until(&b_v6, PING_WAIT),
        "no ping after restart"
    );

    // Coordinator down: tunnels keep answering.
    mesh.coord.kill();
    let b_v4 = b0.device.tunnel_ip.to_string();
    for _ in 0..5 {
        assert!(mesh.nodes[0].ns.ping_until(&b_v4, Duration::from_secs(5)));
    }
    wait_until("A to notice the outage", Duration::from_secs(60), || {
        mesh.nodes[0].status().filter(|s| !s.coordinator_connected)
    });
    // Coordinator back: a new node joins and is reached.
    mesh.coord.start();
    mesh.start(2);
    let c = mesh.nodes[2].wait_peers(2);
    mesh.nodes[0].wait_peers(2);
    let c_v6 = c.device.tunnel_ip_v6.unwrap().to_string();
    assert!(
        mesh.nodes[0].ns.ping_until(&c_v6, PING_WAIT),
        "new node not reached"
    );

    // Remove B with the admin command: A drops it, routes included.
    mesh.coord
        .admin(&["devices", "remove", &b0.device.id.to_string()]);
    mesh.nodes[0].wait_peers(1);
    // Routes follow the peer change (applied right after it).
    let a = &mesh.nodes[0];
    wait_until("A's routes to B to go", Duration::from_secs(10), || {
        let v6 = a.ns.ok(&["ip", "-6", "route"]);
        let v4 = a.ns.ok(&["ip", "-4", "route"]);
        (!has_line(&v6, &format!("{b_v6} dev nx0")) && !has_line(&v4, &format!("{b_v4} dev nx0")))
            .then_some(())
    });
    // B learns it was removed and exits with an error.
    let b = &mut mesh.nodes[1];
    let code = wait_until("B to exit", Duration::from_secs(20), || {
        b.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(!code.success());
    let log = std::fs::read_to_string(&b.log).unwrap();
    // The removal reaches B as the delta naming it, or (when another call on the
    // connection ended it first) as the refused login: both say what happened.
    assert!(
        log.contains("removed from its organization")
            || log.contains("the coordinator no longer knows this device (was it removed?)"),
        "{log}"
    );
}
