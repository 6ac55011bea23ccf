//! UDP out: single datagrams and GSO trains (runs of datagrams to one destination
//! from one source, one `sendmsg`), each from the source the data plane names.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use super::buffers::*;
use super::{Loop, would_block};
use crate::io::udp;
use crate::node::dataplane::{LocalAddr, Transmit};

impl Loop {
    /// One `sendmsg` to `to` from `src` (segmented by GSO if `segment` is given).
    /// When `src` is gone from the host, the data plane forgets it and the datagram
    /// leaves from the kernel's choice.
    pub(super) fn send_from(
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

    pub(super) fn send_udp(&mut self, to: SocketAddr, src: Option<LocalAddr>, data: &[u8]) {
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
    pub(super) fn send_train(&mut self, train: &Train, gso: &[u8]) {
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
    pub(super) fn push_datagram(
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

    pub(super) fn flush_train(&mut self, t: &mut Trains) {
        if let Some(train) = t.train.take() {
            self.send_train(&train, &t.buf);
        }
    }

    pub(super) fn flush(&mut self, out: &mut [u8]) {
        while let Some(Transmit { to, src, data }) = self.dp.poll_transmit(out) {
            self.send_udp(to, src, data);
        }
    }
}
