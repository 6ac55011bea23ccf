//! The SQLite store: the embedded default.
//!
//! WAL, foreign keys on, one writer at a time (`BEGIN IMMEDIATE`), a busy timeout so
//! admin commands can work on the file while `serve` runs. `schema.sql` is the DDL.
//! This module holds the connection and the SQL dialect ([`Tx`] for SQLite); the
//! flows are the store's (`flow` and the [`Store`] trait). A failed transaction is
//! not retried: with one writer nothing conflicts.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, Params, TransactionBehavior, params, params_from_iter};

use super::addrs::{AddrCache, AddrChange, DeviceAddrs};
use super::flow::{Engine, Read, ReadFn, Tx, WriteFn};
use super::rows::{self, Encoded, Row as _, Token, device_columns, select_devices};
use super::{
    AdminKey, AdvertisedBy, Change, LogEntry, Organization, PathReport, PeerPath, Store,
    StoreError, StoredPolicy, TokenInfo, migrate,
};
use crate::wire::control::Device;

/// The SQLite store.
pub struct SqliteStore {
    pub(crate) conn: Connection,
    addrs: AddrCache,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    /// A new file is made 0600 whatever the umask (SQLite gives its `-wal` and `-shm`
    /// files the database file's mode); a symbolic link in its place is refused.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        // Not SQLITE_OPEN_NOFOLLOW: it also refuses links among the parent directories
        // (a state directory reached through one is fine); the open above refused a
        // link in the file's own place.
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
        let mut store = Self {
            conn,
            addrs: AddrCache::default(),
        };
        super::flow::name_unnamed(&mut store)?;
        Ok(store)
    }
}

impl Engine for SqliteStore {
    fn write(&mut self, f: &mut WriteFn<'_>) -> Result<(), StoreError> {
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            f(&mut Sql(&tx), &mut self.addrs)?;
            Ok(tx.commit()?)
        })();
        self.addrs.release();
        if result.as_ref().is_err_and(StoreError::is_internal) {
            // The database failed: the index may have seen what did not commit.
            self.addrs.clear();
        }
        result
    }

    fn read(&mut self, mode: Read, f: &mut ReadFn<'_>) -> Result<(), StoreError> {
        match mode {
            Read::Plain => f(&mut Sql(&self.conn)),
            Read::Snapshot => {
                let tx = self.conn.transaction()?;
                f(&mut Sql(&tx))?;
                Ok(tx.commit()?)
            }
        }
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn engine(&mut self) -> &mut dyn Engine {
        self
    }

    fn reset_online(&mut self, now: i64) -> Result<usize, StoreError> {
        let ids: Vec<i64> =
            Sql(&self.conn).all("SELECT id FROM devices WHERE online = 1", [], |r| r.col(0))?;
        for id in &ids {
            self.set_online(*id, false, now)?;
        }
        Ok(ids.len())
    }
}

/// SQLite's queries, on the connection or inside a transaction (which derefs to it).
struct Sql<'a>(&'a Connection);

/// Decodes one result row.
type Decode<T> = fn(&rusqlite::Row<'_>) -> Result<T, StoreError>;

impl Sql<'_> {
    fn all<T>(
        &self,
        sql: &str,
        params: impl Params,
        decode: Decode<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(decode(row)?);
        }
        Ok(out)
    }

    /// The first row's (the statements used here return at most one).
    fn opt<T>(
        &self,
        sql: &str,
        params: impl Params,
        decode: Decode<T>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.all(sql, params, decode)?.into_iter().next())
    }

    fn one<T>(&self, sql: &str, params: impl Params, decode: Decode<T>) -> Result<T, StoreError> {
        self.opt(sql, params, decode)?
            .ok_or(StoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows))
    }

    /// Runs a statement; returns how many rows it changed.
    fn execute(&self, sql: &str, params: impl Params) -> Result<u64, StoreError> {
        let n = self.0.prepare_cached(sql)?.execute(params)?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

fn int(row: &rusqlite::Row<'_>) -> Result<i64, StoreError> {
    row.col(0)
}

impl Tx for Sql<'_> {
    fn current_revision(&mut self) -> Result<i64, StoreError> {
        self.one("SELECT COALESCE(MAX(revision), 0) FROM changes", [], int)
    }

    fn oldest_revision(&mut self) -> Result<i64, StoreError> {
        self.one("SELECT COALESCE(MIN(revision), 0) FROM changes", [], int)
    }

    fn prune_changes(&mut self, below: i64) -> Result<u64, StoreError> {
        self.execute("DELETE FROM changes WHERE revision < ?1", [below])
    }

    fn device(&mut self, id: i64) -> Result<Option<Device>, StoreError> {
        const SQL: &str = select_devices!("WHERE id = ?1");
        self.opt(SQL, [id], |r| rows::device(r, 0))
    }

    fn lock_device(&mut self, id: i64) -> Result<Option<Device>, StoreError> {
        // The write transaction holds the whole database.
        self.device(id)
    }

    fn credential(&mut self, id: i64) -> Result<Option<(String, Device)>, StoreError> {
        const SQL: &str = concat!(
            "SELECT credential_hash, ",
            device_columns!(),
            " FROM devices WHERE id = ?1"
        );
        self.opt(SQL, [id], |r| rows::credential(r))
    }

    fn devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        const SQL: &str = select_devices!("WHERE organization_id = ?1 ORDER BY id");
        self.all(SQL, [organization_id], |r| rows::device(r, 0))
    }

    fn device_with_key(&mut self, public_key: &str) -> Result<Option<i64>, StoreError> {
        self.opt(
            "SELECT id FROM devices WHERE public_key = ?1",
            [public_key],
            int,
        )
    }

    fn org(&mut self, id: i64) -> Result<Option<Organization>, StoreError> {
        self.opt(
            "SELECT id, name, ip_cidr, ip_cidr_v6, domain FROM organizations WHERE id = ?1",
            [id],
            |r| rows::org(r),
        )
    }

    fn org_by_name(&mut self, name: &str) -> Result<Option<Organization>, StoreError> {
        self.opt(
            "SELECT id, name, ip_cidr, ip_cidr_v6, domain FROM organizations WHERE name = ?1",
            [name],
            |r| rows::org(r),
        )
    }

    fn orgs(&mut self) -> Result<Vec<Organization>, StoreError> {
        self.all(
            "SELECT id, name, ip_cidr, ip_cidr_v6, domain FROM organizations ORDER BY id",
            [],
            |r| rows::org(r),
        )
    }

    fn advertisers(&mut self, organization_id: i64) -> Result<Vec<AdvertisedBy>, StoreError> {
        self.all(
            "SELECT id, hostname, advertise_cidrs FROM devices \
             WHERE organization_id = ?1 AND advertise_cidrs <> '[]' ORDER BY id",
            [organization_id],
            |r| rows::advertised(r),
        )
    }

    fn changes_since(&mut self, revision: i64, limit: i64) -> Result<Vec<Change>, StoreError> {
        const SQL: &str = concat!(
            "SELECT c.revision, c.organization_id, c.device_id, ",
            device_columns!(d),
            " FROM changes c LEFT JOIN devices d ON d.id = c.device_id \
             WHERE c.revision > ?1 ORDER BY c.revision LIMIT ?2"
        );
        self.all(SQL, params![revision, limit], |r| rows::change(r))
    }

    fn content_changes(&mut self, revision: i64) -> Result<Vec<LogEntry>, StoreError> {
        self.all(
            "SELECT revision, organization_id, device_id, kind = 'remove' FROM changes \
             WHERE revision > ?1 AND kind <> 'online' ORDER BY revision",
            [revision],
            |r| rows::log_entry(r),
        )
    }

    fn database_id(&mut self) -> Result<i64, StoreError> {
        self.one("SELECT value FROM database_identity WHERE id = 1", [], int)
    }

    fn addrs(&mut self) -> Result<Vec<DeviceAddrs>, StoreError> {
        let sql = "SELECT id, organization_id, tunnel_ip, tunnel_ip_v6 FROM devices";
        self.all(sql, [], |r| rows::addrs(r, 0))
    }

    fn changed_addrs(&mut self, revision: i64, limit: i64) -> Result<Vec<AddrChange>, StoreError> {
        self.all(
            "SELECT c.revision, c.device_id, d.id, d.organization_id, d.tunnel_ip, d.tunnel_ip_v6 \
             FROM changes c LEFT JOIN devices d ON d.id = c.device_id \
             WHERE c.revision > ?1 ORDER BY c.revision LIMIT ?2",
            params![revision, limit],
            |r| rows::changed_addrs(r),
        )
    }

    fn insert_org(&mut self, org: &Organization, now: i64) -> Result<i64, StoreError> {
        self.execute(
            "INSERT INTO organizations (name, ip_cidr, ip_cidr_v6, created_at, domain) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                org.name,
                org.ip_cidr.to_string(),
                org.ip_cidr_v6.to_string(),
                now,
                org.domain
            ],
        )?;
        Ok(self.0.last_insert_rowid())
    }

    fn insert_token(&mut self, t: &Token, secret_hash: &str, now: i64) -> Result<i64, StoreError> {
        self.execute(
            "INSERT INTO tokens (organization_id, secret_hash, reusable, expires_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                t.organization_id,
                secret_hash,
                t.reusable,
                t.expires_at,
                now
            ],
        )?;
        Ok(self.0.last_insert_rowid())
    }

    fn token(&mut self, secret_hash: &str) -> Result<Option<Token>, StoreError> {
        self.opt(
            "SELECT id, organization_id, reusable, expires_at FROM tokens WHERE secret_hash = ?1",
            [secret_hash],
            |r| rows::token(r),
        )
    }

    fn lock_token_uses(&mut self, id: i64) -> Result<i64, StoreError> {
        self.one("SELECT uses FROM tokens WHERE id = ?1", [id], int)
    }

    fn spend_token(&mut self, id: i64) -> Result<u64, StoreError> {
        self.execute("UPDATE tokens SET uses = uses + 1 WHERE id = ?1", [id])
    }

    fn tokens(&mut self, organization_id: i64) -> Result<Vec<TokenInfo>, StoreError> {
        self.all(rows::SELECT_TOKENS, [organization_id], |r| {
            rows::token_info(r)
        })
    }

    fn delete_token(&mut self, id: i64) -> Result<u64, StoreError> {
        self.execute("DELETE FROM tokens WHERE id = ?1", [id])
    }

    fn insert_admin_key(&mut self, name: &str, hash: &str, now: i64) -> Result<i64, StoreError> {
        self.execute(
            "INSERT INTO admin_keys (name, secret_hash, created_at) VALUES (?1, ?2, ?3)",
            params![name, hash, now],
        )?;
        Ok(self.0.last_insert_rowid())
    }

    fn admin_keys(&mut self) -> Result<Vec<AdminKey>, StoreError> {
        self.all(rows::SELECT_ADMIN_KEYS, [], |r| rows::admin_key(r))
    }

    fn revoke_admin_key(&mut self, id: i64, now: i64) -> Result<u64, StoreError> {
        self.execute(rows::REVOKE_ADMIN_KEY, [now, id])
    }

    fn put_path_reports(
        &mut self,
        device_id: i64,
        reports: &[PeerPath],
        now: i64,
    ) -> Result<(), StoreError> {
        self.execute(rows::CLEAR_PATH_REPORTS, [device_id])?;
        for r in reports {
            self.execute(
                rows::PUT_PATH_REPORT,
                params![device_id, r.peer_id, r.path.as_str(), r.handshake_age, now],
            )?;
        }
        Ok(())
    }

    fn path_reports(&mut self, organization_id: i64) -> Result<Vec<PathReport>, StoreError> {
        self.all(rows::SELECT_PATH_REPORTS, [organization_id], |r| {
            rows::path_report(r)
        })
    }

    fn insert_device(&mut self, e: &Encoded<'_>, credential_hash: &str) -> Result<i64, StoreError> {
        let params = params_from_iter(e.insert_params(&credential_hash));
        self.one(rows::INSERT_DEVICE, params, int)
    }

    fn update_device(&mut self, e: &Encoded<'_>) -> Result<u64, StoreError> {
        self.execute(rows::UPDATE_DEVICE, params_from_iter(e.update_params()))
    }

    fn names_like(&mut self, organization_id: i64, base: &str) -> Result<Vec<String>, StoreError> {
        let pattern = format!("{base}-%");
        self.all(
            rows::NAMES_LIKE,
            params![organization_id, base, pattern],
            |r| r.col(0),
        )
    }

    fn name_taken(&mut self, organization_id: i64, name: &str) -> Result<bool, StoreError> {
        Ok(self.one(rows::NAME_TAKEN, params![organization_id, name], int)? > 0)
    }

    fn set_name(&mut self, id: i64, name: &str) -> Result<u64, StoreError> {
        self.execute(rows::SET_NAME, params![name, id])
    }

    fn unnamed(&mut self) -> Result<Vec<(i64, i64, String)>, StoreError> {
        self.all(rows::UNNAMED, [], |r| Ok((r.col(0)?, r.col(1)?, r.col(2)?)))
    }

    fn touch(&mut self, id: i64, now: i64) -> Result<u64, StoreError> {
        let sql = "UPDATE devices SET last_seen = ?1 WHERE id = ?2";
        self.execute(sql, params![now, id])
    }

    fn set_ipv6(&mut self, d: &Device) -> Result<u64, StoreError> {
        let addr = d.tunnel_ip_v6.map(|a| a.to_string());
        let sql = "UPDATE devices SET ipv6_supported = ?1, tunnel_ip_v6 = ?2 WHERE id = ?3";
        self.execute(sql, params![d.ipv6_supported, addr, d.id])
    }

    fn lock_online(&mut self, id: i64) -> Result<Option<(i64, bool)>, StoreError> {
        self.opt(
            "SELECT organization_id, online FROM devices WHERE id = ?1",
            [id],
            |r| Ok((r.col(0)?, r.col(1)?)),
        )
    }

    fn watch(&mut self, _id: i64, watching: bool) -> Result<bool, StoreError> {
        // One coordinator process: its watches are all there are.
        Ok(watching)
    }

    fn set_online(&mut self, id: i64, online: bool, now: i64) -> Result<u64, StoreError> {
        let sql = "UPDATE devices SET online = ?1, last_seen = ?2 WHERE id = ?3";
        self.execute(sql, params![online, now, id])
    }

    fn delete_device(&mut self, id: i64) -> Result<Option<i64>, StoreError> {
        self.opt(
            "DELETE FROM devices WHERE id = ?1 RETURNING organization_id",
            [id],
            int,
        )
    }

    fn lock_devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        // The write transaction holds the whole database.
        self.devices(organization_id)
    }

    fn set_approved(&mut self, e: &Encoded<'_>) -> Result<u64, StoreError> {
        self.execute(rows::SET_APPROVED, params_from_iter(e.approved_params()))
    }

    fn policy(&mut self, organization_id: i64) -> Result<Option<StoredPolicy>, StoreError> {
        self.opt(rows::SELECT_POLICY, [organization_id], |r| rows::policy(r))
    }

    fn put_policy(
        &mut self,
        organization_id: i64,
        text: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        self.one(rows::PUT_POLICY, params![organization_id, text, now], int)
    }

    fn clear_policy(&mut self, organization_id: i64, now: i64) -> Result<u64, StoreError> {
        self.execute(rows::CLEAR_POLICY, [now, organization_id])
    }

    fn record_change(&mut self, org: i64, id: i64, kind: &str, at: i64) -> Result<i64, StoreError> {
        self.execute(
            "INSERT INTO changes (organization_id, device_id, kind, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![org, id, kind, at],
        )?;
        Ok(self.0.last_insert_rowid())
    }

    fn set_revision(&mut self, id: i64, revision: i64) -> Result<u64, StoreError> {
        let sql = "UPDATE devices SET revision = ?1 WHERE id = ?2";
        self.execute(sql, params![revision, id])
    }
}
