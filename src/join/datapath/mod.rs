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
//!
//! Here: the thread's API, its state and the loop with its commands; `buffers` (what
//! is allocated once), `packets` (the two packet paths), `udp_send` (datagrams and
//! GSO trains out).

use std::net::{SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::io::eventfd::{self, signal};
use crate::io::tun::PacketDevice;
use crate::io::udp;
use crate::node::dataplane::{Counters, DataPlane, PeerConfig, PeerId, PeerStats};
use crate::node::nat::StunGate;
use crate::wire::stun;

mod buffers;
mod packets;
mod udp_send;

use buffers::{Buffers, UdpIn};

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
    /// Packets written to TUN inside another's super-packet (GRO, `wire::gro`).
    pub tun_coalesced: u64,
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

impl Loop {
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
                    if self.handle_command(cmd, &mut b).is_break() {
                        return;
                    }
                }
                // A new socket (`SetSocket`) is polled from now on.
                fds[1].fd = self.socket.as_raw_fd();
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

    /// Carries out one command from the driver; `Break` on shutdown.
    fn handle_command(&mut self, cmd: Command, b: &mut Buffers) -> ControlFlow<()> {
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
                    tun_coalesced: b.gro.coalesced(),
                    stun_unsolicited: self.stun_unsolicited,
                    stun_queue_full: self.stun_queue_full,
                });
            }
            Command::SetPresharedKey(id, key) => self.dp.set_preshared_key(id, key),
            Command::SetMtu(mtu) => {
                self.dp.set_mtu(mtu);
                b.set_mtu(mtu);
            }
            Command::SetSocket(socket) => match quinn_udp::UdpSocketState::new((&socket).into()) {
                Ok(state) => {
                    if self.config.fragment {
                        udp::allow_fragments(&socket);
                    }
                    self.local_v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
                    self.gso_segments = state.max_gso_segments().max(1);
                    self.udp_state = state;
                    self.socket = socket;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot use the new UDP socket; keeping the old one")
                }
            },
            Command::ReplacePlane(dp) => {
                self.dp = *dp;
                self.dp.set_relay(self.config.relay);
                self.dp.handle_timeout(Instant::now());
            }
            Command::Shutdown => return ControlFlow::Break(()),
        }
        ControlFlow::Continue(())
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
