//! The coordinator's persistent state, behind one narrow interface.
//!
//! SQLite (rusqlite, bundled) is the embedded implementation: WAL, foreign keys on, one
//! writer at a time (`BEGIN IMMEDIATE`), a busy timeout so admin commands can work on
//! the file while `serve` runs. `schema.sql` at the repo root is the only DDL source.
//! Every device change appends to the `changes` log in the same transaction; watchers
//! tail that log. Address allocation runs inside the registering transaction, and the
//! schema's UNIQUE constraints back it up: no address is ever live twice.

mod migrate;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use thiserror::Error;

use crate::coord::ipam::{self, Advertiser, IpamError};
use crate::wire::control::{Device, DeviceUpdate, RegisterRequest};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database schema: {0}")]
    Schema(String),
    #[error("invalid join token")]
    InvalidToken,
    #[error("join token has expired")]
    TokenExpired,
    #[error("join token was already used (create a --reusable token to join several devices)")]
    TokenUsed,
    #[error("unknown device or wrong credential")]
    Unauthorized,
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("public key is already registered as device {0}")]
    DuplicateKey(i64),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("organization {0:?} not found")]
    OrgNotFound(String),
    #[error("organization {0:?} already exists")]
    OrgExists(String),
    #[error("device {0} not found")]
    DeviceNotFound(i64),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    pub id: i64,
    pub name: String,
    pub ip_cidr: Ipv4Net,
    pub ip_cidr_v6: Ipv6Net,
}

/// One entry of the change log with the device's state now (`None`: removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: i64,
    pub organization_id: i64,
    pub device_id: i64,
    pub device: Option<Device>,
}

/// Name of the organization created on first start.
pub const DEFAULT_ORG: &str = "default";

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
    Ok(conn
        .query_row(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
            [id],
            device_from_row,
        )
        .optional()?)
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

fn used_addresses(devices: &[Device]) -> HashSet<IpAddr> {
    let mut used = HashSet::with_capacity(devices.len() * 2);
    for d in devices {
        used.insert(IpAddr::V4(d.tunnel_ip));
        if let Some(v6) = d.tunnel_ip_v6 {
            used.insert(IpAddr::V6(v6));
        }
    }
    used
}

fn check_advertised_in_org(
    org: &Organization,
    devices: &[Device],
    self_id: Option<i64>,
    cidrs: &[IpNet],
) -> Result<(), StoreError> {
    let others: Vec<Advertiser<'_>> = devices
        .iter()
        .filter(|d| Some(d.id) != self_id && !d.advertise_cidrs.is_empty())
        .map(|d| Advertiser {
            device_id: d.id,
            hostname: &d.hostname,
            cidrs: &d.advertise_cidrs,
        })
        .collect();
    ipam::check_advertised(cidrs, org.ip_cidr, org.ip_cidr_v6, &others)?;
    Ok(())
}

fn check_hostname(hostname: &str) -> Result<(), StoreError> {
    if hostname.is_empty() || hostname.len() > 253 || hostname.chars().any(char::is_control) {
        return Err(StoreError::Invalid(
            "hostname must be 1 to 253 printable characters".into(),
        ));
    }
    Ok(())
}

/// Allocates both addresses, checks advertised prefixes and inserts a device, logging
/// the change; returns its id. Runs inside the caller's write transaction.
fn insert_device(
    tx: &Connection,
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
    let devices = org_devices(tx, org_id)?;
    let used = used_addresses(&devices);
    let v4 = match ipam::allocate(
        IpNet::V4(org.ip_cidr),
        req.request_ip.map(IpAddr::V4),
        &used,
    )? {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!("a v4 prefix yields v4 addresses"),
    };
    let v6: Option<Ipv6Addr> = if req.ipv6_supported {
        match ipam::allocate(
            IpNet::V6(org.ip_cidr_v6),
            req.request_ip_v6.map(IpAddr::V6),
            &used,
        )? {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => unreachable!("a v6 prefix yields v6 addresses"),
        }
    } else {
        None
    };
    check_advertised_in_org(&org, &devices, None, &req.advertise_cidrs)?;
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

/// The SQLite store.
pub struct Store {
    conn: Connection,
}

impl Store {
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
        Ok(Self { conn })
    }

    /// The highest revision committed so far (0 for an empty log).
    pub fn current_revision(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(revision), 0) FROM changes", [], |r| {
                r.get(0)
            })?)
    }

    pub fn create_org(
        &mut self,
        name: &str,
        ip_cidr: Ipv4Net,
        ip_cidr_v6: Ipv6Net,
        now: i64,
    ) -> Result<Organization, StoreError> {
        if name.is_empty() || name.len() > 64 {
            return Err(StoreError::Invalid(
                "organization name must be 1 to 64 characters".into(),
            ));
        }
        if ip_cidr.trunc() != ip_cidr || ip_cidr_v6.trunc() != ip_cidr_v6 {
            return Err(StoreError::Invalid(format!(
                "organization prefixes must have no host bits set (did you mean {} and {}?)",
                ip_cidr.trunc(),
                ip_cidr_v6.trunc()
            )));
        }
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

    /// Creates the default organization unless it exists; true if it was created.
    pub fn ensure_default_org(&mut self, now: i64) -> Result<bool, StoreError> {
        match self.create_org(
            DEFAULT_ORG,
            ipam::default_org_cidr(),
            ipam::default_org_cidr_v6(),
            now,
        ) {
            Ok(_) => Ok(true),
            Err(StoreError::OrgExists(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn org_by_name(&self, name: &str) -> Result<Organization, StoreError> {
        self.conn
            .query_row(
                "SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations WHERE name = ?1",
                [name],
                org_from_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::OrgNotFound(name.into()))
    }

    pub fn orgs(&self) -> Result<Vec<Organization>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations ORDER BY id")?;
        let rows = stmt.query_map([], org_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a join token by the hash of its secret.
    pub fn create_token(
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

    /// Registers a device with a join token: checks the token, allocates both addresses,
    /// checks advertised prefixes and inserts the device, all in one transaction.
    pub fn register_device(
        &mut self,
        req: &RegisterRequest,
        token_hash: &str,
        credential_hash: &str,
        now: i64,
    ) -> Result<Device, StoreError> {
        check_hostname(&req.hostname)?;
        if req.request_ip_v6.is_some() && !req.ipv6_supported {
            return Err(StoreError::Invalid(
                "an IPv6 address was requested but the device reports no IPv6 support".into(),
            ));
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let token: Option<(i64, i64, bool, Option<i64>, i64)> = tx
            .query_row(
                "SELECT id, organization_id, reusable, expires_at, uses FROM tokens WHERE secret_hash = ?1",
                [token_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let (token_id, org_id, reusable, expires_at, uses) =
            token.ok_or(StoreError::InvalidToken)?;
        if expires_at.is_some_and(|t| t <= now) {
            return Err(StoreError::TokenExpired);
        }
        if !reusable && uses > 0 {
            return Err(StoreError::TokenUsed);
        }
        let id = insert_device(&tx, org_id, req, credential_hash, false, now)?;
        tx.execute(
            "UPDATE tokens SET uses = uses + 1 WHERE id = ?1",
            [token_id],
        )?;
        let device = load_device(&tx, id)?.ok_or(StoreError::DeviceNotFound(id))?;
        tx.commit()?;
        Ok(device)
    }

    /// Registers a device that runs stock WireGuard (admin only, no token): a
    /// relay-only spoke with both addresses, which never logs in.
    pub fn add_unmanaged(
        &mut self,
        organization_id: i64,
        hostname: &str,
        public_key: &str,
        credential_hash: &str,
        now: i64,
    ) -> Result<Device, StoreError> {
        check_hostname(hostname)?;
        let req = RegisterRequest {
            token_secret: String::new(),
            public_key: public_key.into(),
            hostname: hostname.into(),
            os: "wireguard".into(),
            ipv6_supported: true,
            endpoints: Vec::new(),
            advertise_cidrs: Vec::new(),
            relay: false,
            relay_only: true,
            symmetric_nat: false,
            request_ip: None,
            request_ip_v6: None,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        load_org(&tx, organization_id)?;
        let id = insert_device(&tx, organization_id, &req, credential_hash, true, now)?;
        let device = load_device(&tx, id)?.ok_or(StoreError::DeviceNotFound(id))?;
        tx.commit()?;
        Ok(device)
    }

    /// Checks a device credential; returns the device.
    pub fn authenticate(
        &self,
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

    /// Reconnect: checks the credential, refreshes `last_seen` and, if the host's IPv6
    /// support changed, gives or takes the v6 address (a recorded change).
    pub fn login(
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
                let used = used_addresses(&org_devices(&tx, device.organization_id)?);
                match ipam::lowest_free(IpNet::V6(org.ip_cidr_v6), &used)? {
                    IpAddr::V6(a) => Some(a.to_string()),
                    IpAddr::V4(_) => unreachable!("a v6 prefix yields v6 addresses"),
                }
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

    /// Applies a device's change to itself.
    pub fn update_device(
        &mut self,
        device_id: i64,
        update: &DeviceUpdate,
        now: i64,
    ) -> Result<Device, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut d = load_device(&tx, device_id)?.ok_or(StoreError::DeviceNotFound(device_id))?;
        if let Some(h) = &update.hostname {
            check_hostname(h)?;
            d.hostname.clone_from(h);
        }
        if let Some(e) = &update.endpoints {
            if e.len() > 16 {
                return Err(StoreError::Invalid("at most 16 endpoints".into()));
            }
            d.endpoints.clone_from(e);
        }
        if let Some(r) = update.reflexive_endpoint {
            d.reflexive_endpoint = Some(r);
        }
        if let Some(v) = update.symmetric_nat {
            d.symmetric_nat = v;
        }
        if let Some(v) = update.relay {
            d.relay = v;
        }
        if let Some(v) = update.relay_only {
            d.relay_only = v;
        }
        if let Some(cidrs) = &update.advertise_cidrs {
            let org = load_org(&tx, d.organization_id)?;
            let devices = org_devices(&tx, d.organization_id)?;
            check_advertised_in_org(&org, &devices, Some(device_id), cidrs)?;
            d.advertise_cidrs.clone_from(cidrs);
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

    /// Marks a device online or offline; records a change only if it changed.
    pub fn set_online(&mut self, device_id: i64, online: bool, now: i64) -> Result<(), StoreError> {
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

    /// Marks every device offline (a coordinator starting knows of no live watch).
    pub fn reset_online(&mut self, now: i64) -> Result<usize, StoreError> {
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

    /// Removes a device; its addresses return to the pool.
    pub fn remove_device(&mut self, device_id: i64, now: i64) -> Result<(), StoreError> {
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

    pub fn device(&self, device_id: i64) -> Result<Option<Device>, StoreError> {
        load_device(&self.conn, device_id)
    }

    /// Every device of an organization.
    pub fn devices(&self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        org_devices(&self.conn, organization_id)
    }

    /// Every device of an organization and the revision they reflect, read consistently.
    pub fn snapshot(&mut self, organization_id: i64) -> Result<(i64, Vec<Device>), StoreError> {
        let tx = self.conn.transaction()?;
        let rev = tx.query_row("SELECT COALESCE(MAX(revision), 0) FROM changes", [], |r| {
            r.get(0)
        })?;
        let devices = org_devices(&tx, organization_id)?;
        tx.commit()?;
        Ok((rev, devices))
    }

    /// Changes after `revision`, oldest first, at most `limit`, each with the device's
    /// current state.
    pub fn changes_since(&self, revision: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
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

#[cfg(test)]
mod tests;
