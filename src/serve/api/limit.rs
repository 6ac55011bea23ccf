//! Failed admin-key attempts per source address: after [`MAX_FAILURES`] in one
//! [`WINDOW`], the address is refused (429) until the window ends, without the key
//! being looked at. Pure: the caller passes `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub const MAX_FAILURES: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at once; past this the oldest window is forgotten.
const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Default)]
pub struct Failures {
    by_ip: HashMap<IpAddr, (Instant, u32)>,
}

impl Failures {
    /// Whether `ip` is refused now.
    pub fn blocked(&mut self, ip: IpAddr, now: Instant) -> bool {
        match self.by_ip.get(&ip) {
            Some(&(start, _)) if now.saturating_duration_since(start) >= WINDOW => {
                self.by_ip.remove(&ip);
                false
            }
            Some(&(_, n)) => n >= MAX_FAILURES,
            None => false,
        }
    }

    /// Counts a failed attempt from `ip`.
    pub fn fail(&mut self, ip: IpAddr, now: Instant) {
        if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= MAX_ADDRESSES {
            self.by_ip
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < WINDOW);
            if self.by_ip.len() >= MAX_ADDRESSES
                && let Some(oldest) = self.by_ip.iter().min_by_key(|(_, v)| v.0).map(|(k, _)| *k)
            {
                self.by_ip.remove(&oldest);
            }
        }
        let e = self.by_ip.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(e.0) >= WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_then_forgets() {
        let mut f = Failures::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(!f.blocked(a, t));
            f.fail(a, t);
        }
        assert!(f.blocked(a, t));
        assert!(!f.blocked(b, t));
        assert!(!f.blocked(a, t + WINDOW));
        assert!(f.is_empty());
    }

    #[test]
    fn bounded() {
        let mut f = Failures::default();
        let t = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            f.fail(IpAddr::from(i.to_be_bytes()), t);
        }
        assert_eq!(f.len(), MAX_ADDRESSES);
    }
}
