#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::node::testutil::{icmp_message, ip_packet, tcp_header, udp_datagram};
use crate::policy::{DeviceInfo, Policy, compile};

// We are `me` (100.64.0.1 / fd00::1); `peer` is 100.64.0.2 / fd00::2, `other`
// 100.64.0.3 / fd00::3.
const ME4: &str = "100.64.0.1";
const ME6: &str = "fd00::1";
const PEER4: &str = "100.64.0.2";
const PEER6: &str = "fd00::2";
const OTHER4: &str = "100.64.0.3";
const OTHER6: &str = "fd00::3";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn devices() -> Vec<DeviceInfo> {
    ["me", "peer", "other"]
        .iter()
        .enumerate()
        .map(|(i, name)| DeviceInfo {
            hostname: (*name).into(),
            v4: format!("100.64.0.{}", i + 1).parse().unwrap(),
            v6: Some(format!("fd00::{}", i + 1).parse().unwrap()),
            routes: Vec::new(),
            exit: false,
        })
        .collect()
}

fn table(policy: &str) -> InboundTable {
    let devs = devices();
    compile(&Policy::parse(policy).unwrap(), &devs, &devs[0])
}

/// peer → me: tcp 22, udp 53, icmp.
const POLICY: &str = r#"
[[allow]]
from = ["peer"]
to = ["me"]
proto = "tcp"
ports = ["22"]

[[allow]]
from = ["peer"]
to = ["me"]
proto = "udp"
ports = ["53"]

[[allow]]
from = ["peer"]
to = ["*"]
proto = "icmp"
"#;

fn filter(now: Instant) -> Filter {
    Filter::new(table(POLICY), now)
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    ip_packet(ip(src), ip(dst), protocol::TCP, &tcp_header(sport, dport))
}

fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    ip_packet(
        ip(src),
        ip(dst),
        protocol::UDP,
        &udp_datagram(sport, dport, 4),
    )
}

fn icmp_proto(addr: &str) -> u8 {
    if addr.contains(':') {
        protocol::ICMPV6
    } else {
        protocol::ICMP
    }
}

fn echo(src: &str, dst: &str, request: bool, id: u16) -> Vec<u8> {
    let t = match (src.contains(':'), request) {
        (false, true) => 8,
        (false, false) => 0,
        (true, true) => 128,
        (true, false) => 129,
    };
    let [a, b] = id.to_be_bytes();
    ip_packet(
        ip(src),
        ip(dst),
        icmp_proto(src),
        &icmp_message(t, 0, [a, b, 0, 1], &[]),
    )
}

/// An ICMP error of `t`/`code` from `src` to `dst`, quoting `quoted` (cut to 48 bytes
/// of its payload, as routers do).
fn icmp_error(src: &str, dst: &str, t: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let cut = &quoted[..quoted.len().min(88)];
    ip_packet(
        ip(src),
        ip(dst),
        icmp_proto(src),
        &icmp_message(t, code, rest, cut),
    )
}

#[test]
fn new_flows_need_a_rule_both_families() {
    let mut f = filter(Instant::now());
    for (peer, other, me) in [(PEER4, OTHER4, ME4), (PEER6, OTHER6, ME6)] {
        assert_eq!(f.inbound(&tcp(peer, me, 40000, 22)), Verdict::Pass);
        assert_eq!(f.inbound(&tcp(peer, me, 40000, 23)), Verdict::Drop);
        assert_eq!(f.inbound(&tcp(other, me, 40000, 22)), Verdict::Drop);
        assert_eq!(f.inbound(&udp(peer, me, 40000, 53)), Verdict::Pass);
        assert_eq!(f.inbound(&udp(peer, me, 40000, 22)), Verdict::Drop);
        assert_eq!(f.inbound(&echo(peer, me, true, 7)), Verdict::Pass);
        assert_eq!(f.inbound(&echo(other, me, true, 7)), Verdict::Drop);
        // An unrelated reply (nothing of ours to answer) is dropped.
        assert_eq!(f.inbound(&tcp(other, me, 80, 40000)), Verdict::Drop);
        assert_eq!(f.inbound(&echo(other, me, false, 9)), Verdict::Drop);
        // An unknown protocol without a rule.
        let sctp = ip_packet(ip(peer), ip(me), 132, &[0u8; 12]);
        assert_eq!(f.inbound(&sctp), Verdict::Drop);
    }
}

#[test]
fn replies_of_our_own_flows_pass_and_only_those() {
    let mut f = filter(Instant::now());
    for (other, me) in [(OTHER4, ME4), (OTHER6, ME6)] {
        assert!(f.outbound(&tcp(me, other, 50000, 443)));
        assert_eq!(f.inbound(&tcp(other, me, 443, 50000)), Verdict::Pass);
        // Same hosts, other ports: not the flow.
        assert_eq!(f.inbound(&tcp(other, me, 443, 50001)), Verdict::Drop);
        assert_eq!(f.inbound(&tcp(other, me, 444, 50000)), Verdict::Drop);
        assert_eq!(f.inbound(&udp(other, me, 443, 50000)), Verdict::Drop);
        // UDP and ping.
        assert!(f.outbound(&udp(me, other, 5353, 9999)));
        assert_eq!(f.inbound(&udp(other, me, 9999, 5353)), Verdict::Pass);
        assert!(f.outbound(&echo(me, other, true, 77)));
        assert_eq!(f.inbound(&echo(other, me, false, 77)), Verdict::Pass);
        assert_eq!(f.inbound(&echo(other, me, false, 78)), Verdict::Drop);
    }
    // A flow started by an allowed inbound packet: its later packets pass, and the
    // flow is one entry whichever side speaks.
    assert_eq!(f.inbound(&tcp(PEER4, ME4, 41000, 22)), Verdict::Pass);
    assert!(f.outbound(&tcp(ME4, PEER4, 22, 41000)));
    assert_eq!(f.inbound(&tcp(PEER4, ME4, 41000, 22)), Verdict::Pass);
    assert_eq!(f.live_flows(), 7);
}

#[test]
fn idle_flows_expire() {
    let t0 = Instant::now();
    let mut f = filter(t0);
    assert!(f.outbound(&tcp(ME4, OTHER4, 50000, 443)));
    assert!(f.outbound(&udp(ME6, OTHER6, 5000, 6000)));
    assert!(f.outbound(&tcp(ME6, OTHER6, 50001, 443)));
    // At 59 s both pass; the UDP flow is refreshed by its reply.
    f.advance(t0 + Duration::from_secs(59));
    assert_eq!(f.inbound(&udp(OTHER6, ME6, 6000, 5000)), Verdict::Pass);
    f.advance(t0 + Duration::from_secs(118));
    assert_eq!(f.inbound(&udp(OTHER6, ME6, 6000, 5000)), Verdict::Pass);
    // 61 s after its last packet the UDP flow is gone.
    f.advance(t0 + Duration::from_secs(180));
    assert_eq!(f.inbound(&udp(OTHER6, ME6, 6000, 5000)), Verdict::Drop);
    // TCP lives 5 minutes.
    f.advance(t0 + Duration::from_secs(299));
    assert_eq!(f.inbound(&tcp(OTHER4, ME4, 443, 50000)), Verdict::Pass);
    f.advance(t0 + Duration::from_secs(299 + 301));
    assert_eq!(f.inbound(&tcp(OTHER4, ME4, 443, 50000)), Verdict::Drop);
    assert_eq!(f.inbound(&tcp(OTHER6, ME6, 443, 50001)), Verdict::Drop);
    assert_eq!(f.live_flows(), 0);
}

#[test]
fn the_table_is_bounded_and_reuses_expired_slots() {
    let t0 = Instant::now();
    let mut f = Filter::with_capacity(table(POLICY), t0, PROBE);
    let mut passed = 0;
    let mut full = 0;
    for port in 1000..1100 {
        match f.inbound(&udp(PEER4, ME4, port, 53)) {
            Verdict::Pass => passed += 1,
            Verdict::Full => full += 1,
            Verdict::Drop => panic!("allowed flow dropped"),
        }
    }
    assert_eq!(passed, PROBE);
    assert_eq!(full, 100 - PROBE);
    assert_eq!(f.live_flows(), PROBE);
    // Outbound packets still go, but are not remembered (and counted).
    assert!(!f.outbound(&udp(ME4, OTHER4, 7, 7)));
    assert_eq!(f.stats().outbound_unrecorded, 1);
    assert_eq!(f.inbound(&udp(OTHER4, ME4, 7, 7)), Verdict::Drop);
    // Flows already in the table keep passing.
    assert_eq!(f.inbound(&udp(PEER4, ME4, 1000, 53)), Verdict::Pass);
    // Once they expire, their slots are reused.
    f.advance(t0 + Duration::from_secs(61));
    assert_eq!(f.inbound(&udp(PEER4, ME4, 2000, 53)), Verdict::Pass);
    assert!(f.outbound(&udp(ME4, OTHER4, 7, 7)));
    assert_eq!(f.inbound(&udp(OTHER4, ME4, 7, 7)), Verdict::Pass);
}

#[test]
fn icmp_errors_about_live_flows_pass() {
    let mut f = filter(Instant::now());
    // v6: Packet Too Big about our big TCP segment to `other` (no icmp rule for it).
    let ours6 = ip_packet(
        ip(ME6),
        ip(OTHER6),
        protocol::TCP,
        &[tcp_header(50000, 443), vec![0u8; 1300]].concat(),
    );
    let mtu = 1280u32.to_be_bytes();
    let ptb = icmp_error(OTHER6, ME6, 2, 0, mtu, &ours6);
    assert_eq!(f.inbound(&ptb), Verdict::Drop, "no flow yet");
    assert!(f.outbound(&ours6));
    assert_eq!(f.inbound(&ptb), Verdict::Pass);
    // A router on the way sends it: its source is neither end.
    let ptb_router = icmp_error("2001:db8::1", ME6, 2, 0, mtu, &ours6);
    assert_eq!(f.inbound(&ptb_router), Verdict::Pass);
    // v4: Fragmentation Needed about our UDP datagram.
    let ours4 = ip_packet(
        ip(ME4),
        ip(OTHER4),
        protocol::UDP,
        &udp_datagram(5000, 6000, 1400),
    );
    let frag_needed = icmp_error(OTHER4, ME4, 3, 4, [0, 0, 0x05, 0x00], &ours4);
    assert_eq!(f.inbound(&frag_needed), Verdict::Drop);
    assert!(f.outbound(&ours4));
    assert_eq!(f.inbound(&frag_needed), Verdict::Pass);
    // Time exceeded about our ping.
    let ping = echo(ME4, OTHER4, true, 5);
    assert!(f.outbound(&ping));
    assert_eq!(
        f.inbound(&icmp_error("203.0.113.1", ME4, 11, 0, [0; 4], &ping)),
        Verdict::Pass
    );
    // An error quoting a packet of a flow we do not have, or one not from us.
    let not_ours = tcp(ME6, OTHER6, 50000, 444);
    assert_eq!(
        f.inbound(&icmp_error(OTHER6, ME6, 1, 4, [0; 4], &not_ours)),
        Verdict::Drop
    );
    let spoofed = tcp(PEER6, OTHER6, 50000, 443);
    assert_eq!(
        f.inbound(&icmp_error(OTHER6, ME6, 2, 0, mtu, &spoofed)),
        Verdict::Drop
    );
    // A quoted header cut before its ports is dropped.
    let mut short = ptb.clone();
    short.truncate(40 + 8 + 40 + 2);
    short[4..6].copy_from_slice(&(8u16 + 40 + 2).to_be_bytes());
    assert_eq!(f.inbound(&short), Verdict::Drop);
    // The peer may send us ICMP errors anyway (its icmp rule).
    assert_eq!(
        f.inbound(&icmp_error(PEER6, ME6, 1, 4, [0; 4], &not_ours)),
        Verdict::Pass
    );
}

/// `payload` as fragment `offset` (8-byte units) of a v4 datagram `id`.
fn v4_fragment(
    src: &str,
    dst: &str,
    proto: u8,
    id: u16,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = ip_packet(ip(src), ip(dst), proto, payload);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let field = offset | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&field.to_be_bytes());
    p
}

fn v6_fragment(
    src: &str,
    dst: &str,
    proto: u8,
    id: u32,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = vec![proto, 0];
    h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(payload);
    ip_packet(ip(src), ip(dst), protocol::FRAGMENT, &h)
}

#[test]
fn later_fragments_pass_only_after_their_first() {
    let t0 = Instant::now();
    let mut f = filter(t0);
    let first = udp_datagram(4000, 53, 24);
    let rest = [0u8; 16];
    // v4: later fragment first → dropped; then the first, then the later one.
    let later = v4_fragment(PEER4, ME4, protocol::UDP, 99, 4, false, &rest);
    assert_eq!(f.inbound(&later), Verdict::Drop);
    let head = v4_fragment(PEER4, ME4, protocol::UDP, 99, 0, true, &first);
    assert_eq!(f.inbound(&head), Verdict::Pass);
    assert_eq!(f.inbound(&later), Verdict::Pass);
    // Another id, or a first fragment that is refused, lets nothing through.
    assert_eq!(
        f.inbound(&v4_fragment(
            PEER4,
            ME4,
            protocol::UDP,
            100,
            4,
            false,
            &rest
        )),
        Verdict::Drop
    );
    let denied = udp_datagram(4000, 54, 24);
    assert_eq!(
        f.inbound(&v4_fragment(
            PEER4,
            ME4,
            protocol::UDP,
            101,
            0,
            true,
            &denied
        )),
        Verdict::Drop
    );
    assert_eq!(
        f.inbound(&v4_fragment(
            PEER4,
            ME4,
            protocol::UDP,
            101,
            4,
            false,
            &rest
        )),
        Verdict::Drop
    );
    // v6, the same.
    let later = v6_fragment(PEER6, ME6, protocol::UDP, 7, 4, false, &rest);
    assert_eq!(f.inbound(&later), Verdict::Drop);
    assert_eq!(
        f.inbound(&v6_fragment(PEER6, ME6, protocol::UDP, 7, 0, true, &first)),
        Verdict::Pass
    );
    assert_eq!(f.inbound(&later), Verdict::Pass);
    let denied_head = v6_fragment(PEER6, ME6, protocol::UDP, 8, 0, true, &denied);
    assert_eq!(f.inbound(&denied_head), Verdict::Drop);
    assert_eq!(
        f.inbound(&v6_fragment(PEER6, ME6, protocol::UDP, 8, 4, false, &rest)),
        Verdict::Drop
    );
    // Briefly: after FRAGMENT_IDLE_SECS the first fragment is forgotten.
    f.advance(t0 + Duration::from_secs(u64::from(FRAGMENT_IDLE_SECS) + 1));
    assert_eq!(f.inbound(&later), Verdict::Drop);
}

#[test]
fn extension_headers_are_walked_before_matching() {
    let mut f = filter(Instant::now());
    let dest_opts = |next: u8| vec![next, 0, 1, 4, 0, 0, 0, 0];
    let behind = |dport: u16, chain: usize| {
        let mut payload = Vec::new();
        for i in 0..chain {
            let next = if i + 1 == chain {
                protocol::UDP
            } else {
                protocol::DEST_OPTS
            };
            payload.extend_from_slice(&dest_opts(next));
        }
        payload.extend_from_slice(&udp_datagram(4000, dport, 4));
        ip_packet(ip(PEER6), ip(ME6), protocol::DEST_OPTS, &payload)
    };
    // An allowed port behind a destination-options header is matched...
    assert_eq!(f.inbound(&behind(53, 1)), Verdict::Pass);
    // ...and a denied one does not sneak through.
    assert_eq!(f.inbound(&behind(54, 1)), Verdict::Drop);
    assert_eq!(f.inbound(&behind(54, 3)), Verdict::Drop);
    assert_eq!(f.inbound(&behind(53, 8)), Verdict::Pass);
    // Nine headers: dropped even for an allowed port.
    assert_eq!(f.inbound(&behind(53, 9)), Verdict::Drop);
    // A chain that runs past the packet, and hop-by-hop in the middle.
    let mut cut = behind(53, 1);
    cut[41] = 9;
    assert_eq!(f.inbound(&cut), Verdict::Drop);
    let mut hbh = behind(53, 2);
    hbh[40] = protocol::HOP_BY_HOP;
    assert_eq!(f.inbound(&hbh), Verdict::Drop);
    // A transport header cut before its ports.
    let short = ip_packet(ip(PEER6), ip(ME6), protocol::UDP, &[0, 53, 0]);
    assert_eq!(f.inbound(&short), Verdict::Drop);
    // Garbage is dropped.
    assert_eq!(f.inbound(&[0x45, 0, 0]), Verdict::Drop);
    assert!(f.outbound(&[0x45, 0, 0]));
}

#[test]
fn a_new_policy_keeps_our_flows_and_rechecks_the_others() {
    let mut f = filter(Instant::now());
    assert!(f.outbound(&tcp(ME4, OTHER4, 50000, 443)));
    assert_eq!(f.inbound(&tcp(PEER4, ME4, 41000, 22)), Verdict::Pass);
    assert_eq!(f.inbound(&udp(PEER6, ME6, 41000, 53)), Verdict::Pass);
    // The new policy allows only udp 53 from peer.
    f.set_table(table(
        "[[allow]]\nfrom = [\"peer\"]\nto = [\"me\"]\nproto = \"udp\"\nports = [\"53\"]\n",
    ));
    assert_eq!(f.inbound(&tcp(OTHER4, ME4, 443, 50000)), Verdict::Pass);
    assert_eq!(f.inbound(&tcp(PEER4, ME4, 41000, 22)), Verdict::Drop);
    assert_eq!(f.inbound(&udp(PEER6, ME6, 41000, 53)), Verdict::Pass);
    assert_eq!(f.table().len(), 1);
}

/// A reply we send after the policy changed, to a request that passed before,
/// must not turn the forbidden flow into one we started (found end to end: a UDP
/// echo kept a forbidden flow open for as long as it was used).
#[test]
fn a_reply_crossing_a_policy_change_does_not_reopen_the_flow() {
    let mut f = filter(Instant::now());
    assert_eq!(f.inbound(&udp(PEER6, ME6, 41000, 53)), Verdict::Pass);
    f.set_table(table(""));
    // Our echo answers the request that passed just before the change.
    assert!(f.outbound(&udp(ME6, PEER6, 53, 41000)));
    assert_eq!(f.inbound(&udp(PEER6, ME6, 41000, 53)), Verdict::Drop);
    assert_eq!(f.live_flows(), 0);
    // A flow we start ourselves still opens the way for its replies.
    assert!(f.outbound(&udp(ME6, PEER6, 53, 41001)));
    assert_eq!(f.inbound(&udp(PEER6, ME6, 41001, 53)), Verdict::Pass);
    // Allowed again: the flow passes again.
    f.set_table(table(POLICY));
    assert_eq!(f.inbound(&udp(PEER6, ME6, 41000, 53)), Verdict::Pass);
}

#[test]
fn random_bytes_never_panic() {
    let mut f = Filter::with_capacity(table(POLICY), Instant::now(), 64);
    let mut state = 0x1234_5678_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds = [
        tcp(PEER4, ME4, 1, 22),
        echo(PEER6, ME6, true, 1),
        icmp_error(OTHER6, ME6, 2, 0, [0; 4], &tcp(ME6, OTHER6, 1, 2)),
        v6_fragment(
            PEER6,
            ME6,
            protocol::UDP,
            1,
            0,
            true,
            &udp_datagram(1, 53, 8),
        ),
    ];
    for _ in 0..20_000 {
        let mut p = seeds[(next() % 4) as usize].clone();
        for _ in 0..(next() % 4) {
            let at = (next() as usize) % p.len();
            p[at] = next() as u8;
        }
        let len = (next() as usize) % (p.len() + 1);
        let _ = f.inbound(&p[..len]);
        let _ = f.outbound(&p[..len]);
    }
}

#[test]
fn the_hash_spreads_similar_flows() {
    // Half the default capacity of flows differing only in a port or an address:
    // every one finds a slot within its probe window.
    let t0 = Instant::now();
    let mut f = Filter::new(table(POLICY), t0);
    let n = DEFAULT_FLOW_CAPACITY / 2;
    let mut refused = 0;
    for i in 0..n {
        let port = 1024 + (i % 60000) as u16;
        let dst = if i % 2 == 0 { OTHER4 } else { "100.64.1.7" };
        if !f.outbound(&udp(ME4, dst, port, 53)) {
            refused += 1;
        }
    }
    assert_eq!(refused, 0);
    assert_eq!(f.live_flows(), n);
}
