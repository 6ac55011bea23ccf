//! The data-path thread: owns the [`DataPlane`], the TUN device and the UDP socket,
//! and moves packets between them.
//!
//! One blocking thread with `poll(2)` over TUN, UDP and an eventfd that wakes it for
//! commands (peer changes, status requests). Readiness is drained in batches of up to
//! [`BATCH`] packets per source per turn, so batched syscalls (recvmmsg, GSO/GRO, TUN
//! offload) can replace the per-packet reads without changing the loop's shape. Buffers
//! are allocated once; the hot path allocates nothing and takes no lock.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::io::tun::SyncDevice;
use crate::io::udp;
use crate::node::dataplane::{
    Counters, DataPlane, Incoming, Outgoing, PeerConfig, PeerId, PeerStats,
};
use crate::wire::{ip, stun};

/// Packets taken from one source per loop turn before looking at the others.
pub const BATCH: usize = 64;
/// Room for one TUN packet plus padding, and for one datagram.
const BUF_LEN: usize = 65_536;

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
}

/// A STUN answer that arrived on the WireGuard socket: (transaction, mapped address).
pub type StunAnswer = (stun::TransactionId, SocketAddr);

/// How the thread is set up.
pub struct DataPathConfig {
    /// Forward packets between peers inside this process (`--relay`).
    pub relay: bool,
    /// Where STUN answers go.
    pub stun_answers: tokio::sync::mpsc::UnboundedSender<StunAnswer>,
}

pub enum Command {
    Upsert(PeerId, PeerConfig),
    Remove(PeerId),
    /// Send a datagram from the WireGuard port (STUN requests).
    SendRaw(SocketAddr, Vec<u8>),
    Status(tokio::sync::oneshot::Sender<DataPathStatus>),
    Shutdown,
}

/// Handle to the running thread; dropping it stops the thread.
pub struct DataPath {
    tx: mpsc::Sender<Command>,
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative return is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is valid and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to a valid eventfd.
    let _ = unsafe { libc::write(fd.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
}

fn drain(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a valid non-blocking eventfd.
    let _ = unsafe { libc::read(fd.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
}

impl DataPath {
    /// Starts the thread.
    pub fn spawn(
        dp: DataPlane,
        tun: SyncDevice,
        socket: UdpSocket,
        config: DataPathConfig,
    ) -> std::io::Result<Self> {
        let wake = eventfd()?;
        let thread_wake = wake.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("nexodus-datapath".into())
            .spawn(move || {
                let mut lp = Loop {
                    dp,
                    tun,
                    local_v6: socket.local_addr().is_ok_and(|a| a.is_ipv6()),
                    socket,
                    config,
                    io_drops: 0,
                    relayed_packets: 0,
                    relayed_bytes: 0,
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
    tun: SyncDevice,
    socket: UdpSocket,
    local_v6: bool,
    config: DataPathConfig,
    io_drops: u64,
    relayed_packets: u64,
    relayed_bytes: u64,
}

/// A STUN message rather than WireGuard: WireGuard's first four bytes are a type 1-4
/// and three zeros, a Binding response starts 0x01 0x01.
fn is_stun_answer(datagram: &[u8]) -> bool {
    datagram.get(1..4).is_some_and(|b| b != [0, 0, 0]) && stun::is_stun(datagram)
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

impl Loop {
    fn send_udp(&mut self, to: SocketAddr, data: &[u8]) {
        let to = udp::to_socket_family(self.local_v6, to);
        if let Err(e) = self.socket.send_to(data, to) {
            self.io_drops += 1;
            if !would_block(&e) {
                tracing::trace!(%to, error = %e, "UDP send failed");
            }
        }
    }

    /// True when a packet decrypted from `from` is for another peer (not for this
    /// host and not back to its sender).
    fn forwardable(&self, from: PeerId, packet: &[u8]) -> bool {
        let Some((_, dst)) = ip::addresses(packet) else {
            return false;
        };
        matches!(self.dp.routes().lookup(dst), Some(to) if to != from)
    }

    fn flush(&mut self, out: &mut [u8]) {
        while let Some((to, data)) = self.dp.poll_transmit(out) {
            self.send_udp(to, data);
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Command>, wake: &OwnedFd) {
        let mut tun_buf = vec![0u8; BUF_LEN];
        let mut udp_buf = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN + 64];
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
                self.flush(&mut out);
                next_timer = self
                    .dp
                    .poll_timeout()
                    .unwrap_or(now + Duration::from_millis(250))
                    .max(now + Duration::from_millis(10));
            }
            let wait = next_timer.saturating_duration_since(Instant::now());
            let wait_ms = libc::c_int::try_from(wait.as_millis().min(1000)).unwrap_or(1000);
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
                drain(wake);
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
                        Command::SendRaw(to, data) => self.send_udp(to, &data),
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
                                relayed_packets: self.relayed_packets,
                                relayed_bytes: self.relayed_bytes,
                            });
                        }
                        Command::Shutdown => return,
                    }
                }
                // Peer changes may have produced handshakes.
                self.flush(&mut out);
            }
            if fds[0].revents != 0 {
                for _ in 0..BATCH {
                    let len = match self.tun.recv(&mut tun_buf) {
                        Ok(len) => len,
                        Err(e) if would_block(&e) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "TUN read failed");
                            break;
                        }
                    };
                    if let Outgoing::Send { to, data } =
                        self.dp.handle_tun_packet(&mut tun_buf, len, &mut out)
                    {
                        self.send_udp(to, data);
                    }
                }
                self.flush(&mut out);
            }
            if fds[1].revents != 0 {
                for _ in 0..BATCH {
                    let (len, from) = match self.socket.recv_from(&mut udp_buf) {
                        Ok(r) => r,
                        Err(e) if would_block(&e) => break,
                        Err(e) => {
                            tracing::trace!(error = %e, "UDP receive failed");
                            break;
                        }
                    };
                    let from = udp::canonical(from);
                    let Some(datagram) = udp_buf.get(..len) else {
                        continue;
                    };
                    if is_stun_answer(datagram) {
                        if let Ok(answer) = stun::parse_binding_response(datagram) {
                            let _ = self.config.stun_answers.send(answer);
                        }
                        continue;
                    }
                    match self.dp.handle_datagram(from, datagram, &mut out) {
                        Incoming::WriteTun { peer, packet } => {
                            let len = packet.len();
                            if self.config.relay && self.forwardable(peer, packet) {
                                // Decrypted from one peer, for another: re-encrypt here.
                                if let Some(dst) = tun_buf.get_mut(..len) {
                                    dst.copy_from_slice(packet);
                                    if let Outgoing::Send { to, data } =
                                        self.dp.handle_tun_packet(&mut tun_buf, len, &mut out)
                                    {
                                        self.relayed_packets += 1;
                                        self.relayed_bytes += len as u64;
                                        self.send_udp(to, data);
                                    }
                                }
                            } else if self.tun.send(packet).is_err() {
                                self.io_drops += 1;
                            }
                        }
                        Incoming::Send { to, data } => self.send_udp(to, data),
                        Incoming::Drop(_) | Incoming::Nothing => {}
                    }
                    self.flush(&mut out);
                }
            }
        }
    }
}
