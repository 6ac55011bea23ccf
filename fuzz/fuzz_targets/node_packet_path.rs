//! The node's packet path under arbitrary input: one `DataPlane` (A) with two peers
//! (B, established; C, not yet) is driven by a sequence of operations read from the
//! input: datagrams from anywhere, TUN packets, timers, flushing, genuine traffic of
//! the peers (delivered, replayed, mutated, from other addresses), configuration
//! changes and switching A's relaying on and off (B routes C's addresses through A).
//! Nothing may panic, and the documented contracts hold: a `Drop(reason)` bumps that
//! counter by one, counters never go down, a packet written to TUN or relayed has a
//! source inside the sending peer's allowed IPs, and a relayed packet goes to the
//! other peer its destination routes to, counted once. (boringtun's own timers read the
//! real clock, so rekey and session expiry are out of reach here; the `Instant`s
//! given to `handle_timeout` drive our keepalives.) An access policy built from the
//! input (rules over the peers' addresses, CIDRs of both families, protocols and
//! ports; a flow table of a chosen, often tiny, capacity) may be put in force on A,
//! replaced or removed at any step; TUN packets then include TCP, UDP, ICMP errors and
//! IPv6 extension headers.
#![no_main]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nexodus::node::dataplane::{
    Counters, DataPlane, DropReason, Incoming, Outgoing, PeerConfig, PeerId, Transmit,
};
use nexodus::node::filter::Filter;
use nexodus::node::testutil::{
    self, A_ID, A_V4, A_V6, B_ID, B_V4, B_V6, BUF_LEN, host_nets, ip_packet, ipv4_packet,
    ipv6_packet, public_key, secret_key,
};
use nexodus::policy::{DeviceInfo, Policy, compile};
use nexodus::wire::ip::IpPacket;

const C_ID: PeerId = 3;
const D_ID: PeerId = 4;
const C_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
const C_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3);
/// A subnet C routes for (a subnet router's advertised prefix).
const C_LAN: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 0);
const OUT_LEN: usize = BUF_LEN + 64;
/// Bounds on work per input, so no input can make the target slow.
const MAX_OPS: usize = 256;
const MAX_QUEUE: usize = 64;

/// Datagrams in flight between A and the remotes.
type Queue = VecDeque<(SocketAddr, Vec<u8>)>;

/// Queues a datagram unless the queue is full (bounded work per input).
fn enqueue(queue: &mut Queue, to: SocketAddr, data: &[u8]) {
    if queue.len() < MAX_QUEUE {
        queue.push_back((to, data.to_vec()));
    }
}

/// Reads the input front to back; running out yields zeros / empty slices.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }
}

struct Net {
    a: DataPlane,
    b: DataPlane,
    c: DataPlane,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    c_addr: SocketAddr,
    /// Datagrams on their way to A: (from, bytes).
    to_a: Queue,
    /// Datagrams A sent: (to, bytes).
    from_a: Queue,
    /// The last datagram B or C sent towards A (for replays and mutations).
    last: Vec<u8>,
    now: Instant,
    out: Vec<u8>,
    /// Room for A's relayed datagrams.
    forward: Vec<u8>,
}

/// What one call on A produced, for the checks common to every call.
enum Outcome {
    Send(SocketAddr, Vec<u8>),
    Drop(DropReason),
    Other,
}

fn c_config(endpoint: SocketAddr) -> PeerConfig {
    let mut allowed_ips = host_nets(C_V4, C_V6);
    allowed_ips.push(ipnet::IpNet::new(IpAddr::V4(C_LAN), 16).expect("prefix"));
    PeerConfig {
        public_key: public_key(&secret_key(0xc)),
        endpoint: Some(endpoint),
        allowed_ips,
        persistent_keepalive: Some(25),
    }
}

impl Net {
    fn new() -> Self {
        let p = testutil::connected_pair();
        let (mut a, mut b) = (p.a, p.b);
        // B reaches C (and C's LAN) through A, should A relay.
        let mut via_a = c_config(p.a_addr);
        via_a.public_key = a.public_key();
        via_a.allowed_ips.extend(host_nets(A_V4, A_V6));
        via_a.persistent_keepalive = None;
        b.upsert_peer(A_ID, via_a).expect("A at B");
        let c_addr: SocketAddr = "203.0.113.3:51820".parse().expect("addr");
        a.upsert_peer(C_ID, c_config(c_addr)).expect("C at A");
        let mut c = DataPlane::new(secret_key(0xc));
        c.upsert_peer(
            A_ID,
            PeerConfig {
                public_key: a.public_key(),
                endpoint: Some(p.a_addr),
                allowed_ips: host_nets(A_V4, A_V6),
                persistent_keepalive: None,
            },
        )
        .expect("A at C");
        let now = Instant::now();
        a.handle_timeout(now);
        Net {
            a,
            b,
            c,
            a_addr: p.a_addr,
            b_addr: p.b_addr,
            c_addr,
            to_a: VecDeque::new(),
            from_a: VecDeque::new(),
            last: Vec::new(),
            now,
            out: vec![0u8; OUT_LEN],
            forward: vec![0u8; OUT_LEN],
        }
    }

    /// A source address: one of the peers', A's own, or arbitrary v4 / v6.
    fn addr(&self, input: &mut Input) -> SocketAddr {
        match input.u8() % 6 {
            0 => self.b_addr,
            1 => self.c_addr,
            2 => self.a_addr,
            3 => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(input.array::<4>())), input.u16()),
            4 => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(input.array::<16>())), input.u16()),
            _ => SocketAddr::new(self.b_addr.ip(), input.u16()),
        }
    }

    fn inner_v4(input: &mut Input) -> Ipv4Addr {
        match input.u8() % 6 {
            0 => A_V4,
            1 => B_V4,
            2 => C_V4,
            3 => Ipv4Addr::new(10, 9, input.u8(), input.u8()),
            4 => Ipv4Addr::UNSPECIFIED,
            _ => Ipv4Addr::from(input.array::<4>()),
        }
    }

    fn inner_v6(input: &mut Input) -> Ipv6Addr {
        match input.u8() % 4 {
            0 => A_V6,
            1 => B_V6,
            2 => C_V6,
            _ => Ipv6Addr::from(input.array::<16>()),
        }
    }

    /// An IP packet: well formed with chosen addresses, or raw bytes.
    fn packet(input: &mut Input) -> Vec<u8> {
        let len = usize::from(input.u16()) % (BUF_LEN + 1);
        match input.u8() % 4 {
            0 => {
                let (src, dst) = (Self::inner_v4(input), Self::inner_v4(input));
                ipv4_packet(src, dst, len.min(1400))
            }
            1 => {
                let (src, dst) = (Self::inner_v6(input), Self::inner_v6(input));
                ipv6_packet(src, dst, len.min(1400))
            }
            2 => input.bytes(len).to_vec(),
            _ => {
                // Any protocol (extension headers included) over chosen addresses.
                const PROTOS: [u8; 8] = [6, 17, 1, 58, 0, 44, 60, 43];
                let proto = PROTOS[usize::from(input.u8() % 8)];
                let (src, dst) = if input.u8().is_multiple_of(2) {
                    (Self::inner_v4(input).into(), Self::inner_v4(input).into())
                } else {
                    (Self::inner_v6(input).into(), Self::inner_v6(input).into())
                };
                ip_packet(src, dst, proto, input.bytes(len.min(1400)))
            }
        }
    }

    /// Puts a policy built from the input in force on A (or removes it).
    fn set_policy(&mut self, input: &mut Input) {
        const FROM: [&str; 8] = [
            "b",
            "c",
            "*",
            "100.64.0.0/24",
            "fd00::/64",
            "0.0.0.0/0",
            "::/0",
            "10.9.0.0/16",
        ];
        const TO: [&str; 5] = ["a", "*", "a*", "fd00::1/128", "10.0.0.0/8"];
        const PROTO: [&str; 5] = ["any", "tcp", "udp", "icmp", "132"];
        const PORTS: [&str; 4] = ["", "\"53\"", "\"1-1024\"", "\"8000-8099\", \"22\""];
        let mode = input.u8();
        if mode % 8 == 0 {
            self.a.set_policy(None, self.now);
            return;
        }
        let mut text = String::new();
        for _ in 0..input.u8() % 6 {
            let (from, to) = (
                FROM[usize::from(input.u8() % 8)],
                TO[usize::from(input.u8() % 5)],
            );
            let proto = PROTO[usize::from(input.u8() % 5)];
            let mut ports = PORTS[usize::from(input.u8() % 4)];
            if proto == "icmp" || proto == "132" {
                ports = "";
            }
            text.push_str(&format!(
                "[[allow]]\nfrom = [\"{from}\"]\nto = [\"{to}\"]\nproto = \"{proto}\"\nports = [{ports}]\n"
            ));
        }
        let policy = Policy::parse(&text).expect("fuzz policy templates are valid");
        let device = |name: &str, v4, v6, routes| DeviceInfo {
            hostname: name.into(),
            v4,
            v6: Some(v6),
            routes,
            exit: false,
        };
        let devices = [
            device("a", A_V4, A_V6, vec!["10.7.0.0/16".parse().expect("net")]),
            device("b", B_V4, B_V6, Vec::new()),
            device("c", C_V4, C_V6, vec!["10.9.0.0/16".parse().expect("net")]),
        ];
        let table = compile(&policy, &devices, &devices[0]);
        if mode % 2 == 0 {
            // Replaces the table, keeping (and re-checking) the flows.
            self.a.set_policy(Some(table), self.now);
        } else {
            let capacity = usize::from(input.u8()) + 1;
            self.a
                .set_filter(Some(Filter::with_capacity(table, self.now, capacity)));
        }
    }

    fn out_len(input: &mut Input) -> usize {
        // Mostly a proper buffer; sometimes a short one (the API must refuse it).
        if input.u8() < 240 {
            OUT_LEN
        } else {
            usize::from(input.u16()) % (OUT_LEN + 1)
        }
    }

    fn a_datagram(&mut self, from: SocketAddr, data: &[u8], out_len: usize) {
        let before = *self.a.counters();
        let (mut out, mut forward) = (
            std::mem::take(&mut self.out),
            std::mem::take(&mut self.forward),
        );
        let outcome = match self.a.handle_datagram_or_forward(
            from,
            None,
            data,
            &mut out[..out_len],
            &mut forward[..out_len],
        ) {
            Incoming::WriteTun { peer, packet } => {
                let src = IpPacket::new_checked(packet)
                    .expect("A wrote a packet to TUN that is not IP")
                    .src();
                assert!(
                    self.a.routes().contains(src, peer),
                    "A accepted source {src} from peer {peer} outside its allowed IPs"
                );
                if self.a.filter().is_some() {
                    let ip = IpPacket::new_checked(packet).expect("checked above");
                    assert!(ip.walk().is_ok(), "the filter passed an unparsable chain");
                }
                Outcome::Other
            }
            Incoming::Forward {
                from_peer,
                to_peer,
                packet,
                to,
                data,
                ..
            } => {
                let ip = IpPacket::new_checked(packet).expect("A relayed a packet that is not IP");
                let routes = self.a.routes();
                assert!(
                    routes.contains(ip.src(), from_peer),
                    "relayed a spoofed source"
                );
                assert_eq!(routes.lookup(ip.dst()), Some(to_peer));
                assert_ne!(from_peer, to_peer, "relayed back to the sender");
                let relayed = self.a.counters().relayed_packets;
                assert_eq!(relayed, before.relayed_packets + 1, "relay not counted");
                Outcome::Send(to, data.to_vec())
            }
            Incoming::Send { to, data, .. } => Outcome::Send(to, data.to_vec()),
            Incoming::Drop(r) => Outcome::Drop(r),
            Incoming::Nothing => Outcome::Other,
        };
        (self.out, self.forward) = (out, forward);
        self.after_a(&before, outcome);
    }

    fn a_tun(&mut self, packet: &[u8], extra: usize, out_len: usize) {
        let before = *self.a.counters();
        let mut buf = vec![0u8; BUF_LEN];
        let n = packet.len().min(BUF_LEN);
        buf[..n].copy_from_slice(&packet[..n]);
        // A length past the buffer's end must be refused, not trusted.
        let len = n + extra % 32;
        let mut out = std::mem::take(&mut self.out);
        let outcome = match self.a.handle_tun_packet(&mut buf, len, &mut out[..out_len]) {
            Outgoing::Send { to, data, .. } => Outcome::Send(to, data.to_vec()),
            Outgoing::Drop(r) => Outcome::Drop(r),
            Outgoing::Nothing => Outcome::Other,
        };
        self.out = out;
        self.after_a(&before, outcome);
    }

    /// The checks after every call on A, then A's pending output.
    fn after_a(&mut self, before: &Counters, outcome: Outcome) {
        match outcome {
            Outcome::Send(to, data) => enqueue(&mut self.from_a, to, &data),
            Outcome::Drop(r) => check_counted(before, self.a.counters(), r),
            Outcome::Other => {}
        }
        check_monotone(before, self.a.counters());
        self.poll_a(OUT_LEN);
    }

    fn poll_a(&mut self, out_len: usize) {
        let before = *self.a.counters();
        let mut out = std::mem::take(&mut self.out);
        for _ in 0..MAX_QUEUE {
            let Some(Transmit { to, data, .. }) = self.a.poll_transmit(&mut out[..out_len]) else {
                break;
            };
            enqueue(&mut self.from_a, to, data);
        }
        self.out = out;
        check_monotone(&before, self.a.counters());
    }

    /// Remote `which` (B or C) reads `packet` from its TUN; what it sends goes to A.
    fn remote_send(&mut self, which: u8, packet: &[u8], from: SocketAddr) {
        let mut buf = vec![0u8; BUF_LEN];
        let n = packet.len().min(BUF_LEN);
        buf[..n].copy_from_slice(&packet[..n]);
        let mut out = std::mem::take(&mut self.out);
        let remote = if which.is_multiple_of(2) {
            &mut self.b
        } else {
            &mut self.c
        };
        if let Outgoing::Send { data, .. } = remote.handle_tun_packet(&mut buf, n, &mut out) {
            self.last = data.to_vec();
            enqueue(&mut self.to_a, from, data);
        }
        for _ in 0..MAX_QUEUE {
            match remote.poll_transmit(&mut out) {
                Some(Transmit { data, .. }) => {
                    self.last = data.to_vec();
                    enqueue(&mut self.to_a, from, data);
                }
                None => break,
            }
        }
        self.out = out;
    }

    /// A's datagrams reach B or C (at their current addresses); their answers go
    /// back to A.
    fn deliver_from_a(&mut self, n: usize) {
        let mut out = std::mem::take(&mut self.out);
        for _ in 0..n {
            let Some((to, data)) = self.from_a.pop_front() else {
                break;
            };
            let (remote, from) = if to == self.b_addr {
                (&mut self.b, self.b_addr)
            } else if to == self.c_addr {
                (&mut self.c, self.c_addr)
            } else {
                continue;
            };
            if let Incoming::Send { data, .. } =
                remote.handle_datagram(self.a_addr, &data, &mut out)
            {
                enqueue(&mut self.to_a, from, data);
            }
            for _ in 0..MAX_QUEUE {
                let Some(Transmit { data, .. }) = remote.poll_transmit(&mut out) else {
                    break;
                };
                enqueue(&mut self.to_a, from, data);
            }
        }
        self.out = out;
    }

    fn deliver_to_a(&mut self, n: usize) {
        for _ in 0..n {
            let Some((from, data)) = self.to_a.pop_front() else {
                break;
            };
            self.a_datagram(from, &data, OUT_LEN);
        }
    }

    fn tick(&mut self, input: &mut Input) {
        self.now += Duration::from_millis(u64::from(input.u16()) * 8);
        let before = *self.a.counters();
        self.a.handle_timeout(self.now);
        check_monotone(&before, self.a.counters());
        self.b.handle_timeout(self.now);
        self.c.handle_timeout(self.now);
        self.poll_a(OUT_LEN);
        // Timer output of the remotes (handshake retries, keepalives) goes to A.
        let mut out = std::mem::take(&mut self.out);
        for (remote, from) in [(&mut self.b, self.b_addr), (&mut self.c, self.c_addr)] {
            for _ in 0..MAX_QUEUE {
                let Some(Transmit { data, .. }) = remote.poll_transmit(&mut out) else {
                    break;
                };
                enqueue(&mut self.to_a, from, data);
            }
        }
        self.out = out;
    }

    fn reconfigure(&mut self, input: &mut Input) {
        let id = match input.u8() % 3 {
            0 => B_ID,
            1 => C_ID,
            _ => D_ID,
        };
        if input.u8().is_multiple_of(4) {
            self.a.remove_peer(id);
            return;
        }
        let public_key = match input.u8() % 6 {
            0 => public_key(&secret_key(0xb)),
            1 => public_key(&secret_key(0xc)),
            2 => public_key(&secret_key(u64::from(input.u8()) + 0x100)),
            3 => self.a.public_key(),
            4 => [0u8; 32],
            _ => input.array::<32>(),
        };
        let endpoint = match input.u8() % 3 {
            0 => None,
            1 => Some(if id == B_ID { self.b_addr } else { self.c_addr }),
            _ => Some(self.addr(input)),
        };
        let mut allowed_ips = Vec::new();
        for _ in 0..input.u8() % 4 {
            let net = if input.u8().is_multiple_of(2) {
                ipnet::IpNet::new(IpAddr::V4(Self::inner_v4(input)), input.u8() % 33)
            } else {
                ipnet::IpNet::new(IpAddr::V6(Self::inner_v6(input)), input.u8() % 129)
            };
            if let Ok(net) = net {
                allowed_ips.push(net);
            }
        }
        let keepalive = match input.u8() % 3 {
            0 => None,
            1 => Some(0),
            _ => Some(input.u16()),
        };
        let _ = self.a.upsert_peer(
            id,
            PeerConfig {
                public_key,
                endpoint,
                allowed_ips,
                persistent_keepalive: keepalive,
            },
        );
        self.poll_a(OUT_LEN);
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % 12 {
            0 => {
                let from = self.addr(input);
                let len = usize::from(input.u16()) % (BUF_LEN + 1);
                let data = input.bytes(len);
                let out_len = Self::out_len(input);
                self.a_datagram(from, data, out_len);
            }
            1 => {
                let packet = Self::packet(input);
                let extra = usize::from(input.u8());
                let out_len = Self::out_len(input);
                self.a_tun(&packet, extra, out_len);
            }
            2 => {
                let out_len = Self::out_len(input);
                self.poll_a(out_len);
            }
            3 => self.tick(input),
            4 => {
                let which = input.u8();
                let packet = Self::packet(input);
                let from = if input.u8().is_multiple_of(4) {
                    self.addr(input)
                } else if which.is_multiple_of(2) {
                    self.b_addr
                } else {
                    self.c_addr
                };
                self.remote_send(which, &packet, from);
            }
            5 => {
                let n = usize::from(input.u8() % 16) + 1;
                self.deliver_to_a(n);
            }
            6 => {
                let n = usize::from(input.u8() % 16) + 1;
                self.deliver_from_a(n);
            }
            7 => {
                // A genuine datagram with some bytes changed.
                let mut data = self.last.clone();
                for _ in 0..input.u8() % 8 {
                    let pos = usize::from(input.u16());
                    let x = input.u8();
                    if let Some(len) = std::num::NonZeroUsize::new(data.len()) {
                        data[pos % len.get()] ^= x;
                    }
                }
                if input.u8().is_multiple_of(8) {
                    let keep = usize::from(input.u16()) % (data.len() + 1);
                    data.truncate(keep);
                }
                let from = self.addr(input);
                self.a_datagram(from, &data, OUT_LEN);
            }
            8 => {
                // A genuine datagram again (replay), maybe from elsewhere.
                let data = self.last.clone();
                let from = self.addr(input);
                self.a_datagram(from, &data, OUT_LEN);
            }
            9 => self.reconfigure(input),
            10 => {
                let x = input.u8();
                if x < 160 {
                    self.a.set_relay(x.is_multiple_of(2));
                } else {
                    self.set_policy(input);
                }
            }
            _ => {
                // A well-formed WireGuard header of any type and length.
                let ty = input.u8() % 5;
                let len = usize::from(input.u16()) % 256;
                let mut data = vec![ty, 0, 0, 0];
                data.extend_from_slice(input.bytes(len));
                let from = self.addr(input);
                self.a_datagram(from, &data, OUT_LEN);
            }
        }
    }
}

/// A `Drop(reason)` bumped exactly that counter by one.
fn check_counted(before: &Counters, after: &Counters, r: DropReason) {
    assert_eq!(after.get(r), before.get(r).saturating_add(1), "{r:?}");
}

fn check_monotone(before: &Counters, after: &Counters) {
    assert!(
        after.total_drops() >= before.total_drops(),
        "drop counters went down"
    );
    assert!(
        after.cookie_replies >= before.cookie_replies,
        "cookie counter went down"
    );
    assert!(
        after.relayed_packets >= before.relayed_packets
            && after.relayed_bytes >= before.relayed_bytes,
        "relay counters went down"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut net = Net::new();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        net.step(&mut input);
    }
});
