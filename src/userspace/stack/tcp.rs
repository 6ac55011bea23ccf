//! The driver's TCP I/O: opening flows (egress listeners and SOCKS5 CONNECT towards
//! the mesh, armed listeners towards local services), moving each flow's bytes
//! between its smoltcp socket and its local connection, and closing both sides the
//! way the flow's [`End`] says. What each flow is and when it opens, ends or goes
//! is decided in [`TcpTable`] and [`TcpFlow`].

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;
use tokio::net::{TcpListener, TcpStream};

use super::super::socks::{self, Reply};
use super::super::socks_session;
use super::super::tcp_flows::{
    Arm, CONNECT_TIMEOUT, End, LocalClose, Opening, Origin, TCP_TIMEOUT, TcpFlow,
};
use super::{Driver, reset, would_block};

/// Receive and transmit buffer of each TCP flow in the stack (the receive buffer is
/// the advertised window, the transmit buffer bounds the bytes in flight). 1 MiB
/// rather than 256 KiB: a loaded tunnel's queueing adds to the RTT, and with 256 KiB
/// in flight a single stream waited on the window (benches/README.md, rootless).
const TCP_RX_BUFFER: usize = 1024 * 1024;
const TCP_TX_BUFFER: usize = 1024 * 1024;

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>>>>;

/// The local side of a TCP flow.
pub enum Local {
    /// Ingress: the connection to the local service is being opened (the mesh side
    /// waits in SYN-RECEIVED without answering).
    Connecting(Connecting),
    Stream(TcpStream),
}

/// An egress TCP rule: its local listener.
pub struct EgressTcp {
    pub rule: usize,
    pub target: SocketAddr,
    pub listener: TcpListener,
}

/// What one look at a flow did.
enum Step {
    Idle,
    Progress,
    End(End),
}

fn stack_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_RX_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_TX_BUFFER]),
    );
    // A proxy: the applications at both ends decide about coalescing.
    s.set_nagle_enabled(false);
    s
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
    /// A local connection to carry to `target`: an egress rule's (`early` is `None`)
    /// or a SOCKS5 CONNECT (with the bytes its client sent after the request).
    pub(super) fn open_egress(
        &mut self,
        rule: usize,
        early: Option<Vec<u8>>,
        stream: TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        now: Instant,
    ) {
        let origin = if early.is_some() {
            Origin::Socks
        } else {
            Origin::Egress
        };
        let refuse = |stream: TcpStream, reply: Reply| {
            if origin == Origin::Socks {
                socks_session::try_reply(&stream, reply, None);
            } else {
                reset(stream);
            }
        };
        if let Some(reply) = self.addrs.unreachable(target) {
            tracing::debug!(%peer, %target, ?reply, "mesh destination unreachable");
            return refuse(stream, reply);
        }
        if !self.tcp.has_room() {
            tracing::warn!(%peer, %target, "too many connections; refused");
            return refuse(stream, Reply::GeneralFailure);
        }
        let Some(port) = self.ports.alloc() else {
            return refuse(stream, Reply::GeneralFailure);
        };
        let mut s = stack_socket();
        if let Err(e) = s.connect(self.iface.context(), IpEndpoint::from(target), port) {
            self.ports.release(port);
            tracing::debug!(%target, error = %e, "cannot connect");
            return refuse(stream, Reply::HostUnreachable);
        }
        let _ = stream.set_nodelay(true);
        let handle = self.sockets.add(s);
        tracing::debug!(%peer, %target, port, ?origin, "flow opening");
        let local = Local::Stream(stream);
        let early = early.unwrap_or_default();
        let flow = TcpFlow::egress(rule, origin, peer, target, local, early, port, now);
        self.tcp.insert(handle, flow);
        self.status_clock.changed();
    }

    /// Makes sure a listening socket waits on ingress port `port`.
    pub(super) fn arm_listener(&mut self, port: u16) {
        match self.tcp.arm(port) {
            Arm::Ready => {}
            Arm::Full => tracing::warn!(port, "too many connections; refusing"),
            Arm::Needed => {
                let mut s = stack_socket();
                // No SYN-ACK until the local service has accepted: a refused local
                // connection is a refused mesh connection.
                s.pause_synack(true);
                if s.listen(port).is_ok() {
                    let h = self.sockets.add(s);
                    self.tcp.add_listener(port, h);
                }
            }
        }
    }

    /// After a SYN on `port`: the listener that took it becomes a flow, and the
    /// connection to the local service starts.
    pub(super) fn take_connection(&mut self, port: u16, now: Instant) {
        let Some(target) = self.tcp.target(port) else {
            return;
        };
        let mut i = 0;
        while let Some(h) = self.tcp.listener(port, i) {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Listen {
                i += 1;
                continue;
            }
            let (Some(remote), Some(local)) = (s.remote_endpoint(), s.local_endpoint()) else {
                s.abort();
                self.tcp.discard_listener(port, i, now);
                continue;
            };
            let (remote, local) = (SocketAddr::from(remote), SocketAddr::from(local));
            tracing::debug!(%remote, %local, %target, "ingress flow opening");
            let connect: Connecting = Box::pin(async move {
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
                    .await
                    .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
            });
            self.tcp
                .claim(port, i, (remote, local), Local::Connecting(connect), now);
            self.status_clock.changed();
        }
    }

    pub(super) fn drive_tcp(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        let mut ended = std::mem::take(&mut self.ended);
        for (h, flow) in self.tcp.flows_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match step(flow, s, cx, now) {
                Step::Idle => {}
                Step::Progress => progress = true,
                Step::End(end) => ended.push((h, end)),
            }
        }
        for (h, end) in ended.drain(..) {
            progress = true;
            self.end_flow(h, end, now);
        }
        self.ended = ended;
        progress
    }

    fn end_flow(&mut self, h: SocketHandle, end: End, now: Instant) {
        let Some(flow) = self.tcp.end(h, now) else {
            return;
        };
        self.status_clock.changed();
        tracing::debug!(from = %flow.from, to = %flow.to, origin = ?flow.origin, ?end, to_mesh = flow.state.to_mesh_bytes, from_mesh = flow.state.from_mesh_bytes, "flow closed");
        if end.aborts_mesh() {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
        }
        let close = flow.state.local_close(end);
        let Local::Stream(stream) = flow.local else {
            return;
        };
        match close {
            LocalClose::Fin => drop(stream),
            LocalClose::Reply(reply) => {
                socks_session::try_reply(&stream, reply, None);
            }
            LocalClose::Reset => reset(stream),
        }
    }

    /// Removes the smoltcp sockets of closed flows once their close is done.
    pub(super) fn reap(&mut self, now: Instant) {
        let sockets = &mut self.sockets;
        let ports = &mut self.ports;
        self.tcp.reap(now, |h, port, timed_out| {
            if !timed_out && !tcp_finished(sockets.get::<tcp::Socket>(h)) {
                return false;
            }
            sockets.remove(h);
            if let Some(p) = port {
                ports.release(p);
            }
            true
        });
    }
}

/// What a smoltcp `recv` or `send` that wrote into or read from the local socket did.
enum Moved {
    Bytes(usize),
    /// The local socket would block.
    Blocked,
    LocalError,
    /// The smoltcp socket cannot move bytes (any more).
    Stop,
}

fn moved<E>(r: Result<std::io::Result<usize>, E>) -> Moved {
    match r {
        Ok(Ok(n)) => Moved::Bytes(n),
        Ok(Err(e)) if would_block(&e) => Moved::Blocked,
        Ok(Err(_)) => Moved::LocalError,
        Err(_) => Moved::Stop,
    }
}

/// How much of a smoltcp buffer a local read or write took, and the result.
fn taken(r: std::io::Result<usize>) -> (usize, std::io::Result<usize>) {
    match r {
        Ok(n) => (n, Ok(n)),
        Err(e) => (0, Err(e)),
    }
}

/// One TCP flow: opening, bytes both ways, closes passed on.
fn step(
    flow: &mut TcpFlow<Local>,
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
    let TcpFlow {
        local: Local::Stream(stream),
        state: flow,
        ..
    } = flow
    else {
        return Step::Idle;
    };
    let stream: &TcpStream = stream;

    match flow.opening(s.state(), now) {
        Err(end) => return Step::End(end),
        Ok(Opening::Wait) => return if progress { Step::Progress } else { Step::Idle },
        Ok(Opening::Open) => {}
        Ok(Opening::Established { socks_reply }) => {
            s.set_timeout(Some(smoltcp::time::Duration::from_secs(
                TCP_TIMEOUT.as_secs(),
            )));
            progress = true;
            if socks_reply {
                let bound = s.local_endpoint().map(SocketAddr::from);
                let mut out = [0; socks::MAX_REPLY];
                let reply = socks_session::reply_bytes(Reply::Succeeded, bound, &mut out);
                flow.to_local.push(reply);
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
                    flow.to_local.advance(n);
                    progress = true;
                }
                Err(e) if would_block(&e) => {}
                Err(_) => return Step::End(End::Abort),
            }
            continue;
        }
        let n = match moved(s.recv(|data| taken(stream.try_write(data)))) {
            Moved::Bytes(n) => n,
            Moved::Blocked => continue,
            Moved::LocalError => return Step::End(End::Abort),
            Moved::Stop => break,
        };
        flow.from_mesh_bytes += n as u64;
        progress = true;
    }
    if !flow.mesh_fin() {
        if s.state() == tcp::State::TimeWait && s.can_recv() {
            // TIME-WAIT ends with the buffers cleared: keep what the local side has
            // not taken yet.
            while let Ok(n) = s.recv(|data| {
                flow.to_local.push(data);
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
                    flow.mesh_finished();
                    progress = true;
                }
                // Reset by the mesh peer, or timed out.
                Err(tcp::RecvError::InvalidState) => return Step::End(End::MeshGone),
                Ok(()) => {}
            }
        }
    }
    if flow.take_fin_to_local() {
        progress = true;
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    }
    if let Some(end) = flow.finished(s.state(), s.can_recv()) {
        return Step::End(end);
    }

    // Local → mesh.
    if !flow.local_eof() {
        loop {
            if !flow.to_mesh.pending().is_empty() {
                match s.send_slice(flow.to_mesh.pending()) {
                    Ok(n) if n > 0 => {
                        flow.to_mesh.advance(n);
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
                taken(stream.try_read(buf))
            });
            match moved(r) {
                Moved::Bytes(0) => {
                    flow.local_finished();
                    s.close();
                    progress = true;
                    break;
                }
                Moved::Bytes(n) => {
                    flow.to_mesh_bytes += n as u64;
                    progress = true;
                }
                Moved::Blocked => {}
                Moved::LocalError => return Step::End(End::Abort),
                Moved::Stop => break,
            }
        }
    }

    if let Some(end) = flow.finished(s.state(), s.can_recv()) {
        return Step::End(end);
    }
    if progress { Step::Progress } else { Step::Idle }
}
