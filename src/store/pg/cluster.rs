//! What the replicas on one database share: the TLS identity (a row of
//! `cluster_identity`, made by the first replica), and who is alive. Each replica
//! heartbeats in `cluster_replicas`; one silent for [`REPLICA_TIMEOUT_SECS`] is
//! dropped with its `cluster_watches` rows, and the devices nobody watches any more
//! go offline.

use postgres::Transaction;

use super::super::flow::{ONLINE, Tx};
use super::super::rows::Row as _;
use super::super::{ClusterIdentity, IdentityDer, StoreError};
use super::conn::db_now;
use super::sql::Db;
use super::{PgStore, REPLICA_TIMEOUT_SECS};

const IDENTITY: &str = "SELECT cert_der, key_der FROM cluster_identity WHERE id = 1";

/// This replica's row (again, if it had been expired).
const REGISTER: &str = concat!(
    "INSERT INTO cluster_replicas (id, started_at, heartbeat) VALUES ($1, ",
    db_now!(),
    ", ",
    db_now!(),
    ") ON CONFLICT (id) DO NOTHING"
);

fn identity_der(row: &postgres::Row) -> Result<IdentityDer, StoreError> {
    Ok((row.try_get(0)?, row.try_get(1)?))
}

impl ClusterIdentity for PgStore {
    fn identity(&mut self) -> Result<Option<IdentityDer>, StoreError> {
        self.read_plain(|db| {
            db.query_opt(IDENTITY, &[])?
                .map(|r| identity_der(&r))
                .transpose()
        })
    }

    fn insert_identity(
        &mut self,
        cert: &[u8],
        key: &[u8],
        now: i64,
    ) -> Result<IdentityDer, StoreError> {
        self.write_tx(|db, _| {
            db.execute(
                "INSERT INTO cluster_identity (id, cert_der, key_der, created_at) \
                 VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
                &[&cert, &key, &now],
            )?;
            identity_der(&db.query_one(IDENTITY, &[])?)
        })
    }
}

impl PgStore {
    /// Registers this replica (see [`super::super::Store::reset_online`]).
    pub(super) fn start_replica(&mut self) -> Result<(), StoreError> {
        let replica = self.replica.clone();
        self.write_tx(|db, _| {
            db.execute(REGISTER, &[&replica])?;
            Ok(())
        })
    }

    /// This replica stops: its watch rows stay (their devices online until they
    /// reconnect elsewhere or it expires) but name no node process any more (see
    /// [`super::super::Store::leave`]).
    pub(super) fn release_sessions(&mut self) -> Result<(), StoreError> {
        let replica = self.replica.clone();
        self.write_tx(|db, _| {
            db.execute(
                "UPDATE cluster_watches SET instance = NULL WHERE replica_id = $1",
                &[&replica],
            )?;
            Ok(())
        })
    }

    /// Proves this replica alive and expires dead ones (see
    /// [`super::super::Store::heartbeat`]); true if it had itself been expired.
    pub(super) fn beat(&mut self) -> Result<bool, StoreError> {
        const BEAT: &str = concat!(
            "UPDATE cluster_replicas SET heartbeat = ",
            db_now!(),
            " WHERE id = $1"
        );
        let replica = self.replica.clone();
        let revived = self.write_tx(|db, _| {
            if db.execute(BEAT, &[&replica])? == 1 {
                return Ok(false);
            }
            db.execute(REGISTER, &[&replica])?;
            Ok(true)
        })?;
        if revived {
            tracing::warn!(
                replica = %self.replica,
                "this replica had been presumed dead (no heartbeat); recording its watches again"
            );
        }
        let now: i64 = self.read_plain(|db| db.value(concat!("SELECT ", db_now!()), &[]))?;
        self.expire_replicas(now)?;
        Ok(revived)
    }

    /// Drops replicas whose heartbeat is older than [`REPLICA_TIMEOUT_SECS`] with
    /// their watches; returns how many devices went offline.
    pub(super) fn expire_replicas(&mut self, now: i64) -> Result<usize, StoreError> {
        const DEAD: &str = concat!(
            "SELECT id FROM cluster_replicas WHERE heartbeat < ",
            db_now!(),
            " - $1"
        );
        // Claim it: a replica expiring it at the same time finds nothing.
        const CLAIM: &str = concat!(
            "DELETE FROM cluster_replicas WHERE id = $1 AND heartbeat < ",
            db_now!(),
            " - $2 RETURNING id"
        );
        let dead: Vec<String> =
            self.read_plain(|db| db.all(DEAD, &[&REPLICA_TIMEOUT_SECS], |r| r.col(0)))?;
        let mut offline = 0;
        for replica in dead {
            offline += self.write_tx(|db, _| {
                if db
                    .query_opt(CLAIM, &[&replica, &REPLICA_TIMEOUT_SECS])?
                    .is_none()
                {
                    return Ok(0);
                }
                // Its watch rows went with it (ON DELETE CASCADE): find their devices.
                let ids: Vec<i64> = db.all(
                    "SELECT id FROM devices d WHERE online \
                     AND NOT EXISTS (SELECT 1 FROM cluster_watches w WHERE w.device_id = d.id)",
                    &[],
                    |r| r.col(0),
                )?;
                offline_unwatched(db, ids, now)
            })?;
            tracing::info!(%replica, "coordinator replica stopped heartbeating; dropped its watches");
        }
        Ok(offline)
    }
}

/// Marks the given devices offline where no replica watches them any more (their
/// rows are locked in id order first), logging each change.
fn offline_unwatched(
    db: &mut Db<'_, Transaction<'_>>,
    mut ids: Vec<i64>,
    now: i64,
) -> Result<usize, StoreError> {
    ids.sort_unstable();
    ids.dedup();
    let mut gone = Vec::new();
    for id in ids {
        let Some(r) = db.query_opt(
            "SELECT organization_id FROM devices d WHERE id = $1 AND online \
             AND NOT EXISTS (SELECT 1 FROM cluster_watches w WHERE w.device_id = d.id) \
             FOR UPDATE",
            &[&id],
        )?
        else {
            continue;
        };
        let org: i64 = r.try_get(0)?;
        db.execute("UPDATE devices SET online = FALSE WHERE id = $1", &[&id])?;
        gone.push((org, id));
    }
    for &(org, id) in &gone {
        let revision = db.record_change(org, id, ONLINE, now)?;
        db.set_revision(id, revision)?;
    }
    Ok(gone.len())
}
