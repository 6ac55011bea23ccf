//! The control connection after enrollment: follows the coordinator's watch stream
//! and hands every snapshot and delta to the driver as a [`ControlEvent`], tells
//! the coordinator what the driver asks it to (our NAT mapping), and reconnects
//! with backoff when the connection drops.
//!
//! It holds no node state: the driver owns it. The only decision taken here is
//! that a delta removing this very device ends the node ([`JoinError::Removed`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::client::{ClientError, ControlClient};
use crate::wire::control::{
    Auth, Device, DeviceUpdate, PathKind, PeerPath, PolicyState, Request, Response, ResumeFrom,
};

use super::enroll::{Ctx, instance, relogin};
use super::{JoinError, MAX_BACKOFF};

/// The most a node waits before its first reconnect attempt (see [`jittered`]).
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// A wait between half and all of `base`, by `random`: nodes that lost their
/// coordinator together retry apart, and keep apart as their backoff doubles.
fn jittered(base: Duration, random: u32) -> Duration {
    let frac = f64::from(random) / f64::from(u32::MAX);
    base.mul_f64(0.5 + 0.5 * frac)
}

/// What the control connection tells the driver.
#[derive(Debug)]
pub(super) enum ControlEvent {
    Snapshot {
        devices: Vec<Device>,
        stun_port: Option<u16>,
        /// The coordinator that sent it (STUN goes there too).
        coordinator: SocketAddr,
        /// The organization's access policy (`None`: none).
        policy: Option<PolicyState>,
    },
    Delta {
        upserts: Vec<Device>,
        removed: Vec<i64>,
        /// The organization's policy, when it changed.
        policy: Option<PolicyState>,
        /// Devices that only went online or offline.
        online: Vec<(i64, bool)>,
    },
    /// The coordinator resumed our watch from the revision we named: the peers we
    /// have stay; a delta follows.
    Resumed {
        stun_port: Option<u16>,
        coordinator: SocketAddr,
    },
    /// The coordinator's answer to an update: our record.
    Device(Box<Device>),
    /// The connection dropped; a reconnect is under way.
    Lost,
}

enum WatchEnd {
    Lost(ClientError),
    Removed,
}

/// Runs until this device is removed or forgotten. `updates` carries the latest
/// [`DeviceUpdate`] the driver wants the coordinator to have.
pub(super) async fn run(
    ctx: &Ctx<'_>,
    first: ControlClient,
    auth: Auth,
    events: mpsc::Sender<ControlEvent>,
    mut updates: watch::Receiver<Option<DeviceUpdate>>,
    paths: PathSource,
) -> Result<(), JoinError> {
    let mut client = Some(first);
    let mut backoff = Duration::from_millis(250);
    // Where our view stands, named on every watch so that a reconnect is sent what
    // changed rather than everything (nothing yet: database 0).
    let mut view = ResumeFrom::default();
    loop {
        let c = match client.take() {
            Some(c) => c,
            None => match relogin(ctx, &auth).await? {
                Ok(c) => {
                    tracing::info!("reconnected to the coordinator");
                    backoff = Duration::from_millis(250);
                    c
                }
                Err(e) => {
                    let wait = jittered(backoff, rand::random());
                    tracing::debug!(error = %e, retry_in = ?wait, "coordinator still unreachable");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        // Two halves on one connection; neither cancels the other mid-message.
        let end = tokio::select! {
            end = follow(&c, &auth, &events, &mut view) => end,
            () = push_updates(&c, &auth, &events, &mut updates) => WatchEnd::Lost(ClientError::NoAnswer),
            () = report_paths(&c, &auth, &paths) => WatchEnd::Lost(ClientError::NoAnswer),
        };
        match end {
            WatchEnd::Removed => return Err(JoinError::Removed),
            WatchEnd::Lost(e) => {
                let _ = events.send(ControlEvent::Lost).await;
                // The coordinator's own words ("closed by peer: coordinator shutting
                // down") rather than what the stream saw ("connection lost").
                let error = c
                    .connection()
                    .close_reason()
                    .map_or_else(|| e.to_string(), |r| r.to_string());
                tracing::warn!(%error, "lost the coordinator; tunnels keep running, reconnecting");
                // Every node of a restarted coordinator lost it at the same instant:
                // spread their first attempts over a moment rather than all at once.
                tokio::time::sleep(jittered(FIRST_RETRY, rand::random())).await;
            }
        }
    }
}

/// Reads the watch stream and forwards it to the driver; keeps `view` at what was
/// forwarded.
async fn follow(
    client: &ControlClient,
    auth: &Auth,
    events: &mpsc::Sender<ControlEvent>,
    view: &mut ResumeFrom,
) -> WatchEnd {
    let mut w = match client
        .watch_resuming(auth.clone(), Some(instance()), Some(*view))
        .await
    {
        Ok(w) => w,
        Err(e) => return WatchEnd::Lost(e),
    };
    // The database the stream's revisions belong to (0: the coordinator named none).
    let mut database = 0;
    loop {
        let message = w.next().await;
        // What the driver is sent now moves our view: the database and revision
        // change together (a revision never stays with another database's id).
        let mut at = None;
        let event = match message {
            Ok(Some(Response::Watching {
                database: d,
                resumed,
                stun_port,
            })) => {
                database = d;
                match resumed {
                    Some(revision) => {
                        tracing::info!(from = view.revision, revision, "watch resumed: peers kept");
                        ControlEvent::Resumed {
                            stun_port,
                            coordinator: client.remote_address(),
                        }
                    }
                    None => continue,
                }
            }
            Ok(Some(Response::Snapshot {
                devices,
                revision,
                stun_port,
                policy,
            })) => {
                tracing::info!(revision, devices = devices.len(), "peer snapshot");
                if let Some(me) = devices.iter().find(|d| d.id == auth.device_id) {
                    view.organization_id = me.organization_id;
                }
                at = Some(revision);
                ControlEvent::Snapshot {
                    devices,
                    stun_port,
                    coordinator: client.remote_address(),
                    policy,
                }
            }
            Ok(Some(Response::Delta {
                upserts,
                removed,
                policy,
                online,
                revision,
            })) => {
                if removed.contains(&auth.device_id) {
                    return WatchEnd::Removed;
                }
                at = Some(revision);
                ControlEvent::Delta {
                    upserts,
                    removed,
                    policy,
                    online,
                }
            }
            Ok(Some(other)) => {
                tracing::warn!(?other, "unexpected message on the watch stream");
                continue;
            }
            Ok(None) => return WatchEnd::Lost(ClientError::NoAnswer),
            Err(e) => return WatchEnd::Lost(e),
        };
        if events.send(event).await.is_err() {
            // The driver is gone: the node is shutting down.
            return WatchEnd::Lost(ClientError::NoAnswer);
        }
        if let Some(revision) = at {
            view.database = database;
            view.revision = revision;
        }
    }
}

/// Where path reports come from: the driver's published view and the data path's
/// handshake ages.
pub(super) struct PathSource {
    pub view: watch::Receiver<crate::node::agent::NodeView>,
    pub datapath: std::sync::Arc<super::datapath::DataPath>,
}

/// How often a node tells the coordinator its path to each peer (DESIGN §12).
pub const PATH_REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// The first report after (re)connecting: soon, once handshakes had a moment.
const FIRST_PATH_REPORT: Duration = Duration::from_secs(3);

impl PathSource {
    /// Each peer reached directly or through the relay, with its handshake age.
    async fn report(&self) -> Vec<PeerPath> {
        let dp = self.datapath.status().await;
        let view = self.view.borrow().clone();
        let status = super::status::build(&view, dp.as_ref(), 0, None, Vec::new());
        status
            .peers
            .iter()
            .filter_map(|p| {
                let path = match p.path.as_str() {
                    "direct" => PathKind::Direct,
                    "relay" => PathKind::Relay,
                    _ => return None,
                };
                Some(PeerPath {
                    peer_id: p.id,
                    path,
                    handshake_age: p
                        .last_handshake_secs
                        .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
                })
            })
            .take(crate::wire::control::MAX_PATH_REPORTS)
            .collect()
    }
}

/// Reports our paths on this connection every [`PATH_REPORT_INTERVAL`]; never
/// returns (the watch half notices a lost connection).
async fn report_paths(client: &ControlClient, auth: &Auth, source: &PathSource) {
    let mut wait = FIRST_PATH_REPORT;
    loop {
        tokio::time::sleep(wait).await;
        wait = PATH_REPORT_INTERVAL;
        let req = Request::ReportPaths {
            auth: auth.clone(),
            paths: source.report().await,
        };
        match client.call(&req).await {
            Ok(Response::Ok) => {}
            Ok(other) => tracing::debug!(?other, "path report not taken"),
            Err(e) => tracing::debug!(error = %e, "could not report paths"),
        }
    }
}

/// Sends the coordinator each update the driver publishes; returns when the driver
/// is gone.
async fn push_updates(
    client: &ControlClient,
    auth: &Auth,
    events: &mpsc::Sender<ControlEvent>,
    updates: &mut watch::Receiver<Option<DeviceUpdate>>,
) {
    while updates.changed().await.is_ok() {
        let Some(update) = updates.borrow_and_update().clone() else {
            continue;
        };
        let req = Request::Update {
            auth: auth.clone(),
            update,
        };
        match client.call(&req).await {
            Ok(Response::Device { device }) => {
                if events
                    .send(ControlEvent::Device(Box::new(device)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not report the NAT mapping"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_between_half_and_all() {
        let base = Duration::from_millis(1000);
        assert_eq!(jittered(base, 0), Duration::from_millis(500));
        assert_eq!(jittered(base, u32::MAX), base);
        let mid = jittered(base, u32::MAX / 2);
        assert!(mid > Duration::from_millis(700) && mid < Duration::from_millis(800));
    }
}
