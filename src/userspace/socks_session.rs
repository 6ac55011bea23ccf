//! One SOCKS5 client's negotiation over its TCP connection (in a task of its own,
//! bounded by [`SOCKS_TIMEOUT`]): method, then request, with the refusals RFC 1928
//! asks for; a CONNECT or UDP ASSOCIATE that passes becomes a [`SocksJob`] for the
//! stack's driver. Also the one way a reply is written without waiting.
//!
//! Not here: the messages themselves (`socks`), carrying the connection (the driver).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::socks::{self, Command, Reply, SocksError};
use super::stack::Names;

/// SOCKS5 negotiation.
pub const SOCKS_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound address of replies that carry none.
const NO_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A negotiated SOCKS5 request, handed from its task to the driver.
pub struct SocksJob {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub command: Command,
    /// CONNECT: the mesh destination. UDP ASSOCIATE: where the client will send from
    /// (zeros if it does not know).
    pub target: SocketAddr,
    /// Bytes the client sent after its request.
    pub early: Vec<u8>,
}

/// Negotiates with the client of `stream` in a task of its own; the request goes to
/// `tx`.
pub fn spawn(stream: TcpStream, peer: SocketAddr, tx: mpsc::Sender<SocksJob>, names: Names) {
    tokio::spawn(async move {
        match tokio::time::timeout(SOCKS_TIMEOUT, negotiate(stream, peer, tx, names)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "SOCKS5 client refused"),
            Err(_) => tracing::debug!(%peer, "SOCKS5 negotiation timed out"),
        }
    });
}

/// Writes `reply` (with `bound`, or zeros) if the socket takes it at once; whether it
/// was written whole.
pub fn try_reply(stream: &TcpStream, reply: Reply, bound: Option<SocketAddr>) -> bool {
    let mut out = [0; socks::MAX_REPLY];
    let n = socks::encode_reply(reply, bound.unwrap_or(NO_ADDRESS), &mut out);
    matches!(stream.try_write(out.get(..n).unwrap_or_default()), Ok(w) if w == n)
}

/// The encoded `reply` with `bound`, for a flow to write before its data.
pub fn reply_bytes(
    reply: Reply,
    bound: Option<SocketAddr>,
    out: &mut [u8; socks::MAX_REPLY],
) -> &[u8] {
    let n = socks::encode_reply(reply, bound.unwrap_or(NO_ADDRESS), out);
    out.get(..n).unwrap_or_default()
}

/// SOCKS5 negotiation with one client, then the request goes to the driver.
async fn negotiate(
    mut stream: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<SocksJob>,
    names: Names,
) -> Result<(), String> {
    let mut buf = [0u8; 600];
    let mut have = 0;
    let used = loop {
        match socks::parse_greeting(buf.get(..have).unwrap_or_default()) {
            Ok(Some(used)) => break used,
            Ok(None) => {}
            Err(e) => {
                if e == SocksError::NoAcceptableMethod {
                    let _ = stream
                        .write_all(&[socks::VERSION, socks::METHOD_REFUSED])
                        .await;
                }
                return Err(e.to_string());
            }
        }
        have += read_more(&mut stream, &mut buf, have).await?;
    };
    stream
        .write_all(&[socks::VERSION, socks::METHOD_NONE])
        .await
        .map_err(|e| e.to_string())?;
    buf.copy_within(used..have, 0);
    have -= used;
    let (request, used) = loop {
        match socks::parse_request(buf.get(..have).unwrap_or_default()) {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(e) => {
                let reply = match e {
                    SocksError::AddressType(_) | SocksError::BadDomain => {
                        Reply::AddressTypeNotSupported
                    }
                    _ => Reply::GeneralFailure,
                };
                let _ = write_reply(&mut stream, reply).await;
                return Err(e.to_string());
            }
        }
        have += read_more(&mut stream, &mut buf, have).await?;
    };
    let command = request.command;
    if !matches!(command, Command::Connect | Command::UdpAssociate) {
        let _ = write_reply(&mut stream, Reply::CommandNotSupported).await;
        return Err(format!("command {command:?} not supported"));
    }
    let target = match (command, request.address.ip(), &request.address) {
        (_, Some(t), _) => t,
        // The client does not know its UDP address yet.
        (Command::UdpAssociate, None, _) => NO_ADDRESS,
        (_, None, socks::Address::Domain(name, port)) => {
            // Mesh names only (socks5h://): the mesh DNS table, never the host's resolver.
            let host = names.borrow().resolve(name);
            match host {
                Some(h) => SocketAddr::new(h.v4.into(), *port),
                None => {
                    let _ = write_reply(&mut stream, Reply::HostUnreachable).await;
                    return Err(format!("{name:?} is not a mesh name"));
                }
            }
        }
        (_, None, socks::Address::Ip(_)) => NO_ADDRESS,
    };
    let early = buf.get(used..have).unwrap_or_default().to_vec();
    tx.send(SocksJob {
        stream,
        peer,
        command,
        target,
        early,
    })
    .await
    .map_err(|_| "stack gone".to_string())
}

async fn read_more(stream: &mut TcpStream, buf: &mut [u8], have: usize) -> Result<usize, String> {
    let room = buf.get_mut(have..).unwrap_or_default();
    if room.is_empty() {
        return Err("request too long".into());
    }
    match stream.read(room).await {
        Ok(0) => Err("client closed".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

async fn write_reply(stream: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
    let mut out = [0; socks::MAX_REPLY];
    stream.write_all(reply_bytes(reply, None, &mut out)).await
}
