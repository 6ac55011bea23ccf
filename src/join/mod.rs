//! `nexodus join`: the node shell.
//!
//! Enrolls with the coordinator (register with the join token, or log in with the
//! stored credential), creates the TUN interface and the UDP socket, starts the
//! data-path thread, then follows the coordinator's watch stream: every snapshot or
//! delta goes through [`MeshState`], and only the resulting changes reach the data
//! plane and the kernel routes. If the coordinator goes away the data path keeps
//! running on the last known peers while the control loop reconnects with backoff.

pub mod datapath;
pub mod state;
pub mod status;
pub mod uapi;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::RngCore;
use thiserror::Error;

use crate::client::{ClientError, ControlClient};
use crate::coord::keys;
use crate::coord::token::{JoinToken, TokenError, hex};
use crate::io::{nft, route, sysinfo, tun, udp};
use crate::node::dataplane::{DataPlane, PeerConfig};
use crate::node::mesh::{Action, LocalView, MeshState, Path};
use crate::node::nat;
use crate::wire::control::{
    Auth, Device, DeviceUpdate, ErrorCode, RegisterRequest, Request, Response,
};
use datapath::{Command, DataPath, DataPathConfig, StunAnswer};
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
    #[error("cannot open the status socket: {0}")]
    StatusSocket(std::io::Error),
    #[error(transparent)]
    Forwarding(#[from] sysinfo::ForwardingError),
    #[error(transparent)]
    Masquerade(#[from] nft::NftError),
    #[error(transparent)]
    Userspace(#[from] crate::userspace::UserspaceError),
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

/// What the status socket reports and the control loop maintains.
struct Shared {
    device: Device,
    mesh: MeshState,
    connected: bool,
    listen_port: u16,
    /// The coordinator's STUN port, from the last snapshot.
    stun_port: Option<u16>,
    /// The coordinator address the control connection uses (STUN goes there too).
    coordinator: SocketAddr,
    /// The NAT mapping last learned by STUN.
    mapping: Option<nat::Mapping>,
    /// The userspace stack in rootless mode.
    stack: Option<Arc<crate::userspace::Stack>>,
}

struct Enrolled {
    client: ControlClient,
    device: Device,
    auth: Auth,
}

/// Connects to the first coordinator that answers.
async fn connect(addrs: &[SocketAddr], fp: [u8; 32]) -> Result<ControlClient, ClientError> {
    let mut last = None;
    for &a in addrs {
        match ControlClient::connect(a, fp).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::debug!(coordinator = %a, error = %e, "coordinator unreachable");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(ClientError::NoAnswer))
}

/// What the node knows before it enrolls.
struct Ctx<'a> {
    cfg: &'a JoinConfig,
    addrs: Vec<SocketAddr>,
    token: Option<JoinToken>,
    fp: [u8; 32],
    ipv6: bool,
    endpoints: Vec<SocketAddr>,
    public_key: String,
    iface: Iface,
}

/// Registers or logs in. Transport failures are `Ok(Err(_))` (retry); refusals that
/// no retry can fix are `Err(_)`.
async fn enroll(
    ctx: &Ctx<'_>,
    state: &mut NodeState,
) -> Result<Result<Enrolled, ClientError>, JoinError> {
    let Ctx {
        cfg,
        ref addrs,
        ref token,
        fp,
        ipv6,
        ref endpoints,
        ref public_key,
        ..
    } = *ctx;
    let client = match connect(addrs, fp).await {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    if let (Some(device_id), Some(credential)) = (state.device_id, state.credential.clone()) {
        let auth = Auth {
            device_id,
            credential,
        };
        match client
            .call(&Request::Login {
                auth: auth.clone(),
                ipv6_supported: Some(ipv6),
            })
            .await
        {
            Ok(Response::Device { device }) => {
                return Ok(Ok(Enrolled {
                    client,
                    device,
                    auth,
                }));
            }
            Ok(other) => return Ok(Err(ClientError::Unexpected(format!("{other:?}")))),
            Err(ClientError::Refused {
                code: ErrorCode::Unauthorized,
                ..
            }) => {
                if token.is_none() {
                    return Err(JoinError::Forgotten);
                }
                tracing::warn!(
                    "the coordinator no longer knows this device; registering again with the token"
                );
                state.device_id = None;
                state.credential = None;
                state.save(&cfg.state_dir)?;
            }
            Err(e) => return Ok(Err(e)),
        }
    }
    let token = token.as_ref().ok_or(JoinError::NoToken)?;
    let hostname = cfg.hostname.clone().unwrap_or_else(hostname);
    let req = RegisterRequest {
        token_secret: token.secret_text(),
        public_key: public_key.clone(),
        hostname,
        os: std::env::consts::OS.into(),
        ipv6_supported: ipv6,
        endpoints: endpoints.clone(),
        advertise_cidrs: cfg.advertise_cidrs.clone(),
        relay: cfg.relay,
        relay_only: cfg.relay_only,
        symmetric_nat: false,
        request_ip: cfg.request_ips.iter().find_map(|a| match a {
            IpAddr::V4(v) => Some(*v),
            IpAddr::V6(_) => None,
        }),
        request_ip_v6: cfg.request_ips.iter().find_map(|a| match a {
            IpAddr::V6(v) => Some(*v),
            IpAddr::V4(_) => None,
        }),
    };
    match client.call(&Request::Register(req)).await {
        Ok(Response::Registered { device, credential }) => {
            state.device_id = Some(device.id);
            state.credential = Some(credential.clone());
            state.save(&cfg.state_dir)?;
            tracing::info!(
                id = device.id,
                tunnel_ip = %device.tunnel_ip,
                tunnel_ip_v6 = ?device.tunnel_ip_v6,
                "registered with the coordinator"
            );
            let auth = Auth {
                device_id: device.id,
                credential,
            };
            Ok(Ok(Enrolled {
                client,
                device,
                auth,
            }))
        }
        Ok(other) => Ok(Err(ClientError::Unexpected(format!("{other:?}")))),
        Err(ClientError::Refused { message, .. }) => Err(JoinError::Refused(message)),
        Err(e) => Ok(Err(e)),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// Runs the node until `shutdown` resolves or an unrecoverable error.
pub async fn run(
    cfg: JoinConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), JoinError> {
    let addrs = resolve(&cfg.coordinators)?;
    let token = cfg.token.as_deref().map(JoinToken::parse).transpose()?;
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
        iface: Iface {
            name: cfg.interface.clone(),
            keepalive: cfg.keepalive,
            kernel_routes: cfg.userspace.is_none(),
        },
    };
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(250);
    let enrolled = loop {
        let attempt = enroll(&ctx, &mut state);
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
        mut device,
        auth,
    } = enrolled;

    // Keep the coordinator's view of our endpoints, prefixes and roles current.
    if device.endpoints != ctx.endpoints
        || device.advertise_cidrs != cfg.advertise_cidrs
        || device.relay != cfg.relay
        || device.relay_only != cfg.relay_only
    {
        let update = DeviceUpdate {
            endpoints: Some(ctx.endpoints.clone()),
            advertise_cidrs: Some(cfg.advertise_cidrs.clone()),
            relay: Some(cfg.relay),
            relay_only: Some(cfg.relay_only),
            ..Default::default()
        };
        match client
            .call(&Request::Update {
                auth: auth.clone(),
                update,
            })
            .await
        {
            Ok(Response::Device { device: d }) => device = d,
            Ok(_) => {}
            Err(ClientError::Refused { message, .. }) => return Err(JoinError::Refused(message)),
            Err(e) => tracing::warn!(error = %e, "could not update endpoints"),
        }
    }

    let v6 = device
        .tunnel_ip_v6
        .filter(|_| ipv6)
        .map(|a| (a, device.organization_prefix_v6.prefix_len()));
    if cfg.masquerade {
        nft::install_masquerade(
            &cfg.interface,
            device.organization_prefix,
            v6.map(|_| device.organization_prefix_v6),
        )?;
        tracing::info!("masquerading mesh traffic to the advertised prefixes");
    }
    let (packets, stack) = match &cfg.userspace {
        None => {
            let dev = tun::create(&cfg.interface, tun::DEFAULT_MTU, device.tunnel_ip, v6)?;
            (tun::PacketDevice::Tun(dev), None)
        }
        Some(us) => {
            let (ours, theirs) =
                std::os::unix::net::UnixDatagram::pair().map_err(JoinError::DataPath)?;
            ours.set_nonblocking(true).map_err(JoinError::DataPath)?;
            // Room for bursts towards the stack (capped by net.core.wmem_max).
            let _ = socket2::SockRef::from(&ours).set_send_buffer_size(4 << 20);
            let stack = crate::userspace::Stack::start(
                us.clone(),
                theirs,
                device.tunnel_ip,
                v6.map(|(a, _)| a),
                tun::DEFAULT_MTU,
            )?;
            (tun::PacketDevice::Pipe(ours), Some(Arc::new(stack)))
        }
    };
    let socket = udp::bind(state.listen_port).map_err(|source| JoinError::Udp {
        port: state.listen_port,
        source,
    })?;
    let (stun_tx, stun_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut dataplane = DataPlane::new(private);
    dataplane.set_mtu(usize::from(tun::DEFAULT_MTU));
    let datapath = DataPath::spawn(
        dataplane,
        packets,
        socket,
        DataPathConfig {
            relay: cfg.relay,
            stun_answers: stun_tx,
        },
    )
    .map_err(JoinError::DataPath)?;
    tracing::info!(
        interface = %if stack.is_some() { "userspace" } else { &cfg.interface },
        tunnel_ip = %device.tunnel_ip,
        tunnel_ip_v6 = ?v6.map(|(a, _)| a),
        listen_port = state.listen_port,
        "interface up"
    );

    let shared = Arc::new(Mutex::new(Shared {
        mesh: MeshState::new(LocalView {
            device_id: device.id,
            ipv6: v6.is_some(),
            relay: cfg.relay,
            spoke: cfg.relay_only,
            reflexive: None,
            org_v4: device.organization_prefix,
            org_v6: device.organization_prefix_v6,
        }),
        device,
        connected: true,
        listen_port: state.listen_port,
        stun_port: None,
        coordinator: client.remote_address(),
        mapping: None,
        stack: stack.clone(),
    }));
    let datapath = Arc::new(datapath);
    let listener = status::bind(&cfg.state_dir).map_err(JoinError::StatusSocket)?;
    let mapping_changed = Arc::new(tokio::sync::Notify::new());
    let uapi_listener = match uapi::bind(&cfg.interface).await {
        _ if stack.is_some() => None,
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "no WireGuard UAPI socket; `wg show` will not see this node");
            None
        }
    };
    let mut tasks = vec![
        tokio::spawn(serve_status(listener, shared.clone(), datapath.clone())),
        tokio::spawn(watch_paths(
            shared.clone(),
            datapath.clone(),
            ctx.iface.clone(),
        )),
        tokio::spawn(probe_nat(
            shared.clone(),
            datapath.clone(),
            stun_rx,
            mapping_changed.clone(),
            ctx.iface.clone(),
            cfg.relay_only,
        )),
    ];
    let uapi_bound = uapi_listener.is_some();
    if let Some(l) = uapi_listener {
        tasks.push(tokio::spawn(serve_uapi(
            l,
            shared.clone(),
            datapath.clone(),
            private,
            cfg.keepalive,
        )));
    }

    let control = control_loop(
        &ctx,
        client,
        auth,
        shared.clone(),
        datapath.clone(),
        mapping_changed,
    );
    let result = tokio::select! {
        r = control => r,
        () = &mut shutdown => Ok(()),
    };
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    let _ = std::fs::remove_file(status::socket_path(&cfg.state_dir));
    if uapi_bound {
        let _ = std::fs::remove_file(uapi::socket_path(&cfg.interface));
    }
    // Dropping the last handle stops the data-path thread, which closes the TUN
    // device: the interface and all its routes disappear.
    drop(datapath);
    if cfg.masquerade
        && let Err(e) = nft::remove_masquerade(&cfg.interface)
    {
        tracing::warn!(error = %e, "could not remove the masquerade table");
    }
    tracing::info!(interface = %cfg.interface, "interface removed; device stays registered");
    result
}

async fn serve_uapi(
    listener: tokio::net::UnixListener,
    shared: Arc<Mutex<Shared>>,
    datapath: Arc<DataPath>,
    private_key: [u8; 32],
    keepalive: u16,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let dp = datapath.status().await;
        let answer = {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            let peers: Vec<uapi::UapiPeer> = dp
                .iter()
                .flat_map(|d| d.peers.iter())
                .filter_map(|(id, st)| {
                    let plan = s.mesh.plan(*id)?;
                    Some(uapi::UapiPeer {
                        public_key: plan.public_key,
                        endpoint: st.endpoint,
                        allowed_ips: plan.allowed_ips.clone(),
                        last_handshake: st.last_handshake,
                        rx_bytes: st.rx_bytes,
                        tx_bytes: st.tx_bytes,
                        persistent_keepalive: keepalive,
                    })
                })
                .collect();
            uapi::render_get(
                &private_key,
                s.listen_port,
                &peers,
                std::time::SystemTime::now(),
            )
        };
        if let Err(e) = uapi::serve_one(stream, || answer).await {
            tracing::debug!(error = %e, "UAPI client went away");
        }
    }
}

async fn serve_status(
    listener: tokio::net::UnixListener,
    shared: Arc<Mutex<Shared>>,
    datapath: Arc<DataPath>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let dp = datapath.status().await;
        let report = {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            build_status(&s, dp.as_ref())
        };
        if let Err(e) = status::answer(stream, &report).await {
            tracing::debug!(error = %e, "status client went away");
        }
    }
}

fn build_status(s: &Shared, dp: Option<&datapath::DataPathStatus>) -> status::Status {
    let stats: BTreeMap<i64, _> = dp
        .map(|d| d.peers.iter().copied().collect())
        .unwrap_or_default();
    let relay = s.mesh.relay_id().and_then(|r| stats.get(&r));
    let peers = s
        .mesh
        .paths()
        .into_iter()
        .map(|(d, path)| {
            let plan = s.mesh.plan(d.id);
            let (st, path_name) = match path {
                Path::Direct => (stats.get(&d.id), "direct"),
                Path::Relay => (relay, "relay"),
                Path::None => (None, "none"),
            };
            let allowed_ips = match plan {
                Some(p) if path == Path::Direct => p.allowed_ips.clone(),
                _ => std::iter::once(IpNet::V4(d.tunnel_ip.into()))
                    .chain(d.tunnel_ip_v6.map(|a| IpNet::V6(a.into())))
                    .collect(),
            };
            let own_bytes = path == Path::Direct;
            status::PeerStatus {
                id: d.id,
                hostname: d.hostname.clone(),
                public_key: d.public_key.clone(),
                tunnel_ip: d.tunnel_ip,
                tunnel_ip_v6: d.tunnel_ip_v6,
                allowed_ips,
                endpoint: st
                    .and_then(|s| s.endpoint)
                    .or(plan.and_then(|p| p.endpoint)),
                path: path_name.into(),
                last_handshake_secs: st.and_then(|s| s.last_handshake).map(|d| d.as_secs()),
                rx_bytes: st.filter(|_| own_bytes).map_or(0, |s| s.rx_bytes),
                tx_bytes: st.filter(|_| own_bytes).map_or(0, |s| s.tx_bytes),
            }
        })
        .collect();
    let mut drops = BTreeMap::new();
    if let Some(d) = dp {
        let c = &d.counters;
        for (name, v) in [
            ("no_route", c.no_route),
            ("no_endpoint", c.no_endpoint),
            ("malformed", c.malformed),
            ("bad_source", c.bad_source),
            ("unknown_peer", c.unknown_peer),
            ("decrypt", c.decrypt),
            ("replay", c.replay),
            ("bad_mac", c.bad_mac),
            ("handshake", c.handshake),
            ("io", d.io_drops),
        ] {
            if v > 0 {
                drops.insert(name.to_string(), v);
            }
        }
    }
    status::Status {
        device: status::DeviceStatus {
            id: s.device.id,
            hostname: s.device.hostname.clone(),
            public_key: s.device.public_key.clone(),
            tunnel_ip: s.device.tunnel_ip,
            tunnel_ip_v6: s.device.tunnel_ip_v6.filter(|_| s.device.ipv6_supported),
            ipv6_supported: s.device.ipv6_supported,
            listen_port: s.listen_port,
        },
        coordinator_connected: s.connected,
        relay: s.mesh.local().relay,
        relayed_packets: dp.map_or(0, |d| d.relayed_packets),
        relayed_bytes: dp.map_or(0, |d| d.relayed_bytes),
        cookie_replies: dp.map_or(0, |d| d.counters.cookie_replies),
        userspace: s.stack.as_ref().map(|st| st.status()),
        peers,
        drops,
    }
}

/// Applies mesh changes to the data plane and the kernel.
/// The interface name and settings peers are installed with.
#[derive(Debug, Clone)]
struct Iface {
    name: String,
    keepalive: u16,
    /// Routes go into the kernel (not in rootless mode, where the data path's own
    /// table is the only one).
    kernel_routes: bool,
}

async fn apply(actions: Vec<Action>, iface: &Iface, datapath: &DataPath) {
    let mut routes = Vec::new();
    for a in actions {
        match a {
            Action::UpsertPeer(plan) => {
                tracing::info!(peer = plan.id, hostname = %plan.hostname, endpoint = ?plan.endpoint, allowed_ips = ?plan.allowed_ips, "peer installed");
                datapath.send(Command::Upsert(
                    plan.id,
                    PeerConfig {
                        public_key: plan.public_key,
                        endpoint: plan.endpoint,
                        allowed_ips: plan.allowed_ips,
                        persistent_keepalive: Some(iface.keepalive),
                    },
                ));
            }
            Action::RemovePeer(id) => {
                tracing::info!(peer = id, "peer removed");
                datapath.send(Command::Remove(id));
            }
            other => routes.push(other),
        }
    }
    if routes.is_empty() || !iface.kernel_routes {
        return;
    }
    let interface = iface.name.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for r in routes {
            let result = match r {
                Action::AddRoute(net) => route::add(&interface, net),
                Action::RemoveRoute(net) => route::remove(&interface, net),
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "route change failed");
            }
        }
    })
    .await;
}

enum WatchEnd {
    Lost(ClientError),
    Removed,
}

async fn watch(
    client: &ControlClient,
    auth: &Auth,
    iface: &Iface,
    shared: &Mutex<Shared>,
    datapath: &DataPath,
    mapping_changed: &tokio::sync::Notify,
) -> WatchEnd {
    let mut w = match client.watch(auth.clone()).await {
        Ok(w) => w,
        Err(e) => return WatchEnd::Lost(e),
    };
    loop {
        let msg = match w.next().await {
            Ok(Some(m)) => m,
            Ok(None) => return WatchEnd::Lost(ClientError::NoAnswer),
            Err(e) => return WatchEnd::Lost(e),
        };
        let actions = {
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            s.connected = true;
            match msg {
                Response::Snapshot {
                    devices,
                    revision,
                    stun_port,
                } => {
                    tracing::info!(revision, devices = devices.len(), "peer snapshot");
                    if let Some(me) = devices.iter().find(|d| d.id == s.device.id) {
                        s.device = me.clone();
                    }
                    s.stun_port = stun_port;
                    s.coordinator = client.remote_address();
                    // The coordinator may have missed our last mapping while we were away.
                    mapping_changed.notify_one();
                    s.mesh.apply_snapshot(&devices, Instant::now())
                }
                Response::Delta {
                    upserts, removed, ..
                } => {
                    if removed.contains(&s.device.id) {
                        return WatchEnd::Removed;
                    }
                    if let Some(me) = upserts.iter().find(|d| d.id == s.device.id) {
                        s.device = me.clone();
                    }
                    s.mesh.apply_delta(&upserts, &removed, Instant::now())
                }
                other => {
                    tracing::warn!(?other, "unexpected message on the watch stream");
                    Vec::new()
                }
            }
        };
        apply(actions, iface, datapath).await;
    }
}

/// Tells the coordinator our NAT mapping whenever it differs from what it has.
async fn push_mapping(
    client: &ControlClient,
    auth: &Auth,
    shared: &Mutex<Shared>,
    mapping_changed: &tokio::sync::Notify,
) {
    loop {
        mapping_changed.notified().await;
        let update = {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            let Some(m) = s.mapping else { continue };
            if s.device.reflexive_endpoint == Some(m.reflexive)
                && s.device.symmetric_nat == m.symmetric
            {
                continue;
            }
            DeviceUpdate {
                reflexive_endpoint: Some(m.reflexive),
                symmetric_nat: Some(m.symmetric),
                ..Default::default()
            }
        };
        let req = Request::Update {
            auth: auth.clone(),
            update,
        };
        match client.call(&req).await {
            Ok(Response::Device { device }) => {
                shared.lock().unwrap_or_else(|e| e.into_inner()).device = device;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not report the NAT mapping"),
        }
    }
}

/// Learns the NAT mapping of the WireGuard port by STUN, at start and every
/// [`nat::PROBE_INTERVAL_SECS`], and reacts when it changes.
async fn probe_nat(
    shared: Arc<Mutex<Shared>>,
    datapath: Arc<DataPath>,
    mut answers: tokio::sync::mpsc::UnboundedReceiver<StunAnswer>,
    mapping_changed: Arc<tokio::sync::Notify>,
    iface: Iface,
    relay_only: bool,
) {
    loop {
        let (coordinator, stun_port) = {
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            (s.coordinator, s.stun_port)
        };
        let Some(port) = stun_port else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut random = [0u8; 24];
        rand::rng().fill_bytes(&mut random);
        let mut probe = nat::Probe::new(nat::servers(coordinator, port), random);
        for _ in 0..3 {
            for (to, data) in probe.requests() {
                datapath.send(Command::SendRaw(to, data));
            }
            let deadline = tokio::time::sleep(Duration::from_secs(1));
            tokio::pin!(deadline);
            while !probe.complete() {
                tokio::select! {
                    a = answers.recv() => match a {
                        Some((txid, mapped)) => { probe.handle_response(txid, mapped); }
                        None => return,
                    },
                    () = &mut deadline => break,
                }
            }
            if probe.complete() {
                break;
            }
        }
        let actions = match probe.result() {
            Some(m) => {
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                if s.mapping == Some(m) {
                    Vec::new()
                } else {
                    tracing::info!(reflexive = %m.reflexive, symmetric = m.symmetric, "NAT mapping learned");
                    s.mapping = Some(m);
                    mapping_changed.notify_one();
                    let local = s.mesh.local();
                    s.mesh.set_local(LocalView {
                        reflexive: Some(m.reflexive),
                        spoke: relay_only || (m.symmetric && !local.relay),
                        ..local
                    })
                }
            }
            None => {
                tracing::warn!(%coordinator, port, "no STUN answer; NAT mapping unknown");
                Vec::new()
            }
        };
        apply(actions, &iface, &datapath).await;
        tokio::time::sleep(Duration::from_secs(nat::PROBE_INTERVAL_SECS)).await;
    }
}

/// Moves peers between the direct path and the relay as handshakes succeed or fail.
async fn watch_paths(shared: Arc<Mutex<Shared>>, datapath: Arc<DataPath>, iface: Iface) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(st) = datapath.status().await else {
            continue;
        };
        let actions = {
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            s.mesh.handle_handshakes(
                Instant::now(),
                st.peers.iter().map(|(id, p)| (*id, p.last_handshake)),
            )
        };
        apply(actions, &iface, &datapath).await;
    }
}

async fn control_loop(
    ctx: &Ctx<'_>,
    first: ControlClient,
    auth: Auth,
    shared: Arc<Mutex<Shared>>,
    datapath: Arc<DataPath>,
    mapping_changed: Arc<tokio::sync::Notify>,
) -> Result<(), JoinError> {
    let mut client = Some(first);
    let mut backoff = Duration::from_millis(250);
    loop {
        let c = match client.take() {
            Some(c) => c,
            None => match connect(&ctx.addrs, ctx.fp).await {
                Ok(c) => {
                    match c
                        .call(&Request::Login {
                            auth: auth.clone(),
                            ipv6_supported: Some(ctx.ipv6),
                        })
                        .await
                    {
                        Ok(_) => {
                            tracing::info!("reconnected to the coordinator");
                            backoff = Duration::from_millis(250);
                            c
                        }
                        Err(ClientError::Refused {
                            code: ErrorCode::Unauthorized,
                            ..
                        }) => return Err(JoinError::Forgotten),
                        Err(e) => {
                            tracing::debug!(error = %e, "login failed");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?backoff, "coordinator still unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let watching = watch(&c, &auth, &ctx.iface, &shared, &datapath, &mapping_changed);
        let end = tokio::select! {
            end = watching => end,
            () = push_mapping(&c, &auth, &shared, &mapping_changed) => WatchEnd::Lost(ClientError::NoAnswer),
        };
        match end {
            WatchEnd::Removed => return Err(JoinError::Removed),
            WatchEnd::Lost(e) => {
                shared.lock().unwrap_or_else(|e| e.into_inner()).connected = false;
                tracing::warn!(error = %e, "lost the coordinator; tunnels keep running, reconnecting");
            }
        }
    }
}
