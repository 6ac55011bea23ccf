//! The shell of rootless mode: one thread runs a current-thread tokio runtime whose
//! main task, the driver, owns the smoltcp interface, every smoltcp socket, the packet
//! socket pair and every local socket of every flow. Each wakeup it takes packets from
//! the data path one at a time (so a listening socket can be armed before each new
//! connection request), moves bytes between smoltcp sockets and local sockets, lets
//! smoltcp emit, and repeats until nothing moves (with an iteration budget).
//!
//! Bytes go straight between a smoltcp buffer and a kernel socket (`try_read` into the
//! free part of the smoltcp transmit buffer, `try_write` from its receive buffer): a
//! flow holds at most its two smoltcp buffers, a full buffer stops reading the other
//! side, and the TCP windows do the rest. Only SOCKS5 negotiation runs in tasks of
//! its own, handing finished requests to the driver.

use std::collections::HashMap;
use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::device::PipeDevice;
use super::flows::{FlowTable, PortAllocator};
use super::rule::{Direction, Proto, Rule};
use super::socks::{self, Reply};
use super::{Bound, FlowStatus, RuleStatus, UserspaceError, UserspaceStatus};

/// Receive and transmit buffer of each TCP flow in the stack (the receive buffer is
/// the advertised window).
const TCP_RX_BUFFER: usize = 256 * 1024;
const TCP_TX_BUFFER: usize = 256 * 1024;
/// TCP sockets in the stack at once (flows, closing ones and armed listeners).
const MAX_TCP_SOCKETS: usize = 1024;
/// UDP flows per rule.
const MAX_UDP_FLOWS: usize = 1024;
/// A UDP flow without a datagram for this long is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Opening a connection (to the mesh or to the local service).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Sent data unacknowledged for this long ends a connection.
const TCP_TIMEOUT: Duration = Duration::from_secs(120);
/// A closing connection is dropped after this long whatever its state.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// SOCKS5 negotiation.
const SOCKS_TIMEOUT: Duration = Duration::from_secs(10);
/// Turns of the driver loop per wakeup before it yields.
const LOOP_BUDGET: usize = 64;
/// Packets queued for the data path that are sent without waiting for the end of
/// the turn.
const FLUSH_AT: usize = 16;
/// Packets taken from the data path per turn.
const INGEST_BATCH: usize = 128;
/// How often the status snapshot is rebuilt while something changed.
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// How often byte counts in the status are refreshed while flows are open.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

pub struct Params {
    pub rules: Vec<Rule>,
    pub socks5: Option<SocketAddr>,
    pub bound: Bound,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    pub mtu: u16,
}

/// Where a TCP flow came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Ingress,
    Egress,
    Socks,
}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>>>>;

enum Local {
    /// Ingress: the connection to the local service is being opened (the mesh side
    /// waits in SYN-RECEIVED without answering).
    Connecting(Connecting),
    Stream(TcpStream),
}

/// Bytes to write before the flow's own data (a SOCKS5 reply, or data a SOCKS5 client
/// sent before its reply).
#[derive(Default)]
struct Prefix {
    buf: Vec<u8>,
    at: usize,
}

impl Prefix {
    fn pending(&self) -> &[u8] {
        self.buf.get(self.at..).unwrap_or_default()
    }
}

struct TcpFlow {
    rule: usize,
    origin: Origin,
    from: SocketAddr,
    to: SocketAddr,
    local: Local,
    to_local: Prefix,
    to_mesh: Prefix,
    /// SOCKS5: the reply is still owed.
    socks_reply: bool,
    /// The local side sent FIN: the mesh side is closing.
    local_eof: bool,
    /// The mesh side sent FIN and everything before it left the stack.
    mesh_fin: bool,
    /// ... and it was passed on (local write side shut down).
    mesh_eof: bool,
    established: bool,
    deadline: Option<Instant>,
    port: Option<u16>,
    /// Ingress: (mesh peer, our address), the key in `Driver::ingress_tuples`.
    tuple: Option<(SocketAddr, SocketAddr)>,
    to_mesh_bytes: u64,
    from_mesh_bytes: u64,
}

/// How a TCP flow ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both sides closed.
    Graceful,
    /// The mesh side reset or timed out: reset the local side.
    MeshGone,
    /// Reset both sides (a local reset or a local error).
    Abort,
    /// The mesh connection could not be opened.
    Failed(Reply),
}

enum Step {
    Idle,
    Progress,
    End(End),
}

struct IngressTcp {
    rule: usize,
    target: SocketAddr,
    /// Listening sockets waiting for a SYN.
    idle: Vec<SocketHandle>,
}

struct UdpLocal {
    sock: UdpSocket,
    to_mesh_bytes: u64,
    from_mesh_bytes: u64,
}

struct IngressUdp {
    rule: usize,
    target: SocketAddr,
    handle: SocketHandle,
    /// Keyed by (mesh peer, our mesh address it wrote to).
    flows: FlowTable<(SocketAddr, IpAddr), UdpLocal>,
}

struct EgressTcp {
    rule: usize,
    target: SocketAddr,
    listener: TcpListener,
}

struct MeshUdp {
    handle: SocketHandle,
    port: u16,
    to_mesh_bytes: u64,
    from_mesh_bytes: u64,
}

struct EgressUdp {
    rule: usize,
    target: SocketAddr,
    socket: UdpSocket,
    flows: FlowTable<SocketAddr, MeshUdp>,
}

/// A SOCKS5 UDP ASSOCIATE: lives as long as its TCP control connection.
struct Association {
    control: TcpStream,
    relay: UdpSocket,
    relay_addr: SocketAddr,
    handle: SocketHandle,
    port: u16,
    client_ip: IpAddr,
    client: Option<SocketAddr>,
    to_mesh_bytes: u64,
    from_mesh_bytes: u64,
}

/// A negotiated SOCKS5 request, handed from its task to the driver.
struct SocksJob {
    stream: TcpStream,
    peer: SocketAddr,
    command: socks::Command,
    target: SocketAddr,
    early: Vec<u8>,
}

pub struct Driver {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: PipeDevice,
    epoch: Instant,
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
    rules: Vec<Rule>,
    socks_addr: Option<SocketAddr>,
    ingress_tcp: HashMap<u16, IngressTcp>,
    ingress_udp: Vec<IngressUdp>,
    egress_tcp: Vec<EgressTcp>,
    egress_udp: Vec<EgressUdp>,
    socks_listener: Option<TcpListener>,
    socks_tx: mpsc::Sender<SocksJob>,
    socks_rx: mpsc::Receiver<SocksJob>,
    associations: Vec<Association>,
    tcp: HashMap<SocketHandle, TcpFlow>,
    /// Ingress connections by (mesh peer, our address): a repeated SYN is not a new one.
    ingress_tuples: HashMap<(SocketAddr, SocketAddr), SocketHandle>,
    /// Closed flows whose smoltcp socket still finishes the TCP close.
    draining: Vec<(SocketHandle, Option<u16>, Instant)>,
    ports: PortAllocator,
    ended: Vec<(SocketHandle, End)>,
    udp_buf: Vec<u8>,
    timer: Pin<Box<tokio::time::Sleep>>,
    status: Arc<Mutex<UserspaceStatus>>,
    status_dirty: bool,
    status_at: Instant,
}

fn tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_TX_BUFFER]),
    );
    // A proxy: the applications at both ends decide about coalescing.
    s.set_nagle_enabled(false);
    s
}

fn udp_socket(packets: usize, bytes: usize) -> udp::Socket<'static> {
    udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
    )
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

/// Drops a local connection with a reset instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The socket's TCP close is over (or it never had a peer).
fn tcp_finished(s: &tcp::Socket<'_>) -> bool {
    match s.state() {
        tcp::State::TimeWait | tcp::State::Listen => true,
        tcp::State::Closed => s.remote_endpoint().is_none(),
        _ => false,
    }
}

impl Driver {
    pub fn new(
        p: Params,
        pipe: std::os::unix::net::UnixDatagram,
        status: Arc<Mutex<UserspaceStatus>>,
    ) -> Result<Self, UserspaceError> {
        let stack_err =
            |what: &str, e: std::io::Error| UserspaceError::Stack(format!("{what}: {e}"));
        pipe.set_nonblocking(true)
            .map_err(|e| stack_err("packet socket", e))?;
        {
            // Room for bursts both ways (capped by net.core.wmem_max/rmem_max).
            let s = socket2::SockRef::from(&pipe);
            let _ = s.set_send_buffer_size(4 << 20);
            let _ = s.set_recv_buffer_size(4 << 20);
        }
        let pipe =
            tokio::net::UnixDatagram::from_std(pipe).map_err(|e| stack_err("packet socket", e))?;
        let mut dev = PipeDevice::new(pipe, usize::from(p.mtu));

        let unicast4 = !(p.v4.is_unspecified() || p.v4.is_multicast() || p.v4.is_broadcast());
        let unicast6 =
            p.v6.is_none_or(|a| !(a.is_unspecified() || a.is_multicast()));
        if !unicast4 || !unicast6 {
            return Err(UserspaceError::Stack(format!(
                "unusable mesh addresses {} {:?}",
                p.v4, p.v6
            )));
        }
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(p.v4), 32));
            if let Some(v6) = p.v6 {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(v6), 128));
            }
        });
        // Everything else is reached through the data path, which routes by peer.
        let _ = iface.routes_mut().add_default_ipv4_route(p.v4);
        if let Some(v6) = p.v6 {
            let _ = iface.routes_mut().add_default_ipv6_route(v6);
        }

        let mut sockets = SocketSet::new(Vec::new());
        let mut ingress_tcp = HashMap::new();
        let mut ingress_udp = Vec::new();
        let mut egress_tcp = Vec::new();
        let mut egress_udp = Vec::new();
        let mut reserved = Vec::new();
        let Bound {
            mut tcp,
            mut udp,
            socks,
        } = p.bound;
        for (i, r) in p.rules.iter().enumerate() {
            match (r.direction, r.proto) {
                (Direction::Ingress, Proto::Tcp) => {
                    reserved.push(r.listen.port());
                    ingress_tcp.insert(
                        r.listen.port(),
                        IngressTcp {
                            rule: i,
                            target: r.target,
                            idle: Vec::new(),
                        },
                    );
                }
                (Direction::Ingress, Proto::Udp) => {
                    reserved.push(r.listen.port());
                    let mut s = udp_socket(256, 256 * 1024);
                    s.bind(r.listen.port())
                        .map_err(|e| UserspaceError::Stack(format!("{r}: {e}")))?;
                    ingress_udp.push(IngressUdp {
                        rule: i,
                        target: r.target,
                        handle: sockets.add(s),
                        flows: FlowTable::new(UDP_IDLE, MAX_UDP_FLOWS),
                    });
                }
                (Direction::Egress, Proto::Tcp) => {
                    let l = tcp
                        .remove(&i)
                        .ok_or_else(|| UserspaceError::Stack(format!("{r}: listener not bound")))?;
                    egress_tcp.push(EgressTcp {
                        rule: i,
                        target: r.target,
                        listener: TcpListener::from_std(l).map_err(|e| stack_err("listener", e))?,
                    });
                }
                (Direction::Egress, Proto::Udp) => {
                    let s = udp
                        .remove(&i)
                        .ok_or_else(|| UserspaceError::Stack(format!("{r}: socket not bound")))?;
                    egress_udp.push(EgressUdp {
                        rule: i,
                        target: r.target,
                        socket: UdpSocket::from_std(s).map_err(|e| stack_err("socket", e))?,
                        flows: FlowTable::new(UDP_IDLE, MAX_UDP_FLOWS),
                    });
                }
            }
        }
        let socks_listener = socks
            .map(TcpListener::from_std)
            .transpose()
            .map_err(|e| stack_err("SOCKS5 listener", e))?;
        let (socks_tx, socks_rx) = mpsc::channel(64);
        Ok(Self {
            iface,
            sockets,
            dev,
            epoch,
            v4: p.v4,
            v6: p.v6,
            rules: p.rules,
            socks_addr: p.socks5,
            ingress_tcp,
            ingress_udp,
            egress_tcp,
            egress_udp,
            socks_listener,
            socks_tx,
            socks_rx,
            associations: Vec::new(),
            tcp: HashMap::new(),
            ingress_tuples: HashMap::new(),
            draining: Vec::new(),
            ports: PortAllocator::new(rand::random(), reserved),
            ended: Vec::new(),
            udp_buf: vec![0; 65_536 + socks::MAX_UDP_HEADER],
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            status,
            status_dirty: true,
            status_at: epoch,
        })
    }

    fn smol_now(&self) -> smoltcp::time::Instant {
        let us = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(us)
    }

    fn ours(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.v4,
            IpAddr::V6(a) => Some(a) == self.v6,
        }
    }

    fn has_flows(&self) -> bool {
        !self.tcp.is_empty()
            || !self.associations.is_empty()
            || self.ingress_udp.iter().any(|r| !r.flows.is_empty())
            || self.egress_udp.iter().any(|r| !r.flows.is_empty())
    }

    fn tcp_sockets(&self) -> usize {
        self.tcp.len()
            + self.draining.len()
            + self
                .ingress_tcp
                .values()
                .map(|i| i.idle.len())
                .sum::<usize>()
    }

    /// Runs until `shutdown` or until the data path goes away.
    pub async fn run(mut self, mut shutdown: tokio::sync::oneshot::Receiver<()>) {
        std::future::poll_fn(|cx| {
            if Pin::new(&mut shutdown).poll(cx).is_ready() {
                return Poll::Ready(());
            }
            self.poll(cx)
        })
        .await;
        tracing::info!("userspace stack stopped");
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut budget = LOOP_BUDGET;
        loop {
            let mut progress = self.accept(cx);
            progress |= self.ingest(cx);
            progress |= self.drive_tcp(cx);
            progress |= self.drive_udp(cx);
            progress |= self.drive_associations(cx);
            progress |= self.egress(cx);
            progress |= self.dev.flush(cx);
            self.reap();
            if self.dev.broken() {
                tracing::error!("the data path went away; userspace stack stops");
                return Poll::Ready(());
            }
            if !progress {
                break;
            }
            budget -= 1;
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let now = Instant::now();
        let mut next = self.expire_udp(now);
        // Flows come and go: soon. Byte counts move: every second.
        let every = if self.status_dirty {
            Some(STATUS_EVERY)
        } else if self.has_flows() {
            Some(STATUS_REFRESH)
        } else {
            None
        };
        if let Some(every) = every {
            if now >= self.status_at + every {
                self.publish_status(now);
            } else {
                next = next.min(self.status_at + every);
            }
        }
        if !self.dev.blocked() {
            let smol_now = self.smol_now();
            if let Some(d) = self.iface.poll_delay(smol_now, &self.sockets) {
                // A socket that cannot move (one waiting for its local connection)
                // asks for "now" forever: look again shortly instead of spinning.
                let d = Duration::from_micros(d.total_micros()).max(Duration::from_millis(1));
                next = next.min(now + d);
            }
        }
        self.timer.as_mut().reset(next.into());
        if self.timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// New local connections: egress listeners, the SOCKS5 listener, negotiated
    /// SOCKS5 requests.
    fn accept(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        for i in 0..self.egress_tcp.len() {
            for _ in 0..INGEST_BATCH {
                let Some(e) = self.egress_tcp.get(i) else {
                    break;
                };
                let (rule, target) = (e.rule, e.target);
                match e.listener.poll_accept(cx) {
                    Poll::Ready(Ok((stream, peer))) => {
                        progress = true;
                        self.open_egress(rule, Origin::Egress, stream, peer, target, Vec::new());
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "accept failed");
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if let Some(l) = &self.socks_listener {
            for _ in 0..INGEST_BATCH {
                match l.poll_accept(cx) {
                    Poll::Ready(Ok((stream, peer))) => {
                        progress = true;
                        let tx = self.socks_tx.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(SOCKS_TIMEOUT, negotiate(stream, peer, tx))
                                .await
                            {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "SOCKS5 client refused")
                                }
                                Err(_) => tracing::debug!(%peer, "SOCKS5 negotiation timed out"),
                            }
                        });
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "SOCKS5 accept failed");
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        while let Poll::Ready(Some(job)) = self.socks_rx.poll_recv(cx) {
            progress = true;
            let rule = self.rules.len();
            match job.command {
                socks::Command::Connect => self.open_egress(
                    rule,
                    Origin::Socks,
                    job.stream,
                    job.peer,
                    job.target,
                    job.early,
                ),
                _ => self.open_association(job),
            }
        }
        progress
    }

    /// Why a mesh destination cannot be reached from here, if it cannot.
    fn unreachable(&self, target: SocketAddr) -> Option<Reply> {
        if target.is_ipv6() && self.v6.is_none() {
            return Some(Reply::NetworkUnreachable);
        }
        if self.ours(target.ip()) || target.ip().is_unspecified() || target.ip().is_multicast() {
            return Some(Reply::HostUnreachable);
        }
        None
    }

    /// A local connection (egress rule or SOCKS5 CONNECT) to carry to `target`.
    fn open_egress(
        &mut self,
        rule: usize,
        origin: Origin,
        stream: TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        early: Vec<u8>,
    ) {
        let refuse = |stream: TcpStream, reply: Reply| {
            if origin == Origin::Socks {
                let mut out = [0; socks::MAX_REPLY];
                let n = socks::encode_reply(reply, SocketAddr::from(([0, 0, 0, 0], 0)), &mut out);
                let _ = stream.try_write(out.get(..n).unwrap_or_default());
                drop(stream);
            } else {
                reset(stream);
            }
        };
        if let Some(reply) = self.unreachable(target) {
            tracing::debug!(%peer, %target, ?reply, "mesh destination unreachable");
            return refuse(stream, reply);
        }
        if self.tcp_sockets() >= MAX_TCP_SOCKETS {
            tracing::warn!(%peer, %target, "too many connections; refused");
            return refuse(stream, Reply::GeneralFailure);
        }
        let Some(port) = self.ports.alloc() else {
            return refuse(stream, Reply::GeneralFailure);
        };
        let mut s = tcp_socket();
        if let Err(e) = s.connect(self.iface.context(), IpEndpoint::from(target), port) {
            self.ports.release(port);
            tracing::debug!(%target, error = %e, "cannot connect");
            return refuse(stream, Reply::HostUnreachable);
        }
        let _ = stream.set_nodelay(true);
        let handle = self.sockets.add(s);
        tracing::debug!(%peer, %target, port, ?origin, "flow opening");
        self.tcp.insert(
            handle,
            TcpFlow {
                rule,
                origin,
                from: peer,
                to: target,
                local: Local::Stream(stream),
                to_local: Prefix::default(),
                to_mesh: Prefix { buf: early, at: 0 },
                socks_reply: origin == Origin::Socks,
                local_eof: false,
                mesh_fin: false,
                mesh_eof: false,
                established: false,
                deadline: Some(Instant::now() + CONNECT_TIMEOUT),
                port: Some(port),
                tuple: None,
                to_mesh_bytes: 0,
                from_mesh_bytes: 0,
            },
        );
        self.status_dirty = true;
    }

    /// A SOCKS5 UDP ASSOCIATE: a local relay socket and a stack socket.
    fn open_association(&mut self, job: SocksJob) {
        let fail = |stream: &TcpStream, reply: Reply| {
            let mut out = [0; socks::MAX_REPLY];
            let n = socks::encode_reply(reply, SocketAddr::from(([0, 0, 0, 0], 0)), &mut out);
            let _ = stream.try_write(out.get(..n).unwrap_or_default());
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
        let mut s = udp_socket(64, 128 * 1024);
        if s.bind(port).is_err() {
            self.ports.release(port);
            return fail(&job.stream, Reply::GeneralFailure);
        }
        let mut out = [0; socks::MAX_REPLY];
        let n = socks::encode_reply(Reply::Succeeded, relay_addr, &mut out);
        if !matches!(job.stream.try_write(out.get(..n).unwrap_or_default()), Ok(w) if w == n) {
            self.ports.release(port);
            return;
        }
        tracing::debug!(peer = %job.peer, relay = %relay_addr, "SOCKS5 UDP association");
        // The client may name the address it will send from; zeros mean "unknown".
        let client = Some(job.target).filter(|t| !t.ip().is_unspecified() && t.port() != 0);
        self.associations.push(Association {
            control: job.stream,
            relay,
            relay_addr,
            handle: self.sockets.add(s),
            port,
            client_ip: job.peer.ip(),
            client,
            to_mesh_bytes: 0,
            from_mesh_bytes: 0,
        });
        self.status_dirty = true;
    }

    /// Packets from the data path, one at a time into the stack.
    fn ingest(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        for _ in 0..INGEST_BATCH {
            // Answers to these packets need room on the way out.
            if self.dev.blocked() {
                break;
            }
            let Some(packet) = self.dev.next_packet(cx) else {
                break;
            };
            progress = true;
            let syn = super::packet::tcp_syn(packet)
                .filter(|s| self.ours(s.dst.ip()) && self.ingress_tcp.contains_key(&s.dst.port()));
            if let Some(syn) = syn {
                if self.ingress_tuples.contains_key(&(syn.src, syn.dst)) {
                    // A repeated SYN: the connection exists (its SYN-ACK may be held
                    // until the local service answers).
                    self.dev.skip();
                    continue;
                }
                self.arm_listener(syn.dst.port());
            }
            let now = self.smol_now();
            self.iface
                .poll_ingress_single(now, &mut self.dev, &mut self.sockets);
            if let Some(syn) = syn {
                self.take_connection(syn.dst.port());
            }
        }
        progress
    }

    /// Makes sure a listening socket waits on `port`.
    fn arm_listener(&mut self, port: u16) {
        let full = self.tcp_sockets() >= MAX_TCP_SOCKETS;
        let Some(ing) = self.ingress_tcp.get_mut(&port) else {
            return;
        };
        if !ing.idle.is_empty() {
            return;
        }
        if full {
            tracing::warn!(port, "too many connections; refusing");
            return;
        }
        let mut s = tcp_socket();
        // No SYN-ACK until the local service has accepted: a refused local connection
        // is a refused mesh connection.
        s.pause_synack(true);
        if s.listen(port).is_ok() {
            ing.idle.push(self.sockets.add(s));
        }
    }

    /// After a SYN on `port`: the listener that took it becomes a flow, and the
    /// connection to the local service starts.
    fn take_connection(&mut self, port: u16) {
        let Some(ing) = self.ingress_tcp.get_mut(&port) else {
            return;
        };
        let mut i = 0;
        while let Some(&h) = ing.idle.get(i) {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Listen {
                i += 1;
                continue;
            }
            ing.idle.swap_remove(i);
            let (Some(remote), Some(local)) = (s.remote_endpoint(), s.local_endpoint()) else {
                s.abort();
                self.draining.push((h, None, Instant::now()));
                continue;
            };
            let (remote, local) = (SocketAddr::from(remote), SocketAddr::from(local));
            let target = ing.target;
            tracing::debug!(%remote, %local, %target, "ingress flow opening");
            self.ingress_tuples.insert((remote, local), h);
            let connect: Connecting = Box::pin(async move {
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
                    .await
                    .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
            });
            self.tcp.insert(
                h,
                TcpFlow {
                    rule: ing.rule,
                    origin: Origin::Ingress,
                    from: remote,
                    to: target,
                    local: Local::Connecting(connect),
                    to_local: Prefix::default(),
                    to_mesh: Prefix::default(),
                    socks_reply: false,
                    local_eof: false,
                    mesh_fin: false,
                    mesh_eof: false,
                    established: false,
                    deadline: Some(Instant::now() + CONNECT_TIMEOUT),
                    port: None,
                    tuple: Some((remote, local)),
                    to_mesh_bytes: 0,
                    from_mesh_bytes: 0,
                },
            );
            self.status_dirty = true;
        }
    }

    fn drive_tcp(&mut self, cx: &mut Context<'_>) -> bool {
        let now = Instant::now();
        let mut progress = false;
        let mut ended = std::mem::take(&mut self.ended);
        for (&h, flow) in self.tcp.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match step(flow, s, cx, now) {
                Step::Idle => {}
                Step::Progress => progress = true,
                Step::End(end) => ended.push((h, end)),
            }
        }
        for (h, end) in ended.drain(..) {
            progress = true;
            self.end_flow(h, end);
        }
        self.ended = ended;
        progress
    }

    fn end_flow(&mut self, h: SocketHandle, end: End) {
        let Some(flow) = self.tcp.remove(&h) else {
            return;
        };
        self.status_dirty = true;
        if let Some(t) = flow.tuple {
            self.ingress_tuples.remove(&t);
        }
        tracing::debug!(from = %flow.from, to = %flow.to, origin = ?flow.origin, ?end, to_mesh = flow.to_mesh_bytes, from_mesh = flow.from_mesh_bytes, "flow closed");
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        match (end, flow.local) {
            (End::Graceful, Local::Stream(stream)) => drop(stream),
            (End::Failed(reply), Local::Stream(stream)) if flow.socks_reply => {
                s.abort();
                let mut out = [0; socks::MAX_REPLY];
                let n = socks::encode_reply(reply, SocketAddr::from(([0, 0, 0, 0], 0)), &mut out);
                let _ = stream.try_write(out.get(..n).unwrap_or_default());
            }
            (_, Local::Stream(stream)) => {
                s.abort();
                reset(stream);
            }
            (_, Local::Connecting(_)) => s.abort(),
        }
        self.draining.push((h, flow.port, Instant::now()));
    }

    /// Removes the smoltcp sockets of closed flows once their close is done.
    fn reap(&mut self) {
        let now = Instant::now();
        let sockets = &mut self.sockets;
        let ports = &mut self.ports;
        self.draining.retain(|&(h, port, since)| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            if tcp_finished(s) || now >= since + DRAIN_TIMEOUT {
                sockets.remove(h);
                if let Some(p) = port {
                    ports.release(p);
                }
                false
            } else {
                true
            }
        });
    }

    /// Lets the stack send (one segment per socket per round).
    fn egress(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        for _ in 0..INGEST_BATCH {
            if self.dev.queued() >= FLUSH_AT {
                // Keep the data path busy while the stack goes on.
                self.dev.flush(cx);
            }
            if self.dev.blocked() {
                break;
            }
            let now = self.smol_now();
            match self
                .iface
                .poll_egress(now, &mut self.dev, &mut self.sockets)
            {
                smoltcp::iface::PollResult::SocketStateChanged => progress = true,
                smoltcp::iface::PollResult::None => break,
            }
        }
        progress
    }

    fn drive_udp(&mut self, cx: &mut Context<'_>) -> bool {
        let now = Instant::now();
        let mut progress = false;
        let buf = &mut self.udp_buf;
        let sockets = &mut self.sockets;
        for rule in &mut self.ingress_udp {
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
                let flow = match rule.flows.touch(&key, now) {
                    Some(f) => f,
                    None => match udp_connected(rule.target) {
                        Ok(sock) => {
                            let f = UdpLocal {
                                sock,
                                to_mesh_bytes: 0,
                                from_mesh_bytes: 0,
                            };
                            match rule.flows.insert(key, f, now) {
                                Ok(f) => {
                                    self.status_dirty = true;
                                    f
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "UDP datagram dropped");
                                    continue;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(target = %rule.target, error = %e, "cannot open a UDP socket");
                            continue;
                        }
                    },
                };
                flow.from_mesh_bytes += data.len() as u64;
                let _ = flow.sock.try_send(data);
            }
            // Local service → mesh.
            rule.flows.visit(now, |&(peer, local), f| {
                let mut active = false;
                for _ in 0..INGEST_BATCH {
                    match f.sock.poll_recv_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        _ => break,
                    }
                    match f.sock.try_recv(buf) {
                        Ok(n) => {
                            active = true;
                            f.to_mesh_bytes += n as u64;
                            let meta = udp::UdpMetadata {
                                endpoint: peer.into(),
                                local_address: Some(local.into()),
                                meta: Default::default(),
                            };
                            let _ = s.send_slice(buf.get(..n).unwrap_or_default(), meta);
                        }
                        Err(e) if would_block(&e) => continue,
                        Err(_) => break,
                    }
                }
                progress |= active;
                active
            });
        }
        for rule in &mut self.egress_udp {
            // Local client → mesh: one stack socket (source port) per client.
            for _ in 0..INGEST_BATCH {
                match rule.socket.poll_recv_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    _ => break,
                }
                let (n, client) = match rule.socket.try_recv_from(buf) {
                    Ok(r) => r,
                    Err(e) if would_block(&e) => continue,
                    Err(_) => break,
                };
                progress = true;
                let flow = match rule.flows.touch(&client, now) {
                    Some(f) => f,
                    None => {
                        let Some(port) = self.ports.alloc() else {
                            continue;
                        };
                        let mut s = udp_socket(64, 128 * 1024);
                        if s.bind(port).is_err() {
                            self.ports.release(port);
                            continue;
                        }
                        let handle = sockets.add(s);
                        let f = MeshUdp {
                            handle,
                            port,
                            to_mesh_bytes: 0,
                            from_mesh_bytes: 0,
                        };
                        match rule.flows.insert(client, f, now) {
                            Ok(f) => {
                                self.status_dirty = true;
                                f
                            }
                            Err(e) => {
                                sockets.remove(handle);
                                self.ports.release(port);
                                tracing::debug!(error = %e, "UDP datagram dropped");
                                continue;
                            }
                        }
                    }
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

    fn drive_associations(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let buf = &mut self.udp_buf;
        let sockets = &mut self.sockets;
        let mut closed = Vec::new();
        for (i, a) in self.associations.iter_mut().enumerate() {
            // The association ends with its control connection.
            let mut scratch = [0u8; 64];
            loop {
                match a.control.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => {
                        closed.push(i);
                        break;
                    }
                    Poll::Pending => break,
                }
                match a.control.try_read(&mut scratch) {
                    Ok(0) => {
                        closed.push(i);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if would_block(&e) => {}
                    Err(_) => {
                        closed.push(i);
                        break;
                    }
                }
            }
            let s = sockets.get_mut::<udp::Socket>(a.handle);
            for _ in 0..INGEST_BATCH {
                match a.relay.poll_recv_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    _ => break,
                }
                let (n, from) = match a.relay.try_recv_from(buf) {
                    Ok(r) => r,
                    Err(e) if would_block(&e) => continue,
                    Err(_) => break,
                };
                progress = true;
                // Only the client that asked may use the relay.
                if from.ip() != a.client_ip || a.client.is_some_and(|c| c != from) {
                    continue;
                }
                a.client = Some(from);
                let Some(datagram) = buf.get(..n) else {
                    continue;
                };
                let Ok((dst, start)) = socks::parse_udp_header(datagram) else {
                    continue;
                };
                let Some(dst) = dst.ip() else {
                    continue;
                };
                let v6_ok = self.v6.is_some() || dst.is_ipv4();
                if let (true, Some(payload)) = (v6_ok, datagram.get(start..)) {
                    a.to_mesh_bytes += payload.len() as u64;
                    let _ = s.send_slice(payload, dst);
                }
            }
            while let Ok((data, meta)) = s.recv() {
                progress = true;
                let Some(client) = a.client else {
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
        for i in closed.into_iter().rev() {
            progress = true;
            let a = self.associations.swap_remove(i);
            tracing::debug!(relay = %a.relay_addr, "SOCKS5 UDP association closed");
            self.sockets.remove(a.handle);
            self.ports.release(a.port);
            self.status_dirty = true;
        }
        progress
    }

    /// Forgets idle UDP flows; returns when to look again.
    fn expire_udp(&mut self, now: Instant) -> Instant {
        let mut next = now + Duration::from_secs(3600);
        for rule in &mut self.ingress_udp {
            if !rule.flows.expire(now).is_empty() {
                self.status_dirty = true;
            }
            if let Some(t) = rule.flows.next_expiry() {
                next = next.min(t);
            }
        }
        for rule in &mut self.egress_udp {
            for (client, f) in rule.flows.expire(now) {
                tracing::debug!(%client, "UDP flow expired");
                self.sockets.remove(f.handle);
                self.ports.release(f.port);
                self.status_dirty = true;
            }
            if let Some(t) = rule.flows.next_expiry() {
                next = next.min(t);
            }
        }
        next
    }

    fn publish_status(&mut self, now: Instant) {
        self.status_dirty = false;
        self.status_at = now;
        let mut counts = vec![0usize; self.rules.len() + 1];
        let mut open_flows = Vec::new();
        let socks_name = self.socks_addr.map(|a| format!("socks5 {a}"));
        let name = |rule: usize| {
            self.rules
                .get(rule)
                .map(ToString::to_string)
                .or_else(|| socks_name.clone())
                .unwrap_or_default()
        };
        for f in self.tcp.values() {
            if let Some(c) = counts.get_mut(f.rule) {
                *c += 1;
            }
            open_flows.push(FlowStatus {
                rule: name(f.rule),
                proto: "tcp".into(),
                from: f.from,
                to: f.to,
                to_mesh_bytes: f.to_mesh_bytes,
                from_mesh_bytes: f.from_mesh_bytes,
            });
        }
        for r in &self.ingress_udp {
            if let Some(c) = counts.get_mut(r.rule) {
                *c += r.flows.len();
            }
            for ((peer, _), f) in r.flows.iter() {
                open_flows.push(FlowStatus {
                    rule: name(r.rule),
                    proto: "udp".into(),
                    from: *peer,
                    to: r.target,
                    to_mesh_bytes: f.to_mesh_bytes,
                    from_mesh_bytes: f.from_mesh_bytes,
                });
            }
        }
        for r in &self.egress_udp {
            if let Some(c) = counts.get_mut(r.rule) {
                *c += r.flows.len();
            }
            for (client, f) in r.flows.iter() {
                open_flows.push(FlowStatus {
                    rule: name(r.rule),
                    proto: "udp".into(),
                    from: *client,
                    to: r.target,
                    to_mesh_bytes: f.to_mesh_bytes,
                    from_mesh_bytes: f.from_mesh_bytes,
                });
            }
        }
        for a in &self.associations {
            if let Some(c) = counts.last_mut() {
                *c += 1;
            }
            open_flows.push(FlowStatus {
                rule: name(self.rules.len()),
                proto: "udp".into(),
                from: a.client.unwrap_or(SocketAddr::new(a.client_ip, 0)),
                to: a.relay_addr,
                to_mesh_bytes: a.to_mesh_bytes,
                from_mesh_bytes: a.from_mesh_bytes,
            });
        }
        open_flows.sort_by(|a, b| (&a.rule, a.from, a.to).cmp(&(&b.rule, b.from, b.to)));
        let mut rules: Vec<RuleStatus> = self
            .rules
            .iter()
            .zip(&counts)
            .map(|(r, &n)| RuleStatus {
                rule: r.to_string(),
                open_flows: n,
            })
            .collect();
        if let Some(s) = socks_name.clone() {
            rules.push(RuleStatus {
                rule: s,
                open_flows: counts.last().copied().unwrap_or(0),
            });
        }
        let snapshot = UserspaceStatus { rules, open_flows };
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }
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

/// One TCP flow: opening, bytes both ways, closes passed on.
fn step(
    flow: &mut TcpFlow,
    s: &mut tcp::Socket<'static>,
    cx: &mut Context<'_>,
    now: Instant,
) -> Step {
    let mut progress = false;
    if let Local::Connecting(fut) = &mut flow.local {
        if !matches!(s.state(), tcp::State::SynReceived) {
            // The mesh peer gave up (reset) before the local service answered.
            return Step::End(End::Abort);
        }
        match fut.as_mut().poll(cx) {
            Poll::Pending => return Step::Idle,
            Poll::Ready(Err(e)) => {
                tracing::debug!(target = %flow.to, error = %e, "local service refused");
                return Step::End(End::Abort);
            }
            Poll::Ready(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                flow.local = Local::Stream(stream);
                s.pause_synack(false);
                progress = true;
            }
        }
    }
    let Local::Stream(stream) = &flow.local else {
        return Step::Idle;
    };

    if !flow.established {
        match s.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                if flow.deadline.is_some_and(|d| now >= d) {
                    return Step::End(End::Failed(Reply::HostUnreachable));
                }
                return if progress { Step::Progress } else { Step::Idle };
            }
            tcp::State::Closed | tcp::State::Listen => {
                return Step::End(End::Failed(Reply::ConnectionRefused));
            }
            _ => {
                flow.established = true;
                flow.deadline = None;
                s.set_timeout(Some(smoltcp::time::Duration::from_secs(
                    TCP_TIMEOUT.as_secs(),
                )));
                progress = true;
                if flow.socks_reply {
                    flow.socks_reply = false;
                    let bound = s
                        .local_endpoint()
                        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), SocketAddr::from);
                    let mut out = [0; socks::MAX_REPLY];
                    let n = socks::encode_reply(Reply::Succeeded, bound, &mut out);
                    flow.to_local
                        .buf
                        .extend_from_slice(out.get(..n).unwrap_or_default());
                }
            }
        }
    }

    // Mesh → local.
    loop {
        let pending = flow.to_local.pending();
        if pending.is_empty() && !s.can_recv() {
            break;
        }
        match stream.poll_write_ready(cx) {
            Poll::Pending => break,
            Poll::Ready(Err(_)) => return Step::End(End::Abort),
            Poll::Ready(Ok(())) => {}
        }
        if !pending.is_empty() {
            match stream.try_write(pending) {
                Ok(n) => {
                    flow.to_local.at += n;
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => return Step::End(End::Abort),
            }
            continue;
        }
        let r = s.recv(|data| match stream.try_write(data) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(n)) => {
                flow.from_mesh_bytes += n as u64;
                progress = true;
            }
            Ok(Err(e)) if would_block(&e) => {}
            Ok(Err(_)) => return Step::End(End::Abort),
            Err(_) => break,
        }
    }
    if !flow.mesh_fin {
        if s.state() == tcp::State::TimeWait && s.can_recv() {
            // TIME-WAIT ends with the buffers cleared: keep what the local side has
            // not taken yet.
            while let Ok(n) = s.recv(|data| {
                flow.to_local.buf.extend_from_slice(data);
                (data.len(), data.len())
            }) {
                if n == 0 {
                    break;
                }
                flow.from_mesh_bytes += n as u64;
            }
            progress = true;
        }
        if !s.can_recv() {
            match s.recv(|_| (0, ())) {
                Err(tcp::RecvError::Finished) => {
                    flow.mesh_fin = true;
                    progress = true;
                }
                // Reset by the mesh peer, or timed out.
                Err(tcp::RecvError::InvalidState) => return Step::End(End::MeshGone),
                Ok(()) => {}
            }
        }
    }
    if flow.mesh_fin && !flow.mesh_eof && flow.to_local.pending().is_empty() {
        flow.mesh_eof = true;
        flow.to_local = Prefix::default();
        progress = true;
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    }
    if s.state() == tcp::State::Closed && !flow.local_eof && !s.can_recv() {
        // The mesh side can take no more (reset after its FIN).
        return Step::End(End::MeshGone);
    }

    // Local → mesh.
    if !flow.local_eof {
        loop {
            if !flow.to_mesh.pending().is_empty() {
                match s.send_slice(flow.to_mesh.pending()) {
                    Ok(n) if n > 0 => {
                        flow.to_mesh.at += n;
                        progress = true;
                        continue;
                    }
                    _ => break,
                }
            }
            if !s.may_send() || s.send_queue() >= s.send_capacity() {
                break;
            }
            match stream.poll_read_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => return Step::End(End::Abort),
                Poll::Ready(Ok(())) => {}
            }
            let r = s.send(|buf| {
                if buf.is_empty() {
                    return (0, Err(ErrorKind::WouldBlock.into()));
                }
                match stream.try_read(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                }
            });
            match r {
                Ok(Ok(0)) => {
                    flow.local_eof = true;
                    s.close();
                    progress = true;
                    break;
                }
                Ok(Ok(n)) => {
                    flow.to_mesh_bytes += n as u64;
                    progress = true;
                }
                Ok(Err(e)) if would_block(&e) => {}
                Ok(Err(_)) => return Step::End(End::Abort),
                Err(_) => break,
            }
        }
    }

    if flow.local_eof && flow.mesh_eof {
        return Step::End(End::Graceful);
    }
    if progress { Step::Progress } else { Step::Idle }
}

/// SOCKS5 negotiation with one client, then the request goes to the driver.
async fn negotiate(
    mut stream: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<SocksJob>,
) -> Result<(), String> {
    let mut buf = [0u8; 600];
    let mut have = 0;
    let used = loop {
        match socks::parse_greeting(buf.get(..have).unwrap_or_default()) {
            Ok(Some(used)) => break used,
            Ok(None) => {}
            Err(e) => {
                if e == socks::SocksError::NoAcceptableMethod {
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
                    socks::SocksError::AddressType(_) | socks::SocksError::BadDomain => {
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
    if !matches!(
        command,
        socks::Command::Connect | socks::Command::UdpAssociate
    ) {
        let _ = write_reply(&mut stream, Reply::CommandNotSupported).await;
        return Err(format!("command {command:?} not supported"));
    }
    let target = match (command, request.address.ip()) {
        (_, Some(t)) => t,
        // The client does not know its UDP address yet.
        (socks::Command::UdpAssociate, None) => SocketAddr::from(([0, 0, 0, 0], 0)),
        (_, None) => {
            // Names are not resolved: mesh hosts are reached by address.
            let _ = write_reply(&mut stream, Reply::AddressTypeNotSupported).await;
            return Err(format!(
                "{:?}: domain names are not resolved",
                request.address
            ));
        }
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
    let n = socks::encode_reply(reply, SocketAddr::from(([0, 0, 0, 0], 0)), &mut out);
    stream.write_all(out.get(..n).unwrap_or_default()).await
}
