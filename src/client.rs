//! The node's side of the control protocol: a QUIC connection to the coordinator that
//! pins the certificate fingerprint from the join token.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

use crate::identity::{self, IdentityError};
use crate::quicio::{self, FrameIoError};
use crate::wire::control::{Auth, ErrorCode, Request, Response, ResumeFrom, SERVER_NAME};
use crate::wire::frame::{MAX_REQUEST_LEN, MAX_RESPONSE_LEN};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot open a local UDP socket: {0}")]
    Bind(std::io::Error),
    #[error("cannot reach the coordinator at {0}: this host has no route to it")]
    Unroutable(SocketAddr),
    #[error("cannot start a connection to {addr}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    /// The handshake failed (no answer: `timed out`); the cause is in the message, not
    /// repeated as a source.
    #[error("cannot connect to the coordinator at {addr}: {cause}")]
    Handshake {
        addr: SocketAddr,
        cause: quinn::ConnectionError,
    },
    // The cause is in each message below (tracing prints only the top error), so it is
    // not also a `source`: every cause is printed once.
    #[error("connection to the coordinator failed: {0}")]
    Connection(quinn::ConnectionError),
    #[error("control stream: {0}")]
    Frame(FrameIoError),
    #[error("coordinator closed the stream without an answer")]
    NoAnswer,
    #[error("coordinator refused: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("unexpected answer from the coordinator: {0}")]
    Unexpected(String),
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        Self::Connection(e)
    }
}

impl From<FrameIoError> for ClientError {
    fn from(e: FrameIoError) -> Self {
        Self::Frame(e)
    }
}

/// One QUIC connection to the coordinator; each call opens its own stream.
pub struct ControlClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl ControlClient {
    pub async fn connect(addr: SocketAddr, fingerprint: [u8; 32]) -> Result<Self, ClientError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Bind)?;
        endpoint.set_default_client_config(identity::client_config(fingerprint)?);
        let conn = endpoint
            .connect(addr, SERVER_NAME)
            .map_err(|source| ClientError::Connect { addr, source })?
            .await
            .map_err(|cause| ClientError::Handshake { addr, cause })?;
        Ok(Self { endpoint, conn })
    }

    /// Sends one request and returns its answer; a coordinator error becomes
    /// [`ClientError::Refused`].
    pub async fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        quicio::write_message(&mut send, req, MAX_REQUEST_LEN).await?;
        let _ = send.finish();
        let mut buf = Vec::new();
        match quicio::read_message(&mut recv, MAX_RESPONSE_LEN, &mut buf).await? {
            Some(Response::Error { code, message }) => Err(ClientError::Refused { code, message }),
            Some(resp) => Ok(resp),
            None => Err(ClientError::NoAnswer),
        }
    }

    /// Opens the watch stream: the first message is a snapshot, then deltas.
    pub async fn watch(&self, auth: Auth) -> Result<WatchStream, ClientError> {
        self.watch_as(auth, None).await
    }

    /// [`Self::watch`] for the node process `instance` (see [`Request::Watch`]).
    pub async fn watch_as(
        &self,
        auth: Auth,
        instance: Option<u64>,
    ) -> Result<WatchStream, ClientError> {
        self.watch_resuming(auth, instance, None).await
    }

    /// [`Self::watch_as`] naming where this node's view stands (see
    /// [`Request::Watch`]): the first message is then [`Response::Watching`].
    pub async fn watch_resuming(
        &self,
        auth: Auth,
        instance: Option<u64>,
        resume: Option<ResumeFrom>,
    ) -> Result<WatchStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let req = Request::Watch {
            auth,
            instance,
            resume,
        };
        quicio::write_message(&mut send, &req, MAX_REQUEST_LEN).await?;
        Ok(WatchStream {
            _send: send,
            recv,
            buf: Vec::new(),
        })
    }

    /// The coordinator's address on this connection.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The underlying connection, for callers that speak the frame protocol by hand.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Resolves when the connection is lost.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

pub struct WatchStream {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl WatchStream {
    /// The next snapshot or delta; `Ok(None)` when the coordinator ended the stream.
    pub async fn next(&mut self) -> Result<Option<Response>, ClientError> {
        match quicio::read_message(&mut self.recv, MAX_RESPONSE_LEN, &mut self.buf).await? {
            Some(Response::Error { code, message }) => Err(ClientError::Refused { code, message }),
            other => Ok(other),
        }
    }
}
