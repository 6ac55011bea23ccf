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
//! organization, its advertised prefixes and ours) to the exit set with
//! [`DataPlane::set_relay_exit`], and forwards the exit's answers (sources on the
//! internet) to the peer they are for, never to this host. The exit enforces the
//! access policy (`internet`) on what it receives, as for a direct client.

use std::ops::Range;

use tracing::trace;

use ipnet::IpNet;

use super::packet::drop_in;
use super::{DataPlane, DropReason, Incoming, PeerId};
use crate::node::filter::Verdict;
use crate::wire::ip::IpPacket;

/// On a relay: the exit that carries peers' internet traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayExit {
    pub peer: PeerId,
    /// Destinations that are never the internet: the organization's prefixes and
    /// this host's advertised ones.
    pub local: Vec<IpNet>,
}

impl DataPlane {
    /// Makes this data plane a relay (`--relay`): see
    /// [`DataPlane::handle_datagram_or_forward`].
    pub fn set_relay(&mut self, relay: bool) {
        self.relay = relay;
    }

    /// On a relay, the exit that carries the internet traffic of peers that route
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
            Some(exit) if self.relay && exit.peer == from => self.internet(exit, src),
            _ => false,
        }
    }

    /// On a relay, the peer other than `from` that `packet`'s destination routes to
    /// (the exit for an internet destination).
    pub(super) fn forward_to(&self, from: PeerId, packet: &[u8]) -> Option<PeerId> {
        if !self.relay {
            return None;
        }
        let dst = IpPacket::new_checked(packet).ok()?.dst();
        match self.routes.lookup(dst) {
            Some(to) => (to != from).then_some(to),
            None => match &self.relay_exit {
                Some(exit) if exit.peer != from && self.internet(exit, dst) => Some(exit.peer),
                _ => None,
            },
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
            Ok(Some((to, data))) => {
                self.counters.relayed_packets = self.counters.relayed_packets.saturating_add(1);
                self.counters.relayed_bytes =
                    self.counters.relayed_bytes.saturating_add(len as u64);
                trace!(from, to = to_peer, len, "relayed");
                Incoming::Forward {
                    from_peer: from,
                    to_peer,
                    packet: out.get(range).unwrap_or_default(),
                    to,
                    data,
                }
            }
            Ok(None) => Incoming::Nothing,
            Err(reason) => drop_in(&mut self.counters, reason),
        }
    }
}
