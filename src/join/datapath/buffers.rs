//! The data path's buffers, allocated once: TUN reads and their segments, the UDP
//! receive trains, the GSO trains going out, and the TUN write slots.

use std::net::SocketAddr;

use crate::io::packet_buf::PacketBuf;
use crate::io::udp;
use crate::node::dataplane::LocalAddr;
use crate::wire::gro::Coalescer;

/// Datagrams received per `recvmmsg` (each buffer may hold a GRO train).
pub(super) const UDP_BATCH: usize = 8;
/// Largest UDP payload, and so the size of one GRO train.
pub(super) const MAX_UDP: usize = 65_535;
/// Largest IP packet, and so the largest tunnel MTU.
pub(super) const MAX_PACKET: usize = 65_535;
/// Room for one TUN packet at least (MTU 1420 plus padding, with margin); larger
/// when the tunnel MTU is ([`packet_room`]).
pub(super) const TUN_PACKET: usize = 4096;
/// Largest datagram put in a GSO train: a train's segments must fit the path MTU
/// (the kernel refuses the whole train otherwise), which is not known; 1,452 bytes
/// fit a 1,500-byte link under IPv6 (`join`'s 1,420-byte MTU gives exactly that).
/// Larger datagrams leave one by one and the kernel fragments them if needed.
pub(super) const TRAIN_MAX_SEGMENT: usize = 1500 - 40 - 8;
/// Bytes a data message adds to its padded plaintext.
pub(super) const DATA_OVERHEAD: usize = crate::node::dataplane::DATA_OVERHEAD;
/// Batches taken from one source per loop turn before looking at the others.
pub(super) const ROUNDS: usize = 4;

/// Room for one plaintext of a tunnel with this MTU: the largest packet padded to
/// 16 bytes, and never less than [`TUN_PACKET`].
pub(super) fn packet_room(mtu: usize) -> usize {
    mtu.min(MAX_PACKET).next_multiple_of(16).max(TUN_PACKET)
}

/// Every buffer of the loop, allocated once (and again only when the tunnel MTU
/// changes: [`Buffers::set_mtu`]).
pub(super) struct Buffers {
    /// Whole read from TUN (virtio header + a GSO super-packet when offload is on).
    pub(super) tun_original: Vec<u8>,
    /// TUN packets after segmentation. The first holds any packet (a packet that is
    /// not a GSO super-packet, of any size up to 65,535 bytes, lands there even
    /// before the driver has told us of a larger MTU); the others hold a segment of
    /// the current MTU ([`packet_room`]).
    pub(super) tun_in: Vec<Vec<u8>>,
    pub(super) tun_sizes: Vec<usize>,
    /// Encrypted datagrams from TUN, sent as GSO trains.
    pub(super) gso: Trains,
    /// Re-encrypted datagrams a relay forwards, sent as GSO trains.
    pub(super) fwd: Trains,
    /// Decrypted packets waiting for one batched TUN write (GRO-coalesced), each
    /// `tun_offset + out_room` long between writes.
    pub(super) tun_out: Vec<PacketBuf>,
    /// Room for a datagram in a `tun_out` slot; larger datagrams (a peer with a
    /// larger MTU than ours) are decrypted into `big_out` and written alone.
    pub(super) out_room: usize,
    pub(super) big_out: Vec<u8>,
    pub(super) gro: Coalescer,
    /// Handshakes and timer output.
    pub(super) scratch: Vec<u8>,
    /// Virtio header room before each TUN write (0 without offload).
    pub(super) tun_offset: usize,
}

impl Buffers {
    pub(super) fn new(tun_offset: usize, mtu: usize, gro: Coalescer) -> Self {
        let room = packet_room(mtu);
        let out_room = room + DATA_OVERHEAD;
        let tun_out_len = tun_offset + out_room;
        Self {
            tun_original: vec![0; tun_rs::VIRTIO_NET_HDR_LEN + MAX_UDP],
            tun_in: (0..tun_rs::IDEAL_BATCH_SIZE)
                .map(|i| {
                    vec![
                        0;
                        if i == 0 {
                            packet_room(MAX_PACKET)
                        } else {
                            room
                        }
                    ]
                })
                .collect(),
            tun_sizes: vec![0; tun_rs::IDEAL_BATCH_SIZE],
            gso: Trains::new(),
            fwd: Trains::new(),
            tun_out: (0..crate::io::tun::MAX_BATCH)
                .map(|_| PacketBuf::new(tun_out_len, tun_out_len))
                .collect(),
            out_room,
            big_out: vec![0; tun_offset + packet_room(MAX_PACKET) + DATA_OVERHEAD],
            gro,
            scratch: vec![0; MAX_UDP + 64],
            tun_offset,
        }
    }

    /// Sizes the per-packet buffers for a new tunnel MTU (allocates when it grows;
    /// never per packet).
    pub(super) fn set_mtu(&mut self, mtu: usize) {
        let room = packet_room(mtu);
        for buf in self.tun_in.iter_mut().skip(1) {
            buf.resize(room, 0);
            buf.shrink_to_fit();
        }
        self.out_room = room + DATA_OVERHEAD;
        let len = self.tun_out_len();
        for buf in &mut self.tun_out {
            buf.reserve_room(len);
            buf.set_len(len);
        }
    }

    /// Length of a `tun_out` slot between writes: the offset and a datagram's room.
    pub(super) fn tun_out_len(&self) -> usize {
        self.tun_offset + self.out_room
    }
}

/// UDP receive buffers, one GRO train each (apart from [`Buffers`], which the
/// receive loop borrows while these are borrowed).
pub(super) struct UdpIn {
    pub(super) data: Vec<u8>,
    pub(super) meta: Vec<udp::RecvMeta>,
    pub(super) receiver: udp::Receiver,
}

impl UdpIn {
    pub(super) fn new() -> Self {
        Self {
            data: vec![0; UDP_BATCH * MAX_UDP],
            meta: vec![udp::RecvMeta::default(); UDP_BATCH],
            receiver: udp::Receiver::new(),
        }
    }
}

/// Encrypted datagrams to one destination from one source, back to back in
/// `Buffers::gso`: all of `segment` bytes but possibly the last, which closes the
/// train.
pub(super) struct Train {
    pub(super) to: SocketAddr,
    pub(super) src: Option<LocalAddr>,
    pub(super) segment: usize,
    pub(super) count: usize,
    pub(super) len: usize,
    pub(super) closed: bool,
}

/// A GSO buffer and the train being built in it.
pub(super) struct Trains {
    pub(super) buf: Vec<u8>,
    pub(super) train: Option<Train>,
}

impl Trains {
    pub(super) fn new() -> Self {
        Self {
            // Room for the largest packet alone, padded and encrypted.
            buf: vec![0; packet_room(MAX_PACKET) + DATA_OVERHEAD],
            train: None,
        }
    }

    /// Where the next datagram is encrypted to (right after the current train).
    pub(super) fn spare(&mut self) -> Option<&mut [u8]> {
        let pos = self.train.as_ref().map_or(0, |t| t.len);
        self.buf.get_mut(pos..)
    }
}

impl Train {
    pub(super) fn accepts(
        &self,
        to: SocketAddr,
        src: Option<LocalAddr>,
        len: usize,
        max_segments: usize,
    ) -> bool {
        !self.closed
            && self.to == to
            && self.src == src
            && len <= self.segment
            && self.count < max_segments
            && self.len + len <= MAX_UDP
    }
}
