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
pub mod dns;
mod driver;
mod enroll;
mod exit;
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
use crate::node::dns::NameTable;
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
    #[error("cannot resolve the coordinator name {host:?}")]
    Unresolved {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad join token")]
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
    #[error("cannot open UDP port {port}")]
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
    #[error("--exit-node needs a default route (an uplink) on this host; it has none")]
    NoUplink,
    #[error("cannot set up the policy routing for --use-exit-node")]
    PolicyRoute(#[source] crate::io::route::RouteError),
    #[error(transparent)]
    Userspace(#[from] crate::userspace::UserspaceError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot read the token file {path}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "token file {} can be read by group or others (mode {mode:04o}); restrict it: chmod 600 {}",
        path.display(), path.display()
    )]
    TokenFileExposed { path: PathBuf, mode: u32 },
    #[error("token file {} is empty", path.display())]
    TokenFileEmpty { path: PathBuf },
}

/// `--token-file`: the join token kept in a file (surrounding whitespace ignored),
/// which must not be readable by group or others.
pub fn read_token_file(path: &std::path::Path) -> Result<String, JoinError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let io = |source| JoinError::TokenFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mode = file.metadata().map_err(io)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(JoinError::TokenFileExposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = String::new();
    // A token is ~90 characters; a few KiB allows a comment-free file with slack.
    file.by_ref()
        .take(4096)
        .read_to_string(&mut text)
        .map_err(io)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(JoinError::TokenFileEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
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
    /// Offer this host's uplink as an exit (`--exit-node`, DESIGN §8).
    pub exit_node: bool,
    /// Send all non-mesh traffic through this exit (`--use-exit-node`).
    pub use_exit_node: Option<String>,
    /// With `use_exit_node`: keep the local LAN off the tunnel.
    pub exit_node_allow_lan: bool,
    /// Point the host's resolver at the mesh DNS for the domain (`--dns`).
    pub dns: bool,
}

/// Resolves `HOST[:PORT]` entries (default port 4443). A malformed entry is
/// [`JoinError::BadAddress`]; a well-formed name that does not resolve is
/// [`JoinError::Unresolved`].
pub fn resolve(entries: &[String]) -> Result<Vec<SocketAddr>, JoinError> {
    let mut out = Vec::new();
    for e in entries.iter().flat_map(|e| e.split(',')).map(str::trim) {
        if e.is_empty() {
            continue;
        }
        // IP:PORT as Rust reads it (also `[fe80::1%2]:4443`).
        if let Ok(addr) = e.parse::<SocketAddr>() {
            out.push(addr);
            continue;
        }
        let (host, port) = split_host_port(e).ok_or_else(|| JoinError::BadAddress(e.into()))?;
        let resolved: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|source| JoinError::Unresolved {
                host: host.into(),
                source,
            })?
            .collect();
        if resolved.is_empty() {
            return Err(JoinError::Unresolved {
                host: host.into(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
            });
        }
        out.extend(resolved);
    }
    if out.is_empty() {
        return Err(JoinError::BadAddress(entries.join(",")));
    }
    Ok(out)
}

/// `HOST:PORT`, `HOST`, `[V6]:PORT`, `[V6]` or a bare IPv6 address → (host, port);
/// `None` if malformed.
fn split_host_port(e: &str) -> Option<(&str, u16)> {
    if let Some(rest) = e.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        return match after {
            "" => Some((host, DEFAULT_COORDINATOR_PORT)),
            p => Some((host, p.strip_prefix(':')?.parse().ok()?)),
        };
    }
    if e.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some((e, DEFAULT_COORDINATOR_PORT));
    }
    let (host, port) = match e.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (e, DEFAULT_COORDINATOR_PORT),
    };
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    valid.then_some((host, port))
}

/// The endpoints we report (DESIGN §9): first our address towards the
/// coordinators (the one peers on our LAN reach us at), then the host's other
/// underlay addresses of both families (IPv6: global and unique-local), never
/// loopback, link-local, the mesh interface's or inside a prefix we advertise (a
/// subnet router's LAN is reached through the tunnel). At most
/// [`crate::coord::limits::MAX_ENDPOINTS`].
fn local_endpoints(cfg: &JoinConfig, coordinators: &[SocketAddr], port: u16) -> Vec<SocketAddr> {
    let towards = coordinators
        .iter()
        .find_map(|a| udp::local_address_towards(*a));
    let host = sysinfo::underlay_addrs(&cfg.interface);
    endpoint_list(towards, &host, &cfg.advertise_cidrs, port)
}

/// [`local_endpoints`] without the system calls.
fn endpoint_list(
    towards: Option<IpAddr>,
    host: &[IpAddr],
    advertised: &[IpNet],
    port: u16,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let candidates = towards.into_iter().chain(host.iter().copied());
    for ip in candidates.map(|ip| ip.to_canonical()) {
        let ep = SocketAddr::new(ip, port);
        if !sysinfo::usable_underlay(ip)
            || advertised.iter().any(|n| n.contains(&ip))
            || out.contains(&ep)
        {
            continue;
        }
        out.push(ep);
    }
    out.truncate(crate::coord::limits::MAX_ENDPOINTS);
    out
}

/// What the route guard protects on this host now: the addresses and connected
/// prefixes of every interface but the mesh's own, and each coordinator address.
/// With `--use-exit-node` the chosen exit's default routes may pass (the mesh core
/// gives them to that exit only).
fn route_guard(interface: &str, coordinators: &[SocketAddr], use_exit: bool) -> RouteGuard {
    RouteGuard::new(
        sysinfo::underlay_prefixes(interface)
            .into_iter()
            .chain(coordinators.iter().map(|a| IpNet::from(a.ip()))),
    )
    .allowing_default(use_exit)
}

/// Everything `join` needs of this host, checked before the coordinator hears of
/// the device (so a failure leaves no device registered): the TUN interface can be
/// created under its name (kernel mode), the WireGuard port is free, and `nft` runs
/// where a subnet router needs it. The state dir was written already.
fn preflight(cfg: &JoinConfig, listen_port: u16) -> Result<(), JoinError> {
    if cfg.userspace.is_none() {
        tun::preflight(&cfg.interface)?;
    }
    udp::bind(listen_port).map_err(|source| JoinError::Udp {
        port: listen_port,
        source,
    })?;
    if iface::router_table(cfg) {
        nft::check()?;
    }
    if subnet_router(cfg) {
        let v4 = cfg.advertise_cidrs.iter().any(|c| c.addr().is_ipv4());
        let v6 = cfg.advertise_cidrs.iter().any(|c| c.addr().is_ipv6());
        sysinfo::ForwardingSwitch::new().check(v4, v6 && sysinfo::ipv6_supported(None))?;
    }
    Ok(())
}

/// A kernel-mode node advertising prefixes: it forwards to them.
fn subnet_router(cfg: &JoinConfig) -> bool {
    cfg.userspace.is_none() && !cfg.advertise_cidrs.is_empty()
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
    let endpoints = local_endpoints(&cfg, &addrs, state.listen_port);
    tracing::info!(ipv6, ?endpoints, "host checked");
    preflight(&cfg, state.listen_port)?;
    // Held for the whole run: dropping it puts the host's forwarding back.
    let (uplinks, _exit_forwarding) = exit::prepare(&cfg, ipv6)?;
    let mut exits = exit::Exits::begin(&cfg, &addrs, state.listen_port)?;

    let ctx = Ctx {
        cfg: &cfg,
        coordinators: std::sync::Mutex::new(crate::node::coordinators::Coordinators::new(
            addrs.clone(),
        )),
        clone_refused_since: std::sync::Mutex::new(None),
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
    exits.up(&cfg, &device, ipv6, &uplinks)?;

    let (names_tx, names) = tokio::sync::watch::channel(Arc::new(NameTable::default()));
    let iface::Up {
        datapath,
        stack,
        v6,
        stun_answers,
    } = iface::start(
        &cfg,
        &device,
        ipv6,
        state.listen_port,
        private,
        &uplinks,
        &names,
    )?;
    // Mesh DNS on our tunnel addresses (TUN mode; rootless nodes resolve names in
    // their SOCKS5 server instead), and the host's resolver pointed at it.
    let resolver = match cfg.userspace {
        None => {
            let addrs: Vec<IpAddr> = std::iter::once(IpAddr::V4(device.tunnel_ip))
                .chain(v6.map(|(a, _)| IpAddr::V6(a)))
                .collect();
            match dns::Resolver::start(&addrs, dns::PORT, names.clone()) {
                Ok(r) => Some(r),
                // Another DNS server holding the port: the mesh works without names.
                Err(e) => {
                    tracing::warn!(error = %e, ?addrs, "cannot answer mesh DNS on the tunnel addresses, port 53; names are not answered here");
                    None
                }
            }
        }
        Some(_) => None,
    };
    let split_dns = match (&cfg.dns, cfg.userspace.is_none()) {
        (true, true) if resolver.is_some() => {
            dns::SplitDns::install(&cfg.interface, device.tunnel_ip, &device.domain)
        }
        (true, true) => {
            tracing::warn!(
                "--dns: no mesh DNS here, so the host's DNS settings are left unchanged"
            );
            None
        }
        (true, false) => {
            tracing::warn!(
                "--dns is for TUN mode: in rootless mode use the SOCKS5 server (socks5h://) for mesh names"
            );
            None
        }
        (false, _) => None,
    };
    let datapath = Arc::new(datapath);
    let routes = match cfg.userspace {
        None => Some(
            apply::RouteApplier::kernel(cfg.interface.clone(), cfg.use_exit_node.is_some())
                .map_err(JoinError::Routes)?,
        ),
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
            underlay_v4: ctx.endpoints.iter().any(SocketAddr::is_ipv4),
            underlay_v6: ctx.endpoints.iter().any(SocketAddr::is_ipv6),
            org_v4: device.organization_prefix,
            org_v6: device.organization_prefix_v6,
        },
        cfg.relay_only,
        client.remote_address(),
    );
    let guard = || route_guard(&cfg.interface, &ctx.addrs, cfg.use_exit_node.is_some());
    agent.set_route_guard(guard());
    agent.set_coordinators(&ctx.addrs);
    agent.set_exit(cfg.use_exit_node.clone());
    let (view_tx, view) = tokio::sync::watch::channel(agent.view());
    let (updates_tx, updates) = tokio::sync::watch::channel(None);
    let (events_tx, events) = tokio::sync::mpsc::channel(64);

    let paths = control::PathSource {
        view: view.clone(),
        datapath: datapath.clone(),
    };
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
        names: names_tx,
        // A subnet router forwards once its prefixes are in effect; what was there
        // before comes back when the driver is dropped, on every return path.
        forwarding: subnet_router(&cfg).then(|| driver::Forwarding {
            switch: sysinfo::ForwardingSwitch::new(),
            device_id: device.id,
            ipv6: v6.is_some(),
        }),
    };
    let result = tokio::select! {
        r = control::run(&ctx, client, auth, events_tx, updates, paths) => r,
        () = driver.run() => Ok(()),
        () = &mut shutdown => Ok(()),
    };
    sockets.stop(&cfg).await;
    // While the interface still exists.
    drop(split_dns);
    drop(resolver);
    // Dropping the last handle stops the data-path thread, which closes the TUN
    // device: the interface and all its routes disappear.
    drop(datapath);
    if iface::router_table(&cfg)
        && let Err(e) = nft::remove_router(&cfg.interface)
    {
        tracing::warn!(error = %e, "could not remove the subnet router's nftables table");
    }
    match &result {
        // Not registered any more: say only what happened here.
        Err(JoinError::Removed) => tracing::info!(interface = %cfg.interface, "interface removed"),
        _ => {
            tracing::info!(interface = %cfg.interface, "interface removed; device stays registered")
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_list_both_families_but_not_link_local_or_advertised_lans() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let host = [
            ip("198.51.100.1"),
            ip("203.0.113.5"),
            ip("fe80::1"),
            ip("2001:db8::5"),
            ip("fd00::5"),
            ip("2001:db8:100::1"),
            ip("127.0.0.1"),
        ];
        let lans: Vec<IpNet> = vec![
            "198.51.100.0/24".parse().unwrap(),
            "2001:db8:100::/64".parse().unwrap(),
        ];
        let got: Vec<String> = endpoint_list(Some(ip("203.0.113.5")), &host, &lans, 51820)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "203.0.113.5:51820",
                "[2001:db8::5]:51820",
                "[fd00::5]:51820"
            ]
        );
        // A v6-only host that reached its coordinator over v6.
        let got = endpoint_list(Some(ip("2001:db8::5")), &host[3..4], &[], 1);
        assert_eq!(got, [SocketAddr::new(ip("2001:db8::5"), 1)]);
    }

    #[test]
    fn coordinator_addresses_parse_or_say_what_is_wrong() {
        let one = |e: &str| resolve(&[e.to_string()]);
        assert_eq!(
            one("127.0.0.1").unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 4443))]
        );
        assert_eq!(
            one("127.0.0.1:5000").unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 5000))]
        );
        assert_eq!(one("[::1]:7").unwrap()[0].to_string(), "[::1]:7");
        assert_eq!(one("[::1]").unwrap()[0].to_string(), "[::1]:4443");
        assert_eq!(one("::1").unwrap()[0].to_string(), "[::1]:4443");
        assert_eq!(one("localhost:9").unwrap()[0].port(), 9);
        for bad in ["127.0.0.1:x", "host:99999", "a b", "[::1]x", ":4443"] {
            assert_eq!(
                one(bad).unwrap_err().to_string(),
                format!("bad coordinator address {bad:?}: expected HOST:PORT or HOST")
            );
        }
    }

    #[test]
    fn token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "  nx1.abc\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            read_token_file(&p).unwrap_err().to_string(),
            format!(
                "token file {} can be read by group or others (mode 0644); restrict it: chmod 600 {}",
                p.display(),
                p.display()
            )
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "nx1.abc");
        std::fs::write(&p, "\n").unwrap();
        assert_eq!(
            read_token_file(&p).unwrap_err().to_string(),
            format!("token file {} is empty", p.display())
        );
        assert!(matches!(
            read_token_file(&dir.path().join("none")),
            Err(JoinError::TokenFile { .. })
        ));
    }
}
