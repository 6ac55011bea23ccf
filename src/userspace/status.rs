//! The rootless stack's status for `nexodus status`, without I/O: when to rebuild the
//! snapshot ([`StatusClock`]: soon after flows come or go, every second while flows
//! carry bytes, never while idle) and how to build it ([`Snapshot`]: one row per rule
//! with its open flows, the SOCKS5 listener as the last rule, flows sorted).
//!
//! Not here: where the snapshot is published (a mutex the driver writes).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::rule::Rule;
use super::{FlowStatus, RuleStatus, UserspaceStatus};

/// How often the snapshot is rebuilt while something changed.
pub const STATUS_EVERY: Duration = Duration::from_millis(200);
/// How often byte counts are refreshed while flows are open.
pub const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// When the status snapshot is due.
#[derive(Debug)]
pub struct StatusClock {
    dirty: bool,
    at: Instant,
}

/// What [`StatusClock::poll`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Build and publish the snapshot now.
    Now,
    /// Not before this.
    At(Instant),
    /// Nothing to refresh.
    Never,
}

impl StatusClock {
    /// A clock whose first snapshot is due at once (the rules, with no flows).
    pub fn new(now: Instant) -> Self {
        Self {
            dirty: true,
            at: now,
        }
    }

    /// A flow came or went.
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// Whether a snapshot is due at `now` (`has_flows`: byte counts may move). `Now`
    /// counts as published.
    pub fn poll(&mut self, now: Instant, has_flows: bool) -> Due {
        let every = if self.dirty {
            STATUS_EVERY
        } else if has_flows {
            STATUS_REFRESH
        } else {
            return Due::Never;
        };
        let at = self.at + every;
        if now >= at {
            self.dirty = false;
            self.at = now;
            Due::Now
        } else {
            Due::At(at)
        }
    }
}

/// A status snapshot being built: flows are added one by one.
pub struct Snapshot<'a> {
    rules: &'a [Rule],
    socks: Option<String>,
    counts: Vec<usize>,
    flows: Vec<FlowStatus>,
}

impl<'a> Snapshot<'a> {
    /// `rules` in order, then the SOCKS5 listener (rule index `rules.len()`) if any.
    pub fn new(rules: &'a [Rule], socks: Option<SocketAddr>) -> Self {
        Self {
            rules,
            socks: socks.map(|a| format!("socks5 {a}")),
            counts: vec![0; rules.len() + 1],
            flows: Vec::new(),
        }
    }

    /// One open flow of rule `rule` (`rules.len()`: SOCKS5).
    pub fn flow(
        &mut self,
        rule: usize,
        proto: &str,
        (from, to): (SocketAddr, SocketAddr),
        (to_mesh_bytes, from_mesh_bytes): (u64, u64),
    ) {
        if let Some(c) = self.counts.get_mut(rule) {
            *c += 1;
        }
        let name = self
            .rules
            .get(rule)
            .map(ToString::to_string)
            .or_else(|| self.socks.clone())
            .unwrap_or_default();
        self.flows.push(FlowStatus {
            rule: name,
            proto: proto.into(),
            from,
            to,
            to_mesh_bytes,
            from_mesh_bytes,
        });
    }

    pub fn finish(mut self) -> UserspaceStatus {
        self.flows
            .sort_by(|a, b| (&a.rule, a.from, a.to).cmp(&(&b.rule, b.from, b.to)));
        let mut rules: Vec<RuleStatus> = self
            .rules
            .iter()
            .zip(&self.counts)
            .map(|(r, &n)| RuleStatus {
                rule: r.to_string(),
                open_flows: n,
            })
            .collect();
        if let Some(s) = self.socks {
            rules.push(RuleStatus {
                rule: s,
                open_flows: self.counts.last().copied().unwrap_or(0),
            });
        }
        UserspaceStatus {
            rules,
            open_flows: self.flows,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn snapshots_follow_changes_soon_and_byte_counts_every_second() {
        let t0 = Instant::now();
        let mut c = StatusClock::new(t0);
        assert_eq!(c.poll(t0, false), Due::At(t0 + STATUS_EVERY));
        let t1 = t0 + STATUS_EVERY;
        assert_eq!(c.poll(t1, false), Due::Now);
        assert_eq!(c.poll(t1, false), Due::Never, "idle: nothing to refresh");
        assert_eq!(c.poll(t1, true), Due::At(t1 + STATUS_REFRESH));
        c.changed();
        assert_eq!(c.poll(t1, true), Due::At(t1 + STATUS_EVERY));
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(c.poll(t2, true), Due::Now);
        assert_eq!(
            c.poll(t2 + STATUS_EVERY, true),
            Due::At(t2 + STATUS_REFRESH)
        );
        assert_eq!(c.poll(t2 + STATUS_REFRESH, true), Due::Now);
    }

    #[test]
    fn a_snapshot_counts_flows_per_rule_and_sorts_them() {
        let rules = [
            Rule::ingress("tcp:443:127.0.0.1:8443").unwrap(),
            Rule::egress("udp:5353:100.64.0.5:53").unwrap(),
        ];
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut s = Snapshot::new(&rules, Some(a("127.0.0.1:1080")));
        s.flow(0, "tcp", (a("100.64.0.9:2"), a("127.0.0.1:8443")), (1, 2));
        s.flow(0, "tcp", (a("100.64.0.9:1"), a("127.0.0.1:8443")), (3, 4));
        s.flow(2, "udp", (a("127.0.0.1:7"), a("127.0.0.1:9")), (5, 6));
        let st = s.finish();
        let (ingress, egress) = (rules[0].to_string(), rules[1].to_string());
        let counts: Vec<_> = st
            .rules
            .iter()
            .map(|r| (r.rule.as_str(), r.open_flows))
            .collect();
        assert_eq!(
            counts,
            [
                (ingress.as_str(), 2),
                (egress.as_str(), 0),
                ("socks5 127.0.0.1:1080", 1),
            ]
        );
        let flows: Vec<_> = st
            .open_flows
            .iter()
            .map(|f| (f.rule.as_str(), f.from.port(), f.to_mesh_bytes))
            .collect();
        assert_eq!(
            flows,
            [
                (ingress.as_str(), 1, 3),
                (ingress.as_str(), 2, 1),
                ("socks5 127.0.0.1:1080", 7, 5),
            ]
        );
        // Without SOCKS5 there is no such row.
        let st = Snapshot::new(&rules, None).finish();
        assert_eq!(st.rules.len(), 2);
        assert!(st.open_flows.is_empty());
    }
}
