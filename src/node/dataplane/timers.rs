//! Output not caused by a packet: timer datagrams and flushing of queued packets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;
use tracing::{debug, trace};

use super::packet::span_in;
use super::{
    DATA_OVERHEAD, DataPlane, DropReason, HANDSHAKE_INIT_LEN, MIN_OUT_LEN, MSG_DATA, PeerId, TICK,
    Transmit,
};

/// Sessions (`Tunn`s) persistent keepalives may make in one tick; the other peers'
/// first keepalives wait for the next ticks (4,096 a second).
const NEW_SESSIONS_PER_TICK: usize = 1024;

/// A reusable buffer for a timer-generated datagram (handshake or keepalive).
pub(super) struct TxSlot {
    peer: PeerId,
    to: SocketAddr,
    len: usize,
    buf: [u8; HANDSHAKE_INIT_LEN],
}

impl TxSlot {
    pub(super) fn empty() -> Self {
        TxSlot {
            peer: 0,
            to: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            buf: [0; HANDSHAKE_INIT_LEN],
        }
    }
}

impl DataPlane {
    /// Next datagram generated outside a direct request: handshake retries
    /// and keepalives from [`DataPlane::handle_timeout`], and packets
    /// boringtun queued until a handshake completed. Call in a loop until
    /// `None` after every `handle_*` call. `out` should be as large as the
    /// `out` given to [`DataPlane::handle_tun_packet`].
    pub fn poll_transmit<'o>(&mut self, out: &'o mut [u8]) -> Option<Transmit<'o>> {
        while self.timer_pos < self.timer_len {
            let Some(slot) = self.timer_q.get(self.timer_pos) else {
                break;
            };
            self.timer_pos += 1;
            let Some(peer) = self.peers.get(&slot.peer) else {
                continue;
            };
            let src = peer.source_for(slot.to);
            let (Some(data), Some(dst)) = (slot.buf.get(..slot.len), out.get_mut(..slot.len))
            else {
                self.counters.bump(DropReason::BufferTooSmall);
                continue;
            };
            dst.copy_from_slice(data);
            let (to, len) = (slot.to, slot.len);
            return out.get(..len).map(|data| Transmit { to, src, data });
        }
        self.timer_pos = 0;
        self.timer_len = 0;

        if self.flush.is_empty() {
            return None;
        }
        if out.len() < (self.max_plain + DATA_OVERHEAD).max(MIN_OUT_LEN) {
            // Flushing could hand boringtun a packet larger than `out` (which
            // it answers with a panic). Keep the peers pending.
            debug!(
                have = out.len(),
                need = self.max_plain + DATA_OVERHEAD,
                "poll_transmit buffer too small to flush queued packets"
            );
            return None;
        }
        while let Some(&id) = self.flush.last() {
            let Some(peer) = self.peers.get_mut(&id) else {
                self.flush.pop();
                continue;
            };
            let Some(tunn) = peer.tunn.as_deref_mut() else {
                // No session was ever made: nothing is queued.
                peer.flush_pending = false;
                self.flush.pop();
                continue;
            };
            let produced = match tunn.decapsulate(None, &[], &mut out[..]) {
                TunnResult::WriteToNetwork(data) => Some((data.as_ptr() as usize, data.len())),
                _ => None,
            };
            match produced {
                Some((ptr, len)) => {
                    let Some(to) = peer.endpoint else {
                        self.counters.bump(DropReason::NoEndpoint);
                        continue;
                    };
                    peer.sent(len);
                    let src = peer.source;
                    let range = span_in(out, ptr, len)?;
                    trace!(peer = id, len, "flushing queued packet");
                    return out.get(range).map(|data| Transmit { to, src, data });
                }
                None => {
                    // Queue empty, or still no session (then keep `queued`;
                    // the next authenticated packet schedules another flush).
                    if peer
                        .tunn
                        .as_ref()
                        .is_some_and(|t| t.time_since_last_handshake().is_some())
                    {
                        peer.queued = false;
                    }
                    peer.flush_pending = false;
                    self.flush.pop();
                }
            }
        }
        None
    }

    /// Runs the timers of every peer: boringtun's handshake retries, rekeys,
    /// session expiry and passive keepalives, plus our persistent keepalives;
    /// resets the handshake rate limiter once a second. Generated datagrams
    /// are queued for [`DataPlane::poll_transmit`].
    pub fn handle_timeout(&mut self, now: Instant) {
        // Called every tick, but boringtun's `reset_count` only zeroes the count
        // once a second (of its own clock) has passed since the last reset, so
        // the limit stays a rate per second (`handshake_limiter_is_a_rate_per_second`).
        self.rate_limiter.reset_count();
        self.next_tick = Some(now + TICK);
        if let Some(filter) = self.filter.as_deref_mut() {
            filter.advance(now);
        }
        for (_, filter) in &mut self.relay_filters {
            filter.advance(now);
        }

        // Keep undrained output, move spare slots behind it.
        if self.timer_pos > 0 {
            if let Some(used) = self.timer_q.get_mut(..self.timer_len) {
                used.rotate_left(self.timer_pos.min(used.len()));
            }
            self.timer_len = self.timer_len.saturating_sub(self.timer_pos);
            self.timer_pos = 0;
        }

        let mut new_sessions = NEW_SESSIONS_PER_TICK;
        for (&id, peer) in self.peers.iter_mut() {
            while self.timer_q.len() < self.timer_len + 2 {
                self.timer_q.push(TxSlot::empty());
            }
            let mut sent = false;
            if let Some(slot) = self.timer_q.get_mut(self.timer_len) {
                let result = if std::mem::take(&mut peer.probe) {
                    let tunn = peer.tunn(&self.secret, &self.rate_limiter);
                    match tunn.format_handshake_initiation(&mut slot.buf, false) {
                        TunnResult::Done => tunn.update_timers(&mut slot.buf),
                        r => r,
                    }
                } else if let Some(tunn) = peer.tunn.as_deref_mut() {
                    tunn.update_timers(&mut slot.buf)
                } else {
                    // No `Tunn` yet: no session, no timers.
                    TunnResult::Done
                };
                match result {
                    TunnResult::WriteToNetwork(data) => {
                        let len = data.len();
                        if let Some(to) = peer.endpoint {
                            slot.peer = id;
                            slot.to = to;
                            slot.len = len;
                            self.timer_len += 1;
                            peer.sent(len);
                            sent = true;
                        } else {
                            self.counters.bump(DropReason::NoEndpoint);
                        }
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                    TunnResult::Err(e) => debug!(peer = id, error = ?e, "timer error"),
                    _ => {}
                }
            }

            if peer.keepalive > 0 && peer.endpoint.is_some() {
                let interval = Duration::from_secs(u64::from(peer.keepalive));
                // A keepalive to a peer without a `Tunn` makes one (and starts a
                // handshake): at most NEW_SESSIONS_PER_TICK per tick, so a snapshot of
                // thousands of peers neither stalls this thread nor floods the network.
                let deferred = peer.tunn.is_none() && {
                    let out_of_budget = new_sessions == 0;
                    new_sessions = new_sessions.saturating_sub(1);
                    out_of_budget
                };
                if sent || peer.active_since_tick {
                    peer.keepalive_due = Some(now + interval);
                } else if deferred {
                    // Due at the next tick.
                } else if peer.keepalive_due.is_none_or(|due| now >= due) {
                    peer.keepalive_due = Some(now + interval);
                    if let (Some(slot), Some(to)) =
                        (self.timer_q.get_mut(self.timer_len), peer.endpoint)
                    {
                        match peer
                            .tunn(&self.secret, &self.rate_limiter)
                            .encapsulate(&[], &mut slot.buf)
                        {
                            TunnResult::WriteToNetwork(data) => {
                                if data.first() != Some(&MSG_DATA) {
                                    peer.queued = true;
                                }
                                let len = data.len();
                                slot.peer = id;
                                slot.to = to;
                                slot.len = len;
                                self.timer_len += 1;
                                peer.sent(len);
                                trace!(peer = id, "persistent keepalive");
                            }
                            TunnResult::Done => peer.queued = true,
                            TunnResult::Err(e) => debug!(peer = id, error = ?e, "keepalive error"),
                            _ => {}
                        }
                    }
                }
            }
            peer.active_since_tick = false;
        }
    }

    /// When [`DataPlane::handle_timeout`] wants to run next: one [`TICK`]
    /// after its last run; `None` before the first run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }
}
