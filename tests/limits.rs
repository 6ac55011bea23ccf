//! What one client can make the coordinator hold (DESIGN §13, issue 16): QUIC
//! connections and streams that never read or write, watch streams that never read,
//! oversized and too frequent updates, and a change log that is pruned. The
//! coordinator runs on loopback (127.16.0.N, attackers on 127.16.9.N), like
//! tests/coordinator.rs; the change-log tests use the library directly.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Coordinator, register_request, wait_for};
use nexodus::client::{ClientError, ControlClient};
use nexodus::coord::token::{JoinToken, hash_secret};
use nexodus::serve::hub::Hub;
use nexodus::store::{DEFAULT_ORG, SqliteStore, Store};
use nexodus::wire::control::{
    Auth, Device, DeviceUpdate, ErrorCode, Request, Response, SERVER_NAME,
};

const DEADLINE: Duration = Duration::from_secs(180);

async fn register(c: &ControlClient, token: &JoinToken, name: &str, seed: u64) -> (Device, Auth) {
    match c
        .call(&Request::Register(register_request(token, name, seed)))
        .await
    {
        Ok(Response::Registered { device, credential }) => {
            let auth = Auth {
                device_id: device.id,
                credential,
            };
            (device, auth)
        }
        other => panic!("registration failed: {other:?}"),
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A QUIC client endpoint on `source` (a loopback address of its own, so the
/// coordinator counts its connections apart) with `transport`.
fn endpoint(source: IpAddr, fp: [u8; 32], transport: quinn::TransportConfig) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client(SocketAddr::new(source, 0)).unwrap();
    let mut cfg = nexodus::identity::client_config(fp).unwrap();
    cfg.transport_config(Arc::new(transport));
    ep.set_default_client_config(cfg);
    ep
}

/// One attacking connection: bidirectional streams that announce the largest
/// request and send a little of it, opened as fast as the coordinator grants them,
/// plus unidirectional streams stuffed with data; never reads anything.
async fn attack(conn: quinn::Connection, held: Arc<Mutex<Vec<quinn::SendStream>>>) {
    for _ in 0..4 {
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(2), conn.open_uni()).await
            {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    s.write_all(&vec![0x55; 256 << 10]),
                )
                .await;
                std::future::pending::<()>().await;
            }
        });
    }
    let mut frame = (64u32 * 1024).to_be_bytes().to_vec();
    frame.extend_from_slice(&[b'{'; 1000]);
    while let Ok((mut send, _recv)) = conn.open_bi().await {
        if send.write_all(&frame).await.is_err() {
            break;
        }
        held.lock().unwrap().push(send);
        std::mem::forget(_recv);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attacker_connections_and_streams_keep_memory_bounded() {
    common::within(DEADLINE, async {
        let coord = Coordinator::start("127.16.0.1").await;
        let pid = coord.pid().unwrap();
        let fp = coord.fingerprint();
        let token = coord.token(&["--reusable"]);
        let base = rss_kib(pid);
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(Duration::from_secs(2)));
        let ep = endpoint("127.16.9.1".parse().unwrap(), fp, t);
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut conns = Vec::new();
        let mut refused = 0;
        let attempts = (0..300).map(|_| {
            let connecting = ep.connect(coord.addr, SERVER_NAME).unwrap();
            async move { tokio::time::timeout(Duration::from_secs(10), connecting).await }
        });
        for r in futures_join_all(attempts).await {
            match r {
                Ok(Ok(conn)) => conns.push(conn),
                _ => refused += 1,
            }
        }
        // Per source address at most MAX_PER_IP connections.
        assert!(
            conns.len() <= nexodus::serve::limits::MAX_PER_IP,
            "{} connections from one address",
            conns.len()
        );
        assert!(refused > 0, "nothing refused");
        for c in &conns {
            tokio::spawn(attack(c.clone(), held.clone()));
        }
        // A real node registers and watches meanwhile.
        let started = Instant::now();
        let c = coord.client().await;
        let (me, auth) = register(&c, &token, "real", 1).await;
        let mut watch = c.watch(auth).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Ok(Some(Response::Snapshot { devices, .. }))) => {
                assert!(devices.iter().any(|d| d.id == me.id));
            }
            other => panic!("no snapshot under attack: {other:?}"),
        }
        let served = started.elapsed();
        // The attack at its height: sample while the streams pile up.
        let mut peak = 0;
        for _ in 0..16 {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let streams = held.lock().unwrap().len();
        eprintln!(
            "coordinator RSS {} MiB before, {} MiB peak under {} connections ({refused} \
             refused) holding {streams} streams; the real node was served in {served:?}",
            base / 1024,
            peak / 1024,
            conns.len()
        );
        assert!(streams > conns.len(), "the attack opened few streams");
        assert!(
            peak < 150 * 1024,
            "coordinator RSS {} MiB under attack",
            peak / 1024
        );
        // Connections that never authenticated are closed (the real one stays).
        let closed = futures_join_all(conns.iter().cloned().map(|c| async move {
            tokio::time::timeout(Duration::from_secs(45), c.closed())
                .await
                .is_ok()
        }))
        .await;
        assert!(
            closed.iter().all(|&c| c),
            "unauthenticated connections stay"
        );
        assert!(
            c.connection().close_reason().is_none(),
            "the real node's connection was closed"
        );
    })
    .await;
}

/// Runs futures concurrently (no extra crate for `join_all`).
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_watch_streams_do_not_delay_other_snapshots() {
    common::within(DEADLINE, async {
        let coord = Coordinator::start("127.16.0.2").await;
        let fp = coord.fingerprint();
        coord.admin(&["org", "create", "other"]).unwrap();
        let token = coord.token(&["--reusable"]);
        let other = coord.token(&["--org", "other"]);
        let c = coord.client().await;
        let mut devices = Vec::new();
        for i in 0..12 {
            devices.push(register(&c, &token, &format!("stalled{i}"), 100 + i).await);
        }
        // Twelve watchers that never read, each on a connection whose receive
        // window is far smaller than the snapshot.
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(1024u32.into())
            .receive_window(2048u32.into())
            .keep_alive_interval(Some(Duration::from_secs(2)));
        let ep = endpoint("127.16.9.2".parse().unwrap(), fp, t);
        let mut stalled = Vec::new();
        for (_, auth) in &devices {
            let conn = ep.connect(coord.addr, SERVER_NAME).unwrap().await.unwrap();
            let (mut send, recv) = conn.open_bi().await.unwrap();
            let req = nexodus::wire::frame::to_frame(
                &Request::Watch {
                    auth: auth.clone(),
                    instance: None,
                    resume: None,
                },
                nexodus::wire::frame::MAX_REQUEST_LEN,
            )
            .unwrap();
            send.write_all(&req).await.unwrap();
            stalled.push((conn, send, recv));
        }
        // Let them reach their snapshot writes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let c2 = coord.client().await;
        let (me, auth) = register(&c2, &other, "other", 7).await;
        let mut watch = c2.watch(auth).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(3), watch.next()).await {
            Ok(Ok(Some(Response::Snapshot { devices, .. }))) => {
                assert_eq!(devices.iter().map(|d| d.id).collect::<Vec<_>>(), [me.id]);
            }
            other => panic!("another organization's snapshot waited: {other:?}"),
        }
        eprintln!(
            "snapshot beside 12 stalled watchers in {:?}",
            started.elapsed()
        );
        // A stalled write times out and its stream is reset (waited for without
        // reading, which would unstall it).
        let (_, _, recv) = &mut stalled[0];
        let reset = tokio::time::timeout(Duration::from_secs(20), recv.received_reset()).await;
        let waited = started.elapsed();
        assert!(
            matches!(reset, Ok(Ok(Some(_)))),
            "stalled stream not reset: {reset:?}"
        );
        assert!(waited > Duration::from_secs(5), "reset after {waited:?}");
        eprintln!("stalled watch stream reset after {waited:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_watch_stream_replaces_the_first() {
    common::within(DEADLINE, async {
        let (coord, token, c) = Coordinator::with_client("127.16.0.3", &["--reusable"]).await;
        let (a, auth) = register(&c, &token, "a", 1).await;
        let mut first = c.watch(auth.clone()).await.unwrap();
        assert!(matches!(
            first.next().await,
            Ok(Some(Response::Snapshot { .. }))
        ));
        // The node reconnects (its old connection not yet timed out).
        let c2 = coord.client().await;
        let mut second = c2.watch(auth.clone()).await.unwrap();
        assert!(matches!(
            second.next().await,
            Ok(Some(Response::Snapshot { .. }))
        ));
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match first.next().await {
                    Ok(Some(_)) => {}
                    other => return other.is_err() || other.is_ok_and(|o| o.is_none()),
                }
            }
        })
        .await;
        assert_eq!(ended, Ok(true), "the first watch stream was not ended");
        // The second still works, and the device is still online.
        let (b, _) = register(&c2, &token, "b", 2).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, second.next()).await {
                Ok(Ok(Some(Response::Delta { upserts, .. })))
                    if upserts.iter().any(|d| d.id == b.id) =>
                {
                    break;
                }
                Ok(Ok(Some(_))) => {}
                other => panic!("no delta on the second stream: {other:?}"),
            }
        }
        let online = |coord: &Coordinator| {
            let out = coord.admin(&["devices", "--json"]).unwrap();
            let list: Vec<Device> = serde_json::from_str(&out).unwrap();
            list.iter().any(|d| d.id == a.id && d.online)
        };
        assert!(online(&coord), "device offline with its watch stream open");
    })
    .await;
}

fn refusal(err: ClientError) -> String {
    match err {
        ClientError::Refused {
            code: ErrorCode::InvalidRequest,
            message,
        } => message,
        other => panic!("expected an invalid-request refusal: {other}"),
    }
}

/// The device's revision now (a login changes nothing).
async fn revision(c: &ControlClient, auth: &Auth) -> i64 {
    match c
        .call(&Request::Login {
            auth: auth.clone(),
            ipv6_supported: None,
            instance: None,
        })
        .await
    {
        Ok(Response::Device { device }) => device.revision,
        other => panic!("login failed: {other:?}"),
    }
}

fn update(auth: &Auth, update: DeviceUpdate) -> Request {
    Request::Update {
        auth: auth.clone(),
        update,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_too_frequent_updates_are_refused() {
    common::within(DEADLINE, async {
        let (_coord, token, c) = Coordinator::with_client("127.16.0.4", &["--reusable"]).await;
        // A registration over the limits is refused.
        let mut req = register_request(&token, "big", 9);
        req.advertise_cidrs = (0..65)
            .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .collect();
        let err = c.call(&Request::Register(req)).await.unwrap_err();
        assert!(refusal(err).contains("at most 64"));

        let (_, auth) = register(&c, &token, "a", 1).await;
        let before = revision(&c, &auth).await;
        let cidrs: Vec<ipnet::IpNet> = (0..65)
            .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .collect();
        let err = c
            .call(&update(
                &auth,
                DeviceUpdate {
                    advertise_cidrs: Some(cidrs),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        let msg = refusal(err);
        assert!(
            msg.contains("too many advertised prefixes") && msg.contains("64"),
            "{msg}"
        );
        let err = c
            .call(&update(
                &auth,
                DeviceUpdate {
                    hostname: Some("h".repeat(300)),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert!(refusal(err).contains("hostname is too long"));
        let err = c
            .call(&update(
                &auth,
                DeviceUpdate {
                    endpoints: Some(vec!["192.0.2.1:1".parse().unwrap(); 17]),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert!(refusal(err).contains("at most 16"));
        assert_eq!(
            revision(&c, &auth).await,
            before,
            "a refused update changed"
        );

        // Real changes, as fast as possible: a burst passes, then updates are refused
        // and change nothing.
        let mut accepted = 0;
        let mut refused = None;
        for port in 1..=40u16 {
            let r = c
                .call(&update(
                    &auth,
                    DeviceUpdate {
                        endpoints: Some(vec![SocketAddr::from(([192, 0, 2, 1], port))]),
                        ..Default::default()
                    },
                ))
                .await;
            match r {
                Ok(Response::Device { .. }) => accepted += 1,
                Err(e) => {
                    refused = Some(refusal(e));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let msg = refused.expect("no update was refused");
        assert!(msg.contains("too many updates"), "{msg}");
        assert!((10..=20).contains(&accepted), "{accepted} updates accepted");
        let after_burst = revision(&c, &auth).await;
        let err = c
            .call(&update(
                &auth,
                DeviceUpdate {
                    endpoints: Some(vec!["192.0.2.99:1".parse().unwrap()]),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert!(refusal(err).contains("too many updates"));
        assert_eq!(revision(&c, &auth).await, after_burst);
        // The rate comes back.
        let ok = wait_for("an update to pass again", Duration::from_secs(5), || {
            let c = &c;
            let auth = &auth;
            async move {
                c.call(&update(
                    auth,
                    DeviceUpdate {
                        endpoints: Some(vec!["192.0.2.99:2".parse().unwrap()]),
                        ..Default::default()
                    },
                ))
                .await
                .ok()
            }
        })
        .await;
        assert!(matches!(ok, Response::Device { device } if device.revision > after_burst));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_changes_nothing_is_no_change() {
    common::within(DEADLINE, async {
        let (_coord, token, c) = Coordinator::with_client("127.16.0.5", &["--reusable"]).await;
        let (a, auth) = register(&c, &token, "a", 1).await;
        let (_, watcher) = register(&c, &token, "w", 2).await;
        let mut watch = c.watch(watcher).await.unwrap();
        assert!(matches!(
            watch.next().await,
            Ok(Some(Response::Snapshot { .. }))
        ));
        let ep = vec![SocketAddr::from(([192, 0, 2, 1], 51820))];
        let set = |auth: &Auth| {
            update(
                auth,
                DeviceUpdate {
                    endpoints: Some(ep.clone()),
                    hostname: Some("a".into()),
                    ..Default::default()
                },
            )
        };
        let Ok(Response::Device { device: first }) = c.call(&set(&auth)).await else {
            panic!("update failed")
        };
        assert!(first.revision > a.revision);
        for _ in 0..3 {
            let Ok(Response::Device { device }) = c.call(&set(&auth)).await else {
                panic!("update failed")
            };
            assert_eq!(
                device.revision, first.revision,
                "a no-op update is a change"
            );
        }
        // A real change after the no-ops: the watcher's deltas about A are the first
        // update and this one, nothing in between.
        let Ok(Response::Device { device: last }) = c
            .call(&update(
                &auth,
                DeviceUpdate {
                    hostname: Some("renamed".into()),
                    ..Default::default()
                },
            ))
            .await
        else {
            panic!("update failed")
        };
        let mut seen = Vec::new();
        while seen.last() != Some(&last.revision) {
            match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
                Ok(Ok(Some(Response::Delta { upserts, .. }))) => {
                    seen.extend(upserts.iter().filter(|d| d.id == a.id).map(|d| d.revision));
                }
                Ok(Ok(Some(_))) => {}
                other => panic!("no delta: {other:?} after {seen:?}"),
            }
        }
        // Nothing between the two (they may also come coalesced into one delta).
        assert!(
            seen == [first.revision, last.revision] || seen == [last.revision],
            "{seen:?}"
        );
    })
    .await;
}

fn store_with_devices(path: &std::path::Path, n: u8) -> (SqliteStore, Vec<Device>) {
    let mut s = SqliteStore::open(path).unwrap();
    s.ensure_default_org(0).unwrap();
    let org = s.org_by_name(DEFAULT_ORG).unwrap();
    s.create_token(org.id, &hash_secret("tok"), true, None, 0)
        .unwrap();
    let devices = (1..=n).map(|i| register_in(&mut s, i)).collect();
    (s, devices)
}

fn register_in(s: &mut dyn Store, i: u8) -> Device {
    let secret = boringtun::x25519::StaticSecret::from([i; 32]);
    let public = boringtun::x25519::PublicKey::from(&secret);
    let req = nexodus::wire::control::RegisterRequest {
        token_secret: "tok".into(),
        public_key: nexodus::coord::keys::encode_key(public.as_bytes()),
        hostname: format!("n{i}"),
        ipv6_supported: true,
        ..Default::default()
    };
    s.register_device(&req, &hash_secret("tok"), &hash_secret(&format!("c{i}")), 1)
        .unwrap()
}

/// A hub (the only reader of the change log) that falls behind the pruned point
/// reads everything again and tells its watchers to take a new snapshot, which is
/// right; the address index of a store that fell behind is rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_change_log_leaves_lagging_readers_correct() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let (store, devices) = store_with_devices(&path, 3);
    let org = devices[0].organization_id;
    let store: nexodus::serve::SharedStore = Arc::new(Mutex::new(Box::new(store)));
    let hub = Hub::new(store.clone(), Duration::from_secs(3600));
    let from = hub.load().await.unwrap();
    tokio::spawn(hub.clone().run(from));
    let mut rx = hub.subscribe(org);

    // Another process (an admin command) changes devices and prunes the log while
    // this hub is not looking.
    let mut other = SqliteStore::open(&path).unwrap();
    for port in 1..=5u16 {
        other
            .update_device(
                devices[0].id,
                &DeviceUpdate {
                    endpoints: Some(vec![SocketAddr::from(([192, 0, 2, 1], port))]),
                    ..Default::default()
                },
                2,
            )
            .unwrap();
    }
    let fourth = register_in(&mut other, 4);
    other.remove_device(devices[1].id, 3).unwrap();
    other
        .update_device(
            devices[2].id,
            &DeviceUpdate {
                hostname: Some("last".into()),
                ..Default::default()
            },
            4,
        )
        .unwrap();
    assert!(other.prune_changes(1).unwrap() > 0);
    assert_eq!(
        other.oldest_revision().unwrap(),
        other.current_revision().unwrap()
    );

    hub.poke();
    let delta = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(delta.resync, "the lagging hub sent a delta, not a resync");
    let snapshot = hub.snapshot(org, None).frame.unwrap();
    let got: Vec<Device> =
        match nexodus::wire::frame::decode_payload::<Response>(&snapshot[4..]).unwrap() {
            Response::Snapshot { devices, .. } => devices,
            other => panic!("not a snapshot: {other:?}"),
        };
    let ids: Vec<i64> = got.iter().map(|d| d.id).collect();
    assert_eq!(ids, [devices[0].id, devices[2].id, fourth.id]);
    assert_eq!(got[0].endpoints, [SocketAddr::from(([192, 0, 2, 1], 5))]);
    assert_eq!(got[1].hostname, "last");

    // The first store's address index last saw the third registration; what came
    // after was pruned: device 4 holds the next address and device 2's is free
    // again. The index is rebuilt: the lowest free address, no collision.
    let mut s = store.lock().unwrap();
    let fifth = register_in(s.as_mut(), 5);
    assert_eq!(fifth.tunnel_ip, devices[1].tunnel_ip);
    let all = s.devices(org).unwrap();
    common::assert_unique_addresses(&all);
}
