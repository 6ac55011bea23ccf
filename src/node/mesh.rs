//! What a node installs for each peer: allowed IPs, routes, the endpoint to send to,
//! and which peers are reached directly or through a relay.
//!
//! Pure: fed the coordinator's device records, path observations and `now`, it
//! returns the changes to make ([`Action`]); the shell applies them to the data plane
//! and the kernel routing table.
//!
//! Rules:
//! - A node without IPv6, or a peer without it, gets no IPv6 allowed IP or route for
//!   that peer.
//! - The relay of the organization is the online relay device with the lowest id, so
//!   every node picks the same one, and a spoke moves to the next if its relay dies.
//! - A spoke (`--relay-only`, or behind a symmetric NAT) peers only with the relay,
//!   whose allowed IPs are the organization supernets (longest prefix match keeps any
//!   more specific route as it is).
//! - Other nodes reach spokes through the relay: the spoke's addresses are added to
//!   the relay's allowed IPs.
//! - A direct peer that completes no handshake within [`DIRECT_TIMEOUT`] falls back to
//!   the relay; it stays configured (without allowed IPs) so the direct path keeps
//!   being probed, and moves back as soon as a handshake there succeeds. Handshake
//!   ages are looked at every [`PATH_CHECK_INTERVAL`] while a relay could take over
//!   ([`MeshState::poll_timeout`] says when the shell should feed them next).
//! - Underlay families (DESIGN §9): a peer's endpoints and reflexive address are
//!   candidates per family. A v6 endpoint is used when both sides have a v6
//!   underlay, else a v4 one; a v6 path that completes no handshake within
//!   [`DIRECT_TIMEOUT`] gives way to the v4 one before the relay takes over. Two
//!   nodes that share no underlay family go to the relay at once (a dual-stack
//!   relay carries a v6-only node to a v4-only one).
//! - Every prefix taken from a peer's record passes the [`RouteGuard`] before it
//!   becomes an allowed IP or a route; refused ones are logged once and counted.
//! - Exits (DESIGN §8): only the exit this node chose gets default routes. A node
//!   tells the coordinator which exit it uses ([`MeshState::wanted_use_exit`], the
//!   device field `use_exit`), and the relay carries each peer's internet traffic
//!   to the exit that peer named, dropping it while that exit is not reachable
//!   ([`RelayExit`]). A spoke, or a node whose path to its exit fell back to the
//!   relay, routes its internet traffic into the relay once its own record names
//!   its exit (so the relay knows), or when the exit is the relay itself;
//!   until then the traffic stays dropped ([`ExitState::Relayed`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::coord::keys;
use crate::node::dataplane::RelayExit;
use crate::node::route_guard::RouteGuard;
use crate::wire::control::Device;

mod exit;
mod path;

pub use exit::ExitState;
use exit::exit_routes;
pub use path::PathSample;
use path::PathWatch;

/// Persistent keepalive towards every peer (keeps NAT mappings open).
pub const KEEPALIVE_SECS: u16 = 20;
/// How long a direct path may go without a handshake before the relay carries it.
pub const DIRECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A session older than this is dead (WireGuard's REJECT_AFTER_TIME).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);
/// A handshake this recent on a fallen-back peer proves the direct path works again.
pub const FRESH_HANDSHAKE: Duration = Duration::from_secs(25);
/// How often handshake ages are checked for direct/relay fallback.
pub const PATH_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Data sent to a direct peer and nothing received from it for this long: a
/// handshake checks the path ([`Action::Probe`]).
pub const UNANSWERED: Duration = Duration::from_secs(2);
/// A check's handshake unanswered this long: the relay carries the peer.
pub const PROBE_WAIT: Duration = Duration::from_secs(6);
/// How often the direct path of a peer on the relay is checked again.
pub const RETRY_DIRECT: Duration = Duration::from_secs(10);

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

/// The local node's facts that shape plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalView {
    pub device_id: i64,
    pub ipv6: bool,
    /// This node forwards between spokes (`--relay`).
    pub relay: bool,
    /// This node reaches the organization only through the relay.
    pub spoke: bool,
    /// Our address as seen from outside our NAT (STUN).
    pub reflexive: Option<SocketAddr>,
    /// Our underlay has an IPv4 address peers can be reached from (DESIGN §9).
    pub underlay_v4: bool,
    /// Our underlay has a global or unique-local IPv6 address.
    pub underlay_v6: bool,
    pub org_v4: Ipv4Net,
    pub org_v6: Ipv6Net,
}

/// How a device is reached from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Direct,
    Relay,
    /// Not reachable now (a spoke while the organization has no relay).
    None,
}

/// A change the shell must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    UpsertPeer(PeerPlan),
    RemovePeer(i64),
    AddRoute(IpNet),
    RemoveRoute(IpNet),
    /// Start a handshake with this direct peer: a response proves the path works
    /// both ways.
    Probe(i64),
    /// On a relay: the exit to send peers' internet traffic to, or none.
    RelayExit(Option<RelayExit>),
}

fn is_spoke(d: &Device) -> bool {
    !d.relay && (d.relay_only || d.symmetric_nat)
}

/// The underlay families (v4, v6) a device reported an endpoint in.
fn families(d: &Device) -> (bool, bool) {
    let mut v4 = false;
    let mut v6 = false;
    let reflexive = d.reflexive_endpoint.iter().chain(&d.reflexive_endpoint_v6);
    for e in d.endpoints.iter().chain(reflexive) {
        match e.ip().to_canonical() {
            std::net::IpAddr::V4(_) => v4 = true,
            std::net::IpAddr::V6(_) => v6 = true,
        }
    }
    (v4, v6)
}

/// A peer's v4 endpoint: its LAN address if it is behind our own NAT (same
/// reflexive address), else its reflexive address, else what it reported.
fn endpoint_v4(d: &Device, ours: Option<SocketAddr>) -> Option<SocketAddr> {
    let first = d.endpoints.iter().copied().find(SocketAddr::is_ipv4);
    let ours = ours.filter(SocketAddr::is_ipv4);
    match (d.reflexive_endpoint.filter(SocketAddr::is_ipv4), ours) {
        (Some(theirs), Some(ours)) if theirs.ip() == ours.ip() => first.or(Some(theirs)),
        (Some(theirs), _) => Some(theirs),
        (None, _) => first,
    }
}

/// A peer's v6 endpoint: its reflexive address from STUN over v6 (what a
/// firewall in front of it has seen it send from; `reflexive_endpoint_v6`, else a
/// v6 `reflexive_endpoint` from a node that knows no other), else the first v6
/// address it reported.
fn endpoint_v6(d: &Device) -> Option<SocketAddr> {
    d.reflexive_endpoint_v6
        .filter(SocketAddr::is_ipv6)
        .or_else(|| d.reflexive_endpoint.filter(SocketAddr::is_ipv6))
        .or_else(|| d.endpoints.iter().copied().find(SocketAddr::is_ipv6))
}

/// The node's view of its mesh.
#[derive(Debug)]
pub struct MeshState {
    local: LocalView,
    devices: BTreeMap<i64, Device>,
    /// Direct peers whose path failed: carried by the relay, still probed directly.
    fallback: BTreeSet<i64>,
    /// Since when each direct peer has been tried without a handshake.
    trying_since: BTreeMap<i64, Instant>,
    /// Peers whose v6 endpoint gave no handshake: tried over v4 (until their
    /// endpoints change).
    v6_failed: BTreeSet<i64>,
    installed: BTreeMap<i64, PeerPlan>,
    routes: BTreeSet<IpNet>,
    /// Each device's checked public key (None: unusable), parsed once per change
    /// since the low-order check costs a scalar multiplication.
    keys: BTreeMap<i64, Option<[u8; 32]>>,
    /// When handshake ages were last fed in.
    last_check: Option<Instant>,
    /// Each direct peer's path between checks.
    watch: BTreeMap<i64, PathWatch>,
    /// What no peer may be routed for (the host's underlay, the coordinators...).
    guard: RouteGuard,
    /// Prefixes from peers' records the guard refuses now.
    refused: BTreeSet<IpNet>,
    /// How many times a prefix started being refused.
    refused_total: u64,
    /// The exit this node sends its non-mesh traffic through (`--use-exit-node`).
    exit: Option<String>,
    /// Our own advertised prefixes (from our record): never the internet.
    own_cidrs: Vec<IpNet>,
    /// We are an approved exit ourselves (from our record).
    own_exit: bool,
    /// The exit our record names as the one we use (what the relay knows).
    own_use_exit: Option<i64>,
    /// On a relay: the exit its data plane sends peers' internet traffic to.
    relay_exit: Option<RelayExit>,
}

impl MeshState {
    pub fn new(local: LocalView) -> Self {
        Self {
            local,
            devices: BTreeMap::new(),
            fallback: BTreeSet::new(),
            trying_since: BTreeMap::new(),
            v6_failed: BTreeSet::new(),
            installed: BTreeMap::new(),
            routes: BTreeSet::new(),
            keys: BTreeMap::new(),
            last_check: None,
            watch: BTreeMap::new(),
            guard: RouteGuard::default(),
            refused: BTreeSet::new(),
            refused_total: 0,
            exit: None,
            own_cidrs: Vec::new(),
            own_exit: false,
            own_use_exit: None,
            relay_exit: None,
        }
    }

    /// Sets what no peer may be routed for; re-plans if it changed.
    pub fn set_guard(&mut self, guard: RouteGuard) -> Vec<Action> {
        if guard == self.guard {
            return Vec::new();
        }
        self.guard = guard;
        self.reconcile()
    }

    /// Prefixes of peers' records the route guard refuses now.
    pub fn refused(&self) -> impl Iterator<Item = &IpNet> {
        self.refused.iter()
    }

    /// How many times a prefix started being refused (each refused prefix counts
    /// once while it stays refused).
    pub fn refused_total(&self) -> u64 {
        self.refused_total
    }

    /// Drops what the guard refuses from every plan's allowed IPs (the
    /// organization prefixes, our own facts, excepted), logging and counting each
    /// prefix the first time it is refused.
    fn guard_plans(&mut self, desired: &mut BTreeMap<i64, PeerPlan>) {
        let ours = [IpNet::V4(self.local.org_v4), IpNet::V6(self.local.org_v6)];
        let mut refused = BTreeSet::new();
        for plan in desired.values_mut() {
            plan.allowed_ips.retain(|n| {
                if ours.contains(n) {
                    return true;
                }
                let Err(why) = self.guard.check(n) else {
                    return true;
                };
                if refused.insert(*n) && !self.refused.contains(n) {
                    self.refused_total += 1;
                    tracing::warn!(prefix = %n, peer = plan.id, hostname = %plan.hostname, reason = %why, "refusing to route a peer's prefix");
                }
                false
            });
        }
        self.refused = refused;
    }

    pub fn local(&self) -> LocalView {
        self.local
    }

    /// Every device of the organization the node knows (itself included).
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }

    /// Routes currently installed.
    pub fn routes(&self) -> impl Iterator<Item = &IpNet> {
        self.routes.iter()
    }

    /// The installed plan of a peer.
    pub fn plan(&self, id: i64) -> Option<&PeerPlan> {
        self.installed.get(&id)
    }

    /// Every installed plan, by peer id.
    pub fn plans(&self) -> impl Iterator<Item = &PeerPlan> {
        self.installed.values()
    }

    /// The relay every node of the organization uses: the lowest-id relay that is
    /// online (holds a watch stream), so a dead relay's spokes move to the next.
    pub fn relay_id(&self) -> Option<i64> {
        let others = self
            .devices
            .values()
            .filter(|d| d.relay && d.online)
            .map(|d| d.id);
        let me = self.local.relay.then_some(self.local.device_id);
        others.chain(me).min()
    }

    /// Inner addresses of a device this node may route to it; `exit` is
    /// [`Self::exit_device`]'s id (looked up once per plan, not once per device).
    fn host_ips(&self, d: &Device, exit: Option<i64>) -> Vec<IpNet> {
        let mut ips = vec![IpNet::V4(Ipv4Net::from(d.tunnel_ip))];
        if self.local.ipv6
            && let Some(v6) = d.tunnel_ip_v6
        {
            ips.push(IpNet::V6(Ipv6Net::from(v6)));
        }
        for cidr in &d.advertise_cidrs {
            if cidr.addr().is_ipv4() || (self.local.ipv6 && d.ipv6_supported) {
                ips.push(*cidr);
            }
        }
        // Exit routes only ever go to the exit this node chose.
        if exit == Some(d.id) {
            ips.extend(exit_routes(self.local.ipv6, d));
        }
        ips
    }

    /// Where to send to a peer: a v6 endpoint when both of us have a v6 underlay
    /// (and it did not fail), else a v4 one, else whatever it reported.
    fn endpoint(&self, d: &Device) -> Option<SocketAddr> {
        let v6 = self.local.underlay_v6.then(|| endpoint_v6(d)).flatten();
        let v4 = self
            .local
            .underlay_v4
            .then(|| endpoint_v4(d, self.local.reflexive))
            .flatten();
        let preferred = if self.v6_failed.contains(&d.id) {
            v4.or(v6)
        } else {
            v6.or(v4)
        };
        preferred
            .or_else(|| endpoint_v4(d, self.local.reflexive))
            .or_else(|| endpoint_v6(d))
            .or_else(|| d.endpoints.first().copied())
    }

    fn make_plan(&self, d: &Device, allowed_ips: Vec<IpNet>) -> Option<PeerPlan> {
        Some(PeerPlan {
            id: d.id,
            hostname: d.hostname.clone(),
            public_key: self.keys.get(&d.id).copied().flatten()?,
            endpoint: self.endpoint(d),
            allowed_ips,
        })
    }

    /// What should be installed now.
    fn desired(&self) -> BTreeMap<i64, PeerPlan> {
        let mut out = BTreeMap::new();
        let relay = self.relay_id();
        let me = self.local.device_id;
        let i_am_relay = relay == Some(me);
        if self.local.spoke && !self.local.relay {
            let Some(relay) = relay.and_then(|r| self.devices.get(&r)) else {
                return out;
            };
            let mut allowed = vec![IpNet::V4(self.local.org_v4)];
            if self.local.ipv6 {
                allowed.push(IpNet::V6(self.local.org_v6));
            }
            // Everyone's advertised prefixes are behind the relay too.
            for d in self.devices.values() {
                allowed.extend(
                    d.advertise_cidrs
                        .iter()
                        .filter(|c| c.addr().is_ipv4() || (self.local.ipv6 && d.ipv6_supported)),
                );
            }
            // And our exit, when it is the relay or the relay carries to it.
            if let Some(e) = self.exit_device()
                && (e.id == relay.id || self.relay_carries(e))
            {
                allowed.extend(exit_routes(self.local.ipv6, e));
            }
            if let Some(p) = self.make_plan(relay, allowed) {
                out.insert(p.id, p);
            }
            return out;
        }
        let mut via_relay = Vec::new();
        let exit = self.exit_device().map(|e| e.id);
        for d in self.devices.values() {
            let hosts = self.host_ips(d, exit);
            let unreachable = self.no_common_family(d);
            let direct = if is_spoke(d) {
                i_am_relay
            } else {
                Some(d.id) == relay
                    || i_am_relay
                    || relay.is_none()
                    || !(self.fallback.contains(&d.id) || unreachable)
            };
            if direct {
                if let Some(p) = self.make_plan(d, hosts) {
                    out.insert(p.id, p);
                }
            } else {
                if !is_spoke(d)
                    && !unreachable
                    && let Some(p) = self.make_plan(d, Vec::new())
                {
                    // Fallen back: keep probing the direct path.
                    out.insert(p.id, p);
                }
                // The relay carries internet traffic only to its exit: other
                // exits' default routes stay out.
                let carried = self.relay_carries(d);
                via_relay.extend(hosts.into_iter().filter(|n| carried || n.prefix_len() > 0));
            }
        }
        if let Some(p) = relay.and_then(|r| out.get_mut(&r)) {
            p.allowed_ips.extend(via_relay);
        }
        out
    }

    /// Installs what [`Self::desired`] says and returns the difference.
    fn reconcile(&mut self) -> Vec<Action> {
        let mut desired = self.desired();
        self.guard_plans(&mut desired);
        let mut out = Vec::new();
        for (id, plan) in &desired {
            if self.installed.get(id) != Some(plan) {
                out.push(Action::UpsertPeer(plan.clone()));
            }
        }
        // A route over the endpoint we send a peer's packets to would send the
        // tunnel into itself. Only the endpoints in use count: a peer lists every
        // underlay address it has (DESIGN §9), and a LAN holding one it is not
        // reached at may still be routed. Sorted: whether a prefix holds one is a
        // range lookup, not a scan (N peers' routes against N endpoints would be
        // quadratic).
        let endpoints: BTreeSet<std::net::IpAddr> = desired
            .values()
            .filter_map(|p| p.endpoint)
            .map(|e| e.ip().to_canonical())
            .collect();
        let routes: BTreeSet<IpNet> = desired
            .values()
            .flat_map(|p| p.allowed_ips.iter().copied())
            // The interface's own /64 already routes the org v6 prefix.
            .filter(|n| !(self.local.ipv6 && *n == IpNet::V6(self.local.org_v6)))
            .filter(|n| {
                // An exit's default routes live in a table of their own, which our
                // marked UDP socket bypasses.
                if n.prefix_len() == 0 {
                    return true;
                }
                let loops = endpoints
                    .range(n.network()..=n.broadcast())
                    .next()
                    .is_some();
                if loops && !self.routes.contains(n) {
                    tracing::warn!(prefix = %n, "not routing a prefix that contains a peer's endpoint (it would loop)");
                }
                !loops
            })
            .collect();
        out.extend(
            routes
                .difference(&self.routes)
                .map(|n| Action::AddRoute(*n)),
        );
        out.extend(
            self.routes
                .difference(&routes)
                .map(|n| Action::RemoveRoute(*n)),
        );
        let relay_exit = self.desired_relay_exit(&desired);
        if relay_exit != self.relay_exit {
            self.relay_exit = relay_exit.clone();
            out.push(Action::RelayExit(relay_exit));
        }
        out.extend(
            self.installed
                .keys()
                .filter(|id| !desired.contains_key(id))
                .map(|id| Action::RemovePeer(*id)),
        );
        self.installed = desired;
        self.routes = routes;
        out
    }

    /// Replaces every device with a full snapshot (our own record is skipped).
    pub fn apply_snapshot(&mut self, devices: &[Device], now: Instant) -> Vec<Action> {
        if let Some(me) = devices.iter().find(|d| d.id == self.local.device_id) {
            self.own_cidrs.clone_from(&me.advertise_cidrs);
            self.own_exit = me.exit_node;
            self.own_use_exit = me.use_exit;
        }
        self.devices = devices
            .iter()
            .filter(|d| d.id != self.local.device_id)
            .map(|d| (d.id, d.clone()))
            .collect();
        self.fallback.retain(|id| self.devices.contains_key(id));
        self.v6_failed.retain(|id| self.devices.contains_key(id));
        self.watch.retain(|id, _| self.devices.contains_key(id));
        self.trying_since
            .retain(|id, _| self.devices.contains_key(id));
        for id in self.devices.keys() {
            self.trying_since.entry(*id).or_insert(now);
        }
        // Keep parsed keys that did not change; parse the rest.
        let old_keys = std::mem::take(&mut self.keys);
        for d in self.devices.values() {
            let unchanged = old_keys.get(&d.id).filter(|_| {
                self.installed
                    .get(&d.id)
                    .is_some_and(|p| keys::encode_key(&p.public_key) == d.public_key)
            });
            let key = match unchanged {
                Some(k) => *k,
                None => keys::parse_public_key(&d.public_key).ok(),
            };
            self.keys.insert(d.id, key);
        }
        self.reconcile()
    }

    /// Applies a delta.
    pub fn apply_delta(
        &mut self,
        upserts: &[Device],
        removed: &[i64],
        now: Instant,
    ) -> Vec<Action> {
        for id in removed {
            self.devices.remove(id);
            self.keys.remove(id);
            self.fallback.remove(id);
            self.trying_since.remove(id);
            self.v6_failed.remove(id);
            self.watch.remove(id);
        }
        if let Some(me) = upserts.iter().find(|d| d.id == self.local.device_id) {
            self.own_cidrs.clone_from(&me.advertise_cidrs);
            self.own_exit = me.exit_node;
            self.own_use_exit = me.use_exit;
        }
        for d in upserts.iter().filter(|d| d.id != self.local.device_id) {
            let moved = self.devices.get(&d.id).is_none_or(|old| {
                old.endpoints != d.endpoints
                    || old.reflexive_endpoint != d.reflexive_endpoint
                    || old.reflexive_endpoint_v6 != d.reflexive_endpoint_v6
            });
            if moved {
                // A new endpoint deserves a fresh direct attempt, v6 first again.
                self.trying_since.insert(d.id, now);
                self.v6_failed.remove(&d.id);
            }
            if self
                .devices
                .get(&d.id)
                .is_none_or(|old| old.public_key != d.public_key)
            {
                self.keys
                    .insert(d.id, keys::parse_public_key(&d.public_key).ok());
            }
            self.devices.insert(d.id, d.clone());
        }
        self.reconcile()
    }

    /// Our own facts changed (STUN result, flags).
    pub fn set_local(&mut self, local: LocalView) -> Vec<Action> {
        if local == self.local {
            return Vec::new();
        }
        self.local = local;
        self.reconcile()
    }
}

#[cfg(test)]
pub(crate) mod tests;
