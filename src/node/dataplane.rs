//! Sans-IO WireGuard data plane for a mesh node: many peers, one static key.
//!
//! [`DataPlane`] owns our static private key, one boringtun [`Tunn`] per peer,
//! the allowed-IPs table ([`RoutingTable<PeerId>`]) and the counters. The I/O
//! shell drives it with four kinds of events and sends whatever it returns:
//!
//! * an IP packet read from TUN → [`DataPlane::handle_tun_packet`] →
//!   [`Outgoing`] (a datagram to send, or why it was dropped);
//! * a UDP datagram → [`DataPlane::handle_datagram`] → [`Incoming`] (a packet
//!   to write to TUN, a datagram to send back, or why it was dropped);
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
//! allowed IPs, endpoint roaming on authenticated packets, persistent
//! keepalives, per-peer byte counters and per-reason drop counters.
//!
//! What it does not do: any I/O, reading the clock (boringtun's `Tunn` reads
//! its own monotonic clock internally; this module only uses the `Instant`s it
//! is given), randomness of its own (boringtun seeds its rate limiter and
//! handshakes itself), NAT traversal, endpoint discovery, pre-shared keys,
//! or deciding which peers exist: that is configuration pushed in with
//! [`DataPlane::upsert_peer`] and [`DataPlane::remove_peer`].
//!
//! Once a session is established, [`DataPlane::handle_tun_packet`] and
//! [`DataPlane::handle_datagram`] do not allocate (see `tests/alloc_free.rs`).
//! Nothing here logs per packet above `TRACE`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use tracing::{debug, trace};

use super::routing::{MixMap, RoutingTable};

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

/// WireGuard message types (first byte; the next three are zero).
/// Interface MTU assumed until [`DataPlane::set_mtu`].
pub const DEFAULT_MTU: usize = 1420;

const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;
const MSG_DATA: u8 = 4;

/// Configuration of one peer, as pushed by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's static Curve25519 public key.
    pub public_key: [u8; 32],
    /// Where to send to, if known. `None` keeps the current endpoint (which
    /// may have been learned from the peer's own authenticated packets).
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses the peer may use as source and that we route to it.
    pub allowed_ips: Vec<IpNet>,
    /// Send a keepalive after this many seconds without traffic (`None` or
    /// `Some(0)`: off). Also makes us initiate a handshake proactively.
    pub persistent_keepalive: Option<u16>,
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

/// Why a packet or datagram was dropped. Each has a field in [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No allowed-IPs prefix covers the destination.
    NoRoute,
    /// The peer has no known endpoint to send to.
    NoEndpoint,
    /// Not a well-formed IP packet or WireGuard message.
    Malformed,
    /// A decrypted packet's source is not in the sender's allowed IPs.
    BadSource,
    /// The receiver index or initiator key belongs to no peer.
    UnknownPeer,
    /// Authentication failed, or no session matches the packet.
    Decrypt,
    /// The packet counter was already seen or is too old.
    Replay,
    /// A handshake message's MAC1 is wrong (not addressed to our key).
    BadMac,
    /// A handshake message was rejected (replayed timestamp, unexpected
    /// response, failed decryption of an initiation, ...).
    Handshake,
    /// The caller's `out` buffer is too small for the result.
    BufferTooSmall,
}

/// Global counters: one per [`DropReason`], plus cookie replies sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// [`DropReason::NoRoute`].
    pub no_route: u64,
    /// [`DropReason::NoEndpoint`] (including timer output for such peers).
    pub no_endpoint: u64,
    /// [`DropReason::Malformed`].
    pub malformed: u64,
    /// [`DropReason::BadSource`].
    pub bad_source: u64,
    /// [`DropReason::UnknownPeer`].
    pub unknown_peer: u64,
    /// [`DropReason::Decrypt`].
    pub decrypt: u64,
    /// [`DropReason::Replay`].
    pub replay: u64,
    /// [`DropReason::BadMac`].
    pub bad_mac: u64,
    /// [`DropReason::Handshake`].
    pub handshake: u64,
    /// [`DropReason::BufferTooSmall`].
    pub buffer_too_small: u64,
    /// Cookie replies sent because the handshake rate limit was exceeded.
    pub cookie_replies: u64,
}

impl Counters {
    /// The counter for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::NoRoute => self.no_route,
            DropReason::NoEndpoint => self.no_endpoint,
            DropReason::Malformed => self.malformed,
            DropReason::BadSource => self.bad_source,
            DropReason::UnknownPeer => self.unknown_peer,
            DropReason::Decrypt => self.decrypt,
            DropReason::Replay => self.replay,
            DropReason::BadMac => self.bad_mac,
            DropReason::Handshake => self.handshake,
            DropReason::BufferTooSmall => self.buffer_too_small,
        }
    }

    /// Sum of all drop counters.
    pub fn total_drops(&self) -> u64 {
        self.no_route
            + self.no_endpoint
            + self.malformed
            + self.bad_source
            + self.unknown_peer
            + self.decrypt
            + self.replay
            + self.bad_mac
            + self.handshake
            + self.buffer_too_small
    }

    fn bump(&mut self, reason: DropReason) {
        let c = match reason {
            DropReason::NoRoute => &mut self.no_route,
            DropReason::NoEndpoint => &mut self.no_endpoint,
            DropReason::Malformed => &mut self.malformed,
            DropReason::BadSource => &mut self.bad_source,
            DropReason::UnknownPeer => &mut self.unknown_peer,
            DropReason::Decrypt => &mut self.decrypt,
            DropReason::Replay => &mut self.replay,
            DropReason::BadMac => &mut self.bad_mac,
            DropReason::Handshake => &mut self.handshake,
            DropReason::BufferTooSmall => &mut self.buffer_too_small,
        };
        *c = c.saturating_add(1);
    }
}

/// A peer's traffic statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStats {
    /// Current endpoint (configured or learned by roaming).
    pub endpoint: Option<SocketAddr>,
    /// Time since the current session was established, if there is one.
    pub last_handshake: Option<Duration>,
    /// Bytes of authenticated WireGuard datagrams received from the peer.
    pub rx_bytes: u64,
    /// Bytes of WireGuard datagrams sent to the peer.
    pub tx_bytes: u64,
}

/// Result of [`DataPlane::handle_tun_packet`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing<'o> {
    /// Send `data` to `to` (an encrypted packet, or a handshake initiation if
    /// the packet had to be queued until a session exists).
    Send { to: SocketAddr, data: &'o [u8] },
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
    /// Send `data` back to `to` (handshake response, keepalive, cookie reply).
    Send { to: SocketAddr, data: &'o [u8] },
    /// The datagram was dropped; the matching counter was incremented.
    Drop(DropReason),
    /// Consumed without output (keepalive, cookie reply).
    Nothing,
}

/// State of one peer.
struct Peer {
    /// Boxed: a `Tunn` is large and the map moves its values when it grows.
    tunn: Box<Tunn>,
    /// The index this `Tunn` was created with (its sessions are `index << 8 | n`).
    index: u32,
    public_key: [u8; 32],
    endpoint: Option<SocketAddr>,
    /// The configured prefixes; `DataPlane::routes` is rebuilt from them.
    allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds (0 = off).
    keepalive: u16,
    /// When the next persistent keepalive is due; `None`: at the next tick.
    keepalive_due: Option<Instant>,
    /// Any authenticated packet sent or received since the last tick.
    active_since_tick: bool,
    /// The `Tunn` may hold packets it queued while waiting for a session.
    queued: bool,
    /// This peer is in `DataPlane::flush`.
    flush_pending: bool,
    rx_bytes: u64,
    tx_bytes: u64,
}

impl Peer {
    fn sent(&mut self, len: usize) {
        self.tx_bytes = self.tx_bytes.saturating_add(len as u64);
        self.active_since_tick = true;
    }

    fn received(&mut self, from: SocketAddr, len: usize, id: PeerId) {
        self.rx_bytes = self.rx_bytes.saturating_add(len as u64);
        self.active_since_tick = true;
        if self.endpoint != Some(from) {
            debug!(peer = id, old = ?self.endpoint, new = %from, "peer endpoint changed");
            self.endpoint = Some(from);
        }
    }
}

/// A reusable buffer for a timer-generated datagram (handshake or keepalive).
struct TxSlot {
    peer: PeerId,
    to: SocketAddr,
    len: usize,
    buf: [u8; HANDSHAKE_INIT_LEN],
}

impl TxSlot {
    fn empty() -> Self {
        TxSlot {
            peer: 0,
            to: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            buf: [0; HANDSHAKE_INIT_LEN],
        }
    }
}

/// The WireGuard data plane of a node. See the [module docs](self).
pub struct DataPlane {
    /// Interface MTU: the padding limit.
    mtu: usize,
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

#[inline]
fn drop_out<'o>(counters: &mut Counters, reason: DropReason) -> Outgoing<'o> {
    counters.bump(reason);
    trace!(?reason, "dropping packet from tun");
    Outgoing::Drop(reason)
}

#[inline]
fn drop_in<'o>(counters: &mut Counters, reason: DropReason) -> Incoming<'o> {
    counters.bump(reason);
    trace!(?reason, "dropping datagram");
    Incoming::Drop(reason)
}

fn reason_for(err: &WireGuardError) -> DropReason {
    match err {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replay,
        WireGuardError::InvalidAeadTag
        | WireGuardError::NoCurrentSession
        | WireGuardError::WrongIndex
        | WireGuardError::ConnectionExpired => DropReason::Decrypt,
        WireGuardError::InvalidMac => DropReason::BadMac,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
            DropReason::Malformed
        }
        WireGuardError::DestinationBufferTooSmall => DropReason::BufferTooSmall,
        _ => DropReason::Handshake,
    }
}

/// Where `sub` (a subslice of `outer`) sits inside `outer`.
fn span_in(outer: &[u8], sub_ptr: usize, sub_len: usize) -> Option<Range<usize>> {
    let start = sub_ptr.checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(sub_len)?;
    (end <= outer.len()).then_some(start..end)
}

/// Destination address and real length (from the IP header) of an IP packet.
/// `None` unless the header is complete and its length field fits `packet`.
fn parse_destination(packet: &[u8]) -> Option<(IpAddr, usize)> {
    let first = *packet.first()?;
    match first >> 4 {
        4 => {
            let header_len = usize::from(first & 0x0f) * 4;
            if header_len < 20 || packet.len() < header_len {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
            if total < header_len || total > packet.len() {
                return None;
            }
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some((IpAddr::V4(Ipv4Addr::from(dst)), total))
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]));
            let total = 40 + payload;
            if total > packet.len() {
                return None;
            }
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some((IpAddr::V6(Ipv6Addr::from(dst)), total))
        }
        _ => None,
    }
}

impl DataPlane {
    /// Sets the interface MTU: plaintext padding never goes past it.
    pub fn set_mtu(&mut self, mtu: usize) {
        self.mtu = mtu;
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
            next_index: 1,
            counters: Counters::default(),
            timer_q: Vec::new(),
            timer_pos: 0,
            timer_len: 0,
            flush: Vec::new(),
            max_plain: 0,
            next_tick: None,
        }
    }

    /// Our static public key.
    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// Adds or reconfigures peer `id`.
    ///
    /// With the same public key as before the existing tunnel and its session
    /// are kept: the endpoint is replaced only if `cfg.endpoint` is given, and
    /// allowed IPs and keepalive are replaced. A new key gets a fresh tunnel
    /// (and fresh byte counters). Each allowed-IPs prefix is assigned to this
    /// peer even if another peer had it (last writer wins).
    pub fn upsert_peer(&mut self, id: PeerId, cfg: PeerConfig) -> Result<(), DataPlaneError> {
        // The prefixes this peer held, to drop exactly those (no scan of the table).
        let old_allowed: Vec<IpNet> = self
            .peers
            .get(&id)
            .map(|p| p.allowed_ips.clone())
            .unwrap_or_default();
        let peer_public = PublicKey::from(cfg.public_key);
        if !self.secret.diffie_hellman(&peer_public).was_contributory() {
            return Err(DataPlaneError::LowOrderKey(id));
        }
        if cfg.public_key == *self.public.as_bytes() {
            return Err(DataPlaneError::OwnKey(id));
        }
        if let Some(&other) = self.by_key.get(&cfg.public_key)
            && other != id
        {
            return Err(DataPlaneError::DuplicateKey { id, other });
        }
        let keepalive = cfg.persistent_keepalive.unwrap_or(0);

        match self.peers.get_mut(&id) {
            Some(peer) if peer.public_key == cfg.public_key => {
                if cfg.endpoint.is_some() {
                    peer.endpoint = cfg.endpoint;
                }
                if peer.keepalive != keepalive {
                    peer.keepalive = keepalive;
                    peer.keepalive_due = None;
                }
                peer.allowed_ips = cfg.allowed_ips;
                debug!(peer = id, endpoint = ?peer.endpoint, "peer updated");
            }
            existing => {
                let old_endpoint = existing.and_then(|p| p.endpoint);
                let index = self.alloc_index()?;
                // Keepalives are driven by `handle_timeout`, not by `Tunn`, so
                // they can change without losing the session.
                let tunn = Tunn::new(
                    self.secret.clone(),
                    peer_public,
                    None,
                    None,
                    index,
                    Some(Arc::clone(&self.rate_limiter)),
                );
                let peer = Peer {
                    tunn: Box::new(tunn),
                    index,
                    public_key: cfg.public_key,
                    endpoint: cfg.endpoint.or(old_endpoint),
                    allowed_ips: cfg.allowed_ips,
                    keepalive,
                    keepalive_due: None,
                    active_since_tick: false,
                    queued: false,
                    flush_pending: false,
                    rx_bytes: 0,
                    tx_bytes: 0,
                };
                if let Some(old) = self.peers.insert(id, peer) {
                    self.by_index.remove(&old.index);
                    self.by_key.remove(&old.public_key);
                    self.flush.retain(|&p| p != id);
                    debug!(peer = id, "peer key changed, new tunnel");
                } else {
                    debug!(peer = id, "peer added");
                }
                self.by_index.insert(index, id);
                self.by_key.insert(cfg.public_key, id);
            }
        }

        for net in &old_allowed {
            if self.routes.get(net.trunc()) == Some(id) {
                self.routes.remove(net.trunc());
            }
        }
        if let Some(peer) = self.peers.get(&id) {
            for net in &peer.allowed_ips {
                if let Some(prev) = self.routes.insert(net.trunc(), id)
                    && prev != id
                {
                    debug!(%net, from = prev, to = id, "allowed IP moved between peers");
                }
            }
        }
        let need = self.peers.len().saturating_sub(self.flush.len());
        self.flush.reserve(need);
        Ok(())
    }

    /// Forgets peer `id` (its tunnel, routes and pending output). Returns
    /// whether it existed.
    pub fn remove_peer(&mut self, id: PeerId) -> bool {
        let Some(old) = self.peers.remove(&id) else {
            return false;
        };
        self.by_index.remove(&old.index);
        self.by_key.remove(&old.public_key);
        for net in &old.allowed_ips {
            if self.routes.get(net.trunc()) == Some(id) {
                self.routes.remove(net.trunc());
            }
        }
        self.flush.retain(|&p| p != id);
        debug!(peer = id, "peer removed");
        true
    }

    /// Ids of all configured peers, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Statistics of peer `id`.
    pub fn peer_stats(&self, id: PeerId) -> Option<PeerStats> {
        let peer = self.peers.get(&id)?;
        let (last_handshake, ..) = peer.tunn.stats();
        Some(PeerStats {
            endpoint: peer.endpoint,
            last_handshake,
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
        })
    }

    /// The allowed-IPs table.
    pub fn routes(&self) -> &RoutingTable<PeerId> {
        &self.routes
    }

    /// Drop and cookie counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The peer owning session index `receiver_idx` (our index for the peer's
    /// tunnel is the top 24 bits).
    #[inline]
    fn peer_by_index(&self, receiver_idx: u32) -> Option<PeerId> {
        self.by_index.get(&(receiver_idx >> 8)).copied()
    }

    /// Checks a handshake initiation's MAC1 and the load (possibly writing a
    /// cookie reply into `out`), then decrypts the initiator's static key.
    fn identify_initiator(&self, from: SocketAddr, datagram: &[u8], out: &mut [u8]) -> InitCheck {
        match self
            .rate_limiter
            .verify_packet(Some(from.ip()), datagram, out)
        {
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&self.secret, &self.public, &init) {
                    Ok(half) => InitCheck::Peer(self.by_key.get(&half.peer_static_public).copied()),
                    Err(_) => InitCheck::Drop(DropReason::Handshake),
                }
            }
            Ok(_) => InitCheck::Drop(DropReason::Malformed),
            Err(TunnResult::WriteToNetwork(cookie)) => {
                InitCheck::Cookie(cookie.as_ptr() as usize, cookie.len())
            }
            Err(TunnResult::Err(e)) => InitCheck::Drop(reason_for(&e)),
            Err(_) => InitCheck::Drop(DropReason::Handshake),
        }
    }

    fn alloc_index(&mut self) -> Result<u32, DataPlaneError> {
        for _ in 0..INDEX_SPACE {
            let candidate = self.next_index % INDEX_SPACE;
            self.next_index = (candidate + 1) % INDEX_SPACE;
            if !self.by_index.contains_key(&candidate) {
                return Ok(candidate);
            }
        }
        Err(DataPlaneError::IndexExhausted)
    }

    /// Encrypts one IP packet read from TUN.
    ///
    /// `buf[..len]` is the packet; the bytes after it are used to pad the
    /// plaintext with zeros to a multiple of 16 (as far as `buf` reaches).
    /// `out` needs room for the padded packet plus [`DATA_OVERHEAD`], and at
    /// least [`MIN_OUT_LEN`] bytes.
    pub fn handle_tun_packet<'o>(
        &mut self,
        buf: &mut [u8],
        len: usize,
        out: &'o mut [u8],
    ) -> Outgoing<'o> {
        let Some((dst, packet_len)) = buf.get(..len).and_then(parse_destination) else {
            return drop_out(&mut self.counters, DropReason::Malformed);
        };
        let Some(id) = self.routes.lookup(dst) else {
            return drop_out(&mut self.counters, DropReason::NoRoute);
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return drop_out(&mut self.counters, DropReason::UnknownPeer);
        };
        let Some(to) = peer.endpoint else {
            return drop_out(&mut self.counters, DropReason::NoEndpoint);
        };
        // Pad to 16 bytes, but never past the MTU (a full-size packet stays full size).
        let padded = packet_len
            .next_multiple_of(PADDING)
            .min(buf.len())
            .min(packet_len.max(self.mtu));
        if out.len() < (padded + DATA_OVERHEAD).max(MIN_OUT_LEN) {
            return drop_out(&mut self.counters, DropReason::BufferTooSmall);
        }
        if let Some(pad) = buf.get_mut(packet_len..padded) {
            pad.fill(0);
        }
        let Some(plain) = buf.get(..padded) else {
            return drop_out(&mut self.counters, DropReason::Malformed);
        };
        self.max_plain = self.max_plain.max(padded);

        match peer.tunn.encapsulate(plain, out) {
            TunnResult::WriteToNetwork(data) => {
                if data.first() != Some(&MSG_DATA) {
                    // No session: boringtun queued the packet and started a
                    // handshake; `data` is the initiation.
                    peer.queued = true;
                    trace!(peer = id, "packet queued, sending handshake initiation");
                }
                peer.sent(data.len());
                trace!(peer = id, len = data.len(), "encapsulated");
                Outgoing::Send { to, data }
            }
            TunnResult::Done => {
                peer.queued = true;
                trace!(peer = id, "packet queued behind handshake in flight");
                Outgoing::Nothing
            }
            TunnResult::Err(e) => drop_out(&mut self.counters, reason_for(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Outgoing::Nothing,
        }
    }

    /// Handles one UDP datagram received from `from`.
    ///
    /// `out` needs at least `datagram.len()` and [`MIN_OUT_LEN`] bytes. After
    /// a result other than `Drop`, call [`DataPlane::poll_transmit`] until it
    /// returns `None`.
    pub fn handle_datagram<'o>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'o mut [u8],
    ) -> Incoming<'o> {
        if out.len() < datagram.len().max(MIN_OUT_LEN) {
            return drop_in(&mut self.counters, DropReason::BufferTooSmall);
        }
        let id = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => return drop_in(&mut self.counters, DropReason::Malformed),
            Ok(Packet::HandshakeResponse(p)) => self.peer_by_index(p.receiver_idx),
            Ok(Packet::PacketCookieReply(p)) => self.peer_by_index(p.receiver_idx),
            Ok(Packet::PacketData(p)) => self.peer_by_index(p.receiver_idx),
            Ok(Packet::HandshakeInit(_)) => match self.identify_initiator(from, datagram, out) {
                InitCheck::Peer(id) => id,
                InitCheck::Drop(reason) => return drop_in(&mut self.counters, reason),
                InitCheck::Cookie(ptr, len) => {
                    let Some(data) = span_in(out, ptr, len).and_then(|r| out.get(r)) else {
                        return drop_in(&mut self.counters, DropReason::BufferTooSmall);
                    };
                    self.counters.cookie_replies += 1;
                    trace!(%from, "under load, sending cookie reply");
                    return Incoming::Send { to: from, data };
                }
            },
        };
        let Some(id) = id else {
            return drop_in(&mut self.counters, DropReason::UnknownPeer);
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return drop_in(&mut self.counters, DropReason::UnknownPeer);
        };
        let msg_type = datagram.first().copied().unwrap_or(0);

        match peer.tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::Done => {
                if msg_type == MSG_DATA {
                    // An authenticated keepalive.
                    peer.received(from, datagram.len(), id);
                    trace!(peer = id, "keepalive received");
                }
                Incoming::Nothing
            }
            TunnResult::WriteToNetwork(data) => {
                if data.first() == Some(&MSG_COOKIE_REPLY) {
                    self.counters.cookie_replies += 1;
                    trace!(%from, "under load, sending cookie reply");
                } else {
                    // We answered a valid initiation or completed our own
                    // handshake: the datagram was authenticated.
                    peer.received(from, datagram.len(), id);
                    if peer.queued && !peer.flush_pending {
                        peer.flush_pending = true;
                        self.flush.push(id);
                    }
                    debug!(
                        peer = id,
                        initiation = msg_type == MSG_HANDSHAKE_INIT,
                        "handshake"
                    );
                }
                peer.sent(data.len());
                Incoming::Send { to: from, data }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                finish_data(self, id, from, datagram.len(), IpAddr::V4(src), packet)
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                finish_data(self, id, from, datagram.len(), IpAddr::V6(src), packet)
            }
            TunnResult::Err(e) => drop_in(&mut self.counters, reason_for(&e)),
        }
    }

    /// Next datagram generated outside a direct request: handshake retries
    /// and keepalives from [`DataPlane::handle_timeout`], and packets
    /// boringtun queued until a handshake completed. Call in a loop until
    /// `None` after every `handle_*` call. `out` should be as large as the
    /// `out` given to [`DataPlane::handle_tun_packet`].
    pub fn poll_transmit<'o>(&mut self, out: &'o mut [u8]) -> Option<(SocketAddr, &'o [u8])> {
        while self.timer_pos < self.timer_len {
            let Some(slot) = self.timer_q.get(self.timer_pos) else {
                break;
            };
            self.timer_pos += 1;
            if !self.peers.contains_key(&slot.peer) {
                continue;
            }
            let (Some(data), Some(dst)) = (slot.buf.get(..slot.len), out.get_mut(..slot.len))
            else {
                self.counters.bump(DropReason::BufferTooSmall);
                continue;
            };
            dst.copy_from_slice(data);
            let (to, len) = (slot.to, slot.len);
            return out.get(..len).map(|data| (to, data));
        }
        self.timer_pos = 0;
        self.timer_len = 0;

        if self.flush.is_empty() {
            return None;
        }
        if out.len() < (self.max_plain + DATA_OVERHEAD).max(MIN_OUT_LEN) {
            // Flushing could hand boringtun a packet larger than `out` (which
            // it answers with a panic). Keep the peers pending.
            debug!(
                have = out.len(),
                need = self.max_plain + DATA_OVERHEAD,
                "poll_transmit buffer too small to flush queued packets"
            );
            return None;
        }
        while let Some(&id) = self.flush.last() {
            let Some(peer) = self.peers.get_mut(&id) else {
                self.flush.pop();
                continue;
            };
            let produced = match peer.tunn.decapsulate(None, &[], &mut out[..]) {
                TunnResult::WriteToNetwork(data) => Some((data.as_ptr() as usize, data.len())),
                _ => None,
            };
            match produced {
                Some((ptr, len)) => {
                    let Some(to) = peer.endpoint else {
                        self.counters.bump(DropReason::NoEndpoint);
                        continue;
                    };
                    peer.sent(len);
                    let range = span_in(out, ptr, len)?;
                    trace!(peer = id, len, "flushing queued packet");
                    return out.get(range).map(|data| (to, data));
                }
                None => {
                    // Queue empty, or still no session (then keep `queued`;
                    // the next authenticated packet schedules another flush).
                    if peer.tunn.time_since_last_handshake().is_some() {
                        peer.queued = false;
                    }
                    peer.flush_pending = false;
                    self.flush.pop();
                }
            }
        }
        None
    }

    /// Runs the timers of every peer: boringtun's handshake retries, rekeys,
    /// session expiry and passive keepalives, plus our persistent keepalives;
    /// resets the handshake rate limiter once a second. Generated datagrams
    /// are queued for [`DataPlane::poll_transmit`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.rate_limiter.reset_count();
        self.next_tick = Some(now + TICK);

        // Keep undrained output, move spare slots behind it.
        if self.timer_pos > 0 {
            if let Some(used) = self.timer_q.get_mut(..self.timer_len) {
                used.rotate_left(self.timer_pos.min(used.len()));
            }
            self.timer_len = self.timer_len.saturating_sub(self.timer_pos);
            self.timer_pos = 0;
        }

        for (&id, peer) in self.peers.iter_mut() {
            while self.timer_q.len() < self.timer_len + 2 {
                self.timer_q.push(TxSlot::empty());
            }
            let mut sent = false;
            if let Some(slot) = self.timer_q.get_mut(self.timer_len) {
                match peer.tunn.update_timers(&mut slot.buf) {
                    TunnResult::WriteToNetwork(data) => {
                        let len = data.len();
                        if let Some(to) = peer.endpoint {
                            slot.peer = id;
                            slot.to = to;
                            slot.len = len;
                            self.timer_len += 1;
                            peer.sent(len);
                            sent = true;
                        } else {
                            self.counters.bump(DropReason::NoEndpoint);
                        }
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                    TunnResult::Err(e) => debug!(peer = id, error = ?e, "timer error"),
                    _ => {}
                }
            }

            if peer.keepalive > 0 && peer.endpoint.is_some() {
                let interval = Duration::from_secs(u64::from(peer.keepalive));
                if sent || peer.active_since_tick {
                    peer.keepalive_due = Some(now + interval);
                } else if peer.keepalive_due.is_none_or(|due| now >= due) {
                    peer.keepalive_due = Some(now + interval);
                    if let (Some(slot), Some(to)) =
                        (self.timer_q.get_mut(self.timer_len), peer.endpoint)
                    {
                        match peer.tunn.encapsulate(&[], &mut slot.buf) {
                            TunnResult::WriteToNetwork(data) => {
                                if data.first() != Some(&MSG_DATA) {
                                    peer.queued = true;
                                }
                                let len = data.len();
                                slot.peer = id;
                                slot.to = to;
                                slot.len = len;
                                self.timer_len += 1;
                                peer.sent(len);
                                trace!(peer = id, "persistent keepalive");
                            }
                            TunnResult::Done => peer.queued = true,
                            TunnResult::Err(e) => debug!(peer = id, error = ?e, "keepalive error"),
                            _ => {}
                        }
                    }
                }
            }
            peer.active_since_tick = false;
        }
    }

    /// When [`DataPlane::handle_timeout`] wants to run next: one [`TICK`]
    /// after its last run; `None` before the first run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }
}

/// Outcome of checking a handshake initiation before handing it to a peer.
enum InitCheck {
    /// MACs fine; the initiator's key belongs to this peer (if any).
    Peer(Option<PeerId>),
    /// Under load: a cookie reply was written at (address, length) in `out`.
    Cookie(usize, usize),
    Drop(DropReason),
}

/// Common tail of a decrypted data packet: roaming, counters, source check.
fn finish_data<'o>(
    dp: &mut DataPlane,
    id: PeerId,
    from: SocketAddr,
    datagram_len: usize,
    src: IpAddr,
    packet: &'o mut [u8],
) -> Incoming<'o> {
    if let Some(peer) = dp.peers.get_mut(&id) {
        peer.received(from, datagram_len, id);
        if peer.queued && !peer.flush_pending {
            peer.flush_pending = true;
            dp.flush.push(id);
        }
    }
    if !dp.routes.contains(src, id) {
        return drop_in(&mut dp.counters, DropReason::BadSource);
    }
    trace!(peer = id, len = packet.len(), "decapsulated");
    Incoming::WriteTun { peer: id, packet }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::testutil::{
        A_ID, A_V4, A_V6, B_ID, B_V4, B_V6, BUF_LEN, Side, connected_pair, ipv4_packet,
        ipv6_packet, pair, public_key, secret_key,
    };

    fn is_padded_data_len(len: usize) -> bool {
        len >= DATA_OVERHEAD && (len - DATA_OVERHEAD).is_multiple_of(PADDING)
    }

    fn peer_cfg(seed: u64, endpoint: &str, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: public_key(&secret_key(seed)),
            endpoint: Some(endpoint.parse().expect("endpoint")),
            allowed_ips: nets.iter().map(|n| n.parse().expect("net")).collect(),
            persistent_keepalive: None,
        }
    }

    /// A tiny deterministic PRNG for junk input.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.next() as u8;
            }
        }
    }

    #[test]
    fn v4_packet_arrives_byte_identical_through_handshake() {
        let mut p = pair();
        // 20 + 57 = 77 bytes: padded to 80 on the wire.
        let ping = ipv4_packet(A_V4, B_V4, 57);
        assert_eq!(ping.len(), 77);
        let t = p.send_packet(Side::A, &ping);
        assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()], "{t:?}");
        assert!(t.tun.iter().all(|(_, peer, _)| *peer == A_ID));
        assert!(t.drops.is_empty(), "{t:?}");
        // Handshake initiation, response, keepalive, then the queued packet.
        let kinds: Vec<u8> = t.wire.iter().map(|(_, _, d)| d[0]).collect();
        assert_eq!(kinds, vec![1, 2, 4, 4], "{t:?}");
        let data = t.data_from(Side::A);
        assert!(data.iter().any(|d| d.len() == 32 + 80), "{data:?}");
        assert!(data.iter().all(|d| is_padded_data_len(d.len())));
        // B learned A's endpoint from the handshake.
        let b_view = p.b.peer_stats(A_ID).expect("A at B");
        assert_eq!(b_view.endpoint, Some(p.a_addr));
        assert!(b_view.last_handshake.is_some());
        assert_eq!(p.a.counters().total_drops(), 0);
        assert_eq!(p.b.counters().total_drops(), 0);
    }

    #[test]
    fn v6_packets_arrive_byte_identical_both_ways() {
        let mut p = connected_pair();
        for len in [8, 9, 23, 56, 100, 1000, 1380] {
            let ping = ipv6_packet(A_V6, B_V6, len);
            let t = p.send_packet(Side::A, &ping);
            assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()], "len {len}");
            let pong = ipv6_packet(B_V6, A_V6, len);
            let t = p.send_packet(Side::B, &pong);
            assert_eq!(t.tun_at(Side::A), vec![pong.as_slice()], "len {len}");
            let v4 = ipv4_packet(B_V4, A_V4, len);
            let t = p.send_packet(Side::B, &v4);
            assert_eq!(t.tun_at(Side::A), vec![v4.as_slice()], "len {len}");
        }
        assert_eq!(p.a.counters().total_drops(), 0);
        assert_eq!(p.b.counters().total_drops(), 0);
    }

    #[test]
    fn byte_counters_match_across_the_pair() {
        let mut p = connected_pair();
        p.send_packet(Side::A, &ipv6_packet(A_V6, B_V6, 300));
        let a = p.a.peer_stats(B_ID).expect("B at A");
        let b = p.b.peer_stats(A_ID).expect("A at B");
        assert!(a.tx_bytes > 0 && a.rx_bytes > 0);
        assert_eq!(a.tx_bytes, b.rx_bytes);
        assert_eq!(a.rx_bytes, b.tx_bytes);
        assert_eq!(a.endpoint, Some(p.b_addr));
    }

    #[test]
    fn outer_length_is_header_padded_payload_and_tag() {
        let mut p = connected_pair();
        let mut buf = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN];
        for payload in 8..=200 {
            let pkt = ipv4_packet(A_V4, B_V4, payload);
            buf[..pkt.len()].copy_from_slice(&pkt);
            buf[pkt.len()..].fill(0xee); // padding must overwrite this
            match p.a.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
                Outgoing::Send { data, .. } => {
                    assert_eq!(data.len(), 32 + pkt.len().next_multiple_of(16));
                    let data = data.to_vec();
                    let t = p.deliver(Side::B, &data);
                    assert_eq!(t.tun_at(Side::B), vec![pkt.as_slice()]);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Without spare capacity the plaintext is padded only as far as `buf` goes.
        let pkt = ipv4_packet(A_V4, B_V4, 13);
        let mut exact = pkt.clone();
        match p.a.handle_tun_packet(&mut exact, pkt.len(), &mut out) {
            Outgoing::Send { data, .. } => {
                assert_eq!(data.len(), 32 + pkt.len());
                let data = data.to_vec();
                assert_eq!(p.deliver(Side::B, &data).tun_at(Side::B), vec![&pkt[..]]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn inner_source_outside_allowed_ips_is_dropped() {
        let mut p = connected_pair();
        let spoofed = ipv4_packet("100.64.0.99".parse().expect("ip"), B_V4, 40);
        let t = p.send_packet(Side::A, &spoofed);
        assert!(t.tun.is_empty());
        assert_eq!(t.drops, vec![(Side::B, DropReason::BadSource)]);
        assert_eq!(p.b.counters().bad_source, 1);
        // B's own address is not A's to use either.
        let spoofed6 = ipv6_packet(B_V6, B_V6, 40);
        let t = p.send_packet(Side::A, &spoofed6);
        assert_eq!(t.drops, vec![(Side::B, DropReason::BadSource)]);
        assert_eq!(p.b.counters().bad_source, 2);
        assert_eq!(p.b.counters().total_drops(), 2);
    }

    #[test]
    fn routing_picks_longest_prefix() {
        let mut dp = DataPlane::new(secret_key(1));
        dp.upsert_peer(2, peer_cfg(2, "192.0.2.2:1", &["100.64.0.0/10"]))
            .expect("peer 2");
        dp.upsert_peer(3, peer_cfg(3, "192.0.2.3:1", &["100.64.0.5/32"]))
            .expect("peer 3");
        let mut out = vec![0u8; BUF_LEN];
        let mut send_to = |dp: &mut DataPlane, dst: &str| -> Outgoing<'static> {
            let mut buf = vec![0u8; BUF_LEN];
            let pkt = ipv4_packet(A_V4, dst.parse().expect("ip"), 20);
            buf[..pkt.len()].copy_from_slice(&pkt);
            match dp.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
                Outgoing::Send { to, data } => {
                    assert_eq!(data.len(), HANDSHAKE_INIT_LEN);
                    assert_eq!(data[0], MSG_HANDSHAKE_INIT);
                    Outgoing::Send { to, data: &[] }
                }
                Outgoing::Drop(r) => Outgoing::Drop(r),
                Outgoing::Nothing => Outgoing::Nothing,
            }
        };
        let ep = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        assert_eq!(
            send_to(&mut dp, "100.64.0.5"),
            Outgoing::Send {
                to: ep("192.0.2.3:1"),
                data: &[]
            }
        );
        assert_eq!(
            send_to(&mut dp, "100.64.0.6"),
            Outgoing::Send {
                to: ep("192.0.2.2:1"),
                data: &[]
            }
        );
        assert_eq!(
            send_to(&mut dp, "100.128.0.1"),
            Outgoing::Drop(DropReason::NoRoute)
        );
        assert_eq!(
            dp.routes().lookup("100.64.0.5".parse().expect("ip")),
            Some(3)
        );
        assert!(dp.remove_peer(3));
        assert!(!dp.remove_peer(3));
        assert_eq!(
            dp.routes().lookup("100.64.0.5".parse().expect("ip")),
            Some(2)
        );
        // A handshake to peer 2 is already in flight: the packet just queues.
        assert_eq!(send_to(&mut dp, "100.64.0.5"), Outgoing::Nothing);
        assert_eq!(dp.counters().no_route, 1);
        let mut ids: Vec<_> = dp.peers().collect();
        ids.sort();
        assert_eq!(ids, vec![2]);
    }

    #[test]
    fn garbage_datagrams_never_panic_and_are_counted() {
        let mut p = connected_pair();
        // Real messages to truncate and corrupt.
        let mut out = vec![0u8; BUF_LEN];
        let mut buf = vec![0u8; BUF_LEN];
        let pkt = ipv4_packet(A_V4, B_V4, 100);
        buf[..pkt.len()].copy_from_slice(&pkt);
        let data_msg = match p.a.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
            Outgoing::Send { data, .. } => data.to_vec(),
            other => panic!("unexpected {other:?}"),
        };
        let mut fresh = DataPlane::new(secret_key(0xa));
        fresh
            .upsert_peer(
                B_ID,
                peer_cfg(0xb, "198.51.100.2:51820", &["100.64.0.2/32"]),
            )
            .expect("peer");
        let init_msg = match fresh.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
            Outgoing::Send { data, .. } => data.to_vec(),
            other => panic!("unexpected {other:?}"),
        };

        let mut rng = XorShift(0x5eed_1234_abcd_9876);
        let mut junk: Vec<Vec<u8>> = Vec::new();
        for len in 0..400 {
            let mut d = vec![0u8; len];
            rng.fill(&mut d);
            junk.push(d);
        }
        for len in 0..data_msg.len() {
            junk.push(data_msg[..len].to_vec());
        }
        for len in 0..init_msg.len() {
            junk.push(init_msg[..len].to_vec());
        }
        // Right type and size, junk contents; with random and with valid
        // receiver indices (copied from the real data message).
        for (kind, sizes) in [
            (1u8, vec![148]),
            (2, vec![92]),
            (3, vec![64]),
            (4, vec![32, 33, 48, 100, 148, 1500]),
        ] {
            for size in sizes {
                for valid_index in [false, true] {
                    for _ in 0..8 {
                        let mut d = vec![0u8; size];
                        rng.fill(&mut d);
                        d[..4].copy_from_slice(&[kind, 0, 0, 0]);
                        if valid_index && kind != 1 {
                            d[4..8].copy_from_slice(&data_msg[4..8]);
                        }
                        junk.push(d);
                    }
                }
            }
        }
        // A real data message with one bit flipped anywhere after the type.
        for i in 4..data_msg.len() {
            let mut d = data_msg.clone();
            d[i] ^= 0x10;
            junk.push(d);
        }
        // A real initiation with a corrupted body or MAC1 (MAC2 is only
        // checked under load, so flipping it would leave a valid message).
        for i in [4, 8, 40, 100, 116, 120, 131] {
            let mut d = init_msg.clone();
            d[i] ^= 1;
            junk.push(d);
        }

        let before = *p.b.counters();
        let from = p.a_addr;
        for d in &junk {
            match p.b.handle_datagram(from, d, &mut out) {
                Incoming::Drop(_) => {}
                other => panic!("junk {d:?} gave {other:?}"),
            }
            assert!(p.b.poll_transmit(&mut out).is_none());
        }
        let after = p.b.counters();
        assert_eq!(
            after.total_drops() - before.total_drops(),
            junk.len() as u64
        );
        assert!(after.malformed > 0 && after.decrypt > 0 && after.bad_mac > 0);
        assert!(after.unknown_peer > 0);
        // The real data message still decrypts (none of the above consumed its counter).
        let t = p.deliver(Side::B, &data_msg);
        assert_eq!(t.tun_at(Side::B), vec![pkt.as_slice()]);
        // ... but only once.
        let t = p.deliver(Side::B, &data_msg);
        assert_eq!(t.drops, vec![(Side::B, DropReason::Replay)]);
        // Junk from TUN is counted too.
        let mut a_out = vec![0u8; BUF_LEN];
        for len in 0..80 {
            let mut b = vec![0u8; len + 16];
            rng.fill(&mut b);
            let _ = p.a.handle_tun_packet(&mut b, len, &mut a_out);
        }
        let mut b = vec![0u8; 8];
        assert_eq!(
            p.a.handle_tun_packet(&mut b, 100, &mut a_out),
            Outgoing::Drop(DropReason::Malformed)
        );
    }

    #[test]
    fn malformed_tun_packets_are_dropped() {
        let mut p = connected_pair();
        let mut out = vec![0u8; BUF_LEN];
        let good4 = ipv4_packet(A_V4, B_V4, 40);
        let good6 = ipv6_packet(A_V6, B_V6, 40);
        let mut cases: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut v = good4.clone();
        v[0] = 0x55; // version 5
        cases.push((v, good4.len()));
        let mut v = good4.clone();
        v[0] = 0x44; // IHL 4 < 5
        cases.push((v, good4.len()));
        let mut v = good4.clone();
        v[2..4].copy_from_slice(&1000u16.to_be_bytes()); // longer than read
        cases.push((v, good4.len()));
        let mut v = good4.clone();
        v[2..4].copy_from_slice(&10u16.to_be_bytes()); // shorter than header
        cases.push((v, good4.len()));
        cases.push((good4.clone(), 19));
        cases.push((good6.clone(), 39));
        let mut v = good6.clone();
        v[4..6].copy_from_slice(&41u16.to_be_bytes()); // payload longer than read
        cases.push((v, good6.len()));
        cases.push((Vec::new(), 0));
        let n = cases.len() as u64;
        for (mut pkt, len) in cases {
            pkt.resize(pkt.len() + 16, 0);
            assert_eq!(
                p.a.handle_tun_packet(&mut pkt, len, &mut out),
                Outgoing::Drop(DropReason::Malformed)
            );
        }
        assert_eq!(p.a.counters().malformed, n);
        // Trailing bytes after the IP total length are not sent.
        let mut long = good4.clone();
        long.extend_from_slice(&[0xaa; 7]);
        long.resize(long.len() + 16, 0);
        let len = good4.len() + 7;
        let data = match p.a.handle_tun_packet(&mut long, len, &mut out) {
            Outgoing::Send { data, .. } => data.to_vec(),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(data.len(), 32 + good4.len().next_multiple_of(16));
        assert_eq!(p.deliver(Side::B, &data).tun_at(Side::B), vec![&good4[..]]);
    }

    #[test]
    fn padding_stops_at_the_mtu() {
        let mut p = connected_pair();
        p.dp(Side::A).set_mtu(1420);
        let mut out = vec![0u8; 4096];
        for len in [1408usize, 1409, 1415, 1420] {
            let pkt = ipv4_packet(A_V4, B_V4, 64);
            let pkt = ipv4_packet(A_V4, B_V4, 64 + len - pkt.len());
            assert_eq!(pkt.len(), len);
            let mut buf = vec![0u8; 4096];
            buf[..pkt.len()].copy_from_slice(&pkt);
            match p
                .dp(Side::A)
                .handle_tun_packet(&mut buf, pkt.len(), &mut out)
            {
                Outgoing::Send { data, .. } => {
                    assert_eq!(data.len(), 32 + len.next_multiple_of(16).min(1420), "{len}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn low_order_keys_are_rejected() {
        let hex = |s: &str| -> [u8; 32] {
            let mut k = [0u8; 32];
            for (i, b) in k.iter_mut().enumerate() {
                *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex");
            }
            k
        };
        let low_order = [
            hex("0000000000000000000000000000000000000000000000000000000000000000"),
            hex("0100000000000000000000000000000000000000000000000000000000000000"),
            hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ];
        let mut dp = DataPlane::new(secret_key(1));
        for (i, key) in low_order.into_iter().enumerate() {
            let cfg = PeerConfig {
                public_key: key,
                endpoint: None,
                allowed_ips: vec!["10.0.0.0/8".parse().expect("net")],
                persistent_keepalive: None,
            };
            assert_eq!(
                dp.upsert_peer(i as PeerId, cfg),
                Err(DataPlaneError::LowOrderKey(i as PeerId)),
                "key {i}"
            );
        }
        assert_eq!(dp.peers().count(), 0);
        assert!(dp.routes().is_empty());
    }

    #[test]
    fn own_and_duplicate_keys_are_rejected() {
        let mut dp = DataPlane::new(secret_key(1));
        let mut cfg = peer_cfg(1, "192.0.2.1:1", &["10.0.0.1/32"]);
        assert_eq!(
            dp.upsert_peer(5, cfg.clone()),
            Err(DataPlaneError::OwnKey(5))
        );
        cfg.public_key = public_key(&secret_key(2));
        dp.upsert_peer(5, cfg.clone()).expect("first");
        assert_eq!(
            dp.upsert_peer(6, cfg.clone()),
            Err(DataPlaneError::DuplicateKey { id: 6, other: 5 })
        );
        dp.upsert_peer(5, cfg).expect("same peer again");
    }

    #[test]
    fn same_key_keeps_session_new_key_starts_over() {
        let mut p = connected_pair();
        let b_key = p.b.public_key();
        let before = p.a.peer_stats(B_ID).expect("stats");
        p.a.upsert_peer(
            B_ID,
            PeerConfig {
                public_key: b_key,
                endpoint: None,
                allowed_ips: vec!["100.64.0.2/32".parse().expect("net")],
                persistent_keepalive: Some(25),
            },
        )
        .expect("update");
        let after = p.a.peer_stats(B_ID).expect("stats");
        assert_eq!(after.endpoint, before.endpoint);
        assert!(after.last_handshake.is_some());
        assert_eq!(after.tx_bytes, before.tx_bytes);
        // Still routed and sent straight away as data: the session survived.
        let ping = ipv4_packet(A_V4, B_V4, 30);
        let t = p.send_packet(Side::A, &ping);
        assert_eq!(t.wire[0].2[0], MSG_DATA);
        assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()]);
        // v6 was removed from the allowed IPs.
        let t = p.send_packet(Side::A, &ipv6_packet(A_V6, B_V6, 30));
        assert_eq!(t.drops, vec![(Side::A, DropReason::NoRoute)]);

        // A new key for the same id: fresh tunnel, handshake needed.
        p.a.upsert_peer(
            B_ID,
            peer_cfg(0xbb, "198.51.100.2:51820", &["100.64.0.2/32"]),
        )
        .expect("rekey");
        assert_eq!(p.a.peer_stats(B_ID).expect("stats").last_handshake, None);
        let mut buf = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN];
        buf[..ping.len()].copy_from_slice(&ping);
        match p.a.handle_tun_packet(&mut buf, ping.len(), &mut out) {
            Outgoing::Send { data, .. } => assert_eq!(data[0], MSG_HANDSHAKE_INIT),
            other => panic!("unexpected {other:?}"),
        }
        // The old key is free again.
        let mut c = peer_cfg(0xb, "198.51.100.2:51820", &[]);
        c.public_key = b_key;
        p.a.upsert_peer(9, c).expect("old key reusable");
    }

    #[test]
    fn removed_peer_gets_nothing_through() {
        let mut p = connected_pair();
        assert!(p.b.remove_peer(A_ID));
        let t = p.send_packet(Side::A, &ipv4_packet(A_V4, B_V4, 30));
        assert_eq!(t.drops, vec![(Side::B, DropReason::UnknownPeer)]);
        let t = p.send_packet(Side::B, &ipv4_packet(B_V4, A_V4, 30));
        assert_eq!(t.drops, vec![(Side::B, DropReason::NoRoute)]);
        assert_eq!(p.b.peer_stats(A_ID), None);
    }

    #[test]
    fn no_endpoint_until_the_peer_speaks() {
        let mut p = pair();
        let t = p.send_packet(Side::B, &ipv4_packet(B_V4, A_V4, 30));
        assert_eq!(t.drops, vec![(Side::B, DropReason::NoEndpoint)]);
        assert_eq!(p.b.counters().no_endpoint, 1);
    }

    #[test]
    fn small_output_buffers_are_refused() {
        let mut p = connected_pair();
        let pkt = ipv4_packet(A_V4, B_V4, 200);
        let mut buf = vec![0u8; BUF_LEN];
        buf[..pkt.len()].copy_from_slice(&pkt);
        let mut small = vec![0u8; 200];
        assert_eq!(
            p.a.handle_tun_packet(&mut buf, pkt.len(), &mut small),
            Outgoing::Drop(DropReason::BufferTooSmall)
        );
        let mut out = vec![0u8; BUF_LEN];
        let data = match p.a.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
            Outgoing::Send { data, .. } => data.to_vec(),
            other => panic!("unexpected {other:?}"),
        };
        let from = p.a_addr;
        assert_eq!(
            p.b.handle_datagram(from, &data, &mut small),
            Incoming::Drop(DropReason::BufferTooSmall)
        );
        assert!(matches!(
            p.b.handle_datagram(from, &data, &mut out),
            Incoming::WriteTun { peer: A_ID, .. }
        ));
    }

    #[test]
    fn endpoint_roams_on_authenticated_packets() {
        let mut p = connected_pair();
        let new_addr: SocketAddr = "[2001:db8::7]:40000".parse().expect("addr");
        p.a_addr = new_addr;
        let t = p.send_packet(Side::A, &ipv4_packet(A_V4, B_V4, 30));
        assert_eq!(t.tun_at(Side::B).len(), 1);
        assert_eq!(
            p.b.peer_stats(A_ID).expect("stats").endpoint,
            Some(new_addr)
        );
        let pong = ipv4_packet(B_V4, A_V4, 30);
        let t = p.send_packet(Side::B, &pong);
        assert_eq!(t.lost, 0);
        assert_eq!(t.tun_at(Side::A), vec![pong.as_slice()]);

        // A forged (unauthenticated) packet from elsewhere does not move it.
        let mut junk = vec![0u8; 64];
        junk[0] = MSG_DATA;
        let forged_from: SocketAddr = "203.0.113.66:1".parse().expect("addr");
        let mut out = vec![0u8; BUF_LEN];
        assert!(matches!(
            p.b.handle_datagram(forged_from, &junk, &mut out),
            Incoming::Drop(_)
        ));
        assert_eq!(
            p.b.peer_stats(A_ID).expect("stats").endpoint,
            Some(new_addr)
        );
    }

    #[test]
    fn cookie_reply_under_load() {
        let mut p = pair();
        let mut buf = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN];
        let pkt = ipv4_packet(A_V4, B_V4, 30);
        buf[..pkt.len()].copy_from_slice(&pkt);
        let init = match p.a.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
            Outgoing::Send { data, .. } => data.to_vec(),
            other => panic!("unexpected {other:?}"),
        };
        let from = p.a_addr;
        let mut cookie = None;
        for _ in 0..(2 * HANDSHAKE_RATE_LIMIT + 10) {
            if let Incoming::Send { to, data } = p.b.handle_datagram(from, &init, &mut out)
                && data.first() == Some(&MSG_COOKIE_REPLY)
            {
                assert_eq!(to, from);
                assert_eq!(data.len(), 64);
                cookie = Some(data.to_vec());
            }
        }
        let cookie = cookie.expect("a cookie reply under load");
        assert!(p.b.counters().cookie_replies > 0);
        // The initiator accepts the cookie (authenticated with its MAC1).
        assert_eq!(
            p.a.handle_datagram(p.b_addr, &cookie, &mut out),
            Incoming::Nothing
        );
        assert_eq!(p.a.counters().total_drops(), 0);
    }

    #[test]
    fn timers_send_persistent_keepalives_and_handshakes() {
        let mut p = pair();
        let b_key = p.b.public_key();
        let b_addr = p.b_addr;
        p.a.upsert_peer(
            B_ID,
            PeerConfig {
                public_key: b_key,
                endpoint: Some(b_addr),
                allowed_ips: crate::node::testutil::host_nets(B_V4, B_V6),
                persistent_keepalive: Some(25),
            },
        )
        .expect("keepalive");
        assert_eq!(p.a.poll_timeout(), None);
        let t0 = Instant::now();
        // First tick: no session yet, so the keepalive starts a handshake.
        let t = p.tick(Side::A, t0);
        assert_eq!(p.a.poll_timeout(), Some(t0 + TICK));
        assert_eq!(
            t.wire.first().map(|w| w.2[0]),
            Some(MSG_HANDSHAKE_INIT),
            "{t:?}"
        );
        assert!(
            p.a.peer_stats(B_ID)
                .expect("stats")
                .last_handshake
                .is_some()
        );
        assert!(
            p.b.peer_stats(A_ID)
                .expect("stats")
                .last_handshake
                .is_some()
        );
        assert_eq!(
            p.b.peer_stats(A_ID).expect("stats").endpoint,
            Some(p.a_addr)
        );
        // Traffic in this tick postpones the next keepalive.
        let t = p.tick(Side::A, t0 + TICK);
        assert!(t.wire.is_empty(), "{t:?}");
        let t = p.tick(Side::A, t0 + Duration::from_secs(10));
        assert!(t.wire.is_empty(), "{t:?}");
        let t = p.tick(Side::A, t0 + Duration::from_secs(26));
        assert_eq!(t.wire.len(), 1, "{t:?}");
        assert_eq!(t.wire[0].2.len(), DATA_OVERHEAD);
        assert_eq!(t.wire[0].2[0], MSG_DATA);
        assert_eq!(t.drops, vec![]);
        // B got A's keepalive; B's own timers (no keepalive set) stay quiet.
        let t = p.tick(Side::B, t0);
        assert!(t.wire.is_empty(), "{t:?}");
        // Turning keepalive off stops them.
        p.a.upsert_peer(
            B_ID,
            PeerConfig {
                public_key: b_key,
                endpoint: None,
                allowed_ips: vec![],
                persistent_keepalive: None,
            },
        )
        .expect("off");
        let t = p.tick(Side::A, t0 + Duration::from_secs(100));
        assert!(t.wire.iter().all(|w| w.2[0] != MSG_DATA), "{t:?}");
    }

    #[test]
    fn simultaneous_handshakes_deliver_both_queued_packets() {
        let mut p = pair();
        let a_key = p.a.public_key();
        let a_addr = p.a_addr;
        p.b.upsert_peer(
            A_ID,
            PeerConfig {
                public_key: a_key,
                endpoint: Some(a_addr),
                allowed_ips: crate::node::testutil::host_nets(A_V4, A_V6),
                persistent_keepalive: None,
            },
        )
        .expect("endpoint for A");
        let ping = ipv4_packet(A_V4, B_V4, 40);
        let pong = ipv6_packet(B_V6, A_V6, 40);
        let mut out = vec![0u8; BUF_LEN];
        let mut init = |dp: &mut DataPlane, pkt: &[u8]| -> Vec<u8> {
            let mut buf = vec![0u8; BUF_LEN];
            buf[..pkt.len()].copy_from_slice(pkt);
            match dp.handle_tun_packet(&mut buf, pkt.len(), &mut out) {
                Outgoing::Send { data, .. } => {
                    assert_eq!(data[0], MSG_HANDSHAKE_INIT);
                    data.to_vec()
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        let init_a = init(&mut p.a, &ping);
        let init_b = init(&mut p.b, &pong);
        let t1 = p.deliver(Side::B, &init_a);
        let t2 = p.deliver(Side::A, &init_b);
        let mut at_b = t1.tun_at(Side::B);
        at_b.extend(t2.tun_at(Side::B));
        let mut at_a = t1.tun_at(Side::A);
        at_a.extend(t2.tun_at(Side::A));
        assert_eq!(at_b, vec![ping.as_slice()], "{t1:?} {t2:?}");
        assert_eq!(at_a, vec![pong.as_slice()], "{t1:?} {t2:?}");
        // Both directions keep working afterwards.
        let t = p.send_packet(Side::B, &pong);
        assert_eq!(t.tun_at(Side::A), vec![pong.as_slice()]);
        let t = p.send_packet(Side::A, &ping);
        assert_eq!(t.tun_at(Side::B), vec![ping.as_slice()]);
    }

    #[test]
    fn data_plane_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<DataPlane>();
    }

    #[test]
    fn parse_destination_checks_headers() {
        let v4 = ipv4_packet(A_V4, B_V4, 8);
        assert_eq!(parse_destination(&v4), Some((IpAddr::V4(B_V4), 28)));
        let v6 = ipv6_packet(A_V6, B_V6, 8);
        assert_eq!(parse_destination(&v6), Some((IpAddr::V6(B_V6), 48)));
        assert_eq!(parse_destination(&v4[..27]), None);
        assert_eq!(parse_destination(&v6[..47]), None);
        assert_eq!(parse_destination(&[]), None);
        assert_eq!(parse_destination(&[0x45]), None);
        assert_eq!(parse_destination(&[0x60; 39]), None);
    }
}
