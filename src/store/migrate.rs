//! Schema migrations: `schema.sql` (SQLite, keyed on `PRAGMA user_version`) and
//! `schema.pg.sql` (PostgreSQL, applied by [`super::pg`]). Both files are lists of
//! migrations introduced by `-- migration: N` lines, numbered alike.

use rusqlite::Connection;

use super::StoreError;

const SCHEMA: &str = include_str!("../../schema.sql");
const PG_SCHEMA: &str = include_str!("../../schema.pg.sql");
const MARKER: &str = "-- migration: ";

/// The migrations of `schema.sql`, in order: (version, SQL).
pub(crate) fn migrations() -> Result<Vec<(i64, String)>, StoreError> {
    parse(SCHEMA)
}

/// The migrations of `schema.pg.sql`, in order: (version, SQL).
pub(crate) fn pg_migrations() -> Result<Vec<(i64, String)>, StoreError> {
    parse(PG_SCHEMA)
}

fn parse(schema: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let mut out: Vec<(i64, String)> = Vec::new();
    for line in schema.lines() {
        if let Some(n) = line.strip_prefix(MARKER) {
            let version: i64 = n
                .trim()
                .parse()
                .map_err(|_| StoreError::Schema(format!("bad migration marker {line:?}")))?;
            if out.last().is_some_and(|(v, _)| *v + 1 != version)
                || (out.is_empty() && version != 1)
            {
                return Err(StoreError::Schema(format!(
                    "migration {version} is out of sequence"
                )));
            }
            out.push((version, String::new()));
        } else if let Some((_, sql)) = out.last_mut() {
            sql.push_str(line);
            sql.push('\n');
        }
    }
    Ok(out)
}

/// Brings the database to the newest schema; refuses a database newer than this build.
pub(crate) fn run(conn: &mut Connection) -> Result<(), StoreError> {
    let migrations = migrations()?;
    let newest = migrations.last().map_or(0, |(v, _)| *v);
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > newest {
        return Err(StoreError::Schema(format!(
            "database schema version {current} is newer than this build knows ({newest}); upgrade nexodus"
        )));
    }
    for (version, sql) in migrations.into_iter().filter(|(v, _)| *v > current) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the write lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now >= version {
            continue;
        }
        tx.execute_batch(&sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}
