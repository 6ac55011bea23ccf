use std::collections::HashSet;

use super::*;
use crate::coord::token::hash_secret;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(&dir.path().join("t.db")).unwrap();
    s.ensure_default_org(0).unwrap();
    (dir, s)
}

fn token(s: &mut Store, secret: &str, reusable: bool, expires: Option<i64>) {
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    s.create_token(org.id, &hash_secret(secret), reusable, expires, 0)
        .unwrap();
}

fn req(n: u8, v6: bool) -> RegisterRequest {
    let secret = boringtun::x25519::StaticSecret::from([n.max(1); 32]);
    let public = boringtun::x25519::PublicKey::from(&secret);
    RegisterRequest {
        token_secret: String::new(),
        public_key: crate::coord::keys::encode_key(public.as_bytes()),
        hostname: format!("host{n}"),
        os: "linux".into(),
        ipv6_supported: v6,
        endpoints: vec![],
        advertise_cidrs: vec![],
        relay: false,
        relay_only: false,
        symmetric_nat: false,
        request_ip: None,
        request_ip_v6: None,
    }
}

#[test]
fn registers_dual_stack_in_order() {
    let (_d, mut s) = store();
    token(&mut s, "t", true, None);
    let a = s
        .register_device(&req(1, true), &hash_secret("t"), "c1", 5)
        .unwrap();
    let b = s
        .register_device(&req(2, true), &hash_secret("t"), "c2", 5)
        .unwrap();
    let c = s
        .register_device(&req(3, false), &hash_secret("t"), "c3", 5)
        .unwrap();
    assert_eq!(a.tunnel_ip.to_string(), "100.64.0.1");
    assert_eq!(a.tunnel_ip_v6.unwrap().to_string(), "200::1");
    assert_eq!(b.tunnel_ip_v6.unwrap().to_string(), "200::2");
    assert_eq!(c.tunnel_ip.to_string(), "100.64.0.3");
    assert_eq!(c.tunnel_ip_v6, None);
    assert!(a.revision < b.revision && b.revision < c.revision);
    assert_eq!(s.current_revision().unwrap(), c.revision);
}

#[test]
fn tokens_checked() {
    let (_d, mut s) = store();
    token(&mut s, "once", false, None);
    token(&mut s, "old", true, Some(10));
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

#[test]
fn failed_registration_changes_nothing() {
    let (_d, mut s) = store();
    token(&mut s, "t", false, None);
    let mut r = req(1, true);
    r.request_ip = Some("10.0.0.1".parse().unwrap());
    assert!(matches!(
        s.register_device(&r, &hash_secret("t"), "c", 5),
        Err(StoreError::Ipam(IpamError::OutsidePrefix { .. }))
    ));
    // The single-use token was not consumed, and nothing was logged.
    assert_eq!(s.current_revision().unwrap(), 0);
    s.register_device(&req(1, true), &hash_secret("t"), "c", 5)
        .unwrap();
}

#[test]
fn request_ip_and_duplicate_key() {
    let (_d, mut s) = store();
    token(&mut s, "t", true, None);
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
}

#[test]
fn removal_returns_addresses_and_logs() {
    let (_d, mut s) = store();
    token(&mut s, "t", true, None);
    let a = s
        .register_device(&req(1, true), &hash_secret("t"), "c", 5)
        .unwrap();
    let _b = s
        .register_device(&req(2, true), &hash_secret("t"), "c", 5)
        .unwrap();
    let before = s.current_revision().unwrap();
    s.remove_device(a.id, 6).unwrap();
    let changes = s.changes_since(before, 100).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].device_id, a.id);
    assert_eq!(changes[0].device, None);
    let c = s
        .register_device(&req(3, true), &hash_secret("t"), "c", 7)
        .unwrap();
    assert_eq!(c.tunnel_ip, a.tunnel_ip);
    assert_eq!(c.tunnel_ip_v6, a.tunnel_ip_v6);
    assert!(matches!(
        s.remove_device(a.id, 8),
        Err(StoreError::DeviceNotFound(_))
    ));
}

#[test]
fn auth_update_and_overlap() {
    let (_d, mut s) = store();
    token(&mut s, "t", true, None);
    let a = s
        .register_device(&req(1, true), &hash_secret("t"), "ca", 5)
        .unwrap();
    let b = s
        .register_device(&req(2, true), &hash_secret("t"), "cb", 5)
        .unwrap();
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
}

#[test]
fn login_tracks_ipv6_support() {
    let (_d, mut s) = store();
    token(&mut s, "t", true, None);
    let a = s
        .register_device(&req(1, false), &hash_secret("t"), "ca", 5)
        .unwrap();
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

#[test]
fn reopen_keeps_everything_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let ids: HashSet<i64> = {
        let mut s = Store::open(&path).unwrap();
        s.ensure_default_org(0).unwrap();
        token(&mut s, "t", true, None);
        (1..=5)
            .map(|n| {
                s.register_device(&req(n, true), &hash_secret("t"), "c", 5)
                    .unwrap()
                    .id
            })
            .collect()
    };
    let mut s = Store::open(&path).unwrap();
    assert!(!s.ensure_default_org(1).unwrap());
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    let (rev, devices) = s.snapshot(org.id).unwrap();
    assert_eq!(rev, 5);
    assert_eq!(devices.iter().map(|d| d.id).collect::<HashSet<_>>(), ids);
    let migrations = migrate::migrations().unwrap();
    let version: i64 = s
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, migrations.last().unwrap().0);
}

#[test]
fn other_org_prefixes() {
    let (_d, mut s) = store();
    let org = s
        .create_org(
            "lab",
            "192.0.2.0/30".parse().unwrap(),
            "2001:db8::/126".parse().unwrap(),
            0,
        )
        .unwrap();
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
        s.create_org(
            "lab",
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
            0
        ),
        Err(StoreError::OrgExists(_))
    ));
}
