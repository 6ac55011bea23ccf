//! Drop reasons and the counters kept for them.

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
    /// A decrypted packet the access policy does not allow (no live flow, no
    /// rule, or an unparsable header chain); see [`crate::node::filter`].
    Policy,
    /// A new inbound flow the policy allows, refused because the flow table is full.
    FlowTableFull,
}

/// Global counters: one per [`DropReason`], plus cookie replies sent and packets
/// relayed.
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
    /// [`DropReason::Policy`].
    pub policy: u64,
    /// [`DropReason::FlowTableFull`].
    pub flow_table_full: u64,
    /// Packets we sent whose new flow the full flow table could not remember (sent
    /// anyway; not a drop).
    pub flows_unrecorded: u64,
    /// Cookie replies sent because the handshake rate limit was exceeded.
    pub cookie_replies: u64,
    /// Packets forwarded from one peer to another ([`super::Incoming::Forward`]).
    pub relayed_packets: u64,
    /// Plaintext bytes of those packets.
    pub relayed_bytes: u64,
    /// Link-local or multicast packets from the TUN that no peer routes (the
    /// kernel's own IPv6 router solicitations, MLD reports, ...): dropped silently,
    /// not a drop reason.
    pub link_local_ignored: u64,
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
            DropReason::Policy => self.policy,
            DropReason::FlowTableFull => self.flow_table_full,
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
            + self.policy
            + self.flow_table_full
    }

    pub(super) fn bump(&mut self, reason: DropReason) {
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
            DropReason::Policy => &mut self.policy,
            DropReason::FlowTableFull => &mut self.flow_table_full,
        };
        *c = c.saturating_add(1);
    }
}
