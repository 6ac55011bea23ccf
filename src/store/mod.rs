//! The coordinator's persistent state, behind one narrow interface: the [`Store`] trait.
//!
//! Two implementations keep the same semantics:
//!
//! - [`SqliteStore`] (rusqlite, bundled), the embedded default: one file, WAL, one
//!   writer at a time (`BEGIN IMMEDIATE`), a busy timeout so admin commands can work on
//!   the file while `serve` runs. `schema.sql` at the repo root is its DDL.
//! - [`PgStore`] (PostgreSQL), for several coordinator replicas on one database.
//!   `schema.pg.sql` is its DDL (the same tables, plus `cluster_*` tables for what the
//!   replicas share); a test checks that both describe the same columns.
//!
//! Every device change appends to the `changes` log in the same transaction; watchers
//! tail that log, so revisions must become visible in order (PostgreSQL: the log is
//! appended under a table lock held to commit). Address allocation runs inside the
//! registering transaction, and the schema's UNIQUE constraints back it up: no address
//! is ever live twice, even when two replicas allocate at once (the loser retries).
//!
//! The flows (register, log in, update, online state, …) are written once: the
//! provided methods of [`Store`] and `flow`, over a narrow interface each backend
//! implements (`flow::Engine`: transactions and the retry policy; `flow::Tx`: the
//! queries in its SQL dialect). `rows` decodes rows of either driver. This module
//! holds no SQL; each backend holds nothing but its connection, dialect and retries
//! (and, for PostgreSQL, what replicas share).

mod addrs;
mod flow;
mod migrate;
pub mod pg;
mod records;
mod rows;
mod rules;
pub mod sqlite;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod testpg;

use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

use crate::coord::ipam::{self, IpamError};
use crate::coord::names;
use crate::policy::Policy;
use crate::policy::approve::{self, AdminDevice};
use crate::wire::control::{Approved, Device, DeviceUpdate, RegisterRequest};
use flow::{Engine, Read};
use rows::Token;

pub use flow::POLICY_CHANGE_ID;
pub use pg::PgStore;
pub use records::{
    AdminKey, Change, LogEntry, Organization, PathReport, Presence, Registration, StoredPolicy,
    TokenInfo,
};
pub use rules::AdvertisedBy;
pub(crate) use rules::{
    apply_update, check_advertised, check_approved_routes, check_new_org, check_register,
    unmanaged_request,
};
pub use sqlite::SqliteStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(#[from] postgres::Error),
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
    /// The id is for logs and tests only: the owner may be in another organization,
    /// so the message does not name it.
    #[error("this public key is already registered")]
    DuplicateKey(i64),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("organization {0:?} not found")]
    OrgNotFound(String),
    #[error("organization {0:?} already exists")]
    OrgExists(String),
    #[error("device {0} not found")]
    DeviceNotFound(i64),
    #[error("join token {0} not found")]
    TokenNotFound(i64),
    #[error("admin key {0} not found (or already revoked)")]
    KeyNotFound(i64),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Unavailable(String),
    /// Another node process with this device's credential holds a watch stream (see
    /// [`Store::claim_watch`]).
    #[error(
        "device {id} already connected from {from}: is this a copy of that node's state \
         directory? Give this node its own state directory and join token"
    )]
    Connected { id: i64, from: String },
}

impl StoreError {
    /// A failure of the database itself (not of the request): logged as an error and
    /// answered as an internal error.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            Self::Sqlite(_)
                | Self::Postgres(_)
                | Self::Schema(_)
                | Self::Corrupt(_)
                | Self::Unavailable(_)
        )
    }
}

pub use crate::wire::control::PeerPath;

/// The results of a batch whose transaction failed: the error for the first, its
/// text for the others.
pub(crate) fn fail_all(e: StoreError, n: usize) -> Vec<Result<Device, StoreError>> {
    let text = e.to_string();
    let mut out = Vec::with_capacity(n);
    out.push(Err(e));
    out.extend((1..n).map(|_| Err(StoreError::Unavailable(text.clone()))));
    out
}

/// Name of the organization created on first start.
pub const DEFAULT_ORG: &str = "default";

/// Where the coordinator's state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file (the embedded default; one coordinator process).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://…` or `host=… dbname=…`), shared by
    /// any number of coordinator replicas.
    Postgres(String),
}

impl Database {
    /// For logs: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(p) => p.display().to_string(),
            Self::Postgres(url) => pg::redact(url),
        }
    }
}

/// Opens (creating or migrating) the database.
pub fn open(db: &Database) -> Result<Box<dyn Store>, StoreError> {
    Ok(match db {
        Database::Sqlite(path) => Box::new(SqliteStore::open(path)?),
        Database::Postgres(url) => Box::new(PgStore::connect(url)?),
    })
}

/// The coordinator's state: organizations, join tokens, devices and the change log.
///
/// Every mutation is one transaction: it changes everything or nothing. Methods take
/// `&mut self` because a database connection is used by one caller at a time (the
/// coordinator keeps one store per process behind a mutex).
///
/// A backend provides [`Store::engine`] (its connection, transactions and retry
/// policy, over its SQL dialect) and what only it knows: how a coordinator process
/// starts ([`Store::reset_online`]) and stays alive ([`Store::heartbeat`]). Every other
/// method is provided here, once for both backends (see `flow`).
pub trait Store: Send {
    /// "sqlite" or "postgres", for logs.
    fn backend(&self) -> &'static str;

    /// The backend's transactions (not for use outside the store).
    #[doc(hidden)]
    fn engine(&mut self) -> &mut dyn Engine;

    /// A coordinator process starts and knows of no live watch. SQLite (one process):
    /// every device goes offline. PostgreSQL: this replica registers itself, and the
    /// watches of replicas that stopped heartbeating are dropped. Returns how many
    /// devices went offline.
    fn reset_online(&mut self, now: i64) -> Result<usize, StoreError>;

    /// The TLS identity kept in the database for every coordinator on it (PostgreSQL
    /// replicas); `None` where the identity is not the database's (SQLite: files next
    /// to it).
    fn cluster_identity(&mut self) -> Option<&mut dyn ClusterIdentity> {
        None
    }

    /// Called every few seconds by a running coordinator. PostgreSQL: proves this
    /// replica alive and expires dead ones (their devices go offline unless another
    /// replica watches them); returns true if this replica had itself been expired,
    /// so the caller must record its watches again. SQLite: nothing to do.
    fn heartbeat(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// A coordinator process stops: the watch streams it held no longer make another
    /// process with their device's credential a clone (PostgreSQL; the devices stay
    /// online until they reconnect elsewhere or the replica expires). SQLite: nothing
    /// to do.
    fn leave(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    /// The highest revision committed so far (0 for an empty log).
    fn current_revision(&mut self) -> Result<i64, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.current_revision())
    }

    /// Creates an organization with the default DNS domain.
    fn create_org(
        &mut self,
        name: &str,
        ip_cidr: Ipv4Net,
        ip_cidr_v6: Ipv6Net,
        now: i64,
    ) -> Result<Organization, StoreError> {
        self.create_org_in(name, ip_cidr, ip_cidr_v6, names::DEFAULT_DOMAIN, now)
    }

    /// Creates an organization whose devices are named under `domain`.
    fn create_org_in(
        &mut self,
        name: &str,
        ip_cidr: Ipv4Net,
        ip_cidr_v6: Ipv6Net,
        domain: &str,
        now: i64,
    ) -> Result<Organization, StoreError> {
        check_new_org(name, ip_cidr, ip_cidr_v6)?;
        let domain = names::domain(domain).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut org = Organization {
            id: 0,
            name: name.into(),
            ip_cidr,
            ip_cidr_v6,
            domain,
        };
        org.id = flow::write(self.engine(), |tx, _| {
            if tx.org_by_name(name)?.is_some() {
                return Err(StoreError::OrgExists(name.into()));
            }
            tx.insert_org(&org, now)
        })?;
        Ok(org)
    }

    /// Creates the default organization unless it exists; true if it was created.
    fn ensure_default_org(&mut self, now: i64) -> Result<bool, StoreError> {
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

    fn org_by_name(&mut self, name: &str) -> Result<Organization, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.org_by_name(name))?
            .ok_or_else(|| StoreError::OrgNotFound(name.into()))
    }

    fn orgs(&mut self) -> Result<Vec<Organization>, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.orgs())
    }

    /// Stores a join token by the hash of its secret.
    fn create_token(
        &mut self,
        organization_id: i64,
        secret_hash: &str,
        reusable: bool,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<i64, StoreError> {
        let token = Token {
            id: 0,
            organization_id,
            reusable,
            expires_at,
        };
        flow::write(self.engine(), |tx, _| {
            tx.insert_token(&token, secret_hash, now)
        })
    }

    /// Registers a device with a join token: checks the token, allocates both
    /// addresses, checks advertised prefixes and inserts the device, all in one
    /// transaction.
    fn register_device(
        &mut self,
        req: &RegisterRequest,
        token_hash: &str,
        credential_hash: &str,
        now: i64,
    ) -> Result<Device, StoreError> {
        let one = Registration {
            req,
            token_hash,
            credential_hash,
        };
        self.register_devices(&[one], now)
            .pop()
            .unwrap_or_else(|| Err(StoreError::Unavailable("empty batch result".into())))
    }

    /// Registers several devices in one transaction, so that they share one commit
    /// (one disk flush): each gets what `register_device` alone would have given it,
    /// in order, as if they had come one after the other. Refusals (bad token, address
    /// taken, …) stay with their own registration; a failure of the database fails
    /// them all, and then nothing was written.
    fn register_devices(
        &mut self,
        batch: &[Registration<'_>],
        now: i64,
    ) -> Vec<Result<Device, StoreError>> {
        flow::register_devices(self.engine(), batch, now)
    }

    /// Registers a device that runs stock WireGuard (admin only, no token): a
    /// relay-only spoke with both addresses, which never logs in.
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
        flow::write(self.engine(), |tx, addrs| {
            let org = organization_id;
            flow::load_org(tx, org)?;
            let id = flow::insert_device(tx, addrs, org, &req, credential_hash, true, now)?;
            tx.log_new_devices(&[(org, id)], now)?
                .pop()
                .ok_or(StoreError::DeviceNotFound(id))
        })
    }

    /// Checks a device credential; returns the device.
    fn authenticate(
        &mut self,
        device_id: i64,
        credential_hash: &str,
    ) -> Result<Device, StoreError> {
        match flow::read(self.engine(), Read::Plain, |tx| tx.credential(device_id))? {
            Some((stored, device)) if stored == credential_hash => Ok(device),
            _ => Err(StoreError::Unauthorized),
        }
    }

    /// Reconnect: checks the credential, refreshes `last_seen` and, if the host's IPv6
    /// support changed, gives or takes the v6 address (a recorded change).
    fn login(
        &mut self,
        device_id: i64,
        credential_hash: &str,
        ipv6_supported: Option<bool>,
        now: i64,
    ) -> Result<Device, StoreError> {
        let device = self.authenticate(device_id, credential_hash)?;
        flow::write(self.engine(), |tx, addrs| {
            flow::login(tx, addrs, &device, ipv6_supported, now)
        })
    }

    /// Applies a device's change to itself.
    fn update_device(
        &mut self,
        device_id: i64,
        update: &DeviceUpdate,
        now: i64,
    ) -> Result<Device, StoreError> {
        flow::write(self.engine(), |tx, _| {
            let mut d = tx
                .lock_device(device_id)?
                .ok_or(StoreError::DeviceNotFound(device_id))?;
            let before = d.clone();
            apply_update(&mut d, update)?;
            if d == before {
                // Nothing changed: no revision, no delta, no log entry.
                tx.touch(device_id, now)?;
                return tx
                    .device(device_id)?
                    .ok_or(StoreError::DeviceNotFound(device_id));
            }
            if let Some(cidrs) = update.advertise_cidrs.as_ref().filter(|c| !c.is_empty()) {
                let org = flow::load_org(tx, d.organization_id)?;
                let others = tx.advertisers(d.organization_id)?;
                check_advertised(&org, &others, Some(device_id), cidrs)?;
            }
            if d.hostname != before.hostname
                && names::normalize(&d.hostname) != names::normalize(&before.hostname)
            {
                // Renamed: a new name, its old one if that is still the best.
                d.name = flow::free_name(tx, d.organization_id, &d.hostname, Some(&before.name))?;
            }
            d.revision = tx.record_change(d.organization_id, device_id, flow::UPSERT, now)?;
            d.last_seen = now;
            tx.update_device(&rows::Encoded::new(&d)?)?;
            tx.device(device_id)?
                .ok_or(StoreError::DeviceNotFound(device_id))
        })
    }

    /// This coordinator process gained its first (`true`) or lost its last watch
    /// stream of a device. The device is online while any coordinator holds one;
    /// a change is recorded only if that changed.
    fn set_online(&mut self, device_id: i64, online: bool, now: i64) -> Result<(), StoreError> {
        flow::write(self.engine(), |tx, _| {
            flow::set_online(tx, device_id, online, now)
        })
    }

    /// A watch stream of the device, opened by node process `instance` (its random
    /// id) from `remote`, begins on this coordinator process. Refused with
    /// [`StoreError::Connected`] (naming the first one's address) while another
    /// process of this device holds a watch stream through another coordinator that
    /// is alive (PostgreSQL: a replica that heartbeated in the last
    /// [`pg::SESSION_TIMEOUT_SECS`]): a cloned state directory. Streams of the same
    /// process through other replicas are taken over (the node failed over). SQLite
    /// has one coordinator process, whose hub knows its streams: nothing to check.
    fn claim_watch(
        &mut self,
        device_id: i64,
        instance: Option<u64>,
        remote: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        flow::write(self.engine(), |tx, _| {
            flow::claim_watch(tx, device_id, instance, remote, now)
        })
    }

    /// Logins and online changes of many devices in one transaction (one disk flush),
    /// each as if it had come alone, in order: a login gives its device, an online
    /// change nothing. Refusals (a bad credential) stay with their own item; a failure
    /// of the database fails them all, and then nothing was written.
    fn presence(
        &mut self,
        batch: &[Presence<'_>],
        now: i64,
    ) -> Vec<Result<Option<Device>, StoreError>> {
        flow::presence(self.engine(), batch, now)
    }

    /// Removes a device; its addresses return to the pool.
    fn remove_device(&mut self, device_id: i64, now: i64) -> Result<(), StoreError> {
        flow::write(self.engine(), |tx, _| {
            let org = tx
                .delete_device(device_id)?
                .ok_or(StoreError::DeviceNotFound(device_id))?;
            tx.record_change(org, device_id, flow::REMOVE, now)?;
            Ok(())
        })
    }

    fn device(&mut self, device_id: i64) -> Result<Option<Device>, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.device(device_id))
    }

    /// Every device of an organization as stored: what each claims, and what an
    /// admin approved (peers see [`Store::peer_devices`]).
    fn devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.devices(organization_id))
    }

    /// Every device of an organization as its peers see it: claims reduced to what
    /// is approved (`policy::approve::effective`).
    fn peer_devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError> {
        Ok(self.snapshot(organization_id)?.1)
    }

    /// Every device of an organization as the admin sees it: as stored, with what is
    /// in effect and what is pending.
    fn admin_devices(&mut self, organization_id: i64) -> Result<Vec<AdminDevice>, StoreError> {
        flow::read(self.engine(), Read::Snapshot, |tx| {
            let approve = flow::approvals(tx, organization_id)?;
            Ok(tx
                .devices(organization_id)?
                .into_iter()
                .map(|d| AdminDevice::new(d, approve.as_ref()))
                .collect())
        })
    }

    /// Every device of an organization as its peers see it (see
    /// [`Store::peer_devices`]) and the revision they reflect, read consistently.
    fn snapshot(&mut self, organization_id: i64) -> Result<(i64, Vec<Device>), StoreError> {
        flow::read(self.engine(), Read::Snapshot, |tx| {
            let approve = flow::approvals(tx, organization_id)?;
            let devices = tx.devices(organization_id)?;
            let devices = devices
                .iter()
                .map(|d| approve::effective(d, approve.as_ref()))
                .collect();
            Ok((tx.current_revision()?, devices))
        })
    }

    /// Drops the change log's entries older than the newest `keep` revisions (the
    /// newest entry always stays: it is the current revision); returns how many.
    fn prune_changes(&mut self, keep: i64) -> Result<u64, StoreError> {
        flow::write(self.engine(), |tx, _| {
            let below = tx.current_revision()?.saturating_sub(keep.max(1)) + 1;
            tx.prune_changes(below)
        })
    }

    /// The oldest revision still in the change log (0 when it is empty): a reader
    /// whose last revision is below it minus one missed pruned changes.
    fn oldest_revision(&mut self) -> Result<i64, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.oldest_revision())
    }

    /// The change log's entries after `revision` other than online flips (see
    /// [`LogEntry`]), oldest first.
    fn content_changes(&mut self, revision: i64) -> Result<Vec<LogEntry>, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| {
            tx.content_changes(revision)
        })
    }

    /// The database's random identity (made with its schema): a revision is only
    /// meaningful with the database it came from. A watcher that resumes names it, so
    /// a revision from a wiped or other database is never trusted.
    fn database_id(&mut self) -> Result<i64, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.database_id())
    }

    /// Changes after `revision`, oldest first, at most `limit`, each with the device's
    /// current state as its peers see it (claims reduced to what is approved: this
    /// is what the hub sends watchers).
    fn changes_since(&mut self, revision: i64, limit: usize) -> Result<Vec<Change>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        flow::read(self.engine(), Read::Plain, |tx| {
            let mut changes = tx.changes_since(revision, limit)?;
            let mut policies = std::collections::HashMap::new();
            for c in &mut changes {
                let Some(d) = c.device.as_mut() else { continue };
                let approve = match policies.entry(c.organization_id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(flow::approvals(tx, c.organization_id)?)
                    }
                };
                *d = approve::effective(d, approve.as_ref());
            }
            Ok(changes)
        })
    }

    /// An admin approves claims of a device (DESIGN §13): `routes` (a prefix inside
    /// one counts), the relay and exit roles. Nothing named: everything the device
    /// claims now. One transaction; the device's peers get its new effective claims.
    /// `organization_id`: the device must belong to it.
    fn approve(
        &mut self,
        organization_id: Option<i64>,
        device_id: i64,
        routes: &[IpNet],
        relay: bool,
        exit: bool,
        now: i64,
    ) -> Result<Device, StoreError> {
        check_approved_routes(routes)?;
        let everything = routes.is_empty() && !relay && !exit;
        flow::edit_approvals(self.engine(), organization_id, device_id, now, &|d, a| {
            if everything {
                approve::grant(a, &d.advertise_cidrs, d.relay, d.exit_node);
            } else {
                approve::grant(a, routes, relay, exit);
            }
        })
    }

    /// An admin takes approvals back: every approved prefix that overlaps one of
    /// `routes`, the relay and exit roles. Nothing named: every approval of the
    /// device. One transaction; peers drop what is no longer approved.
    fn revoke(
        &mut self,
        organization_id: Option<i64>,
        device_id: i64,
        routes: &[IpNet],
        relay: bool,
        exit: bool,
        now: i64,
    ) -> Result<Device, StoreError> {
        check_approved_routes(routes)?;
        let everything = routes.is_empty() && !relay && !exit;
        flow::edit_approvals(self.engine(), organization_id, device_id, now, &|_, a| {
            if everything {
                *a = Approved::default();
            } else {
                approve::withdraw(a, routes, relay, exit);
            }
        })
    }

    /// Validates a policy file and makes it the organization's (the old one stays if
    /// it does not validate); devices whose effective claims change get a change.
    /// Returns its revision.
    fn set_policy(
        &mut self,
        organization_id: i64,
        text: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        Policy::parse(text)?;
        flow::write(self.engine(), |tx, _| {
            flow::put_policy(tx, organization_id, Some(text), now)
        })?
        .ok_or_else(|| StoreError::Unavailable("policy stored without a revision".into()))
    }

    /// The organization's policy, if it has one.
    fn policy(&mut self, organization_id: i64) -> Result<Option<StoredPolicy>, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.policy(organization_id))
    }

    /// Removes the organization's policy (everything allowed, nothing approved in
    /// advance); true if there was one.
    fn clear_policy(&mut self, organization_id: i64, now: i64) -> Result<bool, StoreError> {
        flow::write(self.engine(), |tx, _| {
            let had = tx.policy(organization_id)?.is_some();
            flow::put_policy(tx, organization_id, None, now)?;
            Ok(had)
        })
    }

    /// Join tokens of an organization (every organization's with `None`), by id.
    fn tokens(&mut self, organization_id: Option<i64>) -> Result<Vec<TokenInfo>, StoreError> {
        let org = organization_id.unwrap_or(0);
        flow::read(self.engine(), Read::Plain, |tx| tx.tokens(org))
    }

    /// Deletes a join token (it can join nothing more); `TokenNotFound` if there is
    /// none with this id (in this organization, when one is given).
    fn revoke_token(&mut self, organization_id: Option<i64>, id: i64) -> Result<(), StoreError> {
        flow::write(self.engine(), |tx, _| {
            let found = tx
                .tokens(organization_id.unwrap_or(0))?
                .iter()
                .any(|t| t.id == id);
            if !found || tx.delete_token(id)? == 0 {
                return Err(StoreError::TokenNotFound(id));
            }
            Ok(())
        })
    }

    /// Stores an admin key by the hash of its secret; returns its id.
    fn create_admin_key(&mut self, name: &str, hash: &str, now: i64) -> Result<i64, StoreError> {
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(StoreError::Invalid(
                "an admin key's name is 1 to 64 printable characters".into(),
            ));
        }
        flow::write(self.engine(), |tx, _| tx.insert_admin_key(name, hash, now))
    }

    fn admin_keys(&mut self) -> Result<Vec<AdminKey>, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| tx.admin_keys())
    }

    /// Revokes an admin key; `KeyNotFound` if no key in force has this id.
    fn revoke_admin_key(&mut self, id: i64, now: i64) -> Result<(), StoreError> {
        flow::write(self.engine(), |tx, _| {
            if tx.revoke_admin_key(id, now)? == 0 {
                return Err(StoreError::KeyNotFound(id));
            }
            Ok(())
        })
    }

    /// Replaces what a device reported about its paths (at most
    /// [`crate::wire::control::MAX_PATH_REPORTS`] peers are kept).
    fn report_paths(
        &mut self,
        device_id: i64,
        paths: &[PeerPath],
        now: i64,
    ) -> Result<(), StoreError> {
        let paths = &paths[..paths.len().min(crate::wire::control::MAX_PATH_REPORTS)];
        flow::write(self.engine(), |tx, _| {
            tx.put_path_reports(device_id, paths, now)
        })
    }

    /// The path reports of an organization's devices.
    fn path_reports(&mut self, organization_id: i64) -> Result<Vec<PathReport>, StoreError> {
        flow::read(self.engine(), Read::Plain, |tx| {
            tx.path_reports(organization_id)
        })
    }
}

/// A stored TLS identity: DER certificate, PKCS#8 DER key.
pub type IdentityDer = (Vec<u8>, Vec<u8>);

/// The TLS identity shared by the coordinators on one database.
pub trait ClusterIdentity {
    /// The stored identity, if there is one.
    fn identity(&mut self) -> Result<Option<IdentityDer>, StoreError>;

    /// Stores `cert` and `key` unless another coordinator stored an identity first;
    /// returns the stored one.
    fn insert_identity(
        &mut self,
        cert: &[u8],
        key: &[u8],
        now: i64,
    ) -> Result<IdentityDer, StoreError>;
}

#[cfg(test)]
mod tests;
