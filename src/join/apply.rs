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
    /// Starts the thread; `apply` runs once per change, in order.
    pub(crate) fn spawn(
        mut apply: impl FnMut(RouteChange) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nexodus-routes".into())
            .spawn(move || {
                for change in rx {
                    apply(change);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Routes through `interface` with `ip route`. With `exit_table`
    /// (`--use-exit-node`), an exit's default routes go to our own table, and
    /// peers' prefixes go there as well as to the main table, so they win over
    /// the defaults there by longest prefix.
    pub(crate) fn kernel(interface: String, exit_table: bool) -> std::io::Result<Self> {
        Self::spawn(move |change| {
            let result = match change {
                RouteChange::Add(net) if net.prefix_len() == 0 => {
                    policy_route::add_route(&interface, net)
                }
                RouteChange::Remove(net) if net.prefix_len() == 0 => {
                    policy_route::remove_route(&interface, net)
                }
                RouteChange::Add(net) => {
                    let main = match route::add(&interface, net) {
                        Ok(route::Added::Exists) => {
                            tracing::warn!(prefix = %net, "the host already routes this prefix; leaving its route as it is");
                            Ok(())
                        }
                        other => other.map(|_| ()),
                    };
                    if exit_table {
                        main.and(policy_route::add_route(&interface, net))
                    } else {
                        main
                    }
                }
                RouteChange::Remove(net) => {
                    let main = route::remove(&interface, net);
                    if exit_table {
                        main.and(policy_route::remove_route(&interface, net))
                    } else {
                        main
                    }
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "route change failed");
            }
        })
    }

    pub(crate) fn send(&self, change: RouteChange) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(change);
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
            tracing::info!(exit = ?exit.as_ref().map(|e| e.peer), "relay: peers' internet traffic goes to this exit");
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
