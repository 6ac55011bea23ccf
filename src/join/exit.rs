//! Exit nodes (DESIGN §8): the shell around `--exit-node` (forwarding and the exit's
//! nftables table) and `--use-exit-node` (policy routing, `io::policy_route`).
//!
//! Both are held by a guard whose `Drop` undoes them, so every way out of `run`
//! (an error included) removes them; what a SIGKILLed run left is removed by the
//! next start ([`clean_leftovers`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

fn write_sysctl(path: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(Path::new("/proc/sys").join(path), value)
}

/// Where the value of `src_valid_mark` from before our first change is kept, so
/// that the run after a SIGKILL still puts it back.
fn src_valid_mark_file(state_dir: &Path) -> PathBuf {
    state_dir.join("src_valid_mark.before")
}

/// Sets `src_valid_mark` (the reverse-path filter then uses our mark, as with
/// wg-quick); returns the value to put back, kept in the state dir too, if we
/// changed it now or a killed run had.
fn set_src_valid_mark(state_dir: &Path) -> Option<(String, PathBuf)> {
    let file = src_valid_mark_file(state_dir);
    let kept = std::fs::read_to_string(&file)
        .ok()
        .map(|s| s.trim().to_string());
    let now = sysinfo::read_sysctl(SRC_VALID_MARK);
    if now.as_deref() == Some("1") {
        return kept.map(|v| (v, file));
    }
    if let Err(e) = write_sysctl(SRC_VALID_MARK, "1") {
        tracing::warn!(error = %e, "cannot set net.ipv4.conf.all.src_valid_mark=1; with a strict rp_filter, peers' datagrams may be dropped");
        return None;
    }
    let before = kept.or(now)?;
    if let Err(e) = crate::fsutil::write_private_atomic(&file, before.as_bytes()) {
        tracing::warn!(error = %e, "cannot keep src_valid_mark's value in the state dir");
    }
    Some((before, file))
}

/// Puts back the `src_valid_mark` a killed run of ours changed, as the state
/// dir keeps it.
fn restore_src_valid_mark(state_dir: &Path) {
    let file = src_valid_mark_file(state_dir);
    if let Ok(before) = std::fs::read_to_string(&file) {
        put_back_src_valid_mark(before.trim(), &file);
    }
}

/// Writes `before` back into `src_valid_mark`, then forgets `file`.
fn put_back_src_valid_mark(before: &str, file: &Path) {
    match write_sysctl(SRC_VALID_MARK, before) {
        Ok(()) => {
            tracing::info!(value = before, "net.ipv4.conf.all.src_valid_mark put back");
            let _ = std::fs::remove_file(file);
        }
        Err(e) => {
            tracing::warn!(error = %e, value = before, "could not put net.ipv4.conf.all.src_valid_mark back");
        }
    }
}

/// What this run set up for exits; undone when dropped.
pub(super) struct Exits {
    interface: String,
    coordinators: Vec<std::net::IpAddr>,
    table: bool,
    rules: bool,
    /// `src_valid_mark` as it was before we set it (put back when dropped), and
    /// the file in the state dir that keeps it for the run after a SIGKILL.
    src_valid_mark: Option<(String, PathBuf)>,
}

impl Exits {
    /// At start: removes what a killed run left (the exit's table, our policy
    /// routing), except that with `--use-exit-node` the policy routing is
    /// (re)installed at once instead, so nothing leaves through the uplink while we
    /// enroll (the mesh prefixes follow in [`Exits::up`]).
    pub(super) fn begin(
        cfg: &JoinConfig,
        coordinators: &[SocketAddr],
        listen_port: u16,
    ) -> Result<Self, JoinError> {
        let mut me = Self {
            interface: cfg.interface.clone(),
            coordinators: coordinators.iter().map(SocketAddr::ip).collect(),
            table: false,
            rules: false,
            src_valid_mark: None,
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
            // Datagrams from peers pass the reverse-path filter (strict or loose)
            // as our marked packets are routed.
            nft::install_mark(&cfg.interface, policy_route::FWMARK, listen_port)?;
            me.src_valid_mark = set_src_valid_mark(&cfg.state_dir);
        } else {
            restore_src_valid_mark(&cfg.state_dir);
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
        if let Some((before, file)) = self.src_valid_mark.take() {
            put_back_src_valid_mark(&before, &file);
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
