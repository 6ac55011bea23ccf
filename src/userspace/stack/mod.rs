//! The shell of rootless mode: one thread runs a current-thread tokio runtime whose
//! main task, the driver, owns the smoltcp interface, every smoltcp socket, its end of
//! the packet pipe and every local socket of every flow. Each turn reads the clock once,
//! takes packets from the data path one at a time (so a listening socket can be armed
//! before each new connection request), moves bytes between smoltcp sockets and local
//! sockets, lets smoltcp emit, and turns again until nothing moves (with an iteration
//! budget).
//!
//! Bytes go straight between a smoltcp buffer and a kernel socket (`try_read` into the
//! free part of the smoltcp transmit buffer, `try_write` from its receive buffer): a
//! flow holds at most its two smoltcp buffers, a full buffer stops reading the other
//! side, and the TCP windows do the rest.
//!
//! The decisions live in pure tables ([`TcpTable`], [`FlowTable`], [`RelayClient`],
//! [`MeshAddrs`], [`StatusClock`]); this module and its children `tcp` (TCP flows)
//! and `udp` (UDP flows and SOCKS5 associations) only do the I/O. SOCKS5 negotiation
//! runs in tasks of its own (`socks_session`), handing finished requests over.

mod tcp;
mod udp;

use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::device::PipeDevice;
use super::flows::{FlowTable, MAX_UDP_FLOWS, MeshAddrs, PortAllocator, RelayClient, UDP_IDLE};
use super::rule::{Direction, Proto, Rule};
use super::socks::{self, Command};
use super::socks_session::{self, SocksJob};
use super::status::{Due, Snapshot, StatusClock};
use super::tcp_flows::{End, MAX_TCP_SOCKETS, TcpTable};
use super::{Bound, UserspaceError, UserspaceStatus};

use tcp::{EgressTcp, Local};
use udp::{Association, EgressUdp, IngressUdp};

/// Turns of the driver loop per wakeup before it yields.
const LOOP_BUDGET: usize = 64;
/// Packets queued for the data path that are sent without waiting for the end of
/// the turn.
const FLUSH_AT: usize = 16;
/// Packets (or connections, or datagrams) taken from one source per turn.
const INGEST_BATCH: usize = 128;

pub struct Params {
    pub rules: Vec<Rule>,
    pub socks5: Option<SocketAddr>,
    pub bound: Bound,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    pub mtu: u16,
    /// Mesh DNS names: SOCKS5 domain names and named egress hosts resolve here.
    pub names: Names,
}

/// The mesh DNS names as the node's driver last published them.
pub type Names = tokio::sync::watch::Receiver<Arc<crate::node::dns::NameTable>>;

/// The SOCKS5 listener and the channel negotiated requests come back on.
struct SocksIntake {
    addr: Option<SocketAddr>,
    listener: Option<TcpListener>,
    tx: mpsc::Sender<SocksJob>,
    rx: mpsc::Receiver<SocksJob>,
    names: Names,
}

/// The UDP rules and SOCKS5 associations.
#[derive(Default)]
struct Udp {
    ingress: Vec<IngressUdp>,
    egress: Vec<EgressUdp>,
    associations: Vec<Association>,
}

impl Udp {
    fn has_flows(&self) -> bool {
        !self.associations.is_empty()
            || self.ingress.iter().any(|r| !r.flows.is_empty())
            || self.egress.iter().any(|r| !r.flows.is_empty())
    }
}

pub struct Driver {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: PipeDevice,
    /// The smoltcp clock's zero.
    epoch: Instant,
    addrs: MeshAddrs,
    rules: Vec<Rule>,
    tcp: TcpTable<SocketHandle, Local>,
    egress_tcp: Vec<EgressTcp>,
    udp: Udp,
    socks: SocksIntake,
    ports: PortAllocator,
    /// Flows ended this turn (kept for its allocation).
    ended: Vec<(SocketHandle, End)>,
    /// One datagram (with room for a SOCKS5 UDP header).
    udp_buf: Vec<u8>,
    timer: Pin<Box<tokio::time::Sleep>>,
    status: Arc<Mutex<UserspaceStatus>>,
    status_clock: StatusClock,
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

/// Drops a local connection with a reset instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

impl Driver {
    pub fn new(
        p: Params,
        pipe: crate::io::packet_pipe::End,
        status: Arc<Mutex<UserspaceStatus>>,
    ) -> Result<Self, UserspaceError> {
        let stack_err =
            |what: &str, e: std::io::Error| UserspaceError::Stack(format!("{what}: {e}"));
        let mut dev =
            PipeDevice::new(pipe, usize::from(p.mtu)).map_err(|e| stack_err("packet pipe", e))?;

        let addrs = MeshAddrs::new(p.v4, p.v6).ok_or_else(|| {
            UserspaceError::Stack(format!("unusable mesh addresses {} {:?}", p.v4, p.v6))
        })?;
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(p.v4), 32));
            if let Some(v6) = p.v6 {
                let _ = a.push(IpCidr::new(IpAddress::Ipv6(v6), 128));
            }
        });
        // Everything else is reached through the data path, which routes by peer.
        let _ = iface.routes_mut().add_default_ipv4_route(p.v4);
        if let Some(v6) = p.v6 {
            let _ = iface.routes_mut().add_default_ipv6_route(v6);
        }

        let mut sockets = SocketSet::new(Vec::new());
        let mut tcp_table = TcpTable::new(MAX_TCP_SOCKETS);
        let mut egress_tcp = Vec::new();
        let mut udp = Udp::default();
        let mut reserved = Vec::new();
        let Bound {
            tcp: mut bound_tcp,
            udp: mut bound_udp,
            socks,
        } = p.bound;
        for (i, r) in p.rules.iter().enumerate() {
            let (rule, target) = (i, r.target);
            match (r.direction, r.proto) {
                (Direction::Ingress, Proto::Tcp) => {
                    reserved.push(r.listen.port());
                    tcp_table.add_ingress(r.listen.port(), rule, target);
                }
                (Direction::Ingress, Proto::Udp) => {
                    reserved.push(r.listen.port());
                    let mut s = udp::stack_socket(256, 256 * 1024);
                    s.bind(r.listen.port())
                        .map_err(|e| UserspaceError::Stack(format!("{r}: {e}")))?;
                    udp.ingress.push(IngressUdp {
                        rule,
                        target,
                        handle: sockets.add(s),
                        flows: FlowTable::new(UDP_IDLE, MAX_UDP_FLOWS),
                    });
                }
                (Direction::Egress, Proto::Tcp) => {
                    let l = bound_tcp
                        .remove(&i)
                        .ok_or_else(|| UserspaceError::Stack(format!("{r}: listener not bound")))?;
                    egress_tcp.push(EgressTcp {
                        rule,
                        target,
                        listener: TcpListener::from_std(l).map_err(|e| stack_err("listener", e))?,
                    });
                }
                (Direction::Egress, Proto::Udp) => {
                    let s = bound_udp
                        .remove(&i)
                        .ok_or_else(|| UserspaceError::Stack(format!("{r}: socket not bound")))?;
                    udp.egress.push(EgressUdp {
                        rule,
                        target,
                        socket: tokio::net::UdpSocket::from_std(s)
                            .map_err(|e| stack_err("socket", e))?,
                        flows: FlowTable::new(UDP_IDLE, MAX_UDP_FLOWS),
                    });
                }
            }
        }
        let listener = socks
            .map(TcpListener::from_std)
            .transpose()
            .map_err(|e| stack_err("SOCKS5 listener", e))?;
        let (tx, rx) = mpsc::channel(64);
        let mut stack = Self {
            iface,
            sockets,
            dev,
            epoch,
            addrs,
            rules: p.rules,
            tcp: tcp_table,
            egress_tcp,
            udp,
            socks: SocksIntake {
                addr: p.socks5,
                listener,
                tx,
                rx,
                names: p.names,
            },
            ports: PortAllocator::new(rand::random(), reserved),
            ended: Vec::new(),
            udp_buf: vec![0; 65_536 + socks::MAX_UDP_HEADER],
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            status,
            status_clock: StatusClock::new(epoch),
        };
        stack.refresh_names(true);
        Ok(stack)
    }

    /// `now` on smoltcp's clock.
    fn smol(&self, now: Instant) -> smoltcp::time::Instant {
        let us = i64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(us)
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

    /// Egress rules to mesh names follow the mesh DNS table (checked once per wakeup:
    /// a named target matters only when a connection or datagram arrives, which wakes
    /// the driver). A name that does not resolve leaves the target unspecified:
    /// connections to it are closed, datagrams dropped.
    fn refresh_names(&mut self, force: bool) {
        if !force && !self.socks.names.has_changed().unwrap_or(false) {
            return;
        }
        let table = self.socks.names.borrow_and_update().clone();
        let resolve = |rule: &Rule, target: &mut SocketAddr| {
            if let Some(name) = &rule.target_name {
                let ip = table
                    .resolve(name)
                    .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |h| IpAddr::V4(h.v4));
                if ip != target.ip() {
                    tracing::info!(rule = %rule, %ip, "egress mesh name resolved");
                }
                target.set_ip(ip);
            }
        };
        for e in &mut self.egress_tcp {
            if let Some(r) = self.rules.get(e.rule) {
                resolve(r, &mut e.target);
            }
        }
        for e in &mut self.udp.egress {
            if let Some(r) = self.rules.get(e.rule) {
                resolve(r, &mut e.target);
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.refresh_names(false);
        let mut budget = LOOP_BUDGET;
        let now = loop {
            // The one clock read of the turn.
            let now = Instant::now();
            let mut progress = self.accept(cx, now);
            progress |= self.ingest(cx, now);
            progress |= self.drive_tcp(cx, now);
            progress |= self.drive_udp(cx, now);
            progress |= self.drive_associations(cx);
            progress |= self.egress(cx, now);
            progress |= self.dev.flush(cx);
            self.reap(now);
            if self.dev.broken() {
                tracing::error!("the data path went away; userspace stack stops");
                return Poll::Ready(());
            }
            if !progress {
                break now;
            }
            budget -= 1;
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        };
        let mut next = self.expire_udp(now);
        let has_flows = !self.tcp.is_empty() || self.udp.has_flows();
        match self.status_clock.poll(now, has_flows) {
            Due::Now => self.publish_status(),
            Due::At(t) => next = next.min(t),
            Due::Never => {}
        }
        let delay = if self.dev.blocked() {
            None
        } else {
            self.iface.poll_delay(self.smol(now), &self.sockets)
        };
        if let Some(d) = delay {
            // A socket that cannot move (one waiting for its local connection) asks
            // for "now" forever: look again shortly instead of spinning.
            let d = Duration::from_micros(d.total_micros()).max(Duration::from_millis(1));
            next = next.min(now + d);
        }
        self.timer.as_mut().reset(next.into());
        if self.timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// New local connections: egress listeners, the SOCKS5 listener, negotiated
    /// SOCKS5 requests.
    fn accept(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        for i in 0..self.egress_tcp.len() {
            for _ in 0..INGEST_BATCH {
                let Some(e) = self.egress_tcp.get(i) else {
                    break;
                };
                let (rule, target) = (e.rule, e.target);
                match e.listener.poll_accept(cx) {
                    Poll::Ready(Ok((stream, peer))) if target.ip().is_unspecified() => {
                        progress = true;
                        tracing::debug!(%peer, "egress mesh name does not resolve; connection closed");
                        drop(stream);
                    }
                    Poll::Ready(Ok((stream, peer))) => {
                        progress = true;
                        self.open_egress(rule, None, stream, peer, target, now);
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "accept failed");
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if let Some(l) = &self.socks.listener {
            for _ in 0..INGEST_BATCH {
                match l.poll_accept(cx) {
                    Poll::Ready(Ok((stream, peer))) => {
                        progress = true;
                        socks_session::spawn(
                            stream,
                            peer,
                            self.socks.tx.clone(),
                            self.socks.names.clone(),
                        );
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "SOCKS5 accept failed");
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        while let Poll::Ready(Some(job)) = self.socks.rx.poll_recv(cx) {
            progress = true;
            let rule = self.rules.len();
            match job.command {
                Command::Connect => {
                    let (stream, peer, target) = (job.stream, job.peer, job.target);
                    self.open_egress(rule, Some(job.early), stream, peer, target, now);
                }
                _ => self.open_association(job),
            }
        }
        progress
    }

    /// Packets from the data path, one at a time into the stack.
    fn ingest(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        let smol_now = self.smol(now);
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
                .filter(|s| self.addrs.ours(s.dst.ip()) && self.tcp.is_ingress(s.dst.port()));
            if let Some(syn) = syn {
                if self.tcp.is_repeat_syn(syn.src, syn.dst) {
                    // A repeated SYN: the connection exists (its SYN-ACK may be held
                    // until the local service answers).
                    self.dev.skip();
                    continue;
                }
                self.arm_listener(syn.dst.port());
            }
            self.iface
                .poll_ingress_single(smol_now, &mut self.dev, &mut self.sockets);
            if let Some(syn) = syn {
                self.take_connection(syn.dst.port(), now);
            }
        }
        progress
    }

    /// Lets the stack send (one segment per socket per round).
    fn egress(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        let smol_now = self.smol(now);
        for _ in 0..INGEST_BATCH {
            if self.dev.queued() >= FLUSH_AT {
                // Keep the data path busy while the stack goes on.
                self.dev.flush(cx);
            }
            if self.dev.blocked() {
                break;
            }
            match self
                .iface
                .poll_egress(smol_now, &mut self.dev, &mut self.sockets)
            {
                smoltcp::iface::PollResult::SocketStateChanged => progress = true,
                smoltcp::iface::PollResult::None => break,
            }
        }
        progress
    }

    fn publish_status(&self) {
        let mut s = Snapshot::new(&self.rules, self.socks.addr);
        for f in self.tcp.flows() {
            let bytes = (f.state.to_mesh_bytes, f.state.from_mesh_bytes);
            s.flow(f.rule, "tcp", (f.from, f.to), bytes);
        }
        self.udp.report(&mut s, self.rules.len());
        let snapshot = s.finish();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }
}
