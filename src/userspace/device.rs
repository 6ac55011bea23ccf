//! The stack's network device: whole IP packets over the datagram socket pair shared
//! with the data-path thread, many per system call (`recvmmsg`, `sendmmsg`).
//!
//! Received packets land in a ring of buffers owned by the device and go into the
//! stack one at a time. Packets the stack emits are built in place in a bounded queue
//! of buffers and leave in batches; when the queue is full the stack stops emitting
//! until the data path has taken some. Nothing is allocated per packet.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use tokio::io::Interest;
use tokio::net::UnixDatagram;

use crate::io::mmsg;

/// Packets per system call.
const BATCH: usize = 64;
/// Packets waiting to be sent (the stack stops emitting when they are this many).
const TX_QUEUE: usize = 4 * BATCH;
/// Room for one packet: the tunnel MTU plus padding, with margin.
const PACKET: usize = 4096;

pub struct PipeDevice {
    pub pipe: UnixDatagram,
    rx: Ring,
    /// The received packet the next `receive` hands to the stack.
    current: Option<usize>,
    tx: Ring,
    mtu: usize,
    /// The data path has gone: nothing can be sent any more.
    broken: bool,
}

/// Packet buffers used in order: `len` of them from `head` hold packets.
struct Ring {
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    head: usize,
    len: usize,
    /// Where a packet goes that finds the ring full (it is dropped).
    overflow: Vec<u8>,
}

impl Ring {
    fn new(n: usize) -> Self {
        Self {
            bufs: (0..n).map(|_| vec![0; PACKET]).collect(),
            sizes: vec![0; n],
            head: 0,
            len: 0,
            overflow: vec![0; PACKET],
        }
    }

    fn is_full(&self) -> bool {
        self.len >= self.bufs.len()
    }

    fn slot(&self, i: usize) -> usize {
        (self.head + i) % self.bufs.len().max(1)
    }

    fn pop(&mut self, n: usize) {
        let n = n.min(self.len);
        self.head = self.slot(n);
        self.len -= n;
    }
}

impl PipeDevice {
    pub fn new(pipe: UnixDatagram, mtu: usize) -> Self {
        Self {
            pipe,
            rx: Ring::new(BATCH),
            current: None,
            tx: Ring::new(TX_QUEUE),
            mtu,
            broken: false,
        }
    }

    /// The send queue is full: emitting more would only fail.
    pub fn blocked(&self) -> bool {
        self.tx.is_full()
    }

    /// Packets waiting to be sent.
    pub fn queued(&self) -> usize {
        self.tx.len
    }

    pub fn broken(&self) -> bool {
        self.broken
    }

    /// The next received packet, reading a batch from the socket when none is left
    /// (registering for readability when the socket is empty). `None`: nothing now.
    pub fn next_packet(&mut self, cx: &mut Context<'_>) -> Option<&[u8]> {
        if self.rx.len == 0 {
            self.rx.head = 0;
            loop {
                match self.pipe.poll_recv_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "packet socket");
                        return None;
                    }
                    Poll::Pending => return None,
                }
                let rx = &mut self.rx;
                let fd = self.pipe.as_raw_fd();
                match self.pipe.try_io(Interest::READABLE, || recv_batch(fd, rx)) {
                    Ok(n) => {
                        self.rx.len = n;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "packet socket");
                        return None;
                    }
                }
            }
        }
        if self.rx.len == 0 {
            return None;
        }
        let i = self.rx.head;
        self.rx.pop(1);
        self.current = Some(i);
        let len = *self.rx.sizes.get(i)?;
        self.rx.bufs.get(i)?.get(..len)
    }

    /// Drops the packet [`Self::next_packet`] returned.
    pub fn skip(&mut self) {
        self.current = None;
    }

    /// Sends queued packets while the socket takes them; registers for writability
    /// when it does not. True if anything left the queue.
    pub fn flush(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while self.tx.len > 0 && !self.broken {
            match self.pipe.poll_send_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => {
                    tracing::error!(error = %e, "packet socket failed");
                    self.broken = true;
                    break;
                }
                Poll::Ready(Ok(())) => {}
            }
            let tx = &self.tx;
            let fd = self.pipe.as_raw_fd();
            match self.pipe.try_io(Interest::WRITABLE, || send_batch(fd, tx)) {
                Ok(n) => {
                    self.tx.pop(n.max(1));
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => self.broken = true,
                Err(e) => {
                    // Drop the packet that failed; the rest go on.
                    tracing::trace!(error = %e, "packet not sent");
                    self.tx.pop(1);
                }
            }
        }
        progress
    }
}

/// `recvmmsg` into the ring's buffers from slot 0; returns how many arrived.
fn recv_batch(fd: std::os::fd::RawFd, rx: &mut Ring) -> std::io::Result<usize> {
    let n = rx.bufs.len().min(BATCH);
    let (Some(bufs), Some(sizes)) = (rx.bufs.get_mut(..n), rx.sizes.get_mut(..n)) else {
        return Ok(0);
    };
    mmsg::recv_batch(fd, bufs, sizes, 0)
}

/// `sendmmsg` of the queued packets (up to [`BATCH`], in order, not past the end of
/// the ring); returns how many left.
fn send_batch(fd: std::os::fd::RawFd, tx: &Ring) -> std::io::Result<usize> {
    let n = tx.len.min(BATCH).min(tx.bufs.len() - tx.head);
    let packets = (tx.head..tx.head + n).map_while(|i| {
        let (b, &len) = (tx.bufs.get(i)?, tx.sizes.get(i)?);
        b.get(..len.min(b.len()))
    });
    mmsg::send_batch(fd, packets)
}

pub struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.0)
    }
}

pub struct TxToken<'a>(&'a mut Ring);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let ring = self.0;
        let len = len.min(PACKET);
        let i = ring.slot(ring.len);
        match (ring.is_full(), ring.bufs.get_mut(i), ring.sizes.get_mut(i)) {
            (false, Some(buf), Some(size)) if buf.len() >= len => {
                *size = len;
                ring.len += 1;
                f(&mut buf[..len])
            }
            // Only a response to a received packet can find the ring full (the
            // stack does not read while it is): that one is dropped.
            _ => {
                ring.overflow.resize(len, 0);
                f(&mut ring.overflow[..len])
            }
        }
    }
}

impl phy::Device for PipeDevice {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let i = self.current.take()?;
        let len = *self.rx.sizes.get(i)?;
        let packet = self.rx.bufs.get(i)?.get(..len)?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.blocked() || self.broken {
            return None;
        }
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Every packet from the mesh was authenticated by WireGuard: checking its
        // checksums again buys nothing. Checksums of packets we send are computed.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        checksum.icmpv6 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}
