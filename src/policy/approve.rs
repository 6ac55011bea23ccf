//! What a device's peers are told it claims (DESIGN §13): advertised prefixes, the
//! relay and the exit role take effect only once approved, by an admin (`nexodus
//! devices approve`, kept in [`Device::approved`]) or in advance by the policy file's
//! `[approve]` section. A prefix inside an approved one counts as approved. A device
//! an admin added himself (`devices add`, stock WireGuard) has its claims approved by
//! that act.
//!
//! The coordinator applies [`effective`] wherever it encodes a device for watchers
//! (the store's peer reads), so nodes never see an unapproved claim; the admin's view
//! keeps the claims and shows what is [`pending`].

use ipnet::IpNet;
use serde::Serialize;

use super::Approve;
use crate::wire::control::{Approved, Device};

/// Whether `prefix`, advertised by `d`, is approved.
pub fn route_approved(d: &Device, policy: Option<&Approve>, prefix: &IpNet) -> bool {
    d.unmanaged
        || d.approved.routes.iter().any(|a| a.contains(prefix))
        || policy.is_some_and(|p| p.approves_route(&d.hostname, prefix))
}

/// Whether the relay role of `d` is approved (claimed or not).
pub fn relay_approved(d: &Device, policy: Option<&Approve>) -> bool {
    d.unmanaged || d.approved.relay || policy.is_some_and(|p| p.approves_relay(&d.hostname))
}

/// Whether the exit role of `d` is approved (claimed or not).
pub fn exit_approved(d: &Device, policy: Option<&Approve>) -> bool {
    d.unmanaged || d.approved.exit || policy.is_some_and(|p| p.approves_exit(&d.hostname))
}

/// The device as its peers see it: only approved prefixes, `relay` and `exit_node`
/// only if claimed and approved, no approvals.
pub fn effective(d: &Device, policy: Option<&Approve>) -> Device {
    let mut e = d.clone();
    e.advertise_cidrs.retain(|p| route_approved(d, policy, p));
    e.relay = d.relay && relay_approved(d, policy);
    e.exit_node = d.exit_node && exit_approved(d, policy);
    e.approved = Approved::default();
    e
}

/// What `d` claims that is not approved.
pub fn pending(d: &Device, policy: Option<&Approve>) -> Approved {
    Approved {
        routes: d
            .advertise_cidrs
            .iter()
            .filter(|p| !route_approved(d, policy, p))
            .copied()
            .collect(),
        relay: d.relay && !relay_approved(d, policy),
        exit: d.exit_node && !exit_approved(d, policy),
    }
}

/// What `d` claims that is in effect (what peers are told).
pub fn in_effect(d: &Device, policy: Option<&Approve>) -> Approved {
    let e = effective(d, policy);
    Approved {
        routes: e.advertise_cidrs,
        relay: e.relay,
        exit: e.exit_node,
    }
}

/// A device as the admin sees it (`nexodus devices --json`): the stored record
/// (claims and the admin's approvals), what peers are told and what waits for
/// approval.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AdminDevice {
    #[serde(flatten)]
    pub device: Device,
    pub in_effect: Approved,
    pub pending: Approved,
}

impl AdminDevice {
    pub fn new(device: Device, policy: Option<&Approve>) -> Self {
        Self {
            in_effect: in_effect(&device, policy),
            pending: pending(&device, policy),
            device,
        }
    }
}

/// Adds approvals: routes are merged (a prefix already covered is not added again).
pub fn grant(approved: &mut Approved, routes: &[IpNet], relay: bool, exit: bool) {
    for r in routes {
        if !approved.routes.iter().any(|a| a.contains(r)) {
            approved.routes.retain(|a| !r.contains(a));
            approved.routes.push(*r);
        }
    }
    approved.routes.sort();
    approved.relay |= relay;
    approved.exit |= exit;
}

/// Takes approvals back: every approved prefix inside one of `routes` goes (and one
/// that holds part of it, so nothing of `routes` stays approved by the admin).
pub fn withdraw(approved: &mut Approved, routes: &[IpNet], relay: bool, exit: bool) {
    approved
        .routes
        .retain(|a| !routes.iter().any(|r| r.contains(a) || a.contains(r)));
    approved.relay &= !relay;
    approved.exit &= !exit;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn device(hostname: &str, cidrs: &[&str], relay: bool) -> Device {
        Device {
            use_exit: None,
            id: 1,
            organization_id: 1,
            public_key: String::new(),
            hostname: hostname.into(),
            os: String::new(),
            tunnel_ip: "100.64.0.1".parse().unwrap(),
            tunnel_ip_v6: None,
            organization_prefix: "100.64.0.0/10".parse().unwrap(),
            organization_prefix_v6: "200::/64".parse().unwrap(),
            local_ip: None,
            local_ip_v6: None,
            endpoints: vec![],
            reflexive_endpoint: None,
            reflexive_endpoint_v6: None,
            symmetric_nat: false,
            relay,
            relay_only: false,
            ipv6_supported: false,
            advertise_cidrs: cidrs.iter().map(|c| net(c)).collect(),
            revision: 1,
            last_seen: 0,
            unmanaged: false,
            online: true,
            exit_node: true,
            approved: Approved::default(),
            name: String::new(),
            domain: String::new(),
        }
    }

    #[test]
    fn nothing_is_in_effect_until_approved() {
        let d = device("r1", &["198.51.100.0/24", "2001:db8:1::/64"], true);
        let e = effective(&d, None);
        assert!(e.advertise_cidrs.is_empty());
        assert!(!e.relay && !e.exit_node);
        let p = pending(&d, None);
        assert_eq!(p.routes, d.advertise_cidrs);
        assert!(p.relay && p.exit);
    }

    #[test]
    fn a_prefix_inside_an_approved_one_counts() {
        let mut d = device(
            "r1",
            &["198.51.100.0/25", "2001:db8:1::/64", "10.0.0.0/8"],
            true,
        );
        grant(
            &mut d.approved,
            &[net("198.51.100.0/24"), net("2001:db8::/32")],
            true,
            false,
        );
        let e = effective(&d, None);
        assert_eq!(
            e.advertise_cidrs,
            vec![net("198.51.100.0/25"), net("2001:db8:1::/64")]
        );
        assert!(e.relay && !e.exit_node);
        assert!(e.approved.is_empty(), "peers are not told the approvals");
        assert_eq!(pending(&d, None).routes, vec![net("10.0.0.0/8")]);
        // A v4 approval never covers v6 and the reverse.
        let mut d = device("r1", &["2001:db8:1::/64"], false);
        grant(&mut d.approved, &[net("0.0.0.0/1")], false, false);
        assert!(effective(&d, None).advertise_cidrs.is_empty());
    }

    #[test]
    fn revoking_takes_back_what_overlaps() {
        let mut a = Approved::default();
        grant(
            &mut a,
            &[net("198.51.100.0/25"), net("198.51.100.0/24")],
            true,
            true,
        );
        assert_eq!(
            a.routes,
            vec![net("198.51.100.0/24")],
            "the wider one replaces"
        );
        grant(&mut a, &[net("198.51.100.0/26")], false, false);
        assert_eq!(a.routes, vec![net("198.51.100.0/24")], "already covered");
        withdraw(&mut a, &[net("198.51.100.0/26")], true, false);
        assert!(a.routes.is_empty() && !a.relay && a.exit);
    }

    #[test]
    fn the_policy_approves_in_advance_by_hostname() {
        let p = Policy::parse(
            "[approve]\nroutes = [{ cidr = \"198.51.100.0/24\", by = [\"router*\"] }]\nrelay = [\"relay*\"]\nexit = [\"exit*\"]\n",
        )
        .unwrap();
        let d = device("router1", &["198.51.100.0/26", "203.0.113.0/24"], true);
        let e = effective(&d, Some(&p.approve));
        assert_eq!(e.advertise_cidrs, vec![net("198.51.100.0/26")]);
        assert!(!e.relay);
        let r = device("relay-a", &["198.51.100.0/26"], true);
        let e = effective(&r, Some(&p.approve));
        assert!(e.relay && e.advertise_cidrs.is_empty());
    }

    #[test]
    fn devices_the_admin_added_are_approved() {
        let mut d = device("phone", &["198.51.100.0/24"], true);
        d.unmanaged = true;
        let e = effective(&d, None);
        assert_eq!(e.advertise_cidrs, d.advertise_cidrs);
        assert!(e.relay);
        assert!(pending(&d, None).is_empty());
    }
}
