//! The driver's UDP I/O: ingress rules (a connected local socket per mesh peer),
//! egress rules (a stack socket, hence a source port, per local client) and SOCKS5
//! UDP associations (a local relay socket and a stack socket, living as long as the
//! client's control connection). Which flow a datagram belongs to, when flows expire
//! and whom a relay admits is decided in [`FlowTable`] and [`RelayClient`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use tokio::net::{TcpStream, UdpSocket};

use super::super::flows::Refused;
use super::super::socks::{self, Reply};
use super::super::socks_session::{self, SocksJob};
use super::super::status::Snapshot;
use super::{Driver, FlowTable, INGEST_BATCH, RelayClient, Udp, would_block};

/// An ingress rule's flow: the local socket connected to the service for one mesh
/// peer.
pub struct UdpLocal {
    sock: UdpSocket,
    to_mesh_bytes: u64,
    from_mesh_bytes: u64,
}

impl UdpLocal {
    fn new(sock: UdpSocket) -> Self {
        Self {
            sock,
            to_mesh_bytes: 0,
            from_mesh_bytes: 0,
        }
    }
}

pub struct IngressUdp {
    pub rule: usize,
    pub target: SocketAddr,
    pub handle: SocketHandle,
    /// Keyed by (mesh peer, our mesh address it wrote to).
    pub flows: FlowTable<(SocketAddr, IpAddr), UdpLocal>,
}

/// An egress rule's flow: the stack socket (and port) of one local client.
pub struct MeshUdp {
    handle: SocketHandle,
    port: u16,
    to_mesh_bytes: u64,
    from_mesh_bytes: u64,
}

impl MeshUdp {
    fn new(handle: SocketHandle, port: u16) -> Self {
        Self {
            handle,
            port,
            to_mesh_bytes: 0,
            from_mesh_bytes: 0,
        }
    }
}

pub struct EgressUdp {
    pub rule: usize,
    pub target: SocketAddr,
    pub socket: UdpSocket,
    pub flows: FlowTable<SocketAddr, MeshUdp>,
}

/// A SOCKS5 UDP ASSOCIATE: lives as long as its TCP control connection.
pub struct Association {
    control: TcpStream,
    relay: UdpSocket,
    relay_addr: SocketAddr,
    handle: SocketHandle,
    port: u16,
    client: RelayClient,
    to_mesh_bytes: u64,
    from_mesh_bytes: u64,
}

pub fn stack_socket(packets: usize, bytes: usize) -> udp::Socket<'static> {
    udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
    )
}

/// A UDP socket connected to a local service.
fn udp_connected(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(target)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// The next datagram `recv` takes from `sock`, if one is ready (otherwise the task
/// is woken when one is).
fn next_datagram<T>(
    sock: &UdpSocket,
    cx: &mut Context<'_>,
    mut recv: impl FnMut(&UdpSocket) -> std::io::Result<T>,
) -> Option<T> {
    loop {
        match sock.poll_recv_ready(cx) {
            Poll::Ready(Ok(())) => {}
            _ => return None,
        }
        match recv(sock) {
            Ok(r) => return Some(r),
            // Readiness was stale and is cleared: ask again.
            Err(e) if would_block(&e) => continue,
            Err(_) => return None,
        }
    }
}

/// Whether the control connection of an association is gone (reading and
/// discarding whatever the client sends on it).
fn control_closed(control: &TcpStream, cx: &mut Context<'_>) -> bool {
    let mut scratch = [0u8; 64];
    loop {
        match control.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return true,
            Poll::Pending => return false,
        }
        match control.try_read(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            Err(_) => return true,
        }
    }
}

impl Udp {
    /// Adds every UDP flow and association to the status (`socks`: the SOCKS5 rule
    /// index).
    pub(super) fn report(&self, s: &mut Snapshot<'_>, socks: usize) {
        for r in &self.ingress {
            for ((peer, _), f) in r.flows.iter() {
                let bytes = (f.to_mesh_bytes, f.from_mesh_bytes);
                s.flow(r.rule, "udp", (*peer, r.target), bytes);
            }
        }
        for r in &self.egress {
            for (client, f) in r.flows.iter() {
                let bytes = (f.to_mesh_bytes, f.from_mesh_bytes);
                s.flow(r.rule, "udp", (*client, r.target), bytes);
            }
        }
        for a in &self.associations {
            let bytes = (a.to_mesh_bytes, a.from_mesh_bytes);
            s.flow(socks, "udp", (a.client.shown(), a.relay_addr), bytes);
        }
    }
}

impl Driver {
    /// A SOCKS5 UDP ASSOCIATE: a local relay socket and a stack socket.
    pub(super) fn open_association(&mut self, job: SocksJob) {
        let fail = |stream: &TcpStream, reply: Reply| {
            socks_session::try_reply(stream, reply, None);
        };
        let local_ip = match job.stream.local_addr() {
            Ok(a) => a.ip(),
            Err(_) => return fail(&job.stream, Reply::GeneralFailure),
        };
        let relay = std::net::UdpSocket::bind(SocketAddr::new(local_ip, 0)).and_then(|s| {
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        });
        let (relay, relay_addr) = match relay.and_then(|r| r.local_addr().map(|a| (r, a))) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a SOCKS5 UDP relay");
                return fail(&job.stream, Reply::GeneralFailure);
            }
        };
        let Some(port) = self.ports.alloc() else {
            return fail(&job.stream, Reply::GeneralFailure);
        };
        let mut s = stack_socket(64, 128 * 1024);
        if s.bind(port).is_err() {
            self.ports.release(port);
            return fail(&job.stream, Reply::GeneralFailure);
        }
        if !socks_session::try_reply(&job.stream, Reply::Succeeded, Some(relay_addr)) {
            self.ports.release(port);
            return;
        }
        tracing::debug!(peer = %job.peer, relay = %relay_addr, "SOCKS5 UDP association");
        self.udp.associations.push(Association {
            control: job.stream,
            relay,
            relay_addr,
            handle: self.sockets.add(s),
            port,
            client: RelayClient::new(job.peer.ip(), job.target),
            to_mesh_bytes: 0,
            from_mesh_bytes: 0,
        });
        self.status_clock.changed();
    }

    pub(super) fn drive_udp(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        let buf = &mut self.udp_buf;
        let sockets = &mut self.sockets;
        for rule in &mut self.udp.ingress {
            let s = sockets.get_mut::<udp::Socket>(rule.handle);
            // Mesh → local service: one local socket per mesh peer.
            for _ in 0..INGEST_BATCH {
                let Ok((data, meta)) = s.recv() else {
                    break;
                };
                progress = true;
                let Some(local) = meta.local_address else {
                    continue;
                };
                let key = (SocketAddr::from(meta.endpoint), IpAddr::from(local));
                let open = || udp_connected(rule.target).map(UdpLocal::new);
                let flow = match rule.flows.touch_or_open(key, now, open) {
                    Ok((f, new)) => {
                        if new {
                            self.status_clock.changed();
                        }
                        f
                    }
                    Err(Refused::Full(e)) => {
                        tracing::debug!(error = %e, "UDP datagram dropped");
                        continue;
                    }
                    Err(Refused::Open(e)) => {
                        tracing::warn!(target = %rule.target, error = %e, "cannot open a UDP socket");
                        continue;
                    }
                };
                flow.from_mesh_bytes += data.len() as u64;
                let _ = flow.sock.try_send(data);
            }
            // Local service → mesh.
            rule.flows.visit(now, |&(peer, local), f| {
                let mut active = false;
                for _ in 0..INGEST_BATCH {
                    let Some(n) = next_datagram(&f.sock, cx, |u| u.try_recv(buf)) else {
                        break;
                    };
                    active = true;
                    f.to_mesh_bytes += n as u64;
                    let meta = udp::UdpMetadata {
                        endpoint: peer.into(),
                        local_address: Some(local.into()),
                        meta: Default::default(),
                    };
                    let _ = s.send_slice(buf.get(..n).unwrap_or_default(), meta);
                }
                progress |= active;
                active
            });
        }
        for rule in &mut self.udp.egress {
            // Local client → mesh: one stack socket (source port) per client.
            for _ in 0..INGEST_BATCH {
                let Some((n, client)) = next_datagram(&rule.socket, cx, |u| u.try_recv_from(buf))
                else {
                    break;
                };
                progress = true;
                let ports = &mut self.ports;
                let open = || {
                    let port = ports.alloc().ok_or(())?;
                    let mut s = stack_socket(64, 128 * 1024);
                    if s.bind(port).is_err() {
                        ports.release(port);
                        return Err(());
                    }
                    Ok(MeshUdp::new(sockets.add(s), port))
                };
                let flow = match rule.flows.touch_or_open(client, now, open) {
                    Ok((f, true)) => {
                        self.status_clock.changed();
                        f
                    }
                    Ok((f, false)) => f,
                    Err(Refused::Full(e)) => {
                        tracing::debug!(error = %e, "UDP datagram dropped");
                        continue;
                    }
                    Err(Refused::Open(())) => continue,
                };
                flow.to_mesh_bytes += n as u64;
                let s = sockets.get_mut::<udp::Socket>(flow.handle);
                let _ = s.send_slice(buf.get(..n).unwrap_or_default(), rule.target);
            }
            // Mesh → local client (only from the rule's target, like a connected socket).
            let (target, socket) = (rule.target, &rule.socket);
            rule.flows.visit(now, |client, f| {
                let s = sockets.get_mut::<udp::Socket>(f.handle);
                let mut active = false;
                while let Ok((data, meta)) = s.recv() {
                    if SocketAddr::from(meta.endpoint) != target {
                        continue;
                    }
                    active = true;
                    f.from_mesh_bytes += data.len() as u64;
                    let _ = socket.try_send_to(data, *client);
                }
                progress |= active;
                active
            });
        }
        progress
    }

    pub(super) fn drive_associations(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let buf = &mut self.udp_buf;
        let sockets = &mut self.sockets;
        let addrs = self.addrs;
        let mut i = 0;
        while let Some(a) = self.udp.associations.get_mut(i) {
            // The association ends with its control connection.
            if control_closed(&a.control, cx) {
                progress = true;
                let a = self.udp.associations.swap_remove(i);
                tracing::debug!(relay = %a.relay_addr, "SOCKS5 UDP association closed");
                sockets.remove(a.handle);
                self.ports.release(a.port);
                self.status_clock.changed();
                continue;
            }
            i += 1;
            let s = sockets.get_mut::<udp::Socket>(a.handle);
            for _ in 0..INGEST_BATCH {
                let Some((n, from)) = next_datagram(&a.relay, cx, |u| u.try_recv_from(buf)) else {
                    break;
                };
                progress = true;
                // Only the client that asked may use the relay.
                if !a.client.admit(from) {
                    continue;
                }
                let Some(datagram) = buf.get(..n) else {
                    continue;
                };
                let Ok((dst, start)) = socks::parse_udp_header(datagram) else {
                    continue;
                };
                let Some(dst) = dst.ip() else {
                    continue;
                };
                if let (true, Some(payload)) = (addrs.has_family(dst.ip()), datagram.get(start..)) {
                    a.to_mesh_bytes += payload.len() as u64;
                    let _ = s.send_slice(payload, dst);
                }
            }
            while let Ok((data, meta)) = s.recv() {
                progress = true;
                let Some(client) = a.client.addr() else {
                    continue;
                };
                let h = socks::encode_udp_header(SocketAddr::from(meta.endpoint), buf);
                let Some(out) = buf.get_mut(h..h + data.len()) else {
                    continue;
                };
                out.copy_from_slice(data);
                a.from_mesh_bytes += data.len() as u64;
                let _ = a
                    .relay
                    .try_send_to(buf.get(..h + data.len()).unwrap_or_default(), client);
            }
        }
        progress
    }

    /// Forgets idle UDP flows; returns when to look again.
    pub(super) fn expire_udp(&mut self, now: Instant) -> Instant {
        let mut next = now + Duration::from_secs(3600);
        for rule in &mut self.udp.ingress {
            if !rule.flows.expire(now).is_empty() {
                self.status_clock.changed();
            }
            if let Some(t) = rule.flows.next_expiry() {
                next = next.min(t);
            }
        }
        for rule in &mut self.udp.egress {
            for (client, f) in rule.flows.expire(now) {
                tracing::debug!(%client, "UDP flow expired");
                self.sockets.remove(f.handle);
                self.ports.release(f.port);
                self.status_clock.changed();
            }
            if let Some(t) = rule.flows.next_expiry() {
                next = next.min(t);
            }
        }
        next
    }
}
