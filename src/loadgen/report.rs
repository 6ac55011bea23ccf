//! What a load run reports: registration and fan-out latencies, memory, and the
//! reconnect storm's figures; printed for people and for the bench script.

use std::fmt;

/// The figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub label: String,
    pub nodes: usize,
    pub coordinators: usize,
    pub registrations_per_sec: f64,
    pub updates_per_sec: f64,
    pub watch_setup_secs: f64,
    pub settle_secs: f64,
    pub probes: usize,
    /// Per watcher and probe: commit request sent → frame received, milliseconds.
    pub watcher_p50_ms: f64,
    pub watcher_p99_ms: f64,
    /// Per probe: until the last watcher had it, milliseconds.
    pub all_p50_ms: f64,
    pub all_p99_ms: f64,
    pub all_max_ms: f64,
    /// Watchers that missed a probe within the timeout.
    pub missed: usize,
    /// Failed attempts (registrations retried, updates, watches).
    pub errors: usize,
    pub first_error: Option<String>,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// The reconnect storm (`--restart-cmd`), if run.
    pub storm: Option<StormReport>,
    #[serde(skip)]
    pub json: bool,
}

/// The figures of a reconnect storm.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StormReport {
    /// Restart command started → every node had its snapshot.
    pub all_snapshots_secs: f64,
    /// Per node: restart → snapshot.
    pub snapshot_p50_secs: f64,
    pub snapshot_p99_secs: f64,
    /// Then until no frame arrived for a second (the online deltas drained).
    pub settle_secs: f64,
    /// Nodes that never got a snapshot.
    pub lost: usize,
    /// Failed connection, login or watch attempts (each retried).
    pub retries: usize,
    pub first_error: Option<String>,
    /// Probes after the storm, as in phase 4.
    pub watcher_p50_ms: f64,
    pub watcher_p99_ms: f64,
    pub all_p50_ms: f64,
    pub all_p99_ms: f64,
    pub missed: usize,
    /// Watch streams that ended after their snapshot (before the probes were done),
    /// and why the first did.
    pub streams_lost: usize,
    pub first_loss: Option<String>,
    pub rss_after_kib: u64,
}

impl Report {
    pub fn rss_per_device_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.nodes.max(1) as f64
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.json {
            let mut v = serde_json::to_value(self).map_err(|_| fmt::Error)?;
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "rss_per_device_kib".into(),
                    serde_json::json!(self.rss_per_device_kib()),
                );
            }
            return write!(f, "{v}");
        }
        writeln!(
            f,
            "loadgen {}: {} nodes over {} coordinator(s)",
            self.label, self.nodes, self.coordinators
        )?;
        writeln!(
            f,
            "  registrations/s      {:.0}",
            self.registrations_per_sec
        )?;
        writeln!(f, "  endpoint updates/s   {:.0}", self.updates_per_sec)?;
        writeln!(
            f,
            "  watch setup          {:.1} s (+ {:.1} s until deltas drained)",
            self.watch_setup_secs, self.settle_secs
        )?;
        writeln!(
            f,
            "  change → watcher     p50 {:.1} ms  p99 {:.1} ms  ({} probes, {} missed)",
            self.watcher_p50_ms, self.watcher_p99_ms, self.probes, self.missed
        )?;
        writeln!(
            f,
            "  change → all N       p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            self.all_p50_ms, self.all_p99_ms, self.all_max_ms
        )?;
        write!(
            f,
            "  coordinator RSS      {:.1} MiB → {:.1} MiB ({:.2} KiB per device)",
            self.rss_before_kib as f64 / 1024.0,
            self.rss_after_kib as f64 / 1024.0,
            self.rss_per_device_kib()
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "\n  errors               {} (first: {e})", self.errors)?;
        }
        if let Some(s) = &self.storm {
            write!(
                f,
                "\n  storm: all snapshots {:.1} s after restart (per node p50 {:.1} s, p99 {:.1} s; \
                 + {:.1} s until deltas drained; {} lost, {} retries)",
                s.all_snapshots_secs,
                s.snapshot_p50_secs,
                s.snapshot_p99_secs,
                s.settle_secs,
                s.lost,
                s.retries
            )?;
            write!(
                f,
                "\n  after storm: change → watcher p50 {:.1} ms p99 {:.1} ms; → all N p50 {:.1} ms \
                 p99 {:.1} ms ({} missed); RSS {:.1} MiB",
                s.watcher_p50_ms,
                s.watcher_p99_ms,
                s.all_p50_ms,
                s.all_p99_ms,
                s.missed,
                s.rss_after_kib as f64 / 1024.0
            )?;
            if let Some(e) = &s.first_error {
                write!(f, "\n  storm errors         (first: {e})")?;
            }
            if let Some(e) = &s.first_loss {
                write!(
                    f,
                    "\n  streams lost after their snapshot: {} (first: {e})",
                    s.streams_lost
                )?;
            }
        }
        Ok(())
    }
}
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
