//! The rootless stack's TCP bookkeeping, without I/O: which stack socket carries which
//! flow (and for which rule), the listening sockets armed on each ingress port, the
//! bound on sockets, repeated SYNs, each flow's opening and closing phases, how an
//! ended flow closes its local side, and the sockets that still finish their TCP close
//! after their flow ended. Time is passed in as `now`.
//!
//! Not here: smoltcp sockets and kernel sockets, moving bytes (the driver in `stack`
//! does that, and stores its local-side object in each flow as `L`). Handles are any
//! `H` (smoltcp's `SocketHandle` in the driver), so the table is tested without a
//! stack.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::State;

use super::socks::Reply;

/// TCP sockets in the stack at once (flows, closing ones and armed listeners).
pub const MAX_TCP_SOCKETS: usize = 1024;
/// Opening a connection (to the mesh or to the local service).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Sent data unacknowledged for this long ends a connection.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(120);
/// A closing connection is dropped after this long whatever its state.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a TCP flow came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Ingress,
    Egress,
    Socks,
}

/// How a TCP flow ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Graceful,
    /// The mesh side reset or timed out: reset the local side.
    MeshGone,
    /// Reset both sides (a local reset or a local error).
    Abort,
    /// The mesh connection could not be opened.
    Failed(Reply),
}

/// What happens to the local connection of an ended flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalClose {
    /// Closed normally (FIN).
    Fin,
    /// A SOCKS5 client still waiting for its reply gets this failure reply.
    Reply(Reply),
    /// Reset.
    Reset,
}

impl End {
    /// Whether the stack socket is aborted (a reset to the mesh peer, if it has one).
    pub fn aborts_mesh(self) -> bool {
        self != End::Graceful
    }
}

/// Bytes to write before the flow's own data (a SOCKS5 reply, or data a SOCKS5 client
/// sent before its reply).
#[derive(Debug, Default)]
pub struct Prefix {
    buf: Vec<u8>,
    at: usize,
}

impl Prefix {
    pub fn new(buf: Vec<u8>) -> Self {
        Self { buf, at: 0 }
    }

    pub fn pending(&self) -> &[u8] {
        self.buf.get(self.at..).unwrap_or_default()
    }

    /// `n` bytes of `pending` were written.
    pub fn advance(&mut self, n: usize) {
        self.at = (self.at + n).min(self.buf.len());
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }
}

/// Where a flow's opening stands after a look at its stack socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Still opening.
    Wait,
    /// Open from now on: arm the socket's timeout; `socks_reply` says whether the
    /// SOCKS5 success reply is now owed to the client.
    Established { socks_reply: bool },
    /// Was already open.
    Open,
}

/// One TCP flow: its rule, ends, local-side object `L` and [`FlowState`].
#[derive(Debug)]
pub struct TcpFlow<L> {
    pub rule: usize,
    pub origin: Origin,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub local: L,
    pub state: FlowState,
    /// The stack's own port (egress and SOCKS5 flows), released when the socket goes.
    port: Option<u16>,
    /// Ingress: (mesh peer, our address), the key of repeated SYNs.
    tuple: Option<(SocketAddr, SocketAddr)>,
}

/// A flow's phases, pending prefixes and byte counts.
#[derive(Debug, Default)]
pub struct FlowState {
    pub to_local: Prefix,
    pub to_mesh: Prefix,
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
    pub to_mesh_bytes: u64,
    pub from_mesh_bytes: u64,
}

impl<L> TcpFlow<L> {
    /// A local connection (egress rule or SOCKS5 CONNECT, whose client may have sent
    /// `early` bytes already) carried to `to` from the stack's `port`.
    #[allow(clippy::too_many_arguments)]
    pub fn egress(
        rule: usize,
        origin: Origin,
        from: SocketAddr,
        to: SocketAddr,
        local: L,
        early: Vec<u8>,
        port: u16,
        now: Instant,
    ) -> Self {
        Self {
            rule,
            origin,
            from,
            to,
            local,
            state: FlowState {
                to_mesh: Prefix::new(early),
                socks_reply: origin == Origin::Socks,
                deadline: Some(now + CONNECT_TIMEOUT),
                ..FlowState::default()
            },
            port: Some(port),
            tuple: None,
        }
    }
}

impl FlowState {
    /// Examines the stack socket's `state` while the flow is not yet known open.
    pub fn opening(&mut self, state: State, now: Instant) -> Result<Opening, End> {
        if self.established {
            return Ok(Opening::Open);
        }
        match state {
            State::SynSent | State::SynReceived => {
                if self.deadline.is_some_and(|d| now >= d) {
                    Err(End::Failed(Reply::HostUnreachable))
                } else {
                    Ok(Opening::Wait)
                }
            }
            State::Closed | State::Listen => Err(End::Failed(Reply::ConnectionRefused)),
            _ => {
                self.established = true;
                self.deadline = None;
                let socks_reply = std::mem::take(&mut self.socks_reply);
                Ok(Opening::Established { socks_reply })
            }
        }
    }

    pub fn local_eof(&self) -> bool {
        self.local_eof
    }

    /// The local side sent FIN.
    pub fn local_finished(&mut self) {
        self.local_eof = true;
    }

    pub fn mesh_fin(&self) -> bool {
        self.mesh_fin
    }

    /// The mesh side sent FIN and everything before it left the stack socket.
    pub fn mesh_finished(&mut self) {
        self.mesh_fin = true;
    }

    /// True once, when the mesh side's FIN is to be passed on to the local side (it
    /// finished and everything before it was written).
    pub fn take_fin_to_local(&mut self) -> bool {
        if !self.mesh_fin || self.mesh_eof || !self.to_local.pending().is_empty() {
            return false;
        }
        self.mesh_eof = true;
        self.to_local = Prefix::default();
        true
    }

    /// Whether the flow ends now, given its stack socket's state: both sides closed,
    /// or the mesh side can take nothing more (reset after its FIN) while the local
    /// side still sends.
    pub fn finished(&self, state: State, can_recv: bool) -> Option<End> {
        if self.local_eof && self.mesh_eof {
            return Some(End::Graceful);
        }
        if state == State::Closed && !self.local_eof && !can_recv {
            return Some(End::MeshGone);
        }
        None
    }

    /// How the local connection of a flow ending with `end` is closed.
    pub fn local_close(&self, end: End) -> LocalClose {
        match end {
            End::Graceful => LocalClose::Fin,
            End::Failed(reply) if self.socks_reply => LocalClose::Reply(reply),
            _ => LocalClose::Reset,
        }
    }
}

/// An ingress TCP rule's mesh port: its target and the listening sockets waiting for
/// a SYN.
#[derive(Debug)]
struct IngressPort<H> {
    rule: usize,
    target: SocketAddr,
    idle: Vec<H>,
}

/// What a SYN to an ingress port needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// A listener waits already (or the port is no ingress port).
    Ready,
    /// A listening socket must be added ([`TcpTable::add_listener`]).
    Needed,
    /// No room for another socket: the SYN goes unanswered.
    Full,
}

/// A socket whose flow ended, finishing its close.
#[derive(Debug)]
struct Draining<H> {
    handle: H,
    port: Option<u16>,
    since: Instant,
}

/// Every TCP flow and every stack TCP socket, at most `max` sockets.
#[derive(Debug)]
pub struct TcpTable<H, L> {
    flows: HashMap<H, TcpFlow<L>>,
    /// Ingress flows by (mesh peer, our address): a repeated SYN is not a new one.
    tuples: HashMap<(SocketAddr, SocketAddr), H>,
    ingress: HashMap<u16, IngressPort<H>>,
    draining: Vec<Draining<H>>,
    max: usize,
}

impl<H: Copy + Eq + Hash, L> TcpTable<H, L> {
    pub fn new(max: usize) -> Self {
        Self {
            flows: HashMap::new(),
            tuples: HashMap::new(),
            ingress: HashMap::new(),
            draining: Vec::new(),
            max,
        }
    }

    /// Connections to mesh port `port` go to `target` (ingress rule `rule`).
    pub fn add_ingress(&mut self, port: u16, rule: usize, target: SocketAddr) {
        self.ingress.insert(
            port,
            IngressPort {
                rule,
                target,
                idle: Vec::new(),
            },
        );
    }

    pub fn is_ingress(&self, port: u16) -> bool {
        self.ingress.contains_key(&port)
    }

    /// Stack sockets in use: flows, closing sockets and armed listeners.
    pub fn sockets(&self) -> usize {
        self.flows.len()
            + self.draining.len()
            + self.ingress.values().map(|i| i.idle.len()).sum::<usize>()
    }

    /// Whether one more socket fits.
    pub fn has_room(&self) -> bool {
        self.sockets() < self.max
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn flows(&self) -> impl Iterator<Item = &TcpFlow<L>> {
        self.flows.values()
    }

    pub fn flows_mut(&mut self) -> impl Iterator<Item = (H, &mut TcpFlow<L>)> {
        self.flows.iter_mut().map(|(&h, f)| (h, f))
    }

    /// Whether a SYN from `src` to `dst` repeats one of an open ingress flow.
    pub fn is_repeat_syn(&self, src: SocketAddr, dst: SocketAddr) -> bool {
        self.tuples.contains_key(&(src, dst))
    }

    /// What a SYN to ingress port `port` needs before the stack takes it.
    pub fn arm(&self, port: u16) -> Arm {
        match self.ingress.get(&port) {
            Some(i) if i.idle.is_empty() => {
                if self.has_room() {
                    Arm::Needed
                } else {
                    Arm::Full
                }
            }
            _ => Arm::Ready,
        }
    }

    /// `handle` listens on ingress port `port`.
    pub fn add_listener(&mut self, port: u16, handle: H) {
        if let Some(i) = self.ingress.get_mut(&port) {
            i.idle.push(handle);
        }
    }

    /// The `i`th listener of `port`.
    pub fn listener(&self, port: u16, i: usize) -> Option<H> {
        self.ingress.get(&port)?.idle.get(i).copied()
    }

    /// Listener `i` of `port` took a SYN from `remote` to our `local`: it becomes an
    /// ingress flow whose local side is `local_io` (the connection being opened to
    /// the port's target, see [`TcpTable::target`]).
    pub fn claim(
        &mut self,
        port: u16,
        i: usize,
        (remote, local): (SocketAddr, SocketAddr),
        local_io: L,
        now: Instant,
    ) {
        let Some(ing) = self.ingress.get_mut(&port) else {
            return;
        };
        if i >= ing.idle.len() {
            return;
        }
        let h = ing.idle.swap_remove(i);
        self.tuples.insert((remote, local), h);
        let flow = TcpFlow {
            rule: ing.rule,
            origin: Origin::Ingress,
            from: remote,
            to: ing.target,
            local: local_io,
            state: FlowState {
                deadline: Some(now + CONNECT_TIMEOUT),
                ..FlowState::default()
            },
            port: None,
            tuple: Some((remote, local)),
        };
        self.flows.insert(h, flow);
    }

    /// Listener `i` of `port` left LISTEN without a peer: it only finishes closing.
    pub fn discard_listener(&mut self, port: u16, i: usize, now: Instant) {
        let Some(ing) = self.ingress.get_mut(&port) else {
            return;
        };
        if i < ing.idle.len() {
            let handle = ing.idle.swap_remove(i);
            self.draining.push(Draining {
                handle,
                port: None,
                since: now,
            });
        }
    }

    /// Where connections to ingress port `port` go.
    pub fn target(&self, port: u16) -> Option<SocketAddr> {
        self.ingress.get(&port).map(|i| i.target)
    }

    /// A flow opened from this side (see [`TcpFlow::egress`]).
    pub fn insert(&mut self, handle: H, flow: TcpFlow<L>) {
        self.flows.insert(handle, flow);
    }

    /// Removes the flow of `handle`: its socket finishes closing from `now` on, and
    /// the flow is returned for its local side to be closed.
    pub fn end(&mut self, handle: H, now: Instant) -> Option<TcpFlow<L>> {
        let flow = self.flows.remove(&handle)?;
        if let Some(t) = flow.tuple {
            self.tuples.remove(&t);
        }
        self.draining.push(Draining {
            handle,
            port: flow.port,
            since: now,
        });
        Some(flow)
    }

    /// Forgets closing sockets whose close is over: `close(handle, port, timed_out)`
    /// is asked about each (with the port it held, and whether it drained for
    /// [`DRAIN_TIMEOUT`], after which it must go) and says whether it went.
    pub fn reap(&mut self, now: Instant, mut close: impl FnMut(H, Option<u16>, bool) -> bool) {
        self.draining
            .retain(|d| !close(d.handle, d.port, now >= d.since + DRAIN_TIMEOUT));
    }
}

#[cfg(test)]
mod tests;
