//! The tunnel addresses in use, per organization, kept in memory and brought up to
//! date from the change log before each allocation. A registration then costs what
//! changed since the previous one, not a read of the whole organization.
//!
//! The index is only ever filled from committed rows (it is synced before the
//! transaction writes anything), so a rolled-back transaction leaves nothing behind.
//! It is exact for SQLite (the sync runs inside the write transaction) and for
//! PostgreSQL replicas too: each sync first takes the allocation lock (an advisory
//! lock held to commit), so another replica's allocation commits before ours reads
//! the log or waits until ours has. The UNIQUE constraints still refuse a duplicate
//! should anything else insert one, and the transaction is then retried.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::{Organization, StoreError};
use crate::coord::ipam;
use crate::wire::control::RegisterRequest;

/// Changes read in one sync; more than this and the index is rebuilt instead.
const SYNC_LIMIT: usize = 5_000;

/// One device's addresses as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAddrs {
    pub device_id: i64,
    pub organization_id: i64,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// A log entry as the index reads it: (revision, device, its addresses now or `None`
/// if it is gone).
pub type AddrChange = (i64, i64, Option<DeviceAddrs>);

/// Reads addresses from the database, inside the caller's transaction.
pub trait AddrSource {
    /// The newest revision, then every device's addresses (read no earlier).
    fn load_all(&mut self) -> Result<(i64, Vec<DeviceAddrs>), StoreError>;
    /// Log entries after `revision`, oldest first, at most `limit`: (revision, device,
    /// its addresses now or `None` if it is gone).
    fn changed_since(&mut self, revision: i64, limit: usize)
    -> Result<Vec<AddrChange>, StoreError>;
    /// The oldest revision still in the log (the log is pruned): an index older than
    /// it minus one is rebuilt.
    fn oldest_revision(&mut self) -> Result<i64, StoreError> {
        Ok(0)
    }
    /// Makes concurrent allocators take turns until the caller's transaction ends
    /// (see `Tx::lock_addresses`); taken before every sync.
    fn lock_for_allocation(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[derive(Default)]
pub struct AddrCache {
    /// The revision the index reflects; `None` until loaded.
    revision: Option<i64>,
    used: HashMap<i64, HashSet<IpAddr>>,
    devices: HashMap<i64, DeviceAddrs>,
    /// (organization, address) of every indexed device.
    owners: HashSet<(i64, IpAddr)>,
    /// Addresses taken by the transaction in progress whose changes are not in the
    /// log yet (a PostgreSQL batch appends them last); see [`AddrCache::reserve`].
    reserved: Vec<(i64, IpAddr)>,
    /// Per (organization, is v6): an address at or below the lowest free one, where
    /// the search for it starts (so allocating in order costs O(1), not O(devices)).
    hints: HashMap<(i64, bool), u128>,
}

fn value(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_value(v6: bool, value: u128) -> Option<IpAddr> {
    if v6 {
        Some(IpAddr::V6(Ipv6Addr::from(value)))
    } else {
        u32::try_from(value)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v)))
    }
}

impl AddrCache {
    /// The addresses in use in `organization_id`, current as of this call.
    #[cfg(test)]
    pub fn used(
        &mut self,
        src: &mut (impl AddrSource + ?Sized),
        organization_id: i64,
    ) -> Result<&HashSet<IpAddr>, StoreError> {
        self.sync(src)?;
        Ok(self.used.entry(organization_id).or_default())
    }

    /// A new device's addresses: the requested ones if free, else the lowest free v4
    /// and the v6 address with the same host number where free, else the lowest free
    /// v6 (none in v6 for a host without IPv6). As `coord::ipam::allocate_paired`.
    pub fn allocate(
        &mut self,
        src: &mut (impl AddrSource + ?Sized),
        org: &Organization,
        req: &RegisterRequest,
    ) -> Result<(Ipv4Addr, Option<Ipv6Addr>), StoreError> {
        self.sync(src)?;
        let (p4, p6) = (IpNet::V4(org.ip_cidr), IpNet::V6(org.ip_cidr_v6));
        let req_v6 = req.request_ip_v6.filter(|_| req.ipv6_supported);
        let (v4, v6) = match (req.request_ip, req_v6) {
            // Only v6 asked for: v4 lines up with it.
            (None, Some(a6)) => {
                let v6 = self.requested(org.id, p6, IpAddr::V6(a6))?;
                (self.paired_or_lowest(org.id, p4, p6, v6)?, Some(v6))
            }
            (req_v4, _) => {
                let v4 = match req_v4 {
                    Some(a) => self.requested(org.id, p4, IpAddr::V4(a))?,
                    None => self.lowest(org.id, p4)?,
                };
                let v6 = match (req.ipv6_supported, req_v6) {
                    (false, _) => None,
                    (true, Some(a6)) => Some(self.requested(org.id, p6, IpAddr::V6(a6))?),
                    (true, None) => Some(self.paired_or_lowest(org.id, p6, p4, v4)?),
                };
                (v4, v6)
            }
        };
        match (v4, v6) {
            (IpAddr::V4(v4), None) => Ok((v4, None)),
            (IpAddr::V4(v4), Some(IpAddr::V6(v6))) => Ok((v4, Some(v6))),
            _ => Err(StoreError::Corrupt("address of the wrong family".into())),
        }
    }

    /// The v6 address of a device gaining IPv6 support: the one with its v4 host
    /// number where free, else the lowest free.
    pub fn allocate_v6(
        &mut self,
        src: &mut (impl AddrSource + ?Sized),
        org: &Organization,
        v4: Ipv4Addr,
    ) -> Result<Ipv6Addr, StoreError> {
        self.sync(src)?;
        let (p4, p6) = (IpNet::V4(org.ip_cidr), IpNet::V6(org.ip_cidr_v6));
        match self.paired_or_lowest(org.id, p6, p4, IpAddr::V4(v4))? {
            IpAddr::V6(a) => Ok(a),
            IpAddr::V4(_) => Err(StoreError::Corrupt("v4 address from a v6 pool".into())),
        }
    }

    /// `ipam::paired` (the address with `other`'s host number) if free, else the
    /// lowest free address of `prefix`.
    fn paired_or_lowest(
        &mut self,
        org: i64,
        prefix: IpNet,
        other_prefix: IpNet,
        other: IpAddr,
    ) -> Result<IpAddr, StoreError> {
        let used = self.used.entry(org).or_default();
        match ipam::paired(prefix, other_prefix, other, used) {
            Some(addr) => Ok(addr),
            None => self.lowest(org, prefix),
        }
    }

    fn requested(&mut self, org: i64, prefix: IpNet, addr: IpAddr) -> Result<IpAddr, StoreError> {
        let used = self.used.entry(org).or_default();
        ipam::check_requested(prefix, addr, used)?;
        Ok(addr)
    }

    /// `ipam::lowest_free`, searched from the hint; the hint moves to the result.
    fn lowest(&mut self, org: i64, prefix: IpNet) -> Result<IpAddr, StoreError> {
        let v6 = matches!(prefix, IpNet::V6(_));
        let used = self.used.entry(org).or_default();
        if let Some(&start) = self.hints.get(&(org, v6)) {
            let mut v = start;
            while let Some(addr) = from_value(v6, v).filter(|a| prefix.contains(a)) {
                if !used.contains(&addr) {
                    // Free; it must also be a host address (not the broadcast).
                    if ipam::check_requested(prefix, addr, used).is_ok() {
                        self.hints.insert((org, v6), v);
                        return Ok(addr);
                    }
                    break;
                }
                match v.checked_add(1) {
                    Some(next) => v = next,
                    None => break,
                }
            }
        }
        let addr = ipam::lowest_free(prefix, used)?;
        self.hints.insert((org, v6), value(addr));
        Ok(addr)
    }

    /// An address went back to the pool: the lowest free one may be lower now.
    fn freed(&mut self, org: i64, addr: IpAddr) {
        if let Some(h) = self.hints.get_mut(&(org, addr.is_ipv6())) {
            *h = (*h).min(value(addr));
        }
    }

    /// Forgets everything (after an error that may have left it behind the database).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Marks addresses as taken until [`AddrCache::release`]: the transaction in
    /// progress inserted them, and its changes come later.
    pub fn reserve(&mut self, organization_id: i64, addrs: impl IntoIterator<Item = IpAddr>) {
        let used = self.used.entry(organization_id).or_default();
        for a in addrs {
            if used.insert(a) {
                self.reserved.push((organization_id, a));
            }
        }
    }

    /// Drops the reservations (the transaction ended; if it committed, its changes
    /// bring the addresses back with the next sync, if they are not back already).
    pub fn release(&mut self) {
        for (org, a) in std::mem::take(&mut self.reserved) {
            if !self.owners.contains(&(org, a))
                && let Some(used) = self.used.get_mut(&org)
            {
                used.remove(&a);
                self.freed(org, a);
            }
        }
    }

    fn sync(&mut self, src: &mut (impl AddrSource + ?Sized)) -> Result<(), StoreError> {
        src.lock_for_allocation()?;
        if let Some(revision) = self.revision
            && src.oldest_revision()? <= revision.saturating_add(1)
        {
            let changes = src.changed_since(revision, SYNC_LIMIT)?;
            if changes.len() < SYNC_LIMIT {
                for (rev, device_id, now) in changes {
                    self.forget(device_id);
                    if let Some(a) = now {
                        self.insert(a);
                    }
                    self.revision = Some(rev);
                }
                return Ok(());
            }
        }
        self.clear();
        let (revision, all) = src.load_all()?;
        for a in all {
            self.insert(a);
        }
        self.revision = Some(revision);
        Ok(())
    }

    fn forget(&mut self, device_id: i64) {
        if let Some(old) = self.devices.remove(&device_id) {
            let org = old.organization_id;
            for addr in addrs_of(&old) {
                self.owners.remove(&(org, addr));
                if let Some(used) = self.used.get_mut(&org) {
                    used.remove(&addr);
                }
                self.freed(org, addr);
            }
        }
    }

    fn insert(&mut self, a: DeviceAddrs) {
        let org = a.organization_id;
        let used = self.used.entry(org).or_default();
        for addr in addrs_of(&a) {
            used.insert(addr);
            self.owners.insert((org, addr));
        }
        self.devices.insert(a.device_id, a);
    }
}

fn addrs_of(a: &DeviceAddrs) -> impl Iterator<Item = IpAddr> {
    std::iter::once(IpAddr::V4(a.v4)).chain(a.v6.map(IpAddr::V6))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake database: a log of (revision, device, state).
    #[derive(Default)]
    struct Fake {
        log: Vec<(i64, i64, Option<DeviceAddrs>)>,
        loads: usize,
    }

    impl Fake {
        fn state(&self) -> HashMap<i64, DeviceAddrs> {
            let mut m = HashMap::new();
            for (_, id, s) in &self.log {
                match s {
                    Some(a) => m.insert(*id, *a),
                    None => m.remove(id),
                };
            }
            m
        }
    }

    impl AddrSource for Fake {
        fn load_all(&mut self) -> Result<(i64, Vec<DeviceAddrs>), StoreError> {
            self.loads += 1;
            let rev = self.log.last().map_or(0, |l| l.0);
            Ok((rev, self.state().into_values().collect()))
        }
        fn changed_since(
            &mut self,
            revision: i64,
            limit: usize,
        ) -> Result<Vec<(i64, i64, Option<DeviceAddrs>)>, StoreError> {
            let state = self.state();
            Ok(self
                .log
                .iter()
                .filter(|l| l.0 > revision)
                .take(limit)
                .map(|l| (l.0, l.1, state.get(&l.1).copied()))
                .collect())
        }
    }

    fn org(v4: &str, v6: &str) -> Organization {
        Organization {
            id: 1,
            name: "o".into(),
            ip_cidr: v4.parse().unwrap(),
            ip_cidr_v6: v6.parse().unwrap(),
            domain: "nexodus.internal".into(),
        }
    }

    fn request(v6: bool) -> RegisterRequest {
        RegisterRequest {
            hostname: "h".into(),
            ipv6_supported: v6,
            ..Default::default()
        }
    }

    /// Allocation with hints gives what `ipam::lowest_free` over the whole set gives (v6:
    /// `ipam::paired` first).
    #[test]
    fn allocation_is_lowest_free_with_hints() {
        let mut db = Fake::default();
        let o = org("100.64.0.0/29", "200::/125");
        let mut c = AddrCache::default();
        let mut rev = 0;
        let mut take = |c: &mut AddrCache, db: &mut Fake, id: i64, v6: bool| {
            let got = c.allocate(db, &o, &request(v6));
            if let Ok((a4, a6)) = got {
                rev += 1;
                db.log.push((
                    rev,
                    id,
                    Some(DeviceAddrs {
                        device_id: id,
                        organization_id: 1,
                        v4: a4,
                        v6: a6,
                    }),
                ));
            }
            got
        };
        for id in 1..=6 {
            let (a4, a6) = take(&mut c, &mut db, id, id != 2).unwrap();
            assert_eq!(a4.octets()[3], u8::try_from(id).unwrap());
            if id == 2 {
                assert_eq!(a6, None);
            }
        }
        // .7 is the broadcast address: the pool is exhausted.
        let err = take(&mut c, &mut db, 7, true).unwrap_err();
        assert!(
            matches!(err, StoreError::Ipam(ipam::IpamError::Exhausted(_))),
            "{err}"
        );
        // Device 3 goes: its addresses are the lowest free again.
        db.log.push((100, 3, None));
        let (a4, a6) = take(&mut c, &mut db, 8, true).unwrap();
        assert_eq!(a4.to_string(), "100.64.0.3");
        assert_eq!(
            a6.unwrap().to_string(),
            "200::3",
            "the same host number as v4 (::2, free since device 2 had no v6, is lower)"
        );
        // Requested addresses are checked, not searched.
        let mut r = request(false);
        r.request_ip = Some("100.64.0.4".parse().unwrap());
        assert!(matches!(
            c.allocate(&mut db, &o, &r),
            Err(StoreError::Ipam(ipam::IpamError::Taken(_)))
        ));
        // A reservation released goes back to the pool (and to the search).
        db.log.push((101, 8, None));
        c.reserve(1, ["100.64.0.3".parse().unwrap()]);
        assert_eq!(
            c.allocate(&mut db, &o, &request(false))
                .unwrap_err()
                .to_string(),
            "address pool 100.64.0.0/29 is exhausted"
        );
        c.release();
        let (a4, _) = c.allocate(&mut db, &o, &request(false)).unwrap();
        assert_eq!(a4.to_string(), "100.64.0.3");
    }

    fn dev(id: i64, org: i64, n: u8) -> DeviceAddrs {
        DeviceAddrs {
            device_id: id,
            organization_id: org,
            v4: Ipv4Addr::new(100, 64, 0, n),
            v6: Some(Ipv6Addr::new(0x200, 0, 0, 0, 0, 0, 0, u16::from(n))),
        }
    }

    #[test]
    fn follows_the_log_without_reloading() {
        let mut db = Fake::default();
        db.log.push((1, 1, Some(dev(1, 1, 1))));
        db.log.push((2, 2, Some(dev(2, 2, 1))));
        let mut c = AddrCache::default();
        assert_eq!(c.used(&mut db, 1).unwrap().len(), 2);
        db.log.push((3, 3, Some(dev(3, 1, 2))));
        db.log.push((5, 1, None));
        let used = c.used(&mut db, 1).unwrap().clone();
        assert!(used.contains(&"100.64.0.2".parse().unwrap()));
        assert!(!used.contains(&"100.64.0.1".parse().unwrap()));
        assert_eq!(used.len(), 2);
        // v6 taken away by a later change of the same device.
        let mut d3 = dev(3, 1, 2);
        d3.v6 = None;
        db.log.push((6, 3, Some(d3)));
        assert_eq!(c.used(&mut db, 1).unwrap().len(), 1);
        assert_eq!(c.used(&mut db, 2).unwrap().len(), 2);
        assert_eq!(db.loads, 1);
        c.clear();
        assert_eq!(c.used(&mut db, 1).unwrap().len(), 1);
        assert_eq!(db.loads, 2);
        // Reserved until released; a committed reservation comes back from the log.
        let a: IpAddr = "100.64.0.9".parse().unwrap();
        c.reserve(1, [a]);
        assert!(c.used(&mut db, 1).unwrap().contains(&a));
        c.release();
        assert!(!c.used(&mut db, 1).unwrap().contains(&a));
        c.reserve(1, [a]);
        db.log.push((7, 9, Some(dev(9, 1, 9))));
        c.release();
        assert!(c.used(&mut db, 1).unwrap().contains(&a));
        // Synced while still reserved: releasing keeps what the log says is taken.
        let b: IpAddr = "100.64.0.10".parse().unwrap();
        c.reserve(1, [b]);
        db.log.push((8, 10, Some(dev(10, 1, 10))));
        assert!(c.used(&mut db, 1).unwrap().contains(&b));
        c.release();
        assert!(c.used(&mut db, 1).unwrap().contains(&b));
    }
}
