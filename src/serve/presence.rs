//! Batches the writes of nodes coming and going: a login (`last_seen`, IPv6 support),
//! a watch stream's claim on its device (which node process, from where) and its
//! start or end (online state).
//!
//! Every reconnecting node makes two of them, and with a durable store each commit is
//! a disk flush (~6 ms on a VM disk): 10,000 nodes reconnecting after a restart would
//! queue two minutes of flushes one after the other. The writer commits whatever
//! arrived while the previous batch was being committed in one transaction
//! ([`Store::presence`]), as the registrar does for registrations: alone, a write is
//! committed at once; under load, the flush is shared.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::hub::Hub;
use super::{SharedStore, unix_now, with_store};
use crate::coord::token::hash_secret;
use crate::store::{Presence, StoreError};
use crate::wire::control::{Auth, Device};

/// Most writes committed together.
const BATCH: usize = 512;

enum Item {
    Login {
        device_id: i64,
        credential_hash: String,
        ipv6_supported: Option<bool>,
        instance: Option<u64>,
    },
    Online {
        device_id: i64,
        online: bool,
    },
    Watch {
        device_id: i64,
        instance: Option<u64>,
        remote: String,
    },
}

pub(super) struct Job {
    item: Item,
    done: oneshot::Sender<Result<Option<Device>, StoreError>>,
}

/// Where the shell sends presence writes.
pub(super) type Presences = mpsc::Sender<Job>;

pub(super) fn channel() -> (Presences, mpsc::Receiver<Job>) {
    mpsc::channel(4 * BATCH)
}

/// Commits presence writes in batches until every sender is gone.
pub(super) async fn writer(store: SharedStore, hub: Arc<Hub>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let n = jobs.len();
        let (items, dones): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.item, j.done)).unzip();
        let now = unix_now();
        let results = with_store(&store, move |s| {
            let batch: Vec<Presence<'_>> = items
                .iter()
                .map(|i| match i {
                    Item::Login {
                        device_id,
                        credential_hash,
                        ipv6_supported,
                        instance,
                    } => Presence::Login {
                        device_id: *device_id,
                        credential_hash,
                        ipv6_supported: *ipv6_supported,
                        instance: *instance,
                    },
                    Item::Online { device_id, online } => Presence::Online {
                        device_id: *device_id,
                        online: *online,
                    },
                    Item::Watch {
                        device_id,
                        instance,
                        remote,
                    } => Presence::Watch {
                        device_id: *device_id,
                        instance: *instance,
                        remote,
                    },
                })
                .collect();
            Ok(s.presence(&batch, now))
        })
        .await
        .unwrap_or_else(|e| {
            let text = e.to_string();
            let mut out = vec![Err(e)];
            out.extend((1..n).map(|_| Err(StoreError::Unavailable(text.clone()))));
            out
        });
        if results.iter().any(Result::is_ok) {
            hub.poke();
        }
        for (done, result) in dones.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }
}

async fn submit(presences: &Presences, item: Item) -> Result<Option<Device>, StoreError> {
    let (done, answer) = oneshot::channel();
    presences
        .send(Job { item, done })
        .await
        .map_err(|_| StoreError::Unavailable("presence writer stopped".into()))?;
    answer
        .await
        .map_err(|_| StoreError::Unavailable("presence write dropped".into()))?
}

/// A reconnect ([`crate::store::Store::login`]), batched.
pub(super) async fn login(
    presences: &Presences,
    auth: &Auth,
    ipv6_supported: Option<bool>,
    instance: Option<u64>,
) -> Result<Device, StoreError> {
    let item = Item::Login {
        device_id: auth.device_id,
        credential_hash: hash_secret(&auth.credential),
        ipv6_supported,
        instance,
    };
    submit(presences, item)
        .await?
        .ok_or(StoreError::Unauthorized)
}

/// A device's online state ([`crate::store::Store::set_online`]), batched.
pub(super) async fn set_online(
    presences: &Presences,
    device_id: i64,
    online: bool,
) -> Result<(), StoreError> {
    submit(presences, Item::Online { device_id, online })
        .await
        .map(|_| ())
}

/// A watch stream begins ([`crate::store::Store::claim_watch`]), batched.
pub(super) async fn claim_watch(
    presences: &Presences,
    device_id: i64,
    instance: Option<u64>,
    remote: std::net::SocketAddr,
) -> Result<(), StoreError> {
    let item = Item::Watch {
        device_id,
        instance,
        remote: remote.to_string(),
    };
    submit(presences, item).await.map(|_| ())
}
