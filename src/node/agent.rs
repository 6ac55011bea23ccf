//! The node's control core: everything `nexodus join` decides after enrolling,
//! as one state machine with one owner.
//!
//! [`Agent`] owns the [`MeshState`] (peers, routes, direct/relay fallback), the NAT
//! [`Prober`] and the node's own device record. The shell feeds it the coordinator's
//! snapshots and deltas, STUN answers, handshake ages and timeouts, each with `now`,
//! and drains what to do in the order it was decided: [`Agent::poll_action`] (peer
//! and route changes), [`Agent::poll_transmit`] (STUN requests from the WireGuard
//! port), [`Agent::poll_update`] (what to tell the coordinator about our NAT mapping)
//! and [`Agent::poll_view`] (a fresh view for `nexodus status` and `wg show`).
//! [`Agent::poll_timeout`] says when it next needs the shell, and why.
//!
//! It does not talk to the coordinator, the data plane or the kernel, read the
//! clock or draw random numbers: the shell does, and passes results and `now` in.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use ipnet::IpNet;

use crate::node::access::Access;
use crate::node::dns::NameTable;
use crate::node::mesh::{Action, LocalView, MeshState, Path, PeerPlan};
use crate::node::nat::{self, Mapping, ProbeEvent, Prober};
use crate::node::route_guard::RouteGuard;
use crate::policy::InboundTable;
use crate::wire::control::{Device, DeviceUpdate, PolicyState};
use crate::wire::stun::TransactionId;

/// Why [`Agent::poll_timeout`] wants the shell back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Feed the peers' handshake ages to [`Agent::handle_handshakes`].
    PathCheck,
    /// Call [`Agent::handle_timeout`] (NAT probing).
    Probe,
}

/// What `nexodus status` and the WireGuard UAPI show of the control state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Our own record as the coordinator last sent it.
    pub device: Device,
    /// The control connection is up.
    pub connected: bool,
    /// This node relays for spokes.
    pub relay: bool,
    /// The relay of the organization.
    pub relay_id: Option<i64>,
    /// Every other device with how it is reached (a spoke sees only its relay).
    pub peers: Vec<(Device, Path)>,
    /// What is installed for each peer of the data plane.
    pub plans: BTreeMap<i64, PeerPlan>,
    /// Peers' prefixes the route guard refuses now.
    pub routes_refused: Vec<IpNet>,
    /// How many times a prefix started being refused.
    pub routes_refused_total: u64,
    /// The exit chosen with `--use-exit-node` and how it stands.
    pub exit: Option<(String, crate::node::mesh::ExitState)>,
    /// The revision of the access policy in force (`None`: no policy, everything
    /// allowed), how many inbound rules concern this node, and (on a relay) for how
    /// many unmanaged devices it enforces.
    pub policy: Option<(i64, usize, usize)>,
}

/// The node's control state; see the module docs.
#[derive(Debug)]
pub struct Agent {
    device: Device,
    mesh: MeshState,
    /// STUN over v4 (the coordinator's v4 address), or over the only family there is.
    prober: Prober,
    /// STUN over v6 (the coordinator's v6 address) when the host has a v6 underlay.
    prober6: Prober,
    /// The NAT mapping last learned by STUN: over v4 when v4 is probed, else over v6
    /// (`reflexive_endpoint`, and whether the NAT is symmetric).
    mapping: Option<Mapping>,
    /// The mapping last learned by STUN over v6 (`reflexive_endpoint_v6`).
    mapping6: Option<SocketAddr>,
    /// Every address the coordinators were listed at: STUN goes to the connected
    /// one's family, and to the other family's listed address if the host has it.
    listed: Vec<SocketAddr>,
    /// `--relay-only`: a spoke whatever the NAT.
    relay_only: bool,
    connected: bool,
    /// The coordinator the control connection uses (STUN goes there too).
    coordinator: SocketAddr,
    actions: VecDeque<Action>,
    update: Option<DeviceUpdate>,
    view_changed: bool,
    /// The access policy and this node's compiled inbound table.
    access: Access,
    /// Mesh DNS names of the organization's devices (ours included).
    names: NameTable,
    names_changed: bool,
}

impl Agent {
    /// An enrolled, connected node: `device` is our record, `local` our facts.
    pub fn new(
        device: Device,
        local: LocalView,
        relay_only: bool,
        coordinator: SocketAddr,
    ) -> Self {
        Self {
            device,
            mesh: MeshState::new(local),
            prober: Prober::new(),
            prober6: Prober::new(),
            mapping: None,
            mapping6: None,
            listed: Vec::new(),
            relay_only,
            connected: true,
            coordinator,
            actions: VecDeque::new(),
            update: None,
            view_changed: true,
            access: Access::default(),
            names: NameTable::default(),
            names_changed: false,
        }
    }

    pub fn mesh(&self) -> &MeshState {
        &self.mesh
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn push_actions(&mut self, actions: Vec<Action>) {
        self.view_changed |= !actions.is_empty();
        self.actions.extend(actions);
    }

    /// Asks for the coordinator to be told our mappings if its record differs.
    fn report_mapping(&mut self) {
        if let Some(m) = self.mapping
            && (self.device.reflexive_endpoint != Some(m.reflexive)
                || self.device.symmetric_nat != m.symmetric)
        {
            let update = self.update.get_or_insert_with(DeviceUpdate::default);
            update.reflexive_endpoint = Some(m.reflexive);
            update.symmetric_nat = Some(m.symmetric);
        }
        if let Some(r) = self.mapping6
            && self.device.reflexive_endpoint_v6 != Some(r)
        {
            self.update
                .get_or_insert_with(DeviceUpdate::default)
                .reflexive_endpoint_v6 = Some(r);
        }
    }

    /// Every address the coordinators are listed at (`--coordinator`, resolved):
    /// where STUN over the family the control connection does not use goes.
    pub fn set_coordinators(&mut self, listed: &[SocketAddr]) {
        self.listed = listed.to_vec();
    }

    /// The STUN servers per family (v4, v6): the connected coordinator's in its
    /// family; in the other, a listed coordinator address of that family if the host
    /// has an underlay in it.
    fn stun_servers(&self, stun_port: u16) -> (Option<[SocketAddr; 2]>, Option<[SocketAddr; 2]>) {
        let local = self.mesh.local();
        let connected = SocketAddr::new(
            self.coordinator.ip().to_canonical(),
            self.coordinator.port(),
        );
        let pick = |v6: bool, underlay: bool| {
            if connected.is_ipv6() == v6 {
                return Some(connected);
            }
            underlay
                .then(|| {
                    self.listed
                        .iter()
                        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                        .find(|a| a.is_ipv6() == v6)
                })
                .flatten()
        };
        let servers = |a: Option<SocketAddr>| a.map(|a| nat::servers(a, stun_port));
        (
            servers(pick(false, local.underlay_v4)),
            servers(pick(true, local.underlay_v6)),
        )
    }

    /// Asks for the coordinator to be told the exit we use (`use_exit`, 0: none)
    /// if its record differs: the relay carries our internet traffic to it.
    fn report_exit(&mut self) {
        let want = self.mesh.wanted_use_exit();
        if want == self.device.use_exit {
            return;
        }
        self.update
            .get_or_insert_with(DeviceUpdate::default)
            .use_exit = Some(want.unwrap_or(0));
    }

    fn take_own(&mut self, devices: &[Device]) {
        if let Some(me) = devices.iter().find(|d| d.id == self.device.id) {
            self.device = me.clone();
        }
    }

    /// The coordinator sends our relay role only once an admin approved it (DESIGN
    /// §13): until then we are no relay, so every node agrees on which relay carries
    /// the spokes. Called after a snapshot or delta was applied.
    fn take_own_role(&mut self) {
        let local = self.mesh.local();
        let relay = self.device.relay;
        if local.relay != relay {
            if relay {
                tracing::info!("relay role approved: relaying for the organization");
            } else {
                tracing::warn!(
                    "relay role not approved (or revoked): an admin approves it with `nexodus devices approve {} --relay`",
                    self.device.id
                );
            }
            let actions = self.mesh.set_local(LocalView {
                relay,
                spoke: self.relay_only || (self.mapping.is_some_and(|m| m.symmetric) && !relay),
                ..local
            });
            self.push_actions(actions);
        }
    }

    /// A full snapshot from the coordinator at `coordinator`, whose STUN port it names.
    pub fn handle_snapshot(
        &mut self,
        devices: &[Device],
        stun_port: Option<u16>,
        coordinator: SocketAddr,
        now: Instant,
    ) {
        self.connected = true;
        self.view_changed = true;
        self.take_own(devices);
        self.coordinator = coordinator;
        let (v4, v6) = stun_port.map_or((None, None), |p| self.stun_servers(p));
        self.prober.handle_servers(v4.or(v6), now);
        // Over v6 too when v4 is the family probed above.
        self.prober6.handle_servers(v4.and(v6), now);
        // The coordinator may have missed our last mapping while we were away.
        self.report_mapping();
        let actions = self.mesh.apply_snapshot(devices, now);
        self.push_actions(actions);
        self.report_exit();
        self.take_own_role();
        self.recompile_access();
        self.rebuild_names();
    }

    /// The name table from our record and every other device's, if it changed.
    fn rebuild_names(&mut self) {
        let names = NameTable::from_devices(
            &self.device.domain,
            std::iter::once(&self.device).chain(self.mesh.devices()),
        );
        if names != self.names {
            self.names = names;
            self.names_changed = true;
        }
    }

    /// The mesh DNS names, once per change (for the resolver and SOCKS5).
    pub fn poll_names(&mut self) -> Option<NameTable> {
        std::mem::take(&mut self.names_changed).then(|| self.names.clone())
    }

    /// The known peers among `changes` (id, online) with their online flag set: a
    /// delta's devices that only went online or offline, as records
    /// [`Agent::handle_delta`] takes. One pass over the peers.
    pub fn with_online(&self, changes: &[(i64, bool)]) -> Vec<Device> {
        if changes.is_empty() {
            return Vec::new();
        }
        let changes: std::collections::HashMap<i64, bool> = changes.iter().copied().collect();
        self.mesh
            .devices()
            .filter_map(|d| {
                let online = *changes.get(&d.id)?;
                Some(Device {
                    online,
                    ..d.clone()
                })
            })
            .collect()
    }

    /// A delta from the coordinator.
    pub fn handle_delta(&mut self, upserts: &[Device], removed: &[i64], now: Instant) {
        self.connected = true;
        self.view_changed = true;
        self.take_own(upserts);
        let actions = self.mesh.apply_delta(upserts, removed, now);
        self.push_actions(actions);
        self.report_exit();
        if upserts.iter().any(|d| d.id == self.device.id) {
            self.take_own_role();
        }
        self.recompile_access();
        self.rebuild_names();
    }

    /// The coordinator resumed our watch (we named the revision we had): the peers
    /// we have stay, and the delta that follows brings them current. Like a
    /// snapshot, it may come from another coordinator (a replica), so STUN goes there.
    pub fn handle_resumed(
        &mut self,
        stun_port: Option<u16>,
        coordinator: SocketAddr,
        now: Instant,
    ) {
        self.connected = true;
        self.view_changed = true;
        self.coordinator = coordinator;
        self.prober
            .handle_servers(stun_port.map(|p| nat::servers(coordinator, p)), now);
        // The coordinator may have missed our last mapping while we were away.
        self.report_mapping();
    }

    /// This node's inbound table, and on a relay those of unmanaged devices.
    fn recompile_access(&mut self) {
        self.access.recompile(&self.device, self.mesh.devices());
        self.access.set_relay(self.mesh.local().relay);
        self.access
            .recompile_relay(&self.device, self.mesh.devices());
    }

    /// The organization's access policy, as a snapshot carries it or a delta
    /// changes it (`None` in a snapshot: no policy). Call before the devices of the
    /// same message are handled, which compile it.
    pub fn handle_policy(&mut self, policy: Option<&PolicyState>) {
        match self.access.set_policy(policy) {
            Ok(()) => {
                self.view_changed = true;
                match self.access.in_force() {
                    Some(revision) => tracing::info!(revision, "access policy in force"),
                    None => tracing::info!("no access policy: everything allowed"),
                }
            }
            Err(e) => tracing::error!(error = %e, "keeping the access policy in force"),
        }
        self.recompile_access();
    }

    /// On a relay, the next unmanaged device whose inbound table the data plane
    /// must enforce when forwarding to it (`None`: stop), once per change.
    pub fn poll_relay_policy(&mut self) -> Option<(i64, Option<InboundTable>)> {
        self.access.poll_relay_table()
    }

    /// The inbound table the data plane must enforce now (`Some(None)`: none), once
    /// per change.
    pub fn poll_policy_table(&mut self) -> Option<Option<InboundTable>> {
        self.access.poll_table()
    }

    /// What no peer may be routed for (the host's underlay, the coordinators, ...),
    /// read by the shell at start and again when the host may have changed.
    pub fn set_route_guard(&mut self, guard: RouteGuard) {
        let before = self.mesh.refused_total();
        let actions = self.mesh.set_guard(guard);
        self.view_changed |= self.mesh.refused_total() != before;
        self.push_actions(actions);
    }

    /// Chooses the exit node (by hostname) for our non-mesh traffic.
    pub fn set_exit(&mut self, exit: Option<String>) {
        let actions = self.mesh.set_exit(exit);
        self.view_changed = true;
        self.push_actions(actions);
        self.report_exit();
    }

    /// The coordinator answered an update with our record.
    pub fn handle_device(&mut self, device: Device) {
        self.device = device;
        self.view_changed = true;
        self.rebuild_names();
    }

    /// The control connection is down (the data plane keeps running).
    pub fn handle_disconnected(&mut self) {
        self.connected = false;
        self.view_changed = true;
    }

    /// A STUN answer that arrived on the WireGuard port.
    /// Each family's prober takes the answers of its family only (the mapped
    /// address is in the family the request went over).
    pub fn handle_stun_answer(&mut self, txid: TransactionId, mapped: SocketAddr, now: Instant) {
        let v6 = mapped.ip().to_canonical().is_ipv6();
        if v6 && self.prober6.poll_timeout().is_some() {
            self.prober6.handle_response(txid, mapped, now);
        } else {
            self.prober.handle_response(txid, mapped, now);
        }
        self.handle_probe_events();
    }

    /// Each peer's handshake age and path figures from the data plane
    /// ([`crate::node::mesh::PathSample`]).
    pub fn handle_handshakes<S: Into<crate::node::mesh::PathSample>>(
        &mut self,
        now: Instant,
        ages: impl IntoIterator<Item = S>,
    ) {
        let actions = self.mesh.handle_handshakes(now, ages);
        self.push_actions(actions);
    }

    /// NAT probing timers; `random` gives a new round its transaction ids.
    pub fn handle_timeout(&mut self, now: Instant, random: [u8; 24]) {
        self.prober.handle_timeout(now, random);
        // Other transaction ids than the v4 round's (it may start at the same time).
        let mut random6 = random;
        random6.rotate_left(7);
        self.prober6.handle_timeout(now, random6);
        self.handle_probe_events();
    }

    fn handle_probe_events(&mut self) {
        while let Some(event) = self.prober.poll_event() {
            match event {
                ProbeEvent::Mapping(m) if self.mapping != Some(m) => {
                    tracing::info!(reflexive = %m.reflexive, symmetric = m.symmetric, "NAT mapping learned");
                    self.mapping = Some(m);
                    self.report_mapping();
                    let local = self.mesh.local();
                    let actions = self.mesh.set_local(LocalView {
                        reflexive: Some(m.reflexive),
                        spoke: self.relay_only || (m.symmetric && !local.relay),
                        ..local
                    });
                    self.push_actions(actions);
                }
                ProbeEvent::Mapping(_) => {}
                ProbeEvent::NoAnswer { servers } => {
                    tracing::warn!(server = %servers[0], "no STUN answer; NAT mapping unknown");
                }
            }
        }
        while let Some(event) = self.prober6.poll_event() {
            match event {
                ProbeEvent::Mapping(m) if self.mapping6 != Some(m.reflexive) => {
                    tracing::info!(reflexive = %m.reflexive, "v6 mapping learned (STUN over v6)");
                    self.mapping6 = Some(m.reflexive);
                    self.report_mapping();
                }
                ProbeEvent::Mapping(_) => {}
                ProbeEvent::NoAnswer { servers } => {
                    tracing::info!(server = %servers[0], "no STUN answer over v6; v6 mapping unknown");
                }
            }
        }
    }

    /// When the shell must come back, and for what.
    pub fn poll_timeout(&self) -> Option<(Instant, Timer)> {
        let path = self.mesh.poll_timeout().map(|t| (t, Timer::PathCheck));
        let probe = match (self.prober.poll_timeout(), self.prober6.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(|t| (t, Timer::Probe));
        match (path, probe) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// The next peer or route change, in the order they were decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next datagram to send from the WireGuard port: (destination, bytes).
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.prober
            .poll_transmit()
            .or_else(|| self.prober6.poll_transmit())
    }

    /// What to tell the coordinator about ourselves (only the latest counts).
    pub fn poll_update(&mut self) -> Option<DeviceUpdate> {
        self.update.take()
    }

    /// A new view if anything shown changed since the last one.
    pub fn poll_view(&mut self) -> Option<NodeView> {
        std::mem::take(&mut self.view_changed).then(|| self.view())
    }

    /// What is shown now.
    pub fn view(&self) -> NodeView {
        NodeView {
            device: self.device.clone(),
            connected: self.connected,
            relay: self.mesh.local().relay,
            relay_id: self.mesh.relay_id(),
            peers: self
                .mesh
                .paths()
                .into_iter()
                .map(|(d, p)| (d.clone(), p))
                .collect(),
            plans: self.mesh.plans().map(|p| (p.id, p.clone())).collect(),
            routes_refused: self.mesh.refused().copied().collect(),
            routes_refused_total: self.mesh.refused_total(),
            exit: self
                .mesh
                .exit_state()
                .map(|(name, state)| (name.to_string(), state)),
            policy: self
                .access
                .in_force()
                .map(|revision| (revision, self.access.rules(), self.access.relay_enforced())),
        }
    }
}

#[cfg(test)]
mod tests;
