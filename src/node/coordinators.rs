//! Which coordinator replica to connect to, and when to try the next one.
//!
//! A node lists every replica (`nexodus join a:4443,b:4443`). It tries them in the
//! order [`Coordinators::order`] gives (the last one that answered first, then the
//! listed order) and races them in the style of Happy Eyeballs (RFC 8305): the next
//! attempt starts [`ATTEMPT_DELAY`] after the previous one, or at once when one fails,
//! and the first connection that completes wins. A dead replica so costs a quarter
//! of a second, not a handshake timeout. [`Race`] is that schedule, without clocks
//! or sockets.

use std::net::SocketAddr;
use std::time::Duration;

/// How long an attempt has before the next one starts alongside it (RFC 8305's
/// "Connection Attempt Delay").
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The listed coordinators and the one that answered last.
#[derive(Debug, Clone)]
pub struct Coordinators {
    addrs: Vec<SocketAddr>,
    last_good: Option<SocketAddr>,
}

impl Coordinators {
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        Self {
            addrs,
            last_good: None,
        }
    }

    /// The order to try them in: the last one that answered, then the others as listed.
    pub fn order(&self) -> Vec<SocketAddr> {
        let first = self.last_good.filter(|g| self.addrs.contains(g));
        first
            .into_iter()
            .chain(self.addrs.iter().copied().filter(|a| Some(*a) != first))
            .collect()
    }

    /// `addr` answered: it goes first next time.
    pub fn succeeded(&mut self, addr: SocketAddr) {
        self.last_good = Some(addr);
    }
}

/// One round of connection attempts over an ordered list.
#[derive(Debug)]
pub struct Race {
    order: Vec<SocketAddr>,
    next: usize,
    in_flight: usize,
}

impl Race {
    pub fn new(order: Vec<SocketAddr>) -> Self {
        Self {
            order,
            next: 0,
            in_flight: 0,
        }
    }

    /// The next address to try (at the start, and each time [`ATTEMPT_DELAY`]
    /// passed without an answer); `None` once every address was tried.
    pub fn start_next(&mut self) -> Option<SocketAddr> {
        let a = *self.order.get(self.next)?;
        self.next += 1;
        self.in_flight += 1;
        Some(a)
    }

    /// An attempt failed: the next one starts at once (if any is left).
    pub fn failed(&mut self) -> Option<SocketAddr> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.start_next()
    }

    /// Addresses not tried yet: a timer for the next start is worth arming.
    pub fn has_next(&self) -> bool {
        self.next < self.order.len()
    }

    /// Every address was tried and every attempt failed.
    pub fn exhausted(&self) -> bool {
        !self.has_next() && self.in_flight == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listed_order_until_one_answered_then_that_one_first() {
        let mut c = Coordinators::new(vec![a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1")]);
        assert_eq!(
            c.order(),
            vec![a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1")]
        );
        c.succeeded(a("10.0.0.3:1"));
        assert_eq!(
            c.order(),
            vec![a("10.0.0.3:1"), a("10.0.0.1:1"), a("10.0.0.2:1")]
        );
        c.succeeded(a("10.0.0.1:1"));
        assert_eq!(
            c.order(),
            vec![a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1")]
        );
    }

    #[test]
    fn a_last_good_address_not_listed_is_ignored() {
        let mut c = Coordinators::new(vec![a("10.0.0.1:1")]);
        c.succeeded(a("10.0.0.9:1"));
        assert_eq!(c.order(), vec![a("10.0.0.1:1")]);
    }

    #[test]
    fn race_starts_one_at_a_time_and_the_next_at_once_on_failure() {
        let mut r = Race::new(vec![a("10.0.0.1:1"), a("10.0.0.2:1"), a("10.0.0.3:1")]);
        assert_eq!(r.start_next(), Some(a("10.0.0.1:1")));
        assert!(r.has_next() && !r.exhausted());
        // The first failed quickly (refused): the second starts without waiting.
        assert_eq!(r.failed(), Some(a("10.0.0.2:1")));
        // The delay passed: the third joins the second.
        assert_eq!(r.start_next(), Some(a("10.0.0.3:1")));
        assert!(!r.has_next());
        assert_eq!(r.start_next(), None);
        assert!(!r.exhausted(), "two attempts still running");
        assert_eq!(r.failed(), None);
        assert!(!r.exhausted());
        assert_eq!(r.failed(), None);
        assert!(r.exhausted());
    }

    #[test]
    fn empty_list_is_exhausted_at_once() {
        let mut r = Race::new(Vec::new());
        assert_eq!(r.start_next(), None);
        assert!(r.exhausted());
    }
}
