//! What the hub holds of each organization: its devices encoded once, tombstones
//! for resuming watchers, the shared snapshot and resume-delta frames.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::{CHANNEL_DEPTH, OrgDelta};
use crate::coord::resume;
use crate::wire::control::PolicyState;
use crate::wire::frame::{self, MAX_RESPONSE_LEN};
use crate::wire::peers;

/// Tombstones of removed devices kept per organization for resuming watchers; past
/// this many they are dropped and the organization's floor moves up (its watchers
/// that were away get a snapshot).
pub(super) const MAX_REMOVED: usize = 100_000;

/// A device as the views hold it.
#[derive(Clone)]
pub(super) struct Held {
    /// Encoded once ([`peers::encode_device`]).
    pub(super) bytes: Arc<[u8]>,
    pub(super) online: bool,
    /// The revision of its last change.
    pub(super) revision: i64,
    /// The revision of its last change of more than its online flag (see
    /// [`crate::coord::resume`]).
    pub(super) content: i64,
}

/// An organization's devices and its watchers' channel.
pub(super) struct OrgView {
    pub(super) devices: BTreeMap<i64, Held>,
    /// The snapshot frame last assembled, while no change of this organization came
    /// after it: (revision, STUN port it names, frame).
    pub(super) shared: Option<(i64, Option<u16>, Bytes)>,
    /// The resume delta last assembled, while no change of this organization came
    /// after it: (from, revision, frame). Nodes that were current together (before a
    /// restart) resume from the same revision and share it.
    pub(super) resumed: Option<(i64, i64, Bytes)>,
    /// Removed devices and the revision they went at (for resuming watchers).
    pub(super) removed: BTreeMap<i64, i64>,
    /// The revision of the policy's last change (the floor if not since it).
    pub(super) policy_changed: i64,
    /// The oldest revision a resuming watcher of this organization can start from.
    pub(super) floor: i64,
    /// The devices whose last state says online (for the metrics).
    pub(super) online: BTreeSet<i64>,
    /// The organization's access policy as watchers are sent it.
    pub(super) policy: Option<PolicyState>,
    pub(super) tx: broadcast::Sender<Arc<OrgDelta>>,
}

impl OrgView {
    /// The view of an organization the views start to hold at `revision`: a watcher
    /// can resume from there on.
    pub(super) fn new_at(revision: i64) -> Self {
        Self {
            floor: revision,
            policy_changed: revision,
            ..Self::new()
        }
    }

    pub(super) fn new() -> Self {
        Self {
            devices: BTreeMap::new(),
            shared: None,
            resumed: None,
            removed: BTreeMap::new(),
            policy_changed: 0,
            floor: 0,
            online: BTreeSet::new(),
            policy: None,
            tx: broadcast::channel(CHANNEL_DEPTH).0,
        }
    }

    /// Sets a device's state (None: removed, at `revision`).
    pub(super) fn set(&mut self, id: i64, device: Option<Held>, revision: i64) {
        self.shared = None;
        self.resumed = None;
        match device {
            Some(held) => {
                if held.online {
                    self.online.insert(id);
                } else {
                    self.online.remove(&id);
                }
                self.removed.remove(&id);
                self.devices.insert(id, held);
            }
            None => {
                self.devices.remove(&id);
                self.online.remove(&id);
                self.removed.insert(id, revision);
                if self.removed.len() > MAX_REMOVED {
                    self.removed.clear();
                    self.floor = self.floor.max(revision);
                }
            }
        }
    }

    /// The policy changed at `revision` (`None`: cleared).
    pub(super) fn set_policy(&mut self, policy: Option<PolicyState>, revision: i64) {
        self.policy = policy;
        self.policy_changed = self.policy_changed.max(revision);
        self.shared = None;
        self.resumed = None;
    }

    /// The delta frame that brings a watcher current from `from` (which
    /// [`resume::decide`] accepted) to the views' `revision`: the shared one if it
    /// starts there and nothing changed since it was assembled. Returns its revision.
    pub(super) fn resume_delta(
        &mut self,
        from: i64,
        revision: i64,
    ) -> (i64, Result<Bytes, frame::FrameError>) {
        if let Some((f, at, frame)) = &self.resumed
            && *f == from
        {
            return (*at, Ok(frame.clone()));
        }
        let mut records: Vec<&[u8]> = Vec::new();
        let mut online = Vec::new();
        for (id, d) in &self.devices {
            match resume::part(from, d.revision, d.content, d.online) {
                resume::Part::Nothing => {}
                resume::Part::Online(on) => online.push((*id, on)),
                resume::Part::Record => records.push(&d.bytes),
            }
        }
        let removed: Vec<i64> = self
            .removed
            .iter()
            .filter(|&(_, r)| *r > from)
            .map(|(id, _)| *id)
            .collect();
        let policy = (self.policy_changed > from).then(|| {
            self.policy.clone().unwrap_or(PolicyState {
                revision: self.policy_changed,
                text: None,
            })
        });
        let frame = peers::delta_frame_encoded(
            revision,
            records.iter().copied(),
            &removed,
            policy.as_ref(),
            &online,
            MAX_RESPONSE_LEN,
        )
        .map(Bytes::from);
        if let Ok(f) = &frame {
            self.resumed = Some((from, revision, f.clone()));
        }
        (revision, frame)
    }
}
/// What a new watcher starts from: the organization's snapshot frame as of
/// `revision`, shared with every watcher that took it at that revision.
pub struct Snapshot {
    pub revision: i64,
    pub frame: Result<Bytes, frame::FrameError>,
}

/// What a resumed watcher starts from ([`Hub::subscribe_resumed`]): its subscription
/// and the delta frame from the revision it named (`from`) to `revision`.
pub struct Resumed {
    pub rx: broadcast::Receiver<Arc<OrgDelta>>,
    pub from: i64,
    pub revision: i64,
    pub frame: Result<Bytes, frame::FrameError>,
}

impl OrgView {
    /// The snapshot frame at `revision`: the shared one if nothing changed since it
    /// was assembled, else assembled now (and shared from now on).
    pub(super) fn snapshot(&mut self, revision: i64, stun_port: Option<u16>) -> Snapshot {
        if let Some((rev, port, frame)) = &self.shared
            && *port == stun_port
        {
            return Snapshot {
                revision: *rev,
                frame: Ok(frame.clone()),
            };
        }
        let frame = peers::snapshot_frame(
            revision,
            stun_port,
            self.policy.as_ref(),
            self.devices.values().map(|d| &d.bytes[..]),
            MAX_RESPONSE_LEN,
        )
        .map(Bytes::from);
        if let Ok(f) = &frame {
            self.shared = Some((revision, stun_port, f.clone()));
        }
        Snapshot { revision, frame }
    }
}
