//! Test support for the data plane (hidden from docs, not a stable API).
//!
//! Deterministic keys, minimal but valid IPv4/IPv6 ICMP echo packets,
//! [`Pair`]: two [`DataPlane`]s that exchange datagrams in memory, and
//! [`Relayed`]: two spokes talking through a relay. Used by the unit tests,
//! `tests/alloc_free.rs`, `benches/dataplane.rs` and the fuzz target.
//!
//! This module allocates freely and panics on broken invariants; it must not
//! be used on production paths. It does no I/O and reads no clock.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::policy::{DeviceInfo, InboundTable, Policy, compile};

use super::dataplane::{DataPlane, DropReason, Incoming, Outgoing, PeerConfig, PeerId};

/// Buffer size used for every `buf` and `out` in this module.
pub const BUF_LEN: usize = 2048;

/// A's inner addresses (and B's).
pub const A_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
pub const B_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
pub const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
pub const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// Peer id of A in B's table, and of B in A's table.
pub const A_ID: PeerId = 1;
pub const B_ID: PeerId = 2;

/// A deterministic private key derived from `seed` (splitmix64 output).
pub fn secret_key(seed: u64) -> [u8; 32] {
    let mut state = seed;
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    key
}

/// The public key of `secret`.
pub fn public_key(secret: &[u8; 32]) -> [u8; 32] {
    DataPlane::new(*secret).public_key()
}

/// Internet checksum (RFC 1071) of `data`, starting from `initial`.
fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP(v6) echo request of `len` bytes (at least 8), checksum left zero.
fn echo_payload(kind: u8, len: usize) -> Vec<u8> {
    let len = len.max(8);
    let mut p = vec![0u8; len];
    p[0] = kind;
    p[4..6].copy_from_slice(&0x4e58u16.to_be_bytes()); // identifier
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // sequence
    for (i, b) in p.iter_mut().enumerate().skip(8) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    p
}

/// A valid IPv4 ICMP echo request from `src` to `dst` with `payload_len`
/// ICMP bytes (at least 8): total length `20 + payload_len`.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let mut icmp = echo_payload(8, payload_len);
    let c = checksum(0, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = 20 + icmp.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 1, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(0, &p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&icmp);
    p
}

/// A valid IPv6 ICMPv6 echo request from `src` to `dst` with `payload_len`
/// ICMPv6 bytes (at least 8): total length `40 + payload_len`.
pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload_len: usize) -> Vec<u8> {
    let mut icmp = echo_payload(128, payload_len);
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let mut sum = 0u32;
    for c in pseudo.chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    let c = checksum(sum, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = Vec::with_capacity(40 + icmp.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.extend_from_slice(&[58, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&icmp);
    p
}

/// An IP packet from `src` to `dst` (same family) whose fixed header names
/// `next` and whose payload is `payload` (extension headers, if any, included):
/// checksums are left zero, which nothing in the data plane checks.
pub fn ip_packet(src: IpAddr, dst: IpAddr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + payload.len()) as u16;
            let mut p = vec![0x45, 0];
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0x12, 0x34, 0x00, 0x00, 64, next, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0x60, 0, 0, 0];
            p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            p.extend_from_slice(&[next, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p
        }
        _ => panic!("mixed families"),
    };
    p.extend_from_slice(payload);
    p
}

/// A TCP header (20 bytes, SYN) from `sport` to `dport`.
pub fn tcp_header(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 0x50;
    h[13] = 0x02;
    h
}

/// A UDP header from `sport` to `dport` followed by `len` payload bytes.
pub fn udp_datagram(sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut h = vec![0u8; 8 + len];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    h
}

/// An ICMP(v6) message: type, code, then the 4 bytes after the checksum, then `body`.
pub fn icmp_message(icmp_type: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut h = vec![icmp_type, code, 0, 0];
    h.extend_from_slice(&rest);
    h.extend_from_slice(body);
    h
}

/// The table `policy` compiles to for `me` of a [`Pair`], whose devices are
/// named `a` ([`A_V4`], [`A_V6`]) and `b` ([`B_V4`], [`B_V6`]).
pub fn pair_table(policy: &str, me: Side) -> InboundTable {
    let devices = [("a", A_V4, A_V6), ("b", B_V4, B_V6)].map(|(name, v4, v6)| DeviceInfo {
        hostname: name.into(),
        v4,
        v6: Some(v6),
        routes: Vec::new(),
        exit: false,
    });
    let policy = Policy::parse(policy).expect("test policy");
    let me = match me {
        Side::A => &devices[0],
        Side::B => &devices[1],
    };
    compile(&policy, &devices, me)
}

/// A policy of 100 rules that all concern `b`: 99 TCP rules from documentation
/// prefixes of both families (one port each), and last the one that matters: `a`
/// may reach `b` with any protocol.
pub fn hundred_rules() -> String {
    let mut text = String::new();
    for n in 1..100 {
        text.push_str(&format!(
            "[[allow]]\nfrom = [\"198.51.{n}.0/24\", \"2001:db8:{n}::/48\"]\nto = [\"b\"]\nproto = \"tcp\"\nports = [\"{}\"]\n\n",
            1000 + n
        ));
    }
    text.push_str("[[allow]]\nfrom = [\"a\"]\nto = [\"b\"]\n");
    text
}

/// One side of a [`Pair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// A node of a [`Relayed`] network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Spoke A.
    A,
    /// The relay.
    R,
    /// Spoke B.
    B,
}

/// Everything that happened while a [`Pair`] (nodes named by [`Side`]) or a
/// [`Relayed`] network (nodes named by [`Hop`]) ran to quiescence.
#[derive(Debug)]
pub struct Transcript<S = Side> {
    /// Datagrams sent: (sender, destination, bytes).
    pub wire: Vec<(S, SocketAddr, Vec<u8>)>,
    /// Packets written to TUN: (receiver, sending peer, bytes).
    pub tun: Vec<(S, PeerId, Vec<u8>)>,
    /// Packets relayed: (relay, from peer, to peer).
    pub forwarded: Vec<(S, PeerId, PeerId)>,
    /// Drops reported: (side, reason).
    pub drops: Vec<(S, DropReason)>,
    /// Datagrams addressed to no node's current address.
    pub lost: usize,
}

impl<S> Default for Transcript<S> {
    fn default() -> Self {
        Transcript {
            wire: Vec::new(),
            tun: Vec::new(),
            forwarded: Vec::new(),
            drops: Vec::new(),
            lost: 0,
        }
    }
}

impl<S: Copy + PartialEq> Transcript<S> {
    /// Packets written to `side`'s TUN.
    pub fn tun_at(&self, side: S) -> Vec<&[u8]> {
        self.tun
            .iter()
            .filter(|(s, ..)| *s == side)
            .map(|(_, _, p)| p.as_slice())
            .collect()
    }

    /// Data messages (type 4) sent by `side`.
    pub fn data_from(&self, side: S) -> Vec<&[u8]> {
        self.wire
            .iter()
            .filter(|(s, _, d)| *s == side && d.first() == Some(&4))
            .map(|(_, _, d)| d.as_slice())
            .collect()
    }
}

/// Two data planes, A (peer id [`A_ID`] at B, inner [`A_V4`]/[`A_V6`]) and
/// B (peer id [`B_ID`] at A, inner [`B_V4`]/[`B_V6`]). A is configured with
/// B's endpoint; B learns A's from A's handshake.
pub struct Pair {
    pub a: DataPlane,
    pub b: DataPlane,
    /// Where A's datagrams appear to come from (change it to simulate roaming).
    pub a_addr: SocketAddr,
    pub b_addr: SocketAddr,
}

/// Allowed IPs of a host with these addresses.
pub fn host_nets(v4: Ipv4Addr, v6: Ipv6Addr) -> Vec<IpNet> {
    vec![IpNet::from(IpAddr::V4(v4)), IpNet::from(IpAddr::V6(v6))]
}

/// A configured, not yet connected pair.
pub fn pair() -> Pair {
    let a_secret = secret_key(0xa);
    let b_secret = secret_key(0xb);
    let mut a = DataPlane::new(a_secret);
    let mut b = DataPlane::new(b_secret);
    let a_addr: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
    let b_addr: SocketAddr = "198.51.100.2:51820".parse().expect("addr");
    a.upsert_peer(
        B_ID,
        PeerConfig {
            public_key: b.public_key(),
            endpoint: Some(b_addr),
            allowed_ips: host_nets(B_V4, B_V6),
            persistent_keepalive: None,
        },
    )
    .expect("configure B at A");
    b.upsert_peer(
        A_ID,
        PeerConfig {
            public_key: a.public_key(),
            endpoint: None,
            allowed_ips: host_nets(A_V4, A_V6),
            persistent_keepalive: None,
        },
    )
    .expect("configure A at B");
    Pair {
        a,
        b,
        a_addr,
        b_addr,
    }
}

/// A pair with an established session used in both directions.
pub fn connected_pair() -> Pair {
    let mut p = pair();
    let ping = ipv4_packet(A_V4, B_V4, 56);
    let t = p.send_packet(Side::A, &ping);
    assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()], "A→B: {t:?}");
    let pong = ipv4_packet(B_V4, A_V4, 56);
    let t = p.send_packet(Side::B, &pong);
    assert_eq!(t.tun_at(Side::A), vec![pong.as_slice()], "B→A: {t:?}");
    p
}

impl Pair {
    /// The data plane of `side`.
    pub fn dp(&mut self, side: Side) -> &mut DataPlane {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// The current address of `side`.
    pub fn addr(&self, side: Side) -> SocketAddr {
        match side {
            Side::A => self.a_addr,
            Side::B => self.b_addr,
        }
    }

    fn nodes(&mut self) -> [Node<'_, Side>; 2] {
        [
            (Side::A, &mut self.a, self.a_addr),
            (Side::B, &mut self.b, self.b_addr),
        ]
    }

    /// `side` reads `packet` from its TUN; everything then runs to quiescence.
    pub fn send_packet(&mut self, side: Side, packet: &[u8]) -> Transcript {
        send_packet(&mut self.nodes(), side, packet)
    }

    /// `to` receives `datagram` from the other side's current address.
    pub fn deliver(&mut self, to: Side, datagram: &[u8]) -> Transcript {
        let mut t = Transcript::default();
        let queue = VecDeque::from([(to.other(), self.addr(to), datagram.to_vec())]);
        pump(&mut self.nodes(), &mut t, queue);
        t
    }

    /// Runs `side`'s timers at `now`, then everything to quiescence.
    pub fn tick(&mut self, side: Side, now: std::time::Instant) -> Transcript {
        let mut t = Transcript::default();
        let mut queue = VecDeque::new();
        let mut nodes = self.nodes();
        for (s, dp, _) in nodes.iter_mut() {
            if *s == side {
                dp.handle_timeout(now);
                flush(*s, dp, &mut queue);
            }
        }
        pump(&mut nodes, &mut t, queue);
        t
    }
}

/// Peer id of the relay at each spoke of [`Relayed`].
pub const R_ID: PeerId = 9;
/// The relay's own inner addresses.
pub const R_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
pub const R_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9);

/// Spokes A and B (ids [`A_ID`] and [`B_ID`] at the relay) and relay R (id
/// [`R_ID`] at both spokes, which route each other's addresses through it).
pub struct Relayed {
    pub a: DataPlane,
    pub r: DataPlane,
    pub b: DataPlane,
    pub a_addr: SocketAddr,
    pub r_addr: SocketAddr,
    pub b_addr: SocketAddr,
}

/// A [`Relayed`] network whose relay has sessions with both spokes.
pub fn relayed() -> Relayed {
    let mut r = DataPlane::new(secret_key(0x9));
    r.set_relay(true);
    let r_addr: SocketAddr = "203.0.113.9:51820".parse().expect("addr");
    let spoke = |seed: u64, v4: Ipv4Addr, v6: Ipv6Addr, other: &[IpNet]| {
        let mut dp = DataPlane::new(secret_key(seed));
        let mut allowed_ips = host_nets(R_V4, R_V6);
        allowed_ips.extend_from_slice(other);
        let relay = PeerConfig {
            public_key: public_key(&secret_key(0x9)),
            endpoint: Some(r_addr),
            allowed_ips,
            persistent_keepalive: None,
        };
        dp.upsert_peer(R_ID, relay).expect("relay at spoke");
        let at_relay = PeerConfig {
            public_key: dp.public_key(),
            endpoint: None,
            allowed_ips: host_nets(v4, v6),
            persistent_keepalive: None,
        };
        (dp, at_relay)
    };
    let (a, a_at_r) = spoke(0xa, A_V4, A_V6, &host_nets(B_V4, B_V6));
    let (b, b_at_r) = spoke(0xb, B_V4, B_V6, &host_nets(A_V4, A_V6));
    r.upsert_peer(A_ID, a_at_r).expect("A at relay");
    r.upsert_peer(B_ID, b_at_r).expect("B at relay");
    let mut net = Relayed {
        a,
        r,
        b,
        a_addr: "192.0.2.1:51820".parse().expect("addr"),
        r_addr,
        b_addr: "198.51.100.2:51820".parse().expect("addr"),
    };
    for (hop, src, dst) in [(Hop::A, A_V4, R_V4), (Hop::B, B_V4, R_V4)] {
        let ping = ipv4_packet(src, dst, 56);
        let t = net.send_packet(hop, &ping);
        assert_eq!(t.tun_at(Hop::R), vec![ping.as_slice()], "{hop:?}→R: {t:?}");
    }
    net
}

impl Relayed {
    fn nodes(&mut self) -> [Node<'_, Hop>; 3] {
        [
            (Hop::A, &mut self.a, self.a_addr),
            (Hop::R, &mut self.r, self.r_addr),
            (Hop::B, &mut self.b, self.b_addr),
        ]
    }

    /// `hop` reads `packet` from its TUN; everything then runs to quiescence.
    pub fn send_packet(&mut self, hop: Hop, packet: &[u8]) -> Transcript<Hop> {
        send_packet(&mut self.nodes(), hop, packet)
    }
}

/// A node of an in-memory network: its name, data plane and current address.
type Node<'a, S> = (S, &'a mut DataPlane, SocketAddr);

/// Datagrams in flight: (sender, destination, bytes).
type Queue<S> = VecDeque<(S, SocketAddr, Vec<u8>)>;

/// `side` reads `packet` from its TUN; everything then runs to quiescence.
fn send_packet<S: Copy + PartialEq>(
    nodes: &mut [Node<'_, S>],
    side: S,
    packet: &[u8],
) -> Transcript<S> {
    let mut t = Transcript::default();
    let mut queue = VecDeque::new();
    let mut buf = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    buf[..packet.len()].copy_from_slice(packet);
    for (s, dp, _) in nodes.iter_mut().filter(|n| n.0 == side) {
        match dp.handle_tun_packet(&mut buf, packet.len(), &mut out) {
            Outgoing::Send { to, data, .. } => queue.push_back((*s, to, data.to_vec())),
            Outgoing::Drop(r) => t.drops.push((*s, r)),
            Outgoing::Nothing => {}
        }
        flush(*s, dp, &mut queue);
    }
    pump(nodes, &mut t, queue);
    t
}

/// Queues everything `dp` (node `side`) has to transmit.
fn flush<S: Copy>(side: S, dp: &mut DataPlane, queue: &mut Queue<S>) {
    let mut out = vec![0u8; BUF_LEN];
    for _ in 0..10_000 {
        match dp.poll_transmit(&mut out) {
            Some(t) => queue.push_back((side, t.to, t.data.to_vec())),
            None => return,
        }
    }
    panic!("poll_transmit never returned None");
}

/// Delivers every queued datagram to the node at its destination address, queues
/// what comes out, until nothing is left.
fn pump<S: Copy + PartialEq>(
    nodes: &mut [Node<'_, S>],
    t: &mut Transcript<S>,
    mut queue: Queue<S>,
) {
    let mut out = vec![0u8; BUF_LEN];
    let mut fwd = vec![0u8; BUF_LEN];
    let mut steps = 0;
    while let Some((sender, to, data)) = queue.pop_front() {
        steps += 1;
        assert!(steps < 10_000, "network never went quiet");
        t.wire.push((sender, to, data.clone()));
        let from = nodes.iter().find(|n| n.0 == sender).map(|n| n.2);
        let (Some(from), Some((receiver, dp, _))) = (from, nodes.iter_mut().find(|n| n.2 == to))
        else {
            t.lost += 1;
            continue;
        };
        let receiver = *receiver;
        match dp.handle_datagram_or_forward(from, None, &data, &mut out, &mut fwd) {
            Incoming::WriteTun { peer, packet } => t.tun.push((receiver, peer, packet.to_vec())),
            Incoming::Send { to, data, .. } => queue.push_back((receiver, to, data.to_vec())),
            Incoming::Forward {
                from_peer,
                to_peer,
                to,
                data,
                ..
            } => {
                t.forwarded.push((receiver, from_peer, to_peer));
                queue.push_back((receiver, to, data.to_vec()));
            }
            Incoming::Drop(r) => t.drops.push((receiver, r)),
            Incoming::Nothing => {}
        }
        flush(receiver, dp, &mut queue);
    }
}
