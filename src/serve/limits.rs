//! What the coordinator bounds (DESIGN §13): which incoming QUIC connections it
//! takes on, how often a device may update itself, how long the change log grows.
//! (Stream counts and receive windows are in `identity::server_config`; field
//! lengths and counts in `coord::limits`.)
//!
//! Per source address at most [`MAX_PER_IP`] connections (handshaking or
//! established); while more than [`RETRY_ABOVE`] handshakes are in progress, a client
//! must first prove its address (a QUIC Retry round trip), so spoofed Initial packets
//! cost one stateless reply and no connection state. [`decide`] is the pure rule;
//! [`Admission`] counts and hands out [`Admitted`] guards that uncount on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::coord::limits::{LimitError, UpdateLimiter};
use crate::serve::{SharedStore, with_store};

/// Connections one source address may hold by default (many nodes may share one
/// NAT address; `serve --max-connections-per-ip`).
pub const MAX_PER_IP: usize = 256;
/// Handshakes in progress above which a client must validate its address first.
pub const RETRY_ABOVE: usize = 64;

/// What to do with an incoming connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// Ask the client to prove its address (stateless Retry).
    Retry,
    /// Refuse: its address holds too many connections.
    Refuse,
}

/// The rule: `validated` says the client proved its address (it answered a Retry),
/// `handshaking` counts handshakes in progress, `from_ip` the connections its
/// address holds now.
pub fn decide(validated: bool, handshaking: usize, from_ip: usize, max_per_ip: usize) -> Decision {
    if !validated && handshaking >= RETRY_ABOVE {
        return Decision::Retry;
    }
    if from_ip >= max_per_ip {
        return Decision::Refuse;
    }
    Decision::Accept
}

/// Live counts of connections per address and handshakes in progress.
#[derive(Debug)]
pub struct Admission {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    handshaking: AtomicUsize,
    max_per_ip: usize,
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(MAX_PER_IP)
    }
}

impl Admission {
    pub fn new(max_per_ip: usize) -> Self {
        Self {
            per_ip: Mutex::default(),
            handshaking: AtomicUsize::new(0),
            max_per_ip,
        }
    }

    /// Decides, and if accepted counts the connection (and its handshake) until the
    /// guard drops.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Result<Admitted, Decision> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = per_ip.get(&ip).copied().unwrap_or(0);
        let handshaking = self.handshaking.load(Ordering::Relaxed);
        match decide(validated, handshaking, from_ip, self.max_per_ip) {
            Decision::Accept => {
                per_ip.insert(ip, from_ip + 1);
                self.handshaking.fetch_add(1, Ordering::Relaxed);
                Ok(Admitted {
                    admission: self.clone(),
                    ip,
                    handshaking: true,
                })
            }
            other => Err(other),
        }
    }

    /// Connections held by `ip` now.
    pub fn from_ip(&self, ip: IpAddr) -> usize {
        let per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        per_ip.get(&ip).copied().unwrap_or(0)
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
    handshaking: bool,
}

impl Admitted {
    /// Its handshake is over (done or failed).
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.admission.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.handshake_done();
        let mut per_ip = self
            .admission
            .per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Per-device update rate limits (see [`UpdateLimiter`]), on
/// this process's clock.
pub struct Limiter {
    started: Instant,
    updates: Mutex<UpdateLimiter>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            updates: Mutex::default(),
        }
    }
}

impl Limiter {
    pub fn allow_update(&self, device_id: i64) -> Result<(), LimitError> {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut l = self.updates.lock().unwrap_or_else(|e| e.into_inner());
        l.check(device_id, now_ms)
    }
}

/// Revisions the change log keeps, and how often older ones are deleted.
pub const CHANGES_KEPT: i64 = 10_000;
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Deletes the change log's old entries now and then (every replica does; it is
/// idempotent).
pub async fn prune(store: SharedStore) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match with_store(&store, |s| s.prune_changes(CHANGES_KEPT)).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "pruned the change log"),
            Err(e) => tracing::warn!(error = %e, "pruning the change log failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule() {
        let max = MAX_PER_IP;
        assert_eq!(decide(false, 0, 0, max), Decision::Accept);
        assert_eq!(decide(false, RETRY_ABOVE, 0, max), Decision::Retry);
        assert_eq!(decide(true, RETRY_ABOVE, 0, max), Decision::Accept);
        assert_eq!(decide(true, 0, max, max), Decision::Refuse);
        assert_eq!(decide(false, 0, max - 1, max), Decision::Accept);
        assert_eq!(decide(true, 0, max, max + 1), Decision::Accept);
    }

    #[test]
    fn counts_per_address_and_uncounts_on_drop() {
        let a = Arc::new(Admission::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let mut held: Vec<Admitted> = (0..MAX_PER_IP)
            .map(|_| {
                let mut g = a.admit(ip, true).unwrap();
                g.handshake_done();
                g
            })
            .collect();
        assert_eq!(a.admit(ip, true).unwrap_err(), Decision::Refuse);
        assert!(a.admit(other, false).is_ok());
        held.pop();
        assert_eq!(a.from_ip(ip), MAX_PER_IP - 1);
        assert!(a.admit(ip, true).is_ok());
        drop(held);
        assert_eq!(a.from_ip(ip), 0);
        // Handshakes in progress: past the threshold an unvalidated client retries.
        let pending: Vec<Admitted> = (0..RETRY_ABOVE)
            .map(|i| {
                a.admit(IpAddr::from([198, 51, 100, i as u8]), false)
                    .unwrap()
            })
            .collect();
        assert_eq!(a.admit(other, false).unwrap_err(), Decision::Retry);
        assert!(a.admit(other, true).is_ok());
        drop(pending);
        assert!(a.admit(other, false).is_ok());
    }
}
