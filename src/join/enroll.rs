//! Getting a control connection: connect to the first coordinator that answers,
//! register with the join token or log in with the stored credential, and bring the
//! coordinator's record of this device (endpoints, prefixes, roles) up to date.
//!
//! It keeps no connection alive and follows no watch stream: `control` does.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::client::{ClientError, ControlClient};
use crate::coord::token::JoinToken;
use crate::node::coordinators::{ATTEMPT_DELAY, Coordinators, Race};
use crate::wire::control::{
    Auth, Device, DeviceUpdate, ErrorCode, RegisterRequest, Request, Response,
};

use super::state::NodeState;
use super::{JoinConfig, JoinError};

pub(super) struct Enrolled {
    pub client: ControlClient,
    pub device: Device,
    pub auth: Auth,
}

/// Connects to the first coordinator that answers: the listed ones raced Happy
/// Eyeballs style (`node::coordinators`), the last one that answered first.
pub(super) async fn connect(
    coordinators: &Mutex<Coordinators>,
    fp: [u8; 32],
) -> Result<ControlClient, ClientError> {
    let mut last = None;
    let mut order = lock(coordinators).order();
    // A family this host cannot reach (no address or route of it, e.g. IPv6 on a
    // v4-only host) is skipped at once rather than after a handshake timeout.
    order.retain(|&a| {
        let routable = crate::io::udp::local_address_towards(a).is_some();
        if !routable {
            tracing::debug!(coordinator = %a, "no route to this address family here; skipped");
            last = Some(ClientError::Unroutable(a));
        }
        routable
    });
    let mut race = Race::new(order);
    let mut attempts = tokio::task::JoinSet::new();
    let start = |attempts: &mut tokio::task::JoinSet<_>, a: SocketAddr| {
        attempts.spawn(async move { (a, ControlClient::connect(a, fp).await) });
    };
    if let Some(a) = race.start_next() {
        start(&mut attempts, a);
    }
    while !race.exhausted() {
        tokio::select! {
            Some(joined) = attempts.join_next() => match joined {
                Ok((a, Ok(c))) => {
                    lock(coordinators).succeeded(a);
                    // The other attempts end with the set.
                    return Ok(c);
                }
                Ok((a, Err(e))) => {
                    tracing::debug!(coordinator = %a, error = %e, "coordinator unreachable");
                    last = Some(e);
                    if let Some(n) = race.failed() {
                        start(&mut attempts, n);
                    }
                }
                Err(_) => {
                    if let Some(n) = race.failed() {
                        start(&mut attempts, n);
                    }
                }
            },
            () = tokio::time::sleep(ATTEMPT_DELAY), if race.has_next() => {
                if let Some(n) = race.start_next() {
                    start(&mut attempts, n);
                }
            }
            else => break,
        }
    }
    Err(last.unwrap_or(ClientError::NoAnswer))
}

fn lock(c: &Mutex<Coordinators>) -> std::sync::MutexGuard<'_, Coordinators> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// This node process's random id, sent with its logins and watch streams: the
/// coordinator refuses a second process with the same credential (a copy of this
/// state directory on another host) while this one is connected.
pub(super) fn instance() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(rand::random)
}

/// How long "device already connected" refusals go on before the node gives up:
/// longer than the coordinator takes to notice that a connection died (this node's
/// own, before a restart: the control connection's idle timeout).
const CLONE_GRACE: Duration = Duration::from_secs(12);

/// A "device already connected from …" refusal: retried (`Ok`) until it has lasted
/// [`CLONE_GRACE`], then the node stops with the coordinator's words.
fn refused_as_clone(ctx: &Ctx<'_>, message: String) -> Result<ClientError, JoinError> {
    let mut since = ctx
        .clone_refused_since
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let first = *since.get_or_insert_with(|| {
        tracing::warn!(%message, "the coordinator refuses this device's credential for now");
        Instant::now()
    });
    if first.elapsed() >= CLONE_GRACE {
        return Err(JoinError::Refused(message));
    }
    Ok(ClientError::Refused {
        code: ErrorCode::Conflict,
        message,
    })
}

fn accepted(ctx: &Ctx<'_>) {
    *ctx.clone_refused_since
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = None;
}

/// What the node knows before it enrolls.
pub(super) struct Ctx<'a> {
    pub cfg: &'a JoinConfig,
    pub addrs: Vec<SocketAddr>,
    /// The same addresses, with the one that answered last.
    pub coordinators: Mutex<Coordinators>,
    /// Since when the coordinator refuses us as a second live copy of this device.
    pub clone_refused_since: Mutex<Option<Instant>>,
    pub token: Option<JoinToken>,
    pub fp: [u8; 32],
    pub ipv6: bool,
    pub endpoints: Vec<SocketAddr>,
    pub public_key: String,
}

/// Registers or logs in. Transport failures are `Ok(Err(_))` (retry); refusals that
/// no retry can fix are `Err(_)`.
pub(super) async fn enroll(
    ctx: &Ctx<'_>,
    state: &mut NodeState,
) -> Result<Result<Enrolled, ClientError>, JoinError> {
    let Ctx {
        cfg,
        ref token,
        fp,
        ipv6,
        ref endpoints,
        ref public_key,
        ..
    } = *ctx;
    let client = match connect(&ctx.coordinators, fp).await {
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
                instance: Some(instance()),
            })
            .await
        {
            Ok(Response::Device { device }) => {
                accepted(ctx);
                return Ok(Ok(Enrolled {
                    client,
                    device,
                    auth,
                }));
            }
            Ok(other) => return Ok(Err(ClientError::Unexpected(format!("{other:?}")))),
            Err(ClientError::Refused {
                code: ErrorCode::Conflict,
                message,
            }) => return refused_as_clone(ctx, message).map(Err),
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
        exit_node: cfg.exit_node,
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

/// Tells the coordinator our endpoints, prefixes and roles if its record differs;
/// returns the record to go on with.
pub(super) async fn sync_registration(
    ctx: &Ctx<'_>,
    client: &ControlClient,
    auth: &Auth,
    device: Device,
) -> Result<Device, JoinError> {
    let cfg = ctx.cfg;
    if device.endpoints != ctx.endpoints
        || device.advertise_cidrs != cfg.advertise_cidrs
        || device.relay != cfg.relay
        || device.relay_only != cfg.relay_only
        || device.exit_node != cfg.exit_node
    {
        let update = DeviceUpdate {
            endpoints: Some(ctx.endpoints.clone()),
            advertise_cidrs: Some(cfg.advertise_cidrs.clone()),
            relay: Some(cfg.relay),
            relay_only: Some(cfg.relay_only),
            exit_node: Some(cfg.exit_node),
            ..Default::default()
        };
        match client
            .call(&Request::Update {
                auth: auth.clone(),
                update,
            })
            .await
        {
            Ok(Response::Device { device: d }) => return Ok(d),
            Ok(_) => {}
            Err(ClientError::Refused { message, .. }) => return Err(JoinError::Refused(message)),
            Err(e) => tracing::warn!(error = %e, "could not update endpoints"),
        }
    }
    Ok(device)
}

/// Logs in again after the control connection was lost. `Err(_)`: the coordinator
/// forgot this device; `Ok(Err(_))`: try again later.
pub(super) async fn relogin(
    ctx: &Ctx<'_>,
    auth: &Auth,
) -> Result<Result<ControlClient, ClientError>, JoinError> {
    let c = match connect(&ctx.coordinators, ctx.fp).await {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    match c
        .call(&Request::Login {
            auth: auth.clone(),
            ipv6_supported: Some(ctx.ipv6),
            instance: Some(instance()),
        })
        .await
    {
        Ok(_) => {
            accepted(ctx);
            Ok(Ok(c))
        }
        Err(ClientError::Refused {
            code: ErrorCode::Conflict,
            message,
        }) => refused_as_clone(ctx, message).map(Err),
        Err(ClientError::Refused {
            code: ErrorCode::Unauthorized,
            ..
        }) => Err(JoinError::Forgotten),
        Err(e) => {
            tracing::debug!(error = %e, "login failed");
            Ok(Err(e))
        }
    }
}
