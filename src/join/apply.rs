//! Where the driver's actions take effect, in the order the core produced them:
//! peer changes go to the data-path thread (one FIFO command channel), route changes
//! to the one [`RouteApplier`] thread, which runs them one after another.
//!
//! Nothing here decides what to change (the `node` cores do) or runs concurrently
//! with itself: there is one applier of each kind per node.

use std::sync::mpsc;
use std::thread::JoinHandle;

use ipnet::IpNet;

use crate::io::{policy_route, route};
use crate::node::dataplane::PeerConfig;
use crate::node::mesh::Action;

use super::datapath::{Command, DataPath};

/// Takes data-path commands in order (the data-path thread; a recorder in tests).
pub(crate) trait CommandSink {
    fn send(&self, cmd: Command);
}

impl CommandSink for DataPath {
    fn send(&self, cmd: Command) {
        DataPath::send(self, cmd);
    }
}

/// A change to the kernel routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteChange {
    Add(IpNet),
    Remove(IpNet),
}

/// One thread applying route changes strictly in the order they were sent, so the
/// driver never waits for `ip route` and no two changes race each other.
pub(crate) struct RouteApplier {
    tx: Option<mpsc::Sender<RouteChange>>,
    thread: Option<JoinHandle<()>>,
}

impl RouteApplier {
    /// Starts the thread; `apply` runs once per change, in order (tests record them).
    #[cfg(test)]
    pub(crate) fn spawn(
        mut apply: impl FnMut(RouteChange) + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_batched(move |changes| changes.into_iter().for_each(&mut apply))
    }

    /// Starts the thread; `apply` runs with every change waiting at the time (at
    /// least one), in order: a snapshot's thousands of routes go out together.
    pub(crate) fn spawn_batched(
        mut apply: impl FnMut(Vec<RouteChange>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nexodus-routes".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut changes = vec![first];
                    changes.extend(rx.try_iter());
                    apply(changes);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Routes through `interface`: peers' prefixes with one `ip -batch` per batch of
    /// changes, an exit's default routes (our own table) one by one, all in order.
    /// With `exit_table` (`--use-exit-node`), peers' prefixes also go to our own
    /// table, so they win over the exit's defaults there by longest prefix.
    pub(crate) fn kernel(interface: String, exit_table: bool) -> std::io::Result<Self> {
        Self::spawn_batched(move |changes| {
            let mut run: Vec<(route::Op, IpNet)> = Vec::new();
            for change in changes {
                match change {
                    RouteChange::Add(net) if net.prefix_len() > 0 => {
                        run.push((route::Op::Add, net))
                    }
                    RouteChange::Remove(net) if net.prefix_len() > 0 => {
                        run.push((route::Op::Remove, net));
                    }
                    default => {
                        // Keep the order: what came before goes first.
                        apply_batch(&interface, &std::mem::take(&mut run), exit_table);
                        let result = match default {
                            RouteChange::Add(net) => policy_route::add_route(&interface, net),
                            RouteChange::Remove(net) => policy_route::remove_route(&interface, net),
                        };
                        if let Err(e) = result {
                            tracing::warn!(error = %e, "route change failed");
                        }
                    }
                }
            }
            apply_batch(&interface, &run, exit_table);
        })
    }

    pub(crate) fn send(&self, change: RouteChange) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(change);
        }
    }
}

/// Runs `changes` through `ip -batch`, logging what failed; with `exit_table`, also
/// into our own table (one `ip` call each: only exit clients have one).
fn apply_batch(interface: &str, changes: &[(route::Op, IpNet)], exit_table: bool) {
    if changes.is_empty() {
        return;
    }
    if exit_table {
        for (op, net) in changes {
            let result = match op {
                route::Op::Add => policy_route::add_route(interface, *net),
                route::Op::Remove => policy_route::remove_route(interface, *net),
            };
            if let Err(e) = result {
                tracing::warn!(prefix = %net, ?op, error = %e, "route change in the exit table failed");
            }
        }
    }
    let outcomes = match route::batch(interface, changes) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, routes = changes.len(), "route changes failed");
            return;
        }
    };
    tracing::debug!(routes = changes.len(), "route changes applied");
    for ((op, net), outcome) in changes.iter().zip(outcomes) {
        match outcome {
            route::Outcome::Done | route::Outcome::Gone => {}
            route::Outcome::Exists => {
                tracing::warn!(prefix = %net, "the host already routes this prefix; leaving its route as it is");
            }
            route::Outcome::Failed(why) => {
                tracing::warn!(prefix = %net, ?op, error = %why, "route change failed");
            }
        }
    }
}

impl Drop for RouteApplier {
    /// Waits until every change sent so far has been applied (at shutdown, before
    /// the interface goes), then the thread ends.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Applies one action: peers to the data path (with `keepalive`), routes to
/// `routes` (none in rootless mode, where the data path's table is the only one).
pub(crate) fn apply(
    action: Action,
    keepalive: u16,
    peers: &impl CommandSink,
    routes: Option<&RouteApplier>,
) {
    match action {
        Action::UpsertPeer(plan) => {
            tracing::info!(peer = plan.id, hostname = %plan.hostname, endpoint = ?plan.endpoint, allowed_ips = ?plan.allowed_ips, "peer installed");
            peers.send(Command::Upsert(
                plan.id,
                PeerConfig {
                    public_key: plan.public_key,
                    endpoint: plan.endpoint,
                    allowed_ips: plan.allowed_ips,
                    persistent_keepalive: Some(keepalive),
                },
            ));
        }
        Action::RemovePeer(id) => {
            tracing::info!(peer = id, "peer removed");
            peers.send(Command::Remove(id));
        }
        Action::Probe(id) => peers.send(Command::Probe(id)),
        Action::RelayExit(exit) => {
            tracing::info!(exits = ?exit.as_ref().map(|e| &e.exits), "relay: peers' internet traffic goes to the exits they chose (peer, exit; none: dropped)");
            peers.send(Command::SetRelayExit(exit));
        }
        Action::AddRoute(net) => {
            if let Some(r) = routes {
                r.send(RouteChange::Add(net));
            }
        }
        Action::RemoveRoute(net) => {
            if let Some(r) = routes {
                r.send(RouteChange::Remove(net));
            }
        }
    }
}
