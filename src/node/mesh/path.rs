//! Which path each peer takes: direct, IPv4 after a silent IPv6 path, or the relay,
//! from the handshake ages and path counters the shell feeds every
//! [`PATH_CHECK_INTERVAL`] (the fallback rules in the parent module's docs).

use std::time::{Duration, Instant};

use super::{
    Action, DIRECT_TIMEOUT, MeshState, PATH_CHECK_INTERVAL, PROBE_WAIT, Path, RETRY_DIRECT,
    SESSION_LIFETIME, UNANSWERED, endpoint_v4, families, is_spoke,
};
use crate::node::dataplane::PathCounters;
use crate::wire::control::Device;

/// One peer's path figures from the data plane, fed every [`PATH_CHECK_INTERVAL`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathSample {
    pub id: i64,
    /// Age of the current session (a responder's counts from the initiation it got).
    pub handshake_age: Option<Duration>,
    /// Bytes of authenticated datagrams received from the peer.
    pub rx_bytes: u64,
    pub counters: PathCounters,
}

impl From<(i64, Option<Duration>)> for PathSample {
    fn from((id, handshake_age): (i64, Option<Duration>)) -> Self {
        Self {
            id,
            handshake_age,
            ..Default::default()
        }
    }
}

/// What the fallback remembers of one peer's path between checks.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PathWatch {
    last: PathCounters,
    rx_bytes: u64,
    /// Since when data went out and nothing came back.
    unanswered_since: Option<Instant>,
    /// When the last check handshake was asked for, and the peer's answered
    /// handshakes then.
    probed_at: Option<Instant>,
    responses_then: u64,
}

impl MeshState {
    /// Whether we reach `d` only through the relay: we are a spoke (and `d` is not
    /// the relay), or our direct path to it fell back.
    pub(super) fn through_relay(&self, d: &Device) -> bool {
        (self.local.spoke && !self.local.relay && Some(d.id) != self.relay_id())
            || self.fallback.contains(&d.id)
            || self.no_common_family(d)
    }

    /// Whether `d` and we share no underlay family, so no direct path can work
    /// and the relay carries it at once (a peer that reported no endpoint may
    /// still reach us: it is not counted). Never for the relay itself, nor on
    /// the relay, nor while there is no relay.
    pub(super) fn no_common_family(&self, d: &Device) -> bool {
        let relay = self.relay_id();
        if relay.is_none() || relay == Some(d.id) || relay == Some(self.local.device_id) {
            return false;
        }
        let (v4, v6) = families(d);
        (v4 || v6) && !(v4 && self.local.underlay_v4) && !(v6 && self.local.underlay_v6)
    }

    /// Whether handshake ages can move a peer: a relay other than us exists and we
    /// are not a spoke.
    fn falls_back(&self) -> bool {
        let relay = self.relay_id();
        relay.is_some() && relay != Some(self.local.device_id) && !self.local.spoke
    }

    /// When [`Self::handle_handshakes`] should be fed next: [`PATH_CHECK_INTERVAL`]
    /// after the last time (at once the first time), or never while no peer can fall
    /// back (to the relay, or from v6 to v4).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.falls_back() && !self.v4_alternatives() {
            return None;
        }
        match self.last_check {
            Some(t) => Some(t + PATH_CHECK_INTERVAL),
            None => self.trying_since.values().min().copied(),
        }
    }

    /// Whether some peer is reached over v6 with a v4 endpoint not tried yet.
    fn v4_alternatives(&self) -> bool {
        self.local.underlay_v4
            && self.installed.values().any(|p| {
                p.endpoint.is_some_and(|e| e.is_ipv6())
                    && !self.v6_failed.contains(&p.id)
                    && self
                        .devices
                        .get(&p.id)
                        .is_some_and(|d| endpoint_v4(d, self.local.reflexive).is_some())
            })
    }

    /// Every other device with how it is reached. A spoke sees only its relay.
    pub fn paths(&self) -> Vec<(&Device, Path)> {
        self.devices
            .values()
            .filter_map(|d| {
                let path = self.path_of(d);
                if self.local.spoke && !self.local.relay && path != Path::Direct {
                    return None;
                }
                Some((d, path))
            })
            .collect()
    }

    fn path_of(&self, d: &Device) -> Path {
        let relay = self.relay_id();
        let i_am_relay = relay == Some(self.local.device_id);
        if self
            .installed
            .get(&d.id)
            .is_some_and(|p| !p.allowed_ips.is_empty())
        {
            return Path::Direct;
        }
        if relay.is_some() && !i_am_relay {
            Path::Relay
        } else {
            Path::None
        }
    }

    /// Feeds each peer's path figures; moves peers between the direct path and the
    /// relay, and asks for check handshakes ([`Action::Probe`]). A direct peer moves
    /// to the relay when it never completes a handshake within [`DIRECT_TIMEOUT`],
    /// when data to it goes unanswered for [`UNANSWERED`] and a check handshake then
    /// for [`PROBE_WAIT`], or at once when its traffic arrives through the relay (so
    /// both sides use the path the other uses). It moves back when a check handshake
    /// (every [`RETRY_DIRECT`]) is answered, or when its traffic arrives directly.
    pub fn handle_handshakes<S: Into<PathSample>>(
        &mut self,
        now: Instant,
        samples: impl IntoIterator<Item = S>,
    ) -> Vec<Action> {
        self.last_check = Some(now);
        // Without a relay to fall back to, only a v6 path with a v4 one beside it
        // can move.
        let to_relay = self.falls_back();
        if !to_relay && !self.v4_alternatives() {
            return Vec::new();
        }
        let relay = self.relay_id();
        let mut changed = false;
        let mut out = Vec::new();
        for s in samples {
            let s: PathSample = s.into();
            let id = s.id;
            let Some(d) = self.devices.get(&id) else {
                continue;
            };
            if Some(id) == relay || is_spoke(d) {
                continue;
            }
            let name = d.hostname.clone();
            // A silent v6 path gives way to v4 before the relay takes over.
            let to_v4 = !self.v6_failed.contains(&id)
                && self.local.underlay_v4
                && endpoint_v4(d, self.local.reflexive).is_some()
                && self
                    .installed
                    .get(&id)
                    .and_then(|p| p.endpoint)
                    .is_some_and(|e| e.is_ipv6());
            if !to_relay && !to_v4 {
                continue;
            }
            let w = self.watch.entry(id).or_default();
            let prev = *w;
            w.last = s.counters;
            w.rx_bytes = s.rx_bytes;
            let answered = s.counters.responses > prev.responses_then;
            if self.fallback.contains(&id) {
                let came_direct =
                    s.counters.direct_while_elsewhere > prev.last.direct_while_elsewhere;
                if answered || came_direct {
                    tracing::info!(
                        peer = id,
                        hostname = %name,
                        "direct path works again; leaving the relay"
                    );
                    *w = PathWatch {
                        last: s.counters,
                        rx_bytes: s.rx_bytes,
                        ..Default::default()
                    };
                    self.fallback.remove(&id);
                    self.trying_since.insert(id, now);
                    changed = true;
                } else if w
                    .probed_at
                    .is_none_or(|p| now.duration_since(p) >= RETRY_DIRECT)
                {
                    w.probed_at = Some(now);
                    w.responses_then = s.counters.responses;
                    out.push(Action::Probe(id));
                }
                continue;
            }
            let via_relay = s.counters.via_other > prev.last.via_other
                && relay.is_some()
                && s.counters.via == relay;
            let reason = if via_relay {
                Some("its traffic arrives through the relay; answering through it")
            } else if let Some(p) = w.probed_at {
                if answered {
                    w.probed_at = None;
                    w.unanswered_since = None;
                    None
                } else if now.duration_since(p) >= PROBE_WAIT {
                    Some("no answer on the direct path; using the relay")
                } else {
                    None
                }
            } else {
                if s.rx_bytes > prev.rx_bytes {
                    w.unanswered_since = None;
                } else if s.counters.tx_data > prev.last.tx_data && w.unanswered_since.is_none() {
                    w.unanswered_since = Some(now);
                }
                if w.unanswered_since
                    .is_some_and(|u| now.duration_since(u) >= UNANSWERED)
                {
                    w.probed_at = Some(now);
                    w.responses_then = s.counters.responses;
                    out.push(Action::Probe(id));
                }
                if s.handshake_age.is_some_and(|a| a < SESSION_LIFETIME) {
                    self.trying_since.insert(id, now);
                    None
                } else if self
                    .trying_since
                    .get(&id)
                    .is_some_and(|t| now.duration_since(*t) >= DIRECT_TIMEOUT)
                {
                    Some("no handshake on the direct path; using the relay")
                } else {
                    None
                }
            };
            if reason.is_some() && to_v4 && !via_relay {
                tracing::info!(peer = id, hostname = %name, "the IPv6 path is silent; trying IPv4");
                *w = PathWatch {
                    last: s.counters,
                    rx_bytes: s.rx_bytes,
                    ..Default::default()
                };
                self.v6_failed.insert(id);
                self.trying_since.insert(id, now);
                changed = true;
            } else if let Some(reason) = reason {
                tracing::info!(peer = id, hostname = %name, "{reason}");
                *w = PathWatch {
                    last: s.counters,
                    rx_bytes: s.rx_bytes,
                    probed_at: Some(now),
                    responses_then: s.counters.responses,
                    unanswered_since: None,
                };
                self.fallback.insert(id);
                changed = true;
            }
        }
        if changed {
            out.extend(self.reconcile());
        }
        out
    }
}
