//! The store's queries in PostgreSQL's dialect ([`Tx`] for a connection or a
//! transaction), with each statement prepared once per connection.
//!
//! What differs from SQLite: rows the flows change are locked (`FOR UPDATE`) before
//! the change log is appended to; the log is appended under a table lock with a
//! `pg_notify` (see the module docs of `pg`); a registration batch logs all its
//! devices in one statement; watches are per replica (`cluster_watches`).

use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{GenericClient, Row, Statement};

use super::super::addrs::{AddrChange, DeviceAddrs};
use super::super::flow::Tx;
use super::super::rows::{
    self, Encoded, Param, Row as _, Token, Value, device_columns, select_devices,
};
use super::super::{
    AdminKey, AdvertisedBy, Change, LogEntry, Organization, PathReport, PeerPath, StoreError,
    StoredPolicy, TokenInfo,
};
use super::SESSION_TIMEOUT_SECS;
use super::conn::db_now;
use crate::wire::control::Device;

/// A connection or transaction with this connection's prepared statements: each
/// statement is parsed once per connection, then costs one round trip.
pub(in crate::store) struct Db<'a, C: GenericClient> {
    c: &'a mut C,
    stmts: &'a mut HashMap<&'static str, Statement>,
    /// This process's replica id (its watches).
    replica: &'a str,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl<'a, C: GenericClient> Db<'a, C> {
    pub fn new(
        c: &'a mut C,
        stmts: &'a mut HashMap<&'static str, Statement>,
        replica: &'a str,
    ) -> Self {
        Self { c, stmts, replica }
    }

    fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql)?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    pub fn query(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query(&s, params)?)
    }

    pub fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_opt(&s, params)?)
    }

    pub fn query_one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_one(&s, params)?)
    }

    pub fn execute(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.execute(&s, params)?)
    }

    /// The first column of the one row `sql` returns.
    pub fn value<T: Value>(&mut self, sql: &'static str, p: Params<'_>) -> Result<T, StoreError> {
        self.query_one(sql, p)?.col(0)
    }

    /// The decoded row `sql` returns, if any.
    fn opt<T>(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
        d: Decode<T>,
    ) -> Result<Option<T>, StoreError> {
        self.query_opt(sql, p)?.map(|r| d(&r)).transpose()
    }

    /// Every row `sql` returns, decoded.
    pub fn all<T>(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
        d: Decode<T>,
    ) -> Result<Vec<T>, StoreError> {
        self.query(sql, p)?.iter().map(d).collect()
    }
}

/// A parameter of both drivers, for this one.
fn bind(p: &dyn Param) -> &(dyn ToSql + Sync) {
    p
}

/// Decodes one result row.
type Decode<T> = fn(&Row) -> Result<T, StoreError>;

fn device(row: &Row) -> Result<Device, StoreError> {
    rows::device(row, 0)
}

impl<C: GenericClient> Tx for Db<'_, C> {
    fn current_revision(&mut self) -> Result<i64, StoreError> {
        self.value(
            "SELECT COALESCE(MAX(revision), 0)::BIGINT FROM changes",
            &[],
        )
    }

    fn oldest_revision(&mut self) -> Result<i64, StoreError> {
        self.value(
            "SELECT COALESCE(MIN(revision), 0)::BIGINT FROM changes",
            &[],
        )
    }

    fn lock_addresses(&mut self) -> Result<(), StoreError> {
        /// Arbitrary, fixed: the advisory lock key of address allocation.
        const ADDRESS_LOCK: i64 = 0x6e65_786f_6475_7302;
        self.execute("SELECT pg_advisory_xact_lock($1)", &[&ADDRESS_LOCK])
            .map(drop)
    }

    fn content_changes(&mut self, revision: i64) -> Result<Vec<LogEntry>, StoreError> {
        self.all(
            "SELECT revision, organization_id, device_id, kind = 'remove' FROM changes \
             WHERE revision > $1 AND kind <> 'online' ORDER BY revision",
            &[&revision],
            rows::log_entry,
        )
    }

    fn database_id(&mut self) -> Result<i64, StoreError> {
        self.value("SELECT value FROM database_identity WHERE id = 1", &[])
    }

    fn prune_changes(&mut self, below: i64) -> Result<u64, StoreError> {
        self.execute("DELETE FROM changes WHERE revision < $1", &[&below])
    }

    fn device(&mut self, id: i64) -> Result<Option<Device>, StoreError> {
        const SQL: &str = select_devices!("WHERE id = $1");
        self.opt(SQL, &[&id], device)
    }

    fn lock_device(&mut self, id: i64) -> Result<Option<Device>, StoreError> {
        const SQL: &str = select_devices!("WHERE id = $1 FOR UPDATE");
        self.opt(SQL, &[&id], device)
    }

    fn credential(&mut self, id: i64) -> Result<Option<(String, Device)>, StoreError> {
        const SQL: &str = concat!(
            "SELECT credential_hash, ",
            device_columns!(),
            " FROM devices WHERE id = $1"
        );
        self.opt(SQL, &[&id], rows::credential)
    }

    fn devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        const SQL: &str = select_devices!("WHERE organization_id = $1 ORDER BY id");
        self.all(SQL, &[&organization_id], device)
    }

    fn device_with_key(&mut self, public_key: &str) -> Result<Option<i64>, StoreError> {
        self.opt(
            "SELECT id FROM devices WHERE public_key = $1",
            &[&public_key],
            |r| r.col(0),
        )
    }

    fn org(&mut self, id: i64) -> Result<Option<Organization>, StoreError> {
        self.opt(
            "SELECT id, name, ip_cidr, ip_cidr_v6, domain FROM organizations WHERE id = $1",
            &[&id],
            rows::org,
        )
    }

    fn org_by_name(&mut self, name: &str) -> Result<Option<Organization>, StoreError> {
        self.opt(
            "SELECT id, name, ip_cidr, ip_cidr_v6, domain FROM organizations WHERE name = $1",
            &[&name],
            rows::org,
        )
    }

    fn orgs(&mut self) -> Result<Vec<Organization>, StoreError> {
        self.all(
            "SELECT id, name, ip_cidr, ip_cidr_v6, domain FROM organizations ORDER BY id",
            &[],
            rows::org,
        )
    }

    fn advertisers(&mut self, organization_id: i64) -> Result<Vec<AdvertisedBy>, StoreError> {
        self.all(
            "SELECT id, hostname, advertise_cidrs FROM devices \
             WHERE organization_id = $1 AND advertise_cidrs <> '[]' ORDER BY id",
            &[&organization_id],
            rows::advertised,
        )
    }

    fn changes_since(&mut self, revision: i64, limit: i64) -> Result<Vec<Change>, StoreError> {
        const SQL: &str = concat!(
            "SELECT c.revision, c.organization_id, c.device_id, ",
            device_columns!(d),
            " FROM changes c LEFT JOIN devices d ON d.id = c.device_id \
             WHERE c.revision > $1 ORDER BY c.revision LIMIT $2"
        );
        self.all(SQL, &[&revision, &limit], rows::change)
    }

    fn addrs(&mut self) -> Result<Vec<DeviceAddrs>, StoreError> {
        self.all(
            "SELECT id, organization_id, tunnel_ip, tunnel_ip_v6 FROM devices",
            &[],
            |r| rows::addrs(r, 0),
        )
    }

    fn changed_addrs(&mut self, revision: i64, limit: i64) -> Result<Vec<AddrChange>, StoreError> {
        self.all(
            "SELECT c.revision, c.device_id, d.id, d.organization_id, d.tunnel_ip, d.tunnel_ip_v6 \
             FROM changes c LEFT JOIN devices d ON d.id = c.device_id \
             WHERE c.revision > $1 ORDER BY c.revision LIMIT $2",
            &[&revision, &limit],
            rows::changed_addrs,
        )
    }

    fn insert_org(&mut self, org: &Organization, now: i64) -> Result<i64, StoreError> {
        self.value(
            "INSERT INTO organizations (name, ip_cidr, ip_cidr_v6, created_at, domain) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[
                &org.name,
                &org.ip_cidr.to_string(),
                &org.ip_cidr_v6.to_string(),
                &now,
                &org.domain,
            ],
        )
    }

    fn insert_token(&mut self, t: &Token, secret_hash: &str, now: i64) -> Result<i64, StoreError> {
        self.value(
            "INSERT INTO tokens (organization_id, secret_hash, reusable, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[
                &t.organization_id,
                &secret_hash,
                &t.reusable,
                &t.expires_at,
                &now,
            ],
        )
    }

    fn token(&mut self, secret_hash: &str) -> Result<Option<Token>, StoreError> {
        self.opt(
            "SELECT id, organization_id, reusable, expires_at FROM tokens WHERE secret_hash = $1",
            &[&secret_hash],
            rows::token,
        )
    }

    fn lock_token_uses(&mut self, id: i64) -> Result<i64, StoreError> {
        self.value("SELECT uses FROM tokens WHERE id = $1 FOR UPDATE", &[&id])
    }

    fn spend_token(&mut self, id: i64) -> Result<u64, StoreError> {
        self.execute("UPDATE tokens SET uses = uses + 1 WHERE id = $1", &[&id])
    }

    fn tokens(&mut self, organization_id: i64) -> Result<Vec<TokenInfo>, StoreError> {
        self.all(rows::SELECT_TOKENS, &[&organization_id], rows::token_info)
    }

    fn delete_token(&mut self, id: i64) -> Result<u64, StoreError> {
        self.execute("DELETE FROM tokens WHERE id = $1", &[&id])
    }

    fn insert_admin_key(&mut self, name: &str, hash: &str, now: i64) -> Result<i64, StoreError> {
        self.value(
            "INSERT INTO admin_keys (name, secret_hash, created_at) VALUES ($1, $2, $3) \
             RETURNING id",
            &[&name, &hash, &now],
        )
    }

    fn admin_keys(&mut self) -> Result<Vec<AdminKey>, StoreError> {
        self.all(rows::SELECT_ADMIN_KEYS, &[], rows::admin_key)
    }

    fn revoke_admin_key(&mut self, id: i64, now: i64) -> Result<u64, StoreError> {
        self.execute(rows::REVOKE_ADMIN_KEY, &[&now, &id])
    }

    fn put_path_reports(
        &mut self,
        device_id: i64,
        reports: &[PeerPath],
        now: i64,
    ) -> Result<(), StoreError> {
        self.execute(rows::CLEAR_PATH_REPORTS, &[&device_id])?;
        for r in reports {
            self.execute(
                rows::PUT_PATH_REPORT,
                &[
                    &device_id,
                    &r.peer_id,
                    &r.path.as_str(),
                    &r.handshake_age,
                    &now,
                ],
            )?;
        }
        Ok(())
    }

    fn path_reports(&mut self, organization_id: i64) -> Result<Vec<PathReport>, StoreError> {
        self.all(
            rows::SELECT_PATH_REPORTS,
            &[&organization_id],
            rows::path_report,
        )
    }

    fn insert_device(&mut self, e: &Encoded<'_>, credential_hash: &str) -> Result<i64, StoreError> {
        let params = e.insert_params(&credential_hash).map(bind);
        self.value(rows::INSERT_DEVICE, &params)
    }

    fn update_device(&mut self, e: &Encoded<'_>) -> Result<u64, StoreError> {
        self.execute(rows::UPDATE_DEVICE, &e.update_params().map(bind))
    }

    fn names_like(&mut self, organization_id: i64, base: &str) -> Result<Vec<String>, StoreError> {
        let pattern = format!("{base}-%");
        self.all(
            rows::NAMES_LIKE,
            &[&organization_id, &base, &pattern],
            |r| r.col(0),
        )
    }

    fn name_taken(&mut self, organization_id: i64, name: &str) -> Result<bool, StoreError> {
        let n: i64 = self.value(rows::NAME_TAKEN, &[&organization_id, &name])?;
        Ok(n > 0)
    }

    fn set_name(&mut self, id: i64, name: &str) -> Result<u64, StoreError> {
        self.execute(rows::SET_NAME, &[&name, &id])
    }

    fn unnamed(&mut self) -> Result<Vec<(i64, i64, String)>, StoreError> {
        self.all(rows::UNNAMED, &[], |r| {
            Ok((r.col(0)?, r.col(1)?, r.col(2)?))
        })
    }

    fn touch(&mut self, id: i64, now: i64) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE devices SET last_seen = $1 WHERE id = $2",
            &[&now, &id],
        )
    }

    fn set_ipv6(&mut self, d: &Device) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE devices SET ipv6_supported = $1, tunnel_ip_v6 = $2 WHERE id = $3",
            &[
                &d.ipv6_supported,
                &d.tunnel_ip_v6.map(|a| a.to_string()),
                &d.id,
            ],
        )
    }

    fn lock_online(&mut self, id: i64) -> Result<Option<(i64, bool)>, StoreError> {
        self.opt(
            "SELECT organization_id, online FROM devices WHERE id = $1 FOR UPDATE",
            &[&id],
            |r| Ok((r.col(0)?, r.col(1)?)),
        )
    }

    fn watch(&mut self, id: i64, watching: bool) -> Result<bool, StoreError> {
        let replica = self.replica;
        if watching {
            // Nothing if this replica was expired meanwhile: the heartbeat
            // re-registers it and the caller records its watches again.
            self.execute(
                "INSERT INTO cluster_watches (replica_id, device_id) \
                 SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM cluster_replicas WHERE id = $1) \
                 ON CONFLICT DO NOTHING",
                &[&replica, &id],
            )?;
        } else {
            self.execute(
                "DELETE FROM cluster_watches WHERE replica_id = $1 AND device_id = $2",
                &[&replica, &id],
            )?;
        }
        self.value(
            "SELECT EXISTS (SELECT 1 FROM cluster_watches WHERE device_id = $1)",
            &[&id],
        )
    }

    fn session_elsewhere(&mut self, id: i64, instance: u64) -> Result<Option<String>, StoreError> {
        // A replica silent for SESSION_TIMEOUT_SECS is taken for dead (SIGKILLed):
        // its watches lock nobody out, though it is expired only later.
        const OTHER: &str = concat!(
            "SELECT w.remote FROM cluster_watches w \
             JOIN cluster_replicas r ON r.id = w.replica_id \
             WHERE w.device_id = $1 AND w.replica_id <> $2 \
             AND w.instance IS NOT NULL AND w.instance <> $3 \
             AND r.heartbeat >= ",
            db_now!(),
            " - $4 ORDER BY w.since LIMIT 1"
        );
        let replica = self.replica;
        let instance = instance.cast_signed();
        self.opt(
            OTHER,
            &[&id, &replica, &instance, &SESSION_TIMEOUT_SECS],
            |r| Ok(r.col::<Option<String>>(0)?.unwrap_or_else(|| "?".into())),
        )
    }

    fn claim_watch(
        &mut self,
        id: i64,
        instance: Option<u64>,
        remote: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let replica = self.replica;
        let instance = instance.map(u64::cast_signed);
        if instance.is_some() {
            // The same node process through other replicas: it moved here.
            self.execute(
                "DELETE FROM cluster_watches \
                 WHERE device_id = $1 AND instance = $2 AND replica_id <> $3",
                &[&id, &instance, &replica],
            )?;
        }
        // Nothing if this replica was expired meanwhile (see `watch`).
        self.execute(
            "INSERT INTO cluster_watches (replica_id, device_id, instance, remote, since) \
             SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM cluster_replicas WHERE id = $1) \
             ON CONFLICT (replica_id, device_id) DO UPDATE \
             SET instance = EXCLUDED.instance, remote = EXCLUDED.remote, since = EXCLUDED.since",
            &[&replica, &id, &instance, &remote, &now],
        )?;
        Ok(())
    }

    fn set_online(&mut self, id: i64, online: bool, now: i64) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE devices SET online = $1, last_seen = $2 WHERE id = $3",
            &[&online, &now, &id],
        )
    }

    fn delete_device(&mut self, id: i64) -> Result<Option<i64>, StoreError> {
        self.opt(
            "DELETE FROM devices WHERE id = $1 RETURNING organization_id",
            &[&id],
            |r| r.col(0),
        )
    }

    /// The change is appended under the change-log lock and announced (see the
    /// module docs of `pg`).
    fn record_change(&mut self, org: i64, id: i64, kind: &str, at: i64) -> Result<i64, StoreError> {
        self.execute("LOCK TABLE changes IN EXCLUSIVE MODE", &[])?;
        self.value(
            "INSERT INTO changes (organization_id, device_id, kind, created_at) \
             SELECT $1, $2, $3, $4 FROM (SELECT pg_notify('nexodus_changes', '')) AS n \
             RETURNING revision",
            &[&org, &id, &kind, &at],
        )
    }

    fn lock_devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        const SQL: &str = select_devices!("WHERE organization_id = $1 ORDER BY id FOR UPDATE");
        self.all(SQL, &[&organization_id], device)
    }

    fn set_approved(&mut self, e: &Encoded<'_>) -> Result<u64, StoreError> {
        self.execute(rows::SET_APPROVED, &e.approved_params().map(bind))
    }

    fn policy(&mut self, organization_id: i64) -> Result<Option<StoredPolicy>, StoreError> {
        self.opt(rows::SELECT_POLICY, &[&organization_id], rows::policy)
    }

    fn put_policy(
        &mut self,
        organization_id: i64,
        text: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        self.value(rows::PUT_POLICY, &[&organization_id, &text, &now])
    }

    fn clear_policy(&mut self, organization_id: i64, now: i64) -> Result<u64, StoreError> {
        self.execute(rows::CLEAR_POLICY, &[&now, &organization_id])
    }

    fn set_revision(&mut self, id: i64, revision: i64) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE devices SET revision = $1 WHERE id = $2",
            &[&revision, &id],
        )
    }

    /// One statement for the whole batch: the change-log lock, one revision per
    /// device in order, the revisions stamped; then one read of the devices.
    fn log_new_devices(&mut self, new: &[(i64, i64)], now: i64) -> Result<Vec<Device>, StoreError> {
        const LOAD: &str = select_devices!("WHERE id = ANY($1)");
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let orgs: Vec<i64> = new.iter().map(|&(org, _)| org).collect();
        let ids: Vec<i64> = new.iter().map(|&(_, id)| id).collect();
        self.execute("LOCK TABLE changes IN EXCLUSIVE MODE", &[])?;
        self.execute(
            "WITH n AS (SELECT pg_notify('nexodus_changes', '')), \
             c AS (INSERT INTO changes (organization_id, device_id, kind, created_at) \
                   SELECT u.o, u.d, 'upsert', $3 FROM n, \
                   unnest($1::BIGINT[], $2::BIGINT[]) WITH ORDINALITY AS u(o, d, i) \
                   ORDER BY u.i RETURNING device_id, revision) \
             UPDATE devices SET revision = c.revision FROM c WHERE devices.id = c.device_id",
            &[&orgs, &ids, &now],
        )?;
        self.all(LOAD, &[&ids], device)
    }
}
