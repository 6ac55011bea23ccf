//! The narrow interface a backend implements, and the store's multi-step flows
//! written once over it.
//!
//! A backend supplies an [`Engine`]: transactions on its connection, with its retry
//! policy. Inside one, the flows see a [`Tx`]: the few queries they need, in the
//! backend's SQL dialect. Registration, login, updates and the online state are
//! written here (and in the provided methods of [`super::Store`]) once, so both
//! backends refuse and change exactly the same things.
//!
//! Lock order (what PostgreSQL replicas need, and harmless for SQLite's single
//! writer): a flow takes every row lock it needs before it appends to the change log;
//! a registration batch logs all its devices last ([`Tx::log_new_devices`]).
//! Addresses taken by the transaction in progress are reserved in the [`AddrCache`]
//! until its changes are logged, so the cache is only ever filled from committed rows.

use std::collections::HashSet;
use std::net::IpAddr;

use super::addrs::{AddrCache, AddrChange, AddrSource, DeviceAddrs};
use super::rows::{Encoded, Token};
use super::{
    AdvertisedBy, Change, LogEntry, Organization, Registration, StoreError, StoredPolicy,
    check_advertised, check_register, fail_all,
};
use crate::coord::names;
use crate::policy::approve::effective;
use crate::policy::{Approve, Policy};
use crate::wire::control::{Approved, Device, RegisterRequest};
use crate::wire::control::{first_v4, first_v6};

/// The kind of a change-log entry.
pub const UPSERT: &str = "upsert";
pub const REMOVE: &str = "remove";
/// A device went online or offline and nothing else about it changed: a watcher that
/// resumes from an older revision is sent its flag, not its record.
pub const ONLINE: &str = "online";
/// The organization's policy changed; the entry's device id is [`POLICY_CHANGE_ID`].
pub const POLICY: &str = "policy";
/// The device id of a policy change (no device has id 0).
pub const POLICY_CHANGE_ID: i64 = 0;

/// Reads, with the consistency they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Each query on its own (no transaction).
    Plain,
    /// Every query of the call sees the same committed state.
    Snapshot,
}

/// The work of a write transaction.
pub type WriteFn<'a> = dyn FnMut(&mut dyn Tx, &mut AddrCache) -> Result<(), StoreError> + 'a;
/// The work of a read.
pub type ReadFn<'a> = dyn FnMut(&mut dyn Tx) -> Result<(), StoreError> + 'a;

/// A backend's connection and transactions.
pub trait Engine {
    /// Runs `f` in a write transaction and commits it, running it again as the
    /// backend's retry policy says. Reservations in the cache are released when each
    /// attempt ends; the cache is cleared where it may be behind the database.
    fn write(&mut self, f: &mut WriteFn<'_>) -> Result<(), StoreError>;

    /// Runs reads.
    fn read(&mut self, mode: Read, f: &mut ReadFn<'_>) -> Result<(), StoreError>;
}

/// The queries of the flows, in one backend's dialect, on one connection or inside
/// one transaction. Writes return how many rows they changed.
pub trait Tx {
    /// The highest revision committed so far (0 for an empty log).
    fn current_revision(&mut self) -> Result<i64, StoreError>;
    fn device(&mut self, id: i64) -> Result<Option<Device>, StoreError>;
    /// The device, its row locked to the end of the transaction.
    fn lock_device(&mut self, id: i64) -> Result<Option<Device>, StoreError>;
    /// The device and its credential hash.
    fn credential(&mut self, id: i64) -> Result<Option<(String, Device)>, StoreError>;
    /// An organization's devices, by id.
    fn devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError>;
    /// The id of the device with this public key.
    fn device_with_key(&mut self, public_key: &str) -> Result<Option<i64>, StoreError>;
    fn org(&mut self, id: i64) -> Result<Option<Organization>, StoreError>;
    fn org_by_name(&mut self, name: &str) -> Result<Option<Organization>, StoreError>;
    fn orgs(&mut self) -> Result<Vec<Organization>, StoreError>;
    /// The devices of an organization that advertise prefixes.
    fn advertisers(&mut self, organization_id: i64) -> Result<Vec<AdvertisedBy>, StoreError>;
    /// The oldest revision in the change log (0 for an empty log).
    fn oldest_revision(&mut self) -> Result<i64, StoreError>;
    /// Takes the address-allocation lock, held to the end of the transaction, so
    /// that allocations of concurrent transactions (other PostgreSQL replicas) take
    /// turns and each sees what the one before it committed. SQLite's write
    /// transactions already run one at a time: nothing to do.
    fn lock_addresses(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Deletes the change log's entries below revision `below`; returns how many.
    fn prune_changes(&mut self, below: i64) -> Result<u64, StoreError>;
    /// Log entries after `revision`, oldest first, each with the device now.
    fn changes_since(&mut self, revision: i64, limit: i64) -> Result<Vec<Change>, StoreError>;
    /// The log's entries after `revision` other than [`ONLINE`] ones: (revision,
    /// organization, device id, whether the device was removed), oldest first.
    fn content_changes(&mut self, revision: i64) -> Result<Vec<LogEntry>, StoreError>;
    /// The database's random identity, made when its schema was created.
    fn database_id(&mut self) -> Result<i64, StoreError>;
    /// Every device's addresses.
    fn addrs(&mut self) -> Result<Vec<DeviceAddrs>, StoreError>;
    /// As [`Tx::changes_since`], with the device's addresses.
    fn changed_addrs(&mut self, revision: i64, limit: i64) -> Result<Vec<AddrChange>, StoreError>;

    fn insert_org(&mut self, org: &Organization, now: i64) -> Result<i64, StoreError>;
    /// Stores a token (its `id` is ignored); returns its id.
    fn insert_token(&mut self, t: &Token, secret_hash: &str, now: i64) -> Result<i64, StoreError>;
    fn token(&mut self, secret_hash: &str) -> Result<Option<Token>, StoreError>;
    /// How often a token was used, its row locked to the end of the transaction
    /// (two replicas must not both spend a single-use token).
    fn lock_token_uses(&mut self, id: i64) -> Result<i64, StoreError>;
    fn spend_token(&mut self, id: i64) -> Result<u64, StoreError>;
    /// Tokens of one organization (every one's with 0), by id.
    fn tokens(&mut self, organization_id: i64) -> Result<Vec<super::TokenInfo>, StoreError>;
    /// Deletes a token; returns how many rows went.
    fn delete_token(&mut self, id: i64) -> Result<u64, StoreError>;
    fn insert_admin_key(&mut self, name: &str, hash: &str, now: i64) -> Result<i64, StoreError>;
    fn admin_keys(&mut self) -> Result<Vec<super::AdminKey>, StoreError>;
    fn revoke_admin_key(&mut self, id: i64, now: i64) -> Result<u64, StoreError>;
    /// Replaces a device's path reports.
    fn put_path_reports(
        &mut self,
        device_id: i64,
        reports: &[super::PeerPath],
        now: i64,
    ) -> Result<(), StoreError>;
    fn path_reports(&mut self, organization_id: i64) -> Result<Vec<super::PathReport>, StoreError>;

    /// Inserts a device (its `id`, `revision` and `online` are ignored; `last_seen`
    /// is also its creation time) without logging it; returns its id.
    fn insert_device(&mut self, e: &Encoded<'_>, credential_hash: &str) -> Result<i64, StoreError>;
    /// Writes what a device may change about itself, its name, revision and `last_seen`.
    fn update_device(&mut self, e: &Encoded<'_>) -> Result<u64, StoreError>;
    /// Whether a device of the organization has this name (an index lookup).
    fn name_taken(&mut self, organization_id: i64, name: &str) -> Result<bool, StoreError>;
    /// The device names of an organization that are `base` or start with `base-`
    /// (scans the organization's devices).
    fn names_like(&mut self, organization_id: i64, base: &str) -> Result<Vec<String>, StoreError>;
    /// Sets a device's name.
    fn set_name(&mut self, id: i64, name: &str) -> Result<u64, StoreError>;
    /// (id, organization, hostname) of devices without a name, by id.
    fn unnamed(&mut self) -> Result<Vec<(i64, i64, String)>, StoreError>;
    /// Sets `last_seen`.
    fn touch(&mut self, id: i64, now: i64) -> Result<u64, StoreError>;
    /// Writes a device's IPv6 support and address.
    fn set_ipv6(&mut self, d: &Device) -> Result<u64, StoreError>;
    /// (organization, online) of a device, its row locked to the end of the
    /// transaction.
    fn lock_online(&mut self, id: i64) -> Result<Option<(i64, bool)>, StoreError>;
    /// Records that this coordinator process holds (or no longer holds) a watch
    /// stream of the device; returns whether any coordinator holds one now.
    fn watch(&mut self, id: i64, watching: bool) -> Result<bool, StoreError>;
    /// Where another node process than `instance` holds a live watch stream of the
    /// device through another coordinator process, if one does (a cloned state
    /// directory). SQLite: one coordinator process, whose hub knows all its streams:
    /// never.
    fn session_elsewhere(
        &mut self,
        _id: i64,
        _instance: u64,
    ) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
    /// Records that this coordinator process holds a watch stream of the device for
    /// node process `instance` at `remote`, taking over the streams of the same
    /// process through other coordinators (a node that failed over). SQLite: nothing
    /// to record.
    fn claim_watch(
        &mut self,
        _id: i64,
        _instance: Option<u64>,
        _remote: &str,
        _now: i64,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// Sets `online` and `last_seen`.
    fn set_online(&mut self, id: i64, online: bool, now: i64) -> Result<u64, StoreError>;
    /// Deletes a device; returns its organization, `None` if there was none.
    fn delete_device(&mut self, id: i64) -> Result<Option<i64>, StoreError>;

    /// An organization's devices, by id, their rows locked to the end of the
    /// transaction.
    fn lock_devices(&mut self, organization_id: i64) -> Result<Vec<Device>, StoreError>;
    /// Writes a device's approvals (`Device::approved`).
    fn set_approved(&mut self, e: &Encoded<'_>) -> Result<u64, StoreError>;
    fn policy(&mut self, organization_id: i64) -> Result<Option<StoredPolicy>, StoreError>;
    /// Stores an organization's policy text; returns its revision.
    fn put_policy(&mut self, organization_id: i64, text: &str, now: i64)
    -> Result<i64, StoreError>;
    /// Clears an organization's policy (its revision counts on).
    fn clear_policy(&mut self, organization_id: i64, now: i64) -> Result<u64, StoreError>;

    /// Appends a change and returns its revision. Called after every row lock the
    /// transaction needs is taken.
    fn record_change(&mut self, org: i64, id: i64, kind: &str, at: i64) -> Result<i64, StoreError>;
    fn set_revision(&mut self, id: i64, revision: i64) -> Result<u64, StoreError>;

    /// Logs new devices' changes (organization, device id; one revision each, in
    /// order) and stamps their revisions; returns the devices as stored, in any order.
    fn log_new_devices(&mut self, new: &[(i64, i64)], now: i64) -> Result<Vec<Device>, StoreError> {
        new.iter()
            .map(|&(org, id)| {
                let revision = self.record_change(org, id, UPSERT, now)?;
                self.set_revision(id, revision)?;
                self.device(id)?.ok_or(StoreError::DeviceNotFound(id))
            })
            .collect()
    }
}

impl<T: Tx + ?Sized> AddrSource for T {
    fn load_all(&mut self) -> Result<(i64, Vec<DeviceAddrs>), StoreError> {
        let revision = self.current_revision()?;
        Ok((revision, self.addrs()?))
    }

    fn changed_since(
        &mut self,
        revision: i64,
        limit: usize,
    ) -> Result<Vec<AddrChange>, StoreError> {
        self.changed_addrs(revision, i64::try_from(limit).unwrap_or(i64::MAX))
    }

    fn oldest_revision(&mut self) -> Result<i64, StoreError> {
        Tx::oldest_revision(self)
    }

    fn lock_for_allocation(&mut self) -> Result<(), StoreError> {
        self.lock_addresses()
    }
}

/// [`Engine::write`] returning what `f` returns.
pub fn write<T>(
    engine: &mut dyn Engine,
    mut f: impl FnMut(&mut dyn Tx, &mut AddrCache) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut out = None;
    engine.write(&mut |tx, addrs| {
        out = Some(f(tx, addrs)?);
        Ok(())
    })?;
    out.ok_or_else(|| StoreError::Unavailable("transaction ended without a result".into()))
}

/// [`Engine::read`] returning what `f` returns.
pub fn read<T>(
    engine: &mut dyn Engine,
    mode: Read,
    mut f: impl FnMut(&mut dyn Tx) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut out = None;
    engine.read(mode, &mut |tx| {
        out = Some(f(tx)?);
        Ok(())
    })?;
    out.ok_or_else(|| StoreError::Unavailable("read ended without a result".into()))
}

pub fn load_org(tx: &mut dyn Tx, id: i64) -> Result<Organization, StoreError> {
    tx.org(id)?
        .ok_or_else(|| StoreError::OrgNotFound(id.to_string()))
}

/// See [`super::Store::register_devices`]: one transaction; each registration up to
/// its device row, then the change log for all of them at once.
pub fn register_devices(
    engine: &mut dyn Engine,
    batch: &[Registration<'_>],
    now: i64,
) -> Vec<Result<Device, StoreError>> {
    let n = batch.len();
    write(engine, |tx, addrs| {
        // Before any token row is locked: a batch that locked a token and then
        // waited for the allocation lock could deadlock with one holding it.
        tx.lock_addresses()?;
        let mut out = Vec::with_capacity(n);
        let mut inserted = Vec::new();
        let mut slots = Vec::new();
        for r in batch {
            match register_one(tx, addrs, r, now) {
                Ok(new) => {
                    slots.push(out.len());
                    inserted.push(new);
                    out.push(Err(StoreError::Unavailable("not logged".into())));
                }
                // Only the database fails after a registration wrote something:
                // the whole attempt goes (and is retried where the backend retries).
                Err(e) if e.is_internal() => return Err(e),
                Err(e) => out.push(Err(e)),
            }
        }
        for device in tx.log_new_devices(&inserted, now)? {
            if let Some(i) = inserted.iter().position(|&(_, id)| id == device.id) {
                out[slots[i]] = Ok(device);
            }
        }
        Ok(out)
    })
    .unwrap_or_else(|e| fail_all(e, n))
}

/// One registration of a batch, up to its device row (the change is logged by the
/// caller, after every row lock is taken): returns (organization, device id). A
/// refusal comes before the first write.
fn register_one(
    tx: &mut dyn Tx,
    addrs: &mut AddrCache,
    r: &Registration<'_>,
    now: i64,
) -> Result<(i64, i64), StoreError> {
    check_register(r.req)?;
    let token = tx.token(r.token_hash)?.ok_or(StoreError::InvalidToken)?;
    if token.expires_at.is_some_and(|t| t <= now) {
        return Err(StoreError::TokenExpired);
    }
    if !token.reusable && tx.lock_token_uses(token.id)? > 0 {
        return Err(StoreError::TokenUsed);
    }
    let org = token.organization_id;
    let id = insert_device(tx, addrs, org, r.req, r.credential_hash, false, now)?;
    tx.spend_token(token.id)?;
    Ok((org, id))
}

/// Checks the key, allocates both addresses, checks advertised prefixes and inserts
/// a device (not logged yet: see [`Tx::log_new_devices`]); returns its id. Locks
/// nothing but its own new row.
pub fn insert_device(
    tx: &mut dyn Tx,
    addrs: &mut AddrCache,
    org_id: i64,
    req: &RegisterRequest,
    credential_hash: &str,
    unmanaged: bool,
    now: i64,
) -> Result<i64, StoreError> {
    if let Some(id) = tx.device_with_key(&req.public_key)? {
        return Err(StoreError::DuplicateKey(id));
    }
    let org = load_org(tx, org_id)?;
    let (v4, v6) = addrs.allocate(tx, &org, req)?;
    let name = free_name(tx, org_id, &req.hostname, None)?;
    if !req.advertise_cidrs.is_empty() {
        let others = tx.advertisers(org_id)?;
        check_advertised(&org, &others, None, &req.advertise_cidrs)?;
    }
    // Taken from now on in this transaction (its change is logged later).
    addrs.reserve(
        org_id,
        std::iter::once(IpAddr::V4(v4)).chain(v6.map(IpAddr::V6)),
    );
    let device = Device {
        id: 0,
        organization_id: org_id,
        public_key: req.public_key.clone(),
        hostname: req.hostname.clone(),
        os: req.os.clone(),
        tunnel_ip: v4,
        tunnel_ip_v6: v6,
        organization_prefix: org.ip_cidr,
        organization_prefix_v6: org.ip_cidr_v6,
        local_ip: first_v4(&req.endpoints),
        local_ip_v6: first_v6(&req.endpoints),
        endpoints: req.endpoints.clone(),
        reflexive_endpoint: None,
        reflexive_endpoint_v6: None,
        symmetric_nat: req.symmetric_nat,
        relay: req.relay,
        relay_only: req.relay_only,
        ipv6_supported: req.ipv6_supported,
        advertise_cidrs: req.advertise_cidrs.clone(),
        revision: 0,
        last_seen: now,
        unmanaged,
        online: false,
        exit_node: req.exit_node,
        approved: Approved::default(),
        name,
        domain: org.domain,
        use_exit: None,
    };
    tx.insert_device(&Encoded::new(&device)?, credential_hash)
}

/// The name a device with `hostname` gets in the organization (DESIGN §10): the
/// hostname's label, with `-2`, `-3`, … if taken (`keep`: a device's own current
/// name, free for it to keep).
pub fn free_name(
    tx: &mut dyn Tx,
    org: i64,
    hostname: &str,
    keep: Option<&str>,
) -> Result<String, StoreError> {
    let base = names::normalize(hostname);
    // The common case, a free name, costs one index lookup.
    if keep == Some(base.as_str()) || !tx.name_taken(org, &base)? {
        return Ok(base);
    }
    let taken: HashSet<String> = tx
        .names_like(org, &base)?
        .into_iter()
        .filter(|n| Some(n.as_str()) != keep)
        .collect();
    Ok(names::unique(&base, &taken))
}

/// Names the devices made before names existed, in registration (id) order; returns
/// how many. Runs when a coordinator opens the database.
pub fn name_unnamed(engine: &mut dyn Engine) -> Result<usize, StoreError> {
    write(engine, |tx, _| {
        let unnamed = tx.unnamed()?;
        for (id, org, hostname) in &unnamed {
            let name = free_name(tx, *org, hostname, None)?;
            tx.set_name(*id, &name)?;
        }
        Ok(unnamed.len())
    })
}

/// See [`super::Store::login`]; the credential was checked.
pub fn login(
    tx: &mut dyn Tx,
    addrs: &mut AddrCache,
    device: &Device,
    ipv6_supported: Option<bool>,
    now: i64,
) -> Result<Device, StoreError> {
    let id = device.id;
    // Locks the row before anything else.
    if tx.touch(id, now)? == 0 {
        return Err(StoreError::Unauthorized);
    }
    if let Some(v6) = ipv6_supported.filter(|&v6| v6 != device.ipv6_supported) {
        let mut d = device.clone();
        d.ipv6_supported = v6;
        d.tunnel_ip_v6 = if v6 {
            let org = load_org(tx, device.organization_id)?;
            Some(addrs.allocate_v6(tx, &org, device.tunnel_ip)?)
        } else {
            None
        };
        tx.set_ipv6(&d)?;
        let revision = tx.record_change(device.organization_id, id, UPSERT, now)?;
        tx.set_revision(id, revision)?;
    }
    tx.device(id)?.ok_or(StoreError::Unauthorized)
}

/// See [`super::Store::presence`].
pub fn presence(
    engine: &mut dyn Engine,
    batch: &[super::Presence<'_>],
    now: i64,
) -> Vec<Result<Option<Device>, StoreError>> {
    let n = batch.len();
    write(engine, |tx, addrs| {
        let mut out = Vec::with_capacity(n);
        for p in batch {
            let r = match *p {
                super::Presence::Login {
                    device_id,
                    credential_hash,
                    ipv6_supported,
                    instance,
                } => match tx.credential(device_id)? {
                    Some((stored, device)) if stored == credential_hash => {
                        match instance.map(|i| tx.session_elsewhere(device_id, i)) {
                            Some(Err(e)) => Err(e),
                            Some(Ok(Some(from))) => Err(StoreError::Connected {
                                id: device_id,
                                from,
                            }),
                            _ => login(tx, addrs, &device, ipv6_supported, now).map(Some),
                        }
                    }
                    _ => Err(StoreError::Unauthorized),
                },
                super::Presence::Online { device_id, online } => {
                    set_online(tx, device_id, online, now).map(|()| None)
                }
                super::Presence::Watch {
                    device_id,
                    instance,
                    remote,
                } => claim_watch(tx, device_id, instance, remote, now).map(|()| None),
            };
            match r {
                // Only the database fails after an item wrote something: the whole
                // attempt goes (and is retried where the backend retries).
                Err(e) if e.is_internal() => return Err(e),
                r => out.push(r),
            }
        }
        Ok(out)
    })
    .unwrap_or_else(|e| {
        let text = e.to_string();
        let mut out = Vec::with_capacity(n);
        out.push(Err(e));
        out.extend((1..n).map(|_| Err(StoreError::Unavailable(text.clone()))));
        out
    })
}

/// See [`super::Store::claim_watch`].
pub fn claim_watch(
    tx: &mut dyn Tx,
    id: i64,
    instance: Option<u64>,
    remote: &str,
    now: i64,
) -> Result<(), StoreError> {
    // The device's row lock: replicas claiming the same device take turns, so two
    // copies of one node reaching two replicas at once cannot both be taken.
    if tx.lock_online(id)?.is_none() {
        return Ok(());
    }
    if let Some(mine) = instance
        && let Some(from) = tx.session_elsewhere(id, mine)?
    {
        return Err(StoreError::Connected { id, from });
    }
    tx.claim_watch(id, instance, remote, now)
}

/// See [`super::Store::set_online`].
pub fn set_online(tx: &mut dyn Tx, id: i64, online: bool, now: i64) -> Result<(), StoreError> {
    let Some((org, was)) = tx.lock_online(id)? else {
        return Ok(());
    };
    let online = tx.watch(id, online)?;
    if online == was {
        tx.touch(id, now)?;
        return Ok(());
    }
    tx.set_online(id, online, now)?;
    let revision = tx.record_change(org, id, ONLINE, now)?;
    tx.set_revision(id, revision)?;
    Ok(())
}

/// The `[approve]` section of an organization's stored policy. None: no policy, or
/// one that no longer parses (logged): then nothing is approved in advance.
pub fn approvals(tx: &mut dyn Tx, organization_id: i64) -> Result<Option<Approve>, StoreError> {
    let Some(stored) = tx.policy(organization_id)? else {
        return Ok(None);
    };
    match Policy::parse(&stored.text) {
        Ok(p) => Ok(Some(p.approve)),
        Err(e) => {
            tracing::error!(organization_id, error = %e, "stored policy does not parse; nothing is approved by it");
            Ok(None)
        }
    }
}

/// [`set_approved`] in a write transaction of its own (`devices approve|revoke`).
pub fn edit_approvals(
    engine: &mut dyn Engine,
    org: Option<i64>,
    id: i64,
    now: i64,
    change: &dyn Fn(&Device, &mut Approved),
) -> Result<Device, StoreError> {
    write(engine, |tx, _| set_approved(tx, org, id, change, now))
}

/// Changes an admin's approvals of a device and records the change (peers get the
/// device's new effective claims). `org`: the device must belong to it.
pub fn set_approved(
    tx: &mut dyn Tx,
    org: Option<i64>,
    id: i64,
    change: &dyn Fn(&Device, &mut Approved),
    now: i64,
) -> Result<Device, StoreError> {
    let mut d = tx.lock_device(id)?.ok_or(StoreError::DeviceNotFound(id))?;
    if org.is_some_and(|o| o != d.organization_id) {
        return Err(StoreError::DeviceNotFound(id));
    }
    let mut approved = d.approved.clone();
    change(&d, &mut approved);
    d.approved = approved;
    tx.set_approved(&Encoded::new(&d)?)?;
    let revision = tx.record_change(d.organization_id, id, UPSERT, now)?;
    tx.set_revision(id, revision)?;
    tx.device(id)?.ok_or(StoreError::DeviceNotFound(id))
}

/// Replaces (`Some`, already validated) or removes an organization's policy, and
/// records a change for every device whose effective claims it changes. Returns
/// the new policy's revision.
pub fn put_policy(
    tx: &mut dyn Tx,
    org: i64,
    text: Option<&str>,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    load_org(tx, org)?;
    let before = approvals(tx, org)?;
    let revision = match text {
        Some(t) => Some(tx.put_policy(org, t, now)?),
        None => {
            tx.clear_policy(org, now)?;
            None
        }
    };
    let after = approvals(tx, org)?;
    for d in tx.lock_devices(org)? {
        if effective(&d, before.as_ref()) != effective(&d, after.as_ref()) {
            let revision = tx.record_change(org, d.id, UPSERT, now)?;
            tx.set_revision(d.id, revision)?;
        }
    }
    // Last, so watchers see the devices' new claims no later than the policy.
    tx.record_change(org, POLICY_CHANGE_ID, POLICY, now)?;
    Ok(revision)
}
