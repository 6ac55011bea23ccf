//! The per-packet paths: a TUN packet becomes a datagram ([`DataPlane::handle_tun_packet`]),
//! a datagram becomes a TUN packet, an answer, or (on a relay) a datagram to another
//! peer ([`DataPlane::handle_datagram`]).

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use tracing::{debug, trace};

use super::{
    DATA_OVERHEAD, DataPlane, DropReason, Incoming, LocalAddr, MIN_OUT_LEN, MSG_COOKIE_REPLY,
    MSG_DATA, MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESPONSE, Outgoing, PADDING, PeerId,
};
use crate::node::filter::Verdict;
use crate::wire::ip::IpPacket;

#[inline]
fn drop_out<'o>(counters: &mut super::Counters, reason: DropReason) -> Outgoing<'o> {
    counters.bump(reason);
    trace!(?reason, "dropping packet from tun");
    Outgoing::Drop(reason)
}

#[inline]
pub(super) fn drop_in<'o>(counters: &mut super::Counters, reason: DropReason) -> Incoming<'o> {
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
pub(super) fn span_in(outer: &[u8], sub_ptr: usize, sub_len: usize) -> Option<Range<usize>> {
    let start = sub_ptr.checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(sub_len)?;
    (end <= outer.len()).then_some(start..end)
}

impl DataPlane {
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
        let Some(ip) = buf.get(..len).and_then(|p| IpPacket::new_checked(p).ok()) else {
            return drop_out(&mut self.counters, DropReason::Malformed);
        };
        let (dst, packet_len) = (ip.dst(), ip.total_len());
        let Some(id) = self.routes.lookup(dst) else {
            if is_local_chatter(dst) {
                self.counters.link_local_ignored = self.counters.link_local_ignored.wrapping_add(1);
                return Outgoing::Nothing;
            }
            return drop_out(&mut self.counters, DropReason::NoRoute);
        };
        if let (Some(filter), Some(packet)) = (self.filter.as_deref_mut(), buf.get(..packet_len)) {
            // Our own packets always go; they open flows so that replies pass.
            if !filter.outbound(packet) {
                self.counters.flows_unrecorded = self.counters.flows_unrecorded.saturating_add(1);
            }
        }
        if !self.relay_filters.is_empty() {
            let packet = buf.get(..packet_len).unwrap_or_default();
            if self.relay_verdict(None, id, packet) != Verdict::Pass {
                return drop_out(&mut self.counters, DropReason::Policy);
            }
        }
        match self.encapsulate(id, buf, packet_len, out) {
            Ok(Some((to, src, data))) => Outgoing::Send { to, src, data },
            Ok(None) => Outgoing::Nothing,
            Err(reason) => drop_out(&mut self.counters, reason),
        }
    }

    /// Pads `buf[..packet_len]` (a checked IP packet) and encrypts it for peer
    /// `id` into `out`: `Some` datagram to send, with the endpoint and our source
    /// for it (the data message, or a handshake initiation when the packet was
    /// queued for lack of a session), `None` when it was queued behind a handshake
    /// in flight. Counts nothing on error.
    #[allow(clippy::type_complexity)]
    pub(super) fn encapsulate<'o>(
        &mut self,
        id: PeerId,
        buf: &mut [u8],
        packet_len: usize,
        out: &'o mut [u8],
    ) -> Result<Option<(SocketAddr, Option<LocalAddr>, &'o [u8])>, DropReason> {
        let peer = self.peers.get_mut(&id).ok_or(DropReason::UnknownPeer)?;
        let to = peer.endpoint.ok_or(DropReason::NoEndpoint)?;
        let src = peer.source;
        // Pad to 16 bytes, but never past the MTU (a full-size packet stays full size).
        let padded = packet_len
            .next_multiple_of(PADDING)
            .min(buf.len())
            .min(packet_len.max(self.mtu));
        if out.len() < (padded + DATA_OVERHEAD).max(MIN_OUT_LEN) {
            return Err(DropReason::BufferTooSmall);
        }
        if let Some(pad) = buf.get_mut(packet_len..padded) {
            pad.fill(0);
        }
        let plain = buf.get(..padded).ok_or(DropReason::Malformed)?;
        self.max_plain = self.max_plain.max(padded);

        match peer
            .tunn(&self.secret, &self.rate_limiter)
            .encapsulate(plain, out)
        {
            TunnResult::WriteToNetwork(data) => {
                if data.first() != Some(&MSG_DATA) {
                    // No session: boringtun queued the packet and started a
                    // handshake; `data` is the initiation.
                    peer.queued = true;
                    trace!(peer = id, "packet queued, sending handshake initiation");
                }
                peer.path.tx_data += 1;
                peer.sent(data.len());
                trace!(peer = id, len = data.len(), "encapsulated");
                Ok(Some((to, src, data)))
            }
            TunnResult::Done => {
                peer.queued = true;
                trace!(peer = id, "packet queued behind handshake in flight");
                Ok(None)
            }
            TunnResult::Err(e) => Err(reason_for(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Ok(None),
        }
    }

    /// Handles one UDP datagram received from `from`.
    ///
    /// `out` needs at least `datagram.len()` and [`MIN_OUT_LEN`] bytes. After
    /// a result other than `Drop`, call [`DataPlane::poll_transmit`] until it
    /// returns `None`. A relay ([`DataPlane::set_relay`]) needs
    /// [`DataPlane::handle_datagram_or_forward`] instead.
    pub fn handle_datagram<'o>(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'o mut [u8],
    ) -> Incoming<'o> {
        self.handle_datagram_or_forward(from, None, datagram, out, &mut [])
    }

    /// [`DataPlane::handle_datagram`] with the local address the datagram arrived
    /// on (`local`, if the shell knows it: answers leave from it, and an
    /// authenticated datagram makes it the peer's sticky source) and room to
    /// forward: on a relay, a decrypted packet for another peer is re-encrypted
    /// into `forward_out` (sized like the `out` of [`DataPlane::handle_tun_packet`])
    /// and returned as [`Incoming::Forward`]. Without relaying, `forward_out` is
    /// not used.
    pub fn handle_datagram_or_forward<'o>(
        &mut self,
        from: SocketAddr,
        local: Option<LocalAddr>,
        datagram: &[u8],
        out: &'o mut [u8],
        forward_out: &'o mut [u8],
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
                    return Incoming::Send {
                        to: from,
                        src: local,
                        data,
                    };
                }
            },
        };
        let Some(id) = id else {
            return drop_in(&mut self.counters, DropReason::UnknownPeer);
        };
        match self.decapsulate(id, from, local, datagram, out) {
            Decapsulated::Nothing => Incoming::Nothing,
            Decapsulated::Drop(reason) => drop_in(&mut self.counters, reason),
            Decapsulated::Send(ptr, len) => match span_in(out, ptr, len).and_then(|r| out.get(r)) {
                Some(data) => Incoming::Send {
                    to: from,
                    src: local,
                    data,
                },
                None => drop_in(&mut self.counters, DropReason::BufferTooSmall),
            },
            Decapsulated::Packet(ptr, len, src) => {
                // A decrypted data packet: the source check, then the TUN device,
                // or on a relay another peer.
                let Some(range) = span_in(out, ptr, len) else {
                    return drop_in(&mut self.counters, DropReason::BufferTooSmall);
                };
                // On a relay, the exit's answers from the internet: only ever
                // forwarded (to the spoke they are for), never written to TUN.
                let owned = self.routes.contains(src, id);
                let from_internet = !owned && self.exit_source(id, src);
                if !owned && !from_internet {
                    self.misrouted(id, src);
                    return drop_in(&mut self.counters, DropReason::BadSource);
                }
                match self.forward_to(id, out.get(range.clone()).unwrap_or_default()) {
                    Ok(Some(to_peer)) => {
                        return self.forward(id, to_peer, out, range, forward_out);
                    }
                    Ok(None) => {}
                    Err(reason) => return drop_in(&mut self.counters, reason),
                }
                if from_internet {
                    return drop_in(&mut self.counters, DropReason::BadSource);
                }
                let Some(packet) = out.get(range) else {
                    return drop_in(&mut self.counters, DropReason::BufferTooSmall);
                };
                if let Some(filter) = self.filter.as_deref_mut() {
                    match filter.inbound(packet) {
                        Verdict::Pass => {}
                        Verdict::Drop => return drop_in(&mut self.counters, DropReason::Policy),
                        Verdict::Full => {
                            return drop_in(&mut self.counters, DropReason::FlowTableFull);
                        }
                    }
                }
                trace!(peer = id, len = packet.len(), "decapsulated");
                Incoming::WriteTun { peer: id, packet }
            }
        }
    }

    /// Notes a packet from peer `id` whose source `src` is routed to another peer:
    /// for the direct/relay fallback, that peer's traffic came through `id` (a relay),
    /// or `id` came back to the direct path while we still route it elsewhere.
    fn misrouted(&mut self, id: PeerId, src: IpAddr) {
        let Some(owner) = self.routes.lookup(src) else {
            return;
        };
        if let Some(o) = self.peers.get_mut(&owner) {
            o.path.via_other += 1;
            o.path.via = Some(id);
        }
        if let Some(p) = self.peers.get_mut(&id) {
            p.path.direct_while_elsewhere += 1;
        }
    }

    /// Decrypts `datagram` from peer `id` into `out`, and does the bookkeeping of
    /// an authenticated message (roaming, byte counters, flushing queued packets).
    /// Returns where in `out` the result lies rather than a slice, so the caller
    /// may use `out` again (a relay pads and re-encrypts the packet there).
    fn decapsulate(
        &mut self,
        id: PeerId,
        from: SocketAddr,
        local: Option<LocalAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Decapsulated {
        let Some(peer) = self.peers.get_mut(&id) else {
            return Decapsulated::Drop(DropReason::UnknownPeer);
        };
        let msg_type = datagram.first().copied().unwrap_or(0);
        if peer.tunn.is_none() && msg_type != MSG_HANDSHAKE_INIT {
            // No `Tunn` yet, so no session nor handshake of ours to answer: only an
            // initiation makes one (a forged index cannot make sessions appear).
            return Decapsulated::Drop(if msg_type == MSG_DATA {
                DropReason::Decrypt
            } else {
                DropReason::Handshake
            });
        }

        let (ptr, len, src) = match peer.tunn(&self.secret, &self.rate_limiter).decapsulate(
            Some(from.ip()),
            datagram,
            out,
        ) {
            TunnResult::Done => {
                if msg_type == MSG_DATA {
                    // An authenticated keepalive.
                    peer.received(from, local, datagram.len(), id);
                    trace!(peer = id, "keepalive received");
                }
                return Decapsulated::Nothing;
            }
            TunnResult::WriteToNetwork(data) => {
                if data.first() == Some(&MSG_COOKIE_REPLY) {
                    self.counters.cookie_replies += 1;
                    trace!(%from, "under load, sending cookie reply");
                } else {
                    // We answered a valid initiation or completed our own
                    // handshake: the datagram was authenticated.
                    peer.received(from, local, datagram.len(), id);
                    if msg_type == MSG_HANDSHAKE_RESPONSE {
                        peer.path.responses += 1;
                    }
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
                return Decapsulated::Send(data.as_ptr() as usize, data.len());
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                (packet.as_ptr() as usize, packet.len(), IpAddr::V4(src))
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                (packet.as_ptr() as usize, packet.len(), IpAddr::V6(src))
            }
            TunnResult::Err(e) => return Decapsulated::Drop(reason_for(&e)),
        };
        peer.received(from, local, datagram.len(), id);
        if peer.queued && !peer.flush_pending {
            peer.flush_pending = true;
            self.flush.push(id);
        }
        Decapsulated::Packet(ptr, len, src)
    }
}

/// What [`DataPlane::decapsulate`] left in `out`, by (address, length).
enum Decapsulated {
    Nothing,
    Drop(DropReason),
    /// A datagram to send back to the sender.
    Send(usize, usize),
    /// A decrypted IP packet, and its source address.
    Packet(usize, usize, IpAddr),
}

/// Outcome of checking a handshake initiation before handing it to a peer.
enum InitCheck {
    /// MACs fine; the initiator's key belongs to this peer (if any).
    Peer(Option<PeerId>),
    /// Under load: a cookie reply was written at (address, length) in `out`.
    Cookie(usize, usize),
    Drop(DropReason),
}

/// What the kernel sends into a TUN of its own accord (router solicitations, MLD,
/// IGMP, link-local chatter): no peer can be meant, and it is no error.
fn is_local_chatter(dst: std::net::IpAddr) -> bool {
    match dst {
        std::net::IpAddr::V4(a) => a.is_multicast() || a.is_link_local() || a.is_broadcast(),
        std::net::IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local(),
    }
}
