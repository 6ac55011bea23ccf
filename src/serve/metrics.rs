//! The coordinator's Prometheus figures (DESIGN §11): devices and online devices per
//! organization, open watch streams, registrations, change fan-out latency and store
//! errors.
//!
//! Counters and the histogram live here and are moved by the shell as things happen;
//! the per-organization figures and the watcher count are read from the hub at scrape
//! time, so a scrape never queries the devices table. Encoding goes through the
//! `prometheus` crate; this module does not serve HTTP (see [`crate::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

/// Store operations that failed for an internal reason (not a refusal), counted by
/// `serve::with_store`, which every store call of the coordinator goes through.
pub(crate) static STORE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Upper bounds of the fan-out histogram's buckets, in seconds.
const FANOUT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One organization's figures at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgFigures {
    pub org: String,
    pub devices: usize,
    pub online: usize,
}

#[derive(Debug, Clone)]
pub struct CoordinatorMetrics {
    registrations: IntCounter,
    resumed: IntCounter,
    fanout: Histogram,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new().unwrap_or_else(|e| unreachable!("static metric options are valid: {e}"))
    }
}

impl CoordinatorMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            registrations: IntCounter::new(
                "nexodus_registrations_total",
                "Devices registered through this coordinator since it started",
            )?,
            resumed: IntCounter::new(
                "nexodus_watch_resumed_total",
                "Watch streams brought current with a delta instead of a snapshot",
            )?,
            fanout: Histogram::with_opts(
                HistogramOpts::new(
                    "nexodus_change_fanout_seconds",
                    "Time from a change's delta being encoded to its write to one watcher",
                )
                .buckets(FANOUT_BUCKETS.to_vec()),
            )?,
        })
    }

    /// Counts devices this process registered.
    pub fn registered(&self, n: usize) {
        self.registrations
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Counts a watch stream that resumed from the revision its node named.
    pub fn resumed(&self) {
        self.resumed.inc();
    }

    /// Records the time from a delta's encoding to its write to one watcher.
    pub fn fanned_out(&self, elapsed: std::time::Duration) {
        self.fanout.observe(elapsed.as_secs_f64());
    }

    /// The text exposition (Prometheus format 0.0.4) of every figure.
    pub fn render(&self, orgs: &[OrgFigures], watchers: usize) -> String {
        match self.gather(orgs, watchers) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, "encoding metrics failed");
                String::new()
            }
        }
    }

    fn gather(&self, orgs: &[OrgFigures], watchers: usize) -> Result<String, prometheus::Error> {
        let registry = Registry::new();
        let devices = IntGaugeVec::new(
            Opts::new("nexodus_devices", "Devices registered in the organization"),
            &["org"],
        )?;
        let online = IntGaugeVec::new(
            Opts::new(
                "nexodus_devices_online",
                "Devices of the organization holding a watch stream (on any replica)",
            ),
            &["org"],
        )?;
        for o in orgs {
            devices
                .with_label_values(&[o.org.as_str()])
                .set(i64::try_from(o.devices).unwrap_or(i64::MAX));
            online
                .with_label_values(&[o.org.as_str()])
                .set(i64::try_from(o.online).unwrap_or(i64::MAX));
        }
        let watching = IntGauge::new("nexodus_watchers", "Watch streams open on this coordinator")?;
        watching.set(i64::try_from(watchers).unwrap_or(i64::MAX));
        let store_errors = IntCounter::new(
            "nexodus_store_errors_total",
            "Store operations that failed for an internal reason",
        )?;
        store_errors.inc_by(STORE_ERRORS.load(Ordering::Relaxed));
        registry.register(Box::new(devices))?;
        registry.register(Box::new(online))?;
        registry.register(Box::new(watching))?;
        registry.register(Box::new(self.registrations.clone()))?;
        registry.register(Box::new(self.resumed.clone()))?;
        registry.register(Box::new(self.fanout.clone()))?;
        registry.register(Box::new(store_errors))?;
        crate::metrics::encode(&registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_org_labels() {
        let m = CoordinatorMetrics::default();
        m.registered(3);
        m.fanned_out(std::time::Duration::from_millis(3));
        let text = m.render(
            &[OrgFigures {
                org: "lab".into(),
                devices: 4,
                online: 2,
            }],
            7,
        );
        assert!(text.contains("nexodus_devices{org=\"lab\"} 4"), "{text}");
        assert!(
            text.contains("nexodus_devices_online{org=\"lab\"} 2"),
            "{text}"
        );
        assert!(text.contains("nexodus_watchers 7"), "{text}");
        assert!(text.contains("nexodus_registrations_total 3"), "{text}");
        assert!(
            text.contains("nexodus_change_fanout_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("nexodus_change_fanout_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("nexodus_store_errors_total"), "{text}");
    }
}
