//! Which prefixes a node refuses to route into the mesh, whatever the coordinator
//! says (DESIGN §13).
//!
//! A prefix from a peer's record (an advertised prefix or a tunnel address) becomes
//! an allowed IP of that peer and a kernel route through the mesh interface. It is
//! refused when it would take over traffic the host needs outside the mesh: when it
//! overlaps one of the host's own underlay prefixes (its addresses and their
//! connected prefixes), contains a coordinator address, or lies in loopback,
//! link-local or multicast space, or is a default route (`/0`).
//!
//! Pure: the shell reads the host's addresses and the coordinator addresses and
//! hands them in as [`RouteGuard::new`]'s `protected` prefixes.

use ipnet::IpNet;
use std::fmt;

/// Why a prefix was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A default route (`/0`).
    Default,
    Loopback,
    LinkLocal,
    Multicast,
    /// It overlaps a protected prefix: the host's underlay or a coordinator address.
    Protected(IpNet),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Default => f.write_str("a default route"),
            Refusal::Loopback => f.write_str("loopback space"),
            Refusal::LinkLocal => f.write_str("link-local space"),
            Refusal::Multicast => f.write_str("multicast space"),
            Refusal::Protected(p) => {
                write!(f, "it covers {p} (this host's underlay or a coordinator)")
            }
        }
    }
}

fn net(s: &str) -> IpNet {
    // Only the constants below, which the unit tests exercise.
    s.parse().expect("a constant prefix")
}

/// Space no peer may be routed for, by class.
fn reserved() -> [(IpNet, Refusal); 6] {
    [
        (net("127.0.0.0/8"), Refusal::Loopback),
        (net("::1/128"), Refusal::Loopback),
        (net("169.254.0.0/16"), Refusal::LinkLocal),
        (net("fe80::/10"), Refusal::LinkLocal),
        (net("224.0.0.0/4"), Refusal::Multicast),
        (net("ff00::/8"), Refusal::Multicast),
    ]
}

/// True when two prefixes share any address.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The node's route guard: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteGuard {
    protected: Vec<IpNet>,
    /// A default route may be installed (`--use-exit-node`; the mesh core gives one
    /// only to the chosen exit).
    allow_default: bool,
}

impl RouteGuard {
    /// A guard protecting `protected`: the host's underlay addresses with their
    /// prefix lengths (each covers its connected prefix) and the coordinator
    /// addresses (as host prefixes).
    pub fn new(protected: impl IntoIterator<Item = IpNet>) -> Self {
        let mut protected: Vec<IpNet> = protected.into_iter().map(|n| n.trunc()).collect();
        protected.sort();
        protected.dedup();
        Self {
            protected,
            allow_default: false,
        }
    }

    /// Lets a default route through: for `--use-exit-node`, whose chosen exit is the
    /// only peer the mesh core gives a `/0`.
    pub fn allowing_default(mut self, allow: bool) -> Self {
        self.allow_default = allow;
        self
    }

    /// The protected prefixes.
    pub fn protected(&self) -> &[IpNet] {
        &self.protected
    }

    /// Whether `prefix` may be routed to a peer; the reason if not.
    pub fn check(&self, prefix: &IpNet) -> Result<(), Refusal> {
        if prefix.prefix_len() == 0 {
            return if self.allow_default {
                Ok(())
            } else {
                Err(Refusal::Default)
            };
        }
        if let Some((_, why)) = reserved().iter().find(|(r, _)| overlaps(r, prefix)) {
            return Err(*why);
        }
        match self.protected.iter().find(|p| overlaps(p, prefix)) {
            Some(p) => Err(Refusal::Protected(*p)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    fn guard() -> RouteGuard {
        RouteGuard::new([
            // Our underlay: an address with its connected prefix, v4 and v6.
            n("203.0.113.7/24"),
            n("2001:db8:16::7/64"),
            // A coordinator.
            n("198.51.100.1/32"),
            n("2001:db8:c::1/128"),
        ])
    }

    #[test]
    fn ordinary_prefixes_pass() {
        let g = guard();
        for ok in [
            "192.0.2.0/24",
            "100.64.0.5/32",
            "198.51.100.128/25",
            "198.51.100.2/31",
            "10.0.0.0/8",
            "2001:db8:17::/48",
            "fd00::/8",
            "200::/64",
        ] {
            assert_eq!(g.check(&n(ok)), Ok(()), "{ok}");
        }
        // Only the bounds of each reserved block count.
        assert_eq!(g.check(&n("126.255.255.0/24")), Ok(()));
        assert_eq!(g.check(&n("128.0.0.0/8")), Ok(()));
        assert_eq!(g.check(&n("169.253.0.0/16")), Ok(()));
        assert_eq!(g.check(&n("240.0.0.0/8")), Ok(()));
        assert_eq!(g.check(&n("fec0::/10")), Ok(()));
    }

    #[test]
    fn default_routes_are_refused_unless_allowed() {
        let g = guard();
        assert_eq!(g.check(&n("0.0.0.0/0")), Err(Refusal::Default));
        assert_eq!(g.check(&n("::/0")), Err(Refusal::Default));
        let exit = guard().allowing_default(true);
        assert_eq!(exit.check(&n("0.0.0.0/0")), Ok(()));
        assert_eq!(exit.check(&n("::/0")), Ok(()));
        // Allowing a default route allows nothing else.
        assert_eq!(
            exit.check(&n("198.51.100.1/32")),
            Err(Refusal::Protected(n("198.51.100.1/32")))
        );
    }

    #[test]
    fn reserved_space_is_refused_in_both_families() {
        let g = guard();
        for (bad, why) in [
            ("127.0.0.1/32", Refusal::Loopback),
            ("127.0.0.0/8", Refusal::Loopback),
            ("64.0.0.0/2", Refusal::Loopback),
            ("::1/128", Refusal::Loopback),
            ("169.254.169.254/32", Refusal::LinkLocal),
            ("169.0.0.0/8", Refusal::LinkLocal),
            ("fe80::/64", Refusal::LinkLocal),
            ("fe80::1/128", Refusal::LinkLocal),
            ("224.0.0.251/32", Refusal::Multicast),
            ("192.0.0.0/2", Refusal::Multicast),
            ("ff02::1/128", Refusal::Multicast),
            ("ff00::/8", Refusal::Multicast),
            ("fe00::/7", Refusal::LinkLocal),
        ] {
            assert_eq!(g.check(&n(bad)), Err(why), "{bad}");
        }
    }

    #[test]
    fn underlay_and_coordinator_are_refused_whether_covered_or_inside() {
        let g = guard();
        for (bad, hit) in [
            // Our own address, its connected prefix, inside it, around it.
            ("203.0.113.7/32", "203.0.113.0/24"),
            ("203.0.113.0/24", "203.0.113.0/24"),
            ("203.0.113.128/25", "203.0.113.0/24"),
            ("203.0.0.0/16", "203.0.113.0/24"),
            ("2001:db8:16::/64", "2001:db8:16::/64"),
            ("2001:db8:16::/80", "2001:db8:16::/64"),
            ("2000::/3", "2001:db8:c::1/128"),
            // The coordinator.
            ("198.51.100.1/32", "198.51.100.1/32"),
            ("198.51.100.0/24", "198.51.100.1/32"),
            ("2001:db8:c::/48", "2001:db8:c::1/128"),
        ] {
            assert_eq!(g.check(&n(bad)), Err(Refusal::Protected(n(hit))), "{bad}");
        }
        // A guard with nothing protected still refuses the reserved classes.
        let bare = RouteGuard::default();
        assert_eq!(bare.check(&n("2000::/3")), Ok(()));
        assert_eq!(bare.check(&n("::/0")), Err(Refusal::Default));
    }
}
