//! Mesh DNS shell (DESIGN §10): the resolver on the node's tunnel addresses, port 53,
//! UDP and TCP, answering from the name table the driver publishes; and `join --dns`,
//! which points systemd-resolved at it for the organization's domain only.
//!
//! The answers are `node::dns::answer`'s; this file only moves bytes: one task per
//! UDP socket, one per TCP listener and one per TCP connection (at most
//! [`MAX_TCP_CONNECTIONS`], each closed after [`TCP_IDLE`] without a query).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::node::dns::{self, NameTable};

/// The DNS port.
pub const PORT: u16 = 53;
/// TCP connections served at once; more wait in the listen queue.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection with no complete query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// The name table as the driver last published it.
pub type Names = watch::Receiver<Arc<NameTable>>;

/// The running resolver; its tasks stop when it is dropped.
pub struct Resolver {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A socket of `ty` bound to `addr` even before the address is usable (a new IPv6
/// address is tentative until duplicate address detection ends).
fn bind(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, ty, None)?;
    match addr {
        SocketAddr::V4(_) => s.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            s.set_freebind_v6(true)?;
            s.set_only_v6(true)?;
        }
    }
    if ty == socket2::Type::STREAM {
        s.set_reuse_address(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

impl Resolver {
    /// Binds UDP and TCP `port` on each of `addrs` and serves them from `names`.
    pub fn start(addrs: &[IpAddr], port: u16, names: Names) -> std::io::Result<Self> {
        let mut tasks = Vec::new();
        let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        for &ip in addrs {
            let addr = SocketAddr::new(ip, port);
            let udp = UdpSocket::from_std(bind(addr, socket2::Type::DGRAM)?.into())?;
            let tcp = bind(addr, socket2::Type::STREAM)?;
            tcp.listen(128)?;
            let tcp = TcpListener::from_std(tcp.into())?;
            tasks.push(tokio::spawn(serve_udp(udp, names.clone())));
            tasks.push(tokio::spawn(serve_tcp(tcp, names.clone(), slots.clone())));
        }
        tracing::info!(?addrs, port, "mesh DNS answering");
        Ok(Self { tasks })
    }
}

/// Answers every query arriving on `socket`.
pub async fn serve_udp(socket: UdpSocket, names: Names) {
    let mut buf = vec![0u8; dns::MAX_QUERY + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive failed");
                continue;
            }
        };
        let table = names.borrow().clone();
        if let Some(out) = dns::answer(&table, buf.get(..n).unwrap_or_default())
            && let Err(e) = socket.send_to(&out, from).await
        {
            tracing::debug!(%from, error = %e, "DNS send failed");
        }
    }
}

/// Accepts DNS-over-TCP connections, at most `slots` at once.
pub async fn serve_tcp(listener: TcpListener, names: Names, slots: Arc<Semaphore>) {
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let names = names.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = serve_connection(stream, names).await;
                });
            }
            Err(e) => tracing::debug!(error = %e, "DNS accept failed"),
        }
    }
}

/// Length-prefixed queries and answers (RFC 1035 §4.2.2, RFC 7766) until the client
/// closes, sends a query longer than [`dns::MAX_QUERY`] or idles.
async fn serve_connection(mut stream: TcpStream, names: Names) -> std::io::Result<()> {
    let mut buf = vec![0u8; dns::MAX_QUERY];
    loop {
        let mut len = [0u8; 2];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await??;
        let len = usize::from(u16::from_be_bytes(len));
        let Some(query) = buf.get_mut(..len) else {
            return Ok(());
        };
        tokio::time::timeout(TCP_IDLE, stream.read_exact(query)).await??;
        let table = names.borrow().clone();
        let Some(out) = dns::answer(&table, query) else {
            return Ok(());
        };
        let Ok(n) = u16::try_from(out.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&out);
        stream.write_all(&framed).await?;
    }
}

/// Where systemd-resolved listens for its clients while it runs.
const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// `join --dns`: systemd-resolved sends queries for the domain (and only those) to our
/// resolver over the tunnel interface; reverted when dropped.
pub struct SplitDns {
    interface: String,
}

impl SplitDns {
    /// Configures split DNS, or says why not and changes nothing (`None`).
    pub fn install(interface: &str, server: Ipv4Addr, domain: &str) -> Option<Self> {
        Self::install_with(Path::new(RESOLVED_SOCKET), interface, server, domain)
    }

    fn install_with(
        resolved: &Path,
        interface: &str,
        server: Ipv4Addr,
        domain: &str,
    ) -> Option<Self> {
        if !resolved.exists() {
            tracing::warn!(
                "--dns: systemd-resolved is not running on this host, so the host's DNS settings are left unchanged; \
                 mesh names are answered at {server} port 53 (e.g. `dig @{server} NAME.{domain}`)"
            );
            return None;
        }
        let domain_arg = format!("~{domain}");
        let steps: [&[&str]; 2] = [
            &["dns", interface, &server.to_string()],
            &["domain", interface, &domain_arg],
        ];
        for args in steps {
            if let Err(e) = resolvectl(args) {
                tracing::warn!(error = %e, "--dns: cannot configure systemd-resolved; the host's DNS settings are left unchanged");
                let _ = resolvectl(&["revert", interface]);
                return None;
            }
        }
        tracing::info!(%interface, %server, %domain, "--dns: systemd-resolved sends queries for the domain to the mesh");
        Some(Self {
            interface: interface.to_string(),
        })
    }
}

impl Drop for SplitDns {
    fn drop(&mut self) {
        match resolvectl(&["revert", &self.interface]) {
            Ok(()) => {
                tracing::info!(interface = %self.interface, "--dns: systemd-resolved settings reverted")
            }
            Err(e) => tracing::debug!(error = %e, "resolvectl revert"),
        }
    }
}

fn resolvectl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("resolvectl")
        .args(args)
        .output()
        .map_err(|e| format!("resolvectl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "resolvectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests;
