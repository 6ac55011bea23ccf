//! `serve --api-listen ADDR`: the admin API (JSON under `/api/v1`, DESIGN §12) and the
//! dashboard at `/`, over HTTPS (axum on a rustls listener). By default it presents the
//! coordinator's own identity, whose fingerprint admin keys carry; `--api-cert` and
//! `--api-key-file` give it a CA-signed certificate instead.
//!
//! Every API request needs `Authorization: Bearer nxa1.…`; a missing, wrong or
//! revoked key gets 401 with an empty body, and an address with too many failures in a
//! minute gets 429 before its key is looked at ([`limit`]). Bodies are bounded before
//! they are read. What a request means and does is [`request`]'s (no sockets); this
//! shell only authenticates, reads and answers, on the same store as the QUIC side, so
//! any PostgreSQL replica serves the API.

pub mod dashboard;
pub mod limit;
pub mod request;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::SharedStore;
use crate::admin::Local;
use crate::coord::adminkey::{self, AdminKeyText};
use crate::identity::IdentityError;
use request::{ApiError, MAX_BODY};

/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once.
const HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ApiSetupError {
    #[error("cannot listen for the admin API on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading {path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("--api-cert and --api-key-file go together")]
    Half,
    #[error(transparent)]
    Tls(#[from] IdentityError),
}

/// A certificate chain (PEM, leaf first) and its private key (PEM) from files.
pub fn load_pem(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ApiSetupError> {
    let pem = |path: &Path, detail: String| ApiSetupError::Pem {
        path: path.display().to_string(),
        detail,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(cert, "no certificate in it".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    Ok((chain, key_der))
}

/// What the handlers share.
struct Shared {
    store: SharedStore,
    /// The coordinator's certificate fingerprint (join tokens carry it).
    fingerprint: [u8; 32],
    failures: Mutex<limit::Failures>,
}

/// The remote address of a connection, for the failure limit.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// TCP connections whose TLS handshakes finished, handshakes run concurrently.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor stopped (its listener failed): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

fn tls_listener(tcp: TcpListener, tls: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
    let local = tcp.local_addr()?;
    let (tx, ready) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropped: too many handshakes at once
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send((s, remote)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "admin API: TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%remote, "admin API: TLS handshake timed out"),
                }
            });
        }
    });
    Ok(TlsListener { ready, local })
}

/// Binds the API's address (before returning, so a taken port is an error at start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ApiSetupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ApiSetupError::Listen { addr, source })
}

/// Serves the API and the dashboard on `tcp` until the process ends.
pub async fn serve(
    tcp: TcpListener,
    tls: rustls::ServerConfig,
    store: SharedStore,
    fingerprint: [u8; 32],
) {
    let listener = match tls_listener(tcp, Arc::new(tls)) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "admin API not started");
            return;
        }
    };
    let shared = Arc::new(Shared {
        store,
        fingerprint,
        failures: Mutex::default(),
    });
    let app = axum::Router::new()
        .fallback(route)
        .with_state(shared)
        .into_make_service_with_connect_info::<Peer>();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "admin API stopped");
    }
}

async fn route(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request<Body>,
) -> Response {
    let path = req.uri().path().to_string();
    match path.strip_prefix("/api/v1") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            api(shared, peer.0, req, rest.to_string()).await
        }
        _ => dashboard::serve(req.method(), &path),
    }
}

fn empty(status: StatusCode) -> Response {
    (status, Body::empty()).into_response()
}

fn json(status: u16, value: &serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        value.to_string(),
    )
        .into_response()
}

fn error(e: &ApiError) -> Response {
    json(e.status, &e.body())
}

/// The secret hash of the `Authorization: Bearer` key, if it parses as one.
fn presented(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ")?;
    AdminKeyText::parse(key).ok().map(|k| k.secret_hash())
}

async fn api(shared: Arc<Shared>, peer: SocketAddr, req: Request<Body>, path: String) -> Response {
    let ip = peer.ip().to_canonical();
    let blocked = |s: &Shared| {
        s.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocked(ip, Instant::now())
    };
    if blocked(&shared) {
        return empty(StatusCode::TOO_MANY_REQUESTS);
    }
    let hash = presented(req.headers());
    let store = shared.store.clone();
    let ok = tokio::task::spawn_blocking(move || {
        let Some(hash) = hash else { return Ok(false) };
        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
        let keys = s.admin_keys()?;
        Ok::<_, crate::store::StoreError>(adminkey::matches(
            &hash,
            keys.iter()
                .filter(|k| k.revoked_at.is_none())
                .map(|k| k.secret_hash.as_str()),
        ))
    })
    .await;
    match ok {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            shared
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fail(ip, Instant::now());
            tracing::info!(%peer, "admin API: refused a request without a valid key");
            return empty(StatusCode::UNAUTHORIZED);
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "admin API: reading admin keys failed");
            return error(&ApiError::new(
                500,
                "internal",
                "internal coordinator error",
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "admin API: task failed");
            return error(&ApiError::new(
                500,
                "internal",
                "internal coordinator error",
            ));
        }
    }
    let (parts, body) = req.into_parts();
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return error(&ApiError::too_large());
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return error(&ApiError::too_large());
    };
    let call = match request::parse(parts.method.as_str(), &path, parts.uri.query(), &body) {
        Ok(c) => c,
        Err(e) => return error(&e),
    };
    tracing::info!(%peer, method = %parts.method, %path, "admin API request");
    let store = shared.store.clone();
    let fingerprint = shared.fingerprint;
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
        let mut random = || {
            let mut b = [0u8; 32];
            rand::rng().fill_bytes(&mut b);
            b
        };
        let mut local = Local {
            store: s.as_mut(),
            fingerprint,
            now: super::unix_now(),
            random: &mut random,
        };
        request::execute(&mut local, call)
    })
    .await;
    match answer {
        Ok(Ok((status, value))) => json(status, &value),
        Ok(Err(e)) => error(&e),
        Err(e) => {
            tracing::error!(error = %e, "admin API: task failed");
            error(&ApiError::new(
                500,
                "internal",
                "internal coordinator error",
            ))
        }
    }
}
