//! Relaying: a decrypted packet whose destination belongs to another peer is
//! re-encrypted for that peer instead of going to the TUN device.
//!
//! The decision is the same one a node's kernel would make with routes to every peer
//! over the tunnel, taken here so that it needs no TUN round trip and stays in the
//! sans-IO core (tested, fuzzed, allocation-free). Packets for this host, for no
//! peer, or back to their sender go to TUN as on any node.

use std::ops::Range;

use tracing::trace;

use super::packet::drop_in;
use super::{DataPlane, DropReason, Incoming, PeerId};
use crate::node::filter::Verdict;
use crate::wire::ip::IpPacket;

impl DataPlane {
    /// Makes this data plane a relay (`--relay`): see
    /// [`DataPlane::handle_datagram_or_forward`].
    pub fn set_relay(&mut self, relay: bool) {
        self.relay = relay;
    }

    /// On a relay, the peer other than `from` that `packet`'s destination routes to.
    pub(super) fn forward_to(&self, from: PeerId, packet: &[u8]) -> Option<PeerId> {
        if !self.relay {
            return None;
        }
        let dst = IpPacket::new_checked(packet).ok()?.dst();
        self.routes.lookup(dst).filter(|&to| to != from)
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
