//! The stack's network device: whole IP packets through the stack's end of the
//! in-process packet pipe shared with the data-path thread ([`crate::io::packet_pipe`]).
//!
//! Received packets go into the stack one at a time, read in place in the pipe's
//! buffer (returned to the data path when the next one is taken). Packets the stack
//! emits are built in place in a free pipe buffer (no copy on this side) and pushed at
//! once; [`PipeDevice::flush`] wakes the data path once per batch. When no buffer is
//! free the device is [`PipeDevice::blocked`]: the stack stops emitting until the data
//! path has taken some and signals back. Nothing is allocated per packet.
//!
//! The device waits on its eventfd through tokio's `AsyncFd`, draining it before it
//! looks at the pipe again (no wake-up is lost).

use std::os::fd::OwnedFd;
use std::task::{Context, Poll};

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use tokio::io::unix::AsyncFd;

use crate::io::eventfd;
use crate::io::packet_pipe::{End, Packet};

pub struct PipeDevice {
    pipe: End,
    /// The pipe end's eventfd, registered with tokio.
    wake: AsyncFd<OwnedFd>,
    /// The packet [`Self::next_packet`] returned last (its buffer goes back to the
    /// data path when the next is taken).
    rx: Option<Packet>,
    /// `rx` is still to be handed to the stack by `receive`.
    rx_ready: bool,
    tx: Tx,
    mtu: usize,
}

/// The sending side's state, apart from the pipe (a `TxToken` borrows it beside the
/// received packet).
struct Tx {
    /// A free buffer the next packet is built in; none: blocked.
    spare: Option<Vec<u8>>,
    /// Packets pushed since the data path was last woken.
    pushed: usize,
    /// Where a packet goes that finds no free buffer, or is larger than one (it is
    /// dropped, counted in `drops`).
    overflow: Vec<u8>,
    drops: u64,
    /// The data path has gone: nothing can be sent any more.
    broken: bool,
}

impl Tx {
    /// Takes a free buffer into `spare` if there is none; with `wait`, finding none
    /// asks the data path to signal when it frees some. True if `spare` holds one.
    fn refill(&mut self, pipe: &End, wait: bool) -> bool {
        if self.spare.is_none() && !self.broken {
            match pipe.take_free(wait) {
                Ok(b) => self.spare = b,
                Err(_) => self.broken = true,
            }
        }
        self.spare.is_some()
    }
}

impl PipeDevice {
    /// The device on the stack's end of the pipe (inside the tokio runtime).
    pub fn new(pipe: End, mtu: usize) -> std::io::Result<Self> {
        let fd = pipe.clone_wake()?;
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd): it stays open, and is the same
        // file description, until the AsyncFd drops it.
        let wake = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let slot = pipe.slot();
        Ok(Self {
            pipe,
            wake,
            rx: None,
            rx_ready: false,
            tx: Tx {
                spare: None,
                pushed: 0,
                overflow: vec![0; slot],
                drops: 0,
                broken: false,
            },
            mtu,
        })
    }

    /// No free buffer: emitting more would only drop packets.
    pub fn blocked(&mut self) -> bool {
        !self.tx.refill(&self.pipe, true)
    }

    /// Packets pushed since the data path was last woken.
    pub fn queued(&self) -> usize {
        self.tx.pushed
    }

    pub fn broken(&self) -> bool {
        self.tx.broken
    }

    /// Readiness of the eventfd: if signalled, drains it and returns true (look at the
    /// pipe again); otherwise registers `cx` for the next signal and returns false.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> bool {
        match self.wake.poll_read_ready(cx) {
            Poll::Pending => false,
            Poll::Ready(Ok(mut guard)) => {
                eventfd::drain(guard.get_inner());
                guard.clear_ready();
                true
            }
            Poll::Ready(Err(e)) => {
                tracing::error!(error = %e, "packet pipe wake-up failed");
                self.tx.broken = true;
                false
            }
        }
    }

    /// The next received packet; the previous one's buffer goes back to the data
    /// path. `None`: nothing now (`cx` is woken when packets arrive).
    pub fn next_packet(&mut self, cx: &mut Context<'_>) -> Option<&[u8]> {
        if let Some(old) = self.rx.take() {
            self.pipe.recycle(old);
        }
        self.rx_ready = false;
        loop {
            match self.pipe.pop() {
                Ok(Some(p)) => {
                    self.rx = Some(p);
                    break;
                }
                Ok(None) => {}
                Err(_) => {
                    self.tx.broken = true;
                    return None;
                }
            }
            // Empty: drain the eventfd, then look once more before sleeping.
            if !self.poll_wake(cx) {
                return None;
            }
        }
        self.rx_ready = true;
        self.rx.as_ref().map(Packet::bytes)
    }

    /// Drops the packet [`Self::next_packet`] returned.
    pub fn skip(&mut self) {
        self.rx_ready = false;
    }

    /// Wakes the data path if packets were pushed since it was last woken; when
    /// blocked, registers `cx` for the data path's signal that buffers are free. True
    /// if anything was sent or the block has cleared.
    pub fn flush(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        if self.tx.pushed > 0 {
            self.pipe.signal_peer();
            self.tx.pushed = 0;
            progress = true;
        }
        while self.tx.spare.is_none() && !self.tx.broken {
            // The waiting flag is raised before the last look (`take_free`).
            if self.tx.refill(&self.pipe, true) {
                progress = true;
                break;
            }
            if !self.poll_wake(cx) {
                break;
            }
        }
        progress
    }
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

pub struct TxToken<'a> {
    pipe: &'a End,
    tx: &'a mut Tx,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let Self { pipe, tx } = self;
        tx.refill(pipe, false);
        match tx.spare.take() {
            Some(mut buf) if len <= buf.len() => {
                let r = f(buf.get_mut(..len).unwrap_or_default());
                match pipe.push(buf, len) {
                    Ok(()) => tx.pushed += 1,
                    Err(_) => tx.broken = true,
                }
                // The next one's buffer, if one is free (without asking to be woken:
                // `blocked` does that).
                tx.refill(pipe, false);
                r
            }
            spare => {
                // Only a response to a received packet can find no buffer (the stack
                // does not read while blocked), or a packet over the slot size: dropped.
                tx.spare = spare;
                tx.drops += 1;
                if tx.drops.is_power_of_two() {
                    tracing::debug!(
                        drops = tx.drops,
                        len,
                        "packet from the stack dropped: no free pipe buffer, or larger than one"
                    );
                }
                if tx.overflow.len() < len {
                    tx.overflow.resize(len, 0);
                }
                f(tx.overflow.get_mut(..len).unwrap_or_default())
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
        if !std::mem::take(&mut self.rx_ready) {
            return None;
        }
        let packet = self.rx.as_ref()?.bytes();
        Some((
            RxToken(packet),
            TxToken {
                pipe: &self.pipe,
                tx: &mut self.tx,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.broken || !self.tx.refill(&self.pipe, false) {
            return None;
        }
        Some(TxToken {
            pipe: &self.pipe,
            tx: &mut self.tx,
        })
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
