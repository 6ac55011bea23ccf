//! Exit nodes (DESIGN §8): the shell around `--exit-node` (forwarding and the exit's
//! nftables table) and `--use-exit-node` (policy routing, `io::policy_route`).
//!
//! Both are held by a guard whose `Drop` undoes them, so every way out of `run`
//! (an error included) removes them; what a SIGKILLed run left is removed by the
//! next start ([`clean_leftovers`]).

use std::net::SocketAddr;
use std::process::Command;

use ipnet::IpNet;

use crate::io::{nft, policy_route, sysinfo};
use crate::wire::control::Device;

use super::{JoinConfig, JoinError};

/// The interfaces of `ip route show default` output (`... dev eth0 ...`).
pub(super) fn default_devs(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "dev")?;
            words.next().map(str::to_string)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The host's uplinks, (is IPv6, interface), from its default routes.
fn uplinks(interface: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let Ok(o) = Command::new("ip")
            .args([if v6 { "-6" } else { "-4" }, "route", "show", "default"])
            .output()
        else {
            continue;
        };
        for dev in default_devs(&String::from_utf8_lossy(&o.stdout)) {
            if dev != interface {
                out.push((v6, dev));
            }
        }
    }
    out
}

/// Before anything is claimed: an exit's uplinks, and forwarding turned on for
/// their families (checked first: containers may forbid it), put back as it was
/// when the returned guard is dropped. Kernel mode only.
pub(super) fn prepare(
    cfg: &JoinConfig,
    ipv6: bool,
) -> Result<(Vec<(bool, String)>, sysinfo::Forwarding), JoinError> {
    if !cfg.exit_node {
        return Ok((Vec::new(), sysinfo::Forwarding::default()));
    }
    let up: Vec<(bool, String)> = uplinks(&cfg.interface)
        .into_iter()
        .filter(|(v6, _)| !v6 || ipv6)
        .collect();
    if up.is_empty() {
        return Err(JoinError::NoUplink);
    }
    let forwarding =
        sysinfo::enable_forwarding(up.iter().any(|(v6, _)| !v6), up.iter().any(|(v6, _)| *v6))?;
    tracing::info!(uplinks = ?up, "exit node: forwarding on");
    Ok((up, forwarding))
}

/// The families our policy routing catches: every one the host speaks, v6 even
/// without v6 in the mesh.
fn families() -> Vec<bool> {
    [false, true]
        .into_iter()
        .filter(|v6| !v6 || sysinfo::ipv6_supported(None))
        .collect()
}

/// Lets the reverse-path filter use the mark restored from the connection.
const SRC_VALID_MARK: &str = "net/ipv4/conf/all/src_valid_mark";

/// What this run set up for exits; undone when dropped.
pub(super) struct Exits {
    interface: String,
    coordinators: Vec<std::net::IpAddr>,
    table: bool,
    rules: bool,
}

impl Exits {
    /// At start: removes what a killed run left (the exit's table, our policy
    /// routing), except that with `--use-exit-node` the policy routing is
    /// (re)installed at once instead, so nothing leaves through the uplink while we
    /// enroll (the mesh prefixes follow in [`Exits::up`]).
    pub(super) fn begin(cfg: &JoinConfig, coordinators: &[SocketAddr]) -> Result<Self, JoinError> {
        let mut me = Self {
            interface: cfg.interface.clone(),
            coordinators: coordinators.iter().map(SocketAddr::ip).collect(),
            table: false,
            rules: false,
        };
        if cfg.userspace.is_some() {
            return Ok(me);
        }
        if !cfg.exit_node {
            // Quiet: usually there is nothing, or no nft at all.
            let _ = nft::remove_exit(&cfg.interface);
        }
        if cfg.use_exit_node.is_some() {
            me.rules = true;
            policy_route::install(&me.coordinators, &[], cfg.exit_node_allow_lan, &families())
                .map_err(JoinError::PolicyRoute)?;
            // Answers from peers pass the reverse-path filter (strict or loose) as
            // our marked packets are routed.
            nft::install_mark(&cfg.interface, policy_route::FWMARK)?;
            if sysinfo::read_sysctl(SRC_VALID_MARK).as_deref() != Some("1")
                && let Err(e) =
                    std::fs::write(std::path::Path::new("/proc/sys").join(SRC_VALID_MARK), "1")
            {
                tracing::warn!(error = %e, "cannot set net.ipv4.conf.all.src_valid_mark=1; with rp_filter on, peers' answers may be dropped");
            }
        } else {
            let _ = nft::remove_mark(&cfg.interface);
            let removed = policy_route::cleanup();
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed the exit-node policy routing a previous run left"
                );
            }
        }
        Ok(me)
    }

    /// Once enrolled: the exit's table (with `uplinks` from [`prepare`]) and, for
    /// `--use-exit-node`, the policy routing that sends everything but the
    /// coordinators, the mesh and our own UDP socket into the tunnel or nowhere.
    pub(super) fn up(
        &mut self,
        cfg: &JoinConfig,
        device: &Device,
        ipv6: bool,
        uplinks: &[(bool, String)],
    ) -> Result<(), JoinError> {
        if cfg.userspace.is_some() {
            return Ok(());
        }
        let v6 = (ipv6 && device.tunnel_ip_v6.is_some()).then_some(device.organization_prefix_v6);
        if cfg.exit_node {
            self.table = true;
            nft::install_exit(&cfg.interface, uplinks, device.organization_prefix, v6)?;
            tracing::info!(uplinks = ?uplinks, "exit node: masquerading the mesh out of the uplinks");
        }
        if let Some(exit) = &cfg.use_exit_node {
            let mut mesh = vec![IpNet::V4(device.organization_prefix)];
            mesh.extend(v6.map(IpNet::V6));
            policy_route::install(
                &self.coordinators,
                &mesh,
                cfg.exit_node_allow_lan,
                &families(),
            )
            .map_err(JoinError::PolicyRoute)?;
            tracing::info!(exit = %exit, allow_lan = cfg.exit_node_allow_lan, "non-mesh traffic goes through the exit node (dropped while it is not usable)");
        }
        Ok(())
    }
}

impl Drop for Exits {
    fn drop(&mut self) {
        if self.rules {
            policy_route::cleanup();
            let _ = nft::remove_mark(&self.interface);
            tracing::info!("exit-node policy routing removed");
        }
        if self.table
            && let Err(e) = nft::remove_exit(&self.interface)
        {
            tracing::warn!(error = %e, "could not remove the exit node's nftables table");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplinks_from_default_routes() {
        let text = "default via 192.0.2.1 dev eth0 proto static\ndefault via 192.0.2.9 dev wlan0 metric 600\n";
        assert_eq!(default_devs(text), vec!["eth0", "wlan0"]);
        assert!(default_devs("").is_empty());
        assert!(default_devs("unreachable default\n").is_empty());
    }
}
