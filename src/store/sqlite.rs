//! The SQLite store: the embedded default.
//!
//! WAL, foreign keys on, one writer at a time (`BEGIN IMMEDIATE`), a busy timeout so
//! admin commands can work on the file while `serve` runs. `schema.sql` is the DDL.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::addrs::{AddrCache, AddrSource, DeviceAddrs};
use super::{
    AdvertisedBy, Change, Organization, Registration, Store, StoreError, apply_update,
    check_advertised, check_new_org, check_register, fail_all, migrate, unmanaged_request,
};
use crate::wire::control::{Device, DeviceUpdate, RegisterRequest};

const DEVICE_COLUMNS: &str = "id, organization_id, public_key, hostname, os, tunnel_ip, \
    tunnel_ip_v6, organization_prefix, organization_prefix_v6, local_ip, local_ip_v6, \
    endpoints, reflexive_endpoint, symmetric_nat, relay, relay_only, ipv6_supported, \
    advertise_cidrs, revision, last_seen, unmanaged, online";

fn corrupt(what: &str, e: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("{what}: {e}").into(),
    )
}

fn parse_col<T: std::str::FromStr>(row: &Row<'_>, idx: usize, what: &str) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.get(idx)?;
    text.parse().map_err(|e| corrupt(what, e))
}

fn parse_opt<T: std::str::FromStr>(
    row: &Row<'_>,
    idx: usize,
    what: &str,
) -> rusqlite::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    let text: Option<String> = row.get(idx)?;
    text.map(|t| t.parse().map_err(|e| corrupt(what, e)))
        .transpose()
}

fn parse_json<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
    what: &str,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| corrupt(what, e))
}

fn device_from_row(row: &Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        id: row.get(0)?,
        organization_id: row.get(1)?,
        public_key: row.get(2)?,
        hostname: row.get(3)?,
        os: row.get(4)?,
        tunnel_ip: parse_col(row, 5, "tunnel_ip")?,
        tunnel_ip_v6: parse_opt(row, 6, "tunnel_ip_v6")?,
        organization_prefix: parse_col(row, 7, "organization_prefix")?,
        organization_prefix_v6: parse_col(row, 8, "organization_prefix_v6")?,
        local_ip: parse_opt(row, 9, "local_ip")?,
        local_ip_v6: parse_opt(row, 10, "local_ip_v6")?,
        endpoints: parse_json(row, 11, "endpoints")?,
        reflexive_endpoint: parse_opt(row, 12, "reflexive_endpoint")?,
        symmetric_nat: row.get(13)?,
        relay: row.get(14)?,
        relay_only: row.get(15)?,
        ipv6_supported: row.get(16)?,
        advertise_cidrs: parse_json(row, 17, "advertise_cidrs")?,
        revision: row.get(18)?,
        last_seen: row.get(19)?,
        unmanaged: row.get(20)?,
        online: row.get(21)?,
    })
}

fn org_from_row(row: &Row<'_>) -> rusqlite::Result<Organization> {
    Ok(Organization {
        id: row.get(0)?,
        name: row.get(1)?,
        ip_cidr: parse_col(row, 2, "ip_cidr")?,
        ip_cidr_v6: parse_col(row, 3, "ip_cidr_v6")?,
    })
}

fn addrs_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<DeviceAddrs> {
    Ok(DeviceAddrs {
        device_id: row.get(at)?,
        organization_id: row.get(at + 1)?,
        v4: parse_col(row, at + 2, "tunnel_ip")?,
        v6: parse_opt(row, at + 3, "tunnel_ip_v6")?,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Appends a change and returns its revision.
fn record_change(
    tx: &Connection,
    organization_id: i64,
    device_id: i64,
    kind: &str,
    now: i64,
) -> rusqlite::Result<i64> {
    tx.execute(
        "INSERT INTO changes (organization_id, device_id, kind, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![organization_id, device_id, kind, now],
    )?;
    Ok(tx.last_insert_rowid())
}

fn load_device(conn: &Connection, id: i64) -> Result<Option<Device>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
    ))?;
    Ok(stmt.query_row([id], device_from_row).optional()?)
}

fn load_org(conn: &Connection, id: i64) -> Result<Organization, StoreError> {
    conn.query_row(
        "SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations WHERE id = ?1",
        [id],
        org_from_row,
    )
    .optional()?
    .ok_or_else(|| StoreError::OrgNotFound(id.to_string()))
}

fn org_devices(conn: &Connection, organization_id: i64) -> Result<Vec<Device>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE organization_id = ?1 ORDER BY id"
    ))?;
    let rows = stmt.query_map([organization_id], device_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The devices of an organization that advertise prefixes.
fn advertisers(conn: &Connection, organization_id: i64) -> Result<Vec<AdvertisedBy>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, hostname, advertise_cidrs FROM devices \
         WHERE organization_id = ?1 AND advertise_cidrs <> '[]' ORDER BY id",
    )?;
    let rows = stmt.query_map([organization_id], |r| {
        Ok(AdvertisedBy {
            device_id: r.get(0)?,
            hostname: r.get(1)?,
            cidrs: parse_json(r, 2, "advertise_cidrs")?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Address reads for [`AddrCache`] inside a transaction.
struct Source<'a>(&'a Connection);

impl AddrSource for Source<'_> {
    fn load_all(&mut self) -> Result<(i64, Vec<DeviceAddrs>), StoreError> {
        let rev = current_revision(self.0)?;
        let mut stmt = self
            .0
            .prepare_cached("SELECT id, organization_id, tunnel_ip, tunnel_ip_v6 FROM devices")?;
        let rows = stmt.query_map([], |r| addrs_from_row(r, 0))?;
        Ok((rev, rows.collect::<Result<_, _>>()?))
    }

    fn changed_since(
        &mut self,
        revision: i64,
        limit: usize,
    ) -> Result<Vec<(i64, i64, Option<DeviceAddrs>)>, StoreError> {
        let mut stmt = self.0.prepare_cached(
            "SELECT c.revision, c.device_id, d.id, d.organization_id, d.tunnel_ip, d.tunnel_ip_v6 \
             FROM changes c LEFT JOIN devices d ON d.id = c.device_id \
             WHERE c.revision > ?1 ORDER BY c.revision LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![revision, limit], |r| {
            let present: Option<i64> = r.get(2)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                present.map(|_| addrs_from_row(r, 2)).transpose()?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn current_revision(conn: &Connection) -> Result<i64, StoreError> {
    Ok(
        conn.query_row("SELECT COALESCE(MAX(revision), 0) FROM changes", [], |r| {
            r.get(0)
        })?,
    )
}

/// The SQLite store.
pub struct SqliteStore {
    pub(crate) conn: Connection,
    addrs: AddrCache,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store, for tests and benchmarks.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate::run(&mut conn)?;
        Ok(Self {
            conn,
            addrs: AddrCache::default(),
        })
    }

    /// One registration inside the batch's transaction. Every refusal comes before
    /// the first write.
    fn register_one(
        tx: &Connection,
        addrs: &mut AddrCache,
        r: &Registration<'_>,
        now: i64,
    ) -> Result<Device, StoreError> {
        check_register(r.req)?;
        let token: Option<(i64, i64, bool, Option<i64>, i64)> = tx
            .prepare_cached(
                "SELECT id, organization_id, reusable, expires_at, uses FROM tokens WHERE secret_hash = ?1",
            )?
            .query_row([r.token_hash], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
            })
            .optional()?;
        let (token_id, org_id, reusable, expires_at, uses) =
            token.ok_or(StoreError::InvalidToken)?;
        if expires_at.is_some_and(|t| t <= now) {
            return Err(StoreError::TokenExpired);
        }
        if !reusable && uses > 0 {
            return Err(StoreError::TokenUsed);
        }
        let id = Self::insert_device(tx, addrs, org_id, r.req, r.credential_hash, false, now)?;
        tx.prepare_cached("UPDATE tokens SET uses = uses + 1 WHERE id = ?1")?
            .execute([token_id])?;
        load_device(tx, id)?.ok_or(StoreError::DeviceNotFound(id))
    }

    /// Allocates both addresses, checks advertised prefixes and inserts a device,
    /// logging the change; returns its id. Runs inside the caller's write transaction.
    fn insert_device(
        tx: &Connection,
        addrs: &mut AddrCache,
        org_id: i64,
        req: &RegisterRequest,
        credential_hash: &str,
        unmanaged: bool,
        now: i64,
    ) -> Result<i64, StoreError> {
        let existing: Option<i64> = tx
            .query_row(
                "SELECT id FROM devices WHERE public_key = ?1",
                [&req.public_key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = existing {
            return Err(StoreError::DuplicateKey(id));
        }
        let org = load_org(tx, org_id)?;
        let (v4, v6) = addrs.allocate(&mut Source(tx), &org, req)?;
        if !req.advertise_cidrs.is_empty() {
            check_advertised(&org, &advertisers(tx, org_id)?, None, &req.advertise_cidrs)?;
        }
        tx.execute(
            "INSERT INTO devices (organization_id, public_key, hostname, os, tunnel_ip, tunnel_ip_v6, \
             organization_prefix, organization_prefix_v6, endpoints, symmetric_nat, relay, relay_only, \
             ipv6_supported, advertise_cidrs, revision, last_seen, created_at, credential_hash, unmanaged) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0, ?15, ?15, ?16, ?17)",
            params![
                org_id,
                req.public_key,
                req.hostname,
                req.os,
                v4.to_string(),
                v6.map(|a| a.to_string()),
                org.ip_cidr.to_string(),
                org.ip_cidr_v6.to_string(),
                to_json(&req.endpoints)?,
                req.symmetric_nat,
                req.relay,
                req.relay_only,
                req.ipv6_supported,
                to_json(&req.advertise_cidrs)?,
                now,
                credential_hash,
                unmanaged,
            ],
        )?;
        let id = tx.last_insert_rowid();
        let revision = record_change(tx, org_id, id, "upsert", now)?;
        tx.execute(
            "UPDATE devices SET revision = ?1 WHERE id = ?2",
            params![revision, id],
        )?;
        Ok(id)
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn current_revision(&mut self) -> Result<i64, StoreError> {
        current_revision(&self.conn)
    }

    fn create_org(
        &mut self,
        name: &str,
        ip_cidr: Ipv4Net,
        ip_cidr_v6: Ipv6Net,
        now: i64,
    ) -> Result<Organization, StoreError> {
        check_new_org(name, ip_cidr, ip_cidr_v6)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT id FROM organizations WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::OrgExists(name.into()));
        }
        tx.execute(
            "INSERT INTO organizations (name, ip_cidr, ip_cidr_v6, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, ip_cidr.to_string(), ip_cidr_v6.to_string(), now],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Organization {
            id,
            name: name.into(),
            ip_cidr,
            ip_cidr_v6,
        })
    }

    fn org_by_name(&mut self, name: &str) -> Result<Organization, StoreError> {
        self.conn
            .query_row(
                "SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations WHERE name = ?1",
                [name],
                org_from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::OrgNotFound(name.into()))
    }

    fn orgs(&mut self) -> Result<Vec<Organization>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations ORDER BY id")?;
        let rows = stmt.query_map([], org_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_token(
        &mut self,
        organization_id: i64,
        secret_hash: &str,
        reusable: bool,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO tokens (organization_id, secret_hash, reusable, expires_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![organization_id, secret_hash, reusable, expires_at, now],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    fn register_devices(
        &mut self,
        batch: &[Registration<'_>],
        now: i64,
    ) -> Vec<Result<Device, StoreError>> {
        let n = batch.len();
        let tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(e) => return fail_all(e.into(), n),
        };
        let mut out = Vec::with_capacity(n);
        for r in batch {
            match Self::register_one(&tx, &mut self.addrs, r, now) {
                // Only the database fails after a registration wrote something.
                Err(e) if e.is_internal() => {
                    drop(tx);
                    self.addrs.clear();
                    return fail_all(e, n);
                }
                result => out.push(result),
            }
        }
        if let Err(e) = tx.commit() {
            // The index saw this transaction's changes.
            self.addrs.clear();
            return fail_all(e.into(), n);
        }
        out
    }

    fn add_unmanaged(
        &mut self,
        organization_id: i64,
        hostname: &str,
        public_key: &str,
        credential_hash: &str,
        now: i64,
    ) -> Result<Device, StoreError> {
        let req = unmanaged_request(hostname, public_key);
        check_register(&req)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        load_org(&tx, organization_id)?;
        let id = Self::insert_device(
            &tx,
            &mut self.addrs,
            organization_id,
            &req,
            credential_hash,
            true,
            now,
        )?;
        let device = load_device(&tx, id)?.ok_or(StoreError::DeviceNotFound(id))?;
        tx.commit()?;
        Ok(device)
    }

    fn authenticate(
        &mut self,
        device_id: i64,
        credential_hash: &str,
    ) -> Result<Device, StoreError> {
        let stored: Option<String> = self
            .conn
            .query_row(
                "SELECT credential_hash FROM devices WHERE id = ?1",
                [device_id],
                |r| r.get(0),
            )
            .optional()?;
        match stored {
            Some(h) if h == credential_hash => {
                load_device(&self.conn, device_id)?.ok_or(StoreError::Unauthorized)
            }
            _ => Err(StoreError::Unauthorized),
        }
    }

    fn login(
        &mut self,
        device_id: i64,
        credential_hash: &str,
        ipv6_supported: Option<bool>,
        now: i64,
    ) -> Result<Device, StoreError> {
        let device = self.authenticate(device_id, credential_hash)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE devices SET last_seen = ?1 WHERE id = ?2",
            params![now, device_id],
        )?;
        if let Some(v6) = ipv6_supported.filter(|&v6| v6 != device.ipv6_supported) {
            let addr = if v6 {
                let org = load_org(&tx, device.organization_id)?;
                Some(self.addrs.allocate_v6(&mut Source(&tx), &org)?.to_string())
            } else {
                None
            };
            let revision = record_change(&tx, device.organization_id, device_id, "upsert", now)?;
            tx.execute(
                "UPDATE devices SET ipv6_supported = ?1, tunnel_ip_v6 = ?2, revision = ?3 WHERE id = ?4",
                params![v6, addr, revision, device_id],
            )?;
        }
        let device = load_device(&tx, device_id)?.ok_or(StoreError::Unauthorized)?;
        tx.commit()?;
        Ok(device)
    }

    fn update_device(
        &mut self,
        device_id: i64,
        update: &DeviceUpdate,
        now: i64,
    ) -> Result<Device, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut d = load_device(&tx, device_id)?.ok_or(StoreError::DeviceNotFound(device_id))?;
        apply_update(&mut d, update)?;
        if let Some(cidrs) = update.advertise_cidrs.as_ref().filter(|c| !c.is_empty()) {
            let org = load_org(&tx, d.organization_id)?;
            let others = advertisers(&tx, d.organization_id)?;
            check_advertised(&org, &others, Some(device_id), cidrs)?;
        }
        let revision = record_change(&tx, d.organization_id, device_id, "upsert", now)?;
        tx.execute(
            "UPDATE devices SET hostname = ?1, endpoints = ?2, reflexive_endpoint = ?3, \
             symmetric_nat = ?4, relay = ?5, relay_only = ?6, advertise_cidrs = ?7, \
             revision = ?8, last_seen = ?9 WHERE id = ?10",
            params![
                d.hostname,
                to_json(&d.endpoints)?,
                d.reflexive_endpoint.map(|e: SocketAddr| e.to_string()),
                d.symmetric_nat,
                d.relay,
                d.relay_only,
                to_json(&d.advertise_cidrs)?,
                revision,
                now,
                device_id
            ],
        )?;
        let d = load_device(&tx, device_id)?.ok_or(StoreError::DeviceNotFound(device_id))?;
        tx.commit()?;
        Ok(d)
    }

    fn set_online(&mut self, device_id: i64, online: bool, now: i64) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<(i64, bool)> = tx
            .query_row(
                "SELECT organization_id, online FROM devices WHERE id = ?1",
                [device_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((org, was)) = current else {
            return Ok(());
        };
        if was != online {
            let revision = record_change(&tx, org, device_id, "upsert", now)?;
            tx.execute(
                "UPDATE devices SET online = ?1, revision = ?2, last_seen = ?3 WHERE id = ?4",
                params![online, revision, now, device_id],
            )?;
        } else {
            tx.execute(
                "UPDATE devices SET last_seen = ?1 WHERE id = ?2",
                params![now, device_id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn reset_online(&mut self, now: i64) -> Result<usize, StoreError> {
        let ids: Vec<i64> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id FROM devices WHERE online = 1")?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for id in &ids {
            self.set_online(*id, false, now)?;
        }
        Ok(ids.len())
    }

    fn remove_device(&mut self, device_id: i64, now: i64) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let org: Option<i64> = tx
            .query_row(
                "SELECT organization_id FROM devices WHERE id = ?1",
                [device_id],
                |r| r.get(0),
            )
            .optional()?;
        let org = org.ok_or(StoreError::DeviceNotFound(device_id))?;
        tx.execute("DELETE FROM devices WHERE id = ?1", [device_id])?;
        record_change(&tx, org, device_id, "remove", now)?;
        tx.commit()?;
        Ok(())
    }

    fn device(&mut self, device_id: i64) -> Result<Option<Device>, StoreError> {
        load_device(&self.conn, device_id)
    }

    fn devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        org_devices(&self.conn, organization_id)
    }

    fn snapshot(&mut self, organization_id: i64) -> Result<(i64, Vec<Device>), StoreError> {
        let tx = self.conn.transaction()?;
        let rev = current_revision(&tx)?;
        let devices = org_devices(&tx, organization_id)?;
        tx.commit()?;
        Ok((rev, devices))
    }

    fn changes_since(&mut self, revision: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT revision, organization_id, device_id FROM changes WHERE revision > ?1 \
             ORDER BY revision LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(i64, i64, i64)> = stmt
            .query_map(params![revision, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (revision, organization_id, device_id) in rows {
            out.push(Change {
                revision,
                organization_id,
                device_id,
                device: load_device(&self.conn, device_id)?,
            });
        }
        Ok(out)
    }
}
