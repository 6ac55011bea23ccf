//! The PostgreSQL store: several coordinator replicas on one database.
//!
//! Same semantics as [`super::SqliteStore`], with what concurrency across processes
//! needs:
//!
//! - **Ordered change log.** Revisions come from an identity column, and a sequence
//!   hands out numbers in call order, not commit order. So every change is appended
//!   under `LOCK TABLE changes IN EXCLUSIVE MODE` (plain reads are not blocked), held to
//!   commit: revisions become visible in order and tailing `revision > last` misses
//!   nothing. The lock is taken last, after every row the transaction touches is
//!   locked, so lock holders wait for nobody and cannot deadlock.
//! - **Notifications.** The same transaction runs `pg_notify('nexodus_changes')`,
//!   delivered at commit to every replica's hub (see `serve::hub`), which then tails the
//!   log: a change reaches watchers on every replica without polling.
//! - **Conflicts retry.** Transactions run at READ COMMITTED; two replicas allocating
//!   the same address collide on the UNIQUE constraints, and the loser's transaction is
//!   retried from the start (as are serialization failures and deadlocks). Single-use
//!   tokens are locked (`FOR UPDATE`) before they are checked.
//! - **Reconnects.** A lost connection (database restarted) is reopened and the
//!   transaction retried, unless it was lost during COMMIT (the outcome is unknown;
//!   the error goes to the caller).
//! - **Online state across replicas.** `cluster_watches` has a row per (replica,
//!   device) while that replica holds a watch stream of the device; replicas heartbeat
//!   in `cluster_replicas` and expire each other after [`REPLICA_TIMEOUT_SECS`].
//!
//! The connection is plain TCP (`NoTls`): run the database on the same host or a
//! trusted network. Errors never panic; a value that does not parse is `Corrupt`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, IsolationLevel, NoTls, Row, Statement, Transaction};
use rand::RngCore;

use super::addrs::{AddrCache, AddrSource, DeviceAddrs};
use super::{
    AdvertisedBy, Change, Organization, Registration, Store, StoreError, apply_update,
    check_advertised, check_new_org, check_register, fail_all, migrate, unmanaged_request,
};
use crate::wire::control::{Device, DeviceUpdate, RegisterRequest};

/// The channel every change is announced on.
pub const CHANNEL: &str = "nexodus_changes";
/// A replica whose heartbeat is older than this is presumed dead: its watches go.
pub const REPLICA_TIMEOUT_SECS: i64 = 30;
/// Attempts of one transaction (conflicts, lost connections) before giving up.
const ATTEMPTS: u32 = 10;

/// The device columns in `Device` order (a macro, so `concat!` can build queries).
macro_rules! device_columns {
    () => {
        "id, organization_id, public_key, hostname, os, tunnel_ip, tunnel_ip_v6, \
         organization_prefix, organization_prefix_v6, local_ip, local_ip_v6, endpoints, \
         reflexive_endpoint, symmetric_nat, relay, relay_only, ipv6_supported, \
         advertise_cidrs, revision, last_seen, unmanaged, online"
    };
    (d) => {
        "d.id, d.organization_id, d.public_key, d.hostname, d.os, d.tunnel_ip, \
         d.tunnel_ip_v6, d.organization_prefix, d.organization_prefix_v6, d.local_ip, \
         d.local_ip_v6, d.endpoints, d.reflexive_endpoint, d.symmetric_nat, d.relay, \
         d.relay_only, d.ipv6_supported, d.advertise_cidrs, d.revision, d.last_seen, \
         d.unmanaged, d.online"
    };
}

/// The database's clock, unix seconds (heartbeats do not trust replicas' clocks).
macro_rules! db_now {
    () => {
        "EXTRACT(EPOCH FROM now())::BIGINT"
    };
}

/// A URL or connection string without its password, for logs.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    // postgres://user:secret@host/db
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        if let Some(at) = out[rest..].find('@').map(|i| i + rest)
            && let Some(colon) = out[rest..at].find(':').map(|i| i + rest)
        {
            out.replace_range(colon + 1..at, "***");
        }
    }
    // key=value form: password=secret
    if let Some(i) = out.find("password=") {
        let start = i + "password=".len();
        let end = out[start..]
            .find(char::is_whitespace)
            .map_or(out.len(), |e| e + start);
        out.replace_range(start..end, "***");
    }
    out
}

/// Parses a connection URL and fills in what a coordinator needs: a connect timeout,
/// TCP keepalives (to notice a dead database host), an application name.
pub fn parse_config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(StoreError::Postgres)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name("nexodus");
    }
    config.keepalives_idle(Duration::from_secs(10));
    Ok(config)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn parse_col<T: std::str::FromStr>(row: &Row, idx: usize, what: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    let text: String = row.try_get(idx)?;
    text.parse().map_err(|e| corrupt(what, e))
}

fn parse_opt<T: std::str::FromStr>(
    row: &Row,
    idx: usize,
    what: &str,
) -> Result<Option<T>, StoreError>
where
    T::Err: std::fmt::Display,
{
    let text: Option<String> = row.try_get(idx)?;
    text.map(|t| t.parse().map_err(|e| corrupt(what, e)))
        .transpose()
}

fn parse_json<T: serde::de::DeserializeOwned>(
    row: &Row,
    idx: usize,
    what: &str,
) -> Result<T, StoreError> {
    let text: String = row.try_get(idx)?;
    serde_json::from_str(&text).map_err(|e| corrupt(what, e))
}

/// A device from the `device_columns!()` starting at column `at`.
fn device_from_row(row: &Row, at: usize) -> Result<Device, StoreError> {
    Ok(Device {
        id: row.try_get(at)?,
        organization_id: row.try_get(at + 1)?,
        public_key: row.try_get(at + 2)?,
        hostname: row.try_get(at + 3)?,
        os: row.try_get(at + 4)?,
        tunnel_ip: parse_col(row, at + 5, "tunnel_ip")?,
        tunnel_ip_v6: parse_opt(row, at + 6, "tunnel_ip_v6")?,
        organization_prefix: parse_col(row, at + 7, "organization_prefix")?,
        organization_prefix_v6: parse_col(row, at + 8, "organization_prefix_v6")?,
        local_ip: parse_opt(row, at + 9, "local_ip")?,
        local_ip_v6: parse_opt(row, at + 10, "local_ip_v6")?,
        endpoints: parse_json(row, at + 11, "endpoints")?,
        reflexive_endpoint: parse_opt(row, at + 12, "reflexive_endpoint")?,
        symmetric_nat: row.try_get(at + 13)?,
        relay: row.try_get(at + 14)?,
        relay_only: row.try_get(at + 15)?,
        ipv6_supported: row.try_get(at + 16)?,
        advertise_cidrs: parse_json(row, at + 17, "advertise_cidrs")?,
        revision: row.try_get(at + 18)?,
        last_seen: row.try_get(at + 19)?,
        unmanaged: row.try_get(at + 20)?,
        online: row.try_get(at + 21)?,
    })
}

fn org_from_row(row: &Row) -> Result<Organization, StoreError> {
    Ok(Organization {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        ip_cidr: parse_col(row, 2, "ip_cidr")?,
        ip_cidr_v6: parse_col(row, 3, "ip_cidr_v6")?,
    })
}

fn addrs_from_row(row: &Row, at: usize) -> Result<DeviceAddrs, StoreError> {
    Ok(DeviceAddrs {
        device_id: row.try_get(at)?,
        organization_id: row.try_get(at + 1)?,
        v4: parse_col(row, at + 2, "tunnel_ip")?,
        v6: parse_opt(row, at + 3, "tunnel_ip_v6")?,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A connection or transaction with this connection's prepared statements: each
/// statement is parsed once per connection, then costs one round trip.
struct Db<'a, C: GenericClient> {
    c: &'a mut C,
    stmts: &'a mut HashMap<&'static str, Statement>,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl<C: GenericClient> Db<'_, C> {
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql)?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query(&s, params)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_opt(&s, params)?)
    }

    fn query_one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_one(&s, params)?)
    }

    fn execute(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.execute(&s, params)?)
    }

    fn current_revision(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .query_one(
                "SELECT COALESCE(MAX(revision), 0)::BIGINT FROM changes",
                &[],
            )?
            .try_get(0)?)
    }

    fn load_device(&mut self, id: i64) -> Result<Option<Device>, StoreError> {
        const SQL: &str = concat!("SELECT ", device_columns!(), " FROM devices WHERE id = $1");
        self.query_opt(SQL, &[&id])?
            .map(|r| device_from_row(&r, 0))
            .transpose()
    }

    fn load_org(&mut self, id: i64) -> Result<Organization, StoreError> {
        self.query_opt(
            "SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations WHERE id = $1",
            &[&id],
        )?
        .map(|r| org_from_row(&r))
        .transpose()?
        .ok_or_else(|| StoreError::OrgNotFound(id.to_string()))
    }

    fn org_devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE organization_id = $1 ORDER BY id"
        );
        self.query(SQL, &[&organization_id])?
            .iter()
            .map(|r| device_from_row(r, 0))
            .collect()
    }

    fn advertisers(&mut self, organization_id: i64) -> Result<Vec<AdvertisedBy>, StoreError> {
        self.query(
            "SELECT id, hostname, advertise_cidrs FROM devices \
             WHERE organization_id = $1 AND advertise_cidrs <> '[]' ORDER BY id",
            &[&organization_id],
        )?
        .iter()
        .map(|r| {
            Ok(AdvertisedBy {
                device_id: r.try_get(0)?,
                hostname: r.try_get(1)?,
                cidrs: parse_json(r, 2, "advertise_cidrs")?,
            })
        })
        .collect()
    }

    /// Appends a change and announces it; returns its revision. Call it after every
    /// row lock the transaction needs is taken (see the module docs).
    fn record_change(
        &mut self,
        organization_id: i64,
        device_id: i64,
        kind: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        self.execute("LOCK TABLE changes IN EXCLUSIVE MODE", &[])?;
        Ok(self
            .query_one(
                "INSERT INTO changes (organization_id, device_id, kind, created_at) \
                 SELECT $1, $2, $3, $4 FROM (SELECT pg_notify('nexodus_changes', '')) AS n \
                 RETURNING revision",
                &[&organization_id, &device_id, &kind, &now],
            )?
            .try_get(0)?)
    }
}

impl<C: GenericClient> AddrSource for Db<'_, C> {
    fn load_all(&mut self) -> Result<(i64, Vec<DeviceAddrs>), StoreError> {
        let rev = self.current_revision()?;
        let all = self
            .query(
                "SELECT id, organization_id, tunnel_ip, tunnel_ip_v6 FROM devices",
                &[],
            )?
            .iter()
            .map(|r| addrs_from_row(r, 0))
            .collect::<Result<_, _>>()?;
        Ok((rev, all))
    }

    fn changed_since(
        &mut self,
        revision: i64,
        limit: usize,
    ) -> Result<Vec<(i64, i64, Option<DeviceAddrs>)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query(
            "SELECT c.revision, c.device_id, d.id, d.organization_id, d.tunnel_ip, d.tunnel_ip_v6 \
             FROM changes c LEFT JOIN devices d ON d.id = c.device_id \
             WHERE c.revision > $1 ORDER BY c.revision LIMIT $2",
            &[&revision, &limit],
        )?
        .iter()
        .map(|r| {
            let present: Option<i64> = r.try_get(2)?;
            Ok((
                r.try_get(0)?,
                r.try_get(1)?,
                present.map(|_| addrs_from_row(r, 2)).transpose()?,
            ))
        })
        .collect()
    }
}

/// True for errors after which the transaction can simply run again: a unique
/// constraint hit by a concurrent insert (two replicas took the same address), a
/// serialization failure, a deadlock.
fn is_conflict(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// True when the connection is gone or the server is going away or starting up.
fn is_connection_lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(c) => {
            c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
        }
        // No SQLSTATE: an I/O error or the server hung up.
        None => e.as_db_error().is_none(),
    }
}

/// A stored TLS identity: DER certificate, PKCS#8 DER key.
pub type IdentityDer = (Vec<u8>, Vec<u8>);

/// One connection and its prepared statements.
struct Conn {
    client: Client,
    stmts: HashMap<&'static str, Statement>,
}

/// The PostgreSQL store. One connection, reopened when lost.
pub struct PgStore {
    config: tokio_postgres::Config,
    conn: Option<Conn>,
    /// This process's name in `cluster_replicas` (random per start).
    replica: String,
    addrs: AddrCache,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The sync client closes its connection on a runtime of its own, which must not
        // happen on an async thread: hand it to a plain thread there.
        if let Some(conn) = self.conn.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            std::thread::spawn(move || drop(conn));
        }
    }
}

fn connect(config: &tokio_postgres::Config) -> Result<Conn, StoreError> {
    let client = postgres::Config::from(config.clone()).connect(NoTls)?;
    Ok(Conn {
        client,
        stmts: HashMap::new(),
    })
}

/// Runs the migrations of `schema.pg.sql` that are not applied yet, each in its own
/// transaction, under an advisory lock so that replicas starting together take turns.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    /// Arbitrary, fixed: the advisory lock key of schema migrations.
    const LOCK: i64 = 0x6e65_786f_6475_7301;
    let migrations = migrate::pg_migrations()?;
    let newest = migrations.last().map_or(0, |(v, _)| *v);
    {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])?;
        // No "already exists, skipping" notice on every start.
        tx.batch_execute("SET LOCAL client_min_messages = warning")?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
                 version BIGINT PRIMARY KEY, \
                 applied_at BIGINT NOT NULL)",
        )?;
        tx.commit()?;
    }
    for (version, sql) in migrations {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )?
            .try_get(0)?;
        if current > newest {
            return Err(StoreError::Schema(format!(
                "database schema version {current} is newer than this build knows ({newest}); upgrade nexodus"
            )));
        }
        if current >= version {
            continue;
        }
        tx.batch_execute(&sql)?;
        tx.execute(
            concat!(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, ",
                db_now!(),
                ")"
            ),
            &[&version],
        )?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

impl PgStore {
    /// Connects, and creates or migrates the schema.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let config = parse_config(url)?;
        let mut conn = connect(&config)?;
        migrate(&mut conn.client)?;
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let replica = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            config,
            conn: Some(conn),
            replica,
            addrs: AddrCache::default(),
        })
    }

    /// The connection settings, for a second connection (the hub's LISTEN).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// This process's replica id.
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// The shared TLS identity (certificate, PKCS#8 key), if one is stored.
    pub fn identity(&mut self) -> Result<Option<IdentityDer>, StoreError> {
        self.read(|db| {
            db.query_opt(
                "SELECT cert_der, key_der FROM cluster_identity WHERE id = 1",
                &[],
            )?
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
        })
    }

    /// Stores `cert` and `key` as the shared identity unless another replica stored
    /// one first; returns the stored one.
    pub fn insert_identity(
        &mut self,
        cert: &[u8],
        key: &[u8],
        now: i64,
    ) -> Result<IdentityDer, StoreError> {
        self.write(|db, _| {
            db.execute(
                "INSERT INTO cluster_identity (id, cert_der, key_der, created_at) \
                 VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
                &[&cert, &key, &now],
            )?;
            let r = db.query_one(
                "SELECT cert_der, key_der FROM cluster_identity WHERE id = 1",
                &[],
            )?;
            Ok((r.try_get(0)?, r.try_get(1)?))
        })
    }

    /// The live connection, reopened if it was lost.
    fn conn<'a>(
        slot: &'a mut Option<Conn>,
        config: &tokio_postgres::Config,
    ) -> Result<&'a mut Conn, StoreError> {
        let conn = match slot.take() {
            Some(c) if !c.client.is_closed() => c,
            _ => {
                let c = connect(config)?;
                tracing::info!("connected to the database again");
                c
            }
        };
        Ok(slot.insert(conn))
    }

    /// Decides what to do about a failed attempt: `true` to run it again.
    fn after_failure(&mut self, e: &StoreError, committing: bool, attempt: u32) -> bool {
        let StoreError::Postgres(pe) = e else {
            return false;
        };
        let lost = is_connection_lost(pe);
        if lost {
            self.conn = None;
        }
        if lost || is_conflict(pe) {
            // Another replica took an address the index thought free (or the index
            // may be behind): start it over.
            self.addrs.clear();
        }
        let again = attempt < ATTEMPTS && (is_conflict(pe) || (lost && !committing));
        if again {
            // Jittered backoff: 10 ms, 20 ms, … up to ~1 s (a restarting database).
            let base = 10u64 << attempt.min(7);
            let jitter = u64::from(rand::rng().next_u32()) % base.max(1);
            tracing::debug!(attempt, error = %pe, "database transaction failed; retrying");
            std::thread::sleep(Duration::from_millis(base + jitter));
        }
        again
    }

    /// Runs `f` in a READ COMMITTED transaction, again on conflicts and lost
    /// connections (see the module docs).
    fn write<T>(
        &mut self,
        mut f: impl FnMut(&mut Db<'_, Transaction<'_>>, &mut AddrCache) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut committing = false;
            let result = (|| {
                let conn = Self::conn(&mut self.conn, &self.config)?;
                let mut tx = conn.client.transaction()?;
                let value = f(
                    &mut Db {
                        c: &mut tx,
                        stmts: &mut conn.stmts,
                    },
                    &mut self.addrs,
                )?;
                committing = true;
                tx.commit()?;
                Ok(value)
            })();
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if !self.after_failure(&e, committing, attempt) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Runs reads outside a transaction, again if the connection was lost.
    fn read<T>(
        &mut self,
        mut f: impl FnMut(&mut Db<'_, Client>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = (|| {
                let conn = Self::conn(&mut self.conn, &self.config)?;
                f(&mut Db {
                    c: &mut conn.client,
                    stmts: &mut conn.stmts,
                })
            })();
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if !self.after_failure(&e, false, attempt) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Inserts a device (allocating its addresses), logs the change; returns its id.
    /// Locks nothing but its own new row before the change log.
    fn insert_device(
        db: &mut Db<'_, Transaction<'_>>,
        addrs: &mut AddrCache,
        org_id: i64,
        req: &RegisterRequest,
        credential_hash: &str,
        unmanaged: bool,
        now: i64,
    ) -> Result<i64, StoreError> {
        if let Some(r) = db.query_opt(
            "SELECT id FROM devices WHERE public_key = $1",
            &[&req.public_key],
        )? {
            return Err(StoreError::DuplicateKey(r.try_get(0)?));
        }
        let org = db.load_org(org_id)?;
        let (v4, v6) = addrs.allocate(db, &org, req)?;
        if !req.advertise_cidrs.is_empty() {
            let others = db.advertisers(org_id)?;
            check_advertised(&org, &others, None, &req.advertise_cidrs)?;
        }
        // Taken from now on in this transaction (its change is logged later).
        addrs.reserve(
            org_id,
            std::iter::once(IpAddr::V4(v4)).chain(v6.map(IpAddr::V6)),
        );
        let row = db.query_one(
            "INSERT INTO devices (organization_id, public_key, hostname, os, tunnel_ip, tunnel_ip_v6, \
             organization_prefix, organization_prefix_v6, endpoints, symmetric_nat, relay, relay_only, \
             ipv6_supported, advertise_cidrs, revision, last_seen, created_at, credential_hash, unmanaged) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 0, $15, $15, $16, $17) \
             RETURNING id",
            &[
                &org_id,
                &req.public_key,
                &req.hostname,
                &req.os,
                &v4.to_string(),
                &v6.map(|a| a.to_string()),
                &org.ip_cidr.to_string(),
                &org.ip_cidr_v6.to_string(),
                &to_json(&req.endpoints)?,
                &req.symmetric_nat,
                &req.relay,
                &req.relay_only,
                &req.ipv6_supported,
                &to_json(&req.advertise_cidrs)?,
                &now,
                &credential_hash,
                &unmanaged,
            ],
        )?;
        Ok(row.try_get(0)?)
    }

    /// One registration of a batch, up to its device row (the change is logged by
    /// the caller, after every row lock is taken): returns (organization, device id).
    fn register_one(
        db: &mut Db<'_, Transaction<'_>>,
        addrs: &mut AddrCache,
        r: &Registration<'_>,
        now: i64,
    ) -> Result<(i64, i64), StoreError> {
        check_register(r.req)?;
        let token = db.query_opt(
            "SELECT id, organization_id, reusable, expires_at, uses FROM tokens \
             WHERE secret_hash = $1",
            &[&r.token_hash],
        )?;
        let Some(token) = token else {
            return Err(StoreError::InvalidToken);
        };
        let token_id: i64 = token.try_get(0)?;
        let org_id: i64 = token.try_get(1)?;
        let reusable: bool = token.try_get(2)?;
        let expires_at: Option<i64> = token.try_get(3)?;
        let mut uses: i64 = token.try_get(4)?;
        if expires_at.is_some_and(|t| t <= now) {
            return Err(StoreError::TokenExpired);
        }
        if !reusable {
            // Two replicas must not both spend a single-use token.
            uses = db
                .query_one(
                    "SELECT uses FROM tokens WHERE id = $1 FOR UPDATE",
                    &[&token_id],
                )?
                .try_get(0)?;
        }
        if !reusable && uses > 0 {
            return Err(StoreError::TokenUsed);
        }
        let id = Self::insert_device(db, addrs, org_id, r.req, r.credential_hash, false, now)?;
        db.execute(
            "UPDATE tokens SET uses = uses + 1 WHERE id = $1",
            &[&token_id],
        )?;
        Ok((org_id, id))
    }

    /// Logs new devices' changes (one revision each) and stamps their revisions;
    /// returns the devices as stored.
    fn log_inserts(
        db: &mut Db<'_, Transaction<'_>>,
        orgs: &[i64],
        ids: &[i64],
        now: i64,
    ) -> Result<Vec<(i64, Device)>, StoreError> {
        const LOAD: &str = concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE id = ANY($1)"
        );
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (orgs, ids) = (orgs.to_vec(), ids.to_vec());
        db.execute("LOCK TABLE changes IN EXCLUSIVE MODE", &[])?;
        db.execute(
            "WITH n AS (SELECT pg_notify('nexodus_changes', '')), \
             c AS (INSERT INTO changes (organization_id, device_id, kind, created_at) \
                   SELECT u.o, u.d, 'upsert', $3 FROM n, \
                   unnest($1::BIGINT[], $2::BIGINT[]) WITH ORDINALITY AS u(o, d, i) \
                   ORDER BY u.i RETURNING device_id, revision) \
             UPDATE devices SET revision = c.revision FROM c WHERE devices.id = c.device_id",
            &[&orgs, &ids, &now],
        )?;
        db.query(LOAD, &[&ids])?
            .iter()
            .map(|r| {
                let d = device_from_row(r, 0)?;
                Ok((d.id, d))
            })
            .collect()
    }

    /// Logs a new device's change and stamps its revision; the device row is this
    /// transaction's own, so nothing is waited for after the change-log lock.
    fn log_insert(
        db: &mut Db<'_, Transaction<'_>>,
        org_id: i64,
        id: i64,
        now: i64,
    ) -> Result<Device, StoreError> {
        let revision = db.record_change(org_id, id, "upsert", now)?;
        db.execute(
            "UPDATE devices SET revision = $1 WHERE id = $2",
            &[&revision, &id],
        )?;
        db.load_device(id)?.ok_or(StoreError::DeviceNotFound(id))
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
            let revision = db.record_change(org, id, "upsert", now)?;
            db.execute(
                "UPDATE devices SET revision = $1 WHERE id = $2",
                &[&revision, &id],
            )?;
        }
        Ok(gone.len())
    }

    /// Drops replicas whose heartbeat is older than [`REPLICA_TIMEOUT_SECS`] with
    /// their watches; returns how many devices went offline.
    fn expire_replicas(&mut self, now: i64) -> Result<usize, StoreError> {
        const DEAD: &str = concat!(
            "SELECT id FROM cluster_replicas WHERE heartbeat < ",
            db_now!(),
            " - $1"
        );
        let dead: Vec<String> = self.read(|db| {
            db.query(DEAD, &[&REPLICA_TIMEOUT_SECS])?
                .iter()
                .map(|r| Ok(r.try_get(0)?))
                .collect()
        })?;
        let mut offline = 0;
        for replica in dead {
            offline += self.write(|db, _| {
                // Claim it: a replica expiring it at the same time finds nothing.
                const CLAIM: &str = concat!(
                    "DELETE FROM cluster_replicas WHERE id = $1 AND heartbeat < ",
                    db_now!(),
                    " - $2 RETURNING id"
                );
                if db
                    .query_opt(CLAIM, &[&replica, &REPLICA_TIMEOUT_SECS])?
                    .is_none()
                {
                    return Ok(0);
                }
                // Its watch rows went with it (ON DELETE CASCADE): find their devices.
                let ids: Vec<i64> = db
                    .query(
                        "SELECT id FROM devices d WHERE online \
                         AND NOT EXISTS (SELECT 1 FROM cluster_watches w WHERE w.device_id = d.id)",
                        &[],
                    )?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?;
                Self::offline_unwatched(db, ids, now)
            })?;
            tracing::info!(%replica, "coordinator replica stopped heartbeating; dropped its watches");
        }
        Ok(offline)
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn current_revision(&mut self) -> Result<i64, StoreError> {
        self.read(|db| db.current_revision())
    }

    fn create_org(
        &mut self,
        name: &str,
        ip_cidr: Ipv4Net,
        ip_cidr_v6: Ipv6Net,
        now: i64,
    ) -> Result<Organization, StoreError> {
        check_new_org(name, ip_cidr, ip_cidr_v6)?;
        let id = self.write(|db, _| {
            if db
                .query_opt("SELECT id FROM organizations WHERE name = $1", &[&name])?
                .is_some()
            {
                return Err(StoreError::OrgExists(name.into()));
            }
            Ok(db
                .query_one(
                    "INSERT INTO organizations (name, ip_cidr, ip_cidr_v6, created_at) \
                     VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&name, &ip_cidr.to_string(), &ip_cidr_v6.to_string(), &now],
                )?
                .try_get(0)?)
        })?;
        Ok(Organization {
            id,
            name: name.into(),
            ip_cidr,
            ip_cidr_v6,
        })
    }

    fn org_by_name(&mut self, name: &str) -> Result<Organization, StoreError> {
        self.read(|db| {
            db.query_opt(
                "SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations WHERE name = $1",
                &[&name],
            )?
            .map(|r| org_from_row(&r))
            .transpose()?
            .ok_or_else(|| StoreError::OrgNotFound(name.into()))
        })
    }

    fn orgs(&mut self) -> Result<Vec<Organization>, StoreError> {
        self.read(|db| {
            db.query(
                "SELECT id, name, ip_cidr, ip_cidr_v6 FROM organizations ORDER BY id",
                &[],
            )?
            .iter()
            .map(org_from_row)
            .collect()
        })
    }

    fn create_token(
        &mut self,
        organization_id: i64,
        secret_hash: &str,
        reusable: bool,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<i64, StoreError> {
        self.write(|db, _| {
            Ok(db
                .query_one(
                    "INSERT INTO tokens (organization_id, secret_hash, reusable, expires_at, created_at) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    &[&organization_id, &secret_hash, &reusable, &expires_at, &now],
                )?
                .try_get(0)?)
        })
    }

    fn register_devices(
        &mut self,
        batch: &[Registration<'_>],
        now: i64,
    ) -> Vec<Result<Device, StoreError>> {
        let n = batch.len();
        let result = self.write(|db, addrs| {
            addrs.release();
            let mut out = Vec::with_capacity(n);
            let mut inserted = Vec::new();
            for (i, r) in batch.iter().enumerate() {
                match Self::register_one(db, addrs, r, now) {
                    Ok(pair) => {
                        inserted.push((i, pair));
                        out.push(Err(StoreError::Unavailable("not logged".into())));
                    }
                    // Only the database fails after a registration wrote something:
                    // the whole attempt goes (and is retried on conflicts).
                    Err(e) if e.is_internal() => return Err(e),
                    Err(e) => out.push(Err(e)),
                }
            }
            // Then the change log, last (see the module docs), for all at once.
            let orgs: Vec<i64> = inserted.iter().map(|(_, (org, _))| *org).collect();
            let ids: Vec<i64> = inserted.iter().map(|(_, (_, id))| *id).collect();
            for (i, device) in Self::log_inserts(db, &orgs, &ids, now)? {
                if let Some(&(slot, _)) = inserted.iter().find(|(_, (_, id))| *id == i) {
                    out[slot] = Ok(device);
                }
            }
            Ok(out)
        });
        self.addrs.release();
        result.unwrap_or_else(|e| fail_all(e, n))
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
        let result = self.write(|db, addrs| {
            addrs.release();
            db.load_org(organization_id)?;
            let id =
                Self::insert_device(db, addrs, organization_id, &req, credential_hash, true, now)?;
            Self::log_insert(db, organization_id, id, now)
        });
        self.addrs.release();
        result
    }

    fn authenticate(
        &mut self,
        device_id: i64,
        credential_hash: &str,
    ) -> Result<Device, StoreError> {
        const SQL: &str = concat!(
            "SELECT credential_hash, ",
            device_columns!(),
            " FROM devices WHERE id = $1"
        );
        let row = self.read(|db| db.query_opt(SQL, &[&device_id]))?;
        match row {
            Some(r) if r.try_get::<_, &str>(0)? == credential_hash => device_from_row(&r, 1),
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
        self.write(|db, addrs| {
            // Locks the row before anything else.
            if db.execute(
                "UPDATE devices SET last_seen = $1 WHERE id = $2",
                &[&now, &device_id],
            )? == 0
            {
                return Err(StoreError::Unauthorized);
            }
            if let Some(v6) = ipv6_supported.filter(|&v6| v6 != device.ipv6_supported) {
                let addr = if v6 {
                    let org = db.load_org(device.organization_id)?;
                    Some(addrs.allocate_v6(db, &org)?.to_string())
                } else {
                    None
                };
                db.execute(
                    "UPDATE devices SET ipv6_supported = $1, tunnel_ip_v6 = $2 WHERE id = $3",
                    &[&v6, &addr, &device_id],
                )?;
                let revision =
                    db.record_change(device.organization_id, device_id, "upsert", now)?;
                db.execute(
                    "UPDATE devices SET revision = $1 WHERE id = $2",
                    &[&revision, &device_id],
                )?;
            }
            db.load_device(device_id)?.ok_or(StoreError::Unauthorized)
        })
    }

    fn update_device(
        &mut self,
        device_id: i64,
        update: &DeviceUpdate,
        now: i64,
    ) -> Result<Device, StoreError> {
        const LOCK: &str = concat!(
            "SELECT ",
            device_columns!(),
            " FROM devices WHERE id = $1 FOR UPDATE"
        );
        self.write(|db, _| {
            let mut d = db
                .query_opt(LOCK, &[&device_id])?
                .map(|r| device_from_row(&r, 0))
                .transpose()?
                .ok_or(StoreError::DeviceNotFound(device_id))?;
            apply_update(&mut d, update)?;
            if let Some(cidrs) = update.advertise_cidrs.as_ref().filter(|c| !c.is_empty()) {
                let org = db.load_org(d.organization_id)?;
                let others = db.advertisers(d.organization_id)?;
                check_advertised(&org, &others, Some(device_id), cidrs)?;
            }
            let revision = db.record_change(d.organization_id, device_id, "upsert", now)?;
            db.execute(
                "UPDATE devices SET hostname = $1, endpoints = $2, reflexive_endpoint = $3, \
                 symmetric_nat = $4, relay = $5, relay_only = $6, advertise_cidrs = $7, \
                 revision = $8, last_seen = $9 WHERE id = $10",
                &[
                    &d.hostname,
                    &to_json(&d.endpoints)?,
                    &d.reflexive_endpoint.map(|e: SocketAddr| e.to_string()),
                    &d.symmetric_nat,
                    &d.relay,
                    &d.relay_only,
                    &to_json(&d.advertise_cidrs)?,
                    &revision,
                    &now,
                    &device_id,
                ],
            )?;
            db.load_device(device_id)?
                .ok_or(StoreError::DeviceNotFound(device_id))
        })
    }

    fn set_online(&mut self, device_id: i64, online: bool, now: i64) -> Result<(), StoreError> {
        let replica = self.replica.clone();
        self.write(|db, _| {
            let Some(r) = db.query_opt(
                "SELECT organization_id, online FROM devices WHERE id = $1 FOR UPDATE",
                &[&device_id],
            )?
            else {
                return Ok(());
            };
            let org: i64 = r.try_get(0)?;
            let was: bool = r.try_get(1)?;
            if online {
                // Nothing if this replica was expired meanwhile: the heartbeat
                // re-registers it and the caller records its watches again.
                db.execute(
                    "INSERT INTO cluster_watches (replica_id, device_id) \
                     SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM cluster_replicas WHERE id = $1) \
                     ON CONFLICT DO NOTHING",
                    &[&replica, &device_id],
                )?;
            } else {
                db.execute(
                    "DELETE FROM cluster_watches WHERE replica_id = $1 AND device_id = $2",
                    &[&replica, &device_id],
                )?;
            }
            let watched: bool = db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM cluster_watches WHERE device_id = $1)",
                    &[&device_id],
                )?
                .try_get(0)?;
            if watched != was {
                db.execute(
                    "UPDATE devices SET online = $1, last_seen = $2 WHERE id = $3",
                    &[&watched, &now, &device_id],
                )?;
                let revision = db.record_change(org, device_id, "upsert", now)?;
                db.execute(
                    "UPDATE devices SET revision = $1 WHERE id = $2",
                    &[&revision, &device_id],
                )?;
            } else {
                db.execute(
                    "UPDATE devices SET last_seen = $1 WHERE id = $2",
                    &[&now, &device_id],
                )?;
            }
            Ok(())
        })
    }

    fn reset_online(&mut self, now: i64) -> Result<usize, StoreError> {
        let replica = self.replica.clone();
        self.write(|db, _| {
            const SQL: &str = concat!(
                "INSERT INTO cluster_replicas (id, started_at, heartbeat) VALUES ($1, ",
                db_now!(),
                ", ",
                db_now!(),
                ") ON CONFLICT (id) DO NOTHING"
            );
            db.execute(SQL, &[&replica])?;
            Ok(())
        })?;
        self.expire_replicas(now)
    }

    fn heartbeat(&mut self) -> Result<bool, StoreError> {
        let replica = self.replica.clone();
        let revived = self.write(|db, _| {
            const BEAT: &str = concat!(
                "UPDATE cluster_replicas SET heartbeat = ",
                db_now!(),
                " WHERE id = $1"
            );
            const REVIVE: &str = concat!(
                "INSERT INTO cluster_replicas (id, started_at, heartbeat) VALUES ($1, ",
                db_now!(),
                ", ",
                db_now!(),
                ") ON CONFLICT (id) DO NOTHING"
            );
            if db.execute(BEAT, &[&replica])? == 1 {
                return Ok(false);
            }
            db.execute(REVIVE, &[&replica])?;
            Ok(true)
        })?;
        if revived {
            tracing::warn!(
                replica = %self.replica,
                "this replica had been presumed dead (no heartbeat); recording its watches again"
            );
        }
        let now: i64 = self.read(|db| {
            Ok(db
                .query_one(concat!("SELECT ", db_now!()), &[])?
                .try_get(0)?)
        })?;
        self.expire_replicas(now)?;
        Ok(revived)
    }

    fn remove_device(&mut self, device_id: i64, now: i64) -> Result<(), StoreError> {
        self.write(|db, _| {
            let Some(r) = db.query_opt(
                "DELETE FROM devices WHERE id = $1 RETURNING organization_id",
                &[&device_id],
            )?
            else {
                return Err(StoreError::DeviceNotFound(device_id));
            };
            let org: i64 = r.try_get(0)?;
            db.record_change(org, device_id, "remove", now)?;
            Ok(())
        })
    }

    fn device(&mut self, device_id: i64) -> Result<Option<Device>, StoreError> {
        self.read(|db| db.load_device(device_id))
    }

    fn devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        self.read(|db| db.org_devices(organization_id))
    }

    fn snapshot(&mut self, organization_id: i64) -> Result<(i64, Vec<Device>), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = (|| {
                let conn = Self::conn(&mut self.conn, &self.config)?;
                let mut tx = conn
                    .client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                let mut db = Db {
                    c: &mut tx,
                    stmts: &mut conn.stmts,
                };
                let rev = db.current_revision()?;
                let devices = db.org_devices(organization_id)?;
                tx.commit()?;
                Ok((rev, devices))
            })();
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if !self.after_failure(&e, false, attempt) {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn changes_since(&mut self, revision: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
        const SQL: &str = concat!(
            "SELECT c.revision, c.organization_id, c.device_id, ",
            device_columns!(d),
            " FROM changes c LEFT JOIN devices d ON d.id = c.device_id \
             WHERE c.revision > $1 ORDER BY c.revision LIMIT $2"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|db| {
            db.query(SQL, &[&revision, &limit])?
                .iter()
                .map(|r| {
                    let present: Option<i64> = r.try_get(3)?;
                    Ok(Change {
                        revision: r.try_get(0)?,
                        organization_id: r.try_get(1)?,
                        device_id: r.try_get(2)?,
                        device: present.map(|_| device_from_row(r, 3)).transpose()?,
                    })
                })
                .collect()
        })
    }
}
