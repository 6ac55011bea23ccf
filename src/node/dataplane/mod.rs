//! Sans-IO WireGuard data plane for a mesh node: many peers, one static key.
//!
//! [`DataPlane`] owns our static private key, one boringtun [`Tunn`] per peer,
//! the allowed-IPs table ([`RoutingTable<PeerId>`]) and the counters. The I/O
//! shell drives it with four kinds of events and sends whatever it returns:
//!
//! * an IP packet read from TUN → [`DataPlane::handle_tun_packet`] →
//!   [`Outgoing`] (a datagram to send, or why it was dropped);
//! * a UDP datagram → [`DataPlane::handle_datagram`] → [`Incoming`] (a packet
//!   to write to TUN, a datagram to send back, or why it was dropped); a relay
//!   ([`DataPlane::set_relay`]) calls [`DataPlane::handle_datagram_or_forward`],
//!   which may also return a packet for another peer, re-encrypted for it;
//! * after either of those, and after [`DataPlane::handle_timeout`], call
//!   [`DataPlane::poll_transmit`] until it returns `None` (packets boringtun
//!   queued during a handshake, handshake retries, keepalives);
//! * a timer: call [`DataPlane::handle_timeout`] at
//!   [`DataPlane::poll_timeout`] (every [`TICK`]). Call it once at start-up,
//!   since before the first call there is no deadline to report.
//!
//! What it does: cryptokey routing by longest prefix on the destination,
//! padding of plaintexts to 16 bytes, peer identification for incoming
//! datagrams (receiver index, or the initiator's static key for handshake
//! initiations), one shared handshake rate limiter with cookie replies under
//! load, source-address checks of decrypted packets against the sender's
//! allowed IPs, endpoint roaming on authenticated packets, sticky source
//! addresses (each peer is answered from the local address its packets arrived
//! on, [`LocalAddr`]; the shell reports a source that vanished with
//! [`DataPlane::forget_source`]), persistent
//! keepalives, forwarding between peers on a relay, per-peer byte counters,
//! per-reason drop counters and relay counters, and the access policy
//! ([`DataPlane::set_policy`]): decrypted packets for this node pass the stateful
//! [`Filter`] after the source check, and packets from TUN record their flows in it.
//!
//! What it does not do: any I/O, reading the clock (boringtun's `Tunn` reads
//! its own monotonic clock internally; this module only uses the `Instant`s it
//! is given), randomness of its own (boringtun seeds its rate limiter and
//! handshakes itself), NAT traversal, endpoint discovery, or deciding which peers exist: that is configuration pushed in with
//! [`DataPlane::upsert_peer`], [`DataPlane::set_preshared_key`] and
//! [`DataPlane::remove_peer`].
//!
//! Once a session is established, [`DataPlane::handle_tun_packet`] and
//! [`DataPlane::handle_datagram`] (forwarding included) do not allocate (see
//! `tests/alloc_free.rs`). Nothing here logs per packet above `TRACE`.
//!
//! Layout: this file holds the API types and the state; `peers` configures
//! peers, `packet` is the per-packet paths, `relay` the forwarding decision,
//! `timers` the output not caused by a packet, `counters` the drop reasons.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use super::filter::Filter;
use super::routing::{MixMap, RoutingTable};
use crate::policy::InboundTable;

mod counters;
mod packet;
mod peers;
mod relay;
mod timers;

pub use counters::{Counters, DropReason};
use peers::Peer;
pub use peers::{PathCounters, PeerStats};
pub use relay::RelayExit;
use timers::TxSlot;

/// A peer's identity: the coordinator's device id.
pub type PeerId = i64;

/// Bytes a WireGuard data message adds to its (padded) plaintext: 16 header
/// bytes and a 16-byte authentication tag.
pub const DATA_OVERHEAD: usize = 32;

/// Size of a handshake initiation, the largest non-data message.
pub const HANDSHAKE_INIT_LEN: usize = 148;

/// The smallest `out` buffer any method accepts. In practice give every call
/// an `out` of at least the TUN MTU rounded up to 16, plus [`DATA_OVERHEAD`].
pub const MIN_OUT_LEN: usize = HANDSHAKE_INIT_LEN;

/// Interval at which [`DataPlane::handle_timeout`] wants to run. boringtun's
/// timers assume roughly four calls a second.
pub const TICK: Duration = Duration::from_millis(250);

/// Handshake messages per second (over all peers) before the rate limiter
/// starts demanding cookies. Handshake initiations are counted twice, once
/// when we check their MACs before identifying the peer and once inside
/// `Tunn::decapsulate`, so about half this many initiations pass per second.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// WireGuard pads plaintexts to a multiple of this.
const PADDING: usize = 16;

/// boringtun keeps the top 24 bits of `index << 8` as the tunnel's id in its
/// session indices, so tunnel indices live below 2^24.
const INDEX_SPACE: u32 = 1 << 24;

/// Interface MTU assumed until [`DataPlane::set_mtu`].
pub const DEFAULT_MTU: usize = 1420;

/// WireGuard message types (first byte; the next three are zero).
const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_HANDSHAKE_RESPONSE: u8 = 2;
const MSG_COOKIE_REPLY: u8 = 3;
const MSG_DATA: u8 = 4;

/// Configuration of one peer, as pushed by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Inner addresses the peer may use as source and that we route to it.
    pub allowed_ips: Vec<IpNet>,
    /// Where to send to, if known. `None` keeps the current endpoint (which
    /// may have been learned from the peer's own authenticated packets).
    pub endpoint: Option<SocketAddr>,
    /// Send a keepalive after this many seconds without traffic (`None` or
    /// `Some(0)`: off). Also makes us initiate a handshake proactively.
    pub persistent_keepalive: Option<u16>,
    /// The peer's static Curve25519 public key.
    pub public_key: [u8; 32],
}

/// Why [`DataPlane::upsert_peer`] refused a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataPlaneError {
    /// The key is one of the small-order Curve25519 points: any shared secret
    /// with it is all zeros.
    #[error("peer {0}: public key is a low-order point")]
    LowOrderKey(PeerId),
    /// The key is our own public key.
    #[error("peer {0}: public key is our own")]
    OwnKey(PeerId),
    /// Another peer already uses this key.
    #[error("peer {id}: public key already belongs to peer {other}")]
    DuplicateKey {
        /// The peer being configured.
        id: PeerId,
        /// The peer that has the key.
        other: PeerId,
    },
    /// All 2^24 tunnel indices are in use.
    #[error("no free tunnel index")]
    IndexExhausted,
}

/// A local address of this host, as the kernel reported it for a received
/// datagram (`IP_PKTINFO`/`IPV6_PKTINFO`): where the sender wrote to, and on
/// which interface it arrived. Sending from it again ("sticky source", as the
/// kernel WireGuard and wireguard-go do) makes a multi-homed host answer from the
/// address the peer knows, so the peer's endpoint does not roam away from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddr {
    /// The address (v4-mapped addresses are given as IPv4).
    pub ip: IpAddr,
    /// The interface index the datagram arrived on (0: unknown). Only link-local
    /// IPv6 sources need it when sending (the address names no link by itself).
    pub ifindex: u32,
}

/// A datagram to send (from [`DataPlane::poll_transmit`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit<'o> {
    /// The peer's endpoint.
    pub to: SocketAddr,
    /// The local address to send from (`None`: let the kernel choose).
    pub src: Option<LocalAddr>,
    pub data: &'o [u8],
}

/// Result of [`DataPlane::handle_tun_packet`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing<'o> {
    /// Send `data` to `to` from `src` (`None`: the kernel chooses): an encrypted
    /// packet, or a handshake initiation if the packet had to be queued until a
    /// session exists.
    Send {
        to: SocketAddr,
        src: Option<LocalAddr>,
        data: &'o [u8],
    },
    /// The packet was dropped; the matching counter was incremented.
    Drop(DropReason),
    /// Nothing to send now (the packet is queued behind a handshake already in
    /// flight).
    Nothing,
}

/// Result of [`DataPlane::handle_datagram`].
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'o> {
    /// Write the decrypted `packet` (sent by `peer`) to the TUN device.
    WriteTun { peer: PeerId, packet: &'o [u8] },
    /// Send `data` back to `to` (handshake response, keepalive, cookie reply),
    /// from `src`: the local address the datagram arrived on.
    Send {
        to: SocketAddr,
        src: Option<LocalAddr>,
        data: &'o [u8],
    },
    /// On a relay: `packet`, decrypted from `from_peer`, is for `to_peer`; send
    /// `data` (its re-encryption, or a handshake initiation if the packet waits
    /// for a session) to `to`, from `src` (`to_peer`'s sticky source). Counted in
    /// [`Counters::relayed_packets`].
    Forward {
        from_peer: PeerId,
        to_peer: PeerId,
        packet: &'o [u8],
        to: SocketAddr,
        src: Option<LocalAddr>,
        data: &'o [u8],
    },
    /// The datagram was dropped; the matching counter was incremented.
    Drop(DropReason),
    /// Consumed without output (keepalive, cookie reply, or a relayed packet
    /// queued behind a handshake).
    Nothing,
}

/// The WireGuard data plane of a node. See the [module docs](self).
pub struct DataPlane {
    /// Interface MTU: the padding limit.
    mtu: usize,
    /// Forward decrypted packets for other peers (see `relay`).
    relay: bool,
    secret: StaticSecret,
    public: PublicKey,
    /// Shared by every `Tunn` and by our own pre-check of initiations.
    rate_limiter: Arc<RateLimiter>,
    peers: MixMap<PeerId, Peer>,
    /// Tunnel index (receiver index >> 8) → peer.
    by_index: MixMap<u32, PeerId>,
    /// Static public key → peer, for handshake initiations.
    by_key: MixMap<[u8; 32], PeerId>,
    routes: RoutingTable<PeerId>,
    next_index: u32,
    counters: Counters,
    /// Timer output: `timer_q[timer_pos..timer_len]` are still to be sent;
    /// slots past `timer_len` are spare buffers kept for reuse.
    timer_q: Vec<TxSlot>,
    timer_pos: usize,
    timer_len: usize,
    /// Peers whose `Tunn` queue should be flushed by `poll_transmit`; its
    /// capacity is kept at least the number of peers, so pushes never allocate.
    flush: Vec<PeerId>,
    /// Largest plaintext ever handed to `encapsulate`: `poll_transmit` needs
    /// room for it when flushing boringtun's queue.
    max_plain: usize,
    next_tick: Option<Instant>,
    /// The access-policy filter; `None`: no policy, everything passes.
    filter: Option<Box<Filter>>,
    /// On a relay: the filters it applies for peers that cannot enforce (stock
    /// WireGuard devices), to what it forwards to them (few: a linear scan).
    relay_filters: Vec<(PeerId, Box<Filter>)>,
    /// On a relay: the exit carrying the internet traffic that peers (spokes)
    /// route through us ([`DataPlane::set_relay_exit`]).
    relay_exit: Option<RelayExit>,
}

impl fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataPlane")
            .field("peers", &self.peers.len())
            .field("routes", &self.routes.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl DataPlane {
    /// Sets the interface MTU: plaintext padding never goes past it.
    pub fn set_mtu(&mut self, mtu: usize) {
        self.mtu = mtu;
    }

    /// The interface MTU ([`DataPlane::set_mtu`]).
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// A data plane with our static private key and no peers.
    pub fn new(private_key: [u8; 32]) -> Self {
        let secret = StaticSecret::from(private_key);
        let public = PublicKey::from(&secret);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        DataPlane {
            secret,
            public,
            rate_limiter,
            peers: MixMap::default(),
            by_index: MixMap::default(),
            by_key: MixMap::default(),
            routes: RoutingTable::new(),
            mtu: DEFAULT_MTU,
            relay: false,
            next_index: 1,
            counters: Counters::default(),
            timer_q: Vec::new(),
            timer_pos: 0,
            timer_len: 0,
            flush: Vec::new(),
            max_plain: 0,
            next_tick: None,
            filter: None,
            relay_filters: Vec::new(),
            relay_exit: None,
        }
    }

    /// Our static public key.
    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// The allowed-IPs table.
    pub fn routes(&self) -> &RoutingTable<PeerId> {
        &self.routes
    }

    /// Drop and cookie counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Enforces this node's compiled access policy on decrypted inbound packets
    /// (`None`: no policy, everything passes at no cost). Call whenever the table
    /// compiled for this node changes: a new table keeps the flow table, so flows
    /// we started go on and flows started from outside are re-checked against it
    /// at once. The first policy allocates the flow table (once).
    pub fn set_policy(&mut self, table: Option<InboundTable>, now: Instant) {
        match (table, self.filter.as_deref_mut()) {
            (None, _) => self.filter = None,
            (Some(table), Some(filter)) => filter.set_table(table),
            (Some(table), None) => self.filter = Some(Box::new(Filter::new(table, now))),
        }
    }

    /// On a relay, the inbound table enforced for `peer`, a device that cannot
    /// enforce it itself (`None`: none). Packets this node forwards or sends to the
    /// peer pass only if the table (or a flow the peer started) allows them.
    pub fn set_relay_policy(&mut self, peer: PeerId, table: Option<InboundTable>, now: Instant) {
        let at = self.relay_filters.iter().position(|(p, _)| *p == peer);
        match (table, at) {
            (None, Some(i)) => {
                self.relay_filters.swap_remove(i);
            }
            (None, None) => {}
            (Some(table), Some(i)) => {
                if let Some((_, f)) = self.relay_filters.get_mut(i) {
                    f.set_table(table);
                }
            }
            (Some(table), None) => self
                .relay_filters
                .push((peer, Box::new(Filter::new(table, now)))),
        }
    }

    /// The peers a relay filters for.
    pub fn relay_filtered(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.relay_filters.iter().map(|(p, _)| *p)
    }

    /// Installs `filter` as is (replacing any flows): for a filter of another
    /// capacity than [`crate::node::filter::DEFAULT_FLOW_CAPACITY`].
    pub fn set_filter(&mut self, filter: Option<Filter>) {
        self.filter = filter.map(Box::new);
    }

    /// The policy filter, if a policy is in force.
    pub fn filter(&self) -> Option<&Filter> {
        self.filter.as_deref()
    }
}

#[cfg(test)]
mod tests;
