//! The store's contract, run against both backends: every case below is one test
//! for SQLite (`sqlite::…`) and one for PostgreSQL (`postgres::…`, each in a fresh
//! database of one throwaway server per test process). Cases that only make sense
//! with several processes on one database (replicas) are PostgreSQL only.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use super::testpg::TempPostgres;
use super::*;
use crate::coord::token::hash_secret;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

static SERVER: OnceLock<Mutex<TempPostgres>> = OnceLock::new();

/// The PostgreSQL server shared by this test process. It is started by a thread that
/// never ends (the postmaster dies with the thread that started it), and stopped and
/// removed by an `atexit` handler when the test process exits.
fn server() -> &'static Mutex<TempPostgres> {
    SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(TempPostgres::start());
            loop {
                std::thread::park();
            }
        });
        let pg = rx
            .recv()
            .expect("server thread")
            .unwrap_or_else(|e| panic!("starting PostgreSQL for the store tests: {e}"));
        extern "C" fn cleanup() {
            if let Some(pg) = SERVER.get() {
                pg.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
            }
        }
        // SAFETY: registers a plain function that captures nothing.
        unsafe { libc::atexit(cleanup) };
        Mutex::new(pg)
    })
}

/// A fresh database URL on the shared server.
fn fresh_url() -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("store_test_{n}");
    let pg = server().lock().unwrap_or_else(|e| e.into_inner());
    pg.fresh_database(&name).unwrap()
}

/// A store of `backend` in an empty database, with the default organization.
struct Fresh {
    backend: Backend,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    url: String,
    store: Box<dyn Store>,
}

impl Fresh {
    fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let url = match backend {
            Backend::Sqlite => String::new(),
            Backend::Postgres => fresh_url(),
        };
        let mut f = Self {
            backend,
            store: open_db(backend, &path, &url),
            _dir: dir,
            path,
            url,
        };
        f.store.ensure_default_org(0).unwrap();
        f
    }

    /// Another connection to the same database (a restart, or a second replica).
    fn reopen(&self) -> Box<dyn Store> {
        open_db(self.backend, &self.path, &self.url)
    }

    /// The newest applied migration.
    fn schema_version(&self) -> i64 {
        match self.backend {
            Backend::Sqlite => rusqlite::Connection::open(&self.path)
                .unwrap()
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap(),
            Backend::Postgres => {
                let name = self.url.rsplit('/').next().unwrap();
                let pg = server().lock().unwrap_or_else(|e| e.into_inner());
                pg.query(name, "SELECT MAX(version) FROM schema_migrations")
                    .unwrap()[0]
                    .parse()
                    .unwrap()
            }
        }
    }
}

fn open_db(backend: Backend, path: &std::path::Path, url: &str) -> Box<dyn Store> {
    match backend {
        Backend::Sqlite => Box::new(SqliteStore::open(path).unwrap()),
        Backend::Postgres => Box::new(PgStore::connect(url).unwrap()),
    }
}

fn token(s: &mut dyn Store, secret: &str, reusable: bool, expires: Option<i64>) {
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    s.create_token(org.id, &hash_secret(secret), reusable, expires, 0)
        .unwrap();
}

/// Creates an organization at time 0.
fn create_org(
    s: &mut dyn Store,
    name: &str,
    v4: &str,
    v6: &str,
) -> Result<Organization, StoreError> {
    s.create_org(name, v4.parse().unwrap(), v6.parse().unwrap(), 0)
}

/// Registers device `n` with the token "t" (see [`token`]).
fn register(s: &mut dyn Store, n: u8, v6: bool, credential: &str, now: i64) -> Device {
    s.register_device(&req(n, v6), &hash_secret("t"), credential, now)
        .unwrap()
}

fn key(n: u32) -> String {
    use sha2::Digest;
    let bytes: [u8; 32] = sha2::Sha256::digest(n.to_le_bytes()).into();
    let secret = boringtun::x25519::StaticSecret::from(bytes);
    let public = boringtun::x25519::PublicKey::from(&secret);
    crate::coord::keys::encode_key(public.as_bytes())
}

fn req(n: u8, v6: bool) -> RegisterRequest {
    req_n(u32::from(n), v6)
}

fn req_n(n: u32, v6: bool) -> RegisterRequest {
    RegisterRequest {
        public_key: key(n),
        hostname: format!("host{n}"),
        os: "linux".into(),
        ipv6_supported: v6,
        ..Default::default()
    }
}

/// Declares each case once per backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::Backend::Sqlite) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(super::Backend::Postgres) } )*
        }
    };
}

both_backends!(
    registers_dual_stack_in_order,
    addresses_line_up_across_families,
    tokens_checked,
    failed_registration_changes_nothing,
    request_ip_and_duplicate_key,
    removal_returns_addresses_and_logs,
    auth_update_and_overlap,
    login_tracks_ipv6_support,
    reopen_keeps_everything_and_schema_version,
    other_org_prefixes,
    unmanaged_devices_are_relay_only_spokes,
    online_state_is_recorded_once,
    changes_carry_current_state,
    allocation_sees_changes_from_another_connection,
    a_batch_is_registrations_one_after_the_other,
    no_op_updates_and_pruning,
    claims_reach_peers_only_once_approved,
    policy_approves_in_advance,
    names_are_unique_in_registration_order,
    tokens_listed_and_revoked,
    admin_keys_and_path_reports,
    presence_batch_is_each_write_in_order,
);

/// Mesh DNS names (DESIGN §10): lower-cased DNS labels, `-2`, `-3` … for duplicates
/// in registration order (a batch included), per organization with its domain; a
/// rename takes a new name and is a change; a removed device's name is free again;
/// devices from before names existed are named when the database is opened.
fn names_are_unique_in_registration_order(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let named = |n: u8, host: &str| RegisterRequest {
        hostname: host.into(),
        ..req(n, true)
    };
    let reqs = [named(1, "Alpha"), named(2, "alpha"), named(3, "ALPHA.lan")];
    let t = hash_secret("t");
    let batch: Vec<Registration<'_>> = reqs
        .iter()
        .map(|r| Registration {
            req: r,
            token_hash: &t,
            credential_hash: "c",
        })
        .collect();
    let devices: Vec<Device> = s
        .register_devices(&batch, 1)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["alpha", "alpha-2", "alpha-3"]);
    assert!(devices.iter().all(|d| d.domain == "nexodus.internal"));
    let d4 = s
        .register_device(&named(4, "My_Laptop"), &t, "c", 1)
        .unwrap();
    assert_eq!(d4.name, "my-laptop");

    // Another organization, its own domain and names.
    let lab = s
        .create_org_in(
            "lab",
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/64".parse().unwrap(),
            "Corp.Example",
            0,
        )
        .unwrap();
    assert_eq!(lab.domain, "corp.example");
    assert_eq!(s.org_by_name("lab").unwrap().domain, "corp.example");
    s.create_token(lab.id, &hash_secret("lab"), true, None, 0)
        .unwrap();
    let l = s
        .register_device(&named(5, "alpha"), &hash_secret("lab"), "c", 1)
        .unwrap();
    assert_eq!(
        (l.name.as_str(), l.domain.as_str()),
        ("alpha", "corp.example")
    );
    assert!(matches!(
        s.create_org_in(
            "bad",
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
            "no_underscores",
            0
        ),
        Err(StoreError::Invalid(_))
    ));

    // A rename is a change peers see; the old name is free again.
    let rev = s.current_revision().unwrap();
    let update = DeviceUpdate {
        hostname: Some("Beta".into()),
        ..Default::default()
    };
    let renamed = s.update_device(devices[2].id, &update, 2).unwrap();
    assert_eq!(renamed.name, "beta");
    let changes = s.changes_since(rev, 10).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].device.as_ref().unwrap().name, "beta");
    s.remove_device(devices[0].id, 3).unwrap();
    let again = s.register_device(&named(6, "alpha"), &t, "c", 3).unwrap();
    assert_eq!(again.name, "alpha");

    // Devices from before names existed get theirs when the database is opened.
    let clear = "UPDATE devices SET name = ''";
    match b {
        Backend::Sqlite => {
            rusqlite::Connection::open(&f.path)
                .unwrap()
                .execute(clear, [])
                .unwrap();
        }
        Backend::Postgres => {
            let name = f.url.rsplit('/').next().unwrap().to_string();
            let pg = server().lock().unwrap_or_else(|e| e.into_inner());
            pg.query(&name, clear).unwrap();
        }
    }
    let mut s = f.reopen();
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    let mut names: Vec<(i64, String)> = s
        .devices(org.id)
        .unwrap()
        .into_iter()
        .map(|d| (d.id, d.name))
        .collect();
    names.sort();
    let names: Vec<&str> = names.iter().map(|(_, n)| n.as_str()).collect();
    // By id: the old alpha-2, the renamed beta, my-laptop, the newest alpha.
    assert_eq!(names, ["alpha", "beta", "my-laptop", "alpha-2"]);
}

/// An update that changes nothing logs nothing; pruning keeps the newest revisions
/// and never lets a revision be reused.
fn no_op_updates_and_pruning(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let a = register(s, 1, true, "c1", 5);
    register(s, 2, true, "c2", 5);
    let update = DeviceUpdate {
        endpoints: Some(vec!["192.0.2.1:51820".parse().unwrap()]),
        ..Default::default()
    };
    let changed = s.update_device(a.id, &update, 6).unwrap();
    let rev = s.current_revision().unwrap();
    assert_eq!(changed.revision, rev);
    let same = s.update_device(a.id, &update, 7).unwrap();
    assert_eq!(same.revision, rev);
    assert_eq!(same.last_seen, 7);
    assert_eq!(s.current_revision().unwrap(), rev);
    assert_eq!(s.changes_since(0, 100).unwrap().len(), 3);
    assert_eq!(s.oldest_revision().unwrap(), rev - 2);
    assert_eq!(s.prune_changes(2).unwrap(), 1);
    assert_eq!(s.oldest_revision().unwrap(), rev - 1);
    assert_eq!(s.prune_changes(0).unwrap(), 1);
    assert_eq!(s.oldest_revision().unwrap(), rev);
    assert_eq!(s.current_revision().unwrap(), rev);
    let c = register(s, 3, true, "c3", 8);
    assert_eq!(c.revision, rev + 1);
}

fn registers_dual_stack_in_order(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let a = register(s, 1, true, "c1", 5);
    let b = register(s, 2, true, "c2", 5);
    let c = register(s, 3, false, "c3", 5);
    assert_eq!(a.tunnel_ip.to_string(), "100.64.0.1");
    assert_eq!(a.tunnel_ip_v6.unwrap().to_string(), "200::1");
    assert_eq!(b.tunnel_ip_v6.unwrap().to_string(), "200::2");
    assert_eq!(c.tunnel_ip.to_string(), "100.64.0.3");
    assert_eq!(c.tunnel_ip_v6, None);
    assert!(a.revision < b.revision && b.revision < c.revision);
    assert_eq!(s.current_revision().unwrap(), c.revision);
}

/// After a v4-only device, v4 and v6 host numbers stay paired (issue 18 item 7).
fn addresses_line_up_across_families(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    register(s, 1, true, "c1", 5);
    let v4_only = register(s, 2, false, "c2", 5);
    assert_eq!(v4_only.tunnel_ip.to_string(), "100.64.0.2");
    let c = register(s, 3, true, "c3", 5);
    assert_eq!(c.tunnel_ip.to_string(), "100.64.0.3");
    assert_eq!(c.tunnel_ip_v6.unwrap().to_string(), "200::3");
    // The v4-only device gains IPv6: it gets its own host number, still free.
    let v4_only = s.login(v4_only.id, "c2", Some(true), 6).unwrap();
    assert_eq!(v4_only.tunnel_ip_v6.unwrap().to_string(), "200::2");
    // A v6 request alone: v4 follows it where free.
    let mut r = req(4, true);
    r.request_ip_v6 = Some("200::40".parse().unwrap());
    let d = s.register_device(&r, &hash_secret("t"), "c4", 7).unwrap();
    assert_eq!(d.tunnel_ip.to_string(), "100.64.0.64");
    // ::4 taken by a request: the next device falls back to the lowest free v6.
    let mut r = req(5, true);
    r.request_ip = Some("100.64.0.9".parse().unwrap());
    r.request_ip_v6 = Some("200::4".parse().unwrap());
    s.register_device(&r, &hash_secret("t"), "c5", 7).unwrap();
    let e = register(s, 6, true, "c6", 8);
    assert_eq!(e.tunnel_ip.to_string(), "100.64.0.4");
    assert_eq!(e.tunnel_ip_v6.unwrap().to_string(), "200::5");
}

fn tokens_checked(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "once", false, None);
    token(s, "old", true, Some(10));
    assert!(matches!(
        s.register_device(&req(1, true), &hash_secret("nope"), "c", 5),
        Err(StoreError::InvalidToken)
    ));
    assert!(matches!(
        s.register_device(&req(1, true), &hash_secret("old"), "c", 10),
        Err(StoreError::TokenExpired)
    ));
    s.register_device(&req(1, true), &hash_secret("once"), "c", 5)
        .unwrap();
    assert!(matches!(
        s.register_device(&req(2, true), &hash_secret("once"), "c", 5),
        Err(StoreError::TokenUsed)
    ));
}

fn tokens_listed_and_revoked(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, Some(99));
    let lab = create_org(s, "lab", "10.9.0.0/16", "fd00:9::/64").unwrap();
    s.create_token(lab.id, &hash_secret("l"), false, None, 3)
        .unwrap();
    let all = s.tokens(None).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!((all[0].reusable, all[0].expires_at), (true, Some(99)));
    let only_lab = s.tokens(Some(lab.id)).unwrap();
    assert_eq!(only_lab.len(), 1);
    assert_eq!((only_lab[0].created_at, only_lab[0].uses), (3, 0));
    register(s, 1, true, "c", 5);
    assert_eq!(s.tokens(None).unwrap()[0].uses, 1);
    // Not in that organization: refused, nothing changes.
    let default_token = all[0].id;
    assert!(matches!(
        s.revoke_token(Some(lab.id), default_token),
        Err(StoreError::TokenNotFound(_))
    ));
    s.revoke_token(None, default_token).unwrap();
    assert!(matches!(
        s.register_device(&req(2, true), &hash_secret("t"), "c", 5),
        Err(StoreError::InvalidToken)
    ));
    assert_eq!(s.tokens(None).unwrap().len(), 1);
}

fn admin_keys_and_path_reports(b: Backend) {
    use crate::wire::control::{PathKind, PeerPath};
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    let id = s.create_admin_key("ci", "h1", 7).unwrap();
    assert!(s.create_admin_key("", "h2", 7).is_err());
    s.revoke_admin_key(id, 8).unwrap();
    assert!(matches!(
        s.revoke_admin_key(id, 9),
        Err(StoreError::KeyNotFound(_))
    ));
    let keys = s.admin_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0].secret_hash.as_str(), keys[0].revoked_at),
        ("h1", Some(8))
    );

    token(s, "t", true, None);
    let a = register(s, 1, true, "c", 5);
    let b2 = register(s, 2, true, "c", 5);
    let report = |peer, path| PeerPath {
        peer_id: peer,
        path,
        handshake_age: Some(3),
    };
    s.report_paths(a.id, &[report(b2.id, PathKind::Relay)], 10)
        .unwrap();
    s.report_paths(a.id, &[report(b2.id, PathKind::Direct)], 11)
        .unwrap();
    let r = s.path_reports(a.organization_id).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].path.as_str(), r[0].reported_at), ("direct", 11));
    // A removed device's reports go with it.
    s.remove_device(a.id, 12).unwrap();
    assert!(s.path_reports(a.organization_id).unwrap().is_empty());
}

fn failed_registration_changes_nothing(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", false, None);
    let mut r = req(1, true);
    r.request_ip = Some("10.0.0.1".parse().unwrap());
    assert!(matches!(
        s.register_device(&r, &hash_secret("t"), "c", 5),
        Err(StoreError::Ipam(IpamError::OutsidePrefix { .. }))
    ));
    // The single-use token was not consumed, and nothing was logged.
    assert_eq!(s.current_revision().unwrap(), 0);
    register(s, 1, true, "c", 5);
}

fn request_ip_and_duplicate_key(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let mut r = req(1, true);
    r.request_ip = Some("100.64.0.50".parse().unwrap());
    r.request_ip_v6 = Some("200::50".parse().unwrap());
    let a = s.register_device(&r, &hash_secret("t"), "c", 5).unwrap();
    assert_eq!(a.tunnel_ip.to_string(), "100.64.0.50");
    assert_eq!(a.tunnel_ip_v6.unwrap().to_string(), "200::50");
    let mut r2 = req(2, true);
    r2.request_ip_v6 = Some("200::50".parse().unwrap());
    let err = s
        .register_device(&r2, &hash_secret("t"), "c", 5)
        .unwrap_err();
    assert!(err.to_string().contains("already in use"), "{err}");
    let err = s
        .register_device(&r, &hash_secret("t"), "c", 5)
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateKey(id) if id == a.id));
    // The message names no device: the key's owner may be in another organization.
    assert_eq!(err.to_string(), "this public key is already registered");
}

fn removal_returns_addresses_and_logs(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let a = register(s, 1, true, "c", 5);
    let _b = register(s, 2, true, "c", 5);
    let before = s.current_revision().unwrap();
    s.remove_device(a.id, 6).unwrap();
    let changes = s.changes_since(before, 100).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].device_id, a.id);
    assert_eq!(changes[0].device, None);
    let c = register(s, 3, true, "c", 7);
    assert_eq!(c.tunnel_ip, a.tunnel_ip);
    assert_eq!(c.tunnel_ip_v6, a.tunnel_ip_v6);
    assert!(matches!(
        s.remove_device(a.id, 8),
        Err(StoreError::DeviceNotFound(_))
    ));
}

fn auth_update_and_overlap(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let a = register(s, 1, true, "ca", 5);
    let b = register(s, 2, true, "cb", 5);
    assert!(matches!(
        s.authenticate(a.id, "cb"),
        Err(StoreError::Unauthorized)
    ));
    assert_eq!(s.authenticate(a.id, "ca").unwrap().id, a.id);
    let upd = DeviceUpdate {
        advertise_cidrs: Some(vec!["198.51.100.0/24".parse().unwrap()]),
        endpoints: Some(vec!["192.0.2.1:51820".parse().unwrap()]),
        ..Default::default()
    };
    let a2 = s.update_device(a.id, &upd, 6).unwrap();
    assert_eq!(a2.endpoints.len(), 1);
    assert!(a2.revision > a.revision);
    // The exit in use is stored, read back, and cleared with 0.
    let pick = |e| DeviceUpdate {
        use_exit: Some(e),
        ..Default::default()
    };
    assert_eq!(
        s.update_device(a.id, &pick(b.id), 6).unwrap().use_exit,
        Some(b.id)
    );
    assert_eq!(s.device(a.id).unwrap().unwrap().use_exit, Some(b.id));
    assert_eq!(s.update_device(a.id, &pick(0), 6).unwrap().use_exit, None);
    assert_eq!(s.device(a.id).unwrap().unwrap().use_exit, None);
    let err = s
        .update_device(
            b.id,
            &DeviceUpdate {
                advertise_cidrs: Some(vec!["198.51.100.0/25".parse().unwrap()]),
                ..Default::default()
            },
            7,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("device {}", a.id)),
        "{err}"
    );
    // A device may re-advertise its own prefix.
    s.update_device(a.id, &upd, 8).unwrap();
    // A new device may not take an advertised prefix either.
    let mut r = req(3, true);
    r.advertise_cidrs = vec!["198.51.100.128/25".parse().unwrap()];
    let err = s
        .register_device(&r, &hash_secret("t"), "cc", 9)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Ipam(IpamError::Overlap { .. })),
        "{err}"
    );
    let err = s
        .update_device(
            b.id,
            &DeviceUpdate {
                endpoints: Some(vec!["192.0.2.1:1".parse().unwrap(); 17]),
                ..Default::default()
            },
            10,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}

fn login_tracks_ipv6_support(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let a = register(s, 1, false, "ca", 5);
    assert_eq!(a.tunnel_ip_v6, None);
    let a = s.login(a.id, "ca", Some(true), 6).unwrap();
    assert_eq!(a.tunnel_ip_v6.unwrap().to_string(), "200::1");
    let a = s.login(a.id, "ca", Some(false), 7).unwrap();
    assert_eq!(a.tunnel_ip_v6, None);
    let rev = s.current_revision().unwrap();
    s.login(a.id, "ca", Some(false), 8).unwrap();
    assert_eq!(s.current_revision().unwrap(), rev, "no change, no revision");
    assert!(matches!(
        s.login(a.id, "x", None, 9),
        Err(StoreError::Unauthorized)
    ));
}

fn reopen_keeps_everything_and_schema_version(b: Backend) {
    let mut f = Fresh::new(b);
    let ids: HashSet<i64> = {
        let s = f.store.as_mut();
        token(s, "t", true, None);
        (1..=5).map(|n| register(s, n, true, "c", 5).id).collect()
    };
    let mut s = f.reopen();
    assert!(!s.ensure_default_org(1).unwrap());
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    let (rev, devices) = s.snapshot(org.id).unwrap();
    assert_eq!(rev, 5);
    assert_eq!(devices.iter().map(|d| d.id).collect::<HashSet<_>>(), ids);
    let newest = match b {
        Backend::Sqlite => migrate::migrations(),
        Backend::Postgres => migrate::pg_migrations(),
    }
    .unwrap()
    .last()
    .unwrap()
    .0;
    assert_eq!(f.schema_version(), newest);
}

fn other_org_prefixes(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    let org = create_org(s, "lab", "192.0.2.0/30", "2001:db8::/126").unwrap();
    assert_eq!(s.orgs().unwrap().len(), 2);
    s.create_token(org.id, &hash_secret("lab"), true, None, 0)
        .unwrap();
    let a = s
        .register_device(&req(1, true), &hash_secret("lab"), "c", 1)
        .unwrap();
    assert_eq!(a.tunnel_ip.to_string(), "192.0.2.1");
    assert_eq!(a.tunnel_ip_v6.unwrap().to_string(), "2001:db8::1");
    s.register_device(&req(2, true), &hash_secret("lab"), "c", 1)
        .unwrap();
    let err = s
        .register_device(&req(3, true), &hash_secret("lab"), "c", 1)
        .unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
    assert!(matches!(
        create_org(s, "lab", "10.0.0.0/8", "fd00::/64"),
        Err(StoreError::OrgExists(_))
    ));
    assert!(matches!(
        create_org(s, "bits", "10.0.0.1/8", "fd00::/64"),
        Err(StoreError::Invalid(_))
    ));
    // The default organization's pool is its own.
    token(s, "t", true, None);
    let d = register(s, 4, true, "c", 1);
    assert_eq!(d.tunnel_ip.to_string(), "100.64.0.1");
}

fn unmanaged_devices_are_relay_only_spokes(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    let d = s.add_unmanaged(org.id, "phone", &key(9), "x", 3).unwrap();
    assert!(d.unmanaged && d.relay_only && !d.relay);
    assert_eq!(d.tunnel_ip.to_string(), "100.64.0.1");
    assert_eq!(d.tunnel_ip_v6.unwrap().to_string(), "200::1");
    assert!(matches!(
        s.add_unmanaged(org.id, "phone2", &key(9), "x", 3),
        Err(StoreError::DuplicateKey(id)) if id == d.id
    ));
    assert!(matches!(
        s.add_unmanaged(org.id, "", &key(10), "x", 3),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.devices(org.id).unwrap(), vec![d.clone()]);
    assert_eq!(s.device(d.id).unwrap(), Some(d));
}

/// Logins and online changes committed together behave as one after the other; a bad
/// credential is refused alone.
fn presence_batch_is_each_write_in_order(b: Backend) {
    use crate::store::Presence;
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    s.reset_online(1).unwrap();
    token(s, "t", true, None);
    let a = register(s, 1, false, "ca", 1);
    let b2 = register(s, 2, true, "cb", 1);
    let rev = s.current_revision().unwrap();
    let out = s.presence(
        &[
            Presence::Login {
                device_id: a.id,
                credential_hash: "ca",
                ipv6_supported: None,
                instance: None,
            },
            Presence::Login {
                device_id: b2.id,
                credential_hash: "wrong",
                ipv6_supported: None,
                instance: None,
            },
            Presence::Online {
                device_id: a.id,
                online: true,
            },
            Presence::Online {
                device_id: b2.id,
                online: true,
            },
            Presence::Online {
                device_id: b2.id,
                online: false,
            },
            Presence::Online {
                device_id: 9999,
                online: true,
            },
        ],
        3,
    );
    assert_eq!(out.len(), 6);
    assert!(matches!(&out[0], Ok(Some(d)) if d.id == a.id));
    assert!(matches!(out[1], Err(StoreError::Unauthorized)));
    assert!(out[2..].iter().all(|r| matches!(r, Ok(None))));
    assert!(s.device(a.id).unwrap().unwrap().online);
    assert!(!s.device(b2.id).unwrap().unwrap().online);
    // a online, b online, b offline: three changes.
    assert_eq!(s.current_revision().unwrap(), rev + 3);
}

fn online_state_is_recorded_once(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    s.reset_online(1).unwrap();
    token(s, "t", true, None);
    let a = register(s, 1, true, "c", 1);
    assert!(!a.online);
    let rev = s.current_revision().unwrap();
    s.set_online(a.id, true, 2).unwrap();
    assert!(s.device(a.id).unwrap().unwrap().online);
    let after = s.current_revision().unwrap();
    assert_eq!(after, rev + 1);
    s.set_online(a.id, true, 3).unwrap();
    assert_eq!(
        s.current_revision().unwrap(),
        after,
        "no change, no revision"
    );
    s.set_online(a.id, false, 4).unwrap();
    let d = s.device(a.id).unwrap().unwrap();
    assert!(!d.online);
    assert_eq!(d.revision, after + 1);
    // Unknown devices are ignored.
    s.set_online(9999, true, 5).unwrap();
    s.set_online(a.id, true, 6).unwrap();
    // A fresh start of the (only) coordinator: nobody is watched any more. With
    // PostgreSQL that is a new replica; the old one's watches go when it expires
    // (see `postgres_only::a_dead_replica_expires`).
    let mut s2 = f.reopen();
    if matches!(b, Backend::Sqlite) {
        assert_eq!(s2.reset_online(7).unwrap(), 1);
        assert!(!s2.device(a.id).unwrap().unwrap().online);
    } else {
        assert_eq!(s2.reset_online(7).unwrap(), 0);
        assert!(s2.device(a.id).unwrap().unwrap().online);
    }
}

fn changes_carry_current_state(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let a = register(s, 1, true, "c", 1);
    let b2 = register(s, 2, true, "c", 1);
    let upd = DeviceUpdate {
        hostname: Some("renamed".into()),
        ..Default::default()
    };
    s.update_device(a.id, &upd, 2).unwrap();
    s.remove_device(b2.id, 3).unwrap();
    let changes = s.changes_since(0, 100).unwrap();
    let revs: Vec<i64> = changes.iter().map(|c| c.revision).collect();
    let mut sorted = revs.clone();
    sorted.sort_unstable();
    assert_eq!(revs, sorted);
    assert_eq!(changes.len(), 4);
    // Each entry carries the device as it is now.
    assert_eq!(
        changes[0].device.as_ref().unwrap().hostname,
        "renamed",
        "{changes:?}"
    );
    assert_eq!(changes[1].device, None);
    assert_eq!(s.changes_since(0, 2).unwrap().len(), 2);
    assert_eq!(s.changes_since(revs[3], 10).unwrap().len(), 0);
}

/// A second connection (another process, or another replica) registers, removes and
/// changes devices: the first connection's address index follows.
fn allocation_sees_changes_from_another_connection(b: Backend) {
    let mut f = Fresh::new(b);
    let mut other = f.reopen();
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let a = register(s, 1, true, "c", 1);
    let b2 = register(other.as_mut(), 2, true, "c", 1);
    assert_eq!(b2.tunnel_ip.to_string(), "100.64.0.2");
    let c = register(s, 3, true, "c", 1);
    assert_eq!(c.tunnel_ip.to_string(), "100.64.0.3");
    other.remove_device(a.id, 2).unwrap();
    let d = register(s, 4, false, "c", 3);
    assert_eq!(d.tunnel_ip, a.tunnel_ip, "a removed address is free again");
    // v6 given back by the other connection, then taken again here.
    other.login(b2.id, "c", Some(false), 4).unwrap();
    let e = register(s, 5, true, "c", 5);
    assert_eq!(e.tunnel_ip.to_string(), "100.64.0.4");
    assert_eq!(
        e.tunnel_ip_v6.unwrap().to_string(),
        "200::4",
        "same host number"
    );
    let b2 = s.login(b2.id, "c", Some(true), 6).unwrap();
    assert_eq!(
        b2.tunnel_ip_v6.unwrap().to_string(),
        "200::2",
        "freed by the other connection, and its own host number"
    );
}

/// A batch: one transaction, but each registration gets what it would have got alone,
/// in order; refusals stay with their own registration.
fn a_batch_is_registrations_one_after_the_other(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    token(s, "once", false, None);
    let (t, once, bad) = (hash_secret("t"), hash_secret("once"), hash_secret("nope"));
    let mut asks_50 = req(3, true);
    asks_50.request_ip = Some("100.64.0.50".parse().unwrap());
    let mut also_50 = req(4, true);
    also_50.request_ip = Some("100.64.0.50".parse().unwrap());
    let reqs = [
        (req(1, true), &t),
        (req(2, false), &once),
        (req(9, true), &once),
        (req(1, true), &t),
        (asks_50, &t),
        (also_50, &t),
        (req(5, true), &bad),
        (req(6, true), &t),
    ];
    let batch: Vec<Registration<'_>> = reqs
        .iter()
        .map(|(r, tok)| Registration {
            req: r,
            token_hash: tok,
            credential_hash: "c",
        })
        .collect();
    let before = s.current_revision().unwrap();
    let out = s.register_devices(&batch, 5);
    assert_eq!(out.len(), 8);
    let ok: Vec<&Device> = out.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 4, "{out:?}");
    assert_eq!(out[0].as_ref().unwrap().tunnel_ip.to_string(), "100.64.0.1");
    assert_eq!(out[1].as_ref().unwrap().tunnel_ip.to_string(), "100.64.0.2");
    assert_eq!(out[1].as_ref().unwrap().tunnel_ip_v6, None);
    assert!(matches!(out[2], Err(StoreError::TokenUsed)), "{:?}", out[2]);
    let first = out[0].as_ref().unwrap().id;
    assert!(matches!(out[3], Err(StoreError::DuplicateKey(id)) if id == first));
    assert_eq!(
        out[4].as_ref().unwrap().tunnel_ip.to_string(),
        "100.64.0.50"
    );
    assert!(
        matches!(out[5], Err(StoreError::Ipam(IpamError::Taken(_)))),
        "{:?}",
        out[5]
    );
    assert!(matches!(out[6], Err(StoreError::InvalidToken)));
    let last = out[7].as_ref().unwrap();
    assert_eq!(last.tunnel_ip.to_string(), "100.64.0.3");
    assert_eq!(last.tunnel_ip_v6.unwrap().to_string(), "200::3");
    // One change each, all logged, each device stamped with its own revision.
    let log = s.changes_since(before, 100).unwrap();
    assert_eq!(log.len(), 4);
    for d in ok {
        assert!(
            log.iter()
                .any(|c| c.device_id == d.id && c.revision == d.revision)
        );
        assert_eq!(s.device(d.id).unwrap().as_ref(), Some(d));
    }
    // The next batch (and a single registration) continue from there.
    let d = register(s, 7, true, "c", 6);
    assert_eq!(d.tunnel_ip.to_string(), "100.64.0.4");
    assert!(s.register_devices(&[], 7).is_empty());
}

mod postgres_only {
    use super::*;

    fn pg() -> Fresh {
        Fresh::new(Backend::Postgres)
    }

    /// Two replicas on one database register 200 devices from 8 threads each: every
    /// address is given once, and the change log holds every revision in order.
    #[test]
    fn concurrent_replicas_never_share_an_address() {
        let mut f = pg();
        token(f.store.as_mut(), "t", true, None);
        let results: Vec<Device> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for t in 0..16u32 {
                let url = &f.url;
                handles.push(scope.spawn(move || {
                    let mut s = PgStore::connect(url).unwrap();
                    (0..25u32)
                        .map(|i| {
                            let n = 100 + t * 25 + i;
                            s.register_device(&req_n(n, n % 5 != 0), &hash_secret("t"), "c", 1)
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                }));
            }
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(results.len(), 400);
        let v4: HashSet<_> = results.iter().map(|d| d.tunnel_ip).collect();
        let v6: Vec<_> = results.iter().filter_map(|d| d.tunnel_ip_v6).collect();
        assert_eq!(v4.len(), 400, "a v4 address was given twice");
        assert_eq!(v6.iter().collect::<HashSet<_>>().len(), v6.len());
        // The lowest addresses: no holes left by the retried transactions.
        let max = v4.iter().max().unwrap();
        assert_eq!(
            max.to_string(),
            "100.64.1.144",
            "400th host of 100.64.0.0/10"
        );
        let s = f.store.as_mut();
        let log = s.changes_since(0, 10_000).unwrap();
        assert_eq!(log.len(), 400);
        assert!(log.windows(2).all(|w| w[0].revision < w[1].revision));
    }

    /// A single-use token is spent once even when replicas race for it.
    #[test]
    fn single_use_token_spent_once_across_replicas() {
        let f = pg();
        let mut s = f.reopen();
        token(s.as_mut(), "once", false, None);
        let ok = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6u32)
                .map(|t| {
                    let url = &f.url;
                    scope.spawn(move || {
                        PgStore::connect(url)
                            .unwrap()
                            .register_device(&req_n(t, true), &hash_secret("once"), "c", 1)
                            .is_ok()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|ok| *ok)
                .count()
        });
        assert_eq!(ok, 1);
    }

    /// A device is online while any replica watches it; a replica that stops
    /// heartbeating loses its watches.
    #[test]
    fn online_across_replicas_and_a_dead_replica_expires() {
        let f = pg();
        let mut r1 = PgStore::connect(&f.url).unwrap();
        let mut r2 = PgStore::connect(&f.url).unwrap();
        r1.reset_online(1).unwrap();
        r2.reset_online(1).unwrap();
        token(&mut r1, "t", true, None);
        let a = register(&mut r1, 1, true, "c", 1);
        let b = register(&mut r1, 2, true, "c", 1);
        r1.set_online(a.id, true, 2).unwrap();
        r2.set_online(a.id, true, 2).unwrap();
        r1.set_online(b.id, true, 2).unwrap();
        r1.set_online(a.id, false, 3).unwrap();
        assert!(r1.device(a.id).unwrap().unwrap().online, "r2 still watches");
        // r1 dies: its heartbeat gets old.
        let db = f.url.rsplit('/').next().unwrap();
        server()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .query(
                db,
                &format!(
                    "UPDATE cluster_replicas SET heartbeat = heartbeat - 100 WHERE id = '{}'",
                    r1.replica_id()
                ),
            )
            .unwrap();
        let rev = r2.current_revision().unwrap();
        assert!(!r2.heartbeat().unwrap());
        assert!(
            !r2.device(b.id).unwrap().unwrap().online,
            "b was only on r1"
        );
        assert!(r2.device(a.id).unwrap().unwrap().online);
        assert_eq!(r2.current_revision().unwrap(), rev + 1);
        // r1 comes back: it learns it was expired and must record its watches again.
        assert!(r1.heartbeat().unwrap());
        r1.set_online(b.id, true, 9).unwrap();
        assert!(r2.device(b.id).unwrap().unwrap().online);
    }

    /// A second node process with a device's credential is refused through another
    /// replica while the first one's replica is alive, naming the first's address;
    /// the same process moves (failover); a dead replica's sessions lock nobody out.
    #[test]
    fn a_clone_is_refused_across_replicas() {
        use crate::store::Presence;
        let f = pg();
        let mut r1 = PgStore::connect(&f.url).unwrap();
        let mut r2 = PgStore::connect(&f.url).unwrap();
        r1.reset_online(1).unwrap();
        r2.reset_online(1).unwrap();
        token(&mut r1, "t", true, None);
        let a = register(&mut r1, 1, true, "c", 1);
        r1.claim_watch(a.id, Some(7), "192.0.2.7:1000", 2).unwrap();
        r1.set_online(a.id, true, 2).unwrap();
        let refused = |e: &StoreError| matches!(e, StoreError::Connected { id, from } if *id == a.id && from == "192.0.2.7:1000");
        let e = r2
            .claim_watch(a.id, Some(8), "192.0.2.8:1000", 3)
            .unwrap_err();
        assert!(refused(&e), "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "device {} already connected from 192.0.2.7:1000",
                a.id
            )),
            "{e}"
        );
        let login = |r: &mut PgStore, instance| {
            r.presence(
                &[Presence::Login {
                    device_id: a.id,
                    credential_hash: "c",
                    ipv6_supported: None,
                    instance,
                }],
                3,
            )
            .pop()
            .unwrap()
        };
        assert!(refused(&login(&mut r2, Some(8)).unwrap_err()));
        // Nodes that send no instance, and r1 itself (its hub decides), are not refused.
        assert!(login(&mut r2, None).is_ok());
        assert!(login(&mut r1, Some(8)).is_ok());
        // The same process through r2: taken over, r1's row goes.
        assert!(login(&mut r2, Some(7)).is_ok());
        r2.claim_watch(a.id, Some(7), "192.0.2.7:2000", 4).unwrap();
        let e = r1
            .claim_watch(a.id, Some(9), "192.0.2.9:1000", 4)
            .unwrap_err();
        assert!(e.to_string().contains("from 192.0.2.7:2000"), "{e}");
        // r2 is killed: once its heartbeat is SESSION_TIMEOUT_SECS old, another
        // process (the node restarted) is served through r1.
        let db = f.url.rsplit('/').next().unwrap();
        server()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .query(
                db,
                &format!(
                    "UPDATE cluster_replicas SET heartbeat = heartbeat - {} WHERE id = '{}'",
                    crate::store::pg::SESSION_TIMEOUT_SECS + 1,
                    r2.replica_id()
                ),
            )
            .unwrap();
        r1.claim_watch(a.id, Some(9), "192.0.2.9:1000", 5).unwrap();
        // r1 stops (SIGTERM): its sessions lock nobody out, though the device stays
        // online until it reconnects elsewhere.
        r1.leave().unwrap();
        r2.claim_watch(a.id, Some(11), "192.0.2.11:1", 6).unwrap();
        assert!(r2.device(a.id).unwrap().unwrap().online);
        r2.set_online(a.id, false, 6).unwrap();
        // A watch that ends takes its row along.
        r1.set_online(a.id, false, 6).unwrap();
        let e = r2.claim_watch(a.id, Some(10), "192.0.2.10:1", 6);
        assert!(
            e.is_ok(),
            "r1's watch ended and r2's own row is r2's: {e:?}"
        );
    }

    /// The shared TLS identity: the first replica's stays.
    #[test]
    fn identity_is_stored_once() {
        let f = pg();
        let mut a = PgStore::connect(&f.url).unwrap();
        let mut b = PgStore::connect(&f.url).unwrap();
        assert_eq!(a.identity().unwrap(), None);
        let first = a.insert_identity(b"cert1", b"key1", 1).unwrap();
        let second = b.insert_identity(b"cert2", b"key2", 2).unwrap();
        assert_eq!(first, (b"cert1".to_vec(), b"key1".to_vec()));
        assert_eq!(second, first);
        assert_eq!(b.identity().unwrap(), Some(first));
    }

    /// The PostgreSQL DDL describes the same tables and columns as schema.sql: names,
    /// order, nullability, defaults, types (INTEGER → BIGINT or BOOLEAN, TEXT → TEXT).
    #[test]
    fn pg_schema_matches_sqlite_schema() {
        let f = pg();
        let sqlite = rusqlite::Connection::open(&f.path).unwrap();
        SqliteStore::open(&f.path).unwrap();
        let mut tables: Vec<String> = sqlite
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        tables.sort();
        let db = f.url.rsplit('/').next().unwrap();
        let pgsrv = server().lock().unwrap_or_else(|e| e.into_inner());
        let mut pg_tables = pgsrv
            .query(
                db,
                "SELECT table_name FROM information_schema.tables \
                 WHERE table_schema = 'public' ORDER BY table_name",
            )
            .unwrap();
        pg_tables.sort();
        // Only in PostgreSQL: what replicas share, and the migration bookkeeping that
        // SQLite keeps in PRAGMA user_version.
        let pg_only = [
            "cluster_identity",
            "cluster_replicas",
            "cluster_watches",
            "schema_migrations",
        ];
        let common: Vec<String> = pg_tables
            .iter()
            .filter(|t| !pg_only.contains(&t.as_str()))
            .cloned()
            .collect();
        assert_eq!(common, tables, "tables differ");
        for table in &tables {
            let lite: Vec<String> = sqlite
                .prepare(&format!("PRAGMA table_info({table})"))
                .unwrap()
                .query_map([], |r| {
                    let name: String = r.get(1)?;
                    let ty: String = r.get(2)?;
                    let notnull: bool = r.get(3)?;
                    let default: Option<String> = r.get(4)?;
                    let pk: i64 = r.get(5)?;
                    Ok(format!(
                        "{name} {} null={} default={} pk={}",
                        ty.to_uppercase(),
                        !notnull && pk == 0,
                        default.map_or("-".into(), |d| normalize_default(&d)),
                        pk > 0
                    ))
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let pg: Vec<String> = pgsrv
                .query(
                    db,
                    &format!(
                        "SELECT c.column_name || ' ' || c.data_type || ' ' || c.is_nullable || ' ' \
                         || COALESCE(c.column_default, '-') || ' ' || c.is_identity || ' ' || \
                         EXISTS (SELECT 1 FROM information_schema.table_constraints tc \
                           JOIN information_schema.key_column_usage k \
                           ON k.constraint_name = tc.constraint_name AND k.table_name = tc.table_name \
                           WHERE tc.table_name = c.table_name AND tc.constraint_type = 'PRIMARY KEY' \
                           AND k.column_name = c.column_name) \
                         FROM information_schema.columns c \
                         WHERE c.table_schema = 'public' AND c.table_name = '{table}' \
                         ORDER BY c.ordinal_position"
                    ),
                )
                .unwrap()
                .into_iter()
                .map(|row| {
                    let p: Vec<&str> = row.split(' ').collect();
                    let (name, ty) = (p[0], p[1]);
                    // data_type may be two words ("character varying"): not used here.
                    let ty = match ty {
                        "bigint" | "boolean" => "INTEGER",
                        "text" => "TEXT",
                        other => panic!("{table}.{name}: unexpected type {other}"),
                    };
                    let n = p.len();
                    let pk = p[n - 1] == "true";
                    let nullable = p[2] == "YES";
                    let default = p[3..n - 2].join(" ");
                    format!(
                        "{name} {ty} null={nullable} default={} pk={pk}",
                        normalize_default(&default)
                    )
                })
                .collect();
            assert_eq!(pg, lite, "columns of {table} differ");
        }
    }

    /// Defaults compared across dialects: `'[]'` and `'[]'::text`, `0`/`FALSE`,
    /// `1`/`TRUE`; "-" for none.
    fn normalize_default(d: &str) -> String {
        let d = d.trim();
        let d = d.strip_suffix("::text").unwrap_or(d);
        match d {
            "false" | "FALSE" => "0".into(),
            "true" | "TRUE" => "1".into(),
            other => other.to_string(),
        }
    }
}

/// The SQLite file and its `-wal`/`-shm` companions are 0600 whatever the umask, and a
/// symbolic link in the database's place is refused (issue 16 item 7).
#[test]
fn sqlite_files_are_private_and_never_links() {
    use std::os::unix::fs::PermissionsExt;
    // The usual umask, which would give 0644 files.
    // SAFETY: umask has no preconditions; 022 is what other tests get anyway.
    unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nexodus.db");
    let mut s = SqliteStore::open(&path).unwrap();
    s.ensure_default_org(0).unwrap();
    token(&mut s, "t", true, None);
    register(&mut s, 1, true, "c", 1);
    for name in ["nexodus.db", "nexodus.db-wal", "nexodus.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
    }
    drop(s);
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = SqliteStore::open(&link).err().unwrap().to_string();
    assert!(
        err.contains("cannot open") && err.contains("link.db"),
        "{err}"
    );
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

/// The changes after `rev`, as (device id, device as peers see it).
fn peer_changes(s: &mut dyn Store, rev: i64) -> Vec<(i64, Device)> {
    s.changes_since(rev, 100)
        .unwrap()
        .into_iter()
        .filter(|c| c.device_id != flow::POLICY_CHANGE_ID)
        .map(|c| (c.device_id, c.device.expect("not removed")))
        .collect()
}

fn claims_reach_peers_only_once_approved(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    let mut r = req(1, true);
    r.advertise_cidrs = vec![net("198.51.100.0/24"), net("2001:db8:100::/48")];
    r.relay = true;
    let a = s.register_device(&r, &hash_secret("t"), "c", 1).unwrap();
    let other = register(s, 2, true, "c", 1);
    // Stored as claimed; peers see nothing of it.
    assert_eq!(
        s.device(a.id).unwrap().unwrap().advertise_cidrs,
        r.advertise_cidrs
    );
    let seen = peer_changes(s, 0);
    let (_, mine) = seen.iter().find(|(id, _)| *id == a.id).unwrap();
    assert!(mine.advertise_cidrs.is_empty() && !mine.relay, "{mine:?}");
    let view = s.admin_devices(org.id).unwrap();
    assert_eq!(view[0].pending.routes, r.advertise_cidrs);
    assert!(view[0].pending.relay && view[0].in_effect.is_empty());

    // A wider v4 prefix approves the advertised one: one change, for that device.
    let before = s.current_revision().unwrap();
    let d = s
        .approve(None, a.id, &[net("198.51.100.0/23")], false, false, 2)
        .unwrap();
    assert_eq!(d.approved.routes, vec![net("198.51.100.0/23")]);
    let seen = peer_changes(s, before);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].1.advertise_cidrs, vec![net("198.51.100.0/24")]);
    assert!(!seen[0].1.relay && seen[0].1.approved.is_empty());

    // The relay role; then everything it claims (no flags).
    s.approve(Some(org.id), a.id, &[], true, false, 3).unwrap();
    let peers = s.peer_devices(org.id).unwrap();
    assert!(peers[0].relay);
    s.approve(None, a.id, &[], false, false, 4).unwrap();
    let view = s.admin_devices(org.id).unwrap();
    assert!(view[0].pending.is_empty(), "{:?}", view[0].pending);
    assert_eq!(
        s.snapshot(org.id).unwrap().1[0].advertise_cidrs,
        r.advertise_cidrs
    );

    // Revoking the v6 prefix, then everything (no flags).
    let before = s.current_revision().unwrap();
    s.revoke(None, a.id, &[net("2001:db8:100::/48")], false, false, 5)
        .unwrap();
    let seen = peer_changes(s, before);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1.advertise_cidrs, vec![net("198.51.100.0/24")]);
    s.revoke(None, a.id, &[], false, false, 6).unwrap();
    let peers = s.peer_devices(org.id).unwrap();
    assert!(peers[0].advertise_cidrs.is_empty() && !peers[0].relay);
    assert!(s.device(a.id).unwrap().unwrap().approved.is_empty());

    // Refusals change nothing.
    let before = s.current_revision().unwrap();
    assert!(matches!(
        s.approve(None, 999, &[], true, false, 7),
        Err(StoreError::DeviceNotFound(999))
    ));
    let lab = create_org(s, "lab", "10.1.0.0/16", "fd00:1::/64").unwrap();
    assert!(matches!(
        s.approve(Some(lab.id), other.id, &[], true, false, 7),
        Err(StoreError::DeviceNotFound(_))
    ));
    let err = s
        .approve(None, a.id, &[net("198.51.100.1/24")], false, false, 7)
        .unwrap_err();
    assert!(err.to_string().contains("198.51.100.0/24"), "{err}");
    assert_eq!(s.current_revision().unwrap(), before);
}

const APPROVE_ROUTERS: &str = "[approve]\nroutes = [{ cidr = \"198.51.100.0/24\", by = [\"router*\"] }]\nrelay = [\"relay*\"]\n";

fn policy_approves_in_advance(b: Backend) {
    let mut f = Fresh::new(b);
    let s = f.store.as_mut();
    token(s, "t", true, None);
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    assert_eq!(s.policy(org.id).unwrap(), None);
    assert!(!s.clear_policy(org.id, 1).unwrap());
    let mut r = req(1, true);
    r.hostname = "router1".into();
    r.advertise_cidrs = vec![net("198.51.100.0/25")];
    let router = s.register_device(&r, &hash_secret("t"), "c", 1).unwrap();
    register(s, 2, true, "c", 1);

    // A file that does not validate is refused and nothing changes.
    let before = s.current_revision().unwrap();
    let err = s
        .set_policy(
            org.id,
            "[[allow]]\nfrom = [\"group:nope\"]\nto = [\"*\"]\n",
            2,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Policy(_)), "{err}");
    assert_eq!(s.policy(org.id).unwrap(), None);
    assert_eq!(s.current_revision().unwrap(), before);

    // Set: only the device whose effective claims changed gets a change.
    assert_eq!(s.set_policy(org.id, APPROVE_ROUTERS, 3).unwrap(), 1);
    let seen = peer_changes(s, before);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, router.id);
    assert_eq!(seen[0].1.advertise_cidrs, r.advertise_cidrs);
    let stored = s.policy(org.id).unwrap().unwrap();
    assert_eq!(
        (stored.text.as_str(), stored.revision, stored.updated_at),
        (APPROVE_ROUTERS, 1, 3)
    );

    // A bad file later keeps the old one; the same file again is a new revision
    // that changes no device.
    assert!(s.set_policy(org.id, "[approve]\nrelay = 3\n", 4).is_err());
    assert_eq!(s.policy(org.id).unwrap().unwrap().revision, 1);
    let before = s.current_revision().unwrap();
    assert_eq!(s.set_policy(org.id, APPROVE_ROUTERS, 5).unwrap(), 2);
    assert!(peer_changes(s, before).is_empty());

    // Clear: the route is no longer approved, and peers are told.
    assert!(s.clear_policy(org.id, 6).unwrap());
    let seen = peer_changes(s, before);
    assert_eq!(seen.len(), 1);
    assert!(seen[0].1.advertise_cidrs.is_empty());
    assert_eq!(s.policy(org.id).unwrap(), None);
    assert!(!s.clear_policy(org.id, 7).unwrap());
    // Revisions count on after a clear.
    assert_eq!(s.set_policy(org.id, APPROVE_ROUTERS, 8).unwrap(), 4);
}
