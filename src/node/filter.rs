//! The stateful policy filter of a node's data plane (DESIGN §7): sans-IO, given
//! `now`, allocation-free per packet.
//!
//! [`Filter::inbound`] judges each decrypted packet (after the source check) before
//! it reaches TUN; [`Filter::outbound`] sees each packet we send into the tunnel, so
//! that replies to our own connections pass. A flow is keyed by its 5-tuple
//! (both families; the ICMP echo identifier stands in for the ports), normalized
//! so that both directions share one entry. A packet passes when:
//!
//! * it belongs to a live flow (either direction started it);
//! * it starts a new flow the compiled [`InboundTable`] allows (source,
//!   destination, protocol after the IPv6 extension headers, destination port),
//!   and there is room to remember the flow;
//! * it is an ICMP or ICMPv6 error (destination unreachable, fragmentation needed
//!   and packet too big included, time exceeded, parameter problem) quoting a packet
//!   of a live flow;
//! * it is a fragment other than the first, and the first fragment (same source,
//!   destination, protocol and identification) passed within [`FRAGMENT_IDLE_SECS`].
//!
//! Everything else is dropped: no flow and no rule, an unparsable or over-long IPv6
//! extension-header chain, a transport header cut short. Flows expire after being
//! idle ([`TCP_IDLE_SECS`], [`OTHER_IDLE_SECS`]). The flow table has a fixed
//! capacity allocated once: a slot is found within [`PROBE`] slots of the key's hash
//! (expired entries are reused in place); when none is free a new inbound flow is
//! refused ([`Verdict::Full`]) and an outbound one is sent but not remembered (both
//! counted).

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::time::Instant;

use crate::policy::InboundTable;
use crate::wire::ip::{IpPacket, IpVersion, protocol};

/// Flows kept by default (about 1.4 MiB).
pub const DEFAULT_FLOW_CAPACITY: usize = 32 * 1024;
/// First fragments remembered (for their later fragments).
pub const FRAGMENT_CAPACITY: usize = 1024;
/// Idle time after which a TCP flow is forgotten.
pub const TCP_IDLE_SECS: u32 = 300;
/// Idle time after which any other flow is forgotten.
pub const OTHER_IDLE_SECS: u32 = 60;
/// How long later fragments of a passed first fragment are let through.
pub const FRAGMENT_IDLE_SECS: u32 = 10;
/// Slots searched for a key, from its hash on.
pub const PROBE: usize = 16;

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Not allowed by the policy (or not parsable far enough to tell).
    Drop,
    /// Allowed, but the flow table has no room for a new flow.
    Full,
}

/// A flow, normalized: `remote` is the far end (the source of an inbound packet,
/// the destination of an outbound one), `local` this side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FlowKey {
    remote: [u8; 16],
    local: [u8; 16],
    remote_port: u16,
    local_port: u16,
    proto: u8,
    v6: bool,
}

/// A first fragment that passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FragKey {
    src: [u8; 16],
    dst: [u8; 16],
    id: u32,
    proto: u8,
    v6: bool,
}

/// A key as five 64-bit words, for hashing.
trait Words {
    fn words(&self) -> [u64; 5];
}

fn halves(a: &[u8; 16]) -> [u64; 2] {
    let (hi, lo) = a.split_at(8);
    [
        u64::from_ne_bytes(hi.try_into().unwrap_or_default()),
        u64::from_ne_bytes(lo.try_into().unwrap_or_default()),
    ]
}

impl Words for FlowKey {
    fn words(&self) -> [u64; 5] {
        let [a, b] = halves(&self.remote);
        let [c, d] = halves(&self.local);
        let e = u64::from(self.remote_port)
            | u64::from(self.local_port) << 16
            | u64::from(self.proto) << 32
            | u64::from(self.v6) << 40;
        [a, b, c, d, e]
    }
}

impl Words for FragKey {
    fn words(&self) -> [u64; 5] {
        let [a, b] = halves(&self.src);
        let [c, d] = halves(&self.dst);
        let e = u64::from(self.id) | u64::from(self.proto) << 32 | u64::from(self.v6) << 40;
        [a, b, c, d, e]
    }
}

/// Folded multiply (as in wyhash/foldhash): keyed by a random seed per table, so
/// which keys share a probe window cannot be predicted from outside; the bounded
/// probe keeps the cost of collisions constant anyway.
fn fold_hash(seed: u64, words: [u64; 5]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed;
    for w in words {
        let m = u128::from(h ^ w).wrapping_mul(u128::from(K));
        h = (m as u64) ^ ((m >> 64) as u64);
    }
    h
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot<K> {
    key: K,
    used: bool,
    /// Started by an inbound packet (re-checked when the policy changes).
    inbound: bool,
    /// An inbound flow a new policy forbids: kept (not refreshed) until it
    /// expires so that a reply we send to a packet that passed before the change
    /// cannot make it look like a flow we started; its packets are judged as new.
    revoked: bool,
    /// Live while `now < expires`.
    expires: u32,
}

/// Open addressing over a fixed array, linear probing within [`PROBE`] slots.
/// Slots never become unused again (expired ones are reused in place), so a
/// lookup may stop at the first unused slot.
struct Table<K> {
    slots: Box<[Slot<K>]>,
    mask: usize,
    seed: u64,
}

impl<K: Copy + Default + Eq + Words> Table<K> {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.max(PROBE).next_power_of_two();
        Table {
            slots: vec![Slot::default(); capacity].into_boxed_slice(),
            mask: capacity - 1,
            // A random seed from the standard library's per-process keys.
            seed: RandomState::new().hash_one(capacity),
        }
    }

    fn home(&self, key: &K) -> usize {
        // Truncation is fine: only the low bits are used.
        fold_hash(self.seed, key.words()) as usize
    }

    /// The live entry for `key`.
    fn get(&mut self, key: &K, now: u32) -> Option<&mut Slot<K>> {
        let home = self.home(key);
        for i in 0..PROBE {
            let at = (home + i) & self.mask;
            let slot = self.slots.get(at)?;
            if !slot.used {
                return None;
            }
            if slot.key == *key {
                return self.slots.get_mut(at).filter(|s| s.expires > now);
            }
        }
        None
    }

    /// Makes `key` live until `expires` (reusing its slot, an expired one or an
    /// unused one); false when there is no room.
    fn insert(&mut self, key: K, now: u32, expires: u32, inbound: bool) -> bool {
        let home = self.home(&key);
        let mut free = None;
        for i in 0..PROBE {
            let at = (home + i) & self.mask;
            let Some(slot) = self.slots.get(at) else {
                break;
            };
            if slot.used && slot.key == key {
                free = Some(at);
                break;
            }
            if free.is_none() && (!slot.used || slot.expires <= now) {
                free = Some(at);
            }
            if !slot.used {
                break;
            }
        }
        let Some(slot) = free.and_then(|at| self.slots.get_mut(at)) else {
            return false;
        };
        *slot = Slot {
            key,
            used: true,
            inbound,
            revoked: false,
            expires,
        };
        true
    }

    fn live(&self, now: u32) -> usize {
        self.slots
            .iter()
            .filter(|s| s.used && !s.revoked && s.expires > now)
            .count()
    }
}

/// Counts of what the filter did, apart from the drops the data plane counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterStats {
    /// Outbound packets that could not start a flow for lack of room (sent anyway).
    pub outbound_unrecorded: u64,
}

/// The stateful filter. See the [module docs](self).
pub struct Filter {
    table: InboundTable,
    flows: Table<FlowKey>,
    frags: Table<FragKey>,
    epoch: Instant,
    /// Seconds since `epoch`, plus one (so 0 is always in the past).
    now: u32,
    stats: FilterStats,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("rules", &self.table.len())
            .field("capacity", &self.flows.slots.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What a packet says about its flow.
struct Parsed {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    src_port: u16,
    dst_port: u16,
    /// Has ports (TCP, UDP): the destination port is matched against rules.
    ports: bool,
    kind: Kind,
    /// Fragmentation: `Some((id, first))`.
    fragment: Option<(u32, bool)>,
}

enum Kind {
    /// An ordinary packet of a flow.
    Flow,
    /// An ICMP error quoting a packet of the flow given by the key (as seen from
    /// the side that sent the quoted packet: ourselves, for an inbound error).
    Error(FlowKey),
    /// A fragment other than the first.
    LaterFragment,
}

fn octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn addr(octets: [u8; 16], v6: bool) -> IpAddr {
    let a = std::net::Ipv6Addr::from(octets);
    match a.to_ipv4_mapped() {
        Some(v4) if !v6 => IpAddr::V4(v4),
        _ => IpAddr::V6(a),
    }
}

fn port_at(l4: &[u8], at: usize) -> Option<u16> {
    let b = l4.get(at..at + 2)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

fn is_echo(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        icmp_type == 128 || icmp_type == 129
    } else {
        icmp_type == 8 || icmp_type == 0
    }
}

fn is_error(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        (1..=4).contains(&icmp_type)
    } else {
        matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
    }
}

fn is_icmp(v6: bool, proto: u8) -> bool {
    proto == if v6 { protocol::ICMPV6 } else { protocol::ICMP }
}

/// Ports (or the echo identifier) of an upper-layer header; `None` when cut short.
fn ports(v6: bool, proto: u8, l4: &[u8]) -> Option<(u16, u16, bool)> {
    if proto == protocol::TCP || proto == protocol::UDP {
        return Some((port_at(l4, 0)?, port_at(l4, 2)?, true));
    }
    if is_icmp(v6, proto) {
        let icmp_type = *l4.first()?;
        if is_echo(v6, icmp_type) {
            let id = port_at(l4, 4)?;
            return Some((id, id, false));
        }
    }
    Some((0, 0, false))
}

/// Reads what the filter needs; `None`: not parsable far enough (drop inbound).
fn parse(packet: &[u8]) -> Option<Parsed> {
    let ip = IpPacket::new_checked(packet).ok()?;
    let walk = ip.walk().ok()?;
    let v6 = ip.version() == IpVersion::V6;
    let (src, dst, proto) = (ip.src(), ip.dst(), walk.protocol);
    let fragment = walk.fragment.map(|f| (f.id, f.offset == 0));
    let base = Parsed {
        src,
        dst,
        proto,
        src_port: 0,
        dst_port: 0,
        ports: false,
        kind: Kind::LaterFragment,
        fragment,
    };
    if walk.is_later_fragment() {
        return Some(base);
    }
    let l4 = packet.get(walk.offset..ip.total_len())?;
    if is_icmp(v6, proto) && is_error(v6, *l4.first()?) {
        let quoted = IpPacket::new_quoted(l4.get(8..)?).ok()?;
        let q = quoted.walk().ok()?;
        if q.is_later_fragment() || (quoted.version() == IpVersion::V6) != v6 {
            return None;
        }
        let ql4 = l4.get(8 + q.offset..)?;
        let (sport, dport, _) = ports(v6, q.protocol, ql4)?;
        // The quoted packet went from `quoted.src()` to `quoted.dst()`: as seen by
        // its sender, the far end is its destination.
        let key = FlowKey {
            remote: octets(quoted.dst()),
            local: octets(quoted.src()),
            remote_port: dport,
            local_port: sport,
            proto: q.protocol,
            v6,
        };
        return Some(Parsed {
            kind: Kind::Error(key),
            ..base
        });
    }
    let (src_port, dst_port, has_ports) = ports(v6, proto, l4)?;
    Some(Parsed {
        src_port,
        dst_port,
        ports: has_ports,
        kind: Kind::Flow,
        ..base
    })
}

fn idle(proto: u8) -> u32 {
    if proto == protocol::TCP {
        TCP_IDLE_SECS
    } else {
        OTHER_IDLE_SECS
    }
}

impl Filter {
    /// A filter enforcing `table`, with room for [`DEFAULT_FLOW_CAPACITY`] flows.
    pub fn new(table: InboundTable, now: Instant) -> Self {
        Self::with_capacity(table, now, DEFAULT_FLOW_CAPACITY)
    }

    /// A filter with room for `flows` flows (rounded up to a power of two, at
    /// least [`PROBE`]). Allocates everything it will ever use.
    pub fn with_capacity(table: InboundTable, now: Instant, flows: usize) -> Self {
        Filter {
            table,
            flows: Table::new(flows),
            frags: Table::new(FRAGMENT_CAPACITY.min(flows.max(PROBE))),
            epoch: now,
            now: 1,
            stats: FilterStats::default(),
        }
    }

    /// Moves the filter's clock (the data plane calls this on every timer tick;
    /// one-second resolution is plenty for idle times of a minute).
    pub fn advance(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        self.now = u32::try_from(secs.saturating_add(1)).unwrap_or(u32::MAX);
    }

    /// Replaces the policy, keeping the flows: flows we started stay, flows
    /// started from outside stay only if the new table still allows them (the
    /// others are revoked until they expire: neither their packets nor our replies
    /// revive them), and remembered fragments are forgotten.
    pub fn set_table(&mut self, table: InboundTable) {
        self.table = table;
        let now = self.now;
        for slot in self.flows.slots.iter_mut() {
            if !slot.used || !slot.inbound || slot.expires <= now {
                continue;
            }
            let k = &slot.key;
            let (src, dst) = (addr(k.remote, k.v6), addr(k.local, k.v6));
            let port =
                (k.proto == protocol::TCP || k.proto == protocol::UDP).then_some(k.local_port);
            slot.revoked = !self.table.allows(src, dst, k.proto, port);
        }
        for slot in self.frags.slots.iter_mut() {
            slot.expires = 0;
        }
    }

    /// The policy in force.
    pub fn table(&self) -> &InboundTable {
        &self.table
    }

    /// Live flows (walks the whole table: for status, not per packet).
    pub fn live_flows(&self) -> usize {
        self.flows.live(self.now)
    }

    /// What the filter counted.
    pub fn stats(&self) -> FilterStats {
        self.stats
    }

    /// Judges a decrypted packet from a peer (its source already checked).
    pub fn inbound(&mut self, packet: &[u8]) -> Verdict {
        let Some(p) = parse(packet) else {
            return Verdict::Drop;
        };
        let now = self.now;
        let v6 = p.src.is_ipv6();
        match p.kind {
            Kind::LaterFragment => {
                let Some((id, _)) = p.fragment else {
                    return Verdict::Drop;
                };
                let key = FragKey {
                    src: octets(p.src),
                    dst: octets(p.dst),
                    id,
                    proto: p.proto,
                    v6,
                };
                if self.frags.get(&key, now).is_some() {
                    Verdict::Pass
                } else {
                    Verdict::Drop
                }
            }
            Kind::Error(key) => {
                // About a packet we sent (quoted src is us, dst the far end).
                if key.local == octets(p.dst)
                    && self.flows.get(&key, now).is_some_and(|s| !s.revoked)
                {
                    return self.passed(&p);
                }
                // Otherwise an ICMP error is a new ICMP packet like any other.
                if self.table.allows(p.src, p.dst, p.proto, None) {
                    return self.passed(&p);
                }
                Verdict::Drop
            }
            Kind::Flow => {
                let key = FlowKey {
                    remote: octets(p.src),
                    local: octets(p.dst),
                    remote_port: p.src_port,
                    local_port: p.dst_port,
                    proto: p.proto,
                    v6,
                };
                let expires = now.saturating_add(idle(p.proto));
                if let Some(slot) = self.flows.get(&key, now).filter(|s| !s.revoked) {
                    slot.expires = expires;
                    return self.passed(&p);
                }
                let port = p.ports.then_some(p.dst_port);
                if !self.table.allows(p.src, p.dst, p.proto, port) {
                    return Verdict::Drop;
                }
                if !self.flows.insert(key, now, expires, true) {
                    return Verdict::Full;
                }
                self.passed(&p)
            }
        }
    }

    /// A first fragment that passed lets its later fragments through.
    fn passed(&mut self, p: &Parsed) -> Verdict {
        if let Some((id, true)) = p.fragment {
            let key = FragKey {
                src: octets(p.src),
                dst: octets(p.dst),
                id,
                proto: p.proto,
                v6: p.src.is_ipv6(),
            };
            let expires = self.now.saturating_add(FRAGMENT_IDLE_SECS);
            // No room: the later fragments are dropped (and counted as `policy`).
            let _ = self.frags.insert(key, self.now, expires, true);
        }
        Verdict::Pass
    }

    /// Records a packet we send into the tunnel: it starts or refreshes its flow,
    /// so the replies pass. Returns false when a new flow found no room (the packet
    /// is sent anyway; its replies then need a rule).
    pub fn outbound(&mut self, packet: &[u8]) -> bool {
        let Some(p) = parse(packet) else {
            return true;
        };
        if !matches!(p.kind, Kind::Flow) {
            return true;
        }
        let now = self.now;
        let key = FlowKey {
            remote: octets(p.dst),
            local: octets(p.src),
            remote_port: p.dst_port,
            local_port: p.src_port,
            proto: p.proto,
            v6: p.src.is_ipv6(),
        };
        let expires = now.saturating_add(idle(p.proto));
        if let Some(slot) = self.flows.get(&key, now) {
            // A revoked flow stays revoked until it expires (see `Slot::revoked`).
            if !slot.revoked {
                slot.expires = expires;
            }
            return true;
        }
        if self.flows.insert(key, now, expires, false) {
            return true;
        }
        self.stats.outbound_unrecorded = self.stats.outbound_unrecorded.saturating_add(1);
        false
    }
}

#[cfg(test)]
mod tests;
