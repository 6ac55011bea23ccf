//! Dual-stack IP address management.
//!
//! Each device gets the lowest free host address of its organization's v4 prefix and,
//! where it is free, the v6 address with the same host number (`100.64.0.5` and
//! `200::5`; [`paired`]), else the lowest free v6 address. The network and the all-ones (broadcast) address are never handed out, so
//! `200::/64` gives `200::1`, `200::2`, … Uniqueness under concurrency is not this
//! module's job: the store runs allocation and insert in one write transaction and the
//! schema has UNIQUE constraints as the last line of defence.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

/// Default IPv4 tunnel prefix of an organization.
pub const DEFAULT_ORG_CIDR: &str = "100.64.0.0/10";
/// Default IPv6 tunnel prefix of an organization.
pub const DEFAULT_ORG_CIDR_V6: &str = "200::/64";

/// The default v4 prefix, parsed.
pub fn default_org_cidr() -> Ipv4Net {
    DEFAULT_ORG_CIDR
        .parse()
        .expect("DEFAULT_ORG_CIDR is a valid prefix")
}

/// The default v6 prefix, parsed.
pub fn default_org_cidr_v6() -> Ipv6Net {
    DEFAULT_ORG_CIDR_V6
        .parse()
        .expect("DEFAULT_ORG_CIDR_V6 is a valid prefix")
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("address pool {0} is exhausted")]
    Exhausted(IpNet),
    #[error("requested address {addr} is outside the organization prefix {prefix}")]
    OutsidePrefix { addr: IpAddr, prefix: IpNet },
    #[error("requested address {0} is the network or broadcast address of its prefix")]
    Reserved(IpAddr),
    #[error("requested address {0} is already in use")]
    Taken(IpAddr),
    #[error("prefix {0} has host bits set; did you mean {1}?")]
    HostBits(IpNet, IpNet),
    #[error("prefix {0} is a default route; advertising it is not supported")]
    DefaultRoute(IpNet),
    #[error("prefix {cidr} overlaps {with}")]
    Overlap { cidr: IpNet, with: String },
}

/// First and last assignable host of a prefix, as integers (None if it has none).
fn host_range(net: IpNet) -> Option<(u128, u128)> {
    let (first, last) = match net {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    };
    if last - first < 2 {
        // /31, /32, /127, /128: too small to keep network and broadcast out.
        return None;
    }
    Some((first + 1, last - 1))
}

fn addr_from(net: IpNet, value: u128) -> IpAddr {
    match net {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(value as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

fn addr_value(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The lowest host address of `prefix` not in `used`. Costs at most `used.len() + 1`
/// probes.
pub fn lowest_free(prefix: IpNet, used: &HashSet<IpAddr>) -> Result<IpAddr, IpamError> {
    let (first, last) = host_range(prefix).ok_or(IpamError::Exhausted(prefix))?;
    let mut value = first;
    loop {
        let addr = addr_from(prefix, value);
        if !used.contains(&addr) {
            return Ok(addr);
        }
        if value == last {
            return Err(IpamError::Exhausted(prefix));
        }
        value += 1;
    }
}

/// Checks that a requested address can be given out.
pub fn check_requested(
    prefix: IpNet,
    addr: IpAddr,
    used: &HashSet<IpAddr>,
) -> Result<(), IpamError> {
    if !prefix.contains(&addr) {
        return Err(IpamError::OutsidePrefix { addr, prefix });
    }
    let (first, last) = host_range(prefix).ok_or(IpamError::Exhausted(prefix))?;
    let value = addr_value(addr);
    if value < first || value > last {
        return Err(IpamError::Reserved(addr));
    }
    if used.contains(&addr) {
        return Err(IpamError::Taken(addr));
    }
    Ok(())
}

/// Chooses the address for a new device: the requested one if given and free, else the
/// lowest free.
pub fn allocate(
    prefix: IpNet,
    requested: Option<IpAddr>,
    used: &HashSet<IpAddr>,
) -> Result<IpAddr, IpamError> {
    match requested {
        Some(addr) => check_requested(prefix, addr, used).map(|()| addr),
        None => lowest_free(prefix, used),
    }
}

/// The address of `prefix` with the same host number as `addr` in `addr_prefix`
/// (`100.64.0.5` in `100.64.0.0/10` → `200::5` in `200::/64`), if that is a host
/// address of `prefix` not in `used`. Devices then line up across families.
pub fn paired(
    prefix: IpNet,
    addr_prefix: IpNet,
    addr: IpAddr,
    used: &HashSet<IpAddr>,
) -> Option<IpAddr> {
    let host = addr_value(addr).checked_sub(addr_value(addr_prefix.network()))?;
    let (first, last) = host_range(prefix)?;
    let value = (first - 1).checked_add(host)?;
    if value < first || value > last {
        return None;
    }
    let candidate = addr_from(prefix, value);
    (!used.contains(&candidate)).then_some(candidate)
}

/// A device's address in `prefix` when it has `other` (in `other_prefix`) in the
/// other family: the requested one if given, else the one with `other`'s host number
/// when free ([`paired`]), else the lowest free.
pub fn allocate_paired(
    prefix: IpNet,
    requested: Option<IpAddr>,
    other_prefix: IpNet,
    other: IpAddr,
    used: &HashSet<IpAddr>,
) -> Result<IpAddr, IpamError> {
    match requested {
        Some(_) => allocate(prefix, requested, used),
        None => match paired(prefix, other_prefix, other, used) {
            Some(addr) => Ok(addr),
            None => lowest_free(prefix, used),
        },
    }
}

/// Checks the form of one advertised prefix: no host bits, not a default route.
pub fn validate_advertised(cidr: IpNet) -> Result<(), IpamError> {
    if cidr.prefix_len() == 0 {
        return Err(IpamError::DefaultRoute(cidr));
    }
    if cidr.trunc() != cidr {
        return Err(IpamError::HostBits(cidr, cidr.trunc()));
    }
    Ok(())
}

/// True when two prefixes share any address.
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Another device's advertised prefixes, for overlap checks.
pub struct Advertiser<'a> {
    pub device_id: i64,
    pub hostname: &'a str,
    pub cidrs: &'a [IpNet],
}

/// Validates a device's advertised prefixes against their own form, each other, the
/// organization prefixes and every other device's advertised prefixes.
pub fn check_advertised(
    cidrs: &[IpNet],
    org_v4: Ipv4Net,
    org_v6: Ipv6Net,
    others: &[Advertiser<'_>],
) -> Result<(), IpamError> {
    for (i, &cidr) in cidrs.iter().enumerate() {
        validate_advertised(cidr)?;
        for org in [IpNet::V4(org_v4), IpNet::V6(org_v6)] {
            if overlaps(cidr, org) {
                return Err(IpamError::Overlap {
                    cidr,
                    with: format!("the organization prefix {org}"),
                });
            }
        }
        if let Some(&dup) = cidrs[..i].iter().find(|&&c| overlaps(c, cidr)) {
            return Err(IpamError::Overlap {
                cidr,
                with: format!("{dup} in the same list"),
            });
        }
        for other in others {
            if let Some(&theirs) = other.cidrs.iter().find(|&&c| overlaps(c, cidr)) {
                return Err(IpamError::Overlap {
                    cidr,
                    with: format!(
                        "{theirs} advertised by device {} ({})",
                        other.device_id, other.hostname
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn slash30_exhausts_cleanly() {
        let prefix = net("192.0.2.0/30");
        let mut used = HashSet::new();
        let a = lowest_free(prefix, &used).unwrap();
        assert_eq!(a, ip("192.0.2.1"));
        used.insert(a);
        let b = lowest_free(prefix, &used).unwrap();
        assert_eq!(b, ip("192.0.2.2"));
        used.insert(b);
        assert_eq!(
            lowest_free(prefix, &used),
            Err(IpamError::Exhausted(prefix))
        );
        assert_eq!(
            lowest_free(net("192.0.2.0/31"), &HashSet::new()),
            Err(IpamError::Exhausted(net("192.0.2.0/31")))
        );
    }

    #[test]
    fn v6_hands_out_in_order() {
        let prefix = IpNet::V6(default_org_cidr_v6());
        let mut used = HashSet::new();
        for expect in ["200::1", "200::2", "200::3"] {
            let a = lowest_free(prefix, &used).unwrap();
            assert_eq!(a, ip(expect));
            used.insert(a);
        }
    }

    #[test]
    fn default_v4_starts_at_first_host() {
        let prefix = IpNet::V4(default_org_cidr());
        assert_eq!(
            lowest_free(prefix, &HashSet::new()).unwrap(),
            ip("100.64.0.1")
        );
    }

    #[test]
    fn release_and_reuse() {
        let prefix = net("200::/64");
        let mut used: HashSet<IpAddr> = ["200::1", "200::2", "200::3"].map(ip).into();
        used.remove(&ip("200::2"));
        assert_eq!(lowest_free(prefix, &used).unwrap(), ip("200::2"));
    }

    #[test]
    fn request_ip_both_families() {
        let v4 = net("100.64.0.0/10");
        let v6 = net("200::/64");
        let used: HashSet<IpAddr> = [ip("100.64.0.9"), ip("200::9")].into();
        assert_eq!(
            allocate(v4, Some(ip("100.64.0.10")), &used),
            Ok(ip("100.64.0.10"))
        );
        assert_eq!(allocate(v6, Some(ip("200::10")), &used), Ok(ip("200::10")));
        assert_eq!(
            allocate(v4, Some(ip("100.64.0.9")), &used),
            Err(IpamError::Taken(ip("100.64.0.9")))
        );
        assert_eq!(
            allocate(v6, Some(ip("200::9")), &used),
            Err(IpamError::Taken(ip("200::9")))
        );
        assert!(matches!(
            allocate(v4, Some(ip("10.0.0.1")), &used),
            Err(IpamError::OutsidePrefix { .. })
        ));
        assert!(matches!(
            allocate(v6, Some(ip("2001:db8::1")), &used),
            Err(IpamError::OutsidePrefix { .. })
        ));
        assert_eq!(
            allocate(v4, Some(ip("100.64.0.0")), &used),
            Err(IpamError::Reserved(ip("100.64.0.0")))
        );
        assert_eq!(
            allocate(v6, Some(ip("200::")), &used),
            Err(IpamError::Reserved(ip("200::")))
        );
    }

    #[test]
    fn v6_lines_up_with_v4_when_free() {
        let (v4, v6) = (net("100.64.0.0/10"), net("200::/64"));
        // A v4-only device took 100.64.0.4: the next device gets .5 and ::5, not ::4.
        let used: HashSet<IpAddr> = ["100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"]
            .map(ip)
            .into_iter()
            .chain(["200::1", "200::2", "200::3"].map(ip))
            .collect();
        let a4 = lowest_free(v4, &used).unwrap();
        assert_eq!(a4, ip("100.64.0.5"));
        assert_eq!(allocate_paired(v6, None, v4, a4, &used), Ok(ip("200::5")));
        // Taken: lowest free instead.
        let mut taken = used.clone();
        taken.insert(ip("200::5"));
        assert_eq!(allocate_paired(v6, None, v4, a4, &taken), Ok(ip("200::4")));
        // A request wins.
        assert_eq!(
            allocate_paired(v6, Some(ip("200::9")), v4, a4, &used),
            Ok(ip("200::9"))
        );
        // And the other way round, into a smaller prefix: no host 0x1_0000_0001 in a /24.
        assert_eq!(
            paired(net("10.1.0.0/24"), v6, ip("200::1:0:1"), &used),
            None
        );
        assert_eq!(
            paired(net("10.1.0.0/24"), v6, ip("200::7"), &used),
            Some(ip("10.1.0.7"))
        );
        // Never the broadcast or the network address.
        assert_eq!(paired(net("10.1.0.0/24"), v6, ip("200::ff"), &used), None);
        assert_eq!(paired(net("10.1.0.0/24"), v6, ip("200::"), &used), None);
    }

    #[test]
    fn overlap_refused_naming_the_conflict() {
        let org4: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        let org6: Ipv6Net = "200::/64".parse().unwrap();
        let theirs = [net("198.51.100.0/24")];
        let others = [Advertiser {
            device_id: 4,
            hostname: "router-a",
            cidrs: &theirs,
        }];
        let err = check_advertised(&[net("198.51.100.128/25")], org4, org6, &others).unwrap_err();
        assert!(err.to_string().contains("device 4 (router-a)"), "{err}");
        let err = check_advertised(&[net("100.64.1.0/24")], org4, org6, &others).unwrap_err();
        assert!(err.to_string().contains("organization prefix"), "{err}");
        let err = check_advertised(&[net("200::/48")], org4, org6, &others).unwrap_err();
        assert!(err.to_string().contains("organization prefix"), "{err}");
        assert_eq!(
            check_advertised(&[net("0.0.0.0/0")], org4, org6, &others),
            Err(IpamError::DefaultRoute(net("0.0.0.0/0")))
        );
        assert_eq!(
            check_advertised(&[net("203.0.113.5/24")], org4, org6, &others),
            Err(IpamError::HostBits(
                net("203.0.113.5/24"),
                net("203.0.113.0/24")
            ))
        );
        assert!(
            check_advertised(
                &[net("203.0.113.0/24"), net("2001:db8:100::/64")],
                org4,
                org6,
                &others
            )
            .is_ok()
        );
    }
}
