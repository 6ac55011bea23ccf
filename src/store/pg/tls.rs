//! TLS to PostgreSQL through rustls: the `sslmode` and `sslrootcert` settings of a
//! connection URL, read as libpq reads them, and the connector tokio-postgres (and so
//! the sync client) uses.
//!
//! | `sslmode`     | TLS                               | server certificate            |
//! |---------------|-----------------------------------|-------------------------------|
//! | `disable`     | never                             | —                             |
//! | `allow`, `prefer` (default) | if the server offers it | not checked                |
//! | `require`     | always (refused: error)           | not checked; checked against `sslrootcert` if given (libpq's rule) |
//! | `verify-ca`   | always                            | signed by `sslrootcert`       |
//! | `verify-full` | always                            | signed by `sslrootcert`, names the host |
//!
//! `sslrootcert=PATH` is a PEM file of CA certificates; `sslrootcert=system` the
//! operating system's store; unset under `verify-*`, `~/.postgresql/root.crt` (libpq's
//! default). `allow` tries TLS first (tokio-postgres cannot try plain first): it
//! accepts what `allow` accepts. Client certificates (`sslcert`, `sslkey`) are not
//! supported. The channel binding of SCRAM (`tls-server-end-point`) is offered for
//! certificates signed with RSA PKCS#1 or ECDSA; for others none is offered.
//!
//! Does not do: certificate revocation lists (`sslcrl`), `sslpassword`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Why a connection URL's TLS settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("invalid sslmode {0:?} (disable, allow, prefer, require, verify-ca or verify-full)")]
    Mode(String),
    #[error("sslrootcert {path}: {reason}")]
    RootCert { path: String, reason: String },
    #[error(
        "sslmode={0} checks the server's certificate: give its CA with sslrootcert=PATH \
         (or sslrootcert=system for the operating system's store)"
    )]
    NoRootCert(&'static str),
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it is a must.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as M;
        match self {
            Self::Disable => M::Disable,
            Self::Allow | Self::Prefer => M::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => M::Require,
        }
    }
}

impl FromStr for SslMode {
    type Err = TlsConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(TlsConfigError::Mode(other.into())),
        })
    }
}

/// Where the trusted CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    System,
}

/// The TLS settings taken out of a connection string, and the string without them
/// (for tokio-postgres, which does not know `sslrootcert` nor the `verify-*` modes).
#[derive(Debug, PartialEq, Eq)]
pub struct Extracted {
    pub rest: String,
    pub mode: Option<String>,
    pub root_cert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL (`postgres://…?sslmode=…`) or a
/// key=value string (`host=… sslmode=…`).
pub fn extract(conn: &str) -> Extracted {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        extract_url(conn)
    } else {
        extract_key_value(conn)
    }
}

fn extract_url(url: &str) -> Extracted {
    let (mut mode, mut root_cert) = (None, None);
    let Some((base, query)) = url.split_once('?') else {
        return Extracted {
            rest: url.into(),
            mode,
            root_cert,
        };
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(key).as_str() {
            "sslmode" => mode = Some(percent_decode(value)),
            "sslrootcert" => root_cert = Some(percent_decode(value)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Extracted {
        rest,
        mode,
        root_cert,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq's key=value form: `key = value` pairs separated by whitespace, a value
/// either bare or single-quoted with backslash escapes.
fn extract_key_value(conn: &str) -> Extracted {
    let (mut mode, mut root_cert) = (None, None);
    let mut rest = String::with_capacity(conn.len());
    let b = conn.as_bytes();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &conn[start..i];
        i = skip_ws(i);
        let mut value = String::new();
        if i < b.len() && b[i] == b'=' {
            i = skip_ws(i + 1);
            if i < b.len() && b[i] == b'\'' {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    let ch = conn[i..].chars().next().unwrap_or('\0');
                    value.push(ch);
                    i += ch.len_utf8();
                }
                i = (i + 1).min(b.len());
            } else {
                let vstart = i;
                while i < b.len() && !b[i].is_ascii_whitespace() {
                    i += 1;
                }
                value.push_str(&conn[vstart..i]);
            }
        }
        match key {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root_cert = Some(value),
            _ => {
                if !rest.is_empty() {
                    rest.push(' ');
                }
                rest.push_str(&conn[start..i]);
            }
        }
    }
    Extracted {
        rest,
        mode,
        root_cert,
    }
}

/// The TLS side of a database connection: its mode (for messages) and the connector.
#[derive(Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    connector: MakeRustlsConnect,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl PgTls {
    /// Builds the connector for `mode` (default `prefer`) and `root_cert`.
    pub fn new(mode: Option<&str>, root_cert: Option<&str>) -> Result<Self, TlsConfigError> {
        let mode = mode.map_or(Ok(SslMode::Prefer), SslMode::from_str)?;
        let mut root = root_cert.filter(|s| !s.is_empty()).map(|s| match s {
            "system" => RootCert::System,
            path => RootCert::File(PathBuf::from(path)),
        });
        let verify = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => {
                if root.is_none() {
                    // libpq's default file.
                    let home = std::env::var_os("HOME").map(PathBuf::from);
                    match home.map(|h| h.join(".postgresql/root.crt")) {
                        Some(p) if p.exists() => root = Some(RootCert::File(p)),
                        _ => return Err(TlsConfigError::NoRootCert(mode.as_str())),
                    }
                }
                Some(mode == SslMode::VerifyFull)
            }
            // libpq: with a root certificate, `require` verifies the CA.
            SslMode::Require if root.is_some() => Some(false),
            _ => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (verify, &root) {
            (Some(check_name), Some(root)) => {
                let inner = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(load_roots(root)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsConfigError::RootCert {
                    path: describe_root(root),
                    reason: e.to_string(),
                })?;
                Arc::new(Verify { inner, check_name })
            }
            _ => Arc::new(NoVerify(provider.clone())),
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // What libpq sends (PostgreSQL 17 insists on it under sslnegotiation=direct).
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self {
            mode,
            root_cert: root,
            connector: MakeRustlsConnect {
                config: Arc::new(config),
                verify_name: verify == Some(true),
            },
        })
    }

    /// Applies the mode to the tokio-postgres settings.
    pub fn configure(&self, config: &mut tokio_postgres::Config) {
        config.ssl_mode(self.mode.negotiation());
    }

    /// The connector for `connect`.
    pub fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }

    /// For messages: `sslmode=verify-full, sslrootcert=/etc/ca.pem`.
    pub fn describe(&self) -> String {
        match &self.root_cert {
            Some(root) => format!(
                "sslmode={}, sslrootcert={}",
                self.mode.as_str(),
                describe_root(root)
            ),
            None => format!("sslmode={}", self.mode.as_str()),
        }
    }
}

fn describe_root(root: &RootCert) -> String {
    match root {
        RootCert::File(p) => p.display().to_string(),
        RootCert::System => "system".into(),
    }
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    let err = |reason: String| TlsConfigError::RootCert {
        path: describe_root(root),
        reason,
    };
    match root {
        RootCert::File(path) => {
            let certs = read_pem_certs(path).map_err(err)?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(err("no usable CA certificate in the file".into()));
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(err(
                    "the operating system's store has no certificates".into()
                ));
            }
        }
    }
    Ok(store)
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM file of certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// `verify-ca` and `verify-full`: the web PKI's checks against the given roots, the
/// host name only under `verify-full`.
#[derive(Debug)]
struct Verify {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // The chain is checked before the name: only the name was wrong.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root: encrypted, the certificate not checked (as
/// libpq). The handshake's signatures are still checked against the certificate.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres's `MakeTlsConnect` over rustls.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
    verify_name: bool,
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = match ServerName::try_from(domain) {
            Ok(n) => n.to_owned(),
            Err(e) if self.verify_name => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "sslmode=verify-full: host {domain:?} is not a DNS name or IP address: {e}"
                    ),
                ));
            }
            // Nothing is checked against it (a unix socket has no host name): send
            // no server name.
            Err(_) => ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        Ok(RustlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

type ConnectFuture<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = ConnectFuture<S>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let tls = connector.connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS stream to the database.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        conn.peer_certificates()
            .and_then(|c| c.first())
            .and_then(|cert| server_end_point(cert))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// RFC 5929 `tls-server-end-point`: the certificate's hash with its signature's hash
/// (SHA-256 for MD5 and SHA-1). None for algorithms without one hash (RSA-PSS,
/// Ed25519): offering a wrong binding would fail authentication.
pub fn server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let oid = signature_algorithm(cert)?;
    enum H {
        S256,
        S384,
        S512,
    }
    let hash = match oid {
        [rsa @ .., last] if rsa == RSA => match last {
            0x04 | 0x05 | 0x0b => H::S256, // md5, sha1, sha256 WithRSAEncryption
            0x0c => H::S384,
            0x0d => H::S512,
            _ => return None,
        },
        [ec @ .., 0x01] if ec == ECDSA => H::S256, // ecdsa-with-SHA1
        [ec @ .., 0x03, n] if ec == ECDSA => match n {
            0x02 => H::S256,
            0x03 => H::S384,
            0x04 => H::S512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match hash {
        H::S256 => sha2::Sha256::digest(cert).to_vec(),
        H::S384 => sha2::Sha384::digest(cert).to_vec(),
        H::S512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// The OID of a DER certificate's `signatureAlgorithm`.
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    let (tag, body, _) = der(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_tbs) = der(body)?;
    let (tag, alg, _) = der(after_tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der(alg)?;
    (tag == 0x06).then_some(oid)
}

/// One DER element: (tag, contents, what follows).
fn der(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *buf.first()?;
    let first = *buf.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in buf.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let body = buf.get(header..header.checked_add(len)?)?;
    Some((tag, body, &buf[header + len..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn url_settings_are_taken_out() {
        let e = extract(
            "postgres://u:p@db:5432/nx?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        );
        assert_eq!(e.rest, "postgres://u:p@db:5432/nx?application_name=x");
        assert_eq!(e.mode.as_deref(), Some("verify-full"));
        assert_eq!(e.root_cert.as_deref(), Some("/etc/ca.pem"));
        let e = extract("postgresql://db/nx?sslmode=require");
        assert_eq!(e.rest, "postgresql://db/nx");
        assert_eq!(e.mode.as_deref(), Some("require"));
        let e = extract("postgres://db/nx");
        assert_eq!((e.rest.as_str(), e.mode), ("postgres://db/nx", None));
    }

    #[test]
    fn key_value_settings_are_taken_out() {
        let e = extract("host=db  sslmode = verify-ca sslrootcert='/a b/c\\'a.pem' dbname=nx");
        assert_eq!(e.rest, "host=db dbname=nx");
        assert_eq!(e.mode.as_deref(), Some("verify-ca"));
        assert_eq!(e.root_cert.as_deref(), Some("/a b/c'a.pem"));
        let e = extract("host=db password='x y'");
        assert_eq!(e.rest, "host=db password='x y'");
    }

    #[test]
    fn modes() {
        assert!(matches!(
            PgTls::new(Some("sometimes"), None),
            Err(TlsConfigError::Mode(_))
        ));
        assert_eq!(PgTls::new(None, None).unwrap().mode, SslMode::Prefer);
        let t = PgTls::new(Some("require"), None).unwrap();
        assert!(!t.connector.verify_name);
        let err = PgTls::new(Some("verify-full"), Some("/nonexistent/ca.pem")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn channel_binding_hash_follows_the_signature() {
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, 32),
            (&rcgen::PKCS_ECDSA_P384_SHA384, 48),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["db".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let h = server_end_point(cert.der()).unwrap();
            assert_eq!(h.len(), len);
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(server_end_point(cert.der()), None);
        assert_eq!(server_end_point(&[0x30, 0x85]), None);
    }
}
