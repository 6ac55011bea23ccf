//! `nexodus join`: the node shell.
//!
//! [`run`] enrolls with the coordinator (`enroll`), creates the TUN interface (or
//! the rootless stack) and the UDP socket, starts the data-path thread, and then
//! runs three things until shutdown: `control` (the watch stream, reconnecting
//! with backoff), the `driver` loop, sole owner of the control core
//! ([`Agent`](crate::node::agent::Agent)), whose peer and route changes `apply`
//! carries out in order, and the `local` sockets for `nexodus status` and `wg
//! show`. If the coordinator goes away the data path keeps running on the last
//! known peers. Decisions live in `node`; this module only moves their inputs and
//! outputs.

mod apply;
mod control;
pub mod datapath;
mod driver;
mod enroll;
mod iface;
mod local;
pub mod metrics;
pub mod state;
pub mod status;
pub mod uapi;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rand::RngCore;
use thiserror::Error;

use crate::coord::keys;
use crate::coord::token::{JoinToken, TokenError, hex};
use crate::io::{nft, sysinfo, tun, udp};
use crate::node::agent::Agent;
use crate::node::mesh::LocalView;
use crate::node::route_guard::RouteGuard;
use enroll::{Ctx, Enrolled};
use state::{NodeState, StateError};

/// Default WireGuard listen port.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Default coordinator control port, used when an address has none.
pub const DEFAULT_COORDINATOR_PORT: u16 = 4443;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum JoinError {
    #[error("bad coordinator address {0:?}: expected HOST:PORT or HOST")]
    BadAddress(String),
    #[error("bad join token: {0}")]
    Token(#[from] TokenError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "no join token: pass --token for the first join (the state dir has no coordinator yet)"
    )]
    NoToken,
    #[error("the coordinator refused to enroll this device: {0}")]
    Refused(String),
    #[error(
        "the coordinator no longer knows this device (was it removed?); join again with --token"
    )]
    Forgotten,
    #[error("this device was removed from its organization by an administrator")]
    Removed,
    #[error(transparent)]
    Tun(#[from] tun::TunError),
    #[error("cannot open UDP port {port}: {source}")]
    Udp {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the data path: {0}")]
    DataPath(std::io::Error),
    #[error("cannot start the route thread: {0}")]
    Routes(std::io::Error),
    #[error("cannot open the status socket: {0}")]
    StatusSocket(std::io::Error),
    #[error(transparent)]
    Forwarding(#[from] sysinfo::ForwardingError),
    #[error(transparent)]
    Masquerade(#[from] nft::NftError),
    #[error(transparent)]
    Userspace(#[from] crate::userspace::UserspaceError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

pub struct JoinConfig {
    pub coordinators: Vec<String>,
    pub token: Option<String>,
    pub state_dir: PathBuf,
    pub interface: String,
    /// Name shown to peers and admins (default: the kernel hostname).
    pub hostname: Option<String>,
    pub listen_port: Option<u16>,
    pub advertise_cidrs: Vec<IpNet>,
    pub request_ips: Vec<IpAddr>,
    /// Forward between spokes inside this process.
    pub relay: bool,
    /// Reach the organization only through the relay.
    pub relay_only: bool,
    /// Masquerade mesh traffic leaving to the advertised LANs.
    pub masquerade: bool,
    /// Persistent keepalive towards every peer, seconds (0: off).
    pub keepalive: u16,
    /// Rootless mode: a userspace TCP/IP stack instead of a TUN device.
    pub userspace: Option<crate::userspace::UserspaceConfig>,
    /// Where to serve Prometheus `/metrics` (off when None).
    pub metrics_listen: Option<SocketAddr>,
}

/// Resolves `HOST[:PORT]` entries (default port 4443).
pub fn resolve(entries: &[String]) -> Result<Vec<SocketAddr>, JoinError> {
    let mut out = Vec::new();
    for e in entries.iter().flat_map(|e| e.split(',')).map(str::trim) {
        if e.is_empty() {
            continue;
        }
        let resolved: Vec<SocketAddr> = match e.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(_) => (e, DEFAULT_COORDINATOR_PORT)
                .to_socket_addrs()
                .map_err(|_| JoinError::BadAddress(e.into()))?
                .collect(),
        };
        if resolved.is_empty() {
            return Err(JoinError::BadAddress(e.into()));
        }
        out.extend(resolved);
    }
    if out.is_empty() {
        return Err(JoinError::BadAddress(entries.join(",")));
    }
    Ok(out)
}

/// What the route guard protects on this host now: the addresses and connected
/// prefixes of every interface but the mesh's own, and each coordinator address.
fn route_guard(interface: &str, coordinators: &[SocketAddr]) -> RouteGuard {
    // `--use-exit-node` (DESIGN §8) will allow the chosen exit's default route here
    // with `RouteGuard::allowing_default`.
    RouteGuard::new(
        sysinfo::underlay_prefixes(interface)
            .into_iter()
            .chain(coordinators.iter().map(|a| IpNet::from(a.ip()))),
    )
}

/// Runs the node until `shutdown` resolves or an unrecoverable error.
pub async fn run(
    cfg: JoinConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), JoinError> {
    let addrs = resolve(&cfg.coordinators)?;
    let token = cfg.token.as_deref().map(JoinToken::parse).transpose()?;
    // Ours until we return: a second `join` on this directory is refused.
    let _lock = state::lock(&cfg.state_dir)?;
    let mut state = match NodeState::load(&cfg.state_dir)? {
        Some(s) => s,
        None => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            NodeState::new(key, cfg.listen_port.unwrap_or(DEFAULT_LISTEN_PORT))
        }
    };
    if let Some(port) = cfg.listen_port {
        state.listen_port = port;
    }
    let fp = token
        .as_ref()
        .map(|t| t.fingerprint)
        .or_else(|| state.fingerprint_bytes())
        .ok_or(JoinError::NoToken)?;
    state.coordinator_fingerprint = Some(hex(&fp));
    // The key is on disk before any coordinator hears of it.
    state.save(&cfg.state_dir)?;
    let private = state
        .private_key_bytes()
        .ok_or_else(|| StateError::Corrupt {
            path: cfg.state_dir.join(state::STATE_FILE),
            reason: "private key".into(),
        })?;
    let public =
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(private));
    let public_key = keys::encode_key(public.as_bytes());

    // The userspace stack speaks IPv6 whatever the host has.
    let ipv6 = cfg.userspace.is_some() || sysinfo::ipv6_supported(Some(&cfg.interface));
    let endpoints: Vec<SocketAddr> = udp::local_address_towards(addrs[0])
        .map(|ip| SocketAddr::new(ip, state.listen_port))
        .into_iter()
        .collect();
    tracing::info!(ipv6, ?endpoints, "host checked");
    // A subnet router forwards; find out before telling anyone about the prefixes.
    if !cfg.advertise_cidrs.is_empty() {
        let fwd_v4 = cfg.advertise_cidrs.iter().any(|c| c.addr().is_ipv4());
        let fwd_v6 = ipv6 && cfg.advertise_cidrs.iter().any(|c| c.addr().is_ipv6());
        sysinfo::enable_forwarding(fwd_v4, fwd_v6)?;
    }

    let ctx = Ctx {
        cfg: &cfg,
        addrs,
        token,
        fp,
        ipv6,
        endpoints,
        public_key,
    };
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(250);
    let enrolled = loop {
        let attempt = enroll::enroll(&ctx, &mut state);
        tokio::select! {
            r = attempt => match r? {
                Ok(e) => break e,
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the coordinator"),
            },
            () = &mut shutdown => return Ok(()),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut shutdown => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    };
    let Enrolled {
        client,
        device,
        auth,
    } = enrolled;
    // Keep the coordinator's view of our endpoints, prefixes and roles current.
    let device = enroll::sync_registration(&ctx, &client, &auth, device).await?;

    let iface::Up {
        datapath,
        stack,
        v6,
        stun_answers,
    } = iface::start(&cfg, &device, ipv6, state.listen_port, private)?;
    let datapath = Arc::new(datapath);
    let routes = match cfg.userspace {
        None => {
            Some(apply::RouteApplier::kernel(cfg.interface.clone()).map_err(JoinError::Routes)?)
        }
        // The data path's own table is the only one.
        Some(_) => None,
    };
    let mut agent = Agent::new(
        device.clone(),
        LocalView {
            device_id: device.id,
            ipv6: v6.is_some(),
            relay: cfg.relay,
            spoke: cfg.relay_only,
            reflexive: None,
            org_v4: device.organization_prefix,
            org_v6: device.organization_prefix_v6,
        },
        cfg.relay_only,
        client.remote_address(),
    );
    let guard = || route_guard(&cfg.interface, &ctx.addrs);
    agent.set_route_guard(guard());
    let (view_tx, view) = tokio::sync::watch::channel(agent.view());
    let (updates_tx, updates) = tokio::sync::watch::channel(None);
    let (events_tx, events) = tokio::sync::mpsc::channel(64);

    let sockets =
        local::Sockets::start(&cfg, &datapath, view, stack, state.listen_port, private).await?;

    let driver = driver::Driver {
        agent,
        datapath: &datapath,
        routes,
        keepalive: cfg.keepalive,
        events,
        stun_answers,
        guard: Box::new(guard),
        updates: updates_tx,
        view: view_tx,
    };
    let result = tokio::select! {
        r = control::run(&ctx, client, auth, events_tx, updates) => r,
        () = driver.run() => Ok(()),
        () = &mut shutdown => Ok(()),
    };
    sockets.stop(&cfg).await;
    // Dropping the last handle stops the data-path thread, which closes the TUN
    // device: the interface and all its routes disappear.
    drop(datapath);
    if iface::router_table(&cfg)
        && let Err(e) = nft::remove_router(&cfg.interface)
    {
        tracing::warn!(error = %e, "could not remove the subnet router's nftables table");
    }
    tracing::info!(interface = %cfg.interface, "interface removed; device stays registered");
    result
}
