//! Rules shared by the backends, so both refuse exactly the same requests: hostnames,
//! new organizations, registrations, device updates, approved routes and advertised
//! prefixes.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Organization, StoreError};
use crate::coord::ipam::{self, Advertiser};
use crate::wire::control::{Device, DeviceUpdate, RegisterRequest};

fn check_hostname(hostname: &str) -> Result<(), StoreError> {
    if hostname.is_empty() || hostname.len() > 253 || hostname.chars().any(char::is_control) {
        return Err(StoreError::Invalid(
            "hostname must be 1 to 253 printable characters".into(),
        ));
    }
    Ok(())
}

pub(crate) fn check_new_org(
    name: &str,
    ip_cidr: Ipv4Net,
    ip_cidr_v6: Ipv6Net,
) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > 64 {
        return Err(StoreError::Invalid(
            "organization name must be 1 to 64 characters".into(),
        ));
    }
    if ip_cidr.trunc() != ip_cidr || ip_cidr_v6.trunc() != ip_cidr_v6 {
        return Err(StoreError::Invalid(format!(
            "organization prefixes must have no host bits set (did you mean {} and {}?)",
            ip_cidr.trunc(),
            ip_cidr_v6.trunc()
        )));
    }
    Ok(())
}

fn limit(e: crate::coord::limits::LimitError) -> StoreError {
    StoreError::Invalid(e.to_string())
}

pub(crate) fn check_register(req: &RegisterRequest) -> Result<(), StoreError> {
    crate::coord::limits::check_register(req).map_err(limit)?;
    check_hostname(&req.hostname)?;
    if req.request_ip_v6.is_some() && !req.ipv6_supported {
        return Err(StoreError::Invalid(
            "an IPv6 address was requested but the device reports no IPv6 support".into(),
        ));
    }
    Ok(())
}

/// The registration of a stock WireGuard device.
pub(crate) fn unmanaged_request(hostname: &str, public_key: &str) -> RegisterRequest {
    RegisterRequest {
        public_key: public_key.into(),
        hostname: hostname.into(),
        os: "wireguard".into(),
        ipv6_supported: true,
        relay_only: true,
        ..Default::default()
    }
}

/// Applies an update's plain fields to `d`. Advertised prefixes are the caller's to
/// check against the organization (see [`check_advertised`]) before they are set.
pub(crate) fn apply_update(d: &mut Device, update: &DeviceUpdate) -> Result<(), StoreError> {
    crate::coord::limits::check_update(update).map_err(limit)?;
    if let Some(h) = &update.hostname {
        check_hostname(h)?;
        d.hostname.clone_from(h);
    }
    if let Some(e) = &update.endpoints {
        d.endpoints.clone_from(e);
        d.set_local_ips();
    }
    if let Some(r) = update.reflexive_endpoint {
        d.reflexive_endpoint = Some(r);
    }
    if let Some(r) = update.reflexive_endpoint_v6 {
        d.reflexive_endpoint_v6 = Some(r);
    }
    if let Some(v) = update.symmetric_nat {
        d.symmetric_nat = v;
    }
    if let Some(v) = update.relay {
        d.relay = v;
    }
    if let Some(v) = update.relay_only {
        d.relay_only = v;
    }
    if let Some(v) = update.exit_node {
        d.exit_node = v;
    }
    if let Some(v) = update.use_exit {
        d.use_exit = (v > 0).then_some(v);
    }
    if let Some(cidrs) = &update.advertise_cidrs {
        d.advertise_cidrs.clone_from(cidrs);
    }
    Ok(())
}

/// Prefixes an admin approves or revokes: what a device could advertise.
pub(crate) fn check_approved_routes(routes: &[IpNet]) -> Result<(), StoreError> {
    for r in routes {
        ipam::validate_advertised(*r)
            .map_err(|e| StoreError::Invalid(format!("--routes {r}: {e}")))?;
    }
    Ok(())
}

/// Another device's advertised prefixes, as read from the database.
pub struct AdvertisedBy {
    pub device_id: i64,
    pub hostname: String,
    pub cidrs: Vec<IpNet>,
}

/// Checks `cidrs` (advertised by `self_id`, or a new device) against the organization
/// and every other device's advertised prefixes.
pub(crate) fn check_advertised(
    org: &Organization,
    others: &[AdvertisedBy],
    self_id: Option<i64>,
    cidrs: &[IpNet],
) -> Result<(), StoreError> {
    let others: Vec<Advertiser<'_>> = others
        .iter()
        .filter(|d| Some(d.device_id) != self_id && !d.cidrs.is_empty())
        .map(|d| Advertiser {
            device_id: d.device_id,
            hostname: &d.hostname,
            cidrs: &d.cidrs,
        })
        .collect();
    ipam::check_advertised(cidrs, org.ip_cidr, org.ip_cidr_v6, &others)?;
    Ok(())
}
