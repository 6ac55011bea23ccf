//! The coordinator's TLS identity and the pinned-certificate QUIC configs.
//!
//! The coordinator makes a self-signed certificate on first start and keeps it (DER,
//! 0600) in its state dir, or, with PostgreSQL, in the database, so that every replica
//! presents the same one. Join tokens carry the certificate's SHA-256 fingerprint; a
//! node accepts exactly that certificate and no other, so no CA is involved.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::fsutil;
use crate::wire::control::{ALPN, SERVER_NAME};

const CERT_FILE: &str = "coordinator-cert.der";
const KEY_FILE: &str = "coordinator-key.der";

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("reading or writing the TLS identity in {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("generating the TLS identity: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

pub struct Identity {
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

impl Identity {
    /// Loads the identity from `state_dir`, creating it on first use. The caller
    /// holds the state directory's initialisation lock, so it is made once.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, IdentityError> {
        if let Some(id) = Self::load(state_dir)? {
            return Ok(id);
        }
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Io { path, source }
        };
        let (cert_path, key_path) = (state_dir.join(CERT_FILE), state_dir.join(KEY_FILE));
        fsutil::ensure_private_dir(state_dir).map_err(io(state_dir))?;
        let id = Self::generate()?;
        // Key first: a cert without its key would be unusable.
        fsutil::write_private_atomic(&key_path, &id.key_der).map_err(io(&key_path))?;
        fsutil::write_private_atomic(&cert_path, &id.cert_der).map_err(io(&cert_path))?;
        tracing::info!(dir = %state_dir.display(), "created coordinator TLS identity");
        Ok(id)
    }

    /// Loads the identity kept in `state_dir`; `None` if it has none (yet). Never
    /// creates anything (the admin commands use this). Symlinks are not followed.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let read = |name: &str| {
            let path = state_dir.join(name);
            fsutil::read_nofollow(&path).map_err(|source| IdentityError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        // Key first on creation, so a certificate implies its key.
        let Some(cert_der) = read(CERT_FILE)? else {
            return Ok(None);
        };
        let Some(key_der) = read(KEY_FILE)? else {
            return Ok(None);
        };
        Ok(Some(Self { cert_der, key_der }))
    }

    /// A new self-signed identity (kept nowhere yet).
    pub fn generate() -> Result<Self, IdentityError> {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
        Ok(Self {
            cert_der: made.cert.der().to_vec(),
            key_der: made.signing_key.serialize_der(),
        })
    }

    /// An identity as stored: DER certificate and PKCS#8 key. A mismatched pair is
    /// refused when the server config is built.
    pub fn from_der(cert_der: Vec<u8>, key_der: Vec<u8>) -> Self {
        Self { cert_der, key_der }
    }

    /// The private key, PKCS#8 DER (to store it for other replicas).
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }

    /// QUIC server config presenting this identity with the control ALPN.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, IdentityError> {
        let cert = CertificateDer::from(self.cert_der.clone());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| IdentityError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        cfg.transport_config(Arc::new(server_transport_config()));
        // Connection attempts waiting for the accept loop, and what they may buffer
        // (0-RTT data) before it decides.
        cfg.max_incoming(4096)
            .incoming_buffer_size(64 << 10)
            .incoming_buffer_size_total(8 << 20);
        Ok(cfg)
    }
}

/// HTTPS (the admin API, DESIGN §12): a rustls server config presenting `chain` (leaf
/// first) with `key`, HTTP/1.1 over TLS 1.2 or 1.3.
pub fn https_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, IdentityError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

impl Identity {
    /// The admin API's HTTPS config presenting this identity (the default; the admin
    /// key carries its fingerprint).
    pub fn https_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        let cert = CertificateDer::from(self.cert_der.clone());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        https_server_config(vec![cert], key)
    }
}

/// An HTTPS client config (the remote admin CLI) that accepts only the certificate
/// with `fingerprint`.
pub fn https_client_config(fingerprint: [u8; 32]) -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert {
            fingerprint,
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Keepalives keep idle watch connections (and the NAT state in front of them) alive;
/// the idle timeout notices a dead peer.
fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(20)) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(64u32.into());
    t
}

/// A node's keepalive on the control connection: frequent enough that a few lost
/// ones still keep it within [`CLIENT_IDLE_TIMEOUT`].
pub const CLIENT_KEEPALIVE: Duration = Duration::from_secs(2);
/// How soon a node gives up on a silent coordinator (a killed replica) and moves to
/// another. QUIC takes the smaller of both sides' idle timeouts, so the coordinator
/// (which keeps 20 s for older nodes) notices a dead node as soon.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(6);

fn client_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    t.keep_alive_interval(Some(CLIENT_KEEPALIVE));
    if let Ok(idle) = quinn::IdleTimeout::try_from(CLIENT_IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Streams a client may have open at once on one connection (a node uses two or
/// three: its watch stream and a request now and then).
pub const SERVER_BIDI_STREAMS: u32 = 16;
/// What one stream may send before the coordinator reads it: one largest request.
pub const SERVER_STREAM_WINDOW: u32 = 80 << 10;
/// What one connection may send before the coordinator reads it, all streams together.
pub const SERVER_CONNECTION_WINDOW: u32 = 256 << 10;
/// Unacknowledged bytes the coordinator keeps for one connection (a snapshot is
/// written in pieces of this much).
pub const SERVER_SEND_WINDOW: u64 = 4 << 20;
const _: () = assert!(SERVER_STREAM_WINDOW as usize >= crate::wire::frame::MAX_REQUEST_LEN + 4);

/// The client config's, with what the coordinator lets one connection make it hold:
/// no peer-initiated unidirectional streams (it never reads any), a few
/// bidirectional ones, and receive windows sized for the largest request instead of
/// quinn's defaults (1.25 MB per stream, unbounded per connection).
fn server_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    t.max_concurrent_uni_streams(0u32.into())
        .max_concurrent_bidi_streams(SERVER_BIDI_STREAMS.into())
        .stream_receive_window(SERVER_STREAM_WINDOW.into())
        .receive_window(SERVER_CONNECTION_WINDOW.into())
        .send_window(SERVER_SEND_WINDOW)
        .datagram_receive_buffer_size(None);
    t
}

/// QUIC client config that accepts only the certificate with `fingerprint`.
pub fn client_config(fingerprint: [u8; 32]) -> Result<quinn::ClientConfig, IdentityError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert {
            fingerprint,
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| IdentityError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(client_transport_config()));
    Ok(cfg)
}

/// Accepts exactly one certificate, by SHA-256 fingerprint; still checks that the peer
/// holds its key (handshake signatures are verified normally).
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "coordinator certificate does not match the fingerprint in the join token (or admin key)".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only; the admin API's HTTPS may be 1.2.
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
