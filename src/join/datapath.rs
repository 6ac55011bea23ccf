//! The data-path thread: owns the [`DataPlane`], the TUN device and the UDP socket,
//! and moves packets between them.
//!
//! One blocking thread with `poll(2)` over TUN, UDP and an eventfd that wakes it for
//! commands (peer changes, status requests). Readiness is drained in batches of up to
//! [`BATCH`] packets per source per turn, so batched syscalls (recvmmsg, GSO/GRO, TUN
//! offload) can replace the per-packet reads without changing the loop's shape. Buffers
//! are allocated once and no lock is taken per packet; nothing is allocated per
//! packet. Decrypted packets reach TUN through [`crate::wire::gro`]'s coalescer: the
//! segments of a flow go in one vectored write behind one virtio header, each
//! payload read where it was decrypted (tun-rs's own GRO write copied every packet
//! into a temporary `Vec` and checked each checksum).
//!
//! UDP goes through [`crate::io::udp`]'s own `recvmmsg`/`sendmsg` (quinn-udp only sets
//! the socket up and tells whether GSO/GRO work): each datagram's local address comes
//! in with it and each peer is answered from the one it wrote to (the data plane's
//! sticky source). A send from a source the host no longer has fails (`ENETUNREACH`
//! for IPv4, `EINVAL` for IPv6): the data plane forgets it and the datagram goes
//! again from the kernel's choice, so the peer's next packet teaches the new one.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::io::eventfd::{self, signal};
use crate::io::packet_buf::PacketBuf;
use crate::io::tun::{PacketDevice, Written, tun_gone};
use crate::io::udp;
use crate::node::dataplane::{
    Counters, DataPlane, Incoming, LocalAddr, MIN_OUT_LEN, Outgoing, PeerConfig, PeerId, PeerStats,
    Transmit,
};
use crate::node::nat::StunGate;
use crate::wire::gro::Coalescer;
use crate::wire::stun;

/// Packets taken from one source per loop turn before looking at the others.
pub const BATCH: usize = 64;

/// What the data-path reports for `nexodus status`.
#[derive(Debug, Clone)]
pub struct DataPathStatus {
    pub peers: Vec<(PeerId, PeerStats)>,
    pub counters: Counters,
    /// Datagrams or packets the kernel refused (full buffers).
    pub io_drops: u64,
    /// Packets this node forwarded between two peers (relay mode).
    pub relayed_packets: u64,
    pub relayed_bytes: u64,
    /// STUN answers dropped: not from a server we asked or not to a request we
    /// sent (spoofed or late), or the queue to the driver was full.
    pub stun_unsolicited: u64,
    pub stun_queue_full: u64,
}

/// A STUN answer that arrived on the WireGuard socket: (transaction, mapped address).
pub type StunAnswer = (stun::TransactionId, SocketAddr);

/// Room for STUN answers between the data path and the driver: a probe round
/// expects a handful; more are dropped and counted.
pub const STUN_QUEUE: usize = 16;

/// How the thread is set up.
pub struct DataPathConfig {
    /// Forward packets between peers inside this process (`--relay`).
    pub relay: bool,
    /// Where STUN answers go (bounded: [`STUN_QUEUE`]).
    pub stun_answers: tokio::sync::mpsc::Sender<StunAnswer>,
    /// Let the kernel fragment datagrams above the path MTU (`nexodus wg`, whose
    /// tunnel MTU may reach 65,535, as wireguard-go and the kernel do); `join` keeps
    /// quinn-udp's "never fragment".
    pub fragment: bool,
    /// Told once when the TUN device is gone (deleted: reads fail for good); the
    /// thread then stops polling it.
    pub tun_gone: Option<tokio::sync::oneshot::Sender<()>>,
}

pub enum Command {
    Upsert(PeerId, PeerConfig),
    Remove(PeerId),
    /// Start a handshake with a peer (a direct-path check, `node::mesh`).
    Probe(PeerId),
    /// Send a datagram from the WireGuard port (STUN requests).
    SendRaw(SocketAddr, Vec<u8>),
    /// Enforce this inbound table of the access policy (`None`: no policy).
    SetPolicy(Option<Box<crate::policy::InboundTable>>),
    /// On a relay: the inbound table enforced for an unmanaged peer (`None`: none).
    SetRelayPolicy(i64, Option<Box<crate::policy::InboundTable>>),
    /// On a relay: the exit peers' internet traffic goes to (`None`: none).
    SetRelayExit(Option<crate::node::dataplane::RelayExit>),
    Status(tokio::sync::oneshot::Sender<DataPathStatus>),
    /// `nexodus wg`: a peer's preshared key (`None`: none).
    SetPresharedKey(PeerId, Option<[u8; 32]>),
    /// `nexodus wg`: the interface MTU (the padding limit).
    SetMtu(usize),
    /// `nexodus wg`: a new listen port's socket replaces the current one.
    SetSocket(UdpSocket),
    /// `nexodus wg`: a new private key's data plane (with every peer) replaces this one.
    ReplacePlane(Box<DataPlane>),
    Shutdown,
}

/// Handle to the running thread; dropping it stops the thread.
pub struct DataPath {
    tx: mpsc::Sender<Command>,
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl DataPath {
    /// Starts the thread.
    pub fn spawn(
        dp: DataPlane,
        tun: PacketDevice,
        socket: UdpSocket,
        config: DataPathConfig,
    ) -> std::io::Result<Self> {
        let wake = eventfd::new()?;
        let thread_wake = wake.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nexodus-datapath".into())
            .spawn(move || {
                let mut dp = dp;
                dp.set_relay(config.relay);
                let udp_state = match quinn_udp::UdpSocketState::new((&socket).into()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot set up the UDP socket; data path stops");
                        return;
                    }
                };
                if config.fragment {
                    udp::allow_fragments(&socket);
                }
                let mut lp = Loop {
                    dp,
                    tun,
                    local_v6: socket.local_addr().is_ok_and(|a| a.is_ipv6()),
                    gso_segments: udp_state.max_gso_segments().max(1),
                    udp_state,
                    socket,
                    config,
                    io_drops: 0,
                    tun_lost: false,
                    stun_gate: StunGate::default(),
                    stun_unsolicited: 0,
                    stun_queue_full: 0,
                };
                lp.run(&rx, &thread_wake);
            })?;
        Ok(Self {
            tx,
            wake,
            thread: Some(thread),
        })
    }

    /// Queues a command and wakes the thread.
    pub fn send(&self, cmd: Command) {
        if self.tx.send(cmd).is_ok() {
            signal(&self.wake);
        }
    }

    /// Asks the thread for its status.
    pub async fn status(&self) -> Option<DataPathStatus> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Status(tx));
        rx.await.ok()
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        self.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Loop {
    dp: DataPlane,
    tun: PacketDevice,
    socket: UdpSocket,
    /// Sets the socket up (GRO, no fragmentation) and tells what GSO/GRO can do.
    udp_state: quinn_udp::UdpSocketState,
    /// Datagrams one GSO send may carry (1 once a GSO send failed: no GSO).
    gso_segments: usize,
    local_v6: bool,
    config: DataPathConfig,
    io_drops: u64,
    /// The TUN device is gone and no longer polled.
    tun_lost: bool,
    /// The STUN requests we sent, which answers must match.
    stun_gate: StunGate,
    stun_unsolicited: u64,
    stun_queue_full: u64,
}

/// A STUN message rather than WireGuard: WireGuard's first four bytes are a type 1-4
/// and three zeros, a Binding response starts 0x01 0x01.
fn is_stun_answer(datagram: &[u8]) -> bool {
    datagram.get(1..4).is_some_and(|b| b != [0, 0, 0]) && stun::is_stun(datagram)
}

/// `poll(2)` timeout for `wait`, rounded up to whole milliseconds (rounding down
/// would spin with zero timeouts through the last millisecond before a timer),
/// capped at one second.
fn poll_timeout_ms(wait: Duration) -> libc::c_int {
    let ms = wait.as_micros().div_ceil(1000).min(1000);
    libc::c_int::try_from(ms).unwrap_or(1000)
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

/// Datagrams received per `recvmmsg` (each buffer may hold a GRO train).
const UDP_BATCH: usize = 8;
/// Largest UDP payload, and so the size of one GRO train.
const MAX_UDP: usize = 65_535;
/// Largest IP packet, and so the largest tunnel MTU.
const MAX_PACKET: usize = 65_535;
/// Room for one TUN packet at least (MTU 1420 plus padding, with margin); larger
/// when the tunnel MTU is ([`packet_room`]).
const TUN_PACKET: usize = 4096;
/// Largest datagram put in a GSO train: a train's segments must fit the path MTU
/// (the kernel refuses the whole train otherwise), which is not known; 1,452 bytes
/// fit a 1,500-byte link under IPv6 (`join`'s 1,420-byte MTU gives exactly that).
/// Larger datagrams leave one by one and the kernel fragments them if needed.
const TRAIN_MAX_SEGMENT: usize = 1500 - 40 - 8;
/// Bytes a data message adds to its padded plaintext.
const DATA_OVERHEAD: usize = crate::node::dataplane::DATA_OVERHEAD;
/// Batches taken from one source per loop turn before looking at the others.
const ROUNDS: usize = 4;

/// Room for one plaintext of a tunnel with this MTU: the largest packet padded to
/// 16 bytes, and never less than [`TUN_PACKET`].
fn packet_room(mtu: usize) -> usize {
    mtu.min(MAX_PACKET).next_multiple_of(16).max(TUN_PACKET)
}

/// Every buffer of the loop, allocated once (and again only when the tunnel MTU
/// changes: [`Buffers::set_mtu`]).
struct Buffers {
    /// Whole read from TUN (virtio header + a GSO super-packet when offload is on).
    tun_original: Vec<u8>,
    /// TUN packets after segmentation. The first holds any packet (a packet that is
    /// not a GSO super-packet, of any size up to 65,535 bytes, lands there even
    /// before the driver has told us of a larger MTU); the others hold a segment of
    /// the current MTU ([`packet_room`]).
    tun_in: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    /// Encrypted datagrams from TUN, sent as GSO trains.
    gso: Trains,
    /// Re-encrypted datagrams a relay forwards, sent as GSO trains.
    fwd: Trains,
    /// Decrypted packets waiting for one batched TUN write (GRO-coalesced), each
    /// `tun_offset + out_room` long between writes.
    tun_out: Vec<PacketBuf>,
    /// Room for a datagram in a `tun_out` slot; larger datagrams (a peer with a
    /// larger MTU than ours) are decrypted into `big_out` and written alone.
    out_room: usize,
    big_out: Vec<u8>,
    gro: Coalescer,
    /// Handshakes and timer output.
    scratch: Vec<u8>,
    /// Virtio header room before each TUN write (0 without offload).
    tun_offset: usize,
}

impl Buffers {
    fn new(tun_offset: usize, mtu: usize, gro: Coalescer) -> Self {
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
    fn set_mtu(&mut self, mtu: usize) {
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
    fn tun_out_len(&self) -> usize {
        self.tun_offset + self.out_room
    }
}

/// UDP receive buffers, one GRO train each (apart from [`Buffers`], which the
/// receive loop borrows while these are borrowed).
struct UdpIn {
    data: Vec<u8>,
    meta: Vec<udp::RecvMeta>,
    receiver: udp::Receiver,
}

impl UdpIn {
    fn new() -> Self {
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
struct Train {
    to: SocketAddr,
    src: Option<LocalAddr>,
    segment: usize,
    count: usize,
    len: usize,
    closed: bool,
}

/// A GSO buffer and the train being built in it.
struct Trains {
    buf: Vec<u8>,
    train: Option<Train>,
}

impl Trains {
    fn new() -> Self {
        Self {
            // Room for the largest packet alone, padded and encrypted.
            buf: vec![0; packet_room(MAX_PACKET) + DATA_OVERHEAD],
            train: None,
        }
    }

    /// Where the next datagram is encrypted to (right after the current train).
    fn spare(&mut self) -> Option<&mut [u8]> {
        let pos = self.train.as_ref().map_or(0, |t| t.len);
        self.buf.get_mut(pos..)
    }
}

impl Train {
    fn accepts(
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

impl Loop {
    /// One `sendmsg` to `to` from `src` (segmented by GSO if `segment` is given).
    /// When `src` is gone from the host, the data plane forgets it and the datagram
    /// leaves from the kernel's choice.
    fn send_from(
        &mut self,
        to: SocketAddr,
        src: Option<LocalAddr>,
        data: &[u8],
        segment: Option<usize>,
    ) -> std::io::Result<()> {
        let dst = udp::to_socket_family(self.local_v6, to);
        let fd = self.socket.as_raw_fd();
        match (udp::send(fd, dst, data, segment, src), src) {
            (Err(e), Some(gone)) if udp::source_unusable(&e) => {
                tracing::debug!(%to, source = %gone.ip, error = %e, "source address unusable; the kernel chooses");
                self.dp.forget_source(to, gone);
                udp::send(fd, dst, data, segment, None)
            }
            (r, _) => r,
        }
    }

    fn send_udp(&mut self, to: SocketAddr, src: Option<LocalAddr>, data: &[u8]) {
        if let Err(e) = self.send_from(to, src, data, None) {
            self.io_drops += 1;
            if !would_block(&e) {
                tracing::trace!(%to, error = %e, "UDP send failed");
            }
        }
    }

    /// Sends a train with one `sendmsg` (UDP GSO when it has several datagrams).
    /// If the kernel cannot segment, GSO is off from then on and the train leaves
    /// one datagram at a time.
    fn send_train(&mut self, train: &Train, gso: &[u8]) {
        let Some(contents) = gso.get(..train.len) else {
            return;
        };
        let segment = (train.count > 1).then_some(train.segment);
        match self.send_from(train.to, train.src, contents, segment) {
            Ok(()) => {}
            Err(e) if segment.is_some() && udp::gso_unsupported(&e) => {
                tracing::info!(error = %e, "UDP GSO send failed; sending datagrams one by one");
                self.gso_segments = 1;
                for datagram in contents.chunks(train.segment.max(1)) {
                    self.send_udp(train.to, train.src, datagram);
                }
            }
            Err(e) => {
                self.io_drops += train.count as u64;
                if !would_block(&e) {
                    tracing::trace!(to = %train.to, error = %e, "UDP send failed");
                }
            }
        }
    }

    /// Adds the datagram of `dlen` bytes just encrypted at [`Trains::spare`] to the
    /// current train, sending the train first if the datagram cannot join it.
    fn push_datagram(
        &mut self,
        t: &mut Trains,
        to: SocketAddr,
        src: Option<LocalAddr>,
        dlen: usize,
    ) {
        let max_segments = self.gso_segments;
        let pos = t.train.as_ref().map_or(0, |t| t.len);
        if dlen > TRAIN_MAX_SEGMENT {
            // Too large for a train: the train so far, then this one alone.
            self.flush_train(t);
            if let Some(data) = t.buf.get(pos..pos + dlen) {
                self.send_udp(to, src, data);
            }
            return;
        }
        match &mut t.train {
            Some(train) if train.accepts(to, src, dlen, max_segments) => {
                train.closed = dlen < train.segment;
                train.count += 1;
                train.len += dlen;
            }
            _ => {
                if let Some(old) = t.train.take() {
                    self.send_train(&old, &t.buf);
                    // The new datagram was written after the old train: move it to
                    // the front.
                    t.buf.copy_within(pos..pos + dlen, 0);
                }
                t.train = Some(Train {
                    to,
                    src,
                    segment: dlen,
                    count: 1,
                    len: dlen,
                    closed: false,
                });
            }
        }
        let full = t
            .train
            .as_ref()
            .is_some_and(|tr| tr.len + TUN_PACKET > MAX_UDP || tr.count >= max_segments);
        if full {
            self.flush_train(t);
        }
    }

    fn flush_train(&mut self, t: &mut Trains) {
        if let Some(train) = t.train.take() {
            self.send_train(&train, &t.buf);
        }
    }

    fn flush(&mut self, out: &mut [u8]) {
        while let Some(Transmit { to, src, data }) = self.dp.poll_transmit(out) {
            self.send_udp(to, src, data);
        }
    }

    /// TUN → encrypt → UDP, in batches: a TSO super-packet is split by tun-rs, each
    /// segment encrypted straight into the GSO buffer, and runs of datagrams to the
    /// same peer leave in one `sendmsg`.
    fn drain_tun(&mut self, b: &mut Buffers) {
        for _ in 0..ROUNDS {
            let n = match self.tun.recv_multiple(
                &mut b.tun_original,
                &mut b.tun_in,
                &mut b.tun_sizes,
                0,
            ) {
                Ok(n) => n,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    if tun_gone(&e) {
                        self.lose_tun(&e);
                    } else {
                        tracing::debug!(error = %e, "TUN read failed");
                    }
                    return;
                }
            };
            for i in 0..n {
                let (Some(buf), Some(&len)) = (b.tun_in.get_mut(i), b.tun_sizes.get(i)) else {
                    break;
                };
                // Room for this one after the train, or send the train first.
                let need = (len.next_multiple_of(16) + DATA_OVERHEAD).max(MIN_OUT_LEN);
                if b.gso.spare().is_none_or(|s| s.len() < need) {
                    self.flush_train(&mut b.gso);
                }
                let Some(out) = b.gso.spare() else {
                    break;
                };
                let out_ptr = out.as_ptr();
                match self.dp.handle_tun_packet(buf, len, out) {
                    Outgoing::Send { to, src, data } if data.as_ptr() == out_ptr => {
                        let dlen = data.len();
                        self.push_datagram(&mut b.gso, to, src, dlen);
                    }
                    Outgoing::Send { to, src, data } => {
                        // Not where a train continues (e.g. a handshake): on its own.
                        let data = data.to_vec();
                        self.send_udp(to, src, &data);
                    }
                    Outgoing::Drop(_) | Outgoing::Nothing => {}
                }
            }
            self.flush_train(&mut b.gso);
            self.flush(&mut b.scratch);
        }
    }

    /// Writes the decrypted packets collected in `tun_out[..k]` with one batched,
    /// GRO-coalescing TUN write, then restores the buffers' lengths.
    fn write_tun(&mut self, b: &mut Buffers, k: usize) {
        if k == 0 {
            return;
        }
        let (offset, len) = (b.tun_offset, b.tun_out_len());
        let Some(bufs) = b.tun_out.get_mut(..k) else {
            return;
        };
        self.count_tun_write(self.tun.send_batch(&mut b.gro, bufs, offset), k);
        for buf in bufs {
            // The cursor only: no byte is rewritten.
            buf.set_len(len);
        }
    }

    /// Decrypts a datagram too large for a `tun_out` slot (a peer whose MTU is larger
    /// than ours) into `big_out` and writes it to TUN alone, after the `k` packets
    /// collected before it.
    fn handle_big_datagram(
        &mut self,
        b: &mut Buffers,
        k: usize,
        from: SocketAddr,
        local: Option<LocalAddr>,
        datagram: &[u8],
    ) {
        self.write_tun(b, k);
        let Some(out) = b.big_out.get_mut(b.tun_offset..) else {
            return;
        };
        let len = match self
            .dp
            .handle_datagram_or_forward(from, local, datagram, out, &mut [])
        {
            Incoming::WriteTun { packet, .. } => packet.len(),
            Incoming::Send { to, src, data } => {
                self.send_udp(to, src, data);
                return;
            }
            Incoming::Forward { .. } | Incoming::Drop(_) | Incoming::Nothing => return,
        };
        let full = b.big_out.len();
        b.big_out.truncate(b.tun_offset + len);
        let result = self.tun.send_batch(
            &mut b.gro,
            std::slice::from_mut(&mut b.big_out),
            b.tun_offset,
        );
        self.count_tun_write(result, 1);
        b.big_out.resize(full, 0);
    }

    /// Counts what a batched TUN write of `k` packets refused; a device gone for
    /// good leaves the poll set.
    fn count_tun_write(&mut self, result: std::io::Result<Written>, k: usize) {
        match result {
            Ok(w) => self.io_drops += w.dropped as u64,
            Err(e) => {
                self.io_drops += k as u64;
                if tun_gone(&e) {
                    self.lose_tun(&e);
                }
                tracing::trace!(error = %e, "TUN write failed");
            }
        }
    }

    /// The TUN device is gone for good (its interface was deleted): stop polling it
    /// (it would report an error at every turn) and tell whoever waits for that.
    fn lose_tun(&mut self, e: &std::io::Error) {
        if self.tun_lost {
            return;
        }
        self.tun_lost = true;
        tracing::info!(error = %e, "TUN device gone; no longer reading it");
        if let Some(tx) = self.config.tun_gone.take() {
            let _ = tx.send(());
        }
    }

    /// UDP → decrypt → TUN, in batches: `recvmmsg` with GRO trains, each datagram
    /// decrypted straight into a TUN buffer, all written with one batched write. On a
    /// relay, packets the data plane forwards to another peer leave re-encrypted in
    /// the forwarding train instead.
    fn drain_udp(&mut self, b: &mut Buffers, udp_in: &mut UdpIn) {
        for _ in 0..ROUNDS {
            let mut chunks = udp_in.data.chunks_mut(MAX_UDP);
            let mut iovs: [std::io::IoSliceMut<'_>; UDP_BATCH] = std::array::from_fn(|_| {
                std::io::IoSliceMut::new(chunks.next().unwrap_or_default())
            });
            let n = match udp_in
                .receiver
                .recv(self.socket.as_raw_fd(), &mut iovs, &mut udp_in.meta)
            {
                Ok(n) => n,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    tracing::trace!(error = %e, "UDP receive failed");
                    return;
                }
            };
            let mut k = 0;
            for (iov, meta) in iovs.iter().zip(&udp_in.meta).take(n) {
                let from = udp::canonical(meta.from);
                let Some(data) = iov.get(..meta.len) else {
                    continue;
                };
                for datagram in data.chunks(meta.stride.max(1)) {
                    if is_stun_answer(datagram) {
                        self.stun_answer(from, datagram);
                        continue;
                    }
                    if datagram.len() > b.out_room && !self.config.relay {
                        self.handle_big_datagram(b, k, from, meta.local, datagram);
                        k = 0;
                        continue;
                    }
                    let Some(out) = b
                        .tun_out
                        .get_mut(k)
                        .and_then(|o| o.as_mut().get_mut(b.tun_offset..))
                    else {
                        break;
                    };
                    let fwd = b.fwd.spare().unwrap_or_default();
                    let fwd_ptr = fwd.as_ptr();
                    match self
                        .dp
                        .handle_datagram_or_forward(from, meta.local, datagram, out, fwd)
                    {
                        Incoming::WriteTun { packet, .. } => {
                            let len = packet.len();
                            if let Some(buf) = b.tun_out.get_mut(k) {
                                buf.set_len(b.tun_offset + len);
                                k += 1;
                                if k == b.tun_out.len() {
                                    self.write_tun(b, k);
                                    k = 0;
                                }
                            }
                        }
                        Incoming::Forward { to, src, data, .. } => {
                            if data.as_ptr() == fwd_ptr {
                                let dlen = data.len();
                                self.push_datagram(&mut b.fwd, to, src, dlen);
                            } else {
                                self.send_udp(to, src, data);
                            }
                        }
                        Incoming::Send { to, src, data } => self.send_udp(to, src, data),
                        Incoming::Drop(_) | Incoming::Nothing => {}
                    }
                    self.flush(&mut b.scratch);
                }
            }
            self.write_tun(b, k);
            self.flush_train(&mut b.fwd);
        }
    }

    /// Passes a STUN answer to the driver if it answers a request we sent to that
    /// server; drops and counts anything else, and answers the full queue would not
    /// hold.
    fn stun_answer(&mut self, from: SocketAddr, datagram: &[u8]) {
        let Ok(answer) = stun::parse_binding_response(datagram) else {
            self.stun_unsolicited += 1;
            return;
        };
        if !self.stun_gate.admit(from, &answer.0) {
            self.stun_unsolicited += 1;
            return;
        }
        if self.config.stun_answers.try_send(answer).is_err() {
            self.stun_queue_full += 1;
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Command>, wake: &OwnedFd) {
        let offset = if self.tun.offload() {
            tun_rs::VIRTIO_NET_HDR_LEN
        } else {
            0
        };
        let mut b = Buffers::new(offset, self.dp.mtu(), crate::io::tun::coalescer(&self.tun));
        let mut udp_in = UdpIn::new();
        tracing::info!(
            tun_offload = self.tun.offload(),
            udp_gso_segments = self.udp_state.max_gso_segments(),
            udp_gro_segments = self.udp_state.gro_segments(),
            "data path started"
        );
        let mut fds = [
            libc::pollfd {
                fd: self.tun.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut next_timer = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_timer {
                self.dp.handle_timeout(now);
                self.flush(&mut b.scratch);
                next_timer = self
                    .dp
                    .poll_timeout()
                    .unwrap_or(now + Duration::from_millis(250))
                    .max(now + Duration::from_millis(10));
            }
            let wait = next_timer.saturating_duration_since(Instant::now());
            let wait_ms = poll_timeout_ms(wait);
            // SAFETY: fds is a live array of 3 pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "poll failed; data path stops");
                    return;
                }
                continue;
            }
            if fds[2].revents != 0 {
                eventfd::drain(wake);
                while let Ok(cmd) = rx.try_recv() {
                    match cmd {
                        Command::Upsert(id, cfg) => {
                            if let Err(e) = self.dp.upsert_peer(id, cfg) {
                                tracing::warn!(peer = id, error = %e, "peer refused");
                            }
                        }
                        Command::Remove(id) => {
                            self.dp.remove_peer(id);
                        }
                        Command::SetPolicy(table) => {
                            self.dp.set_policy(table.map(|t| *t), Instant::now());
                        }
                        Command::Probe(id) => self.dp.probe(id),
                        Command::SetRelayPolicy(id, table) => {
                            self.dp
                                .set_relay_policy(id, table.map(|t| *t), Instant::now());
                        }
                        Command::SetRelayExit(exit) => self.dp.set_relay_exit(exit),
                        Command::SendRaw(to, data) => {
                            self.stun_gate.sent(to, &data);
                            self.send_udp(to, None, &data);
                        }
                        Command::Status(reply) => {
                            let peers = self
                                .dp
                                .peers()
                                .filter_map(|id| self.dp.peer_stats(id).map(|s| (id, s)))
                                .collect();
                            let _ = reply.send(DataPathStatus {
                                peers,
                                counters: *self.dp.counters(),
                                io_drops: self.io_drops,
                                relayed_packets: self.dp.counters().relayed_packets,
                                relayed_bytes: self.dp.counters().relayed_bytes,
                                stun_unsolicited: self.stun_unsolicited,
                                stun_queue_full: self.stun_queue_full,
                            });
                        }
                        Command::SetPresharedKey(id, key) => self.dp.set_preshared_key(id, key),
                        Command::SetMtu(mtu) => {
                            self.dp.set_mtu(mtu);
                            b.set_mtu(mtu);
                        }
                        Command::SetSocket(socket) => {
                            match quinn_udp::UdpSocketState::new((&socket).into()) {
                                Ok(state) => {
                                    if self.config.fragment {
                                        udp::allow_fragments(&socket);
                                    }
                                    self.local_v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
                                    self.gso_segments = state.max_gso_segments().max(1);
                                    self.udp_state = state;
                                    self.socket = socket;
                                    fds[1].fd = self.socket.as_raw_fd();
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot use the new UDP socket; keeping the old one")
                                }
                            }
                        }
                        Command::ReplacePlane(dp) => {
                            self.dp = *dp;
                            self.dp.set_relay(self.config.relay);
                            self.dp.handle_timeout(Instant::now());
                        }
                        Command::Shutdown => return,
                    }
                }
                // Peer changes may have produced handshakes.
                self.flush(&mut b.scratch);
            }
            if fds[0].revents != 0 {
                self.drain_tun(&mut b);
                if self.tun_lost {
                    // poll(2) skips negative fds.
                    fds[0].fd = -1;
                }
            }
            if fds[1].revents != 0 {
                self.drain_udp(&mut b, &mut udp_in);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeout_rounds_up_and_caps() {
        assert_eq!(poll_timeout_ms(Duration::ZERO), 0);
        assert_eq!(poll_timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_micros(999)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_millis(1)), 1);
        assert_eq!(poll_timeout_ms(Duration::from_micros(1001)), 2);
        assert_eq!(poll_timeout_ms(Duration::from_millis(249)), 249);
        assert_eq!(poll_timeout_ms(Duration::from_secs(60)), 1000);
    }
}
