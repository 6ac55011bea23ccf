//! Peers: configuration, tunnel indices, keys and their routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use tracing::debug;

use super::{DataPlane, DataPlaneError, INDEX_SPACE, LocalAddr, PeerConfig, PeerId};

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
    /// What the direct/relay fallback (`node::mesh`) looks at.
    pub path: PathCounters,
}

/// Per-peer counts that tell whether the direct path carries traffic both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounters {
    /// Data packets encrypted for the peer.
    pub tx_data: u64,
    /// Handshakes we initiated that the peer answered (a response proves the path
    /// works both ways; an initiation received proves only one).
    pub responses: u64,
    /// Packets from this peer's addresses that came through another peer (then
    /// dropped by the source check), and the last peer they came through.
    pub via_other: u64,
    pub via: Option<PeerId>,
    /// Packets this peer sent from its own addresses while they are routed to
    /// another peer (it came back to the direct path before we did).
    pub direct_while_elsewhere: u64,
}

/// State of one peer.
pub(super) struct Peer {
    /// Made on first use (a packet to or from the peer, a handshake, a keepalive or
    /// a probe), so a snapshot of thousands of peers installs without a `Tunn` (and
    /// its key agreement) each. Boxed: a `Tunn` is large and the map moves its values
    /// when it grows.
    pub(super) tunn: Option<Box<Tunn>>,
    /// The index this `Tunn` was created with (its sessions are `index << 8 | n`).
    pub(super) index: u32,
    pub(super) public_key: [u8; 32],
    /// The preshared key mixed into handshakes (`nexodus wg`; the mesh uses none).
    pub(super) preshared_key: Option<[u8; 32]>,
    pub(super) endpoint: Option<SocketAddr>,
    /// Where we send to `endpoint` from: the local address the peer's last
    /// authenticated datagram arrived on (`None`: the kernel chooses). Cleared when
    /// the endpoint is configured, and when the shell reports it gone.
    pub(super) source: Option<LocalAddr>,
    /// The configured prefixes; `DataPlane::routes` is rebuilt from them.
    pub(super) allowed_ips: Vec<IpNet>,
    /// Persistent keepalive interval in seconds (0 = off).
    pub(super) keepalive: u16,
    /// When the next persistent keepalive is due; `None`: at the next tick.
    pub(super) keepalive_due: Option<Instant>,
    /// Any authenticated packet sent or received since the last tick.
    pub(super) active_since_tick: bool,
    /// The `Tunn` may hold packets it queued while waiting for a session.
    pub(super) queued: bool,
    /// This peer is in `DataPlane::flush`.
    pub(super) flush_pending: bool,
    pub(super) rx_bytes: u64,
    pub(super) tx_bytes: u64,
    pub(super) path: PathCounters,
    /// A handshake initiation is wanted at the next tick ([`DataPlane::probe`]).
    pub(super) probe: bool,
}

impl Peer {
    /// The peer's `Tunn`, made now if it has none yet.
    pub(super) fn tunn(&mut self, secret: &StaticSecret, limiter: &Arc<RateLimiter>) -> &mut Tunn {
        let (public, index, psk) = (self.public_key, self.index, self.preshared_key);
        self.tunn.get_or_insert_with(|| {
            // Keepalives are driven by `handle_timeout`, not by `Tunn`, so they can
            // change without losing the session.
            Box::new(Tunn::new(
                secret.clone(),
                PublicKey::from(public),
                psk,
                None,
                index,
                Some(Arc::clone(limiter)),
            ))
        })
    }

    pub(super) fn sent(&mut self, len: usize) {
        self.tx_bytes = self.tx_bytes.saturating_add(len as u64);
        self.active_since_tick = true;
    }

    /// An authenticated datagram of `len` bytes came from `from` to our `local`
    /// address: the peer's endpoint and our source for it follow.
    pub(super) fn received(
        &mut self,
        from: SocketAddr,
        local: Option<LocalAddr>,
        len: usize,
        id: PeerId,
    ) {
        self.rx_bytes = self.rx_bytes.saturating_add(len as u64);
        self.active_since_tick = true;
        if self.endpoint != Some(from) {
            debug!(peer = id, old = ?self.endpoint, new = %from, "peer endpoint changed");
            self.endpoint = Some(from);
        }
        if self.source != local {
            debug!(peer = id, old = ?self.source, new = ?local, "source address for the peer");
            self.source = local;
        }
    }

    /// The source to send to `to` from: ours for the peer if `to` is its endpoint.
    pub(super) fn source_for(&self, to: SocketAddr) -> Option<LocalAddr> {
        self.source.filter(|_| self.endpoint == Some(to))
    }
}

impl DataPlane {
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
        if crate::coord::keys::is_low_order(&cfg.public_key) {
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
                    peer.source = None;
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
                let peer = Peer {
                    tunn: None,
                    index,
                    public_key: cfg.public_key,
                    preshared_key: None,
                    endpoint: cfg.endpoint.or(old_endpoint),
                    source: None,
                    allowed_ips: cfg.allowed_ips,
                    keepalive,
                    keepalive_due: None,
                    active_since_tick: false,
                    queued: false,
                    flush_pending: false,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    path: PathCounters::default(),
                    probe: false,
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

    /// Sets peer `id`'s preshared key (`None`: none). A change drops the peer's
    /// session: the next packet makes a new handshake with the new key.
    pub fn set_preshared_key(&mut self, id: PeerId, key: Option<[u8; 32]>) {
        if let Some(p) = self.peers.get_mut(&id)
            && p.preshared_key != key
        {
            p.preshared_key = key;
            p.tunn = None;
            p.queued = false;
        }
    }

    /// Ids of all configured peers, in no particular order.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Statistics of peer `id`.
    pub fn peer_stats(&self, id: PeerId) -> Option<PeerStats> {
        let peer = self.peers.get(&id)?;
        let last_handshake = peer.tunn.as_ref().and_then(|t| t.stats().0);
        Some(PeerStats {
            endpoint: peer.endpoint,
            last_handshake,
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
            path: peer.path,
        })
    }

    /// The local address we send to peer `id` from (`None`: the kernel chooses).
    pub fn peer_source(&self, id: PeerId) -> Option<LocalAddr> {
        self.peers.get(&id)?.source
    }

    /// The shell could not send to `to` from `src` (the address was removed from
    /// the host): peers reached at `to` from it forget it, so the kernel chooses
    /// again until their next packet arrives. A scan of the peers: it runs on such
    /// a failure only.
    pub fn forget_source(&mut self, to: SocketAddr, src: LocalAddr) {
        for (&id, peer) in self.peers.iter_mut() {
            if peer.endpoint == Some(to) && peer.source == Some(src) {
                debug!(peer = id, source = ?src, "source address gone; the kernel chooses");
                peer.source = None;
            }
        }
    }

    /// Starts a handshake with peer `id` at the next tick (unless one is in flight):
    /// whether a response comes back tells if the direct path works.
    pub fn probe(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.probe = true;
        }
    }

    /// The peer owning session index `receiver_idx` (our index for the peer's
    /// tunnel is the top 24 bits).
    #[inline]
    pub(super) fn peer_by_index(&self, receiver_idx: u32) -> Option<PeerId> {
        self.by_index.get(&(receiver_idx >> 8)).copied()
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
}
