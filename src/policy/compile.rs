//! The policy compiler (DESIGN §7): a validated [`Policy`], the organization's
//! devices and one node → that node's [`InboundTable`], which the node's data-plane
//! filter (`node::filter`) consults for every new flow *into* it.
//!
//! Pure: no I/O, no clock. Cost: each rule's `to` is checked against this node
//! alone; only the rules that concern the node have their `from` expanded over the
//! devices, so a node's table costs `O(rules + concerning rules × devices)`, never
//! all pairs.
//!
//! Semantics, verbatim from DESIGN §7: a hostname glob, a group or `*` means the
//! matching devices' v4 *and* v6 addresses; `*` as a source means every address of
//! both families; a CIDR covers its own family only (`0.0.0.0/0` never matches
//! IPv6, `::/0` never IPv4); `icmp` is ICMP for v4 and ICMPv6 for v6; `ports`
//! with `any` mean tcp and udp on those ports. A rule concerns this node when its
//! `to` names it (hostname, group, `*`), or holds a CIDR overlapping its own
//! addresses or a prefix it advertises (a subnet router filters for its LAN).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::file::{HostGlob, Policy, PortRange, Proto, Selector};
use crate::wire::ip::protocol;

/// What the compiler needs to know about a device (the coordinator's record,
/// reduced): hostname, tunnel addresses, and its advertised prefixes that are
/// approved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub hostname: String,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    /// Approved advertised prefixes (subnet router).
    pub routes: Vec<IpNet>,
    /// An approved exit node (DESIGN §8): `internet` in a rule's `to` covers every
    /// address it forwards to, both families.
    pub exit: bool,
}

/// A node's compiled inbound rules. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboundTable {
    rules: Vec<Rule>,
}

/// One rule as it applies to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    src: SourceSet,
    /// Destinations on this node the rule covers (own addresses, LAN prefixes).
    dst: Vec<IpNet>,
    proto: Proto,
    /// Empty: every port.
    ports: Vec<PortRange>,
}

/// Source addresses as sorted, merged, inclusive ranges per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SourceSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl SourceSet {
    fn add(&mut self, net: IpNet) {
        match net {
            IpNet::V4(n) => self
                .v4
                .push((u32::from(n.network()), u32::from(n.broadcast()))),
            IpNet::V6(n) => self
                .v6
                .push((u128::from(n.network()), u128::from(n.broadcast()))),
        }
    }

    fn add_device(&mut self, d: &DeviceInfo) {
        self.v4.push((u32::from(d.v4), u32::from(d.v4)));
        if let Some(v6) = d.v6 {
            self.v6.push((u128::from(v6), u128::from(v6)));
        }
    }

    fn add_everything(&mut self) {
        self.v4.push((0, u32::MAX));
        self.v6.push((0, u128::MAX));
    }

    fn finish(&mut self) {
        merge(&mut self.v4);
        merge(&mut self.v6);
    }

    fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => in_ranges(&self.v4, u32::from(a)),
            IpAddr::V6(a) => in_ranges(&self.v6, u128::from(a)),
        }
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge<T: Copy + Ord + num_like::Succ>(ranges: &mut Vec<(T, T)>) {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges.iter() {
        match out.last_mut() {
            Some(last) if last.1.succ().is_none_or(|next| lo <= next) => {
                last.1 = last.1.max(hi);
            }
            _ => out.push((lo, hi)),
        }
    }
    *ranges = out;
}

fn in_ranges<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    // The last range starting at or below x.
    let i = ranges.partition_point(|&(lo, _)| lo <= x);
    i > 0 && ranges.get(i - 1).is_some_and(|&(_, hi)| x <= hi)
}

mod num_like {
    /// `x + 1`, or `None` at the maximum.
    pub trait Succ: Sized {
        fn succ(self) -> Option<Self>;
    }
    impl Succ for u32 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
    }
    impl Succ for u128 {
        fn succ(self) -> Option<Self> {
            self.checked_add(1)
        }
    }
}

impl InboundTable {
    /// Number of rules that concern this node.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// No rule concerns this node: every new inbound flow is refused.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a new flow from `src` to `dst` with IP protocol `proto` (after the
    /// IPv6 extension headers) and, for TCP and UDP, destination port `port` is
    /// allowed.
    pub fn allows(&self, src: IpAddr, dst: IpAddr, proto: u8, port: Option<u16>) -> bool {
        if src.is_ipv4() != dst.is_ipv4() {
            return false;
        }
        self.rules.iter().any(|r| r.allows(src, dst, proto, port))
    }
}

impl Rule {
    fn allows(&self, src: IpAddr, dst: IpAddr, proto: u8, port: Option<u16>) -> bool {
        let proto_ok = match self.proto {
            Proto::Any => true,
            Proto::Tcp => proto == protocol::TCP,
            Proto::Udp => proto == protocol::UDP,
            Proto::Icmp => match dst {
                IpAddr::V4(_) => proto == protocol::ICMP,
                IpAddr::V6(_) => proto == protocol::ICMPV6,
            },
            Proto::Number(n) => proto == n,
        };
        if !proto_ok {
            return false;
        }
        if !self.ports.is_empty() {
            // Ports exist only for tcp and udp (`any` with ports means those two).
            if proto != protocol::TCP && proto != protocol::UDP {
                return false;
            }
            match port {
                Some(p) if self.ports.iter().any(|r| r.contains(p)) => {}
                _ => return false,
            }
        }
        self.dst.iter().any(|n| n.contains(&dst)) && self.src.contains(src)
    }
}

/// Compiles `policy` into `me`'s inbound table, given every device of the
/// organization (`me` may or may not be among them).
pub fn compile(policy: &Policy, devices: &[DeviceInfo], me: &DeviceInfo) -> InboundTable {
    let mut groups = GroupCache::new(policy, devices);
    let mut rules = Vec::new();
    for rule in &policy.allow {
        let mut dst = Vec::new();
        for sel in &rule.to {
            destinations(sel, me, &mut groups, &mut dst);
        }
        if dst.is_empty() {
            continue;
        }
        dst.sort_unstable();
        dst.dedup();
        let mut src = SourceSet::default();
        for sel in &rule.from {
            match sel {
                Selector::Any => src.add_everything(),
                // A destination only (the parser refuses it in `from`).
                Selector::Internet => {}
                Selector::Cidr(net) => src.add(*net),
                Selector::Host(glob) => {
                    for d in devices.iter().filter(|d| glob.matches(&d.hostname)) {
                        src.add_device(d);
                    }
                }
                Selector::Group(name) => {
                    for &i in groups.members(name) {
                        if let Some(d) = devices.get(i) {
                            src.add_device(d);
                        }
                    }
                }
            }
        }
        src.finish();
        if src.is_empty() {
            continue;
        }
        rules.push(Rule {
            src,
            dst,
            proto: rule.proto,
            ports: rule.ports.clone(),
        });
    }
    InboundTable { rules }
}

/// What `sel` (from a rule's `to`) covers on `me`, appended to `out`.
fn destinations(sel: &Selector, me: &DeviceInfo, groups: &mut GroupCache, out: &mut Vec<IpNet>) {
    let own = || {
        std::iter::once(IpNet::from(IpAddr::V4(me.v4)))
            .chain(me.v6.map(|a| IpNet::from(IpAddr::V6(a))))
    };
    let names_me = match sel {
        Selector::Any => true,
        Selector::Host(glob) => glob.matches(&me.hostname),
        Selector::Group(name) => groups.has(name, &me.hostname),
        Selector::Internet => {
            if me.exit {
                out.push(IpNet::V4(ipnet::Ipv4Net::default()));
                out.push(IpNet::V6(ipnet::Ipv6Net::default()));
            }
            false
        }
        Selector::Cidr(net) => {
            out.extend(own().filter(|a| net.contains(a)));
            for route in &me.routes {
                if net.contains(route) {
                    out.push(*route);
                } else if route.contains(net) {
                    out.push(*net);
                }
            }
            false
        }
    };
    if names_me {
        out.extend(own());
    }
}

/// Group members (indices into the devices), expanded once per group per compile.
struct GroupCache<'a> {
    policy: &'a Policy,
    devices: &'a [DeviceInfo],
    members: BTreeMap<&'a str, Vec<usize>>,
}

impl<'a> GroupCache<'a> {
    fn new(policy: &'a Policy, devices: &'a [DeviceInfo]) -> Self {
        Self {
            policy,
            devices,
            members: BTreeMap::new(),
        }
    }

    fn globs(&self, name: &str) -> &'a [HostGlob] {
        self.policy
            .groups
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn has(&self, name: &str, hostname: &str) -> bool {
        self.globs(name).iter().any(|g| g.matches(hostname))
    }

    fn members(&mut self, name: &str) -> &[usize] {
        let Some((key, globs)) = self.policy.groups.get_key_value(name) else {
            return &[];
        };
        let devices = self.devices;
        self.members.entry(key.as_str()).or_insert_with(|| {
            devices
                .iter()
                .enumerate()
                .filter(|(_, d)| globs.iter().any(|g| g.matches(&d.hostname)))
                .map(|(i, _)| i)
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TCP: u8 = protocol::TCP;
    const UDP: u8 = protocol::UDP;

    fn dev(name: &str, v4: &str, v6: Option<&str>) -> DeviceInfo {
        DeviceInfo {
            hostname: name.into(),
            v4: v4.parse().unwrap(),
            v6: v6.map(|a| a.parse().unwrap()),
            routes: Vec::new(),
            exit: false,
        }
    }

    fn devices() -> Vec<DeviceInfo> {
        vec![
            dev("web1", "100.64.0.1", Some("fd00::1")),
            dev("web2", "100.64.0.2", Some("fd00::2")),
            dev("db1", "100.64.0.3", Some("fd00::3")),
            dev("laptop-ann", "100.64.0.4", Some("fd00::4")),
            dev("ops1", "100.64.0.5", None), // v4 only
            dev("other", "100.64.0.6", Some("fd00::6")),
        ]
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table(policy: &str, me: &str) -> InboundTable {
        let p = Policy::parse(policy).unwrap();
        let devs = devices();
        let me = devs.iter().find(|d| d.hostname == me).unwrap();
        compile(&p, &devs, me)
    }

    const EXAMPLE: &str = r#"
[groups]
web = ["web*"]
ops = ["laptop*", "ops1"]

[[allow]]
from = ["group:ops"]
to   = ["*"]

[[allow]]
from  = ["group:web", "198.51.100.0/24", "2001:db8:100::/64"]
to    = ["db*"]
proto = "tcp"
ports = ["5432", "8000-8099"]
"#;

    #[test]
    fn design_example_for_the_database() {
        let t = table(EXAMPLE, "db1");
        assert_eq!(t.len(), 2);
        // web → db on 5432 and 8000-8099, tcp only, both families.
        for (src, dst) in [("100.64.0.1", "100.64.0.3"), ("fd00::2", "fd00::3")] {
            assert!(t.allows(ip(src), ip(dst), TCP, Some(5432)));
            assert!(t.allows(ip(src), ip(dst), TCP, Some(8000)));
            assert!(t.allows(ip(src), ip(dst), TCP, Some(8099)));
            assert!(!t.allows(ip(src), ip(dst), TCP, Some(8100)));
            assert!(!t.allows(ip(src), ip(dst), TCP, Some(22)));
            assert!(!t.allows(ip(src), ip(dst), UDP, Some(5432)));
            assert!(!t.allows(ip(src), ip(dst), TCP, None));
        }
        // ops reach everything on db, both families; ops1 has no v6.
        assert!(t.allows(ip("100.64.0.4"), ip("100.64.0.3"), UDP, Some(53)));
        assert!(t.allows(ip("fd00::4"), ip("fd00::3"), 1, None));
        assert!(t.allows(ip("100.64.0.5"), ip("100.64.0.3"), TCP, Some(22)));
        // Outside sources and families.
        assert!(t.allows(ip("198.51.100.7"), ip("100.64.0.3"), TCP, Some(5432)));
        assert!(t.allows(ip("2001:db8:100::9"), ip("fd00::3"), TCP, Some(5432)));
        assert!(!t.allows(ip("2001:db8:101::9"), ip("fd00::3"), TCP, Some(5432)));
        assert!(!t.allows(ip("100.64.0.6"), ip("100.64.0.3"), TCP, Some(5432)));
        assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), TCP, Some(5432)));
        // A destination that is not db1.
        assert!(!t.allows(ip("100.64.0.1"), ip("100.64.0.2"), TCP, Some(5432)));
    }

    #[test]
    fn rules_that_do_not_concern_the_node_are_left_out() {
        let t = table(EXAMPLE, "web1");
        assert_eq!(t.len(), 1); // only ops → *
        assert!(!t.allows(ip("100.64.0.2"), ip("100.64.0.1"), TCP, Some(5432)));
        assert!(t.allows(ip("fd00::4"), ip("fd00::1"), TCP, Some(5432)));
        let t = table("[[allow]]\nfrom = [\"*\"]\nto = [\"nothing*\"]\n", "web1");
        assert!(t.is_empty());
        assert!(!t.allows(ip("100.64.0.2"), ip("100.64.0.1"), TCP, Some(1)));
    }

    #[test]
    fn globs_are_case_insensitive_and_full() {
        let t = table(
            "[[allow]]\nfrom = [\"WEB?\", \"laptop-[ab]*\"]\nto = [\"d?1\"]\n",
            "db1",
        );
        assert!(t.allows(ip("100.64.0.1"), ip("100.64.0.3"), TCP, Some(1)));
        assert!(t.allows(ip("fd00::4"), ip("fd00::3"), TCP, Some(1)));
        assert!(!t.allows(ip("100.64.0.6"), ip("100.64.0.3"), TCP, Some(1)));
        // `web` does not match `web1` (a glob matches the whole name).
        let t = table("[[allow]]\nfrom = [\"web\"]\nto = [\"*\"]\n", "db1");
        assert!(t.is_empty());
    }

    #[test]
    fn cidr_keeps_its_family() {
        let v4_all = table("[[allow]]\nfrom = [\"0.0.0.0/0\"]\nto = [\"*\"]\n", "db1");
        assert!(v4_all.allows(ip("100.64.0.6"), ip("100.64.0.3"), TCP, Some(1)));
        assert!(v4_all.allows(ip("203.0.113.1"), ip("100.64.0.3"), TCP, Some(1)));
        assert!(!v4_all.allows(ip("fd00::6"), ip("fd00::3"), TCP, Some(1)));
        assert!(!v4_all.allows(ip("::"), ip("fd00::3"), TCP, Some(1)));
        assert!(!v4_all.allows(ip("::ffff:100.64.0.6"), ip("fd00::3"), TCP, Some(1)));
        let v6_all = table("[[allow]]\nfrom = [\"::/0\"]\nto = [\"*\"]\n", "db1");
        assert!(v6_all.allows(ip("fd00::6"), ip("fd00::3"), TCP, Some(1)));
        assert!(!v6_all.allows(ip("100.64.0.6"), ip("100.64.0.3"), TCP, Some(1)));
        assert!(!v6_all.allows(ip("0.0.0.0"), ip("100.64.0.3"), TCP, Some(1)));
        // As a destination: a v4 CIDR covers only the node's v4 address.
        let t = table(
            "[[allow]]\nfrom = [\"*\"]\nto = [\"100.64.0.0/24\"]\n",
            "db1",
        );
        assert!(t.allows(ip("100.64.0.6"), ip("100.64.0.3"), TCP, Some(1)));
        assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), TCP, Some(1)));
        let t = table("[[allow]]\nfrom = [\"*\"]\nto = [\"fd00::/64\"]\n", "db1");
        assert!(t.allows(ip("fd00::6"), ip("fd00::3"), TCP, Some(1)));
        assert!(!t.allows(ip("100.64.0.6"), ip("100.64.0.3"), TCP, Some(1)));
        // A CIDR that holds neither address does not concern the node.
        assert!(table("[[allow]]\nfrom = [\"*\"]\nto = [\"10.0.0.0/8\"]\n", "db1").is_empty());
    }

    #[test]
    fn star_means_every_address_of_both_families() {
        let t = table("[[allow]]\nfrom = [\"*\"]\nto = [\"db1\"]\n", "db1");
        for src in ["100.64.0.6", "203.0.113.9", "fd00::6", "2001:db8::1", "::"] {
            let dst = if src.contains(':') {
                "fd00::3"
            } else {
                "100.64.0.3"
            };
            assert!(t.allows(ip(src), ip(dst), 132, None), "{src}");
        }
        // `*` as destination: the node's own addresses, not its LAN.
        let mut devs = devices();
        devs[2].routes = vec!["192.168.7.0/24".parse().unwrap()];
        let p = Policy::parse("[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\n").unwrap();
        let t = compile(&p, &devs, &devs[2]);
        assert!(t.allows(ip("100.64.0.6"), ip("100.64.0.3"), TCP, Some(1)));
        assert!(!t.allows(ip("100.64.0.6"), ip("192.168.7.9"), TCP, Some(1)));
    }

    #[test]
    fn groups_expand_to_both_families_and_v4_only_devices() {
        let t = table(
            "[groups]\nops = [\"laptop*\", \"ops1\"]\n[[allow]]\nfrom = [\"group:ops\"]\nto = [\"web1\"]\n",
            "web1",
        );
        assert!(t.allows(ip("100.64.0.4"), ip("100.64.0.1"), TCP, Some(1)));
        assert!(t.allows(ip("fd00::4"), ip("fd00::1"), TCP, Some(1)));
        assert!(t.allows(ip("100.64.0.5"), ip("100.64.0.1"), TCP, Some(1)));
        assert!(!t.allows(ip("fd00::5"), ip("fd00::1"), TCP, Some(1)));
        // A group as destination, and a v4-only node as destination.
        let p = "[groups]\nops = [\"ops*\"]\n[[allow]]\nfrom = [\"web*\"]\nto = [\"group:ops\"]\n";
        let t = table(p, "ops1");
        assert!(t.allows(ip("100.64.0.1"), ip("100.64.0.5"), TCP, Some(1)));
        assert!(!t.allows(ip("fd00::1"), ip("fd00::5"), TCP, Some(1)));
        assert!(table(p, "web1").is_empty());
    }

    #[test]
    fn icmp_means_both_families() {
        let t = table(
            "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nproto = \"icmp\"\n",
            "db1",
        );
        assert!(t.allows(ip("100.64.0.6"), ip("100.64.0.3"), protocol::ICMP, None));
        assert!(t.allows(ip("fd00::6"), ip("fd00::3"), protocol::ICMPV6, None));
        // ICMPv6 over v4 and ICMP over v6 are something else.
        assert!(!t.allows(ip("100.64.0.6"), ip("100.64.0.3"), protocol::ICMPV6, None));
        assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), protocol::ICMP, None));
        assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), TCP, Some(1)));
        // A protocol number is taken literally.
        let t = table(
            "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nproto = 132\n",
            "db1",
        );
        assert!(t.allows(ip("fd00::6"), ip("fd00::3"), 132, None));
        assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), TCP, None));
    }

    #[test]
    fn ports_with_any_mean_tcp_and_udp() {
        let t = table(
            "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"53\", \"1000-1002\"]\n",
            "db1",
        );
        for proto in [TCP, UDP] {
            assert!(t.allows(ip("100.64.0.6"), ip("100.64.0.3"), proto, Some(53)));
            assert!(t.allows(ip("fd00::6"), ip("fd00::3"), proto, Some(1001)));
            assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), proto, Some(1003)));
            assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), proto, Some(999)));
        }
        assert!(!t.allows(ip("fd00::6"), ip("fd00::3"), protocol::ICMPV6, None));
        assert!(!t.allows(ip("100.64.0.6"), ip("100.64.0.3"), 132, Some(53)));
    }

    #[test]
    fn subnet_router_filters_for_its_advertised_prefixes() {
        let mut devs = devices();
        devs[5].routes = vec![
            "192.168.7.0/24".parse().unwrap(),
            "2001:db8:7::/48".parse().unwrap(),
        ];
        let me = devs[5].clone();
        let p = Policy::parse(
            "[[allow]]\nfrom = [\"web1\"]\nto = [\"192.168.0.0/16\", \"2001:db8:7:1::/64\"]\nproto = \"udp\"\n",
        )
        .unwrap();
        let t = compile(&p, &devs, &me);
        assert!(t.allows(ip("100.64.0.1"), ip("192.168.7.9"), UDP, Some(9)));
        assert!(!t.allows(ip("100.64.0.1"), ip("192.168.8.9"), UDP, Some(9)));
        assert!(t.allows(ip("fd00::1"), ip("2001:db8:7:1::9"), UDP, Some(9)));
        assert!(!t.allows(ip("fd00::1"), ip("2001:db8:7:2::9"), UDP, Some(9)));
        // Not the router's own address (the CIDRs do not hold it).
        assert!(!t.allows(ip("100.64.0.1"), ip("100.64.0.6"), UDP, Some(9)));
        assert!(!t.allows(ip("100.64.0.2"), ip("192.168.7.9"), UDP, Some(9)));
    }

    #[test]
    fn source_ranges_merge() {
        let mut s = SourceSet::default();
        for net in ["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24"] {
            s.add(net.parse().unwrap());
        }
        s.add_everything();
        s.finish();
        assert_eq!(s.v4, vec![(0, u32::MAX)]);
        let mut s = SourceSet::default();
        for net in ["10.0.0.0/24", "10.0.1.0/24", "10.0.3.0/24"] {
            s.add(net.parse().unwrap());
        }
        s.finish();
        assert_eq!(s.v4.len(), 2);
        assert!(s.contains(ip("10.0.1.255")));
        assert!(!s.contains(ip("10.0.2.0")));
        assert!(s.contains(ip("10.0.3.0")));
        assert!(!s.contains(ip("9.255.255.255")));
    }
}
