//! Who owns the coordinator's state: `serve` creates it ([`open_state`]), admin
//! commands only open what a `serve` made ([`open_existing`]). On SQLite the files
//! are guarded by `flock`s: the database's owner lock (one `serve` per file) and the
//! state directory's initialisation lock (the TLS identity, database and default
//! organization are made once, however many processes start together). With
//! PostgreSQL the identity is a row inserted once in a transaction. It does not serve
//! anything: that is the rest of [`crate::serve`].

use std::path::Path;
use std::time::Duration;

use super::{ServeError, unix_now};
use crate::fsutil::{Lock, LockError, LockMode};
use crate::identity::{Identity, IdentityError};
use crate::store::{ClusterIdentity, DEFAULT_ORG, Database, Store, StoreError};

/// In the state directory: held (shared) by admin commands while they open the state,
/// and (exclusive) by `serve` while it creates or opens it.
const INIT_LOCK: &str = "init.lock";
/// Next to the SQLite file (`nexodus.db.lock`): held by the one `serve` using it.
const SERVE_LOCK_SUFFIX: &str = ".lock";
/// How long one side waits while the other holds [`INIT_LOCK`].
pub(crate) const INIT_WAIT: Duration = Duration::from_secs(30);
/// How long an admin command waits for state that is not there (yet): a `serve`
/// started at the same moment (an install script) creates it within this time.
const ADMIN_GRACE: Duration = Duration::from_secs(3);

/// The coordinator's durable state, as the admin commands and `serve` open it.
pub struct CoordinatorState {
    pub store: Box<dyn Store>,
    pub identity: Identity,
    /// True when this open created the default organization (a first start).
    pub first_start: bool,
    /// `serve` on SQLite: the lock saying this process owns the database file, held
    /// until the state is dropped (the process ends).
    _owner: Option<Lock>,
}

/// `serve`: opens the database (creating it, with the default organization) and the
/// TLS identity (creating it): files in `state_dir` next to an SQLite database, a row
/// of the database itself with PostgreSQL. On SQLite it first takes the database's
/// owner lock (a second `serve` is refused, naming the first) and creates everything
/// under the state directory's exclusive [`INIT_LOCK`], so the identity is made once
/// however many processes start together. Blocking: call it off the async threads.
pub fn open_state(db: &Database, state_dir: &Path) -> Result<CoordinatorState, ServeError> {
    let Database::Sqlite(path) = db else {
        let mut store = crate::store::open(db)?;
        return finish_open(&mut store, None).map(|(identity, first_start)| CoordinatorState {
            store,
            identity,
            first_start,
            _owner: None,
        });
    };
    // The identity's directory, and the database file's, both private.
    // The state directory must be ours alone; the database's may be shared (--db).
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    crate::fsutil::ensure_private_dir(state_dir).map_err(|source| IdentityError::Io {
        path: state_dir.display().to_string(),
        source,
    })?;
    if let Some(dir) = parent.filter(|&p| p != state_dir) {
        crate::fsutil::create_private_dir(dir).map_err(|source| IdentityError::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut owner_path = path.clone().into_os_string();
    owner_path.push(SERVE_LOCK_SUFFIX);
    let owner =
        Lock::try_take(owner_path.as_ref(), LockMode::Exclusive, true).map_err(|e| match e {
            LockError::Held { pid, .. } => ServeError::AlreadyRunning {
                path: path.clone(),
                pid,
            },
            e => e.into(),
        })?;
    let init = init_lock(state_dir, LockMode::Exclusive)?;
    let identity = Identity::load_or_create(state_dir)?;
    let mut store = crate::store::open(db)?;
    let (identity, first_start) = finish_open(&mut store, Some(identity))?;
    init.release();
    Ok(CoordinatorState {
        store,
        identity,
        first_start,
        _owner: Some(owner),
    })
}

/// Admin commands: opens the state a `serve` made, and never creates any. If there is
/// none yet, waits up to [`ADMIN_GRACE`] for a `serve` starting meanwhile; while one
/// is initialising (it holds [`INIT_LOCK`]), waits for it. No state: an error that
/// names the database and says how to find it.
pub fn open_existing(db: &Database, state_dir: &Path) -> Result<CoordinatorState, ServeError> {
    let start = std::time::Instant::now();
    let mut told = false;
    loop {
        match try_open_existing(db, state_dir) {
            Err(e @ (ServeError::NoState { .. } | ServeError::NoDatabase { .. }))
                if start.elapsed() < ADMIN_GRACE =>
            {
                if !std::mem::replace(&mut told, true) {
                    tracing::info!(
                        "{e}; waiting up to {}s for a coordinator that is starting",
                        ADMIN_GRACE.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn try_open_existing(db: &Database, state_dir: &Path) -> Result<CoordinatorState, ServeError> {
    let (mut store, identity, init) = match db {
        Database::Sqlite(path) => {
            let none = || ServeError::NoState {
                db: path.clone(),
                dir: state_dir.to_path_buf(),
            };
            let init = match init_lock(state_dir, LockMode::Shared) {
                Err(ServeError::Lock(LockError::Missing { .. })) => return Err(none()),
                other => other?,
            };
            let identity = Identity::load(state_dir)?.ok_or_else(none)?;
            // Checked first: opening an SQLite file that is not there creates it.
            if !path.exists() {
                return Err(none());
            }
            (crate::store::open(db)?, Some(identity), Some(init))
        }
        Database::Postgres(_) => (crate::store::open(db)?, None, None),
    };
    let none = ServeError::NoDatabase { url: db.describe() };
    let identity = finish_existing(&mut store, identity, none)?;
    drop(init);
    Ok(CoordinatorState {
        store,
        identity,
        first_start: false,
        _owner: None,
    })
}

/// The state directory's [`INIT_LOCK`] in `mode`, waiting while another process
/// holds it (a `serve` creating the state, or briefly an admin command).
fn init_lock(state_dir: &Path, mode: LockMode) -> Result<Lock, ServeError> {
    let path = state_dir.join(INIT_LOCK);
    let create = mode == LockMode::Exclusive;
    Lock::take_within(&path, mode, create, INIT_WAIT, |pid| {
        tracing::info!(
            dir = %state_dir.display(),
            "waiting for {} to finish with the coordinator state",
            crate::fsutil::holder(pid)
        );
    })
    .map_err(|e| match e {
        LockError::Held { pid, .. } => ServeError::InitTimeout {
            dir: state_dir.to_path_buf(),
            pid,
        },
        e => e.into(),
    })
}

/// `serve`: the identity (the file one, or the database's with PostgreSQL, made by
/// the first replica) and the default organization (made on the first start).
fn finish_open(
    store: &mut Box<dyn Store>,
    file_identity: Option<Identity>,
) -> Result<(Identity, bool), ServeError> {
    let identity = match (store.cluster_identity(), file_identity) {
        (Some(shared), _) => shared_identity(shared)?,
        (None, Some(identity)) => identity,
        (None, None) => return Err(ServeError::Task("no TLS identity was loaded".into())),
    };
    let first_start = store.ensure_default_org(unix_now())?;
    Ok((identity, first_start))
}

/// Admin commands: as [`finish_open`], but `missing` when the identity or the
/// default organization is not there yet.
fn finish_existing(
    store: &mut Box<dyn Store>,
    file_identity: Option<Identity>,
    missing: ServeError,
) -> Result<Identity, ServeError> {
    let identity = match store.cluster_identity() {
        Some(shared) => shared
            .identity()?
            .map(|(cert, key)| Identity::from_der(cert, key)),
        None => file_identity,
    };
    let Some(identity) = identity else {
        return Err(missing);
    };
    match store.org_by_name(DEFAULT_ORG) {
        Err(StoreError::OrgNotFound(_)) => Err(missing),
        other => other.map(|_| identity).map_err(ServeError::from),
    }
}

/// The identity every replica on this database presents: made by the first one.
fn shared_identity(store: &mut dyn ClusterIdentity) -> Result<Identity, ServeError> {
    if let Some((cert, key)) = store.identity()? {
        return Ok(Identity::from_der(cert, key));
    }
    let made = Identity::generate()?;
    let (cert, key) = store.insert_identity(&made.cert_der, made.key_der(), unix_now())?;
    if cert == made.cert_der {
        tracing::info!("created the coordinator TLS identity in the database");
    }
    Ok(Identity::from_der(cert, key))
}
