//! Bookkeeping without I/O: UDP flows that expire when idle, the ephemeral ports the
//! stack's own connections use, the client a SOCKS5 UDP association admits, and which
//! mesh destinations the stack can reach. Time is passed in.
//!
//! Not here: sockets (the driver in `stack` keeps them in the tables as values), TCP
//! (`tcp_flows`).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::socks::Reply;

/// A UDP flow without a datagram for this long is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// UDP flows per rule.
pub const MAX_UDP_FLOWS: usize = 1024;

/// UDP flows keyed by `K` (e.g. the client's address): each remembers when it last
/// carried a datagram and goes after `idle` without one. At most `max` flows: a new
/// one past that is refused (the datagram is dropped), so a flood cannot grow the
/// table without bound.
#[derive(Debug)]
pub struct FlowTable<K, V> {
    flows: HashMap<K, (V, Instant)>,
    idle: Duration,
    max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many flows ({0})")]
pub struct Full(pub usize);

/// Why [`FlowTable::touch_or_open`] has no flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused<E> {
    Full(Full),
    /// Opening the flow failed.
    Open(E),
}

impl<K: Hash + Eq + Clone, V> FlowTable<K, V> {
    pub fn new(idle: Duration, max: usize) -> Self {
        Self {
            flows: HashMap::new(),
            idle,
            max,
        }
    }

    /// The flow of `key`, marked active at `now`.
    pub fn touch(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        let (v, last) = self.flows.get_mut(key)?;
        *last = now;
        Some(v)
    }

    /// The flow of `key` without marking it active.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.flows.get_mut(key).map(|(v, _)| v)
    }

    /// Adds a flow active at `now`.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> Result<&mut V, Full> {
        if self.flows.len() >= self.max && !self.flows.contains_key(&key) {
            return Err(Full(self.max));
        }
        let slot = self.flows.entry(key).insert_entry((value, now));
        Ok(&mut slot.into_mut().0)
    }

    /// The flow of `key` marked active at `now`, or else a new one that `open` makes
    /// (only when there is room); `true` when new.
    pub fn touch_or_open<E>(
        &mut self,
        key: K,
        now: Instant,
        open: impl FnOnce() -> Result<V, E>,
    ) -> Result<(&mut V, bool), Refused<E>> {
        let full = self.flows.len() >= self.max;
        match self.flows.entry(key) {
            Entry::Occupied(o) => {
                let (v, last) = o.into_mut();
                *last = now;
                Ok((v, false))
            }
            Entry::Vacant(_) if full => Err(Refused::Full(Full(self.max))),
            Entry::Vacant(e) => {
                let v = open().map_err(Refused::Open)?;
                Ok((&mut e.insert((v, now)).0, true))
            }
        }
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.flows.remove(key).map(|(v, _)| v)
    }

    /// Removes and returns the flows idle since `now - idle` or longer.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, V)> {
        let idle = self.idle;
        let gone: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, (_, last))| now.saturating_duration_since(*last) >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter()
            .filter_map(|k| self.flows.remove(&k).map(|(v, _)| (k, v)))
            .collect()
    }

    /// When the next flow expires, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.flows.values().map(|(_, last)| *last + self.idle).min()
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.flows.iter().map(|(k, (v, _))| (k, v))
    }

    /// Calls `f` on every flow; those for which it returns true were active at `now`.
    pub fn visit(&mut self, now: Instant, mut f: impl FnMut(&K, &mut V) -> bool) {
        for (k, (v, last)) in self.flows.iter_mut() {
            if f(k, v) {
                *last = now;
            }
        }
    }
}

/// First ephemeral port (IANA dynamic range).
pub const EPHEMERAL_FIRST: u16 = 49152;

/// Hands out local ports for the stack's own connections and UDP flows, round robin
/// over the dynamic range, never one still in use or reserved (a rule's port).
#[derive(Debug)]
pub struct PortAllocator {
    next: u16,
    used: HashSet<u16>,
    reserved: HashSet<u16>,
}

impl PortAllocator {
    /// `seed` picks where the round starts.
    pub fn new(seed: u16, reserved: impl IntoIterator<Item = u16>) -> Self {
        let span = u16::MAX - EPHEMERAL_FIRST + 1;
        Self {
            next: EPHEMERAL_FIRST + seed % span,
            used: HashSet::new(),
            reserved: reserved.into_iter().collect(),
        }
    }

    pub fn alloc(&mut self) -> Option<u16> {
        let span = usize::from(u16::MAX - EPHEMERAL_FIRST) + 1;
        for _ in 0..span {
            let p = self.next;
            self.next = if p == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            if !self.reserved.contains(&p) && self.used.insert(p) {
                return Some(p);
            }
        }
        None
    }

    pub fn release(&mut self, port: u16) {
        self.used.remove(&port);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

/// The node's mesh addresses: which destinations are ours and which the stack can
/// reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshAddrs {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

impl MeshAddrs {
    /// `None` unless every address is unicast.
    pub fn new(v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> Option<Self> {
        let unicast4 = !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast());
        let unicast6 = v6.is_none_or(|a| !(a.is_unspecified() || a.is_multicast()));
        (unicast4 && unicast6).then_some(Self { v4, v6 })
    }

    pub fn ours(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.v4,
            IpAddr::V6(a) => Some(a) == self.v6,
        }
    }

    /// Whether the stack has an address of `ip`'s family.
    pub fn has_family(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() || self.v6.is_some()
    }

    /// Why a mesh destination cannot be reached from here, if it cannot.
    pub fn unreachable(&self, target: SocketAddr) -> Option<Reply> {
        if !self.has_family(target.ip()) {
            return Some(Reply::NetworkUnreachable);
        }
        let ip = target.ip();
        if self.ours(ip) || ip.is_unspecified() || ip.is_multicast() {
            return Some(Reply::HostUnreachable);
        }
        None
    }
}

/// The client of a SOCKS5 UDP association: only it may use the relay. It asked from
/// `ip`; the address it sends from is the one it named in its request (zeros mean
/// "unknown") or else the first one a datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayClient {
    ip: IpAddr,
    addr: Option<SocketAddr>,
}

impl RelayClient {
    pub fn new(control_peer: IpAddr, named: SocketAddr) -> Self {
        Self {
            ip: control_peer,
            addr: Some(named).filter(|t| !t.ip().is_unspecified() && t.port() != 0),
        }
    }

    /// Whether a datagram from `from` is the client's (the first one fixes its port).
    pub fn admit(&mut self, from: SocketAddr) -> bool {
        if from.ip() != self.ip || self.addr.is_some_and(|c| c != from) {
            return false;
        }
        self.addr = Some(from);
        true
    }

    /// Where datagrams from the mesh go, once known.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// For the status: the address, or the host with port 0.
    pub fn shown(&self) -> SocketAddr {
        self.addr.unwrap_or(SocketAddr::new(self.ip, 0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_relay_admits_only_its_client() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut c = RelayClient::new(a("127.0.0.1:1").ip(), a("0.0.0.0:0"));
        assert_eq!((c.addr(), c.shown()), (None, a("127.0.0.1:0")));
        assert!(!c.admit(a("127.0.0.2:5000")), "another host");
        assert!(c.admit(a("127.0.0.1:5000")));
        assert_eq!(c.addr(), Some(a("127.0.0.1:5000")));
        assert!(
            !c.admit(a("127.0.0.1:5001")),
            "the first port is the client's"
        );
        assert!(c.admit(a("127.0.0.1:5000")));

        let mut named = RelayClient::new(a("127.0.0.1:1").ip(), a("127.0.0.1:6000"));
        assert_eq!(named.addr(), Some(a("127.0.0.1:6000")));
        assert!(!named.admit(a("127.0.0.1:5000")));
        assert!(named.admit(a("127.0.0.1:6000")));
        // A named port on a zero address is unknown too.
        let c = RelayClient::new(a("127.0.0.1:1").ip(), a("0.0.0.0:6000"));
        assert_eq!(c.addr(), None);
    }

    #[test]
    fn mesh_destinations_are_checked() {
        let v4 = Ipv4Addr::new(100, 64, 0, 1);
        let v6: Ipv6Addr = "200::1".parse().unwrap();
        assert!(MeshAddrs::new(Ipv4Addr::UNSPECIFIED, None).is_none());
        assert!(MeshAddrs::new(Ipv4Addr::BROADCAST, None).is_none());
        assert!(MeshAddrs::new(v4, Some("ff02::1".parse().unwrap())).is_none());
        let only4 = MeshAddrs::new(v4, None).unwrap();
        let both = MeshAddrs::new(v4, Some(v6)).unwrap();
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(only4.unreachable(a("100.64.0.2:80")), None);
        assert_eq!(
            only4.unreachable(a("[200::2]:80")),
            Some(Reply::NetworkUnreachable)
        );
        assert_eq!(both.unreachable(a("[200::2]:80")), None);
        for t in [
            "100.64.0.1:80",
            "[200::1]:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "[ff02::1]:80",
        ] {
            assert_eq!(both.unreachable(a(t)), Some(Reply::HostUnreachable), "{t}");
        }
        assert!(both.ours(v6.into()) && !only4.ours(v6.into()));
        assert!(only4.has_family(v4.into()) && !only4.has_family(v6.into()));
    }

    #[test]
    fn idle_flows_expire_and_active_ones_stay() {
        let t0 = Instant::now();
        let mut t: FlowTable<u16, &str> = FlowTable::new(Duration::from_secs(30), 10);
        t.insert(1, "a", t0).unwrap();
        t.insert(2, "b", t0).unwrap();
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(30)));
        assert!(t.touch(&2, t0 + Duration::from_secs(20)).is_some());
        assert!(t.expire(t0 + Duration::from_secs(29)).is_empty());
        let gone = t.expire(t0 + Duration::from_secs(30));
        assert_eq!(gone, vec![(1, "a")]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.next_expiry(), Some(t0 + Duration::from_secs(50)));
        assert_eq!(t.expire(t0 + Duration::from_secs(50)), vec![(2, "b")]);
        assert!(t.is_empty());
        assert_eq!(t.next_expiry(), None);
        // A clock that goes backwards expires nothing.
        t.insert(3, "c", t0 + Duration::from_secs(60)).unwrap();
        assert!(t.expire(t0).is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut t: FlowTable<u16, u16> = FlowTable::new(Duration::from_secs(1), 2);
        t.insert(1, 1, t0).unwrap();
        t.insert(2, 2, t0).unwrap();
        assert_eq!(t.insert(3, 3, t0), Err(Full(2)));
        // Replacing an existing flow is fine.
        *t.insert(2, 20, t0).unwrap() += 1;
        assert_eq!(t.get_mut(&2), Some(&mut 21));
        assert_eq!(t.remove(&1), Some(1));
        let later = t0 + Duration::from_secs(5);
        t.visit(later, |k, v| {
            *v += 1;
            *k == 2
        });
        assert_eq!(t.expire(later), vec![]);
        assert_eq!(t.get_mut(&2), Some(&mut 22));
        assert!(t.insert(3, 3, t0).is_ok());
    }

    #[test]
    fn flows_open_only_when_new_and_with_room() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(40);
        let mut t: FlowTable<u16, u16> = FlowTable::new(Duration::from_secs(60), 2);
        let never = || -> Result<u16, &str> { panic!("opened an existing flow") };
        assert_eq!(
            t.touch_or_open(1, t0, || Ok::<_, &str>(10)),
            Ok((&mut 10, true))
        );
        assert_eq!(t.touch_or_open(1, t1, never), Ok((&mut 10, false)));
        assert_eq!(
            t.touch_or_open(2, t0, || Err("no socket")),
            Err(Refused::Open("no socket"))
        );
        assert_eq!(t.len(), 1, "a failed open leaves nothing");
        assert_eq!(
            t.touch_or_open(2, t0, || Ok::<_, &str>(20)),
            Ok((&mut 20, true))
        );
        let full = || -> Result<u16, &str> { panic!("opened past the bound") };
        assert_eq!(t.touch_or_open(3, t0, full), Err(Refused::Full(Full(2))));
        // Flow 1 was active at t1: only flow 2 expires at t0 + 60 s.
        assert_eq!(t.expire(t0 + Duration::from_secs(60)), vec![(2, 20)]);
        assert_eq!(
            t.touch_or_open(3, t1, || Ok::<_, &str>(30)),
            Ok((&mut 30, true))
        );
        assert_eq!(t.next_expiry(), Some(t1 + Duration::from_secs(60)));
    }

    #[test]
    fn ports_are_unique_and_skip_reserved() {
        let mut p = PortAllocator::new(u16::MAX - EPHEMERAL_FIRST, [EPHEMERAL_FIRST]);
        assert_eq!(p.alloc(), Some(u16::MAX));
        // Wraps, skipping the reserved port.
        assert_eq!(p.alloc(), Some(EPHEMERAL_FIRST + 1));
        let mut all = HashSet::new();
        while let Some(port) = p.alloc() {
            assert!(port >= EPHEMERAL_FIRST);
            assert!(all.insert(port), "{port} twice");
        }
        assert_eq!(p.in_use(), usize::from(u16::MAX - EPHEMERAL_FIRST));
        p.release(50000);
        assert_eq!(p.alloc(), Some(50000));
        assert_eq!(p.alloc(), None);
    }
}
