//! The two packet paths: TUN → encrypt → UDP and UDP → decrypt → TUN (or, on a
//! relay, re-encrypted to another peer), in batches; STUN answers on the way in.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use super::buffers::*;
use super::{Loop, is_stun_answer, would_block};
use crate::io::tun::{Written, tun_gone};
use crate::io::udp;
use crate::node::dataplane::{Incoming, LocalAddr, MIN_OUT_LEN, Outgoing};
use crate::wire::stun;

impl Loop {
    /// TUN → encrypt → UDP, in batches: a TSO super-packet is split by tun-rs, each
    /// segment encrypted straight into the GSO buffer, and runs of datagrams to the
    /// same peer leave in one `sendmsg`.
    pub(super) fn drain_tun(&mut self, b: &mut Buffers) {
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
    pub(super) fn write_tun(&mut self, b: &mut Buffers, k: usize) {
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
    pub(super) fn handle_big_datagram(
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
    pub(super) fn count_tun_write(&mut self, result: std::io::Result<Written>, k: usize) {
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
    pub(super) fn lose_tun(&mut self, e: &std::io::Error) {
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
    pub(super) fn drain_udp(&mut self, b: &mut Buffers, udp_in: &mut UdpIn) {
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
    pub(super) fn stun_answer(&mut self, from: SocketAddr, datagram: &[u8]) {
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
}
