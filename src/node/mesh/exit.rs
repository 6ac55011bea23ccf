//! Exit nodes as the mesh sees them (DESIGN §8): the exit this node chose and how it
//! stands, the default routes it carries, the exit our record should name, and on a
//! relay which exit each peer's internet traffic goes to.

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Action, MeshState, PeerPlan};
use crate::node::dataplane::RelayExit;
use crate::wire::control::Device;

/// How the chosen exit stands (`--use-exit-node`, DESIGN §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitState {
    /// Its default routes are installed: traffic leaves through it.
    Active,
    /// No device of that name (traffic is dropped).
    Absent,
    /// Claims no exit role, or the role is not approved (traffic is dropped).
    NotApproved,
    /// Not connected to a coordinator (traffic is dropped).
    Offline,
    /// We reach the exit only through the relay, which does not know yet that it
    /// is ours (traffic is dropped).
    Relayed,
}

impl std::fmt::Display for ExitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Absent => "absent (traffic dropped)",
            Self::NotApproved => "not an approved exit (traffic dropped)",
            Self::Offline => "offline (traffic dropped)",
            Self::Relayed => {
                "reached through the relay, which does not carry our traffic to it yet (traffic dropped)"
            }
        })
    }
}

/// The default routes an exit carries for us: `0.0.0.0/0`, and `::/0` when both
/// ends have IPv6 in the mesh.
pub(super) fn exit_routes(ipv6: bool, d: &Device) -> Vec<IpNet> {
    let mut out = vec![IpNet::V4(Ipv4Net::default())];
    if ipv6 && d.ipv6_supported && d.tunnel_ip_v6.is_some() {
        out.push(IpNet::V6(Ipv6Net::default()));
    }
    out
}

impl MeshState {
    /// Chooses the exit (by hostname) this node sends its non-mesh traffic through;
    /// re-plans.
    pub fn set_exit(&mut self, exit: Option<String>) -> Vec<Action> {
        if exit == self.exit {
            return Vec::new();
        }
        self.exit = exit;
        self.reconcile()
    }

    /// The chosen exit's hostname and state, if one was chosen.
    pub fn exit_state(&self) -> Option<(&str, ExitState)> {
        let name = self.exit.as_deref()?;
        let mut found = self.devices.values().filter(|d| d.hostname == name);
        let state = match found.clone().find(|d| d.exit_node) {
            Some(d) if d.online && self.through_relay(d) && !self.relay_carries(d) => {
                ExitState::Relayed
            }
            Some(d) if d.online => ExitState::Active,
            Some(_) => ExitState::Offline,
            None if found.next().is_some() => ExitState::NotApproved,
            None => ExitState::Absent,
        };
        Some((name, state))
    }

    /// The device our exit traffic goes to now: the chosen exit while it is an
    /// approved exit and online (the lowest id if several share the name).
    pub(super) fn exit_device(&self) -> Option<&Device> {
        let name = self.exit.as_deref()?;
        self.devices
            .values()
            .find(|d| d.hostname == name && d.exit_node && d.online)
    }

    /// The exit our record should name (`use_exit`): the approved exit of the
    /// chosen name, online or not (the lowest id if several share the name).
    pub fn wanted_use_exit(&self) -> Option<i64> {
        let name = self.exit.as_deref()?;
        self.devices
            .values()
            .find(|d| d.hostname == name && d.exit_node)
            .map(|d| d.id)
    }

    /// Whether the relay carries our internet traffic to the exit `d`: our record
    /// names it, so the relay knows.
    pub(super) fn relay_carries(&self, d: &Device) -> bool {
        let relay = self.relay_id();
        relay.is_some() && relay != Some(self.local.device_id) && self.own_use_exit == Some(d.id)
    }

    /// On the relay: which exit its data plane sends each peer's internet traffic
    /// to, from the `use_exit` of the peers' records: an online approved exit we
    /// peer with, else none (dropped). Peers whose exit is us are left out (their
    /// traffic goes to TUN and out of our uplink; `desired` holds no plan for our
    /// own id).
    pub(super) fn desired_relay_exit(
        &self,
        desired: &BTreeMap<i64, PeerPlan>,
    ) -> Option<RelayExit> {
        let me = self.local.device_id;
        if self.relay_id() != Some(me) {
            return None;
        }
        let usable = |e: i64| {
            desired.contains_key(&e)
                && self
                    .devices
                    .get(&e)
                    .is_some_and(|x| x.exit_node && x.online)
        };
        let exits: Vec<_> = self
            .devices
            .values()
            .filter(|d| desired.contains_key(&d.id))
            .filter_map(|d| {
                let e = d.use_exit?;
                if e == me && self.own_exit {
                    return None;
                }
                Some((d.id, usable(e).then_some(e)))
            })
            .collect();
        if exits.is_empty() {
            return None;
        }
        let mut local = vec![IpNet::V4(self.local.org_v4), IpNet::V6(self.local.org_v6)];
        local.extend(self.own_cidrs.iter().copied());
        Some(RelayExit::new(exits, local))
    }
}
