//! `nexodus serve`: the coordinator shell.
//!
//! Owns the QUIC endpoint, the STUN sockets, the SQLite store (behind a mutex, used
//! from blocking threads) and the [`hub::Hub`] that pushes deltas. Request logic lives
//! in [`handler`], which has no sockets.

pub mod handler;
pub mod hub;
pub mod stun;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use thiserror::Error;

use crate::coord::token::{JoinToken, hash_secret};
use crate::identity::{Identity, IdentityError};
use crate::quicio::{self, FrameIoError};
use crate::store::{DEFAULT_ORG, Store, StoreError};
use crate::wire::control::{Auth, Device, ErrorCode, Request, Response};
use crate::wire::frame::{MAX_REQUEST_LEN, MAX_RESPONSE_LEN};
use hub::Hub;

/// How long a client may take to send its request on a new stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Validity of the join token printed on first start.
const FIRST_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub stun_listen: SocketAddr,
    pub db: PathBuf,
    pub state_dir: PathBuf,
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The coordinator's durable state, as the admin commands and `serve` open it.
pub struct CoordinatorState {
    pub store: Store,
    pub identity: Identity,
    /// True when this open created the default organization (a first start).
    pub first_start: bool,
}

/// Opens the database (creating it, with the default organization) and the TLS
/// identity (creating it) under the given paths.
pub fn open_state(db: &Path, state_dir: &Path) -> Result<CoordinatorState, ServeError> {
    crate::fsutil::ensure_private_dir(state_dir).map_err(|source| IdentityError::Io {
        path: state_dir.display().to_string(),
        source,
    })?;
    if let Some(parent) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::fsutil::ensure_private_dir(parent).map_err(|source| IdentityError::Io {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let identity = Identity::load_or_create(state_dir)?;
    let mut store = Store::open(db)?;
    let first_start = store.ensure_default_org(unix_now())?;
    Ok(CoordinatorState {
        store,
        identity,
        first_start,
    })
}

/// Creates a join token for `org` and returns its text.
pub fn create_token(
    state: &mut CoordinatorState,
    org: &str,
    reusable: bool,
    ttl: Option<Duration>,
) -> Result<String, ServeError> {
    let org = state.store.org_by_name(org)?;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = JoinToken {
        fingerprint: state.identity.fingerprint(),
        secret,
    };
    let now = unix_now();
    let expires = ttl.map(|t| now.saturating_add(i64::try_from(t.as_secs()).unwrap_or(i64::MAX)));
    state.store.create_token(
        org.id,
        &hash_secret(&token.secret_text()),
        reusable,
        expires,
        now,
    )?;
    Ok(token.to_string())
}

/// Registers a stock WireGuard device and returns its wg-quick config. With no
/// public key, a key pair is made and the private key appears in the config only.
pub fn add_unmanaged(
    state: &mut CoordinatorState,
    org: &str,
    hostname: &str,
    public_key: Option<&str>,
) -> Result<(Device, String), ServeError> {
    let org = state.store.org_by_name(org)?;
    let relay = state
        .store
        .devices(org.id)?
        .into_iter()
        .filter(|d| d.relay)
        .min_by_key(|d| d.id)
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "organization {:?} has no relay; start a node with `nexodus join --relay` first: a stock WireGuard device reaches the mesh only through it",
                org.name
            ))
        })?;
    let (public, private) = match public_key {
        Some(k) => {
            let key = crate::coord::keys::parse_public_key(k)
                .map_err(|e| StoreError::Invalid(format!("--public-key: {e}")))?;
            (crate::coord::keys::encode_key(&key), None)
        }
        None => {
            let mut secret = [0u8; 32];
            rand::rng().fill_bytes(&mut secret);
            let secret = boringtun::x25519::StaticSecret::from(secret);
            let public = boringtun::x25519::PublicKey::from(&secret);
            (
                crate::coord::keys::encode_key(public.as_bytes()),
                Some(crate::coord::keys::encode_key(&secret.to_bytes())),
            )
        }
    };
    // It never logs in: its credential is random and forgotten.
    let mut unusable = [0u8; 32];
    rand::rng().fill_bytes(&mut unusable);
    let device = state.store.add_unmanaged(
        org.id,
        hostname,
        &public,
        &hash_secret(&crate::coord::token::encode_secret(&unusable)),
        unix_now(),
    )?;
    let config = crate::coord::wgquick::render(&device, private.as_deref(), &relay);
    Ok((device, config))
}

/// Runs the coordinator until the process is stopped.
pub async fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    let mut state = open_state(&cfg.db, &cfg.state_dir)?;
    if state.first_start {
        let token = create_token(&mut state, DEFAULT_ORG, true, Some(FIRST_TOKEN_TTL))?;
        tracing::info!(
            "first start: created database {}, TLS identity and organization {DEFAULT_ORG:?}; \
             the join token below is reusable and valid for 24 hours \
             (more with `nexodus token create`)",
            cfg.db.display()
        );
        println!("{token}");
    }
    let server_config = state.identity.server_config()?;
    let reset = state.store.reset_online(unix_now())?;
    if reset > 0 {
        tracing::info!(
            devices = reset,
            "marked devices offline until they reconnect"
        );
    }
    let revision = state.store.current_revision()?;
    let store = Arc::new(Mutex::new(state.store));
    let hub = Hub::new(store.clone());
    tokio::spawn(hub.clone().run(revision));

    for addr in stun::ports(cfg.stun_listen) {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| ServeError::Listen { addr, source })?;
        tokio::spawn(stun::serve(socket));
    }

    let endpoint = quinn::Endpoint::server(server_config, cfg.listen).map_err(|source| {
        ServeError::Listen {
            addr: cfg.listen,
            source,
        }
    })?;
    tracing::info!(
        listen = %cfg.listen,
        stun = %cfg.stun_listen,
        db = %cfg.db.display(),
        "coordinator running"
    );
    let stun_port = (cfg.stun_listen.port() != 0).then_some(cfg.stun_listen.port());
    while let Some(incoming) = endpoint.accept().await {
        let store = store.clone();
        let hub = hub.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, store, hub, stun_port).await,
                Err(e) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
            }
        });
    }
    Ok(())
}

async fn serve_connection(
    conn: quinn::Connection,
    store: Arc<Mutex<Store>>,
    hub: Arc<Hub>,
    stun_port: Option<u16>,
) {
    let remote = conn.remote_address();
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let store = store.clone();
                let hub = hub.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(send, recv, store, hub, remote, stun_port).await {
                        tracing::debug!(%remote, error = %e, "control stream ended");
                    }
                });
            }
            Err(e) => {
                tracing::debug!(%remote, error = %e, "control connection closed");
                return;
            }
        }
    }
}

/// Runs a blocking store operation off the async threads.
async fn with_store<T: Send + 'static>(
    store: &Arc<Mutex<Store>>,
    f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    })
    .await
    .unwrap_or_else(|e| Err(StoreError::Corrupt(format!("store task failed: {e}"))))
}

fn log_refusal(remote: SocketAddr, err: &StoreError) {
    match err {
        StoreError::Sqlite(_) | StoreError::Schema(_) | StoreError::Corrupt(_) => {
            tracing::error!(%remote, error = %err, "request failed");
        }
        _ => tracing::warn!(%remote, error = %err, "request refused"),
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    store: Arc<Mutex<Store>>,
    hub: Arc<Hub>,
    remote: SocketAddr,
    stun_port: Option<u16>,
) -> Result<(), FrameIoError> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        quicio::read_message::<Request>(&mut recv, MAX_REQUEST_LEN, &mut buf),
    )
    .await;
    let req = match read {
        Ok(Ok(Some(req))) => req,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(%remote, error = %e, "malformed control request");
            let resp = Response::Error {
                code: ErrorCode::InvalidRequest,
                message: e.to_string(),
            };
            let _ = quicio::write_message(&mut send, &resp, MAX_RESPONSE_LEN).await;
            let _ = send.finish();
            let _ = recv.stop(1u32.into());
            return Ok(());
        }
        Err(_) => {
            tracing::debug!(%remote, "no request within the timeout");
            let _ = send.reset(1u32.into());
            return Ok(());
        }
    };
    if let Request::Watch { auth } = req {
        return serve_watch(send, store, hub, remote, auth, stun_port).await;
    }
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    let now = unix_now();
    let resp = match with_store(&store, move |s| handler::handle(s, req, now, random)).await {
        Ok(resp) => {
            if !matches!(resp, Response::Pong) {
                hub.poke();
            }
            resp
        }
        Err(e) => {
            log_refusal(remote, &e);
            handler::error_response(&e)
        }
    };
    quicio::write_message(&mut send, &resp, MAX_RESPONSE_LEN).await?;
    let _ = send.finish();
    Ok(())
}

async fn send_snapshot(
    send: &mut quinn::SendStream,
    store: &Arc<Mutex<Store>>,
    organization_id: i64,
    stun_port: Option<u16>,
) -> Result<i64, FrameIoError> {
    let snapshot = with_store(store, move |s| s.snapshot(organization_id)).await;
    let (revision, devices) = match snapshot {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "reading a snapshot failed");
            let resp = handler::error_response(&e);
            quicio::write_message(send, &resp, MAX_RESPONSE_LEN).await?;
            return Err(FrameIoError::Truncated);
        }
    };
    quicio::write_message(
        send,
        &Response::Snapshot {
            revision,
            devices,
            stun_port,
        },
        MAX_RESPONSE_LEN,
    )
    .await?;
    Ok(revision)
}

async fn serve_watch(
    mut send: quinn::SendStream,
    store: Arc<Mutex<Store>>,
    hub: Arc<Hub>,
    remote: SocketAddr,
    auth: Auth,
    stun_port: Option<u16>,
) -> Result<(), FrameIoError> {
    let me = match with_store(&store, move |s| handler::authenticate(s, &auth)).await {
        Ok(d) => d,
        Err(e) => {
            log_refusal(remote, &e);
            quicio::write_message(&mut send, &handler::error_response(&e), MAX_RESPONSE_LEN)
                .await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    // Subscribe before reading the snapshot so that no change falls in between.
    let mut rx = hub.subscribe(me.organization_id);
    let revision = send_snapshot(&mut send, &store, me.organization_id, stun_port).await?;
    tracing::info!(id = me.id, hostname = %me.hostname, %remote, revision, "watch started");
    let id = me.id;
    if hub.watch_started(id) {
        set_online(&store, &hub, id, true).await;
    }
    let result = forward_deltas(&mut send, &store, &mut rx, &me, revision, stun_port).await;
    if hub.watch_ended(id) {
        set_online(&store, &hub, id, false).await;
    }
    tracing::info!(id, %remote, "watch ended");
    result
}

async fn set_online(store: &Arc<Mutex<Store>>, hub: &Hub, id: i64, online: bool) {
    let now = unix_now();
    match with_store(store, move |s| s.set_online(id, online, now)).await {
        Ok(()) => hub.poke(),
        Err(e) => tracing::warn!(id, error = %e, "could not record online state"),
    }
}

/// Sends every delta newer than `revision` until the stream or the device ends.
async fn forward_deltas(
    send: &mut quinn::SendStream,
    store: &Arc<Mutex<Store>>,
    rx: &mut tokio::sync::broadcast::Receiver<Arc<hub::OrgDelta>>,
    me: &Device,
    mut revision: i64,
    stun_port: Option<u16>,
) -> Result<(), FrameIoError> {
    loop {
        let delta = tokio::select! {
            r = rx.recv() => r,
            _ = send.stopped() => return Ok(()),
        };
        match delta {
            Ok(delta) => {
                if delta.revision <= revision {
                    continue;
                }
                revision = delta.revision;
                send.write_all(&delta.frame).await?;
                if delta.removed.contains(&me.id) {
                    tracing::info!(id = me.id, "device removed; ending its watch");
                    let _ = send.finish();
                    return Ok(());
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    id = me.id,
                    missed = n,
                    "watcher fell behind; resending snapshot"
                );
                revision = send_snapshot(send, store, me.organization_id, stun_port).await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}
