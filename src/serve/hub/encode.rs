//! The change log's batches made deltas: changes grouped per organization (the
//! latest state of a device wins), devices encoded once, delta frames built.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use super::OrgDelta;
use crate::store::{Change, POLICY_CHANGE_ID, StoreError, StoredPolicy};
use crate::wire::control::{Device, PolicyState};
use crate::wire::frame::{self, MAX_RESPONSE_LEN};
use crate::wire::peers;

/// Groups changes by organization; per device the latest state wins. A policy
/// change ([`POLICY_CHANGE_ID`]) names no device: it only puts its organization in
/// the batch (the hub reads the policy itself).
pub fn group_changes(changes: Vec<Change>) -> BTreeMap<i64, (i64, BTreeMap<i64, Option<Device>>)> {
    let mut out: BTreeMap<i64, (i64, BTreeMap<i64, Option<Device>>)> = BTreeMap::new();
    for c in changes {
        let entry = out.entry(c.organization_id).or_default();
        entry.0 = entry.0.max(c.revision);
        if c.device_id != POLICY_CHANGE_ID {
            entry.1.insert(c.device_id, c.device);
        }
    }
    out
}

/// The organizations whose policy changed in `changes`.
pub fn policy_changes(changes: &[Change]) -> BTreeSet<i64> {
    changes
        .iter()
        .filter(|c| c.device_id == POLICY_CHANGE_ID)
        .map(|c| c.organization_id)
        .collect()
}

/// What watchers are sent of a stored policy (`None` stored: cleared).
pub(super) fn policy_state(stored: Option<StoredPolicy>) -> Option<PolicyState> {
    stored.map(|p| PolicyState {
        revision: p.revision,
        text: Some(p.text),
    })
}

/// Encodes one organization's changes as a delta.
pub fn encode_delta(
    revision: i64,
    devices: BTreeMap<i64, Option<Device>>,
    policy: Option<PolicyState>,
) -> Result<OrgDelta, frame::FrameError> {
    encode_delta_since(revision, devices, policy, |_| None)
}

/// True when `new` differs from `old` only in being online or not (and the revision
/// and time that change stamped).
pub fn only_presence_changed(old: &Device, new: &Device) -> bool {
    old.online != new.online
        && Device {
            online: new.online,
            last_seen: new.last_seen,
            revision: new.revision,
            ..old.clone()
        } == *new
}

/// [`encode_delta`], given each device as watchers last had it (`previous`): a
/// device that only went online or offline is sent as its id and flag.
pub fn encode_delta_since(
    revision: i64,
    devices: BTreeMap<i64, Option<Device>>,
    policy: Option<PolicyState>,
    previous: impl Fn(i64) -> Option<Device>,
) -> Result<OrgDelta, frame::FrameError> {
    let mut upserts = Vec::new();
    let mut removed = Vec::new();
    let mut online = Vec::new();
    for (id, d) in devices {
        match d {
            Some(d) if previous(id).is_some_and(|old| only_presence_changed(&old, &d)) => {
                online.push((id, d.online));
            }
            Some(d) => upserts.push(d),
            None => removed.push(id),
        }
    }
    let frame = peers::delta_frame(
        revision,
        &upserts,
        &removed,
        policy.as_ref(),
        &online,
        MAX_RESPONSE_LEN,
    )?;
    Ok(OrgDelta {
        revision,
        removed,
        frame: Bytes::from(frame),
        created: std::time::Instant::now(),
        resync: false,
    })
}

pub(super) fn encode_device(d: &Device) -> Result<Arc<[u8]>, StoreError> {
    Ok(Arc::from(peers::device_bytes(d)))
}
