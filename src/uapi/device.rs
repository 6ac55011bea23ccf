//! The device a `set` changes: our key, port, fwmark, peers and their allowed IPs,
//! and what changed since the shell last looked ([`Changes`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use super::{UapiError, hex32, parse_decimal, parse_hex32};
use crate::node::dataplane::{PeerId, PeerStats};

/// Most peers one device holds (the kernel's `MAX_PEERS_PER_DEVICE`).
pub const MAX_PEERS: usize = 1 << 20;
/// Most allowed IPs over all peers.
pub const MAX_ALLOWED_IPS: usize = 1 << 22;

/// One peer as configured through UAPI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    /// The endpoint last configured (roaming moves the data plane's, not this one).
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    /// In the order added. May hold prefixes another peer took since (`stale`):
    /// read it through [`Device::allowed_ips`].
    allowed: Vec<IpNet>,
    stale: usize,
}

/// What happened to one peer in the operations since [`Device::take_changes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChange {
    /// An endpoint was set (the data plane keeps a roamed one otherwise).
    pub endpoint: Option<SocketAddr>,
    /// The preshared key was set.
    pub preshared_key: bool,
}

/// Changes to hand to the data plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub private_key: bool,
    pub listen_port: bool,
    pub fwmark: bool,
    /// Peers added or changed (they exist now).
    pub peers: BTreeMap<PeerId, PeerChange>,
    /// Peers that no longer exist.
    pub removed: BTreeSet<PeerId>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// The peer the lines of a `set` currently apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Current {
    /// Device keys (before the first `public_key`).
    Device,
    /// This peer; `created`: it did not exist before this operation.
    Peer { id: PeerId, created: bool },
    /// Lines for a peer that is ignored (our own key, removed, `update_only`).
    Ignored,
}

/// The device model. Peer ids grow, so iterating `peers` is the order they were added.
#[derive(Debug, Default)]
pub struct Device {
    private_key: Option<[u8; 32]>,
    public_key: Option<[u8; 32]>,
    /// The port asked for (0: any); the shell replaces it with the one bound.
    pub listen_port: u16,
    pub fwmark: u32,
    peers: BTreeMap<PeerId, WgPeer>,
    by_key: HashMap<[u8; 32], PeerId>,
    /// Which peer holds each allowed IP (the authority: a peer's list may be stale).
    owners: HashMap<IpNet, PeerId>,
    next_id: PeerId,
    changes: Changes,
}

impl Device {
    pub fn new() -> Self {
        Device {
            next_id: 1,
            ..Default::default()
        }
    }

    pub fn private_key(&self) -> Option<[u8; 32]> {
        self.private_key
    }

    pub fn peer(&self, id: PeerId) -> Option<&WgPeer> {
        self.peers.get(&id)
    }

    /// Peers in the order they were added.
    pub fn peers(&self) -> impl Iterator<Item = (PeerId, &WgPeer)> {
        self.peers.iter().map(|(id, p)| (*id, p))
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// The allowed IPs peer `id` holds, in the order they were added.
    pub fn allowed_ips(&self, id: PeerId) -> Vec<IpNet> {
        let Some(p) = self.peers.get(&id) else {
            return Vec::new();
        };
        let held = p
            .allowed
            .iter()
            .copied()
            .filter(|net| self.owners.get(net) == Some(&id));
        if p.stale == 0 {
            // No entry ever left this list since it was last compacted: no repeats.
            return held.collect();
        }
        let mut seen = std::collections::HashSet::new();
        held.filter(|net| seen.insert(*net)).collect()
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    fn touch(&mut self, id: PeerId) -> &mut PeerChange {
        self.changes.peers.entry(id).or_default()
    }

    fn remove_peer(&mut self, id: PeerId) {
        let Some(peer) = self.peers.remove(&id) else {
            return;
        };
        self.by_key.remove(&peer.public_key);
        for net in &peer.allowed {
            if self.owners.get(net) == Some(&id) {
                self.owners.remove(net);
            }
        }
        self.changes.peers.remove(&id);
        self.changes.removed.insert(id);
    }

    fn set_private_key(&mut self, key: [u8; 32]) {
        let key_or_none = (key != [0; 32]).then_some(key);
        if key_or_none == self.private_key {
            // The same key (as `wg syncconf` sends it): sessions go on.
            return;
        }
        if key == [0; 32] {
            self.private_key = None;
            self.public_key = None;
        } else {
            let public =
                *boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(key))
                    .as_bytes();
            self.private_key = Some(key);
            self.public_key = Some(public);
            // A peer with our own public key cannot exist (wireguard-go drops it).
            if let Some(&id) = self.by_key.get(&public) {
                self.remove_peer(id);
            }
        }
        self.changes.private_key = true;
    }

    /// Applies one `key=value` line of a `set`, with `current` the peer the previous
    /// lines were about.
    pub(super) fn apply(
        &mut self,
        current: &mut Current,
        key: &str,
        value: &str,
    ) -> Result<(), UapiError> {
        let invalid = |key: &'static str| UapiError::Invalid {
            key,
            value: value.chars().take(80).collect(),
        };
        if key == "public_key" {
            let pk = parse_hex32(value).ok_or_else(|| invalid("public_key"))?;
            *current = if Some(pk) == self.public_key {
                Current::Ignored
            } else if let Some(&id) = self.by_key.get(&pk) {
                Current::Peer { id, created: false }
            } else {
                if self.peers.len() >= MAX_PEERS {
                    return Err(UapiError::Limit("peers"));
                }
                let id = self.next_id;
                self.next_id += 1;
                self.peers.insert(
                    id,
                    WgPeer {
                        public_key: pk,
                        preshared_key: None,
                        endpoint: None,
                        persistent_keepalive: 0,
                        allowed: Vec::new(),
                        stale: 0,
                    },
                );
                self.by_key.insert(pk, id);
                self.changes.removed.remove(&id);
                self.touch(id);
                Current::Peer { id, created: true }
            };
            return Ok(());
        }
        match *current {
            Current::Device => self.apply_device(key, value, invalid),
            Current::Ignored => self.check_peer_value(key, value, invalid),
            Current::Peer { id, created } => {
                self.apply_peer(current, id, created, key, value, invalid)
            }
        }
    }

    fn apply_device(
        &mut self,
        key: &str,
        value: &str,
        invalid: impl Fn(&'static str) -> UapiError,
    ) -> Result<(), UapiError> {
        match key {
            "private_key" => {
                let k = parse_hex32(value).ok_or_else(|| invalid("private_key"))?;
                self.set_private_key(k);
            }
            "listen_port" => {
                self.listen_port = parse_decimal(value).ok_or_else(|| invalid("listen_port"))?;
                self.changes.listen_port = true;
            }
            "fwmark" => {
                self.fwmark = parse_decimal(value).ok_or_else(|| invalid("fwmark"))?;
                self.changes.fwmark = true;
            }
            "replace_peers" => {
                if value != "true" {
                    return Err(invalid("replace_peers"));
                }
                let ids: Vec<PeerId> = self.peers.keys().copied().collect();
                for id in ids {
                    self.remove_peer(id);
                }
            }
            other => return Err(UapiError::UnknownKey(other.chars().take(80).collect())),
        }
        Ok(())
    }

    /// Lines for an ignored peer are still checked (wireguard-go parses them too).
    fn check_peer_value(
        &mut self,
        key: &str,
        value: &str,
        invalid: impl Fn(&'static str) -> UapiError,
    ) -> Result<(), UapiError> {
        let ok = match key {
            "update_only" | "remove" | "replace_allowed_ips" => value == "true",
            "preshared_key" => parse_hex32(value).is_some(),
            "endpoint" => value.parse::<SocketAddr>().is_ok(),
            "persistent_keepalive_interval" => parse_decimal::<u16>(value).is_some(),
            "allowed_ip" => parse_allowed(value).is_some(),
            "protocol_version" => value == "1",
            other => return Err(UapiError::UnknownKey(other.chars().take(80).collect())),
        };
        if ok {
            Ok(())
        } else {
            Err(invalid(peer_key_name(key)))
        }
    }

    fn apply_peer(
        &mut self,
        current: &mut Current,
        id: PeerId,
        created: bool,
        key: &str,
        value: &str,
        invalid: impl Fn(&'static str) -> UapiError,
    ) -> Result<(), UapiError> {
        match key {
            "update_only" => {
                if value != "true" {
                    return Err(invalid("update_only"));
                }
                if created {
                    // Only existing peers are updated: forget the one this made.
                    self.remove_peer(id);
                    self.changes.removed.remove(&id);
                    *current = Current::Ignored;
                }
            }
            "remove" => {
                if value != "true" {
                    return Err(invalid("remove"));
                }
                self.remove_peer(id);
                if created {
                    self.changes.removed.remove(&id);
                }
                *current = Current::Ignored;
            }
            "preshared_key" => {
                let k = parse_hex32(value).ok_or_else(|| invalid("preshared_key"))?;
                if let Some(p) = self.peers.get_mut(&id) {
                    p.preshared_key = (k != [0; 32]).then_some(k);
                }
                self.touch(id).preshared_key = true;
            }
            "endpoint" => {
                let e: SocketAddr = value.parse().map_err(|_| invalid("endpoint"))?;
                if let Some(p) = self.peers.get_mut(&id) {
                    p.endpoint = Some(e);
                }
                self.touch(id).endpoint = Some(e);
            }
            "persistent_keepalive_interval" => {
                let k =
                    parse_decimal(value).ok_or_else(|| invalid("persistent_keepalive_interval"))?;
                if let Some(p) = self.peers.get_mut(&id) {
                    p.persistent_keepalive = k;
                }
                self.touch(id);
            }
            "replace_allowed_ips" => {
                if value != "true" {
                    return Err(invalid("replace_allowed_ips"));
                }
                if let Some(p) = self.peers.get_mut(&id) {
                    for net in std::mem::take(&mut p.allowed) {
                        if self.owners.get(&net) == Some(&id) {
                            self.owners.remove(&net);
                        }
                    }
                    p.stale = 0;
                }
                self.touch(id);
            }
            "allowed_ip" => {
                let (remove, net) = parse_allowed(value).ok_or_else(|| invalid("allowed_ip"))?;
                if remove {
                    if self.owners.get(&net) == Some(&id) {
                        self.owners.remove(&net);
                        self.mark_stale(id);
                    }
                } else {
                    self.add_allowed(id, net)?;
                }
                self.touch(id);
            }
            "protocol_version" => {
                if value != "1" {
                    return Err(invalid("protocol_version"));
                }
            }
            other => return Err(UapiError::UnknownKey(other.chars().take(80).collect())),
        }
        Ok(())
    }

    fn add_allowed(&mut self, id: PeerId, net: IpNet) -> Result<(), UapiError> {
        let previous = match self.owners.get(&net).copied() {
            Some(owner) if owner == id => return Ok(()),
            Some(owner) => Some(owner),
            None if self.owners.len() >= MAX_ALLOWED_IPS => {
                return Err(UapiError::Limit("allowed IPs"));
            }
            None => None,
        };
        self.owners.insert(net, id);
        if let Some(owner) = previous {
            // Moved to this peer: the other's list keeps a stale entry.
            self.mark_stale(owner);
            self.touch(owner);
        }
        if let Some(p) = self.peers.get_mut(&id) {
            // It may be in the list already, stale from an earlier move away.
            p.allowed.push(net);
        }
        self.compact(id);
        Ok(())
    }

    fn mark_stale(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            p.stale += 1;
        }
        self.compact(id);
    }

    /// Drops stale entries once they are half of a list (amortized O(1) per change).
    fn compact(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        if p.stale * 2 <= p.allowed.len() {
            return;
        }
        let owners = &self.owners;
        let mut seen = std::collections::HashSet::new();
        p.allowed
            .retain(|net| owners.get(net) == Some(&id) && seen.insert(*net));
        p.stale = 0;
    }
}

fn peer_key_name(key: &str) -> &'static str {
    [
        "update_only",
        "remove",
        "replace_allowed_ips",
        "preshared_key",
        "endpoint",
        "persistent_keepalive_interval",
        "allowed_ip",
        "protocol_version",
    ]
    .into_iter()
    .find(|k| *k == key)
    .unwrap_or("peer key")
}

/// `allowed_ip` values: a prefix with its length, masked; a leading `-` removes it.
fn parse_allowed(value: &str) -> Option<(bool, IpNet)> {
    let (remove, v) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (addr, len) = v.split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let len: u8 = parse_decimal(len)?;
    Some((remove, IpNet::new(addr, len).ok()?.trunc()))
}

/// The answer to `get=1` (without its `errno=` line), in wireguard-go's order; `stats`
/// gives a peer's live endpoint, handshake and counters.
pub fn render_get(
    dev: &Device,
    stats: impl Fn(PeerId) -> Option<PeerStats>,
    now: SystemTime,
) -> String {
    let mut out = String::with_capacity(256 + 64 * dev.owners.len());
    if let Some(k) = &dev.private_key {
        let _ = writeln!(out, "private_key={}", hex32(k));
    }
    if dev.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", dev.listen_port);
    }
    if dev.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", dev.fwmark);
    }
    for (id, p) in dev.peers() {
        let s = stats(id);
        let _ = writeln!(out, "public_key={}", hex32(&p.public_key));
        let _ = writeln!(
            out,
            "preshared_key={}",
            hex32(&p.preshared_key.unwrap_or([0; 32]))
        );
        let _ = writeln!(out, "protocol_version=1");
        if let Some(e) = s.and_then(|s| s.endpoint).or(p.endpoint) {
            let _ = writeln!(out, "endpoint={e}");
        }
        let (sec, nsec) = s
            .and_then(|s| s.last_handshake)
            .and_then(|age| now.checked_sub(age))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", s.map_or(0, |s| s.tx_bytes));
        let _ = writeln!(out, "rx_bytes={}", s.map_or(0, |s| s.rx_bytes));
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        for net in dev.allowed_ips(id) {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out
}
