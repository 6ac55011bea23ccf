//! `nexodus serve`: the coordinator shell.
//!
//! Owns the QUIC endpoint, the STUN sockets, the store (SQLite or PostgreSQL, behind a
//! mutex, used from blocking threads) and the [`hub::Hub`] that pushes deltas. Request
//! logic lives in [`handler`], which has no sockets.
//!
//! Several `serve` processes may share one PostgreSQL database (replicas): they share
//! the TLS identity kept in it, each runs its own STUN responders, and each hub hears
//! every commit through LISTEN/NOTIFY.

pub mod api;
pub mod handler;
pub mod hub;
pub mod limits;
pub mod metrics;
mod presence;
mod state;
pub mod stun;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use thiserror::Error;

use crate::coord::token::{JoinToken, hash_secret};
use crate::fsutil::LockError;
use crate::identity::IdentityError;
use crate::quicio::{self, FrameIoError};
use crate::store::{DEFAULT_ORG, Database, Registration, Store, StoreError};
use crate::wire::control::{Auth, Device, ErrorCode, Request, Response, ResumeFrom};
use crate::wire::frame::{MAX_REQUEST_LEN, MAX_RESPONSE_LEN};
use hub::Hub;
pub use state::{CoordinatorState, open_existing, open_state};
use watch::{clone_refusal, serve_watch, set_online};

/// The store as the shell shares it between tasks.
pub type SharedStore = Arc<Mutex<Box<dyn Store>>>;

/// How long a client may take to send its request on a new stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Validity of the join token printed on first start.
const FIRST_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often a replica proves itself alive (PostgreSQL): a fifth of
/// [`crate::store::pg::SESSION_TIMEOUT_SECS`], after which its node sessions no
/// longer make another process with their credential a clone.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a new watch waits for the hub to apply the device's own latest change.
const CATCH_UP: Duration = Duration::from_secs(5);
/// Most registrations committed together (see [`registrar`]).
const REGISTER_BATCH: usize = 128;
/// Longest a snapshot or delta write may stall (a watcher that does not read) before
/// its stream is reset.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may live without one request that proved who it is (a
/// registration, or a device's credential).
const UNAUTHENTICATED: Duration = Duration::from_secs(30);
/// Requests being read at once on one connection (each up to one frame in memory).
const READS_PER_CONNECTION: usize = 4;

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
    #[error("startup task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(
        "another `nexodus serve` ({}) is already running on {path}; stop it first, or give \
         this one a state directory (--state-dir) of its own",
        crate::fsutil::holder(*.pid)
    )]
    AlreadyRunning { path: PathBuf, pid: Option<u32> },
    #[error(
        "no coordinator database at {}: start `nexodus serve --state-dir {}` first, or pass \
         the --state-dir (or NEXODUS_STATE_DIR) that `nexodus serve` uses",
        db.display(), dir.display()
    )]
    NoState { db: PathBuf, dir: PathBuf },
    #[error(
        "the database {url} has no coordinator yet: start `nexodus serve --database-url ...` \
         on it first, or pass the --database-url that `nexodus serve` uses"
    )]
    NoDatabase { url: String },
    #[error(
        "the coordinator starting in {} ({}) did not finish initialising within {}s; \
         see its log",
        dir.display(), crate::fsutil::holder(*.pid), state::INIT_WAIT.as_secs()
    )]
    InitTimeout { dir: PathBuf, pid: Option<u32> },
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Api(#[from] api::ApiSetupError),
}

pub struct ServeConfig {
    pub listen: SocketAddr,
    pub stun_listen: SocketAddr,
    pub database: Database,
    /// TLS identity files (SQLite only: with PostgreSQL the identity is in the
    /// database, shared by the replicas).
    pub state_dir: PathBuf,
    /// Where to serve Prometheus `/metrics` (off when None).
    pub metrics_listen: Option<SocketAddr>,
    /// Most QUIC connections from one source address ([`limits::MAX_PER_IP`]).
    pub max_connections_per_ip: usize,
    /// Where to serve the admin API and dashboard over HTTPS (off when None).
    pub api_listen: Option<SocketAddr>,
    /// A CA-signed certificate chain and key (PEM) for the API instead of the
    /// coordinator's own identity.
    pub api_cert: Option<(PathBuf, PathBuf)>,
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
        .peer_devices(org.id)?
        .into_iter()
        .filter(|d| d.relay)
        .min_by_key(|d| d.id)
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "organization {:?} has no approved relay; start a node with `nexodus join --relay` and approve it (`nexodus devices approve ID --relay`) first: a stock WireGuard device reaches the mesh only through it",
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

/// Runs blocking startup work (the database) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServeError> + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServeError::Task(e.to_string()))?
}

/// Runs the coordinator until `shutdown` resolves; then every connection is closed
/// with a reason, so nodes notice at once instead of after their idle timeout.
pub async fn run(
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let (database, state_dir) = (cfg.database.clone(), cfg.state_dir.clone());
    let mut state = blocking(move || {
        let mut state = open_state(&database, &state_dir)?;
        if state.first_start {
            let token = create_token(&mut state, DEFAULT_ORG, true, Some(FIRST_TOKEN_TTL))?;
            Ok((state, Some(token)))
        } else {
            Ok((state, None))
        }
    })
    .await?;
    if let Some(token) = state.1.take() {
        tracing::info!(
            "first start: created database {}, TLS identity and organization {DEFAULT_ORG:?}; \
             the join token below is reusable and valid for 24 hours \
             (more with `nexodus token create`)",
            cfg.database.describe()
        );
        println!("{token}");
    }
    let state = state.0;
    let server_config = state.identity.server_config()?;
    let listen_config = match &cfg.database {
        Database::Postgres(url) => Some(crate::store::pg::parse_config(url)?),
        Database::Sqlite(_) => None,
    };
    let mut store = state.store;
    let (store, revision) = blocking(move || {
        let reset = store.reset_online(unix_now())?;
        if reset > 0 {
            tracing::info!(
                devices = reset,
                "marked devices offline until they reconnect"
            );
        }
        let revision = store.current_revision()?;
        Ok((store, revision))
    })
    .await?;
    let store: SharedStore = Arc::new(Mutex::new(store));
    let hub = match listen_config {
        Some(config) => {
            // Every replica's commits arrive as notifications; polling is a fallback.
            let hub = Hub::new(store.clone(), hub::FALLBACK_POLL);
            tokio::spawn(hub.clone().listen(config));
            tokio::spawn(heartbeat(store.clone(), hub.clone()));
            hub
        }
        None => Hub::new(store.clone(), hub::POLL),
    };
    // Tail from before the devices were read (replaying a few changes is harmless).
    let loaded = hub.load().await?;
    tokio::spawn(hub.clone().run(revision.min(loaded)));
    if let Some(addr) = cfg.metrics_listen {
        let listener = crate::metrics::bind(addr).await?;
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, {
            let (store, hub) = (store.clone(), hub.clone());
            move || render_metrics(store.clone(), hub.clone())
        }));
    }
    if let Some(addr) = cfg.api_listen {
        let tls = match &cfg.api_cert {
            Some((cert, key)) => {
                let (chain, key) = api::load_pem(cert, key)?;
                crate::identity::https_server_config(chain, key)?
            }
            None => state.identity.https_config()?,
        };
        let listener = api::bind(addr).await?;
        tracing::info!(%addr, "serving the admin API (/api/v1) and dashboard (/) over HTTPS");
        tokio::spawn(api::serve(
            listener,
            tls,
            store.clone(),
            state.identity.fingerprint(),
        ));
    }
    let (register_tx, register_rx) = tokio::sync::mpsc::channel(4 * REGISTER_BATCH);
    tokio::spawn(registrar(store.clone(), hub.clone(), register_rx));
    let (presence_tx, presence_rx) = presence::channel();
    tokio::spawn(presence::writer(store.clone(), hub.clone(), presence_rx));
    tokio::spawn(limits::prune(store.clone()));

    for addr in stun::ports(cfg.stun_listen) {
        let socket = udp_socket(addr)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                tokio::net::UdpSocket::from_std(s)
            })
            .map_err(|source| ServeError::Listen { addr, source })?;
        tokio::spawn(stun::serve(socket));
    }

    let endpoint =
        quic_endpoint(server_config, cfg.listen).map_err(|source| ServeError::Listen {
            addr: cfg.listen,
            source,
        })?;
    tracing::info!(
        listen = %cfg.listen,
        stun = %cfg.stun_listen,
        db = %cfg.database.describe(),
        "coordinator running"
    );
    let stun_port = (cfg.stun_listen.port() != 0).then_some(cfg.stun_listen.port());
    let admission = Arc::new(limits::Admission::new(cfg.max_connections_per_ip));
    let limiter = Arc::new(limits::Limiter::default());
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            () = &mut shutdown => {
                tracing::info!("shutting down: closing every connection");
                endpoint.close(SHUTDOWN_CODE.into(), SHUTDOWN_REASON);
                // Bounded: the close frames go out at once; peers need not answer.
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                break;
            }
        };
        let remote = incoming.remote_address();
        let mut admitted = match admission.admit(
            remote.ip().to_canonical(),
            incoming.remote_address_validated(),
        ) {
            Ok(a) => a,
            Err(limits::Decision::Retry) if incoming.may_retry() => {
                let _ = incoming.retry();
                continue;
            }
            Err(limits::Decision::Retry) => {
                // Validated already: should not happen; treat as under load.
                incoming.ignore();
                continue;
            }
            Err(_) => {
                tracing::debug!(%remote, "too many connections from this address");
                incoming.refuse();
                continue;
            }
        };
        let shell = Shell {
            store: store.clone(),
            hub: hub.clone(),
            registrations: register_tx.clone(),
            presences: presence_tx.clone(),
            stun_port,
            limiter: limiter.clone(),
            authenticated: Arc::default(),
        };
        tokio::spawn(async move {
            let connecting = incoming.await;
            admitted.handshake_done();
            match connecting {
                Ok(conn) => serve_connection(conn, shell).await,
                Err(e) => tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
            }
            drop(admitted);
        });
    }
    // Its nodes' sessions lock nobody out any more: a node restarted meanwhile is let
    // in through another replica at once.
    if let Err(e) = with_store(&store, |s| s.leave()).await {
        tracing::warn!(error = %e, "could not release this replica's node sessions");
    }
    Ok(())
}

/// The QUIC application close code and reason of a coordinator that is stopping.
pub const SHUTDOWN_CODE: u32 = 1;
pub const SHUTDOWN_REASON: &[u8] = b"coordinator shutting down";

/// The coordinator's metrics: organization names from the store (a short query),
/// everything else from the hub's memory.
async fn render_metrics(store: SharedStore, hub: Arc<Hub>) -> String {
    let names = with_store(&store, |s| s.orgs()).await.unwrap_or_default();
    let counts = hub.org_counts();
    let orgs: Vec<metrics::OrgFigures> = names
        .into_iter()
        .map(|o| {
            let (devices, online) = counts.get(&o.id).copied().unwrap_or((0, 0));
            metrics::OrgFigures {
                org: o.name,
                devices,
                online,
            }
        })
        .collect();
    hub.metrics.render(&orgs, hub.watcher_count())
}

/// Socket buffers of the QUIC endpoint: thousands of nodes' keepalives and a burst of
/// handshakes must not overflow the kernel's default (~200 KiB) while a busy process
/// is not reading. The kernel caps it at `net.core.rmem_max`/`wmem_max`.
pub const QUIC_SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with [`QUIC_SOCKET_BUFFER`]-sized buffers. `[::]`
/// is dual stack (IPv4 arrives v4-mapped); on a host without IPv6 it falls back to
/// `0.0.0.0` on the same port.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    match udp_socket_at(addr) {
        Err(e) if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(%addr, error = %e, fallback = %v4, "no IPv6 here; listening on IPv4 only");
            udp_socket_at(v4)
        }
        other => other,
    }
}

fn udp_socket_at(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // Best effort: a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(QUIC_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The coordinator's QUIC endpoint on a socket with large buffers.
fn quic_endpoint(
    config: quinn::ServerConfig,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(addr)?,
        runtime,
    )
}

/// Keeps this replica alive in the database; if it had been expired (a long database
/// outage), records its watches again.
async fn heartbeat(store: SharedStore, hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match with_store(&store, |s| s.heartbeat()).await {
            Ok(false) => {}
            Ok(true) => {
                for (id, instance, remote) in hub.watched() {
                    let remote = remote.to_string();
                    let now = unix_now();
                    if let Err(e) =
                        with_store(&store, move |s| s.claim_watch(id, instance, &remote, now)).await
                    {
                        tracing::warn!(id, error = %e, "could not record a watch again");
                    }
                    set_online(&store, &hub, id, true).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
        }
    }
}

/// A registration waiting for the [`registrar`].
struct RegisterJob {
    registration: handler::PreparedRegistration,
    done: tokio::sync::oneshot::Sender<Result<Device, StoreError>>,
}

type Registrations = tokio::sync::mpsc::Sender<RegisterJob>;

/// Commits registrations in batches: whatever arrived while the previous batch was
/// being committed goes into the next one (one transaction, one disk flush). Alone, a
/// registration is committed at once; under load, the flush is shared.
async fn registrar(
    store: SharedStore,
    hub: Arc<Hub>,
    mut rx: tokio::sync::mpsc::Receiver<RegisterJob>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < REGISTER_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let n = jobs.len();
        let (regs, dones): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.registration, j.done)).unzip();
        let now = unix_now();
        let results = with_store(&store, move |s| {
            let batch: Vec<Registration<'_>> = regs
                .iter()
                .map(|r| Registration {
                    req: &r.req,
                    token_hash: &r.token_hash,
                    credential_hash: &r.credential_hash,
                })
                .collect();
            Ok(s.register_devices(&batch, now))
        })
        .await
        .unwrap_or_else(|e| crate::store::fail_all(e, n));
        let registered = results.iter().filter(|r| r.is_ok()).count();
        if registered > 0 {
            hub.metrics.registered(registered);
            hub.poke();
        }
        for (done, result) in dones.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }
}

async fn serve_connection(conn: quinn::Connection, shell: Shell) {
    let remote = conn.remote_address();
    let reads = Arc::new(tokio::sync::Semaphore::new(READS_PER_CONNECTION));
    let unauthenticated = tokio::time::sleep(UNAUTHENTICATED);
    tokio::pin!(unauthenticated);
    let mut checked = false;
    loop {
        let next = async {
            // At most READS_PER_CONNECTION requests being read: more streams wait in
            // quinn, within its receive windows.
            let permit = reads.clone().acquire_owned().await.ok();
            (permit, conn.accept_bi().await)
        };
        let (permit, accepted) = tokio::select! {
            r = next => r,
            () = &mut unauthenticated, if !checked => {
                checked = true;
                if !shell.authenticated.load(std::sync::atomic::Ordering::Relaxed) {
                    tracing::debug!(%remote, "closing a connection that never authenticated");
                    conn.close(2u32.into(), b"not authenticated");
                    return;
                }
                continue;
            }
        };
        match accepted {
            Ok((send, recv)) => {
                let (shell, conn) = (shell.clone(), conn.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_stream(&conn, send, recv, shell, remote, permit).await {
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
pub async fn with_store<T: Send + 'static>(
    store: &SharedStore,
    f: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
        f(s.as_mut())
    })
    .await
    .unwrap_or_else(|e| Err(StoreError::Corrupt(format!("store task failed: {e}"))));
    if matches!(&result, Err(e) if e.is_internal()) {
        metrics::STORE_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

fn log_refusal(remote: SocketAddr, err: &StoreError) {
    if err.is_internal() {
        tracing::error!(%remote, error = %err, "request failed");
    } else {
        tracing::warn!(%remote, error = %err, "request refused");
    }
}

/// What a control stream's handler reaches.
#[derive(Clone)]
struct Shell {
    store: SharedStore,
    hub: Arc<Hub>,
    registrations: Registrations,
    /// Logins and online changes, committed in batches ([`presence`]).
    presences: presence::Presences,
    stun_port: Option<u16>,
    limiter: Arc<limits::Limiter>,
    /// Some request on this connection proved who it is.
    authenticated: Arc<std::sync::atomic::AtomicBool>,
}

impl Shell {
    fn authenticated(&self) {
        self.authenticated
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn serve_stream(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shell: Shell,
    remote: SocketAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), FrameIoError> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        quicio::read_message::<Request>(&mut recv, MAX_REQUEST_LEN, &mut buf),
    )
    .await;
    drop(permit);
    drop(buf);
    let (store, hub, registrations) = (
        shell.store.clone(),
        shell.hub.clone(),
        shell.registrations.clone(),
    );
    let req = match read {
        Ok(Ok(Some(req))) => req,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(quicio::FrameIoError::Read(e))) => {
            // The peer went away mid-request: nothing was malformed, nothing to answer.
            tracing::debug!(%remote, error = %e, "control stream lost before a request");
            return Ok(());
        }
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
    if let Request::Watch {
        auth,
        instance,
        resume,
    } = req
    {
        return serve_watch(conn, send, &shell, remote, auth, instance, resume).await;
    }
    if let Request::Login {
        auth,
        instance: Some(instance),
        ..
    } = &req
        && let Some(first) = hub.watched_elsewhere(auth.device_id, Some(*instance))
    {
        // Said only to the credential's holder.
        let (id, auth) = (auth.device_id, auth.clone());
        if with_store(&store, move |s| handler::authenticate(s, &auth))
            .await
            .is_ok()
        {
            let resp = clone_refusal(id, first, remote);
            quicio::write_message(&mut send, &resp, MAX_RESPONSE_LEN).await?;
            let _ = send.finish();
            return Ok(());
        }
    }
    if let Request::Login {
        auth,
        ipv6_supported,
        instance,
    } = &req
    {
        // The store refuses it too if another process of the device is connected
        // through another replica.
        let resp = match presence::login(&shell.presences, auth, *ipv6_supported, *instance).await {
            Ok(device) => {
                shell.authenticated();
                Response::Device { device }
            }
            Err(e) => {
                log_refusal(remote, &e);
                handler::error_response(&e)
            }
        };
        quicio::write_message(&mut send, &resp, MAX_RESPONSE_LEN).await?;
        let _ = send.finish();
        return Ok(());
    }
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    if let Request::Register(r) = req {
        let resp = match register(&registrations, r, random).await {
            Ok(resp) => {
                shell.authenticated();
                resp
            }
            Err(e) => {
                log_refusal(remote, &e);
                handler::error_response(&e)
            }
        };
        quicio::write_message(&mut send, &resp, MAX_RESPONSE_LEN).await?;
        let _ = send.finish();
        return Ok(());
    }
    let now = unix_now();
    let limiter = shell.limiter.clone();
    let allow = move |id| limiter.allow_update(id);
    let result = with_store(&store, move |s| {
        handler::handle_limited(s, req, now, random, &allow)
    })
    .await;
    let resp = match result {
        Ok(resp) => {
            if !matches!(resp, Response::Pong) {
                shell.authenticated();
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

/// Writes a snapshot taken from the hub (a few at a time: each is a copy of its
/// organization); returns its revision.
/// Registers through the [`registrar`].
async fn register(
    registrations: &Registrations,
    req: crate::wire::control::RegisterRequest,
    random: [u8; 32],
) -> Result<Response, StoreError> {
    let p = handler::prepare_registration(req, random)?;
    let credential = p.credential.clone();
    let (done, answer) = tokio::sync::oneshot::channel();
    registrations
        .send(RegisterJob {
            registration: p,
            done,
        })
        .await
        .map_err(|_| StoreError::Unavailable("registrations stopped".into()))?;
    let device = answer
        .await
        .map_err(|_| StoreError::Unavailable("registration dropped".into()))??;
    Ok(handler::registered(device, credential))
}
