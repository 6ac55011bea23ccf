//! Pushes committed changes to watch streams.
//!
//! The hub tails the store's change log: right away when this process commits a change
//! (it is poked), and every [`POLL`] to catch changes committed by other processes
//! (admin commands on the same database file). Each batch is grouped by organization,
//! coalesced per device, encoded once as a [`Response::Delta`] frame and broadcast to
//! that organization's watchers, so a change costs what changed plus one write per
//! watcher, whatever the size of the organization.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};

use crate::store::{Change, Store};
use crate::wire::control::{Device, Response};
use crate::wire::frame::{self, MAX_RESPONSE_LEN};

/// How often the change log is checked for changes made by other processes.
pub const POLL: Duration = Duration::from_millis(500);
/// Largest batch read from the change log at once.
const BATCH: usize = 10_000;
/// Deltas a slow watcher may fall behind before it is sent a fresh snapshot.
const CHANNEL_DEPTH: usize = 256;

/// One organization's delta, encoded once for all its watchers.
#[derive(Debug)]
pub struct OrgDelta {
    pub revision: i64,
    pub removed: Vec<i64>,
    pub frame: Vec<u8>,
}

pub struct Hub {
    store: Arc<Mutex<Store>>,
    orgs: Mutex<HashMap<i64, broadcast::Sender<Arc<OrgDelta>>>>,
    poke: Notify,
    /// Open watch streams per device (a reconnecting node briefly has two).
    watches: Mutex<HashMap<i64, usize>>,
}

/// Groups changes by organization; per device the latest state wins.
pub fn group_changes(changes: Vec<Change>) -> BTreeMap<i64, (i64, BTreeMap<i64, Option<Device>>)> {
    let mut out: BTreeMap<i64, (i64, BTreeMap<i64, Option<Device>>)> = BTreeMap::new();
    for c in changes {
        let entry = out.entry(c.organization_id).or_default();
        entry.0 = entry.0.max(c.revision);
        entry.1.insert(c.device_id, c.device);
    }
    out
}

/// Encodes one organization's changes as a delta.
pub fn encode_delta(
    revision: i64,
    devices: BTreeMap<i64, Option<Device>>,
) -> Result<OrgDelta, frame::FrameError> {
    let mut upserts = Vec::new();
    let mut removed = Vec::new();
    for (id, d) in devices {
        match d {
            Some(d) => upserts.push(d),
            None => removed.push(id),
        }
    }
    let frame = frame::to_frame(
        &Response::Delta {
            revision,
            upserts,
            removed: removed.clone(),
        },
        MAX_RESPONSE_LEN,
    )?;
    Ok(OrgDelta {
        revision,
        removed,
        frame,
    })
}

impl Hub {
    pub fn new(store: Arc<Mutex<Store>>) -> Arc<Self> {
        Arc::new(Self {
            store,
            orgs: Mutex::new(HashMap::new()),
            poke: Notify::new(),
            watches: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a new watch stream of a device; true if it is its only one.
    pub fn watch_started(&self, device_id: i64) -> bool {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.entry(device_id).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Counts a watch stream's end; true if the device has none left.
    pub fn watch_ended(&self, device_id: i64) -> bool {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        match w.get_mut(&device_id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                w.remove(&device_id);
                true
            }
        }
    }

    /// Tells the hub a change was committed.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Receives every delta of `organization_id` from now on.
    pub fn subscribe(&self, organization_id: i64) -> broadcast::Receiver<Arc<OrgDelta>> {
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        orgs.entry(organization_id)
            .or_insert_with(|| broadcast::channel(CHANNEL_DEPTH).0)
            .subscribe()
    }

    fn publish(&self, organization_id: i64, delta: Arc<OrgDelta>) {
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = orgs.get(&organization_id)
            && tx.send(delta).is_err()
        {
            // Nobody listens any more.
            orgs.remove(&organization_id);
        }
    }

    /// Runs forever: tails the change log from `revision` and broadcasts deltas.
    pub async fn run(self: Arc<Self>, mut revision: i64) {
        loop {
            tokio::select! {
                () = self.poke.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
            loop {
                let store = self.store.clone();
                let from = revision;
                let read = tokio::task::spawn_blocking(move || {
                    let s = store.lock().unwrap_or_else(|e| e.into_inner());
                    s.changes_since(from, BATCH)
                })
                .await;
                let changes = match read {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "reading the change log failed");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "change log reader panicked");
                        break;
                    }
                };
                let full = changes.len() == BATCH;
                let Some(last) = changes.last().map(|c| c.revision) else {
                    break;
                };
                revision = last;
                for (org, (rev, devices)) in group_changes(changes) {
                    match encode_delta(rev, devices) {
                        Ok(delta) => self.publish(org, Arc::new(delta)),
                        Err(e) => tracing::error!(error = %e, org, "encoding a delta failed"),
                    }
                }
                if !full {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_state_wins_and_orgs_split() {
        let changes = vec![
            Change {
                revision: 1,
                organization_id: 1,
                device_id: 10,
                device: None,
            },
            Change {
                revision: 2,
                organization_id: 2,
                device_id: 20,
                device: None,
            },
            Change {
                revision: 3,
                organization_id: 1,
                device_id: 10,
                device: None,
            },
        ];
        let g = group_changes(changes);
        assert_eq!(g.len(), 2);
        assert_eq!(g[&1].0, 3);
        assert_eq!(g[&1].1.len(), 1);
        let d = encode_delta(3, g[&1].1.clone()).unwrap();
        assert_eq!(d.removed, vec![10]);
        let resp: Response = frame::decode_payload(&d.frame[4..]).unwrap();
        assert!(matches!(resp, Response::Delta { revision: 3, .. }));
    }
}
