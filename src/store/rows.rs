//! Rows of either driver decoded into the store's values, and values encoded into
//! columns, written once for both dialects.
//!
//! Addresses, prefixes and endpoints are stored as text, lists as JSON text. A value
//! that does not parse is [`StoreError::Corrupt`]. No SQL here: each backend keeps its
//! queries (see `sqlite` and `pg`); they select columns in the orders these decoders
//! read.

use std::str::FromStr;

use super::addrs::DeviceAddrs;
use super::{AdvertisedBy, Change, LogEntry, Organization, StoreError, StoredPolicy};
use crate::wire::control::{Approved, Device};

/// The device columns in `Device` order (a macro, so `concat!` can build queries).
macro_rules! device_columns {
    () => {
        "id, organization_id, public_key, hostname, os, tunnel_ip, tunnel_ip_v6, \
         organization_prefix, organization_prefix_v6, local_ip, local_ip_v6, endpoints, \
         reflexive_endpoint, symmetric_nat, relay, relay_only, ipv6_supported, \
         advertise_cidrs, revision, last_seen, unmanaged, online, exit_node, approved_cidrs, \
         relay_approved, exit_approved, name, domain, use_exit, reflexive_endpoint_v6"
    };
    (d) => {
        "d.id, d.organization_id, d.public_key, d.hostname, d.os, d.tunnel_ip, \
         d.tunnel_ip_v6, d.organization_prefix, d.organization_prefix_v6, d.local_ip, \
         d.local_ip_v6, d.endpoints, d.reflexive_endpoint, d.symmetric_nat, d.relay, \
         d.relay_only, d.ipv6_supported, d.advertise_cidrs, d.revision, d.last_seen, \
         d.unmanaged, d.online, d.exit_node, d.approved_cidrs, d.relay_approved, \
         d.exit_approved, d.name, d.domain, d.use_exit, d.reflexive_endpoint_v6"
    };
}
pub(crate) use device_columns;

/// `SELECT` the `device_columns!()` `FROM devices` and the rest of the query.
macro_rules! select_devices {
    ($rest:literal) => {
        concat!("SELECT ", device_columns!(), " FROM devices ", $rest)
    };
}
pub(crate) use select_devices;

/// A column type both drivers read.
pub trait Value: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a> {}
impl Value for i64 {}
impl Value for bool {}
impl Value for String {}
impl Value for Option<i64> {}
impl Value for Option<String> {}

/// One result row, of either driver.
pub trait Row {
    fn col<T: Value>(&self, idx: usize) -> Result<T, StoreError>;
}

impl Row for rusqlite::Row<'_> {
    fn col<T: Value>(&self, idx: usize) -> Result<T, StoreError> {
        Ok(self.get(idx)?)
    }
}

impl Row for postgres::Row {
    fn col<T: Value>(&self, idx: usize) -> Result<T, StoreError> {
        Ok(self.try_get(idx)?)
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn parse<T: FromStr>(row: &impl Row, idx: usize, what: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.col(idx)?;
    text.parse().map_err(|e| corrupt(what, e))
}

fn parse_opt<T: FromStr>(row: &impl Row, idx: usize, what: &str) -> Result<Option<T>, StoreError>
where
    T::Err: std::fmt::Display,
{
    let text: Option<String> = row.col(idx)?;
    text.map(|t| t.parse().map_err(|e| corrupt(what, e)))
        .transpose()
}

fn parse_json<T: serde::de::DeserializeOwned>(
    row: &impl Row,
    idx: usize,
    what: &str,
) -> Result<T, StoreError> {
    let text: String = row.col(idx)?;
    serde_json::from_str(&text).map_err(|e| corrupt(what, e))
}

/// A device from the `device_columns!()` starting at column `at`.
pub fn device(row: &impl Row, at: usize) -> Result<Device, StoreError> {
    Ok(Device {
        id: row.col(at)?,
        organization_id: row.col(at + 1)?,
        public_key: row.col(at + 2)?,
        hostname: row.col(at + 3)?,
        os: row.col(at + 4)?,
        tunnel_ip: parse(row, at + 5, "tunnel_ip")?,
        tunnel_ip_v6: parse_opt(row, at + 6, "tunnel_ip_v6")?,
        organization_prefix: parse(row, at + 7, "organization_prefix")?,
        organization_prefix_v6: parse(row, at + 8, "organization_prefix_v6")?,
        local_ip: parse_opt(row, at + 9, "local_ip")?,
        local_ip_v6: parse_opt(row, at + 10, "local_ip_v6")?,
        endpoints: parse_json(row, at + 11, "endpoints")?,
        reflexive_endpoint: parse_opt(row, at + 12, "reflexive_endpoint")?,
        symmetric_nat: row.col(at + 13)?,
        relay: row.col(at + 14)?,
        relay_only: row.col(at + 15)?,
        ipv6_supported: row.col(at + 16)?,
        advertise_cidrs: parse_json(row, at + 17, "advertise_cidrs")?,
        revision: row.col(at + 18)?,
        last_seen: row.col(at + 19)?,
        unmanaged: row.col(at + 20)?,
        online: row.col(at + 21)?,
        exit_node: row.col(at + 22)?,
        approved: Approved {
            routes: parse_json(row, at + 23, "approved_cidrs")?,
            relay: row.col(at + 24)?,
            exit: row.col(at + 25)?,
        },
        name: row.col(at + 26)?,
        domain: row.col(at + 27)?,
        use_exit: row.col(at + 28)?,
        reflexive_endpoint_v6: parse_opt(row, at + 29, "reflexive_endpoint_v6")?,
    })
}

/// `credential_hash`, then the `device_columns!()`.
pub fn credential(row: &impl Row) -> Result<(String, Device), StoreError> {
    Ok((row.col(0)?, device(row, 1)?))
}

/// `id, name, ip_cidr, ip_cidr_v6, domain`.
pub fn org(row: &impl Row) -> Result<Organization, StoreError> {
    Ok(Organization {
        id: row.col(0)?,
        name: row.col(1)?,
        ip_cidr: parse(row, 2, "ip_cidr")?,
        ip_cidr_v6: parse(row, 3, "ip_cidr_v6")?,
        domain: row.col(4)?,
    })
}

/// `id, hostname, advertise_cidrs`.
pub fn advertised(row: &impl Row) -> Result<AdvertisedBy, StoreError> {
    Ok(AdvertisedBy {
        device_id: row.col(0)?,
        hostname: row.col(1)?,
        cidrs: parse_json(row, 2, "advertise_cidrs")?,
    })
}

/// `c.revision, c.organization_id, c.device_id`, then the `device_columns!(d)` of a
/// LEFT JOIN (NULL: removed).
pub fn change(row: &impl Row) -> Result<Change, StoreError> {
    let present: Option<i64> = row.col(3)?;
    Ok(Change {
        revision: row.col(0)?,
        organization_id: row.col(1)?,
        device_id: row.col(2)?,
        device: present.map(|_| device(row, 3)).transpose()?,
    })
}

/// `revision, organization_id, device_id, kind = 'remove'` of the change log.
pub fn log_entry(row: &impl Row) -> Result<LogEntry, StoreError> {
    Ok(LogEntry {
        revision: row.col(0)?,
        organization_id: row.col(1)?,
        device_id: row.col(2)?,
        removed: row.col(3)?,
    })
}

/// `id, organization_id, tunnel_ip, tunnel_ip_v6` starting at column `at`.
pub fn addrs(row: &impl Row, at: usize) -> Result<DeviceAddrs, StoreError> {
    Ok(DeviceAddrs {
        device_id: row.col(at)?,
        organization_id: row.col(at + 1)?,
        v4: parse(row, at + 2, "tunnel_ip")?,
        v6: parse_opt(row, at + 3, "tunnel_ip_v6")?,
    })
}

/// `c.revision, c.device_id`, then [`addrs`] of a LEFT JOIN (NULL: removed).
pub fn changed_addrs(row: &impl Row) -> Result<(i64, i64, Option<DeviceAddrs>), StoreError> {
    let present: Option<i64> = row.col(2)?;
    Ok((
        row.col(0)?,
        row.col(1)?,
        present.map(|_| addrs(row, 2)).transpose()?,
    ))
}

/// `organization_id, text, revision, updated_at` of `policies`.
pub fn policy(row: &impl Row) -> Result<StoredPolicy, StoreError> {
    Ok(StoredPolicy {
        organization_id: row.col(0)?,
        text: row.col(1)?,
        revision: row.col(2)?,
        updated_at: row.col(3)?,
    })
}

/// An organization's policy (both dialects, as [`INSERT_DEVICE`]).
pub const SELECT_POLICY: &str = "SELECT organization_id, text, revision, updated_at \
    FROM policies WHERE organization_id = $1 AND text IS NOT NULL";

/// Stores an organization's policy: revision 1, or one more than the last one (set or
/// cleared).
pub const PUT_POLICY: &str = "INSERT INTO policies (organization_id, text, revision, updated_at) \
    VALUES ($1, $2, 1, $3) ON CONFLICT (organization_id) DO UPDATE SET text = excluded.text, \
    revision = policies.revision + 1, updated_at = excluded.updated_at RETURNING revision";

/// Clears an organization's policy (`now`, organization; SQLite numbers `$n` in order
/// of appearance, so they appear in order); its revision still counts up (nodes can tell the
/// newest policy from an older one).
pub const CLEAR_POLICY: &str = "UPDATE policies SET text = NULL, revision = revision + 1, \
    updated_at = $1 WHERE organization_id = $2 AND text IS NOT NULL";

/// A join token as stored.
#[derive(Debug, Clone, Copy)]
pub struct Token {
    pub id: i64,
    pub organization_id: i64,
    pub reusable: bool,
    pub expires_at: Option<i64>,
}

/// `id, organization_id, reusable, expires_at`.
pub fn token(row: &impl Row) -> Result<Token, StoreError> {
    Ok(Token {
        id: row.col(0)?,
        organization_id: row.col(1)?,
        reusable: row.col(2)?,
        expires_at: row.col(3)?,
    })
}

/// Inserts a device; returns its id. The same text serves both dialects (SQLite binds
/// `$n` parameters by position, as PostgreSQL does).
pub const INSERT_DEVICE: &str = "INSERT INTO devices (organization_id, public_key, hostname, os, \
    tunnel_ip, tunnel_ip_v6, organization_prefix, organization_prefix_v6, endpoints, symmetric_nat, \
    relay, relay_only, ipv6_supported, advertise_cidrs, revision, last_seen, created_at, \
    credential_hash, unmanaged, exit_node, approved_cidrs, relay_approved, exit_approved, name, \
    domain, local_ip, local_ip_v6) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 0, $15, $15, $16, $17, \
    $18, $19, $20, $21, $22, $23, $24, $25) \
    RETURNING id";

/// Writes an admin's approvals of a device (both dialects).
pub const SET_APPROVED: &str = "UPDATE devices SET approved_cidrs = $1, relay_approved = $2, \
    exit_approved = $3 WHERE id = $4";

/// Writes what a device may change about itself (both dialects, as [`INSERT_DEVICE`]).
pub const UPDATE_DEVICE: &str = "UPDATE devices SET hostname = $1, endpoints = $2, \
    reflexive_endpoint = $3, symmetric_nat = $4, relay = $5, relay_only = $6, advertise_cidrs = $7, \
    revision = $8, last_seen = $9, name = $10, use_exit = $11, local_ip = $12, local_ip_v6 = $13, \
    reflexive_endpoint_v6 = $14 WHERE id = $15";

/// The names taken in an organization that are `$2` or start with `$3` (`$2-%`).
pub const NAMES_LIKE: &str =
    "SELECT name FROM devices WHERE organization_id = $1 AND (name = $2 OR name LIKE $3)";

/// How many devices of an organization have a name (0 or 1: names are unique).
pub const NAME_TAKEN: &str =
    "SELECT COUNT(*) FROM devices WHERE organization_id = $1 AND name = $2";

/// Sets a device's name (both dialects).
pub const SET_NAME: &str = "UPDATE devices SET name = $1 WHERE id = $2";

/// Devices without a name yet (made before names existed), by id.
pub const UNNAMED: &str =
    "SELECT id, organization_id, hostname FROM devices WHERE name = '' ORDER BY id";

/// A query parameter both drivers bind.
pub trait Param: rusqlite::ToSql + postgres::types::ToSql + Sync {}
impl<T: rusqlite::ToSql + postgres::types::ToSql + Sync> Param for T {}

/// A device with its text columns encoded, for either dialect to bind.
pub struct Encoded<'a> {
    pub d: &'a Device,
    pub tunnel_ip: String,
    pub tunnel_ip_v6: Option<String>,
    pub organization_prefix: String,
    pub organization_prefix_v6: String,
    pub endpoints: String,
    pub reflexive_endpoint: Option<String>,
    pub reflexive_endpoint_v6: Option<String>,
    pub local_ip: Option<String>,
    pub local_ip_v6: Option<String>,
    pub advertise_cidrs: String,
    pub approved_cidrs: String,
}

impl<'a> Encoded<'a> {
    pub fn new(d: &'a Device) -> Result<Self, StoreError> {
        Ok(Self {
            d,
            tunnel_ip: d.tunnel_ip.to_string(),
            tunnel_ip_v6: d.tunnel_ip_v6.map(|a| a.to_string()),
            organization_prefix: d.organization_prefix.to_string(),
            organization_prefix_v6: d.organization_prefix_v6.to_string(),
            endpoints: to_json(&d.endpoints)?,
            reflexive_endpoint: d.reflexive_endpoint.map(|e| e.to_string()),
            reflexive_endpoint_v6: d.reflexive_endpoint_v6.map(|e| e.to_string()),
            local_ip: d.local_ip.map(|a| a.to_string()),
            local_ip_v6: d.local_ip_v6.map(|a| a.to_string()),
            advertise_cidrs: to_json(&d.advertise_cidrs)?,
            approved_cidrs: to_json(&d.approved.routes)?,
        })
    }
}

impl Encoded<'_> {
    /// The parameters of [`INSERT_DEVICE`].
    pub fn insert_params<'a>(&'a self, credential_hash: &'a &'a str) -> [&'a dyn Param; 25] {
        let d = self.d;
        [
            &d.organization_id,
            &d.public_key,
            &d.hostname,
            &d.os,
            &self.tunnel_ip,
            &self.tunnel_ip_v6,
            &self.organization_prefix,
            &self.organization_prefix_v6,
            &self.endpoints,
            &d.symmetric_nat,
            &d.relay,
            &d.relay_only,
            &d.ipv6_supported,
            &self.advertise_cidrs,
            &d.last_seen,
            credential_hash,
            &d.unmanaged,
            &d.exit_node,
            &self.approved_cidrs,
            &d.approved.relay,
            &d.approved.exit,
            &d.name,
            &d.domain,
            &self.local_ip,
            &self.local_ip_v6,
        ]
    }

    /// The parameters of [`SET_APPROVED`].
    pub fn approved_params(&self) -> [&dyn Param; 4] {
        let d = self.d;
        [
            &self.approved_cidrs,
            &d.approved.relay,
            &d.approved.exit,
            &d.id,
        ]
    }

    /// The parameters of [`UPDATE_DEVICE`].
    pub fn update_params(&self) -> [&dyn Param; 15] {
        let d = self.d;
        [
            &d.hostname,
            &self.endpoints,
            &self.reflexive_endpoint,
            &d.symmetric_nat,
            &d.relay,
            &d.relay_only,
            &self.advertise_cidrs,
            &d.revision,
            &d.last_seen,
            &d.name,
            &d.use_exit,
            &self.local_ip,
            &self.local_ip_v6,
            &self.reflexive_endpoint_v6,
            &d.id,
        ]
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Lists tokens, newest first: every organization's when the organization is 0.
pub const SELECT_TOKENS: &str = "SELECT id, organization_id, reusable, expires_at, uses, \
    created_at FROM tokens WHERE (CAST($1 AS BIGINT) = 0 OR organization_id = $1) ORDER BY id";

/// `id, organization_id, reusable, expires_at, uses, created_at`.
pub fn token_info(row: &impl Row) -> Result<super::TokenInfo, StoreError> {
    Ok(super::TokenInfo {
        id: row.col(0)?,
        organization_id: row.col(1)?,
        reusable: row.col(2)?,
        expires_at: row.col(3)?,
        uses: row.col(4)?,
        created_at: row.col(5)?,
    })
}

pub const SELECT_ADMIN_KEYS: &str =
    "SELECT id, name, secret_hash, created_at, revoked_at FROM admin_keys ORDER BY id";

/// `id, name, secret_hash, created_at, revoked_at`.
pub fn admin_key(row: &impl Row) -> Result<super::AdminKey, StoreError> {
    Ok(super::AdminKey {
        id: row.col(0)?,
        name: row.col(1)?,
        secret_hash: row.col(2)?,
        created_at: row.col(3)?,
        revoked_at: row.col(4)?,
    })
}

/// Marks a key revoked (`now`, id); a revoked key stays revoked.
pub const REVOKE_ADMIN_KEY: &str =
    "UPDATE admin_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL";

/// Replaces a device's report on one peer (device, peer, path, age, now).
pub const PUT_PATH_REPORT: &str = "INSERT INTO path_reports (device_id, peer_id, path, \
    handshake_age, reported_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device_id, peer_id) \
    DO UPDATE SET path = excluded.path, handshake_age = excluded.handshake_age, \
    reported_at = excluded.reported_at";

/// Forgets a device's reports (before a new set).
pub const CLEAR_PATH_REPORTS: &str = "DELETE FROM path_reports WHERE device_id = $1";

/// An organization's reports, with both devices in it.
pub const SELECT_PATH_REPORTS: &str = "SELECT p.device_id, p.peer_id, p.path, p.handshake_age, \
    p.reported_at FROM path_reports p JOIN devices d ON d.id = p.device_id \
    WHERE d.organization_id = $1 ORDER BY p.device_id, p.peer_id";

/// `device_id, peer_id, path, handshake_age, reported_at`.
pub fn path_report(row: &impl Row) -> Result<super::PathReport, StoreError> {
    Ok(super::PathReport {
        device_id: row.col(0)?,
        peer_id: row.col(1)?,
        path: row.col(2)?,
        handshake_age: row.col(3)?,
        reported_at: row.col(4)?,
    })
}
