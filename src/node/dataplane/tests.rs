use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;
use crate::node::filter::Filter;
use crate::node::testutil::{
    A_ID, A_V4, A_V6, B_ID, B_V4, B_V6, BUF_LEN, Hop, R_ID, R_V4, R_V6, Side, connected_pair,
    host_nets, ip_packet, ipv4_packet, ipv6_packet, pair, pair_table, public_key, relayed,
    secret_key, tcp_header, udp_datagram,
};
use crate::wire::ip::protocol;

/// `dp`'s datagram for `packet` read from TUN (a data message or a handshake
/// initiation).
fn encrypt(dp: &mut DataPlane, packet: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    buf[..packet.len()].copy_from_slice(packet);
    match dp.handle_tun_packet(&mut buf, packet.len(), &mut out) {
        Outgoing::Send { data, .. } => data.to_vec(),
        other => panic!("unexpected {other:?}"),
    }
}

/// A peer with one host address per family at `endpoint`.
fn host_peer(
    public_key: [u8; 32],
    endpoint: SocketAddr,
    v4: std::net::Ipv4Addr,
    v6: std::net::Ipv6Addr,
    persistent_keepalive: Option<u16>,
) -> PeerConfig {
    PeerConfig {
        public_key,
        endpoint: Some(endpoint),
        allowed_ips: crate::node::testutil::host_nets(v4, v6),
        persistent_keepalive,
    }
}

fn is_padded_data_len(len: usize) -> bool {
    len >= DATA_OVERHEAD && (len - DATA_OVERHEAD).is_multiple_of(PADDING)
}

fn peer_cfg(seed: u64, endpoint: &str, nets: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: public_key(&secret_key(seed)),
        endpoint: Some(endpoint.parse().expect("endpoint")),
        allowed_ips: nets.iter().map(|n| n.parse().expect("net")).collect(),
        persistent_keepalive: None,
    }
}

/// A tiny deterministic PRNG for junk input.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

#[test]
fn v4_packet_arrives_byte_identical_through_handshake() {
    let mut p = pair();
    // 20 + 57 = 77 bytes: padded to 80 on the wire.
    let ping = ipv4_packet(A_V4, B_V4, 57);
    assert_eq!(ping.len(), 77);
    let t = p.send_packet(Side::A, &ping);
    assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()], "{t:?}");
    assert!(t.tun.iter().all(|(_, peer, _)| *peer == A_ID));
    assert!(t.drops.is_empty(), "{t:?}");
    // Handshake initiation, response, keepalive, then the queued packet.
    let kinds: Vec<u8> = t.wire.iter().map(|(_, _, d)| d[0]).collect();
    assert_eq!(kinds, vec![1, 2, 4, 4], "{t:?}");
    let data = t.data_from(Side::A);
    assert!(data.iter().any(|d| d.len() == 32 + 80), "{data:?}");
    assert!(data.iter().all(|d| is_padded_data_len(d.len())));
    // B learned A's endpoint from the handshake.
    let b_view = p.b.peer_stats(A_ID).expect("A at B");
    assert_eq!(b_view.endpoint, Some(p.a_addr));
    assert!(b_view.last_handshake.is_some());
    assert_eq!(p.a.counters().total_drops(), 0);
    assert_eq!(p.b.counters().total_drops(), 0);
}

#[test]
fn v6_packets_arrive_byte_identical_both_ways() {
    let mut p = connected_pair();
    for len in [8, 9, 23, 56, 100, 1000, 1380] {
        let ping = ipv6_packet(A_V6, B_V6, len);
        let t = p.send_packet(Side::A, &ping);
        assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()], "len {len}");
        let pong = ipv6_packet(B_V6, A_V6, len);
        let t = p.send_packet(Side::B, &pong);
        assert_eq!(t.tun_at(Side::A), vec![pong.as_slice()], "len {len}");
        let v4 = ipv4_packet(B_V4, A_V4, len);
        let t = p.send_packet(Side::B, &v4);
        assert_eq!(t.tun_at(Side::A), vec![v4.as_slice()], "len {len}");
    }
    assert_eq!(p.a.counters().total_drops(), 0);
    assert_eq!(p.b.counters().total_drops(), 0);
}

#[test]
fn byte_counters_match_across_the_pair() {
    let mut p = connected_pair();
    p.send_packet(Side::A, &ipv6_packet(A_V6, B_V6, 300));
    let a = p.a.peer_stats(B_ID).expect("B at A");
    let b = p.b.peer_stats(A_ID).expect("A at B");
    assert!(a.tx_bytes > 0 && a.rx_bytes > 0);
    assert_eq!(a.tx_bytes, b.rx_bytes);
    assert_eq!(a.rx_bytes, b.tx_bytes);
    assert_eq!(a.endpoint, Some(p.b_addr));
}

#[test]
fn outer_length_is_header_padded_payload_and_tag() {
    let mut p = connected_pair();
    let mut buf = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    for payload in 8..=200 {
        let pkt = ipv4_packet(A_V4, B_V4, payload);
        buf[..pkt.len()].copy_from_slice(&pkt);
        buf[pkt.len()..].fill(0xee); // padding must overwrite this
        match p.a.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
            Outgoing::Send { data, .. } => {
                assert_eq!(data.len(), 32 + pkt.len().next_multiple_of(16));
                let data = data.to_vec();
                let t = p.deliver(Side::B, &data);
                assert_eq!(t.tun_at(Side::B), vec![pkt.as_slice()]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Without spare capacity the plaintext is padded only as far as `buf` goes.
    let pkt = ipv4_packet(A_V4, B_V4, 13);
    let mut exact = pkt.clone();
    match p.a.handle_tun_packet(&mut exact, pkt.len(), &mut out) {
        Outgoing::Send { data, .. } => {
            assert_eq!(data.len(), 32 + pkt.len());
            let data = data.to_vec();
            assert_eq!(p.deliver(Side::B, &data).tun_at(Side::B), vec![&pkt[..]]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped() {
    let mut p = connected_pair();
    let spoofed = ipv4_packet("100.64.0.99".parse().expect("ip"), B_V4, 40);
    let t = p.send_packet(Side::A, &spoofed);
    assert!(t.tun.is_empty());
    assert_eq!(t.drops, vec![(Side::B, DropReason::BadSource)]);
    assert_eq!(p.b.counters().bad_source, 1);
    // B's own address is not A's to use either.
    let spoofed6 = ipv6_packet(B_V6, B_V6, 40);
    let t = p.send_packet(Side::A, &spoofed6);
    assert_eq!(t.drops, vec![(Side::B, DropReason::BadSource)]);
    assert_eq!(p.b.counters().bad_source, 2);
    assert_eq!(p.b.counters().total_drops(), 2);
}

#[test]
fn routing_picks_longest_prefix() {
    let mut dp = DataPlane::new(secret_key(1));
    dp.upsert_peer(2, peer_cfg(2, "192.0.2.2:1", &["100.64.0.0/10"]))
        .expect("peer 2");
    dp.upsert_peer(3, peer_cfg(3, "192.0.2.3:1", &["100.64.0.5/32"]))
        .expect("peer 3");
    let mut out = vec![0u8; BUF_LEN];
    let mut send_to = |dp: &mut DataPlane, dst: &str| -> Outgoing<'static> {
        let mut buf = vec![0u8; BUF_LEN];
        let pkt = ipv4_packet(A_V4, dst.parse().expect("ip"), 20);
        buf[..pkt.len()].copy_from_slice(&pkt);
        match dp.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
            Outgoing::Send { to, src, data } => {
                assert_eq!(data.len(), HANDSHAKE_INIT_LEN);
                assert_eq!(data[0], MSG_HANDSHAKE_INIT);
                Outgoing::Send { to, src, data: &[] }
            }
            Outgoing::Drop(r) => Outgoing::Drop(r),
            Outgoing::Nothing => Outgoing::Nothing,
        }
    };
    let ep = |s: &str| -> SocketAddr { s.parse().expect("addr") };
    assert_eq!(
        send_to(&mut dp, "100.64.0.5"),
        Outgoing::Send {
            to: ep("192.0.2.3:1"),
            src: None,
            data: &[]
        }
    );
    assert_eq!(
        send_to(&mut dp, "100.64.0.6"),
        Outgoing::Send {
            to: ep("192.0.2.2:1"),
            src: None,
            data: &[]
        }
    );
    assert_eq!(
        send_to(&mut dp, "100.128.0.1"),
        Outgoing::Drop(DropReason::NoRoute)
    );
    assert_eq!(
        dp.routes().lookup("100.64.0.5".parse().expect("ip")),
        Some(3)
    );
    assert!(dp.remove_peer(3));
    assert!(!dp.remove_peer(3));
    assert_eq!(
        dp.routes().lookup("100.64.0.5".parse().expect("ip")),
        Some(2)
    );
    // A handshake to peer 2 is already in flight: the packet just queues.
    assert_eq!(send_to(&mut dp, "100.64.0.5"), Outgoing::Nothing);
    assert_eq!(dp.counters().no_route, 1);
    let mut ids: Vec<_> = dp.peers().collect();
    ids.sort();
    assert_eq!(ids, vec![2]);
}

#[test]
fn garbage_datagrams_never_panic_and_are_counted() {
    let mut p = connected_pair();
    // Real messages to truncate and corrupt.
    let mut out = vec![0u8; BUF_LEN];
    let pkt = ipv4_packet(A_V4, B_V4, 100);
    let data_msg = encrypt(&mut p.a, &pkt);
    let mut fresh = DataPlane::new(secret_key(0xa));
    fresh
        .upsert_peer(
            B_ID,
            peer_cfg(0xb, "198.51.100.2:51820", &["100.64.0.2/32"]),
        )
        .expect("peer");
    let init_msg = encrypt(&mut fresh, &pkt);

    let mut rng = XorShift(0x5eed_1234_abcd_9876);
    let mut junk: Vec<Vec<u8>> = Vec::new();
    for len in 0..400 {
        let mut d = vec![0u8; len];
        rng.fill(&mut d);
        junk.push(d);
    }
    for len in 0..data_msg.len() {
        junk.push(data_msg[..len].to_vec());
    }
    for len in 0..init_msg.len() {
        junk.push(init_msg[..len].to_vec());
    }
    // Right type and size, junk contents; with random and with valid
    // receiver indices (copied from the real data message).
    for (kind, sizes) in [
        (1u8, vec![148]),
        (2, vec![92]),
        (3, vec![64]),
        (4, vec![32, 33, 48, 100, 148, 1500]),
    ] {
        for size in sizes {
            for valid_index in [false, true] {
                for _ in 0..8 {
                    let mut d = vec![0u8; size];
                    rng.fill(&mut d);
                    d[..4].copy_from_slice(&[kind, 0, 0, 0]);
                    if valid_index && kind != 1 {
                        d[4..8].copy_from_slice(&data_msg[4..8]);
                    }
                    junk.push(d);
                }
            }
        }
    }
    // A real data message with one bit flipped anywhere after the type.
    for i in 4..data_msg.len() {
        let mut d = data_msg.clone();
        d[i] ^= 0x10;
        junk.push(d);
    }
    // A real initiation with a corrupted body or MAC1 (MAC2 is only
    // checked under load, so flipping it would leave a valid message).
    for i in [4, 8, 40, 100, 116, 120, 131] {
        let mut d = init_msg.clone();
        d[i] ^= 1;
        junk.push(d);
    }

    let before = *p.b.counters();
    let from = p.a_addr;
    for d in &junk {
        match p.b.handle_datagram(from, d, &mut out) {
            Incoming::Drop(_) => {}
            other => panic!("junk {d:?} gave {other:?}"),
        }
        assert!(p.b.poll_transmit(&mut out).is_none());
    }
    let after = p.b.counters();
    assert_eq!(
        after.total_drops() - before.total_drops(),
        junk.len() as u64
    );
    assert!(after.malformed > 0 && after.decrypt > 0 && after.bad_mac > 0);
    assert!(after.unknown_peer > 0);
    // The real data message still decrypts (none of the above consumed its counter).
    let t = p.deliver(Side::B, &data_msg);
    assert_eq!(t.tun_at(Side::B), vec![pkt.as_slice()]);
    // ... but only once.
    let t = p.deliver(Side::B, &data_msg);
    assert_eq!(t.drops, vec![(Side::B, DropReason::Replay)]);
    // Junk from TUN is counted too.
    let mut a_out = vec![0u8; BUF_LEN];
    for len in 0..80 {
        let mut b = vec![0u8; len + 16];
        rng.fill(&mut b);
        let _ = p.a.handle_tun_packet(&mut b, len, &mut a_out);
    }
    let mut b = vec![0u8; 8];
    assert_eq!(
        p.a.handle_tun_packet(&mut b, 100, &mut a_out),
        Outgoing::Drop(DropReason::Malformed)
    );
}

#[test]
fn malformed_tun_packets_are_dropped() {
    let mut p = connected_pair();
    let mut out = vec![0u8; BUF_LEN];
    let good4 = ipv4_packet(A_V4, B_V4, 40);
    let good6 = ipv6_packet(A_V6, B_V6, 40);
    let mut cases: Vec<(Vec<u8>, usize)> = Vec::new();
    let mut v = good4.clone();
    v[0] = 0x55; // version 5
    cases.push((v, good4.len()));
    let mut v = good4.clone();
    v[0] = 0x44; // IHL 4 < 5
    cases.push((v, good4.len()));
    let mut v = good4.clone();
    v[2..4].copy_from_slice(&1000u16.to_be_bytes()); // longer than read
    cases.push((v, good4.len()));
    let mut v = good4.clone();
    v[2..4].copy_from_slice(&10u16.to_be_bytes()); // shorter than header
    cases.push((v, good4.len()));
    cases.push((good4.clone(), 19));
    cases.push((good6.clone(), 39));
    let mut v = good6.clone();
    v[4..6].copy_from_slice(&41u16.to_be_bytes()); // payload longer than read
    cases.push((v, good6.len()));
    cases.push((Vec::new(), 0));
    let n = cases.len() as u64;
    for (mut pkt, len) in cases {
        pkt.resize(pkt.len() + 16, 0);
        assert_eq!(
            p.a.handle_tun_packet(&mut pkt, len, &mut out),
            Outgoing::Drop(DropReason::Malformed)
        );
    }
    assert_eq!(p.a.counters().malformed, n);
    // Trailing bytes after the IP total length are not sent.
    let mut long = good4.clone();
    long.extend_from_slice(&[0xaa; 7]);
    long.resize(long.len() + 16, 0);
    let len = good4.len() + 7;
    let data = match p.a.handle_tun_packet(&mut long, len, &mut out) {
        Outgoing::Send { data, .. } => data.to_vec(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(data.len(), 32 + good4.len().next_multiple_of(16));
    assert_eq!(p.deliver(Side::B, &data).tun_at(Side::B), vec![&good4[..]]);
}

#[test]
fn padding_stops_at_the_mtu() {
    let mut p = connected_pair();
    p.dp(Side::A).set_mtu(1420);
    let mut out = vec![0u8; 4096];
    for len in [1408usize, 1409, 1415, 1420] {
        let pkt = ipv4_packet(A_V4, B_V4, 64);
        let pkt = ipv4_packet(A_V4, B_V4, 64 + len - pkt.len());
        assert_eq!(pkt.len(), len);
        let mut buf = vec![0u8; 4096];
        buf[..pkt.len()].copy_from_slice(&pkt);
        match p
            .dp(Side::A)
            .handle_tun_packet(&mut buf, pkt.len(), &mut out)
        {
            Outgoing::Send { data, .. } => {
                assert_eq!(data.len(), 32 + len.next_multiple_of(16).min(1420), "{len}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn low_order_keys_are_rejected() {
    let hex = |s: &str| -> [u8; 32] {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex");
        }
        k
    };
    let low_order = [
        hex("0000000000000000000000000000000000000000000000000000000000000000"),
        hex("0100000000000000000000000000000000000000000000000000000000000000"),
        hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ];
    let mut dp = DataPlane::new(secret_key(1));
    for (i, key) in low_order.into_iter().enumerate() {
        let cfg = PeerConfig {
            public_key: key,
            endpoint: None,
            allowed_ips: vec!["10.0.0.0/8".parse().expect("net")],
            persistent_keepalive: None,
        };
        assert_eq!(
            dp.upsert_peer(i as PeerId, cfg),
            Err(DataPlaneError::LowOrderKey(i as PeerId)),
            "key {i}"
        );
    }
    assert_eq!(dp.peers().count(), 0);
    assert!(dp.routes().is_empty());
}

#[test]
fn own_and_duplicate_keys_are_rejected() {
    let mut dp = DataPlane::new(secret_key(1));
    let mut cfg = peer_cfg(1, "192.0.2.1:1", &["10.0.0.1/32"]);
    assert_eq!(
        dp.upsert_peer(5, cfg.clone()),
        Err(DataPlaneError::OwnKey(5))
    );
    cfg.public_key = public_key(&secret_key(2));
    dp.upsert_peer(5, cfg.clone()).expect("first");
    assert_eq!(
        dp.upsert_peer(6, cfg.clone()),
        Err(DataPlaneError::DuplicateKey { id: 6, other: 5 })
    );
    dp.upsert_peer(5, cfg).expect("same peer again");
}

#[test]
fn same_key_keeps_session_new_key_starts_over() {
    let mut p = connected_pair();
    let b_key = p.b.public_key();
    let before = p.a.peer_stats(B_ID).expect("stats");
    p.a.upsert_peer(
        B_ID,
        PeerConfig {
            public_key: b_key,
            endpoint: None,
            allowed_ips: vec!["100.64.0.2/32".parse().expect("net")],
            persistent_keepalive: Some(25),
        },
    )
    .expect("update");
    let after = p.a.peer_stats(B_ID).expect("stats");
    assert_eq!(after.endpoint, before.endpoint);
    assert!(after.last_handshake.is_some());
    assert_eq!(after.tx_bytes, before.tx_bytes);
    // Still routed and sent straight away as data: the session survived.
    let ping = ipv4_packet(A_V4, B_V4, 30);
    let t = p.send_packet(Side::A, &ping);
    assert_eq!(t.wire[0].2[0], MSG_DATA);
    assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()]);
    // v6 was removed from the allowed IPs.
    let t = p.send_packet(Side::A, &ipv6_packet(A_V6, B_V6, 30));
    assert_eq!(t.drops, vec![(Side::A, DropReason::NoRoute)]);

    // A new key for the same id: fresh tunnel, handshake needed.
    p.a.upsert_peer(
        B_ID,
        peer_cfg(0xbb, "198.51.100.2:51820", &["100.64.0.2/32"]),
    )
    .expect("rekey");
    assert_eq!(p.a.peer_stats(B_ID).expect("stats").last_handshake, None);
    let mut buf = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    buf[..ping.len()].copy_from_slice(&ping);
    match p.a.handle_tun_packet(&mut buf, ping.len(), &mut out) {
        Outgoing::Send { data, .. } => assert_eq!(data[0], MSG_HANDSHAKE_INIT),
        other => panic!("unexpected {other:?}"),
    }
    // The old key is free again.
    let mut c = peer_cfg(0xb, "198.51.100.2:51820", &[]);
    c.public_key = b_key;
    p.a.upsert_peer(9, c).expect("old key reusable");
}

#[test]
fn removed_peer_gets_nothing_through() {
    let mut p = connected_pair();
    assert!(p.b.remove_peer(A_ID));
    let t = p.send_packet(Side::A, &ipv4_packet(A_V4, B_V4, 30));
    assert_eq!(t.drops, vec![(Side::B, DropReason::UnknownPeer)]);
    let t = p.send_packet(Side::B, &ipv4_packet(B_V4, A_V4, 30));
    assert_eq!(t.drops, vec![(Side::B, DropReason::NoRoute)]);
    assert_eq!(p.b.peer_stats(A_ID), None);
}

#[test]
fn no_endpoint_until_the_peer_speaks() {
    let mut p = pair();
    let t = p.send_packet(Side::B, &ipv4_packet(B_V4, A_V4, 30));
    assert_eq!(t.drops, vec![(Side::B, DropReason::NoEndpoint)]);
    assert_eq!(p.b.counters().no_endpoint, 1);
}

#[test]
fn small_output_buffers_are_refused() {
    let mut p = connected_pair();
    let pkt = ipv4_packet(A_V4, B_V4, 200);
    let mut buf = vec![0u8; BUF_LEN];
    buf[..pkt.len()].copy_from_slice(&pkt);
    let mut small = vec![0u8; 200];
    assert_eq!(
        p.a.handle_tun_packet(&mut buf, pkt.len(), &mut small),
        Outgoing::Drop(DropReason::BufferTooSmall)
    );
    let mut out = vec![0u8; BUF_LEN];
    let data = encrypt(&mut p.a, &pkt);
    let from = p.a_addr;
    assert_eq!(
        p.b.handle_datagram(from, &data, &mut small),
        Incoming::Drop(DropReason::BufferTooSmall)
    );
    assert!(matches!(
        p.b.handle_datagram(from, &data, &mut out),
        Incoming::WriteTun { peer: A_ID, .. }
    ));
}

#[test]
fn endpoint_roams_on_authenticated_packets() {
    let mut p = connected_pair();
    let new_addr: SocketAddr = "[2001:db8::7]:40000".parse().expect("addr");
    p.a_addr = new_addr;
    let t = p.send_packet(Side::A, &ipv4_packet(A_V4, B_V4, 30));
    assert_eq!(t.tun_at(Side::B).len(), 1);
    assert_eq!(
        p.b.peer_stats(A_ID).expect("stats").endpoint,
        Some(new_addr)
    );
    let pong = ipv4_packet(B_V4, A_V4, 30);
    let t = p.send_packet(Side::B, &pong);
    assert_eq!(t.lost, 0);
    assert_eq!(t.tun_at(Side::A), vec![pong.as_slice()]);

    // A forged (unauthenticated) packet from elsewhere does not move it.
    let mut junk = vec![0u8; 64];
    junk[0] = MSG_DATA;
    let forged_from: SocketAddr = "203.0.113.66:1".parse().expect("addr");
    let mut out = vec![0u8; BUF_LEN];
    assert!(matches!(
        p.b.handle_datagram(forged_from, &junk, &mut out),
        Incoming::Drop(_)
    ));
    assert_eq!(
        p.b.peer_stats(A_ID).expect("stats").endpoint,
        Some(new_addr)
    );
}

#[test]
fn cookie_reply_under_load() {
    let mut p = pair();
    let mut out = vec![0u8; BUF_LEN];
    let init = encrypt(&mut p.a, &ipv4_packet(A_V4, B_V4, 30));
    let from = p.a_addr;
    let mut cookie = None;
    for _ in 0..(2 * HANDSHAKE_RATE_LIMIT + 10) {
        if let Incoming::Send { to, data, .. } = p.b.handle_datagram(from, &init, &mut out)
            && data.first() == Some(&MSG_COOKIE_REPLY)
        {
            assert_eq!(to, from);
            assert_eq!(data.len(), 64);
            cookie = Some(data.to_vec());
        }
    }
    let cookie = cookie.expect("a cookie reply under load");
    assert!(p.b.counters().cookie_replies > 0);
    // The initiator accepts the cookie (authenticated with its MAC1).
    assert_eq!(
        p.a.handle_datagram(p.b_addr, &cookie, &mut out),
        Incoming::Nothing
    );
    assert_eq!(p.a.counters().total_drops(), 0);
}

#[test]
fn timers_send_persistent_keepalives_and_handshakes() {
    let mut p = pair();
    let b_key = p.b.public_key();
    let b_cfg = host_peer(b_key, p.b_addr, B_V4, B_V6, Some(25));
    p.a.upsert_peer(B_ID, b_cfg).expect("keepalive");
    assert_eq!(p.a.poll_timeout(), None);
    let t0 = Instant::now();
    // First tick: no session yet, so the keepalive starts a handshake.
    let t = p.tick(Side::A, t0);
    assert_eq!(p.a.poll_timeout(), Some(t0 + TICK));
    assert_eq!(
        t.wire.first().map(|w| w.2[0]),
        Some(MSG_HANDSHAKE_INIT),
        "{t:?}"
    );
    assert!(
        p.a.peer_stats(B_ID)
            .expect("stats")
            .last_handshake
            .is_some()
    );
    assert!(
        p.b.peer_stats(A_ID)
            .expect("stats")
            .last_handshake
            .is_some()
    );
    assert_eq!(
        p.b.peer_stats(A_ID).expect("stats").endpoint,
        Some(p.a_addr)
    );
    // Traffic in this tick postpones the next keepalive.
    let t = p.tick(Side::A, t0 + TICK);
    assert!(t.wire.is_empty(), "{t:?}");
    let t = p.tick(Side::A, t0 + Duration::from_secs(10));
    assert!(t.wire.is_empty(), "{t:?}");
    let t = p.tick(Side::A, t0 + Duration::from_secs(26));
    assert_eq!(t.wire.len(), 1, "{t:?}");
    assert_eq!(t.wire[0].2.len(), DATA_OVERHEAD);
    assert_eq!(t.wire[0].2[0], MSG_DATA);
    assert_eq!(t.drops, vec![]);
    // B got A's keepalive; B's own timers (no keepalive set) stay quiet.
    let t = p.tick(Side::B, t0);
    assert!(t.wire.is_empty(), "{t:?}");
    // Turning keepalive off stops them.
    p.a.upsert_peer(
        B_ID,
        PeerConfig {
            public_key: b_key,
            endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: None,
        },
    )
    .expect("off");
    let t = p.tick(Side::A, t0 + Duration::from_secs(100));
    assert!(t.wire.iter().all(|w| w.2[0] != MSG_DATA), "{t:?}");
}

#[test]
fn simultaneous_handshakes_deliver_both_queued_packets() {
    let mut p = pair();
    let a_cfg = host_peer(p.a.public_key(), p.a_addr, A_V4, A_V6, None);
    p.b.upsert_peer(A_ID, a_cfg).expect("endpoint for A");
    let ping = ipv4_packet(A_V4, B_V4, 40);
    let pong = ipv6_packet(B_V6, A_V6, 40);
    let mut out = vec![0u8; BUF_LEN];
    let mut init = |dp: &mut DataPlane, pkt: &[u8]| -> Vec<u8> {
        let mut buf = vec![0u8; BUF_LEN];
        buf[..pkt.len()].copy_from_slice(pkt);
        match dp.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
            Outgoing::Send { data, .. } => {
                assert_eq!(data[0], MSG_HANDSHAKE_INIT);
                data.to_vec()
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    let init_a = init(&mut p.a, &ping);
    let init_b = init(&mut p.b, &pong);
    let t1 = p.deliver(Side::B, &init_a);
    let t2 = p.deliver(Side::A, &init_b);
    let mut at_b = t1.tun_at(Side::B);
    at_b.extend(t2.tun_at(Side::B));
    let mut at_a = t1.tun_at(Side::A);
    at_a.extend(t2.tun_at(Side::A));
    assert_eq!(at_b, vec![ping.as_slice()], "{t1:?} {t2:?}");
    assert_eq!(at_a, vec![pong.as_slice()], "{t1:?} {t2:?}");
    // Both directions keep working afterwards.
    let t = p.send_packet(Side::B, &pong);
    assert_eq!(t.tun_at(Side::A), vec![pong.as_slice()]);
    let t = p.send_packet(Side::A, &ping);
    assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()]);
}

#[test]
fn data_plane_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<DataPlane>();
}

/// What `handle_tun_packet` reads from a TUN packet: destination and real length.
fn parse_destination(packet: &[u8]) -> Option<(IpAddr, usize)> {
    let ip = crate::wire::ip::IpPacket::new_checked(packet).ok()?;
    Some((ip.dst(), ip.total_len()))
}

#[test]
fn parse_destination_checks_headers() {
    let v4 = ipv4_packet(A_V4, B_V4, 8);
    assert_eq!(parse_destination(&v4), Some((IpAddr::V4(B_V4), 28)));
    let v6 = ipv6_packet(A_V6, B_V6, 8);
    assert_eq!(parse_destination(&v6), Some((IpAddr::V6(B_V6), 48)));
    assert_eq!(parse_destination(&v4[..27]), None);
    assert_eq!(parse_destination(&v6[..47]), None);
    assert_eq!(parse_destination(&[]), None);
    assert_eq!(parse_destination(&[0x45]), None);
    assert_eq!(parse_destination(&[0x60; 39]), None);
}

#[test]
fn relay_forwards_between_spokes_both_families() {
    let mut net = relayed();
    let mut bytes = 0;
    for (hop, ping) in [
        (Hop::A, ipv4_packet(A_V4, B_V4, 100)),
        (Hop::B, ipv4_packet(B_V4, A_V4, 33)),
        (Hop::A, ipv6_packet(A_V6, B_V6, 1000)),
        (Hop::B, ipv6_packet(B_V6, A_V6, 8)),
    ] {
        let (from, to, dst) = match hop {
            Hop::B => (B_ID, A_ID, Hop::A),
            _ => (A_ID, B_ID, Hop::B),
        };
        let t = net.send_packet(hop, &ping);
        assert_eq!(t.tun_at(dst), vec![ping.as_slice()], "{t:?}");
        assert!(t.tun_at(Hop::R).is_empty(), "{t:?}");
        assert_eq!(t.forwarded, vec![(Hop::R, from, to)]);
        assert!(t.drops.is_empty(), "{t:?}");
        bytes += ping.len() as u64;
    }
    let c = net.r.counters();
    assert_eq!((c.relayed_packets, c.relayed_bytes), (4, bytes));
    assert_eq!(c.total_drops(), 0);
    // The relay's own address is for its TUN.
    let t = net.send_packet(Hop::A, &ipv4_packet(A_V4, R_V4, 20));
    assert_eq!(t.tun_at(Hop::R).len(), 1);
    assert!(t.forwarded.is_empty());
}

#[test]
fn only_a_relay_forwards_and_never_back_to_the_sender() {
    let mut net = relayed();
    net.r.set_relay(false);
    let ping = ipv4_packet(A_V4, B_V4, 40);
    let t = net.send_packet(Hop::A, &ping);
    assert_eq!(t.tun_at(Hop::R), vec![ping.as_slice()]);
    assert!(t.tun_at(Hop::B).is_empty() && t.forwarded.is_empty());
    assert_eq!(net.r.counters().relayed_packets, 0);
    net.r.set_relay(true);
    let back = ipv4_packet(A_V4, A_V4, 40);
    assert_eq!(net.r.forward_to(A_ID, &back), Ok(None));
    assert_eq!(net.r.forward_to(B_ID, &back), Ok(Some(A_ID)));
    assert_eq!(net.r.forward_to(B_ID, &back[..19]), Ok(None));
}

/// B is the exit: A (a spoke) routes the internet into the relay, which sends it
/// to B and B's answers, from internet sources, back to A and never to its TUN.
#[test]
fn a_relay_carries_internet_traffic_to_its_exit() {
    let mut net = relayed();
    let mut to_relay = host_nets(R_V4, R_V6);
    to_relay.extend(host_nets(B_V4, B_V6));
    to_relay.extend(["0.0.0.0/0", "::/0"].map(|n| n.parse::<IpNet>().unwrap()));
    net.a
        .upsert_peer(
            R_ID,
            PeerConfig {
                public_key: net.r.public_key(),
                endpoint: Some(net.r_addr),
                allowed_ips: to_relay,
                persistent_keepalive: None,
            },
        )
        .unwrap();
    let internet_v4: std::net::Ipv4Addr = "198.51.100.10".parse().unwrap();
    let internet_v6: std::net::Ipv6Addr = "2001:db8:100::10".parse().unwrap();
    let out = ipv4_packet(A_V4, internet_v4, 40);
    // No exit set: as before, the relay's own TUN.
    let t = net.send_packet(Hop::A, &out);
    assert_eq!(t.tun_at(Hop::R), vec![out.as_slice()]);
    let local: Vec<IpNet> = ["100.64.0.0/10", "fd00::/64"]
        .map(|n| n.parse().unwrap())
        .to_vec();
    // A chose no exit: its internet traffic goes to the relay's TUN.
    net.r
        .set_relay_exit(Some(RelayExit::new(vec![(B_ID, None)], local.clone())));
    let t = net.send_packet(Hop::A, &out);
    assert_eq!(t.tun_at(Hop::R), vec![out.as_slice()]);
    net.r.set_relay_exit(Some(RelayExit::new(
        vec![(A_ID, Some(B_ID))],
        local.clone(),
    )));
    for (out, back) in [
        (
            ipv4_packet(A_V4, internet_v4, 40),
            ipv4_packet(internet_v4, A_V4, 40),
        ),
        (
            ipv6_packet(A_V6, internet_v6, 40),
            ipv6_packet(internet_v6, A_V6, 40),
        ),
    ] {
        let t = net.send_packet(Hop::A, &out);
        assert_eq!(t.tun_at(Hop::B), vec![out.as_slice()], "{t:?}");
        assert!(t.tun_at(Hop::R).is_empty(), "{t:?}");
        let t = net.send_packet(Hop::B, &back);
        assert_eq!(t.tun_at(Hop::A), vec![back.as_slice()], "{t:?}");
        assert!(t.tun_at(Hop::R).is_empty(), "{t:?}");
    }
    // Internet sources from the exit never reach the relay itself.
    let bad = net.r.counters().bad_source;
    let t = net.send_packet(Hop::B, &ipv4_packet(internet_v4, R_V4, 40));
    assert!(t.tun_at(Hop::R).is_empty(), "{t:?}");
    assert_eq!(net.r.counters().bad_source, bad + 1);
    // Nor from anyone else.
    let t = net.send_packet(Hop::A, &ipv4_packet(internet_v4, R_V4, 40));
    assert!(t.tun_at(Hop::R).is_empty(), "{t:?}");
    // Organization addresses are never the internet: the relay's TUN.
    let stray = ipv4_packet(A_V4, "100.64.0.77".parse().unwrap(), 40);
    let t = net.send_packet(Hop::A, &stray);
    assert_eq!(t.tun_at(Hop::R), vec![stray.as_slice()]);
    // A's exit gone: dropped, neither sent to another exit nor to the relay's TUN.
    net.r
        .set_relay_exit(Some(RelayExit::new(vec![(A_ID, None)], local.clone())));
    let no_route = net.r.counters().no_route;
    for out in [
        ipv4_packet(A_V4, internet_v4, 40),
        ipv6_packet(A_V6, internet_v6, 40),
    ] {
        let t = net.send_packet(Hop::A, &out);
        assert!(t.tun_at(Hop::B).is_empty(), "{t:?}");
        assert!(t.tun_at(Hop::R).is_empty(), "{t:?}");
    }
    assert_eq!(net.r.counters().no_route, no_route + 2);
    // B is no exit of anyone now: its internet sources are refused.
    let t = net.send_packet(Hop::B, &ipv4_packet(internet_v4, A_V4, 40));
    assert!(t.tun_at(Hop::A).is_empty(), "{t:?}");
    // No table at all: back to the relay's TUN (which routes no internet for peers).
    net.r.set_relay_exit(None);
    let t = net.send_packet(Hop::A, &out);
    assert!(t.tun_at(Hop::B).is_empty(), "{t:?}");
}

#[test]
fn relay_exit_table_is_sorted_and_deduplicated() {
    let t = RelayExit::new(
        vec![(9, Some(2)), (3, None), (5, Some(2)), (3, Some(7))],
        Vec::new(),
    );
    assert_eq!(
        t.exits.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![3, 5, 9]
    );
}

#[test]
fn relay_without_forward_room_drops_and_counts() {
    let mut net = relayed();
    let data = encrypt(&mut net.a, &ipv4_packet(A_V4, B_V4, 40));
    let mut out = vec![0u8; BUF_LEN];
    assert_eq!(
        net.r.handle_datagram(net.a_addr, &data, &mut out),
        Incoming::Drop(DropReason::BufferTooSmall)
    );
    assert_eq!(net.r.counters().buffer_too_small, 1);
    assert_eq!(net.r.counters().relayed_packets, 0);
}

/// The handshake limiter admits [`HANDSHAKE_RATE_LIMIT`] per second, not per
/// [`TICK`]: the ticks within one second do not reset its count (boringtun's
/// `reset_count` keeps its own one-second period, on the real clock), the first
/// tick after a second has passed does.
#[test]
fn handshake_limiter_is_a_rate_per_second() {
    let mut p = pair();
    let mut out = vec![0u8; BUF_LEN];
    let init = encrypt(&mut p.a, &ipv4_packet(A_V4, B_V4, 30));
    let from = p.a_addr;
    let mut flood = |b: &mut DataPlane, now: Instant| {
        b.handle_timeout(now);
        while b.poll_transmit(&mut out).is_some() {}
        let mut admitted = 0u64;
        for _ in 0..HANDSHAKE_RATE_LIMIT {
            let cookie = matches!(
                b.handle_datagram(from, &init, &mut out),
                Incoming::Send { data, .. } if data.first() == Some(&MSG_COOKIE_REPLY)
            );
            admitted += u64::from(!cookie);
        }
        admitted
    };
    let t0 = Instant::now();
    let first_second: u64 = (0..4u32).map(|k| flood(&mut p.b, t0 + TICK * k)).sum();
    assert!(first_second > 0);
    assert!(
        first_second <= HANDSHAKE_RATE_LIMIT,
        "{first_second} initiations escaped the cookie check within one second of ticks (limit {HANDSHAKE_RATE_LIMIT}/s)"
    );
    // The limiter's period runs on the real clock: let one second pass.
    std::thread::sleep(Duration::from_millis(1050));
    let next_second = flood(&mut p.b, t0 + Duration::from_secs(1));
    assert!(next_second > 0, "the limiter was not reset after a second");
    assert!(next_second <= HANDSHAKE_RATE_LIMIT);
}

/// B allows only udp 53 from A.
const UDP_53: &str = "[[allow]]\nfrom = [\"a\"]\nto = [\"b\"]\nproto = \"udp\"\nports = [\"53\"]\n";

fn l4(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    if proto == protocol::TCP {
        ip_packet(src, dst, proto, &tcp_header(sport, dport))
    } else {
        ip_packet(src, dst, proto, &udp_datagram(sport, dport, 8))
    }
}

#[test]
fn policy_filters_inbound_after_decryption_and_lets_replies_pass() {
    let mut p = connected_pair();
    p.b.set_policy(Some(pair_table(UDP_53, Side::B)), Instant::now());
    for (a, b) in [
        (IpAddr::V4(A_V4), IpAddr::V4(B_V4)),
        (IpAddr::V6(A_V6), IpAddr::V6(B_V6)),
    ] {
        let before = p.b.counters().policy;
        // Denied: tcp 22, udp 54, ping.
        for packet in [
            l4(a, b, protocol::TCP, 40000, 22),
            l4(a, b, protocol::UDP, 40000, 54),
            if a.is_ipv4() {
                ipv4_packet(A_V4, B_V4, 16)
            } else {
                ipv6_packet(A_V6, B_V6, 16)
            },
        ] {
            let t = p.send_packet(Side::A, &packet);
            assert!(t.tun_at(Side::B).is_empty(), "{t:?}");
            assert_eq!(t.drops, vec![(Side::B, DropReason::Policy)]);
        }
        assert_eq!(p.b.counters().policy, before + 3);
        // Allowed: udp 53, and its answer back.
        let query = l4(a, b, protocol::UDP, 40000, 53);
        let t = p.send_packet(Side::A, &query);
        assert_eq!(t.tun_at(Side::B), vec![query.as_slice()]);
        let answer = l4(b, a, protocol::UDP, 53, 40000);
        assert_eq!(
            p.send_packet(Side::B, &answer).tun_at(Side::A),
            vec![answer.as_slice()]
        );
        // B's own connection to A: A's replies pass B's filter.
        let syn = l4(b, a, protocol::TCP, 50000, 443);
        assert_eq!(p.send_packet(Side::B, &syn).tun_at(Side::A).len(), 1);
        let syn_ack = l4(a, b, protocol::TCP, 443, 50000);
        assert_eq!(
            p.send_packet(Side::A, &syn_ack).tun_at(Side::B),
            vec![syn_ack.as_slice()]
        );
    }
    assert_eq!(p.b.counters().policy, 6);
    assert_eq!(p.b.filter().map(Filter::live_flows), Some(4));
    // A new policy forbids A's udp flow at once; B's own flow goes on.
    p.b.set_policy(Some(pair_table("", Side::B)), Instant::now());
    let query = l4(IpAddr::V4(A_V4), IpAddr::V4(B_V4), protocol::UDP, 40000, 53);
    assert!(p.send_packet(Side::A, &query).tun_at(Side::B).is_empty());
    let syn_ack = l4(
        IpAddr::V4(A_V4),
        IpAddr::V4(B_V4),
        protocol::TCP,
        443,
        50000,
    );
    assert_eq!(p.send_packet(Side::A, &syn_ack).tun_at(Side::B).len(), 1);
    // No policy: everything passes again.
    p.b.set_policy(None, Instant::now());
    let denied = l4(IpAddr::V4(A_V4), IpAddr::V4(B_V4), protocol::TCP, 40000, 22);
    assert_eq!(p.send_packet(Side::A, &denied).tun_at(Side::B).len(), 1);
    assert_eq!(p.b.counters().policy, 7);
    assert!(p.b.filter().is_none());
}

#[test]
fn a_full_flow_table_is_counted_apart() {
    let mut p = connected_pair();
    let now = Instant::now();
    p.b.set_filter(Some(Filter::with_capacity(
        pair_table(UDP_53, Side::B),
        now,
        16,
    )));
    let (a, b) = (IpAddr::V6(A_V6), IpAddr::V6(B_V6));
    let mut passed = 0;
    for port in 0..20 {
        let t = p.send_packet(Side::A, &l4(a, b, protocol::UDP, 30000 + port, 53));
        passed += t.tun_at(Side::B).len();
    }
    assert_eq!(passed, 16);
    assert_eq!(p.b.counters().flow_table_full, 4);
    assert_eq!(p.b.counters().policy, 0);
    // B's own new flows are sent anyway, and counted as unrecorded.
    let out = l4(b, a, protocol::UDP, 7, 7);
    assert_eq!(p.send_packet(Side::B, &out).tun_at(Side::A).len(), 1);
    assert_eq!(p.b.counters().flows_unrecorded, 1);
    // The timer tick moves the filter's clock: after 61 s the slots are free.
    p.tick(Side::B, now + Duration::from_secs(61));
    let t = p.send_packet(Side::A, &l4(a, b, protocol::UDP, 30019, 53));
    assert_eq!(t.tun_at(Side::B).len(), 1, "{t:?}");
}

/// The kernel's own router solicitations and link-local chatter from the TUN are no
/// drops: ignored and counted apart; a unicast with no route still is one.
#[test]
fn kernel_link_local_chatter_is_not_a_drop() {
    let mut dp = DataPlane::new(secret_key(1));
    let mut out = vec![0u8; BUF_LEN];
    let fe80: std::net::Ipv6Addr = "fe80::1".parse().expect("ip");
    for dst in ["ff02::2", "ff02::16", "fe80::2"] {
        let mut buf = vec![0u8; BUF_LEN];
        let pkt = ipv6_packet(fe80, dst.parse().expect("ip"), 8);
        buf[..pkt.len()].copy_from_slice(&pkt);
        assert!(matches!(
            dp.handle_tun_packet(&mut buf, pkt.len(), &mut out),
            Outgoing::Nothing
        ));
    }
    let mut buf = vec![0u8; BUF_LEN];
    let pkt = ipv4_packet(A_V4, "224.0.0.22".parse().expect("ip"), 8);
    buf[..pkt.len()].copy_from_slice(&pkt);
    assert!(matches!(
        dp.handle_tun_packet(&mut buf, pkt.len(), &mut out),
        Outgoing::Nothing
    ));
    let pkt = ipv4_packet(A_V4, "100.64.0.9".parse().expect("ip"), 8);
    buf[..pkt.len()].copy_from_slice(&pkt);
    assert!(matches!(
        dp.handle_tun_packet(&mut buf, pkt.len(), &mut out),
        Outgoing::Drop(DropReason::NoRoute)
    ));
    assert_eq!(dp.counters().link_local_ignored, 4);
    assert_eq!(dp.counters().total_drops(), 1);
}

#[test]
fn path_counters_tell_answered_handshakes_probes_and_misrouted_sources() {
    let mut p = pair();
    let t = p.send_packet(Side::A, &ipv4_packet(A_V4, B_V4, 40));
    assert_eq!(t.tun_at(Side::B).len(), 1);
    let at_a = p.a.peer_stats(B_ID).unwrap().path;
    let at_b = p.b.peer_stats(A_ID).unwrap().path;
    // A initiated and B answered: only A counts an answered handshake.
    assert_eq!((at_a.responses, at_b.responses), (1, 0));
    assert_eq!(at_a.tx_data, 1);
    // A check handshake at the next tick, answered.
    p.a.probe(B_ID);
    let t = p.tick(Side::A, Instant::now());
    let kinds: Vec<u8> = t.wire.iter().map(|(_, _, d)| d[0]).collect();
    assert!(kinds.starts_with(&[1, 2]), "{kinds:?}");
    assert_eq!(p.a.peer_stats(B_ID).unwrap().path.responses, 2);
    // B also routes 100.64.0.9 to a third peer X: A's packet from that source is
    // dropped, and counted on X (its traffic came through A) and on A.
    let x = peer_cfg(77, "192.0.2.77:51820", &["100.64.0.9/32"]);
    p.b.upsert_peer(7, x).unwrap();
    let t = p.send_packet(Side::A, &ipv4_packet(R_V4, B_V4, 40));
    assert!(t.tun_at(Side::B).is_empty());
    let xs = p.b.peer_stats(7).unwrap().path;
    assert_eq!((xs.via_other, xs.via), (1, Some(A_ID)));
    assert_eq!(p.b.peer_stats(A_ID).unwrap().path.direct_while_elsewhere, 1);
}

/// A relay enforces the table of a spoke that cannot (a stock WireGuard device) on
/// what it forwards to it; the spoke's own flows open the way for their replies.
#[test]
fn relay_filters_for_a_peer_that_cannot() {
    let mut net = relayed();
    net.r
        .set_relay_policy(B_ID, Some(pair_table(UDP_53, Side::B)), Instant::now());
    assert_eq!(net.r.relay_filtered().collect::<Vec<_>>(), vec![B_ID]);
    for (a, b) in [
        (IpAddr::V4(A_V4), IpAddr::V4(B_V4)),
        (IpAddr::V6(A_V6), IpAddr::V6(B_V6)),
    ] {
        let denied = l4(a, b, protocol::TCP, 40000, 22);
        let t = net.send_packet(Hop::A, &denied);
        assert!(
            t.tun_at(Hop::B).is_empty() && t.forwarded.is_empty(),
            "{t:?}"
        );
        assert_eq!(t.drops, vec![(Hop::R, DropReason::Policy)]);
        let allowed = l4(a, b, protocol::UDP, 40000, 53);
        let t = net.send_packet(Hop::A, &allowed);
        assert_eq!(t.tun_at(Hop::B), vec![allowed.as_slice()], "{t:?}");
        // B's own connection: A's reply passes the relay's filter for B.
        let syn = l4(b, a, protocol::TCP, 50000, 443);
        assert_eq!(net.send_packet(Hop::B, &syn).tun_at(Hop::A).len(), 1);
        let syn_ack = l4(a, b, protocol::TCP, 443, 50000);
        assert_eq!(
            net.send_packet(Hop::A, &syn_ack).tun_at(Hop::B),
            vec![syn_ack.as_slice()]
        );
    }
    assert_eq!(net.r.counters().policy, 2);
    // Towards A (no table on the relay) everything passes.
    let to_a = l4(IpAddr::V4(B_V4), IpAddr::V4(A_V4), protocol::TCP, 40000, 22);
    assert_eq!(net.send_packet(Hop::B, &to_a).tun_at(Hop::A).len(), 1);
    // The relay's own packets to B are held to B's table too.
    let mut buf = l4(IpAddr::V4(R_V4), IpAddr::V4(B_V4), protocol::TCP, 40000, 22);
    let len = buf.len();
    buf.resize(len + 64, 0);
    let mut out = vec![0u8; BUF_LEN];
    assert_eq!(
        net.r.handle_tun_packet(&mut buf, len, &mut out),
        Outgoing::Drop(DropReason::Policy)
    );
    // Removed: B is reached unfiltered again.
    net.r.set_relay_policy(B_ID, None, Instant::now());
    let denied = l4(IpAddr::V4(A_V4), IpAddr::V4(B_V4), protocol::TCP, 40000, 22);
    assert_eq!(net.send_packet(Hop::A, &denied).tun_at(Hop::B).len(), 1);
}

/// Installing peers makes no session state; the first packet to a peer (or a valid
/// initiation from it) does. A data message with a forged receiver index for a peer
/// without a `Tunn` is dropped without making one.
#[test]
fn sessions_are_made_on_first_use() {
    let mut p = pair();
    assert!(p.a.peers.values().all(|peer| peer.tunn.is_none()));
    assert!(p.b.peers.values().all(|peer| peer.tunn.is_none()));
    assert_eq!(p.a.peer_stats(B_ID).and_then(|s| s.last_handshake), None);

    let index = p.b.peers.get(&A_ID).expect("peer").index;
    let mut forged = vec![0u8; 32 + 16];
    forged[0] = MSG_DATA;
    forged[4..8].copy_from_slice(&(index << 8).to_le_bytes());
    let mut out = vec![0u8; BUF_LEN];
    let from: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
    assert!(matches!(
        p.b.handle_datagram(from, &forged, &mut out),
        Incoming::Drop(DropReason::Decrypt)
    ));
    assert!(p.b.peers.get(&A_ID).expect("peer").tunn.is_none());

    // The first packet makes A's session with B, B's on the initiation.
    let ping = ipv4_packet(A_V4, B_V4, 56);
    let t = p.send_packet(Side::A, &ping);
    assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()], "A→B: {t:?}");
    assert!(p.a.peers.get(&B_ID).expect("peer").tunn.is_some());
    assert!(p.b.peers.get(&A_ID).expect("peer").tunn.is_some());
}

/// Persistent keepalives make sessions at most `NEW_SESSIONS_PER_TICK` a tick: a
/// snapshot of thousands of peers starts its handshakes over a few ticks.
#[test]
fn keepalives_make_sessions_a_batch_per_tick() {
    let mut dp = DataPlane::new(secret_key(1));
    for i in 0..1500u64 {
        let mut cfg = peer_cfg(1000 + i, "192.0.2.9:51820", &[]);
        cfg.persistent_keepalive = Some(25);
        dp.upsert_peer(i as PeerId, cfg).expect("peer");
    }
    let with_tunn = |dp: &DataPlane| dp.peers.values().filter(|p| p.tunn.is_some()).count();
    let now = Instant::now();
    dp.handle_timeout(now);
    assert_eq!(with_tunn(&dp), 1024);
    dp.handle_timeout(now + TICK);
    assert_eq!(with_tunn(&dp), 1500);
}

/// Sticky sources: each peer is answered from the local address its last
/// authenticated datagram arrived on; a configured endpoint, or the shell
/// reporting the address gone, lets the kernel choose again.
#[test]
fn answers_leave_from_the_address_the_peer_wrote_to() {
    let mut p = pair();
    let local = |ip: &str, ifindex| LocalAddr {
        ip: ip.parse().expect("ip"),
        ifindex,
    };
    let (b1, b2, a1) = (
        local("198.51.100.2", 3),
        local("198.51.100.7", 3),
        local("192.0.2.1", 2),
    );
    let mut out = vec![0u8; BUF_LEN];
    // A's initiation reaches B at b1: the response leaves from b1, and b1 sticks.
    let init = encrypt(&mut p.a, &ipv4_packet(A_V4, B_V4, 56));
    let response =
        match p
            .b
            .handle_datagram_or_forward(p.a_addr, Some(b1), &init, &mut out, &mut [])
        {
            Incoming::Send { to, src, data } => {
                assert_eq!((to, src), (p.a_addr, Some(b1)));
                data.to_vec()
            }
            other => panic!("unexpected {other:?}"),
        };
    assert_eq!(p.b.peer_source(A_ID), Some(b1));
    // A gets the response at a1: its queued packet (and keepalive) leave from a1.
    let mut fwd = vec![0u8; BUF_LEN];
    let r =
        p.a.handle_datagram_or_forward(p.b_addr, Some(a1), &response, &mut out, &mut fwd);
    assert!(
        matches!(r, Incoming::Send { src: Some(s), .. } if s == a1),
        "{r:?}"
    );
    let mut flushed = Vec::new();
    while let Some(t) = p.a.poll_transmit(&mut out) {
        assert_eq!((t.to, t.src), (p.b_addr, Some(a1)));
        flushed.push(t.data.to_vec());
    }
    assert!(!flushed.is_empty());
    // The data reaches B at b2 (A's endpoint for B moved there): b2 sticks.
    for d in &flushed {
        p.b.handle_datagram_or_forward(p.a_addr, Some(b2), d, &mut out, &mut fwd);
    }
    assert_eq!(p.b.peer_source(A_ID), Some(b2));
    let mut buf = vec![0u8; BUF_LEN];
    let pong = ipv4_packet(B_V4, A_V4, 56);
    buf[..pong.len()].copy_from_slice(&pong);
    match p.b.handle_tun_packet(&mut buf, pong.len(), &mut out) {
        Outgoing::Send { to, src, .. } => assert_eq!((to, src), (p.a_addr, Some(b2))),
        other => panic!("unexpected {other:?}"),
    }
    // A failure reported for another endpoint or source changes nothing; for this
    // one, the kernel chooses.
    p.b.forget_source("192.0.2.99:1".parse().expect("addr"), b2);
    p.b.forget_source(p.a_addr, b1);
    assert_eq!(p.b.peer_source(A_ID), Some(b2));
    p.b.forget_source(p.a_addr, b2);
    assert_eq!(p.b.peer_source(A_ID), None);
    // A replayed datagram is dropped and teaches nothing; an authenticated one
    // teaches its local address (none when the shell gives none).
    p.b.handle_datagram_or_forward(p.a_addr, Some(b1), &flushed[0], &mut out, &mut fwd);
    assert_eq!(p.b.peer_source(A_ID), None);
    let t = p.send_packet(Side::A, &ipv4_packet(A_V4, B_V4, 20));
    assert_eq!(t.tun_at(Side::B).len(), 1);
    assert_eq!(p.b.peer_source(A_ID), None, "no local address given");
    let a_pub = p.a.public_key();
    let cfg = |endpoint| PeerConfig {
        public_key: a_pub,
        endpoint,
        allowed_ips: host_nets(A_V4, A_V6),
        persistent_keepalive: None,
    };
    p.b.handle_datagram_or_forward(
        p.a_addr,
        Some(b1),
        &encrypt(&mut p.a, &ipv4_packet(A_V4, B_V4, 20)),
        &mut out,
        &mut fwd,
    );
    assert_eq!(p.b.peer_source(A_ID), Some(b1));
    // A configuration without an endpoint keeps it, a configured endpoint forgets it.
    p.b.upsert_peer(A_ID, cfg(None)).expect("update");
    assert_eq!(p.b.peer_source(A_ID), Some(b1));
    p.b.upsert_peer(A_ID, cfg(Some(p.a_addr))).expect("update");
    assert_eq!(p.b.peer_source(A_ID), None);
}
