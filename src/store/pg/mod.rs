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
//! - **Allocation takes turns.** Transactions run at READ COMMITTED; a transaction
//!   that allocates addresses first takes an advisory lock held to its commit, so two
//!   replicas never pick the same address (16 racing allocators used to exhaust the
//!   retries). Should a UNIQUE constraint still refuse an insert, the transaction is
//!   retried from the start (as are serialization failures and deadlocks). Single-use
//!   tokens are locked (`FOR UPDATE`) before they are checked.
//! - **Reconnects.** A lost connection (database restarted) is reopened and the
//!   transaction retried, unless it was lost during COMMIT (the outcome is unknown;
//!   the error goes to the caller).
//! - **Online state across replicas.** `cluster_watches` has a row per (replica,
//!   device) while that replica holds a watch stream of the device; replicas heartbeat
//!   in `cluster_replicas` and expire each other after [`REPLICA_TIMEOUT_SECS`].
//! - **One node process per device across replicas.** A watch row also names the node
//!   process (its random instance id) and its address: a login or watch of another
//!   process with the same credential through another replica is refused while that
//!   row's replica heartbeated within [`SESSION_TIMEOUT_SECS`] (a SIGKILLed replica
//!   locks nobody out for longer); the same process is taken over (failover).
//!   Claims take the device's row lock, so two copies racing to two replicas take
//!   turns.
//!
//! The connection is TLS as the URL's `sslmode` and `sslrootcert` say, through
//! rustls (`tls`; libpq's default `prefer` without them). Errors never panic; a value
//! that does not parse is `Corrupt`.

//!
//! Split by concern: `conn` (connecting, migrations, retries), `sql` (the queries of
//! the store's flows in PostgreSQL's dialect), `cluster` (what replicas share: the TLS
//! identity, heartbeats, watches). The flows themselves are the store's (`flow` and
//! the [`Store`] trait), the same as SQLite's.

mod cluster;
mod conn;
mod sql;
pub mod tls;

use rand::RngCore;

use super::addrs::AddrCache;
use super::flow::{Engine, Read, ReadFn, WriteFn};
use super::{ClusterIdentity, Store, StoreError};
pub use conn::{PgConfig, parse_config, redact};

/// The channel every change is announced on.
pub const CHANNEL: &str = "nexodus_changes";
/// A replica whose heartbeat is older than this is presumed dead: its watches go.
pub const REPLICA_TIMEOUT_SECS: i64 = 30;
/// A replica whose heartbeat is older than this no longer holds devices (its watches
/// do not make another node process with the same credential a clone): it was killed
/// or cut off. Several of its heartbeats (`serve`'s `HEARTBEAT`) long.
pub const SESSION_TIMEOUT_SECS: i64 = 10;

/// The PostgreSQL store. One connection, reopened when lost.
pub struct PgStore {
    config: PgConfig,
    conn: Option<conn::Conn>,
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

impl PgStore {
    /// Connects, and creates or migrates the schema.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let config = parse_config(url)?;
        // The first connection's failure is told with where and how it connected (a
        // lost connection later is retried instead).
        let mut conn = conn::connect(&config).map_err(|e| match e {
            StoreError::Postgres(e) => StoreError::Unavailable(format!(
                "cannot connect to the database at {}: {}",
                config.describe(),
                conn::error_chain(&e)
            )),
            other => other,
        })?;
        conn::migrate(&mut conn.client)?;
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        let replica = id.iter().map(|b| format!("{b:02x}")).collect();
        let mut store = Self {
            config,
            conn: Some(conn),
            replica,
            addrs: AddrCache::default(),
        };
        super::flow::name_unnamed(&mut store)?;
        Ok(store)
    }

    /// The connection settings, for a second connection (the hub's LISTEN).
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// This process's replica id.
    pub fn replica_id(&self) -> &str {
        &self.replica
    }
}

impl Engine for PgStore {
    fn write(&mut self, f: &mut WriteFn<'_>) -> Result<(), StoreError> {
        self.write_tx(|db, addrs| f(db, addrs))
    }

    fn read(&mut self, mode: Read, f: &mut ReadFn<'_>) -> Result<(), StoreError> {
        match mode {
            Read::Plain => self.read_plain(|db| f(db)),
            Read::Snapshot => self.read_snapshot(|db| f(db)),
        }
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn engine(&mut self) -> &mut dyn Engine {
        self
    }

    fn cluster_identity(&mut self) -> Option<&mut dyn ClusterIdentity> {
        Some(self)
    }

    fn reset_online(&mut self, now: i64) -> Result<usize, StoreError> {
        self.start_replica()?;
        self.expire_replicas(now)
    }

    fn heartbeat(&mut self) -> Result<bool, StoreError> {
        self.beat()
    }

    fn leave(&mut self) -> Result<(), StoreError> {
        self.release_sessions()
    }
}
