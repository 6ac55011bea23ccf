//! The node's driver loop: the one task that owns the control core ([`Agent`]:
//! mesh state, NAT probing, our device record).
//!
//! Every input arrives as a message: coordinator events from `control`, STUN
//! answers from the data-path thread, and the deadline the core asks for (direct
//! → relay fallback checks, STUN retries and rounds). After each input the driver
//! drains the core in order: peer and route changes to [`apply`], STUN requests
//! to the data path, mapping reports to `control`, and a fresh [`NodeView`] to the
//! status and UAPI sockets through a `watch` channel. Nothing else holds the state,
//! so effects leave in the order the core decided them.

use std::time::Instant;

use rand::RngCore;
use tokio::sync::{mpsc, watch};

use crate::node::agent::{Agent, NodeView, Timer};
use crate::node::route_guard::RouteGuard;
use crate::wire::control::DeviceUpdate;

use super::apply::{CommandSink, RouteApplier, apply};
use super::control::ControlEvent;
use super::datapath::{Command, DataPath, StunAnswer};

/// The driver's inputs and outputs besides the core.
pub(super) struct Driver<'a> {
    pub agent: Agent,
    pub datapath: &'a DataPath,
    /// Kernel routes (none in rootless mode).
    pub routes: Option<RouteApplier>,
    /// Persistent keepalive installed with every peer.
    pub keepalive: u16,
    pub events: mpsc::Receiver<ControlEvent>,
    pub stun_answers: mpsc::Receiver<StunAnswer>,
    /// Reads what the route guard protects (the host's addresses may change): at
    /// every snapshot (each reconnection) and NAT probe.
    pub guard: Box<dyn Fn() -> RouteGuard + Send + Sync + 'a>,
    pub updates: watch::Sender<Option<DeviceUpdate>>,
    pub view: watch::Sender<NodeView>,
    /// Mesh DNS names, for the resolver and the rootless SOCKS5 server.
    pub names: watch::Sender<std::sync::Arc<crate::node::dns::NameTable>>,
    /// A subnet router's forwarding: on for a family while one of our prefixes of
    /// it is in effect (the coordinator sends our record reduced to what is
    /// approved), put back as it was otherwise and when the driver is dropped.
    /// `None`: not a subnet router (or rootless).
    pub forwarding: Option<Forwarding>,
}

/// See [`Driver::forwarding`].
pub(super) struct Forwarding {
    pub switch: crate::io::sysinfo::ForwardingSwitch,
    /// Our device id, to find our record in snapshots and deltas.
    pub device_id: i64,
    /// IPv6 is used here.
    pub ipv6: bool,
}

impl Forwarding {
    /// Follows our record as peers see it.
    fn follow(&mut self, devices: &[crate::wire::control::Device]) {
        let Some(me) = devices.iter().find(|d| d.id == self.device_id) else {
            return;
        };
        let v4 = me.advertise_cidrs.iter().any(|c| c.addr().is_ipv4());
        let v6 = self.ipv6 && me.advertise_cidrs.iter().any(|c| c.addr().is_ipv6());
        if let Err(e) = self.switch.set(v4, v6) {
            tracing::warn!(error = %e, "cannot change forwarding");
        }
    }
}

/// Applies the core's pending peer and route changes, in the order it produced them.
pub(super) fn apply_actions(
    agent: &mut Agent,
    keepalive: u16,
    peers: &impl CommandSink,
    routes: Option<&RouteApplier>,
) {
    while let Some(action) = agent.poll_action() {
        apply(action, keepalive, peers, routes);
    }
}

impl Driver<'_> {
    /// Runs until the control connection's sender is gone.
    pub(super) async fn run(mut self) {
        let mut stun_open = true;
        loop {
            self.flush();
            let timeout = self.agent.poll_timeout();
            let sleep = async {
                match timeout {
                    Some((t, _)) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => self.handle_event(event),
                    None => return,
                },
                answer = self.stun_answers.recv(), if stun_open => match answer {
                    Some((txid, mapped)) => self.agent.handle_stun_answer(txid, mapped, Instant::now()),
                    None => stun_open = false,
                },
                () = sleep => match timeout.map(|(_, why)| why) {
                    Some(Timer::PathCheck) => self.check_paths().await,
                    Some(Timer::Probe) => {
                        let mut random = [0u8; 24];
                        rand::rng().fill_bytes(&mut random);
                        self.agent.set_route_guard((self.guard)());
                        self.agent.handle_timeout(Instant::now(), random);
                    }
                    None => {}
                },
            }
        }
    }

    fn handle_event(&mut self, event: ControlEvent) {
        let now = Instant::now();
        match event {
            ControlEvent::Snapshot {
                devices,
                stun_port,
                coordinator,
                policy,
            } => {
                self.agent.set_route_guard((self.guard)());
                self.agent.handle_policy(policy.as_ref());
                if let Some(f) = self.forwarding.as_mut() {
                    f.follow(&devices);
                }
                self.agent
                    .handle_snapshot(&devices, stun_port, coordinator, now);
            }
            ControlEvent::Delta {
                mut upserts,
                removed,
                policy,
                online,
            } => {
                // Devices that only went online or offline: as full records.
                upserts.extend(self.agent.with_online(&online));
                if let Some(f) = self.forwarding.as_mut() {
                    f.follow(&upserts);
                }
                if let Some(policy) = policy {
                    self.agent.handle_policy(Some(&policy));
                }
                self.agent.handle_delta(&upserts, &removed, now);
            }
            ControlEvent::Resumed {
                stun_port,
                coordinator,
            } => self.agent.handle_resumed(stun_port, coordinator, now),
            ControlEvent::Device(device) => self.agent.handle_device(*device),
            ControlEvent::Lost => self.agent.handle_disconnected(),
        }
    }

    /// Feeds the data plane's handshake ages to the core.
    async fn check_paths(&mut self) {
        let status = self.datapath.status().await;
        let ages = status.iter().flat_map(|s| {
            s.peers.iter().map(|(id, p)| crate::node::mesh::PathSample {
                id: *id,
                handshake_age: p.last_handshake,
                rx_bytes: p.rx_bytes,
                counters: p.path,
            })
        });
        self.agent.handle_handshakes(Instant::now(), ages);
    }

    /// Sends out everything the core produced.
    fn flush(&mut self) {
        apply_actions(
            &mut self.agent,
            self.keepalive,
            self.datapath,
            self.routes.as_ref(),
        );
        if let Some(table) = self.agent.poll_policy_table() {
            self.datapath.send(Command::SetPolicy(table.map(Box::new)));
        }
        while let Some((id, table)) = self.agent.poll_relay_policy() {
            self.datapath
                .send(Command::SetRelayPolicy(id, table.map(Box::new)));
        }
        while let Some((to, data)) = self.agent.poll_transmit() {
            self.datapath.send(Command::SendRaw(to, data));
        }
        if let Some(update) = self.agent.poll_update() {
            self.updates.send_replace(Some(update));
        }
        if let Some(names) = self.agent.poll_names() {
            self.names.send_replace(std::sync::Arc::new(names));
        }
        if let Some(view) = self.agent.poll_view() {
            self.view.send_replace(view);
        }
    }
}

#[cfg(test)]
mod tests;
