//! Longest-prefix-match table from IP prefixes to small values (WireGuard
//! "allowed IPs" / cryptokey routing).
//!
//! [`RoutingTable`] keeps, per address family, one hash map per prefix length
//! holding the masked network address as key, plus the list of prefix lengths
//! that are currently in use (longest first). A lookup masks the address once
//! per length in use and probes that length's map, so it costs one hash probe
//! per distinct prefix length present (typically two or three in a mesh:
//! `/32` host routes, the mesh prefix, maybe a default route) and never
//! allocates.
//!
//! What it does not do: it does not know about peers, sockets or packets (the
//! data plane maps prefixes to peer ids with it), it does not resolve
//! overlapping inserts other than "the latest insert of the same prefix
//! replaces the previous value", and it is not a general FIB (no metrics, no
//! multipath).
//!
//! The maps use `MixState`, a small deterministic multiplicative hasher, so
//! building a table needs no OS randomness. That is fine here because every
//! key in these maps comes from our own configuration, never from the network:
//! untrusted input only ever *looks up* keys, which cannot degrade the maps.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A fast, deterministic, non-cryptographic hasher for small trusted keys
/// (integers, addresses, public keys).
///
/// Each word is folded in with a rotate, xor and odd-constant multiply; the
/// final value goes through one more multiply and an xor-shift so that the
/// high bits (which hashbrown uses for its control bytes) depend on every
/// input bit.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MixHasher(u64);

const MIX_K: u64 = 0x9e37_79b9_7f4a_7c15;

impl MixHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(23) ^ word).wrapping_mul(MIX_K);
    }
}

impl Hasher for MixHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 56));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    #[inline]
    fn write_i64(&mut self, n: i64) {
        self.add(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(MIX_K);
        h ^ (h >> 29)
    }
}

/// Builder for [`MixHasher`]; use as the `S` parameter of a `HashMap`.
pub(crate) type MixState = BuildHasherDefault<MixHasher>;

/// A `HashMap` with the deterministic [`MixHasher`].
pub(crate) type MixMap<K, V> = HashMap<K, V, MixState>;

/// An address family's integer form: `u32` for IPv4, `u128` for IPv6.
trait AddrBits: Copy + Eq + Hash {
    /// Number of bits in an address.
    const BITS: u8;
    /// Keep the `len` most significant bits, zero the rest.
    fn masked(self, len: u8) -> Self;
}

impl AddrBits for u32 {
    const BITS: u8 = 32;
    #[inline]
    fn masked(self, len: u8) -> Self {
        // `checked_shl` returns None for a shift of 32, i.e. for len == 0.
        self & u32::MAX
            .checked_shl(u32::from(32 - len.min(32)))
            .unwrap_or(0)
    }
}

impl AddrBits for u128 {
    const BITS: u8 = 128;
    #[inline]
    fn masked(self, len: u8) -> Self {
        self & u128::MAX
            .checked_shl(u32::from(128 - len.min(128)))
            .unwrap_or(0)
    }
}

/// The table for one address family.
#[derive(Clone)]
struct Family<K, T> {
    /// `maps[len]` holds the prefixes of length `len`, keyed by masked network.
    /// Grown lazily to `len + 1` entries.
    maps: Vec<MixMap<K, T>>,
    /// Prefix lengths with at least one entry, longest first.
    lens: Vec<u8>,
    /// Number of prefixes stored.
    count: usize,
}

impl<K: AddrBits, T: Copy + Eq> Family<K, T> {
    fn new() -> Self {
        Family {
            maps: Vec::new(),
            lens: Vec::new(),
            count: 0,
        }
    }

    fn insert_value(&mut self, key: K, len: u8, value: T) -> Option<T> {
        let len = len.min(K::BITS);
        let idx = usize::from(len);
        if self.maps.len() <= idx {
            self.maps.resize_with(idx + 1, MixMap::default);
        }
        let map = self.maps.get_mut(idx)?;
        let was_empty = map.is_empty();
        let old = map.insert(key.masked(len), value);
        if old.is_none() {
            self.count += 1;
        }
        if was_empty {
            let pos = self.lens.partition_point(|&l| l > len);
            self.lens.insert(pos, len);
        }
        old
    }

    fn remove(&mut self, key: K, len: u8) -> Option<T> {
        let idx = usize::from(len);
        let map = self.maps.get_mut(idx)?;
        let old = map.remove(&key.masked(len))?;
        self.count -= 1;
        if map.is_empty() {
            self.lens.retain(|&l| l != len);
        }
        Some(old)
    }

    fn get(&self, key: K, len: u8) -> Option<T> {
        self.maps
            .get(usize::from(len))
            .and_then(|m| m.get(&key.masked(len)))
            .copied()
    }

    fn remove_value(&mut self, value: T) -> usize {
        let mut removed = 0;
        for map in &mut self.maps {
            let before = map.len();
            map.retain(|_, v| *v != value);
            removed += before - map.len();
        }
        self.count -= removed;
        let maps = &self.maps;
        self.lens
            .retain(|&l| maps.get(usize::from(l)).is_some_and(|m| !m.is_empty()));
        removed
    }

    #[inline]
    fn lookup(&self, addr: K) -> Option<T> {
        for &len in &self.lens {
            if let Some(map) = self.maps.get(usize::from(len))
                && let Some(v) = map.get(&addr.masked(len))
            {
                return Some(*v);
            }
        }
        None
    }

    fn iter(&self) -> impl Iterator<Item = (K, u8, T)> + '_ {
        self.lens.iter().flat_map(move |&len| {
            self.maps
                .get(usize::from(len))
                .into_iter()
                .flat_map(move |m| m.iter().map(move |(k, v)| (*k, len, *v)))
        })
    }

    fn clear(&mut self) {
        self.maps.clear();
        self.lens.clear();
        self.count = 0;
    }
}

/// Longest-prefix-match table from [`IpNet`] prefixes to values of type `T`.
///
/// Prefixes are stored normalised (host bits cleared), so inserting
/// `10.1.2.3/8` is the same as inserting `10.0.0.0/8`.
#[derive(Clone)]
pub struct RoutingTable<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
}

impl<T: Copy + Eq> Default for RoutingTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Eq + std::fmt::Debug> std::fmt::Debug for RoutingTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<T: Copy + Eq> RoutingTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        RoutingTable {
            v4: Family::new(),
            v6: Family::new(),
        }
    }

    /// Maps `net` to `value`, returning the value it replaced, if any.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => self
                .v4
                .insert_value(u32::from(n.network()), n.prefix_len(), value),
            IpNet::V6(n) => self
                .v6
                .insert_value(u128::from(n.network()), n.prefix_len(), value),
        }
    }

    /// Removes the exact prefix `net`, returning its value, if it was present.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net {
            IpNet::V4(n) => self.v4.remove(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.network()), n.prefix_len()),
        }
    }

    /// Removes every prefix that maps to `value`; returns how many were removed.
    pub fn remove_value(&mut self, value: T) -> usize {
        self.v4.remove_value(value) + self.v6.remove_value(value)
    }

    /// The value stored for exactly the prefix `net` (no longest-prefix match).
    pub fn get(&self, net: IpNet) -> Option<T> {
        match net {
            IpNet::V4(n) => self.v4.get(u32::from(n.network()), n.prefix_len()),
            IpNet::V6(n) => self.v6.get(u128::from(n.network()), n.prefix_len()),
        }
    }

    /// The value of the longest prefix containing `addr`, if any.
    ///
    /// IPv4-mapped IPv6 addresses are *not* folded into IPv4: `::ffff:a.b.c.d`
    /// is looked up in the IPv6 table. Does not allocate.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    /// Whether the longest prefix containing `addr` maps to `value`.
    #[inline]
    pub fn contains(&self, addr: IpAddr, value: T) -> bool {
        self.lookup(addr) == Some(value)
    }

    /// All `(prefix, value)` pairs: IPv4 first, then IPv6, longest prefixes
    /// first within a family, arbitrary order within one prefix length.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, T)> + '_ {
        let v4 = self.v4.iter().filter_map(|(k, len, v)| {
            Ipv4Net::new(Ipv4Addr::from(k), len)
                .ok()
                .map(|n| (IpNet::V4(n), v))
        });
        let v6 = self.v6.iter().filter_map(|(k, len, v)| {
            Ipv6Net::new(Ipv6Addr::from(k), len)
                .ok()
                .map(|n| (IpNet::V6(n), v))
        });
        v4.chain(v6)
    }

    /// Number of prefixes stored.
    pub fn len(&self) -> usize {
        self.v4.count + self.v6.count
    }

    /// Whether the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every prefix.
    pub fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn longest_prefix_wins_v4() {
        let mut t = RoutingTable::new();
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.0.0/24"), 2);
        t.insert(net("100.64.0.5/32"), 3);
        assert_eq!(t.lookup(ip("100.64.0.5")), Some(3));
        assert_eq!(t.lookup(ip("100.64.0.6")), Some(2));
        assert_eq!(t.lookup(ip("100.64.1.6")), Some(1));
        assert_eq!(t.lookup(ip("100.128.0.1")), None);
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        assert!(t.contains(ip("100.64.0.5"), 3));
        assert!(!t.contains(ip("100.64.0.5"), 1));
    }

    #[test]
    fn longest_prefix_wins_v6() {
        let mut t = RoutingTable::new();
        t.insert(net("fd00::/8"), 1);
        t.insert(net("fd00:1::/32"), 2);
        t.insert(net("fd00:1::5/128"), 3);
        assert_eq!(t.lookup(ip("fd00:1::5")), Some(3));
        assert_eq!(t.lookup(ip("fd00:1::6")), Some(2));
        assert_eq!(t.lookup(ip("fd42::1")), Some(1));
        assert_eq!(t.lookup(ip("fe80::1")), None);
        // Families are independent.
        assert_eq!(t.lookup(ip("253.0.0.1")), None);
    }

    #[test]
    fn host_bits_are_ignored_on_insert() {
        let mut t = RoutingTable::new();
        t.insert(net("10.1.2.3/8"), 7);
        assert_eq!(t.get(net("10.0.0.0/8")), Some(7));
        assert_eq!(t.lookup(ip("10.200.0.1")), Some(7));
        assert_eq!(t.remove(net("10.9.9.9/8")), Some(7));
        assert!(t.is_empty());
    }

    #[test]
    fn insert_replaces() {
        let mut t = RoutingTable::new();
        assert_eq!(t.insert(net("10.0.0.0/8"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/8"), 2), Some(1));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("10.1.1.1")), Some(2));
    }

    #[test]
    fn removal() {
        let mut t = RoutingTable::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("fd00::/8"), 2);
        t.insert(net("10.2.0.0/16"), 3);
        assert_eq!(t.remove(net("10.1.0.0/16")), Some(2));
        assert_eq!(t.remove(net("10.1.0.0/16")), None);
        assert_eq!(t.remove(net("10.1.0.0/17")), None);
        assert_eq!(t.lookup(ip("10.1.0.1")), Some(1));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(3));

        t.insert(net("10.1.0.0/16"), 2);
        assert_eq!(t.remove_value(2), 2);
        assert_eq!(t.lookup(ip("10.1.0.1")), Some(1));
        assert_eq!(t.lookup(ip("fd00::1")), None);
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove_value(2), 0);

        assert_eq!(t.remove_value(1), 1);
        assert_eq!(t.remove_value(3), 1);
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.2.0.1")), None);
    }

    #[test]
    fn default_routes() {
        let mut t = RoutingTable::new();
        t.insert(net("0.0.0.0/0"), 1);
        t.insert(net("::/0"), 2);
        t.insert(net("192.168.0.0/16"), 3);
        assert_eq!(t.lookup(ip("8.8.8.8")), Some(1));
        assert_eq!(t.lookup(ip("255.255.255.255")), Some(1));
        assert_eq!(t.lookup(ip("192.168.3.4")), Some(3));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(2));
        assert_eq!(t.lookup(ip("::")), Some(2));
        assert_eq!(t.remove(net("0.0.0.0/0")), Some(1));
        assert_eq!(t.lookup(ip("8.8.8.8")), None);
    }

    #[test]
    fn host_routes() {
        let mut t = RoutingTable::new();
        t.insert(net("100.64.0.1/32"), 1);
        t.insert(net("fd00::1/128"), 2);
        t.insert(net("255.255.255.255/32"), 3);
        t.insert(net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"), 4);
        assert_eq!(t.lookup(ip("100.64.0.1")), Some(1));
        assert_eq!(t.lookup(ip("100.64.0.2")), None);
        assert_eq!(t.lookup(ip("100.64.0.0")), None);
        assert_eq!(t.lookup(ip("fd00::1")), Some(2));
        assert_eq!(t.lookup(ip("fd00::")), None);
        assert_eq!(t.lookup(ip("255.255.255.255")), Some(3));
        assert_eq!(
            t.lookup(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            Some(4)
        );
    }

    #[test]
    fn every_prefix_length_matches_its_own_network() {
        let mut t = RoutingTable::new();
        for len in 0..=32u8 {
            t.insert(
                IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, 20, 30, 40), len).expect("len")),
                len,
            );
        }
        for len in 0..=128u8 {
            t.insert(
                IpNet::V6(Ipv6Net::new(ip6("fd12:3456::789a"), len).expect("len")),
                len,
            );
        }
        assert_eq!(t.len(), 33 + 129);
        assert_eq!(t.lookup(ip("10.20.30.40")), Some(32));
        assert_eq!(t.lookup(ip("10.20.30.41")), Some(31));
        assert_eq!(t.lookup(ip("10.20.31.0")), Some(23));
        assert_eq!(t.lookup(ip("138.0.0.0")), Some(0));
        assert_eq!(t.lookup(ip("fd12:3456::789a")), Some(128));
        assert_eq!(t.lookup(ip("fd12:3456::789b")), Some(127));
        assert_eq!(t.lookup(ip("7d12::")), Some(0));
        for (n, v) in t.iter() {
            assert_eq!(n.prefix_len(), v);
            assert_eq!(t.get(n), Some(v));
        }
        assert_eq!(t.iter().count(), t.len());
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.20.30.40")), None);
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().expect("test address")
    }

    #[test]
    fn iter_lists_everything_longest_first() {
        let mut t = RoutingTable::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.0.0.1/32"), 2);
        t.insert(net("fd00::/8"), 3);
        let all: Vec<_> = t.iter().collect();
        assert_eq!(
            all,
            vec![
                (net("10.0.0.1/32"), 2),
                (net("10.0.0.0/8"), 1),
                (net("fd00::/8"), 3)
            ]
        );
    }
}
