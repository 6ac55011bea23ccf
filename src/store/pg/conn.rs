//! The PostgreSQL connection: connecting, schema migrations, and the retry policy
//! every transaction runs under (conflicts and lost connections run it again).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, IsolationLevel, Statement, Transaction};
use rand::RngCore;

use super::super::addrs::AddrCache;
use super::super::{StoreError, migrate};
use super::PgStore;
use super::sql::Db;
use super::tls::{PgTls, extract};

/// Attempts of one transaction (conflicts, lost connections) before giving up.
const ATTEMPTS: u32 = 10;

/// The database's clock, unix seconds (heartbeats do not trust replicas' clocks).
macro_rules! db_now {
    () => {
        "EXTRACT(EPOCH FROM now())::BIGINT"
    };
}
pub(super) use db_now;

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

/// Connection settings: tokio-postgres's, and the TLS connector of `sslmode`.
#[derive(Clone, Debug)]
pub struct PgConfig {
    pub pg: tokio_postgres::Config,
    pub tls: PgTls,
}

impl PgConfig {
    /// For messages: `db.example:5432 (sslmode=verify-full, sslrootcert=ca.pem)`.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .zip(self.pg.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(h, port)| match h {
                tokio_postgres::config::Host::Tcp(h) => format!("{h}:{port}"),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        format!("{} ({})", hosts.join(","), self.tls.describe())
    }
}

/// Parses a connection URL and fills in what a coordinator needs: a connect timeout,
/// TCP keepalives (to notice a dead database host), an application name, and TLS as
/// `sslmode` and `sslrootcert` say (see `tls`).
pub fn parse_config(url: &str) -> Result<PgConfig, StoreError> {
    let settings = extract(url);
    let tls = PgTls::new(settings.mode.as_deref(), settings.root_cert.as_deref())
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let mut config =
        tokio_postgres::Config::from_str(&settings.rest).map_err(StoreError::Postgres)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name("nexodus");
    }
    config.keepalives_idle(Duration::from_secs(10));
    tls.configure(&mut config);
    Ok(PgConfig { pg: config, tls })
}

/// An error and its causes, `: `-separated (tokio-postgres's own message leaves out
/// the cause, such as why a TLS handshake failed).
pub(super) fn error_chain(e: &postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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

/// One connection and its prepared statements.
pub(super) struct Conn {
    pub client: Client,
    pub stmts: HashMap<&'static str, Statement>,
}

pub(super) fn connect(config: &PgConfig) -> Result<Conn, StoreError> {
    let client = postgres::Config::from(config.pg.clone()).connect(config.tls.connector())?;
    Ok(Conn {
        client,
        stmts: HashMap::new(),
    })
}

/// Runs the migrations of `schema.pg.sql` that are not applied yet, each in its own
/// transaction, under an advisory lock so that replicas starting together take turns.
pub(super) fn migrate(client: &mut Client) -> Result<(), StoreError> {
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
    /// The live connection, reopened if it was lost.
    fn conn<'a>(slot: &'a mut Option<Conn>, config: &PgConfig) -> Result<&'a mut Conn, StoreError> {
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

    /// Runs `f` on the live connection until it succeeds, or fails in a way
    /// [`Self::after_failure`] does not retry. `f` sets its flag before COMMIT.
    fn attempts<T>(
        &mut self,
        mut f: impl FnMut(&mut Conn, &str, &mut AddrCache, &mut bool) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut committing = false;
            let result = Self::conn(&mut self.conn, &self.config)
                .and_then(|c| f(c, &self.replica, &mut self.addrs, &mut committing));
            self.addrs.release();
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

    /// Runs `f` in a READ COMMITTED transaction, again on conflicts and lost
    /// connections (see the module docs).
    pub(super) fn write_tx<T>(
        &mut self,
        mut f: impl FnMut(&mut Db<'_, Transaction<'_>>, &mut AddrCache) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.attempts(|conn, replica, addrs, committing| {
            let mut tx = conn.client.transaction()?;
            let value = f(&mut Db::new(&mut tx, &mut conn.stmts, replica), addrs)?;
            *committing = true;
            tx.commit()?;
            Ok(value)
        })
    }

    /// Runs reads outside a transaction, again if the connection was lost.
    pub(super) fn read_plain<T>(
        &mut self,
        mut f: impl FnMut(&mut Db<'_, Client>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.attempts(|conn, replica, _, _| {
            f(&mut Db::new(&mut conn.client, &mut conn.stmts, replica))
        })
    }

    /// Runs reads in one REPEATABLE READ, read-only transaction (one snapshot).
    pub(super) fn read_snapshot<T>(
        &mut self,
        mut f: impl FnMut(&mut Db<'_, Transaction<'_>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.attempts(|conn, replica, _, _| {
            let mut tx = conn
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let value = f(&mut Db::new(&mut tx, &mut conn.stmts, replica))?;
            tx.commit()?;
            Ok(value)
        })
    }
}
