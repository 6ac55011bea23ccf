//! Pushes committed changes to watch streams.
//!
//! The hub tails the store's change log: right away when this process commits a change
//! (it is poked), and every [`POLL`] to catch changes committed by other processes
//! (admin commands on the same database file). With PostgreSQL every commit is also
//! announced (NOTIFY) and [`Hub::listen`] pokes the hub when one arrives, so a change
//! made through any replica reaches this replica's watchers at once; polling is then
//! only a slow fallback ([`FALLBACK_POLL`]). Either way the change log is the only
//! source of deltas. Each batch is grouped by organization, coalesced per device,
//! encoded once as a [`crate::wire::control::Response::Delta`] frame and broadcast to that organization's
//! watchers, so a change costs what changed plus one write per watcher, whatever the
//! size of the organization.
//!
//! The hub also keeps every organization's devices in memory, each already encoded
//! in the compact binary form ([`crate::wire::peers`]), as of the last batch it
//! processed (loaded once at start, then kept by the same batches). A watch stream's
//! snapshot is taken from there together with its subscription, under one lock: no
//! change falls in between. The snapshot frame is assembled once per organization and
//! revision and shared ([`Bytes`]) by every watcher that takes it until the next
//! change of that organization, so thousands of nodes reconnecting at once (a restart,
//! a replica that died) cost one snapshot encoding per batch, not one per watcher.
//!
//! Here: the `Hub` (tailing, views, watchers); `view` what it holds per organization,
//! `encode` batches made deltas.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore, broadcast, watch};

use crate::coord::resume;
use crate::serve::SharedStore;
use crate::serve::metrics::CoordinatorMetrics;
use crate::store::{Change, POLICY_CHANGE_ID, StoreError};
use crate::wire::control::{PolicyState, ResumeFrom};
use crate::wire::peers;

mod encode;
mod view;

pub use encode::{
    encode_delta, encode_delta_since, group_changes, only_presence_changed, policy_changes,
};
use encode::{encode_device, policy_state};
use view::{Held, OrgView};
pub use view::{Resumed, Snapshot};

/// How often the change log is checked for changes made by other processes.
pub const POLL: Duration = Duration::from_millis(200);
/// The same when commits are announced by the database (a safety net only).
pub const FALLBACK_POLL: Duration = Duration::from_secs(10);
/// Wait before listening again after the notification connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
/// Largest batch read from the change log at once.
const BATCH: usize = 10_000;
/// Deltas a slow watcher may fall behind before it is sent a fresh snapshot.
const CHANNEL_DEPTH: usize = 256;
/// Least time between two batches of deltas (see [`Hub::run`]): per watcher held by
/// this process (each batch costs a packet per watcher), between the bounds below. A
/// lone change is never held back.
const COALESCE_PER_WATCHER: Duration = Duration::from_micros(50);
const COALESCE_MIN: Duration = Duration::from_millis(100);
const COALESCE_MAX: Duration = Duration::from_millis(500);
/// Snapshots on their way at once (admission: the coordinator finishes serving the
/// watchers it has before it takes on more; a watcher waiting for a permit is not
/// subscribed yet, and takes the snapshot current when its turn comes). A permit is
/// held until all but [`super::watch::SNAPSHOT_SEND_WINDOW`] bytes of the snapshot
/// were acknowledged, not merely buffered. A stalled watcher holds its permit at most
/// [`super::WRITE_TIMEOUT`] per write.
const SNAPSHOTS_AT_ONCE: usize = 128;

/// One organization's delta, encoded once for all its watchers.
#[derive(Debug)]
pub struct OrgDelta {
    pub revision: i64,
    pub removed: Vec<i64>,
    pub frame: Bytes,
    /// When it was encoded (the fan-out histogram measures from here).
    pub created: std::time::Instant,
    /// No delta: the hub re-read everything (it fell behind the pruned change log);
    /// every watcher is sent a new snapshot instead.
    pub resync: bool,
}

struct State {
    /// The newest revision applied to the views.
    revision: i64,
    /// The database's identity (0 until loaded: no revision is trusted then).
    database: i64,
    orgs: HashMap<i64, OrgView>,
}

pub struct Hub {
    store: SharedStore,
    poll: Duration,
    state: Mutex<State>,
    /// The revision the views are at, for watchers that must wait for their own
    /// change to be applied.
    applied: watch::Sender<i64>,
    poke: Notify,
    snapshots: Semaphore,
    /// Open watch streams per device, oldest first: a new one replaces the others
    /// (they are told to end), so a device holds one, a reconnecting node briefly two.
    watches: Mutex<HashMap<i64, Vec<WatchEntry>>>,
    next_watch: std::sync::atomic::AtomicU64,
    /// Counters of what the shell does (registrations, fan-out latency).
    pub metrics: CoordinatorMetrics,
}

/// A watch stream: its serial number, the signal that ends it, the node process
/// that opened it (its random instance id, if it sent one) and where from.
struct WatchEntry {
    serial: u64,
    end: Arc<Notify>,
    instance: Option<u64>,
    remote: SocketAddr,
}

/// Where a device is already watched from by another node process, if it is: the
/// same credential used by a second live process (a cloned state directory). A
/// stream of the same process (a reconnect) or of a node that sends no instance id
/// is no conflict: the newer stream replaces the older.
fn held_elsewhere(streams: &[WatchEntry], instance: Option<u64>) -> Option<SocketAddr> {
    let mine = instance?;
    streams
        .iter()
        .find(|w| w.instance.is_some_and(|other| other != mine))
        .map(|w| w.remote)
}

/// A watch stream's place among its device's streams (see [`Hub::watch_started`]).
pub struct WatchSlot {
    device_id: i64,
    serial: u64,
    /// Notified when a newer watch stream of the same device started.
    pub replaced: Arc<Notify>,
}

/// One organization's part of a batch, prepared outside the lock.
struct Prepared {
    org: i64,
    /// The batch's newest revision of this organization.
    revision: i64,
    devices: Vec<(i64, Option<Held>)>,
    /// The organization's new policy, if it changed.
    policy: Option<Option<PolicyState>>,
    delta: Option<Arc<OrgDelta>>,
}

impl Hub {
    /// A hub that checks the change log when poked and every `poll`. Call
    /// [`Hub::load`] before serving watchers.
    pub fn new(store: SharedStore, poll: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            poll,
            state: Mutex::new(State {
                revision: 0,
                database: 0,
                orgs: HashMap::new(),
            }),
            applied: watch::channel(0).0,
            poke: Notify::new(),
            snapshots: Semaphore::new(SNAPSHOTS_AT_ONCE),
            watches: Mutex::new(HashMap::new()),
            next_watch: std::sync::atomic::AtomicU64::new(0),
            metrics: CoordinatorMetrics::default(),
        })
    }

    /// Devices and online devices per organization id, as the views hold them now.
    pub fn org_counts(&self) -> BTreeMap<i64, (usize, usize)> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .orgs
            .iter()
            .map(|(id, v)| (*id, (v.devices.len(), v.online.len())))
            .collect()
    }

    /// Watch streams open on this process.
    pub fn watcher_count(&self) -> usize {
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.values().map(Vec::len).sum()
    }

    /// Reads every organization's devices into the views; returns the revision to
    /// tail the change log from. Changes between that revision and the read are
    /// applied again by the first batch, which is harmless: a change carries the
    /// device's state now.
    pub async fn load(&self) -> Result<i64, StoreError> {
        let (revision, database, orgs) = self.read_all().await?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.revision = revision;
        state.database = database;
        state.orgs = orgs;
        drop(state);
        self.applied.send_replace(revision);
        Ok(revision)
    }

    /// Reads everything again after the change log was pruned past the revision the
    /// views are at: keeps every watcher's channel, replaces the devices and tells
    /// every watcher to take a new snapshot. Returns the revision to tail from.
    async fn resync(&self) -> Result<i64, StoreError> {
        let (revision, _, mut fresh) = self.read_all().await?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (id, view) in &mut state.orgs {
            let new = fresh.remove(id).unwrap_or_else(|| OrgView {
                floor: revision,
                policy_changed: revision,
                ..OrgView::new()
            });
            view.devices = new.devices;
            view.shared = None;
            view.resumed = None;
            view.removed = new.removed;
            view.policy_changed = new.policy_changed;
            view.floor = new.floor;
            view.online = new.online;
            view.policy = new.policy;
        }
        state.orgs.extend(fresh);
        state.revision = state.revision.max(revision);
        for view in state.orgs.values() {
            let _ = view.tx.send(Arc::new(OrgDelta {
                revision,
                removed: Vec::new(),
                frame: Bytes::new(),
                created: std::time::Instant::now(),
                resync: true,
            }));
        }
        let applied = state.revision;
        drop(state);
        self.applied.send_replace(applied);
        Ok(revision)
    }

    /// The newest revision, the database's identity, then every organization's
    /// devices (read no earlier), with what resuming watchers need: from the change
    /// log still kept, which revisions changed more than a device's online flag,
    /// which devices went and when the policy changed (see [`crate::coord::resume`]).
    async fn read_all(&self) -> Result<(i64, i64, HashMap<i64, OrgView>), StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
            let revision = s.current_revision()?;
            let database = s.database_id()?;
            let mut orgs = HashMap::new();
            let mut devices = Vec::new();
            for org in s.orgs()? {
                let view = OrgView {
                    policy: policy_state(s.policy(org.id)?),
                    ..OrgView::new()
                };
                orgs.insert(org.id, view);
                devices.extend(s.peer_devices(org.id)?);
            }
            // Read after the devices, so every change they show is in it; the floor
            // is read last: the log kept everything after it while it was read.
            let oldest = s.oldest_revision()?;
            let log = s.content_changes(oldest.saturating_sub(1).max(0))?;
            let oldest = s.oldest_revision()?;
            let floor = if oldest == 0 { revision } else { oldest - 1 };
            let mut content: HashMap<i64, i64> = HashMap::new();
            for e in log.iter().filter(|e| e.revision > floor) {
                if e.device_id == POLICY_CHANGE_ID {
                    if let Some(view) = orgs.get_mut(&e.organization_id) {
                        view.policy_changed = view.policy_changed.max(e.revision);
                    }
                } else if e.removed {
                    if let Some(view) = orgs.get_mut(&e.organization_id) {
                        view.removed.insert(e.device_id, e.revision);
                    }
                } else {
                    content.insert(e.device_id, e.revision);
                }
            }
            for view in orgs.values_mut() {
                view.floor = floor;
                view.policy_changed = view.policy_changed.max(floor);
            }
            for d in devices {
                let held = Held {
                    bytes: encode_device(&d)?,
                    online: d.online,
                    revision: d.revision,
                    // No change but online flips since the floor: the content is as
                    // old as the floor, at most.
                    content: content.get(&d.id).copied().unwrap_or(floor).min(d.revision),
                };
                let view = orgs.entry(d.organization_id).or_insert_with(OrgView::new);
                view.set(d.id, Some(held), d.revision);
            }
            Ok::<_, StoreError>((revision, database, orgs))
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("loading devices: {e}")))?
    }

    /// Counts a new watch stream of a device and tells its older ones to end (one
    /// watch stream per device: the newest wins, so a node that reconnects before
    /// its old connection timed out is served at once). Returns the stream's slot,
    /// or, when another node process (`instance`) holds a stream of this device,
    /// that stream's address: the new one is refused (see [`held_elsewhere`]).
    pub fn watch_started(
        &self,
        device_id: i64,
        instance: Option<u64>,
        remote: SocketAddr,
    ) -> Result<WatchSlot, SocketAddr> {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let streams = w.entry(device_id).or_default();
        if let Some(first) = held_elsewhere(streams, instance) {
            return Err(first);
        }
        let serial = self
            .next_watch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let replaced = Arc::new(Notify::new());
        for older in streams.iter() {
            // A stored permit: the older stream ends even if it is busy writing.
            older.end.notify_one();
        }
        streams.push(WatchEntry {
            serial,
            end: replaced.clone(),
            instance,
            remote,
        });
        Ok(WatchSlot {
            device_id,
            serial,
            replaced,
        })
    }

    /// Where another node process (not `instance`) watches this device from, if one
    /// does on this coordinator.
    pub fn watched_elsewhere(&self, device_id: i64, instance: Option<u64>) -> Option<SocketAddr> {
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        held_elsewhere(w.get(&device_id)?, instance)
    }

    /// Counts a watch stream's end; true if the device has none left.
    pub fn watch_ended(&self, slot: &WatchSlot) -> bool {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let Some(streams) = w.get_mut(&slot.device_id) else {
            return true;
        };
        streams.retain(|w| w.serial != slot.serial);
        if streams.is_empty() {
            w.remove(&slot.device_id);
            true
        } else {
            false
        }
    }

    /// Devices with at least one watch stream on this process, each with the node
    /// process and address of its newest stream.
    pub fn watched(&self) -> Vec<(i64, Option<u64>, SocketAddr)> {
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.iter()
            .filter_map(|(&id, streams)| {
                Some((id, streams.last()?.instance, streams.last()?.remote))
            })
            .collect()
    }

    /// Tells the hub a change was committed.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Waits (at most `limit`) until the views include `revision`, poking the hub.
    pub async fn caught_up(&self, revision: i64, limit: Duration) -> bool {
        if *self.applied.borrow() >= revision {
            return true;
        }
        self.poke();
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Receives every delta of `organization_id` from now on.
    pub fn subscribe(&self, organization_id: i64) -> broadcast::Receiver<Arc<OrgDelta>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let revision = state.revision;
        state
            .orgs
            .entry(organization_id)
            .or_insert_with(|| OrgView::new_at(revision))
            .tx
            .subscribe()
    }

    /// The database's identity as loaded (0 before [`Hub::load`]).
    pub fn database(&self) -> i64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .database
    }

    /// The revision the views are at.
    pub fn revision(&self) -> i64 {
        *self.applied.borrow()
    }

    /// A watcher that named where it stands (`asked`): if the views can bring it
    /// current ([`resume::decide`]), subscribes it and returns the delta that does
    /// (at the same instant: no change falls in between) and its revision; else
    /// why it needs a snapshot.
    pub fn subscribe_resumed(
        &self,
        organization_id: i64,
        asked: Option<&ResumeFrom>,
    ) -> Result<Resumed, resume::Why> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (revision, database) = (state.revision, state.database);
        let view = state
            .orgs
            .entry(organization_id)
            .or_insert_with(|| OrgView::new_at(revision));
        let have = resume::Coverage {
            database,
            organization_id,
            floor: view.floor,
            current: revision,
        };
        match resume::decide(asked, &have) {
            resume::Start::Snapshot(why) => Err(why),
            resume::Start::Resume { from } => {
                let rx = view.tx.subscribe();
                let (revision, frame) = view.resume_delta(from, revision);
                Ok(Resumed {
                    rx,
                    from,
                    revision,
                    frame,
                })
            }
        }
    }

    /// Subscribes to `organization_id` and takes its snapshot at the same instant.
    pub fn subscribe_with_snapshot(
        &self,
        organization_id: i64,
        stun_port: Option<u16>,
    ) -> (broadcast::Receiver<Arc<OrgDelta>>, Snapshot) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let revision = state.revision;
        let view = state
            .orgs
            .entry(organization_id)
            .or_insert_with(|| OrgView::new_at(revision));
        let rx = view.tx.subscribe();
        (rx, view.snapshot(revision, stun_port))
    }

    /// The current snapshot of `organization_id` (a watcher that fell behind).
    pub fn snapshot(&self, organization_id: i64, stun_port: Option<u16>) -> Snapshot {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let revision = state.revision;
        match state.orgs.get_mut(&organization_id) {
            Some(view) => view.snapshot(revision, stun_port),
            None => OrgView::new().snapshot(revision, stun_port),
        }
    }

    /// How long changes gather after a batch (see [`COALESCE_PER_WATCHER`]).
    fn coalesce(&self) -> Duration {
        let watchers: usize = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.orgs.values().map(|v| v.tx.receiver_count()).sum()
        };
        let per = COALESCE_PER_WATCHER.saturating_mul(u32::try_from(watchers).unwrap_or(u32::MAX));
        per.clamp(COALESCE_MIN, COALESCE_MAX)
    }

    /// Bounds the snapshots being written at once ([`SNAPSHOTS_AT_ONCE`]).
    pub async fn snapshot_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.snapshots.acquire().await.ok()
    }

    /// Applies one batch of the change log to the views and broadcasts its deltas.
    /// `policies`: the new policy of each organization whose policy changed in the
    /// batch (`None`: cleared).
    fn apply(
        &self,
        last: i64,
        changes: Vec<Change>,
        mut policies: HashMap<i64, Option<PolicyState>>,
    ) {
        let grouped = group_changes(changes);
        // Each changed device as the watchers have it now (only this task changes
        // the views, so they stay so until the batch is applied below).
        let previous: HashMap<i64, Held> = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            grouped
                .iter()
                .filter_map(|(org, (_, devices))| Some((state.orgs.get(org)?, devices)))
                .flat_map(|(view, devices)| {
                    devices
                        .keys()
                        .filter_map(|id| Some((*id, view.devices.get(id)?.clone())))
                })
                .collect()
        };
        let decoded = |id: i64| {
            previous
                .get(&id)
                .and_then(|h| peers::decode_device(&h.bytes).ok())
        };
        let mut prepared = Vec::new();
        for (org, (rev, devices)) in grouped {
            let policy = policies.remove(&org);
            let mut encoded = Vec::with_capacity(devices.len());
            let mut ok = true;
            for (id, d) in &devices {
                let Some(d) = d else {
                    encoded.push((*id, None));
                    continue;
                };
                match encode_device(d) {
                    Ok(bytes) => {
                        // Only its flag changed: its content is as old as before.
                        let content = match (previous.get(id), decoded(*id)) {
                            (Some(h), Some(old)) if only_presence_changed(&old, d) => {
                                h.content.min(d.revision)
                            }
                            _ => d.revision,
                        };
                        encoded.push((
                            *id,
                            Some(Held {
                                bytes,
                                online: d.online,
                                revision: d.revision,
                                content,
                            }),
                        ));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, org, "encoding a device failed");
                        ok = false;
                    }
                }
            }
            let sent = policy.clone().map(|p| {
                p.unwrap_or(PolicyState {
                    revision: rev,
                    text: None,
                })
            });
            let delta = match encode_delta_since(rev, devices, sent, decoded) {
                Ok(d) if ok => Some(Arc::new(d)),
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, org, "encoding a delta failed");
                    None
                }
            };
            prepared.push(Prepared {
                org,
                revision: rev,
                devices: encoded,
                policy,
                delta,
            });
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = state.revision;
        for p in prepared {
            let view = state
                .orgs
                .entry(p.org)
                .or_insert_with(|| OrgView::new_at(before));
            for (id, d) in p.devices {
                view.set(id, d, p.revision);
            }
            if let Some(policy) = p.policy {
                view.set_policy(policy, p.revision);
            }
            if let Some(delta) = p.delta {
                // An error only means nobody watches this organization now.
                let _ = view.tx.send(delta);
            }
        }
        state.revision = last;
        drop(state);
        self.applied.send_replace(last);
    }

    /// Runs forever: tails the change log from `revision` and broadcasts deltas.
    pub async fn run(self: Arc<Self>, mut revision: i64) {
        let mut last_batch: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = self.poke.notified() => {}
                () = tokio::time::sleep(self.poll) => {}
            }
            // Right after a batch, let changes gather for a moment: under a stream of
            // changes every watcher then gets one frame per COALESCE carrying them all
            // (instead of one per change), while a lone change goes out at once.
            if let Some(at) = last_batch {
                tokio::time::sleep_until(at + self.coalesce()).await;
            }
            last_batch = None;
            loop {
                let store = self.store.clone();
                let from = revision;
                let read = tokio::task::spawn_blocking(move || {
                    let mut s = store.lock().unwrap_or_else(|e| e.into_inner());
                    let changes = s.changes_since(from, BATCH)?;
                    // Read after the changes: a prune in between shows here.
                    let oldest = s.oldest_revision()?;
                    // Read no earlier than the changes: at least as new as they are.
                    let mut policies = HashMap::new();
                    for org in policy_changes(&changes) {
                        policies.insert(org, policy_state(s.policy(org)?));
                    }
                    Ok::<_, StoreError>((changes, oldest, policies))
                })
                .await;
                let changes = match read {
                    Ok(Ok((_, oldest, _))) if oldest > from.saturating_add(1) => {
                        tracing::warn!(
                            from,
                            oldest,
                            "the change log was pruned past this coordinator's last \
                             revision; reading every device again"
                        );
                        match self.resync().await {
                            Ok(r) => revision = r,
                            Err(e) => tracing::error!(error = %e, "re-reading devices failed"),
                        }
                        last_batch = Some(tokio::time::Instant::now());
                        break;
                    }
                    Ok(Ok((c, _, p))) => (c, p),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "reading the change log failed");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "change log reader panicked");
                        break;
                    }
                };
                let (changes, policies) = changes;
                let full = changes.len() == BATCH;
                let Some(last) = changes.last().map(|c| c.revision) else {
                    break;
                };
                revision = last;
                self.apply(last, changes, policies);
                last_batch = Some(tokio::time::Instant::now());
                if !full {
                    break;
                }
            }
        }
    }

    /// Runs forever: holds a PostgreSQL connection that LISTENs on the change channel
    /// and pokes the hub for every notification (and once after each (re)connect, for
    /// commits made while it was away).
    pub async fn listen(self: Arc<Self>, config: crate::store::pg::PgConfig) {
        let mut logged = false;
        loop {
            match self.listen_once(&config).await {
                Ok(()) => tracing::warn!("change notifications ended; listening again"),
                Err(e) if !logged => {
                    tracing::warn!(error = ?e, "change notifications lost; listening again");
                    logged = true;
                }
                Err(e) => tracing::debug!(error = ?e, "listening for changes failed"),
            }
            tokio::time::sleep(LISTEN_RETRY).await;
        }
    }

    async fn listen_once(
        self: &Arc<Self>,
        config: &crate::store::pg::PgConfig,
    ) -> Result<(), tokio_postgres::Error> {
        use tokio_postgres::AsyncMessage;
        tracing::debug!("connecting for change notifications");
        let (client, mut conn) = config.pg.connect(config.tls.connector()).await?;
        tracing::debug!("connected for change notifications");
        let hub = self.clone();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(_))) => hub.poke(),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", crate::store::pg::CHANNEL))
            .await?;
        tracing::info!("listening for changes committed by any replica");
        self.poke();
        let end = driver.await;
        drop(client);
        match end {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "notification task failed");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::{Device, Response};
    use crate::wire::frame::{self, MAX_RESPONSE_LEN};

    #[test]
    fn a_second_node_process_is_refused_a_reconnect_replaces() {
        let entry = |serial, instance| WatchEntry {
            serial,
            end: Arc::new(Notify::new()),
            instance,
            remote: format!("192.0.2.{serial}:5000").parse().unwrap(),
        };
        let first: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let streams = vec![entry(1, Some(7))];
        // The same process reconnecting: no conflict (it replaces its old stream).
        assert_eq!(held_elsewhere(&streams, Some(7)), None);
        // Another process with the same credential: refused, naming the first.
        assert_eq!(held_elsewhere(&streams, Some(8)), Some(first));
        // Nodes that send no instance id (older versions) replace as before.
        assert_eq!(held_elsewhere(&streams, None), None);
        assert_eq!(held_elsewhere(&[entry(1, None)], Some(8)), None);
        assert_eq!(held_elsewhere(&[], Some(8)), None);
    }

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
        let d = encode_delta(3, g[&1].1.clone(), None).unwrap();
        assert_eq!(d.removed, vec![10]);
        let resp: Response = frame::decode_payload(&d.frame[4..]).unwrap();
        assert!(matches!(resp, Response::Delta { revision: 3, .. }));
    }

    fn device(id: i64) -> Device {
        Device {
            use_exit: None,
            id,
            organization_id: 1,
            public_key: format!("key{id}"),
            hostname: format!("h\"{id}\u{e9}"),
            os: "linux".into(),
            tunnel_ip: "100.64.0.1".parse().unwrap(),
            tunnel_ip_v6: (id % 2 == 0).then(|| "200::1".parse().unwrap()),
            organization_prefix: "100.64.0.0/10".parse().unwrap(),
            organization_prefix_v6: "200::/64".parse().unwrap(),
            local_ip: None,
            local_ip_v6: None,
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            reflexive_endpoint: None,
            reflexive_endpoint_v6: None,
            symmetric_nat: false,
            relay: id == 1,
            relay_only: false,
            ipv6_supported: true,
            advertise_cidrs: vec!["198.51.100.0/24".parse().unwrap()],
            revision: id,
            last_seen: 5,
            unmanaged: false,
            online: true,
            exit_node: false,
            approved: Default::default(),
            name: String::new(),
            domain: String::new(),
        }
    }

    /// A device as the views hold it, its content last changed at `content`.
    fn held(d: &Device, content: i64) -> Held {
        Held {
            bytes: encode_device(d).unwrap(),
            online: d.online,
            revision: d.revision,
            content,
        }
    }

    /// The delta a resumed watcher gets from the views: the devices changed since
    /// its revision (whole, or their flag when only that changed), removals and the
    /// policy after it; shared while nothing changes.
    #[test]
    fn a_resume_delta_carries_what_changed_since() {
        let mut view = OrgView::new_at(10);
        let dev = |id: i64, revision: i64, online: bool| Device {
            revision,
            online,
            ..device(id)
        };
        // 1: untouched since 20; 2: only its flag changed at 40; 3: its record at
        // 45; 4: removed at 50 and 5 at 15 (before the watcher's revision).
        view.set(1, Some(held(&dev(1, 20, true), 20)), 20);
        view.set(2, Some(held(&dev(2, 40, false), 20)), 40);
        view.set(3, Some(held(&dev(3, 45, true), 45)), 45);
        view.set(4, None, 50);
        view.set(5, None, 15);
        view.set_policy(None, 12);
        let (revision, frame) = view.resume_delta(30, 60);
        let frame = frame.unwrap();
        assert_eq!(revision, 60);
        match frame::decode_payload::<Response>(&frame[4..]).unwrap() {
            Response::Delta {
                revision,
                upserts,
                removed,
                policy,
                online,
            } => {
                assert_eq!(revision, 60);
                assert_eq!(upserts, vec![dev(3, 45, true)]);
                assert_eq!(removed, vec![4]);
                assert_eq!(online, vec![(2, false)]);
                assert_eq!(policy, None, "the policy changed before 30");
            }
            other => panic!("{other:?}"),
        }
        // The same start shares the frame; a change makes it anew.
        let (_, again) = view.resume_delta(30, 61);
        assert_eq!(again.unwrap().as_ptr(), frame.as_ptr());
        view.set_policy(None, 62);
        let (revision, newer) = view.resume_delta(30, 62);
        assert_eq!(revision, 62);
        match frame::decode_payload::<Response>(&newer.unwrap()[4..]).unwrap() {
            Response::Delta { policy, .. } => assert_eq!(
                policy,
                Some(PolicyState {
                    revision: 62,
                    text: None
                })
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn assembled_snapshot_is_the_serialized_snapshot() {
        let policy = PolicyState {
            revision: 2,
            text: Some("[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\n".into()),
        };
        for (devices, stun_port, policy) in [
            (
                vec![device(1), device(2), device(3)],
                Some(3478),
                Some(policy),
            ),
            (vec![], None, None),
        ] {
            let mut view = OrgView::new();
            for d in &devices {
                view.set(d.id, Some(held(d, d.revision)), d.revision);
            }
            view.policy = policy.clone();
            let bytes = view.snapshot(7, stun_port).frame.unwrap();
            let (_, used) = frame::decode(&bytes, MAX_RESPONSE_LEN).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            let resp: Response = frame::decode_payload(&bytes[4..]).unwrap();
            assert_eq!(
                resp,
                Response::Snapshot {
                    revision: 7,
                    devices,
                    stun_port,
                    policy,
                }
            );
        }
    }

    /// Watchers taking a snapshot between two changes share one frame (the same
    /// bytes, not a copy); a change of the organization makes the next one anew.
    #[test]
    fn watchers_share_one_snapshot_per_revision() {
        let mut view = OrgView::new();
        for id in 1..=3 {
            view.set(id, Some(held(&device(id), id)), id);
        }
        let a = view.snapshot(7, Some(1));
        let b = view.snapshot(9, Some(1));
        let (fa, fb) = (a.frame.unwrap(), b.frame.unwrap());
        assert_eq!(fa.as_ptr(), fb.as_ptr(), "one frame, shared");
        // The shared frame keeps the revision it was made at: nothing of this
        // organization changed since, so the deltas after it are the same.
        assert_eq!((a.revision, b.revision), (7, 7));
        view.set(2, None, 10);
        let c = view.snapshot(10, Some(1));
        let fc = c.frame.unwrap();
        assert_ne!(fc.as_ptr(), fa.as_ptr());
        assert_eq!(c.revision, 10);
        match frame::decode_payload::<Response>(&fc[4..]).unwrap() {
            Response::Snapshot { devices, .. } => {
                assert_eq!(devices.iter().map(|d| d.id).collect::<Vec<_>>(), [1, 3]);
            }
            other => panic!("{other:?}"),
        }
        // Another STUN port (another listener) is another frame.
        let d = view.snapshot(11, None);
        assert_eq!(d.revision, 11);
    }
}
