//! Relaying: a decrypted packet whose destination belongs to another peer is
//! re-encrypted for that peer instead of going to the TUN device.
//!
//! The decision is the same one a node's kernel would make with routes to every peer
//! over the tunnel, taken here so that it needs no TUN round trip and stays in the
//! sans-IO core (tested, fuzzed, allocation-free). Packets for this host, for no
//! peer, or back to their sender go to TUN as on any node.
//!
//! Exit traffic (DESIGN §8): a spoke reaches its exit only through the relay, so
//! the relay sends a peer's packets for the internet (a destination outside the
//! organization, its advertised prefixes and ours) to the exit that peer chose, as
//! set with [`DataPlane::set_relay_exit`] (a small table sorted by peer, looked up
//! without allocating), and drops them when that exit is not reachable (never to
//! another exit, never to this host). It forwards an exit's answers (sources on
//! the internet) to the peer they are for, never to this host. The exit enforces
//! the access policy (`internet`) on what it receives, as for a direct client.

use std::ops::Range;

use tracing::trace;

use ipnet::IpNet;

use super::packet::drop_in;
use super::{DataPlane, DropReason, Incoming, PeerId};
use crate::node::filter::Verdict;
use crate::wire::ip::IpPacket;

/// On a relay: which exit carries each peer's internet traffic (made with
/// [`RelayExit::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayExit {
    /// Per peer that chose an exit, sorted by peer: the exit to send its internet
    /// traffic to, or `None` when that exit is not reachable (the traffic is
    /// dropped). A peer not listed chose no exit, or this host (its traffic goes to
    /// TUN).
    pub exits: Vec<(PeerId, Option<PeerId>)>,
    /// The exits named above, sorted and deduplicated (whose internet-sourced
    /// answers are forwarded).
    exit_peers: Vec<PeerId>,
    /// Destinations that are never the internet: the organization's prefixes and
    /// this host's advertised ones.
    pub local: Vec<IpNet>,
}

impl RelayExit {
    /// The table from unsorted `(peer, exit)` pairs.
    pub fn new(mut exits: Vec<(PeerId, Option<PeerId>)>, local: Vec<IpNet>) -> Self {
        exits.sort_unstable_by_key(|(peer, _)| *peer);
        exits.dedup_by_key(|(peer, _)| *peer);
        let mut exit_peers: Vec<PeerId> = exits.iter().filter_map(|(_, e)| *e).collect();
        exit_peers.sort_unstable();
        exit_peers.dedup();
        Self {
            exits,
            exit_peers,
            local,
        }
    }

    /// `peer`'s entry: `None` when it is not listed.
    fn exit_of(&self, peer: PeerId) -> Option<Option<PeerId>> {
        self.exits
            .binary_search_by_key(&peer, |(p, _)| *p)
            .ok()
            .and_then(|i| self.exits.get(i))
            .map(|(_, e)| *e)
    }
}

impl DataPlane {
    /// Makes this data plane a relay (`--relay`): see
    /// [`DataPlane::handle_datagram_or_forward`].
    pub fn set_relay(&mut self, relay: bool) {
        self.relay = relay;
    }

    /// On a relay, the exits that carry the internet traffic of peers that route
    /// it through us (`None`: none; such traffic then goes to TUN, as on a relay
    /// that is itself the exit).
    pub fn set_relay_exit(&mut self, exit: Option<RelayExit>) {
        self.relay_exit = exit;
    }

    /// Whether `addr` is on the internet as a relay's exit sees it: outside the
    /// organization and every peer's prefixes.
    fn internet(&self, exit: &RelayExit, addr: std::net::IpAddr) -> bool {
        self.routes.lookup(addr).is_none() && !exit.local.iter().any(|n| n.contains(&addr))
    }

    /// On a relay, whether `src` is an internet source the exit `from` may send
    /// from (to be forwarded to a peer, never to TUN).
    pub(super) fn exit_source(&self, from: PeerId, src: std::net::IpAddr) -> bool {
        match &self.relay_exit {
            Some(exit) if self.relay && exit.exit_peers.binary_search(&from).is_ok() => {
                self.internet(exit, src)
            }
            _ => false,
        }
    }

    /// On a relay, the peer other than `from` that `packet`'s destination routes to
    /// (for an internet destination, the exit `from` chose); `Ok(None)`: to TUN;
    /// `Err`: dropped (`from`'s exit is not reachable: fail closed).
    pub(super) fn forward_to(
        &self,
        from: PeerId,
        packet: &[u8],
    ) -> Result<Option<PeerId>, DropReason> {
        if !self.relay {
            return Ok(None);
        }
        let Some(dst) = IpPacket::new_checked(packet).ok().map(|p| p.dst()) else {
            return Ok(None);
        };
        if let Some(to) = self.routes.lookup(dst) {
            return Ok((to != from).then_some(to));
        }
        let Some(exit) = &self.relay_exit else {
            return Ok(None);
        };
        match exit.exit_of(from) {
            Some(chosen) if self.internet(exit, dst) => match chosen {
                Some(to) if to != from => Ok(Some(to)),
                _ => Err(DropReason::NoRoute),
            },
            _ => Ok(None),
        }
    }

    /// A relay's policy check for a packet going to peer `to` (forwarded from
    /// `from`, or `None`: from this host), for peers that cannot enforce: a packet
    /// from such a peer opens a flow in its filter (so replies pass), and a packet
    /// to one must pass its filter.
    pub(super) fn relay_verdict(
        &mut self,
        from: Option<PeerId>,
        to: PeerId,
        packet: &[u8],
    ) -> Verdict {
        let mut verdict = Verdict::Pass;
        for (peer, filter) in &mut self.relay_filters {
            if Some(*peer) == from && !filter.outbound(packet) {
                self.counters.flows_unrecorded = self.counters.flows_unrecorded.saturating_add(1);
            }
            if *peer == to {
                verdict = filter.inbound(packet);
            }
        }
        verdict
    }

    /// Re-encrypts the packet at `out[range]` (decrypted from `from`) for
    /// `to_peer` into `forward_out`; `out` past the packet is padding room.
    pub(super) fn forward<'o>(
        &mut self,
        from: PeerId,
        to_peer: PeerId,
        out: &'o mut [u8],
        range: Range<usize>,
        forward_out: &'o mut [u8],
    ) -> Incoming<'o> {
        let len = range.len();
        let packet = out.get(range.clone()).unwrap_or_default();
        if !self.relay_filters.is_empty() {
            match self.relay_verdict(Some(from), to_peer, packet) {
                Verdict::Pass => {}
                Verdict::Drop => return drop_in(&mut self.counters, DropReason::Policy),
                Verdict::Full => return drop_in(&mut self.counters, DropReason::FlowTableFull),
            }
        }
        let sent = match out.get_mut(range.start..) {
            Some(buf) => self.encapsulate(to_peer, buf, len, forward_out),
            None => Err(DropReason::BufferTooSmall),
        };
        let out: &'o [u8] = out;
        match sent {
            Ok(Some((to, src, data))) => {
                self.counters.relayed_packets = self.counters.relayed_packets.saturating_add(1);
                self.counters.relayed_bytes =
                    self.counters.relayed_bytes.saturating_add(len as u64);
                trace!(from, to = to_peer, len, "relayed");
                Incoming::Forward {
                    from_peer: from,
                    to_peer,
                    packet: out.get(range).unwrap_or_default(),
                    to,
                    src,
                    data,
                }
            }
            Ok(None) => Incoming::Nothing,
            Err(reason) => drop_in(&mut self.counters, reason),
        }
    }
}
