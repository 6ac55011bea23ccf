//! What a node should install for each peer, derived from the coordinator's device
//! records: allowed IPs, routes and the endpoint to send to.
//!
//! Pure: fed device records, returns plans; the shell applies them to the data plane
//! and the kernel routing table. A node without IPv6, or a peer without it, gets no
//! IPv6 allowed IP or route for that peer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::coord::keys;
use crate::wire::control::Device;

/// Persistent keepalive towards every peer (keeps NAT mappings open).
pub const KEEPALIVE_SECS: u16 = 20;

/// What to install for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    pub id: i64,
    pub hostname: String,
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses this peer may send from and that are routed to it.
    pub allowed_ips: Vec<IpNet>,
}

/// The local node's view that shapes plans.
#[derive(Debug, Clone, Copy)]
pub struct LocalView {
    pub device_id: i64,
    pub ipv6: bool,
}

/// The plan for one peer, or `None` if it must not be a peer (ourselves, or a record
/// with an unusable key).
pub fn plan_peer(local: LocalView, peer: &Device) -> Option<PeerPlan> {
    if peer.id == local.device_id {
        return None;
    }
    let public_key = keys::parse_public_key(&peer.public_key).ok()?;
    let mut allowed_ips = vec![IpNet::V4(Ipv4Net::from(peer.tunnel_ip))];
    if local.ipv6
        && let Some(v6) = peer.tunnel_ip_v6
    {
        allowed_ips.push(IpNet::V6(Ipv6Net::from(v6)));
    }
    for cidr in &peer.advertise_cidrs {
        if cidr.addr().is_ipv4() || (local.ipv6 && peer.ipv6_supported) {
            allowed_ips.push(*cidr);
        }
    }
    Some(PeerPlan {
        id: peer.id,
        hostname: peer.hostname.clone(),
        public_key,
        endpoint: peer
            .reflexive_endpoint
            .or_else(|| peer.endpoints.first().copied()),
        allowed_ips,
    })
}

/// A change the shell must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    UpsertPeer(PeerPlan),
    RemovePeer(i64),
    AddRoute(IpNet),
    RemoveRoute(IpNet),
}

/// The node's view of its mesh: the peers it has installed and the routes they need.
/// Fed snapshots and deltas, it returns only what changed, so a delta costs what it
/// carries, not the size of the organization.
#[derive(Debug)]
pub struct MeshState {
    local: LocalView,
    peers: BTreeMap<i64, (Device, PeerPlan)>,
    /// Route → number of peers that need it.
    routes: BTreeMap<IpNet, usize>,
}

impl MeshState {
    pub fn new(local: LocalView) -> Self {
        Self {
            local,
            peers: BTreeMap::new(),
            routes: BTreeMap::new(),
        }
    }

    pub fn peers(&self) -> impl Iterator<Item = (&Device, &PeerPlan)> {
        self.peers.values().map(|(d, p)| (d, p))
    }

    pub fn peer(&self, id: i64) -> Option<&(Device, PeerPlan)> {
        self.peers.get(&id)
    }

    /// Routes currently needed.
    pub fn routes(&self) -> impl Iterator<Item = &IpNet> {
        self.routes.keys()
    }

    fn release_routes(&mut self, nets: &[IpNet], out: &mut Vec<Action>) {
        for net in nets {
            if let Some(n) = self.routes.get_mut(net) {
                *n -= 1;
                if *n == 0 {
                    self.routes.remove(net);
                    out.push(Action::RemoveRoute(*net));
                }
            }
        }
    }

    fn take_routes(&mut self, nets: &[IpNet], out: &mut Vec<Action>) {
        for net in nets {
            let n = self.routes.entry(*net).or_insert(0);
            *n += 1;
            if *n == 1 {
                out.push(Action::AddRoute(*net));
            }
        }
    }

    fn remove(&mut self, id: i64, out: &mut Vec<Action>) {
        if let Some((_, plan)) = self.peers.remove(&id) {
            out.push(Action::RemovePeer(id));
            self.release_routes(&plan.allowed_ips, out);
        }
    }

    fn upsert(&mut self, device: &Device, out: &mut Vec<Action>) {
        let Some(plan) = plan_peer(self.local, device) else {
            // Ourselves, or a peer that became unusable.
            self.remove(device.id, out);
            return;
        };
        let old = self.peers.get(&device.id).map(|(_, p)| p.clone());
        if old.as_ref() == Some(&plan) {
            self.peers.insert(device.id, (device.clone(), plan));
            return;
        }
        // Peer first, so a new route never points at nothing; new routes are taken
        // before old ones are released, so a route kept across the change never blinks.
        out.push(Action::UpsertPeer(plan.clone()));
        self.take_routes(&plan.allowed_ips, out);
        if let Some(old) = &old {
            self.release_routes(&old.allowed_ips, out);
        }
        self.peers.insert(device.id, (device.clone(), plan));
    }

    /// Replaces everything with a full snapshot.
    pub fn apply_snapshot(&mut self, devices: &[Device]) -> Vec<Action> {
        let mut out = Vec::new();
        let keep: BTreeSet<i64> = devices.iter().map(|d| d.id).collect();
        let gone: Vec<i64> = self
            .peers
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id, &mut out);
        }
        for d in devices {
            self.upsert(d, &mut out);
        }
        out
    }

    /// Applies a delta.
    pub fn apply_delta(&mut self, upserts: &[Device], removed: &[i64]) -> Vec<Action> {
        let mut out = Vec::new();
        for id in removed {
            self.remove(*id, &mut out);
        }
        for d in upserts {
            self.upsert(d, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: i64, v6: bool) -> Device {
        let secret = boringtun::x25519::StaticSecret::from([id as u8 + 1; 32]);
        let public = boringtun::x25519::PublicKey::from(&secret);
        Device {
            id,
            organization_id: 1,
            public_key: keys::encode_key(public.as_bytes()),
            hostname: format!("d{id}"),
            os: "linux".into(),
            tunnel_ip: format!("100.64.0.{id}").parse().unwrap(),
            tunnel_ip_v6: v6.then(|| format!("200::{id}").parse().unwrap()),
            organization_prefix: "100.64.0.0/10".parse().unwrap(),
            organization_prefix_v6: "200::/64".parse().unwrap(),
            local_ip: None,
            local_ip_v6: None,
            endpoints: vec![format!("192.0.2.{id}:51820").parse().unwrap()],
            reflexive_endpoint: None,
            symmetric_nat: false,
            relay: false,
            relay_only: false,
            ipv6_supported: v6,
            advertise_cidrs: vec![
                "198.51.100.0/24".parse().unwrap(),
                "2001:db8:100::/64".parse().unwrap(),
            ],
            revision: 1,
            last_seen: 0,
        }
    }

    #[test]
    fn dual_stack_peer_gets_both_host_routes() {
        let p = plan_peer(
            LocalView {
                device_id: 1,
                ipv6: true,
            },
            &device(2, true),
        )
        .unwrap();
        let s: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(
            s,
            [
                "100.64.0.2/32",
                "200::2/128",
                "198.51.100.0/24",
                "2001:db8:100::/64"
            ]
        );
        assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    }

    #[test]
    fn v4_only_on_either_side_means_no_v6() {
        let p = plan_peer(
            LocalView {
                device_id: 1,
                ipv6: false,
            },
            &device(2, true),
        )
        .unwrap();
        assert!(p.allowed_ips.iter().all(|n| n.addr().is_ipv4()));
        let p = plan_peer(
            LocalView {
                device_id: 1,
                ipv6: true,
            },
            &device(3, false),
        )
        .unwrap();
        assert!(p.allowed_ips.iter().all(|n| n.addr().is_ipv4()));
    }

    #[test]
    fn self_and_bad_keys_skipped() {
        assert!(
            plan_peer(
                LocalView {
                    device_id: 2,
                    ipv6: true
                },
                &device(2, true)
            )
            .is_none()
        );
        let mut d = device(3, true);
        d.public_key = keys::encode_key(&[0; 32]);
        assert!(
            plan_peer(
                LocalView {
                    device_id: 1,
                    ipv6: true
                },
                &d
            )
            .is_none()
        );
    }

    #[test]
    fn mesh_state_emits_only_changes() {
        let mut m = MeshState::new(LocalView {
            device_id: 1,
            ipv6: true,
        });
        let acts = m.apply_snapshot(&[device(1, true), device(2, true), device(3, false)]);
        let peers = acts
            .iter()
            .filter(|a| matches!(a, Action::UpsertPeer(_)))
            .count();
        assert_eq!(peers, 2);
        let routes: BTreeSet<String> = m.routes().map(ToString::to_string).collect();
        assert!(routes.contains("100.64.0.2/32") && routes.contains("200::2/128"));
        assert!(routes.contains("100.64.0.3/32") && !routes.contains("200::3/128"));
        // The shared advertised prefix is routed once and stays while anyone needs it.
        let acts = m.apply_delta(&[], &[2]);
        assert!(acts.contains(&Action::RemovePeer(2)));
        assert!(acts.contains(&Action::RemoveRoute("200::2/128".parse().unwrap())));
        assert!(!acts.contains(&Action::RemoveRoute("198.51.100.0/24".parse().unwrap())));
        // Same record again: nothing to do.
        assert!(m.apply_delta(&[device(3, false)], &[]).is_empty());
        // A new snapshot without 3 removes it and its routes.
        let acts = m.apply_snapshot(&[device(1, true)]);
        assert!(acts.contains(&Action::RemovePeer(3)));
        assert!(acts.contains(&Action::RemoveRoute("198.51.100.0/24".parse().unwrap())));
        assert_eq!(m.routes().count(), 0);
    }
}
