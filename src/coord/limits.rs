//! What one device may make the coordinator (and every peer) carry (DESIGN §13
//! "Limits"): how many prefixes and endpoints, how long its strings, how often it
//! may update itself. Pure: the store checks requests with [`check_register`] and
//! [`check_update`]; the shell keeps an [`UpdateLimiter`] and gives it the time.

use std::collections::HashMap;

use thiserror::Error;

use crate::wire::control::{DeviceUpdate, RegisterRequest};

/// Most prefixes one device may advertise.
pub const MAX_ADVERTISED: usize = 64;
/// Most endpoints one device may report.
pub const MAX_ENDPOINTS: usize = 16;
/// Longest hostname (a DNS name's limit).
pub const MAX_HOSTNAME: usize = 253;
/// Longest operating system name.
pub const MAX_OS: usize = 64;
/// Longest join-token secret or public key text (both are 44 base64 characters).
pub const MAX_SECRET: usize = 128;

/// Updates a device may send in a burst, and how many it regains per second.
pub const UPDATE_BURST: u32 = 20;
pub const UPDATES_PER_SEC: u32 = 1;
/// Devices the limiter remembers before it forgets the ones with a full bucket.
const LIMITER_DEVICES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LimitError {
    #[error("too many advertised prefixes: {got} (at most {MAX_ADVERTISED} per device)")]
    Advertised { got: usize },
    #[error("too many endpoints: {got} (at most {MAX_ENDPOINTS} per device)")]
    Endpoints { got: usize },
    #[error("{field} is too long: {got} bytes (at most {max})")]
    TooLong {
        field: &'static str,
        got: usize,
        max: usize,
    },
    #[error(
        "too many updates from this device: at most {UPDATE_BURST} at once and \
         {UPDATES_PER_SEC} per second; retry in {retry_ms} ms"
    )]
    RateLimited { retry_ms: u64 },
}

fn length(field: &'static str, value: &str, max: usize) -> Result<(), LimitError> {
    if value.len() > max {
        return Err(LimitError::TooLong {
            field,
            got: value.len(),
            max,
        });
    }
    Ok(())
}

fn counts(advertised: Option<usize>, endpoints: Option<usize>) -> Result<(), LimitError> {
    if let Some(got) = advertised.filter(|&n| n > MAX_ADVERTISED) {
        return Err(LimitError::Advertised { got });
    }
    if let Some(got) = endpoints.filter(|&n| n > MAX_ENDPOINTS) {
        return Err(LimitError::Endpoints { got });
    }
    Ok(())
}

/// The bounds of a registration (and of a stock WireGuard device's record).
pub fn check_register(req: &RegisterRequest) -> Result<(), LimitError> {
    length("token", &req.token_secret, MAX_SECRET)?;
    length("public key", &req.public_key, MAX_SECRET)?;
    length("hostname", &req.hostname, MAX_HOSTNAME)?;
    length("os", &req.os, MAX_OS)?;
    counts(Some(req.advertise_cidrs.len()), Some(req.endpoints.len()))
}

/// The bounds of an update.
pub fn check_update(update: &DeviceUpdate) -> Result<(), LimitError> {
    if let Some(h) = &update.hostname {
        length("hostname", h, MAX_HOSTNAME)?;
    }
    counts(
        update.advertise_cidrs.as_ref().map(Vec::len),
        update.endpoints.as_ref().map(Vec::len),
    )
}

/// A token bucket: `burst` tokens, one regained every `1 / per_sec` seconds. Time is
/// the caller's, in milliseconds of any monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens, in thousandths (so refill needs no floats).
    milli: u64,
    last_ms: u64,
}

impl Bucket {
    pub fn full(now_ms: u64) -> Self {
        Self {
            milli: u64::from(UPDATE_BURST) * 1000,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        let gained = elapsed.saturating_mul(u64::from(UPDATES_PER_SEC));
        self.milli = self
            .milli
            .saturating_add(gained)
            .min(u64::from(UPDATE_BURST) * 1000);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now_ms: u64) -> Result<(), LimitError> {
        self.refill(now_ms);
        if self.milli >= 1000 {
            self.milli -= 1000;
            return Ok(());
        }
        let per_sec = u64::from(UPDATES_PER_SEC.max(1));
        Err(LimitError::RateLimited {
            retry_ms: (1000 - self.milli).div_ceil(per_sec),
        })
    }

    fn is_full(&self, now_ms: u64) -> bool {
        let mut b = *self;
        b.refill(now_ms);
        b.milli >= u64::from(UPDATE_BURST) * 1000
    }
}

/// One [`Bucket`] per device.
#[derive(Debug, Default)]
pub struct UpdateLimiter {
    buckets: HashMap<i64, Bucket>,
}

impl UpdateLimiter {
    /// Allows one update of `device_id` at `now_ms`, or refuses it.
    pub fn check(&mut self, device_id: i64, now_ms: u64) -> Result<(), LimitError> {
        if self.buckets.len() >= LIMITER_DEVICES && !self.buckets.contains_key(&device_id) {
            // A full bucket is what a forgotten device starts with again.
            self.buckets.retain(|_, b| !b.is_full(now_ms));
        }
        self.buckets
            .entry(device_id)
            .or_insert_with(|| Bucket::full(now_ms))
            .take(now_ms)
    }

    /// Devices remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_lengths_are_bounded() {
        let cidrs: Vec<ipnet::IpNet> = (0..=MAX_ADVERTISED)
            .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .collect();
        let mut u = DeviceUpdate {
            advertise_cidrs: Some(cidrs[..MAX_ADVERTISED].to_vec()),
            endpoints: Some(vec!["192.0.2.1:1".parse().unwrap(); MAX_ENDPOINTS]),
            hostname: Some("h".repeat(MAX_HOSTNAME)),
            ..Default::default()
        };
        assert_eq!(check_update(&u), Ok(()));
        u.advertise_cidrs = Some(cidrs.clone());
        let e = check_update(&u).unwrap_err();
        assert_eq!(e, LimitError::Advertised { got: 65 });
        assert!(e.to_string().contains("at most 64"), "{e}");
        u.advertise_cidrs = None;
        u.endpoints = Some(vec!["192.0.2.1:1".parse().unwrap(); MAX_ENDPOINTS + 1]);
        assert_eq!(check_update(&u), Err(LimitError::Endpoints { got: 17 }));
        u.endpoints = None;
        u.hostname = Some("h".repeat(MAX_HOSTNAME + 1));
        let e = check_update(&u).unwrap_err();
        assert!(e.to_string().contains("hostname is too long"), "{e}");

        let mut r = RegisterRequest {
            token_secret: "t".into(),
            public_key: "k".into(),
            hostname: "h".into(),
            os: "linux".into(),
            ..Default::default()
        };
        assert_eq!(check_register(&r), Ok(()));
        r.os = "o".repeat(MAX_OS + 1);
        assert!(matches!(
            check_register(&r),
            Err(LimitError::TooLong { field: "os", .. })
        ));
        r.os.clear();
        r.advertise_cidrs = cidrs;
        assert_eq!(check_register(&r), Err(LimitError::Advertised { got: 65 }));
        r.advertise_cidrs.clear();
        r.token_secret = "x".repeat(MAX_SECRET + 1);
        assert!(check_register(&r).is_err());
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let mut l = UpdateLimiter::default();
        for _ in 0..UPDATE_BURST {
            assert_eq!(l.check(1, 0), Ok(()));
        }
        let e = l.check(1, 0).unwrap_err();
        assert_eq!(e, LimitError::RateLimited { retry_ms: 1000 });
        assert!(e.to_string().contains("too many updates"), "{e}");
        // Another device has its own bucket.
        assert_eq!(l.check(2, 0), Ok(()));
        // Half a second later: still nothing; a second later: one, not two.
        assert_eq!(
            l.check(1, 500),
            Err(LimitError::RateLimited { retry_ms: 500 })
        );
        assert_eq!(l.check(1, 1000), Ok(()));
        assert!(l.check(1, 1000).is_err());
        // Over a minute: UPDATES_PER_SEC per second, never more than the burst.
        let mut allowed = 0;
        for ms in (1000..=61_000).step_by(100) {
            if l.check(1, ms).is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 60 * UPDATES_PER_SEC);
        assert_eq!(l.check(1, 10_000_000), Ok(()));
        let mut later = 0;
        while l.check(1, 10_000_000).is_ok() {
            later += 1;
        }
        assert_eq!(later, UPDATE_BURST - 1);
        // A clock that goes back refunds nothing.
        assert!(l.check(1, 0).is_err());
    }

    #[test]
    fn limiter_forgets_idle_devices_when_full() {
        let mut l = UpdateLimiter::default();
        for id in 0..LIMITER_DEVICES as i64 {
            l.check(id, 0).unwrap();
        }
        assert_eq!(l.len(), LIMITER_DEVICES);
        // A minute on, every bucket is full again: forgotten for a newcomer.
        l.check(-1, 60_000).unwrap();
        assert_eq!(l.len(), 1);
    }
}
