//! Robustness against attackers on the underlay: a flood of valid-looking handshake
//! initiations from many addresses, hostile and forged datagrams at a node's WireGuard
//! port (including a forged handshake response racing a real handshake), and
//! low-order public keys. Needs root (namespaces, TUN, raw and packet sockets).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use common::cluster::{Cluster, wait_until};
use common::netns::{Netns, in_ns};
use common::{Coordinator, register_request};
use nexodus::client::ClientError;
use nexodus::coord::keys::{encode_key, parse_public_key};
use nexodus::join::status::Status;
use nexodus::node::dataplane::{DataPlane, DataPlaneError, PeerConfig};
use nexodus::wire::control::{Request, Response};
use rand::Rng;

const PING_WAIT: Duration = Duration::from_secs(30);
/// Each test's own deadline (the suite's limit is 3 minutes).
const DEADLINE: Duration = Duration::from_secs(170);

// ---------------------------------------------------------------------------------
// Harness bits

/// Runs `body` on a thread of its own and fails the test if it takes longer than
/// `limit`. Every wait inside is bounded too, so the thread ends (and cleans up).
fn with_deadline(name: &str, limit: Duration, body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let _ = tx.send(());
            if let Err(e) = r {
                std::panic::resume_unwind(e);
            }
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(()) => {
            if let Err(e) = handle.join() {
                std::panic::resume_unwind(e);
            }
        }
        Err(_) => panic!("{name}: deadline of {limit:?} exceeded"),
    }
}

fn drop_count(s: &Status, reason: &str) -> u64 {
    s.drops.get(reason).copied().unwrap_or(0)
}

/// Drop counters that grew between two statuses: reason → increase.
fn drop_deltas(before: &Status, after: &Status) -> BTreeMap<String, u64> {
    after
        .drops
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(drop_count(before, k))))
        .filter(|(_, d)| *d > 0)
        .collect()
}

fn assert_running(node: &mut common::cluster::Node) {
    let exited = node
        .child
        .as_mut()
        .expect("node running")
        .try_wait()
        .unwrap();
    assert!(exited.is_none(), "{} exited: {exited:?}", node.name);
    assert!(
        node.status().is_some(),
        "{} does not answer status",
        node.name
    );
}

fn key_bytes(b64: &str) -> [u8; 32] {
    parse_public_key(b64).expect("node key")
}

// ---------------------------------------------------------------------------------
// WireGuard's MAC1 = keyed-BLAKE2s-128(BLAKE2s-256("mac1----" || receiver's public
// key), message), to put a valid MAC1 on forged handshake responses.

/// MAC1 of `msg` (everything before the MAC fields) for a receiver with `public`.
fn mac1(public: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    use blake2::digest::{Digest, Mac};
    let key = blake2::Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(public)
        .finalize();
    let mac = blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&key)
        .unwrap()
        .chain_update(msg)
        .finalize()
        .into_bytes();
    mac.into()
}

/// A MAC1-valid handshake initiation to `responder` from a fresh random identity.
fn initiation_to(responder: &[u8; 32]) -> Vec<u8> {
    let secret = StaticSecret::from(rand::random::<[u8; 32]>());
    let index = rand::random::<u32>() >> 8;
    let mut tunn = Tunn::new(secret, PublicKey::from(*responder), None, None, index, None);
    let mut buf = [0u8; 256];
    match tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no initiation"),
    }
}

/// Checks this file's MAC1 against boringtun's on a real initiation.
fn assert_mac1_matches_boringtun(responder: &[u8; 32]) {
    let init = initiation_to(responder);
    assert_eq!(init.len(), 148);
    assert_eq!(
        mac1(responder, &init[..116]),
        init[116..132],
        "MAC1 of the test disagrees with boringtun"
    );
}

/// A forged handshake response (type 2) to `receiver_idx`, MAC1-valid for a
/// receiver with `public` but with random ephemeral key and tag.
fn forged_response(public: &[u8; 32], receiver_idx: u32) -> Vec<u8> {
    let mut rng = rand::rng();
    let mut m = vec![2u8, 0, 0, 0];
    m.extend_from_slice(&rng.random::<u32>().to_le_bytes());
    m.extend_from_slice(&receiver_idx.to_le_bytes());
    m.extend_from_slice(&rng.random::<[u8; 32]>()); // ephemeral
    m.extend_from_slice(&rng.random::<[u8; 16]>()); // empty, "authenticated"
    let mac = mac1(public, &m);
    m.extend_from_slice(&mac);
    m.extend_from_slice(&[0u8; 16]); // mac2
    assert_eq!(m.len(), 92);
    m
}

/// A forged cookie reply (type 3) to `receiver_idx`.
fn forged_cookie(receiver_idx: u32) -> Vec<u8> {
    let mut m = vec![3u8, 0, 0, 0];
    m.extend_from_slice(&receiver_idx.to_le_bytes());
    m.extend_from_slice(&rand::random::<[u8; 32]>());
    m.extend_from_slice(&rand::random::<[u8; 24]>());
    assert_eq!(m.len(), 64);
    m
}

// ---------------------------------------------------------------------------------
// Packet capture and spoofing

/// A UDP datagram seen on the wire.
struct Seen {
    src: SocketAddrV4,
    payload: Vec<u8>,
}

/// Captures, with an AF_PACKET socket in a namespace, UDP datagrams from `src_ip`
/// to port `dst_port` (before the namespace's firewall sees them).
struct Capture {
    rx: mpsc::Receiver<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn start(ns: &str, src_ip: Ipv4Addr, dst_port: u16) -> Self {
        let sock = in_ns(ns, || {
            let proto = i32::from((libc::ETH_P_IP as u16).to_be());
            let s = socket2::Socket::new(
                socket2::Domain::PACKET,
                socket2::Type::DGRAM,
                Some(socket2::Protocol::from(proto)),
            )
            .expect("AF_PACKET socket");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            s
        });
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let Ok(n) = (&sock).read(&mut buf) else {
                    continue;
                };
                let p = &buf[..n];
                if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
                    continue;
                }
                let ihl = usize::from(p[0] & 0x0f) * 4;
                if p.len() < ihl + 8 {
                    continue;
                }
                let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
                let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
                let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
                if src != src_ip || dport != dst_port {
                    continue;
                }
                let seen = Seen {
                    src: SocketAddrV4::new(src, sport),
                    payload: p[ihl + 8..].to_vec(),
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            stop,
            thread: Some(thread),
        }
    }

    fn clear(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// The next captured datagram for which `f` is true.
    fn next(&self, what: &str, timeout: Duration, f: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(s) if f(&s) => return s,
                Ok(_) => {}
                Err(_) => panic!("no {what} captured within {timeout:?}"),
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `payload` as a UDP datagram from `src` to `dst` through a raw socket
/// (source spoofed), with IP TTL `ttl`.
fn send_spoofed(
    raw: &socket2::Socket,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload: &[u8],
) {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, ttl, 17, 0, 0]); // the kernel fills the checksum
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    p.extend_from_slice(payload);
    let to = socket2::SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
    raw.send_to(&p, &to).expect("send spoofed datagram");
}

fn raw_socket(ns: &str) -> socket2::Socket {
    in_ns(ns, || {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("raw socket")
    })
}

fn udp_socket(ns: &str, ip: Ipv4Addr) -> UdpSocket {
    in_ns(ns, move || {
        let s = UdpSocket::bind((ip, 0)).expect("bind attacker socket");
        s.set_nonblocking(true).unwrap();
        s
    })
}

/// Two meshed nodes `a` (203.0.113.11) and `b` (.12) and an attacker namespace `x`
/// (.100) on the bridge of `tag`, running; B pings A.
struct Site {
    /// Dropped first: the attacker goes before the cluster.
    x: Netns,
    c: Cluster,
    a: Status,
    b: Status,
}

const A: usize = 0;
const B: usize = 1;

fn site(tag: &str) -> Site {
    let mut c = Cluster::new(tag, "203.0.113.1/24");
    let (ia, ib) = (format!("{tag}a0"), format!("{tag}b0"));
    c.add_node("a", "203.0.113.11/24", false, &["--interface", &ia]);
    c.add_node("b", "203.0.113.12/24", false, &["--interface", &ib]);
    let x = c.lan.host("x", "203.0.113.100/24", false);
    c.start(A);
    c.start(B);
    let a = c.nodes[A].wait_peers(1);
    let b = c.nodes[B].wait_peers(1);
    assert!(
        c.nodes[B]
            .ns
            .ping_until(&a.device.tunnel_ip.to_string(), PING_WAIT),
        "B cannot ping A before the attack"
    );
    Site { x, c, a, b }
}

fn a_port(s: &Site) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 11), s.a.device.listen_port)
}

fn b_port(s: &Site) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 12), s.b.device.listen_port)
}

// ---------------------------------------------------------------------------------
// 1. Handshake flood

/// Tells the flood to end as soon as it may (also when the test fails early).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct FloodReport {
    sent: u64,
    secs: f64,
    /// Mean and highest one-second CPU use of the target process, in cores.
    cpu_mean: f64,
    cpu_peak: f64,
    /// How long A kept sending cookie replies after the flood stopped: the time
    /// datagrams waited in A's receive queue.
    backlog_secs: f64,
}

/// Sends the prepared initiations round robin from `socks` to `target` at `rate`
/// per second until `stop` (but at least `min`, at most `max`); counts the cookie
/// replies that come back in `cookies` and samples `pid`'s CPU once a second. Then
/// measures how long replies keep coming (at most 15 s).
#[allow(clippy::too_many_arguments)]
fn flood(
    socks: &[UdpSocket],
    target: SocketAddrV4,
    inits: &[Vec<u8>],
    rate: u64,
    stop: &AtomicBool,
    min: Duration,
    max: Duration,
    cookies: &AtomicU64,
    pid: u32,
) -> FloodReport {
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let hz = common::clock_ticks_per_sec();
    let start = Instant::now();
    let cpu_start = common::cpu_ticks(pid).expect("target alive");
    let (mut last_sample, mut last_ticks) = (start, cpu_start);
    let mut cpu_peak = 0f64;
    let mut sent = 0u64;
    let mut next = start;
    let mut buf = [0u8; 256];
    loop {
        let elapsed = start.elapsed();
        if elapsed >= max || (elapsed >= min && stop.load(Ordering::Relaxed)) {
            break;
        }
        for _ in 0..per_tick {
            let i = sent as usize;
            let sock = &socks[i % socks.len()];
            if sock.send_to(&inits[i % inits.len()], target).is_ok() {
                sent += 1;
            }
        }
        for sock in socks {
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                if n == 64 && buf[0] == 3 {
                    cookies.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if last_sample.elapsed() >= Duration::from_secs(1)
            && let Some(t) = common::cpu_ticks(pid)
        {
            let cores = (t - last_ticks) as f64 / hz / last_sample.elapsed().as_secs_f64();
            cpu_peak = cpu_peak.max(cores);
            (last_sample, last_ticks) = (Instant::now(), t);
        }
        next += tick;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // pacing the sender, not synchronisation
        } else {
            next = Instant::now();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_end = common::cpu_ticks(pid).expect("target alive after the flood");
    let stopped = Instant::now();
    let mut last_reply = stopped;
    while last_reply.elapsed() < Duration::from_secs(1)
        && stopped.elapsed() < Duration::from_secs(15)
    {
        for sock in socks {
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                if n == 64 && buf[0] == 3 {
                    cookies.fetch_add(1, Ordering::Relaxed);
                    last_reply = Instant::now();
                }
            }
        }
        std::thread::sleep(tick);
    }
    FloodReport {
        sent,
        secs,
        cpu_mean: (cpu_end - cpu_start) as f64 / hz / secs,
        cpu_peak,
        backlog_secs: last_reply.duration_since(stopped).as_secs_f64(),
    }
}

#[test]
fn handshake_flood() {
    with_deadline("handshake_flood", DEADLINE, handshake_flood_body);
}

fn handshake_flood_body() {
    let mut s = site("rahf");
    let a_key = key_bytes(&s.a.device.public_key);
    assert_mac1_matches_boringtun(&a_key);

    // 50 attacker addresses, one socket each.
    let batch: String = (101..150)
        .map(|i| format!("addr add 203.0.113.{i}/24 dev eth0\n"))
        .collect();
    s.x.ok_with_stdin(&["ip", "-batch", "-"], &batch);
    let socks: Vec<UdpSocket> = (100..150)
        .map(|i| udp_socket(&s.x.name, Ipv4Addr::new(203, 0, 113, i)))
        .collect();
    // Distinct identities, MAC1-valid for A; replayed round robin.
    let inits: Vec<Vec<u8>> = (0..256).map(|_| initiation_to(&a_key)).collect();

    let target = a_port(&s);
    let a_pid = s.c.nodes[A].pid();
    let before = s.c.nodes[A].status().unwrap();
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let cookies = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, cookies) = (stop.0.clone(), cookies.clone());
        std::thread::spawn(move || {
            flood(
                &socks,
                target,
                &inits,
                3000,
                &stop,
                Duration::from_secs(10),
                Duration::from_secs(90),
                &cookies,
                a_pid,
            )
        })
    };
    // A is under load: it answers with cookie replies.
    wait_until("cookie replies from A", Duration::from_secs(10), || {
        (cookies.load(Ordering::Relaxed) > 100).then_some(())
    });

    // B restarts: its new session needs a handshake with A, during the flood.
    s.c.nodes[B].stop();
    let restarted = Instant::now();
    let cookies_at_restart = cookies.load(Ordering::Relaxed);
    s.c.nodes[B].start(None);
    s.c.nodes[B].wait_peers(1);
    let a_tip = s.a.device.tunnel_ip.to_string();
    let recovered = s.c.nodes[B].ns.ping_until(&a_tip, Duration::from_secs(60));
    let recovery = restarted.elapsed();
    let cookies_at_recovery = cookies.load(Ordering::Relaxed);
    // Stale cookie replies and handshake responses show up here as decrypt drops.
    let b_drops = s.c.nodes[B].status().map(|st| st.drops);
    stop.0.store(true, Ordering::Relaxed);
    let report = flooder.join().unwrap();

    let after = s.c.nodes[A].status();
    let since_restart = restarted.elapsed();
    let deltas = after.as_ref().map(|a| drop_deltas(&before, a));
    eprintln!(
        "handshake_flood: sent {} initiations in {:.1}s ({:.0}/s) from 50 addresses; \
         cookie replies received {}; B↔A recovered={recovered} after {:.1}s (restart → first \
         answered ping); A CPU mean {:.2} cores, peak 1s {:.2} cores; A still answering \
         {:.1}s after the flood stopped (receive backlog); A drops delta {:?}; B drops {:?}",
        report.sent,
        report.secs,
        report.sent as f64 / report.secs,
        cookies.load(Ordering::Relaxed),
        recovery.as_secs_f64(),
        report.cpu_mean,
        report.cpu_peak,
        report.backlog_secs,
        deltas,
        b_drops,
    );
    assert!(
        recovered,
        "B cannot ping A during the flood ({recovery:?}); A's receive backlog was {:.1}s \
         (handshake messages older than REKEY_TIMEOUT = 5 s are useless to their sender)",
        report.backlog_secs
    );
    assert_running(&mut s.c.nodes[A]);
    // The flood went on while B recovered, and A kept answering it with cookies.
    assert!(
        cookies_at_recovery > cookies_at_restart,
        "no cookie replies while B re-handshook"
    );
    let after = after.unwrap();
    let deltas = deltas.unwrap();
    // Initiations under the rate limit are decrypted and refused as unknown keys;
    // the rest are answered with cookie replies instead of being processed, and A
    // counts them in its status.
    let unknown = deltas.get("unknown_peer").copied().unwrap_or(0);
    assert!(unknown > 0, "no unknown_peer drops: {deltas:?}");
    let a_cookies = after.cookie_replies - before.cookie_replies;
    assert!(
        a_cookies > unknown,
        "A did not switch to cookie replies under load: {a_cookies} cookie replies, {deltas:?}"
    );
    assert!(
        a_cookies >= cookies.load(Ordering::Relaxed),
        "A counted {a_cookies} cookie replies but the attacker received {}",
        cookies.load(Ordering::Relaxed)
    );
    assert!(
        report.cpu_mean < 1.8,
        "A used {:.2} cores during the flood",
        report.cpu_mean
    );
    let peer = after.peers.iter().find(|p| p.id == s.b.device.id).unwrap();
    assert!(
        peer.last_handshake_secs
            .is_some_and(|t| t <= since_restart.as_secs()),
        "A has no handshake with B since B restarted: {peer:?}"
    );
}

// ---------------------------------------------------------------------------------
// 2. Hostile datagrams

/// One round of garbage for A's port; `real_idx` is A's receiver index for B's
/// session, `real_data` a genuine data message B sent to A.
fn hostile_round(a_key: &[u8; 32], real_idx: u32, real_data: &[u8]) -> Vec<Vec<u8>> {
    let mut rng = rand::rng();
    let mut out = Vec::new();
    let mut random = |len: usize| -> Vec<u8> { (0..len).map(|_| rng.random()).collect() };
    // Random bytes of many lengths (including empty datagrams).
    for len in (0..1500).step_by(3) {
        out.push(random(len));
    }
    // Every WireGuard type with every wrong length (type 4 only needs 32 bytes).
    for ty in 1u8..=4 {
        let valid = [0, 148, 92, 64, 0][usize::from(ty)];
        for len in 0..200 {
            if len == valid || (ty == 4 && len >= 32) {
                continue;
            }
            let mut m = random(len);
            if let Some(b) = m.get_mut(..4.min(len)) {
                b.copy_from_slice(&[ty, 0, 0, 0][..b.len()]);
            }
            out.push(m);
        }
        // Right length, non-zero reserved bytes.
        if valid > 0 {
            let mut m = random(valid);
            m[..4].copy_from_slice(&[ty, 1, 0, 0]);
            out.push(m);
        }
    }
    // Data messages with forged receiver indexes: random, and A's real one.
    for i in 0..400 {
        let len = 32 + 16 * (i % 8);
        let mut m = random(len);
        m[..4].copy_from_slice(&[4, 0, 0, 0]);
        if i % 2 == 1 {
            m[4..8].copy_from_slice(&real_idx.to_le_bytes());
        }
        out.push(m);
    }
    // Genuine data message replayed (from the attacker's address).
    for _ in 0..20 {
        out.push(real_data.to_vec());
    }
    // Handshake responses and cookie replies forged for A's real index (A has no
    // handshake in flight), with valid and with wrong MAC1.
    for i in 0..10 {
        let mut r = forged_response(a_key, real_idx);
        if i % 2 == 1 {
            r[60] ^= 1;
        }
        out.push(r);
        out.push(forged_cookie(real_idx));
    }
    // Initiations: MAC1-valid garbage, and valid ones from unknown keys.
    for _ in 0..5 {
        let mut m = random(148);
        m[..4].copy_from_slice(&[1, 0, 0, 0]);
        let mac = mac1(a_key, &m[..116]);
        m[116..132].copy_from_slice(&mac);
        out.push(m);
        out.push(initiation_to(a_key));
    }
    // Shuffle (Fisher-Yates).
    for i in (1..out.len()).rev() {
        let j = rng.random_range(0..=i);
        out.swap(i, j);
    }
    out
}

fn parse_ping_received(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

#[test]
fn hostile_datagrams() {
    with_deadline("hostile_datagrams", DEADLINE, || {
        let mut s = site("rahd");
        let a_key = key_bytes(&s.a.device.public_key);
        assert_mac1_matches_boringtun(&a_key);
        let (a_addr, b_addr) = (a_port(&s), b_port(&s));
        let b_tip = s.b.device.tunnel_ip.to_string();

        // Watch B's datagrams arrive at A: A's receiver index and a data message to
        // replay.
        let cap = Capture::start(&s.c.nodes[A].ns.name, *b_addr.ip(), a_addr.port());
        assert!(s.c.nodes[A].ns.ping_until(&b_tip, PING_WAIT));
        let data = cap.next("data message from B", Duration::from_secs(10), |d| {
            d.payload.len() > 32 && d.payload[..4] == [4, 0, 0, 0] && d.src == b_addr
        });
        let real_idx = u32::from_le_bytes(data.payload[4..8].try_into().unwrap());
        let blaster = udp_socket(&s.x.name, Ipv4Addr::new(203, 0, 113, 100));
        blaster.set_nonblocking(false).unwrap();
        blast_during_pings(&mut s, &blaster, &a_key, real_idx, &data.payload);
        forged_response_races_handshake(&mut s, &cap, &blaster);
    });
}

/// A ping flow A → B while the blaster sends garbage (and replays) to A's port: the
/// tunnel keeps answering, every kind of garbage is counted, B's endpoint stays.
fn blast_during_pings(
    s: &mut Site,
    blaster: &UdpSocket,
    a_key: &[u8; 32],
    real_idx: u32,
    real_data: &[u8],
) {
    let (a_addr, b_addr) = (a_port(s), b_port(s));
    let b_tip = s.b.device.tunnel_ip.to_string();
    // A ping flow A → B while the blaster sends garbage to A's port.
    let before = s.c.nodes[A].status().unwrap();
    let pings = s.c.nodes[A]
        .ns
        .cmd(&["ping", "-q", "-i", "0.2", "-c", "50", "-W", "1", &b_tip])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut sent = 0usize;
    let blast_start = Instant::now();
    for _ in 0..6 {
        for chunk in hostile_round(a_key, real_idx, real_data).chunks(100) {
            for m in chunk {
                if blaster.send_to(m, a_addr).is_ok() {
                    sent += 1;
                }
            }
            // About 2000 datagrams a second (pacing, not synchronisation).
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let blast_secs = blast_start.elapsed().as_secs_f64();
    let out = pings.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (tx, rx) = parse_ping_received(&text).unwrap_or_else(|| panic!("ping output: {text}"));
    assert_running(&mut s.c.nodes[A]);
    assert!(s.c.nodes[A].ns.ping_until(&b_tip, PING_WAIT));
    let after = s.c.nodes[A].status().unwrap();
    let deltas = drop_deltas(&before, &after);
    eprintln!(
        "hostile_datagrams: {sent} hostile datagrams in {blast_secs:.1}s; ping flow A→B \
         answered {rx}/{tx}; A drops delta {deltas:?}"
    );
    assert!(
        rx * 10 >= tx * 9,
        "the tunnel stopped answering during the blast: {rx}/{tx}"
    );
    for reason in [
        "malformed",
        "unknown_peer",
        "decrypt",
        "replay",
        "handshake",
        "bad_mac",
    ] {
        assert!(
            deltas.get(reason).is_some_and(|d| *d > 0),
            "no {reason} drops counted: {deltas:?}"
        );
    }
    // Nothing unauthenticated moved B's endpoint at A.
    let peer = after.peers.iter().find(|p| p.id == s.b.device.id).unwrap();
    assert_eq!(peer.endpoint, Some(SocketAddr::V4(b_addr)), "{peer:?}");
}

/// B has a handshake in flight and a forged response (and cookie) arrives first: B
/// refuses them and completes its own handshake.
fn forged_response_races_handshake(s: &mut Site, cap: &Capture, blaster: &UdpSocket) {
    let (a_addr, b_addr) = (a_port(s), b_port(s));
    let b_key = key_bytes(&s.b.device.public_key);
    let a_tip = s.a.device.tunnel_ip.to_string();
    // B has a handshake in flight and a forged response arrives first. A's
    // firewall holds back B's own initiations (TTL 64) and A's to B; the test replays
    // the captured one (TTL 77) once the forgeries were processed, so only B's
    // original handshake can complete.
    let rules = format!(
        "table ip rahd {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10; policy accept;\n\
         \t\tip saddr {b} udp dport {a} udp length 156 ip ttl != 77 drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority -10; policy accept;\n\
         \t\tip daddr {b} udp sport {a} udp length 156 drop\n\
         \t}}\n\
         }}\n",
        b = b_addr.ip(),
        a = a_addr.port()
    );
    s.c.nodes[A].ns.ok_with_stdin(&["nft", "-f", "-"], &rules);
    s.c.nodes[B].stop();
    s.c.nodes[B].start(None);
    let b_before = s.c.nodes[B].wait_peers(1);
    assert!(b_before.peers[0].last_handshake_secs.is_none());
    cap.clear();
    // Traffic makes B initiate; the ping itself cannot be answered yet.
    s.c.nodes[B].ns.ping(&a_tip);
    let init = cap.next("B's handshake initiation", Duration::from_secs(15), |d| {
        d.payload.len() == 148 && d.payload[0] == 1 && d.src == b_addr
    });
    let b_sender_idx = u32::from_le_bytes(init.payload[4..8].try_into().unwrap());
    let b_mid = s.c.nodes[B].status().unwrap();
    for _ in 0..3 {
        blaster
            .send_to(&forged_response(&b_key, b_sender_idx), b_addr)
            .unwrap();
        blaster
            .send_to(&forged_cookie(b_sender_idx), b_addr)
            .unwrap();
    }
    // B processed them (MAC1 valid, so they reached the handshake state machine).
    let b_forged = wait_until("B to refuse the forgeries", Duration::from_secs(10), || {
        s.c.nodes[B].status().filter(|st| {
            drop_count(st, "decrypt") + drop_count(st, "handshake")
                >= drop_count(&b_mid, "decrypt") + drop_count(&b_mid, "handshake") + 6
        })
    });
    assert_eq!(
        drop_count(&b_forged, "bad_mac"),
        drop_count(&b_mid, "bad_mac"),
        "forged responses failed MAC1 at B: {:?}",
        b_forged.drops
    );
    assert!(b_forged.peers[0].last_handshake_secs.is_none());
    // The genuine initiation reaches A now; its response must complete B's handshake.
    let raw = raw_socket(&s.x.name);
    send_spoofed(&raw, b_addr, a_addr, 77, &init.payload);
    let done = wait_until(
        "B's pending handshake to complete after the forgery",
        Duration::from_secs(20),
        || {
            s.c.nodes[B]
                .status()
                .filter(|st| st.peers[0].last_handshake_secs.is_some())
        },
    );
    eprintln!(
        "hostile_datagrams: B refused forged response/cookie (drops {:?}), then completed \
         the original handshake",
        drop_deltas(&b_mid, &done)
    );
    s.c.nodes[A]
        .ns
        .ok(&["nft", "delete", "table", "ip", "rahd"]);
    assert!(
        s.c.nodes[B].ns.ping_until(&a_tip, PING_WAIT),
        "B cannot ping A after the handshake"
    );
    assert_running(&mut s.c.nodes[A]);
    assert_running(&mut s.c.nodes[B]);
}

// ---------------------------------------------------------------------------------
// 3. Low-order keys

/// The seven low-order Curve25519 points as WireGuard encodes them (little endian):
/// 0, 1, two points of order 8, and p-1, p, p+1.
fn low_order_points() -> [[u8; 32]; 7] {
    let hex = |s: &str| -> [u8; 32] {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    };
    let mut one = [0u8; 32];
    one[0] = 1;
    let edge = |first: u8| {
        let mut k = [0xff; 32];
        k[0] = first;
        k[31] = 0x7f;
        k
    };
    [
        [0u8; 32],
        one,
        hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        edge(0xec),
        edge(0xed),
        edge(0xee),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_order_keys() {
    common::within(DEADLINE, async {
        let (coord, token, c) = Coordinator::with_client("127.42.0.40", &["--reusable"]).await;
        // `devices add` needs a relay in the organization (stock peers reach the mesh
        // through it), so one is registered first.
        let mut relay = register_request(&token, "relay", 1);
        relay.relay = true;
        let relay_key = relay.public_key.clone();
        let relay_id = match c.call(&Request::Register(relay)).await {
            Ok(Response::Registered { device, .. }) => device.id,
            other => panic!("relay registration: {other:?}"),
        };
        coord
            .admin(&["devices", "approve", &relay_id.to_string(), "--relay"])
            .expect("approving the relay");
        for (i, key) in low_order_points().iter().enumerate() {
            let b64 = encode_key(key);
            // The admin command refuses a stock peer with this key.
            let err = coord
                .admin(&[
                    "devices",
                    "add",
                    "--hostname",
                    &format!("low{i}"),
                    "--public-key",
                    &b64,
                ])
                .expect_err("devices add accepted a low-order key");
            assert!(err.contains("low-order"), "devices add {b64}: {err}");
            // Registration with it is refused by the control API.
            let mut req = register_request(&token, &format!("lowreg{i}"), 100 + i as u64);
            req.public_key = b64.clone();
            match c.call(&Request::Register(req)).await {
                Err(e @ ClientError::Refused { .. }) => {
                    assert!(e.to_string().contains("low-order"), "register {b64}: {e}")
                }
                other => panic!("register with {b64}: {other:?}"),
            }
            // A node's data plane refuses it as a peer, so nothing is ever sent to it.
            let mut dp = DataPlane::new([7u8; 32]);
            let cfg = PeerConfig {
                public_key: *key,
                endpoint: Some("192.0.2.9:51820".parse().unwrap()),
                allowed_ips: vec!["100.64.0.9/32".parse().unwrap()],
                persistent_keepalive: Some(1),
            };
            assert_eq!(
                dp.upsert_peer(9, cfg),
                Err(DataPlaneError::LowOrderKey(9)),
                "{b64}"
            );
            assert_eq!(dp.peers().count(), 0);
        }
        // Nothing was stored, and the service still registers a proper key.
        let listed = coord.admin(&["devices", "--json"]).unwrap();
        let devices: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        assert_eq!(devices.len(), 1, "{listed}");
        assert_eq!(devices[0]["public_key"], relay_key.as_str(), "{listed}");
        let ok = register_request(&token, "fine", 2);
        assert!(matches!(
            c.call(&Request::Register(ok)).await,
            Ok(Response::Registered { .. })
        ));
        c.close().await;
    })
    .await;
}
