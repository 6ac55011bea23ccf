//! The node's packet side: masquerade rules, the TUN interface (or the rootless
//! stack's packet pipe), the WireGuard UDP socket and the data-path thread over them.
//!
//! It only sets things up; what flows through them is the data path's business and
//! which peers exist is the driver's.

use std::net::Ipv6Addr;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::io::{nft, tun, udp};
use crate::node::dataplane::DataPlane;
use crate::wire::control::Device;

use super::datapath::{DataPath, DataPathConfig, STUN_QUEUE, StunAnswer};
use super::{JoinConfig, JoinError};

/// What [`start`] brought up.
pub(super) struct Up {
    pub datapath: DataPath,
    /// The userspace stack in rootless mode.
    pub stack: Option<Arc<crate::userspace::Stack>>,
    /// Our IPv6 tunnel address and prefix length, if the mesh uses IPv6 here.
    pub v6: Option<(Ipv6Addr, u8)>,
    /// STUN answers the data path hands back.
    pub stun_answers: mpsc::Receiver<StunAnswer>,
}

/// A subnet router (kernel mode) gets its nftables table: forwarding limited to the
/// advertised prefixes, and masquerade if asked.
pub(super) fn router_table(cfg: &JoinConfig) -> bool {
    cfg.userspace.is_none() && (!cfg.advertise_cidrs.is_empty() || cfg.masquerade)
}

/// Installs a subnet router's forwarding limits (none towards `exit_uplinks` of an
/// exit node) and masquerading, creates the packet device and the UDP socket on
/// `listen_port`, and starts the data-path thread with `private` as our key.
pub(super) fn start(
    cfg: &JoinConfig,
    device: &Device,
    ipv6: bool,
    listen_port: u16,
    private: [u8; 32],
    exit_uplinks: &[(bool, String)],
    names: &tokio::sync::watch::Receiver<Arc<crate::node::dns::NameTable>>,
) -> Result<Up, JoinError> {
    let v6 = device
        .tunnel_ip_v6
        .filter(|_| ipv6)
        .map(|a| (a, device.organization_prefix_v6.prefix_len()));
    if router_table(cfg) {
        let masquerade = cfg.masquerade.then_some((
            device.organization_prefix,
            v6.map(|_| device.organization_prefix_v6),
        ));
        nft::install_router(
            &cfg.interface,
            &cfg.advertise_cidrs,
            masquerade,
            exit_uplinks,
        )?;
        tracing::info!(
            masquerade = cfg.masquerade,
            "forwarding from the mesh only to the advertised prefixes"
        );
    }
    let (packets, stack) = match &cfg.userspace {
        None => {
            let dev = tun::create(&cfg.interface, tun::DEFAULT_MTU, device.tunnel_ip, v6)?;
            (tun::PacketDevice::Tun(dev), None)
        }
        Some(us) => {
            use crate::io::packet_pipe;
            let (ours, theirs) = packet_pipe::pair(
                packet_pipe::TO_STACK_SLOTS,
                packet_pipe::FROM_STACK_SLOTS,
                packet_pipe::slot_len(usize::from(tun::DEFAULT_MTU)),
            )
            .map_err(JoinError::DataPath)?;
            let stack = crate::userspace::Stack::start(
                us.clone(),
                theirs,
                device.tunnel_ip,
                v6.map(|(a, _)| a),
                tun::DEFAULT_MTU,
                names.clone(),
            )?;
            (tun::PacketDevice::Pipe(ours), Some(Arc::new(stack)))
        }
    };
    let socket = udp::bind(listen_port).map_err(|source| JoinError::Udp {
        port: listen_port,
        source,
    })?;
    if cfg.use_exit_node.is_some() {
        // Peers and STUN stay on the underlay (`io::policy_route`).
        socket2::SockRef::from(&socket)
            .set_mark(crate::io::policy_route::FWMARK)
            .map_err(|source| JoinError::Udp {
                port: listen_port,
                source,
            })?;
    }
    let (stun_tx, stun_answers) = mpsc::channel(STUN_QUEUE);
    let mut dataplane = DataPlane::new(private);
    dataplane.set_mtu(usize::from(tun::DEFAULT_MTU));
    let datapath = DataPath::spawn(
        dataplane,
        packets,
        socket,
        DataPathConfig {
            relay: cfg.relay,
            stun_answers: stun_tx,
            fragment: false,
            tun_gone: None,
        },
    )
    .map_err(JoinError::DataPath)?;
    tracing::info!(
        interface = %if stack.is_some() { "userspace" } else { &cfg.interface },
        tunnel_ip = %device.tunnel_ip,
        tunnel_ip_v6 = ?v6.map(|(a, _)| a),
        listen_port,
        "interface up"
    );
    Ok(Up {
        datapath,
        stack,
        v6,
        stun_answers,
    })
}
