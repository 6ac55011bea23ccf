//! The in-process packet pipe of rootless mode: whole IP packets between the data-path
//! thread and the userspace stack thread without the kernel (no socket, no copy into
//! socket buffers).
//!
//! Each direction is a bounded queue of OWNED buffers allocated once in [`pair`]: the
//! producer takes an empty buffer from its "free" channel, writes a packet into it and
//! sends it down the "full" channel; the consumer reads it and returns the buffer on
//! the free channel. Nothing is allocated per packet. Both channels of a direction are
//! as large as its number of buffers, so a send on them never finds them full.
//!
//! Wake-ups are eventfds ([`crate::io::eventfd`]), one per end, signalled by the other
//! end once per batch, not per packet:
//! - after pushing packets ([`End::signal_peer`]);
//! - after returning buffers, only if the producer had found none and said it waits
//!   ([`End::take_free`] with `wait`, [`End::notify_freed`]); the stack waits (its
//!   back-pressure), the data path drops instead.
//!
//! Lost-wakeup rule: a consumer that finds its queue empty first drains its eventfd,
//! then looks at the queue once more, and only then sleeps. A producer that finds no
//! free buffer first raises its waiting flag, then looks once more.
//!
//! When one end is dropped the other sees its channels disconnected (and is woken).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};

use super::eventfd;

/// Buffers carrying packets from the data path to the stack (network bursts: packets
/// that find none free are dropped).
pub const TO_STACK_SLOTS: usize = 256;
/// Buffers carrying packets from the stack to the data path (the stack waits when
/// they are all in flight).
pub const FROM_STACK_SLOTS: usize = 256;
/// Bytes per buffer at least: the tunnel MTU plus margin. [`slot_len`] grows it for a
/// larger MTU.
pub const SLOT: usize = 4096;

/// Buffer size for a tunnel MTU: [`SLOT`], or the MTU if it is larger.
pub fn slot_len(mtu: usize) -> usize {
    SLOT.max(mtu)
}

/// The other end has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the other end of the packet pipe has gone")]
pub struct Disconnected;

/// A packet in a pipe buffer: `buf[..len]`.
pub struct Packet {
    buf: Vec<u8>,
    len: usize,
}

impl Packet {
    pub fn bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// One direction, producer half.
struct Tx {
    full: SyncSender<Packet>,
    free: Receiver<Vec<u8>>,
    /// Raised by this producer when it found no free buffer and waits for one.
    waiting: Arc<AtomicBool>,
}

/// One direction, consumer half.
struct Rx {
    full: Receiver<Packet>,
    free: SyncSender<Vec<u8>>,
    /// The producer's waiting flag.
    producer_waiting: Arc<AtomicBool>,
}

/// Signals the other end's eventfd when dropped (declared last in [`End`], so the
/// channels are already closed when the other end wakes and looks).
struct Notify(OwnedFd);

impl Drop for Notify {
    fn drop(&mut self) {
        eventfd::signal(&self.0);
    }
}

/// One end of the pipe: sends one direction, receives the other.
pub struct End {
    tx: Tx,
    rx: Rx,
    /// Size of every buffer.
    slot: usize,
    /// This end's eventfd, signalled by the other end.
    wake: OwnedFd,
    /// The other end's eventfd.
    peer: Notify,
}

/// A pipe: `(data-path end, stack end)`, with `to_stack` buffers towards the stack and
/// `from_stack` back, each of `slot` bytes.
pub fn pair(to_stack: usize, from_stack: usize, slot: usize) -> std::io::Result<(End, End)> {
    let (dp_wake, stack_wake) = (eventfd::new()?, eventfd::new()?);
    let (down_tx, down_rx) = direction(to_stack, slot);
    let (up_tx, up_rx) = direction(from_stack, slot);
    let dp = End {
        tx: down_tx,
        rx: up_rx,
        slot,
        peer: Notify(stack_wake.try_clone()?),
        wake: dp_wake.try_clone()?,
    };
    let stack = End {
        tx: up_tx,
        rx: down_rx,
        slot,
        peer: Notify(dp_wake),
        wake: stack_wake,
    };
    Ok((dp, stack))
}

fn direction(n: usize, slot: usize) -> (Tx, Rx) {
    let n = n.max(1);
    let (full_tx, full_rx) = mpsc::sync_channel(n);
    let (free_tx, free_rx) = mpsc::sync_channel(n);
    for _ in 0..n {
        // Cannot fail: the channel holds n and its receiver is alive.
        let _ = free_tx.try_send(vec![0; slot]);
    }
    let waiting = Arc::new(AtomicBool::new(false));
    (
        Tx {
            full: full_tx,
            free: free_rx,
            waiting: waiting.clone(),
        },
        Rx {
            full: full_rx,
            free: free_tx,
            producer_waiting: waiting,
        },
    )
}

impl End {
    /// This end's eventfd: readable when the other end has pushed packets (or freed
    /// buffers this end waits for, or gone).
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// A second handle on this end's eventfd (for registering it with tokio).
    pub fn clone_wake(&self) -> std::io::Result<OwnedFd> {
        self.wake.try_clone()
    }

    /// Size of every buffer.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Resets this end's eventfd; true if it had been signalled.
    pub fn drain_wake(&self) -> bool {
        eventfd::drain(&self.wake)
    }

    /// Wakes the other end (after pushing packets).
    pub fn signal_peer(&self) {
        eventfd::signal(&self.peer.0);
    }

    /// The next received packet, if one is queued.
    pub fn pop(&self) -> Result<Option<Packet>, Disconnected> {
        match self.rx.full.try_recv() {
            Ok(p) => Ok(Some(p)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Disconnected),
        }
    }

    /// Returns a received packet's buffer to the other end. Call
    /// [`Self::notify_freed`] once after a batch of these.
    pub fn recycle(&self, p: Packet) {
        // Cannot be full (as large as the number of buffers); if the other end has
        // gone the buffer is simply freed.
        let _ = self.rx.free.try_send(p.buf);
    }

    /// Wakes the other end if it waits for free buffers (after [`Self::recycle`]).
    pub fn notify_freed(&self) {
        fence(Ordering::SeqCst);
        if self.rx.producer_waiting.swap(false, Ordering::SeqCst) {
            self.signal_peer();
        }
    }

    /// An empty buffer to write a packet into, if one is free. With `wait`, finding
    /// none raises this end's waiting flag: the other end signals when it returns
    /// buffers.
    pub fn take_free(&self, wait: bool) -> Result<Option<Vec<u8>>, Disconnected> {
        match self.tx.free.try_recv() {
            Ok(b) => return Ok(Some(b)),
            Err(TryRecvError::Disconnected) => return Err(Disconnected),
            Err(TryRecvError::Empty) if !wait => return Ok(None),
            Err(TryRecvError::Empty) => {}
        }
        self.tx.waiting.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // A buffer returned before the flag was seen: take it (a signal that may
        // still come is harmless).
        match self.tx.free.try_recv() {
            Ok(b) => {
                self.tx.waiting.store(false, Ordering::SeqCst);
                Ok(Some(b))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Disconnected),
        }
    }

    /// Sends `buf[..len]` (a buffer from [`Self::take_free`]). Call
    /// [`Self::signal_peer`] once after a batch of these.
    pub fn push(&self, buf: Vec<u8>, len: usize) -> Result<(), Disconnected> {
        let len = len.min(buf.len());
        match self.tx.full.try_send(Packet { buf, len }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(Disconnected),
            // Cannot happen (the channel is as large as the number of buffers);
            // the packet would be dropped.
            Err(TrySendError::Full(_)) => Ok(()),
        }
    }

    /// The data path's batched read: up to `bufs.len()` packets, packet `i` copied
    /// into `bufs[i][offset..]` and its length into `sizes[i]`. Returns how many;
    /// `WouldBlock` if none (after the drain-then-recheck of the eventfd), and
    /// `ConnectionReset` once the stack has gone. A packet larger than its buffer is
    /// dropped.
    pub fn recv_into(
        &self,
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
        offset: usize,
    ) -> std::io::Result<usize> {
        let cap = bufs.len().min(sizes.len());
        let (mut n, mut freed, mut drained) = (0, 0, false);
        let result = loop {
            if n == cap {
                if drained {
                    // The eventfd was reset and packets may remain: look again next
                    // time without waiting for another signal.
                    eventfd::signal(&self.wake);
                }
                break Ok(n);
            }
            match self.pop() {
                Ok(Some(p)) => {
                    let room = bufs
                        .get_mut(n)
                        .and_then(|b| b.get_mut(offset..))
                        .and_then(|b| b.get_mut(..p.len));
                    if let (Some(room), Some(size)) = (room, sizes.get_mut(n)) {
                        room.copy_from_slice(p.bytes());
                        *size = p.len;
                        n += 1;
                    }
                    self.recycle(p);
                    freed += 1;
                }
                Ok(None) if drained => {
                    break if n == 0 {
                        Err(std::io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(n)
                    };
                }
                Ok(None) => {
                    self.drain_wake();
                    drained = true;
                }
                Err(Disconnected) => {
                    self.drain_wake();
                    break if n == 0 {
                        Err(std::io::ErrorKind::ConnectionReset.into())
                    } else {
                        Ok(n)
                    };
                }
            }
        };
        if freed > 0 {
            self.notify_freed();
        }
        result
    }

    /// The data path's batched write: each `bufs[i][offset..]` copied into a free
    /// buffer and pushed, then one signal. A packet larger than a buffer is dropped;
    /// once no buffer is free the rest of the batch is (the data path never waits
    /// for the stack). Both are counted in the result; `BrokenPipe` once the stack
    /// has gone.
    pub fn send_from<B: AsRef<[u8]>>(&self, bufs: &[B], offset: usize) -> std::io::Result<Written> {
        let mut written = Written::default();
        let mut result = Ok(());
        for (i, b) in bufs.iter().enumerate() {
            let packet = b.as_ref().get(offset..).unwrap_or_default();
            if packet.len() > self.slot {
                written.dropped += 1;
                continue;
            }
            let mut buf = match self.take_free(false) {
                Ok(Some(buf)) => buf,
                Ok(None) => {
                    written.dropped += bufs.len() - i;
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if let Some(room) = buf.get_mut(..packet.len()) {
                room.copy_from_slice(packet);
            }
            if let Err(e) = self.push(buf, packet.len()) {
                result = Err(e);
                break;
            }
            written.sent += 1;
        }
        if written.sent > 0 {
            self.signal_peer();
        }
        match result {
            Err(Disconnected) => Err(std::io::ErrorKind::BrokenPipe.into()),
            Ok(()) => Ok(written),
        }
    }
}

/// What a batched write did: the pipe's, or a TUN's through `tun::PacketDevice`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Packets handed over.
    pub sent: usize,
    /// Packets refused (counted, not retried).
    pub dropped: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Waits at most `ms` for `fd` to be readable; true if it is.
    fn readable_within(fd: BorrowedFd<'_>, ms: i32) -> bool {
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one live pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) == 1 }
    }

    fn send(e: &End, data: &[u8]) {
        let mut b = e.take_free(false).unwrap().expect("a free buffer");
        b[..data.len()].copy_from_slice(data);
        e.push(b, data.len()).unwrap();
    }

    #[test]
    fn push_pop_in_order() {
        let (dp, stack) = pair(4, 4, 64).unwrap();
        send(&stack, b"one");
        send(&stack, b"two");
        let a = dp.pop().unwrap().expect("first");
        assert_eq!(a.bytes(), b"one");
        let b = dp.pop().unwrap().expect("second");
        assert_eq!(b.bytes(), b"two");
        assert!(dp.pop().unwrap().is_none());
        dp.recycle(a);
        dp.recycle(b);
    }

    #[test]
    fn buffers_are_recycled_not_allocated() {
        let (dp, stack) = pair(2, 2, 64).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..10u8 {
            let b = stack.take_free(false).unwrap().expect("free");
            seen.insert(b.as_ptr() as usize);
            stack.push(b, 1).unwrap();
            let p = dp.pop().unwrap().expect("packet");
            assert_eq!(p.len, 1, "round {i}");
            dp.recycle(p);
        }
        assert!(seen.len() <= 2, "only the pipe's own buffers: {seen:?}");
    }

    #[test]
    fn back_pressure_flag_and_signal() {
        let (dp, stack) = pair(2, 2, 64).unwrap();
        send(&stack, b"a");
        send(&stack, b"b");
        // No free buffer: the stack waits, its flag raised.
        assert!(stack.take_free(true).unwrap().is_none());
        assert!(!stack.drain_wake());
        let p = dp.pop().unwrap().expect("a");
        dp.recycle(p);
        dp.notify_freed();
        assert!(stack.drain_wake(), "the waiting stack was signalled");
        // Flag consumed: freeing more does not signal again.
        let p = dp.pop().unwrap().expect("b");
        dp.recycle(p);
        dp.notify_freed();
        assert!(!stack.drain_wake());
        // Without `wait` no flag, no signal.
        let _x = stack.take_free(false).unwrap().expect("free");
        let _y = stack.take_free(false).unwrap().expect("free");
        assert!(stack.take_free(false).unwrap().is_none());
        dp.notify_freed();
        assert!(!stack.drain_wake());
    }

    #[test]
    fn disconnect_is_seen_and_signalled() {
        let (dp, stack) = pair(2, 2, 64).unwrap();
        send(&stack, b"last");
        drop(stack);
        assert!(dp.drain_wake(), "woken by the drop");
        // Queued packets are still delivered, then the end is seen.
        assert_eq!(dp.pop().unwrap().expect("queued").bytes(), b"last");
        assert_eq!(dp.pop().err(), Some(Disconnected));
        let mut bufs = vec![vec![0u8; 64]; 2];
        let mut sizes = [0; 2];
        let e = dp.recv_into(&mut bufs, &mut sizes, 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
        let e = dp.send_from(&bufs, 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn recv_drains_the_eventfd_then_rechecks() {
        let (dp, stack) = pair(4, 4, 64).unwrap();
        let mut bufs = vec![vec![0u8; 64]; 4];
        let mut sizes = [0; 4];
        // Signalled with nothing queued: the read resets the eventfd, rechecks, and
        // reports WouldBlock.
        stack.signal_peer();
        let e = dp.recv_into(&mut bufs, &mut sizes, 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(!dp.drain_wake(), "reset by the read");
        // A packet pushed without a signal is still found by the recheck.
        send(&stack, b"quiet");
        assert_eq!(dp.recv_into(&mut bufs, &mut sizes, 2).unwrap(), 1);
        assert_eq!(&bufs[0][2..2 + sizes[0]], b"quiet");
    }

    #[test]
    fn recv_that_fills_its_batch_leaves_the_fd_readable_for_the_rest() {
        let (dp, stack) = pair(4, 4, 64).unwrap();
        let mut bufs = vec![vec![0u8; 64]; 1];
        let mut sizes = [0; 1];
        send(&stack, b"x");
        send(&stack, b"y");
        stack.signal_peer();
        assert_eq!(dp.recv_into(&mut bufs, &mut sizes, 0).unwrap(), 1);
        assert_eq!(&bufs[0][..sizes[0]], b"x");
        // It stopped on a full batch, not an empty queue: the eventfd still says
        // "look", and the next read finds the rest.
        assert!(readable_within(dp.wake_fd(), 0));
        assert_eq!(dp.recv_into(&mut bufs, &mut sizes, 0).unwrap(), 1);
        assert_eq!(&bufs[0][..sizes[0]], b"y");
    }

    #[test]
    fn send_from_drops_when_no_buffer_is_free_and_oversized() {
        let (dp, stack) = pair(2, 2, 8).unwrap();
        let packets = vec![vec![1u8; 4], vec![2u8; 4], vec![3u8; 4], vec![4u8; 4]];
        let w = dp.send_from(&packets, 0).unwrap();
        assert_eq!(
            (w.sent, w.dropped),
            (2, 2),
            "each packet without a buffer counted"
        );
        assert!(stack.drain_wake(), "one signal for the two that went");
        assert_eq!(stack.pop().unwrap().expect("1").bytes(), &[1u8; 4]);
        assert_eq!(stack.pop().unwrap().expect("2").bytes(), &[2u8; 4]);
        assert!(stack.pop().unwrap().is_none());
        let big = vec![vec![0u8; 9]];
        let w = dp.send_from(&big, 0).unwrap();
        assert_eq!((w.sent, w.dropped), (0, 1));
    }

    #[test]
    fn two_threads_move_100k_packets_in_order() {
        const N: u32 = 100_000;
        let (dp, stack) = pair(64, 64, 64).unwrap();
        let start = Instant::now();
        let producer = std::thread::spawn(move || {
            let (mut i, mut timeouts) = (0u32, 0);
            while i < N {
                let mut pushed = false;
                while i < N {
                    let Some(mut b) = stack.take_free(true).unwrap() else {
                        break;
                    };
                    let len = 4 + (i % 50) as usize;
                    b[..4].copy_from_slice(&i.to_be_bytes());
                    b[4..len].fill(i as u8);
                    stack.push(b, len).unwrap();
                    pushed = true;
                    i += 1;
                }
                if pushed {
                    stack.signal_peer();
                }
                if i < N {
                    // No free buffer, waiting flag raised and rechecked: sleep until
                    // the consumer frees some.
                    if !readable_within(stack.wake_fd(), 2000) {
                        timeouts += 1;
                    }
                    stack.drain_wake();
                }
            }
            (stack, timeouts)
        });
        let mut bufs = vec![vec![0u8; 64]; 32];
        let mut sizes = [0; 32];
        let (mut next, mut timeouts) = (0u32, 0);
        while next < N {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "stalled at {next}"
            );
            match dp.recv_into(&mut bufs, &mut sizes, 0) {
                Ok(n) => {
                    for (b, &len) in bufs.iter().zip(&sizes).take(n) {
                        let seq = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        assert_eq!(seq, next);
                        assert_eq!(len, 4 + (next % 50) as usize);
                        assert!(b[4..len].iter().all(|&x| x == next as u8));
                        next += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !readable_within(dp.wake_fd(), 2000) {
                        timeouts += 1;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        let (_stack, producer_timeouts) = producer.join().unwrap();
        assert_eq!((timeouts, producer_timeouts), (0, 0), "a wake-up was lost");
    }
}
