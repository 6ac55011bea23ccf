//! End-to-end tests of `nexodus serve` with the real binary on loopback. Each test has
//! a loopback address of its own (127.42.0.N), so tests run in parallel.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Coordinator, register_request, wait_for};
use nexodus::client::{ClientError, ControlClient};
use nexodus::wire::control::{Auth, Device, ErrorCode, Request, Response};
use nexodus::wire::stun;

const DEADLINE: Duration = Duration::from_secs(180);

async fn register(
    c: &ControlClient,
    req: nexodus::wire::control::RegisterRequest,
) -> (Device, String) {
    match c.call(&Request::Register(req)).await {
        Ok(Response::Registered { device, credential }) => (device, credential),
        other => panic!("registration failed: {other:?}"),
    }
}

/// `err` is a refusal with `code`.
fn assert_refused(err: &ClientError, code: ErrorCode) {
    assert!(
        matches!(err, ClientError::Refused { code: c, .. } if *c == code),
        "expected a refusal with {code:?}: {err}"
    );
}

fn listed(coord: &Coordinator) -> Vec<Device> {
    let out = coord.admin(&["devices", "--json"]).expect("devices --json");
    serde_json::from_str(&out).expect("devices json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_get_distinct_addresses() {
    common::within(DEADLINE, async {
        let coord = Coordinator::start("127.42.0.1").await;
        let token = coord.token(&["--reusable"]);
        let fp = coord.fingerprint();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let req = register_request(&token, &format!("node{i}"), i);
            let addr = coord.addr;
            tasks.push(tokio::spawn(async move {
                let c = ControlClient::connect(addr, fp).await.expect("connect");
                let d = register(&c, req).await.0;
                c.close().await;
                d
            }));
        }
        let mut devices = Vec::new();
        for t in tasks {
            devices.push(t.await.expect("task"));
        }
        assert_eq!(devices.len(), 200);
        common::assert_unique_addresses(&devices);
        // The lowest addresses, in both families.
        let v6: HashSet<String> = devices
            .iter()
            .map(|d| d.tunnel_ip_v6.unwrap().to_string())
            .collect();
        assert!(v6.contains("200::1") && v6.contains("200::c8"), "{v6:?}");
        // All persisted, with the same addresses.
        let stored = listed(&coord);
        assert_eq!(stored.len(), 200);
        let answered = common::address_set(&devices);
        let persisted = common::address_set(&stored);
        assert_eq!(answered, persisted);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_answered_registration() {
    common::within(DEADLINE, async {
        let mut coord = Coordinator::start("127.42.0.2").await;
        let token = coord.token(&["--reusable"]);
        let fp = coord.fingerprint();
        let answered = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..120u64 {
            let req = register_request(&token, &format!("crash{i}"), 1000 + i);
            let addr = coord.addr;
            let answered = answered.clone();
            tasks.push(tokio::spawn(async move {
                let c = ControlClient::connect(addr, fp).await.ok()?;
                let r = c.call(&Request::Register(req)).await.ok()?;
                answered.fetch_add(1, Ordering::SeqCst);
                match r {
                    Response::Registered { device, credential } => Some((device, credential)),
                    _ => None,
                }
            }));
        }
        wait_for(
            "some registrations to be answered",
            Duration::from_secs(60),
            || {
                let n = answered.load(Ordering::SeqCst);
                async move { (n >= 30).then_some(()) }
            },
        )
        .await;
        coord.kill();
        let mut ok = Vec::new();
        for t in tasks {
            if let Some(r) = t.await.expect("task") {
                ok.push(r);
            }
        }
        assert!(ok.len() >= 30, "only {} answered", ok.len());
        coord.spawn().await;
        let c = coord.client().await;
        for (device, credential) in &ok {
            let resp = c
                .call(&Request::Login {
                    auth: Auth {
                        device_id: device.id,
                        credential: credential.clone(),
                    },
                    ipv6_supported: Some(true),
                    instance: None,
                })
                .await
                .expect("answered registration survives the crash");
            let Response::Device { device: after } = resp else {
                panic!("unexpected {resp:?}")
            };
            assert_eq!(after.tunnel_ip, device.tunnel_ip);
            assert_eq!(after.tunnel_ip_v6, device.tunnel_ip_v6);
        }
        let stored = listed(&coord);
        assert!(stored.len() >= ok.len());
        common::assert_unique_addresses(&stored);
    })
    .await;
}

/// The next delta that mentions device `id` (others, such as the watcher going
/// online, are skipped), within 5 s.
async fn next_delta(w: &mut nexodus::client::WatchStream, id: i64) -> (Vec<Device>, Vec<i64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Ok(Some(Response::Delta {
                upserts, removed, ..
            }))) => {
                if upserts.iter().any(|d| d.id == id) || removed.contains(&id) {
                    return (upserts, removed);
                }
            }
            other => panic!("expected a delta about device {id} within 5 s, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_registration_and_admin_removal() {
    common::within(DEADLINE, async {
        let (coord, token, c) = Coordinator::with_client("127.42.0.3", &["--reusable"]).await;
        let (a, a_cred) = register(&c, register_request(&token, "a", 1)).await;
        let mut watch = c
            .watch(Auth {
                device_id: a.id,
                credential: a_cred,
            })
            .await
            .expect("watch");
        match watch.next().await.expect("snapshot") {
            Some(Response::Snapshot { devices, .. }) => {
                assert_eq!(devices.iter().map(|d| d.id).collect::<Vec<_>>(), vec![a.id]);
            }
            other => panic!("expected snapshot, got {other:?}"),
        }
        let c2 = coord.client().await;
        let (b, _) = register(&c2, register_request(&token, "b", 2)).await;
        let (upserts, removed) = next_delta(&mut watch, b.id).await;
        assert!(removed.is_empty());
        let got = upserts.iter().find(|d| d.id == b.id).unwrap();
        assert_eq!(got.tunnel_ip_v6, b.tunnel_ip_v6);
        // Removal through the admin command, a separate process on the same database.
        coord
            .admin(&["devices", "remove", &b.id.to_string()])
            .expect("devices remove");
        let (upserts, removed) = next_delta(&mut watch, b.id).await;
        assert!(upserts.iter().all(|d| d.id != b.id));
        assert_eq!(removed, vec![b.id]);
        // B's credential is dead now.
        let err = c2
            .call(&Request::Deregister {
                auth: Auth {
                    device_id: b.id,
                    credential: "x".into(),
                },
            })
            .await
            .unwrap_err();
        assert_refused(&err, ErrorCode::Unauthorized);
    })
    .await;
}

/// The next xorshift32 value of `x` (garbage that is the same every run).
fn xorshift(x: &mut u32) -> u32 {
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    *x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_service_continues() {
    common::within(DEADLINE, async {
        let (coord, token, c) = Coordinator::with_client("127.42.0.4", &[]).await;

        // Random bytes on a control stream: an error answer, then the stream closes.
        let (mut send, mut recv) = c.connection().open_bi().await.unwrap();
        send.write_all(&[
            0, 0, 0, 9, 1, 0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x13, 0x37,
        ])
        .await
        .unwrap();
        let _ = send.finish();
        let answer = recv.read_to_end(1 << 20).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("invalid_request"), "{text}");

        // An oversized frame header is refused before its body is read.
        let (mut send, mut recv) = c.connection().open_bi().await.unwrap();
        send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let answer = recv.read_to_end(1 << 20).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("exceeds the maximum"), "{text}");

        // Garbage datagrams at the QUIC port and both STUN ports.
        let udp = tokio::net::UdpSocket::bind((coord.ip, 0)).await.unwrap();
        let mut x: u32 = 0x1234_5678;
        let mut junk = [0u8; 1200];
        for round in 0..200 {
            junk.fill_with(|| xorshift(&mut x) as u8);
            let len = 1 + (round * 7) % junk.len();
            for port in [4443, 3478, 3479] {
                udp.send_to(&junk[..len], SocketAddr::new(coord.ip, port))
                    .await
                    .unwrap();
            }
        }

        // Both STUN ports still answer a real Binding request with our mapped address.
        for port in [3478u16, 3479] {
            let mapped = wait_for("a STUN answer", Duration::from_secs(10), || {
                let udp = &udp;
                let ip = coord.ip;
                async move {
                    let mut req = [0u8; 20];
                    let txid = [port as u8; 12];
                    let n = stun::encode_binding_request(&txid, &mut req).ok()?;
                    udp.send_to(&req[..n], SocketAddr::new(ip, port))
                        .await
                        .ok()?;
                    let mut buf = [0u8; 1500];
                    loop {
                        let (n, _) = tokio::time::timeout(
                            Duration::from_millis(300),
                            udp.recv_from(&mut buf),
                        )
                        .await
                        .ok()?
                        .ok()?;
                        if let Ok((id, mapped)) = stun::parse_binding_response(&buf[..n])
                            && id == txid
                        {
                            return Some(mapped);
                        }
                    }
                }
            })
            .await;
            assert_eq!(mapped, udp.local_addr().unwrap());
        }

        // Wrong token, malformed key: clear refusals.
        let mut bad = register_request(&token, "bad", 7);
        bad.token_secret = "nope".into();
        let err = c.call(&Request::Register(bad)).await.unwrap_err();
        assert_refused(&err, ErrorCode::InvalidToken);
        let mut bad = register_request(&token, "bad", 7);
        bad.public_key = "AAAA".into();
        let err = c.call(&Request::Register(bad)).await.unwrap_err();
        assert!(err.to_string().contains("32 bytes"), "{err}");

        // A certificate that is not the pinned one is refused by the client.
        let err = match ControlClient::connect(coord.addr, [0u8; 32]).await {
            Err(e) => e,
            Ok(_) => panic!("connected to a coordinator with the wrong fingerprint"),
        };
        assert!(
            format!("{err}").contains("fingerprint") || matches!(err, ClientError::Connection(_)),
            "{err}"
        );

        // The coordinator still serves: a fresh client registers with the single-use token.
        let fresh = coord.client().await;
        let (d, _) = register(&fresh, register_request(&token, "good", 8)).await;
        assert_eq!(d.tunnel_ip.to_string(), "100.64.0.1");
        // The single-use token is now spent.
        let err = fresh
            .call(&Request::Register(register_request(&token, "again", 9)))
            .await
            .unwrap_err();
        assert_refused(&err, ErrorCode::TokenUsed);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_validate_input() {
    common::within(DEADLINE, async {
        let coord = Coordinator::start("127.42.0.5").await;
        // token create prints only the token.
        let out = coord
            .admin(&["token", "create", "--expires", "1h"])
            .unwrap();
        assert_eq!(out.lines().count(), 1);
        assert!(out.starts_with("nx1."));
        let err = coord
            .admin(&["token", "create", "--org", "nope"])
            .unwrap_err();
        assert!(err.contains("\"nope\" not found"), "{err}");
        let err = coord
            .admin(&["org", "create", "lab", "--cidr", "10.1.2.3/33"])
            .unwrap_err();
        assert!(err.contains("invalid value"), "{err}");
        let err = coord
            .admin(&["org", "create", "lab", "--cidr", "10.1.2.3/24"])
            .unwrap_err();
        assert!(err.contains("did you mean 10.1.2.0/24"), "{err}");
        coord
            .admin(&[
                "org",
                "create",
                "lab",
                "--cidr",
                "192.0.2.0/29",
                "--cidr-v6",
                "2001:db8:42::/64",
            ])
            .unwrap();
        let lab = coord.token(&["--org", "lab", "--reusable"]);
        let c = coord.client().await;
        let mut req = register_request(&lab, "lab1", 77);
        req.request_ip = Some("192.0.2.5".parse().unwrap());
        req.request_ip_v6 = Some("2001:db8:42::5".parse().unwrap());
        let (d, _) = register(&c, req).await;
        assert_eq!(IpAddr::V4(d.tunnel_ip).to_string(), "192.0.2.5");
        assert_eq!(d.tunnel_ip_v6.unwrap().to_string(), "2001:db8:42::5");
        let mut req = register_request(&lab, "lab2", 78);
        req.request_ip = Some("192.0.2.5".parse().unwrap());
        let err = c.call(&Request::Register(req)).await.unwrap_err();
        assert_refused(&err, ErrorCode::AddressUnavailable);
        let err = coord.admin(&["devices", "remove", "999"]).unwrap_err();
        assert!(err.contains("device 999 not found"), "{err}");
    })
    .await;
}

/// Issue 18 item 7, as a newcomer saw it: after a v4-only device joined, the next
/// dual-stack device got `100.64.0.2` next to `200::1`. Now a device's v4 and v6 host
/// numbers line up whenever both are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_numbers_line_up_after_a_v4_only_device() {
    common::within(DEADLINE, async {
        let coord = Coordinator::start("127.42.0.6").await;
        let token = coord.token(&["--reusable"]);
        let c = ControlClient::connect(coord.addr, coord.fingerprint())
            .await
            .expect("connect");
        let mut v4_only = register_request(&token, "v4only", 1);
        v4_only.ipv6_supported = false;
        let (first, _) = register(&c, v4_only).await;
        assert_eq!(first.tunnel_ip.to_string(), "100.64.0.1");
        assert_eq!(first.tunnel_ip_v6, None);
        for (i, host) in [(2u64, "dual1"), (3, "dual2")] {
            let (d, _) = register(&c, register_request(&token, host, i)).await;
            let v4 = d.tunnel_ip.octets()[3];
            let v6 = d.tunnel_ip_v6.expect("a dual-stack device gets IPv6");
            assert_eq!(v4, i as u8, "{host}: {}", d.tunnel_ip);
            assert_eq!(
                v6.to_string(),
                format!("200::{i}"),
                "{host}: v4 .{v4} but {v6}"
            );
        }
        // What `nexodus devices` shows agrees.
        let listed = listed(&coord);
        let dual1 = listed
            .iter()
            .find(|d| d.hostname == "dual1")
            .expect("listed");
        assert_eq!(
            (
                dual1.tunnel_ip.to_string(),
                dual1.tunnel_ip_v6.map(|a| a.to_string())
            ),
            ("100.64.0.2".to_string(), Some("200::2".to_string()))
        );
        c.close().await;
    })
    .await;
}

/// A device's record in a watch message, by id.
fn ids(devices: &[Device]) -> Vec<i64> {
    let mut v: Vec<i64> = devices.iter().map(|d| d.id).collect();
    v.sort_unstable();
    v
}

/// Issue #19 (reconnect storm): a node that names the revision it had is sent what
/// it missed, not the organization. Across a coordinator restart (which rewrites
/// every online flag), an endpoint change and a removal: the delta carries the
/// changed device whole, the removed one's id, and a device whose only change was
/// going offline and online again as its flag. A revision of another database, or
/// one ahead of the coordinator, is not trusted: a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_watch_gets_what_it_missed_a_foreign_revision_a_snapshot() {
    use nexodus::wire::control::{DeviceUpdate, ResumeFrom};
    common::within(DEADLINE, async {
        let (mut coord, token, c) = Coordinator::with_client("127.42.0.61", &["--reusable"]).await;
        let mut devices = Vec::new();
        for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let (d, credential) = register(&c, register_request(&token, name, i as u64 + 1)).await;
            let auth = Auth {
                device_id: d.id,
                credential,
            };
            devices.push((d, auth));
        }
        let [(a, a_auth), (b, b_auth), (gone, _), (d, d_auth)] = &devices[..] else {
            unreachable!()
        };
        let org = a.organization_id;
        // D is online before the restart.
        let mut wd = c.watch(d_auth.clone()).await.unwrap();
        assert!(matches!(
            wd.next().await,
            Ok(Some(Response::Snapshot { .. }))
        ));
        wait_for("d online", Duration::from_secs(10), || async {
            listed(&coord)
                .iter()
                .any(|x| x.id == d.id && x.online)
                .then_some(())
        })
        .await;
        // A watches naming nothing yet: told the database, then a snapshot.
        let fresh = ResumeFrom {
            database: 0,
            organization_id: org,
            revision: 0,
        };
        let mut wa = c
            .watch_resuming(a_auth.clone(), Some(1), Some(fresh))
            .await
            .unwrap();
        let database = match wa.next().await {
            Ok(Some(Response::Watching {
                database,
                resumed: None,
                ..
            })) => database,
            other => panic!("expected watching, got {other:?}"),
        };
        assert_ne!(database, 0);
        let had = match wa.next().await {
            Ok(Some(Response::Snapshot {
                revision, devices, ..
            })) => {
                assert_eq!(ids(&devices), [a.id, b.id, gone.id, d.id]);
                revision
            }
            other => panic!("expected a snapshot, got {other:?}"),
        };
        drop((wa, wd, c));

        // While A is away: a restart, B's endpoints change, C is removed, D is
        // back online.
        coord.terminate(Duration::from_secs(10));
        coord.spawn().await;
        let c = coord.client().await;
        let mut wb = c.watch(b_auth.clone()).await.unwrap();
        assert!(matches!(
            wb.next().await,
            Ok(Some(Response::Snapshot { .. }))
        ));
        let mut wd = c.watch(d_auth.clone()).await.unwrap();
        assert!(matches!(
            wd.next().await,
            Ok(Some(Response::Snapshot { .. }))
        ));
        wait_for("d online again", Duration::from_secs(10), || async {
            listed(&coord)
                .iter()
                .any(|x| x.id == d.id && x.online)
                .then_some(())
        })
        .await;
        let moved: SocketAddr = "192.0.2.99:51820".parse().unwrap();
        c.call(&Request::Update {
            auth: b_auth.clone(),
            update: DeviceUpdate {
                endpoints: Some(vec![moved]),
                ..Default::default()
            },
        })
        .await
        .expect("update");
        coord
            .admin(&["devices", "remove", &gone.id.to_string()])
            .expect("devices remove");
        // The coordinator has applied all of it once B's watch sees the removal.
        next_delta(&mut wb, gone.id).await;

        let asked = ResumeFrom {
            database,
            organization_id: org,
            revision: had,
        };
        let mut wa = c
            .watch_resuming(a_auth.clone(), Some(1), Some(asked))
            .await
            .unwrap();
        let at = match wa.next().await {
            Ok(Some(Response::Watching {
                database: same,
                resumed: Some(at),
                ..
            })) => {
                assert_eq!(same, database);
                assert!(at > had);
                at
            }
            other => panic!("expected a resumed watch, got {other:?}"),
        };
        match wa.next().await {
            Ok(Some(Response::Delta {
                revision,
                upserts,
                removed,
                online,
                ..
            })) => {
                assert_eq!(revision, at);
                assert_eq!(ids(&upserts), [b.id], "only B changed more than its flag");
                let b_now = upserts.iter().find(|x| x.id == b.id).unwrap();
                assert_eq!(b_now.endpoints, vec![moved]);
                assert_eq!(removed, vec![gone.id]);
                assert!(online.contains(&(d.id, true)), "{online:?}");
                assert!(online.iter().all(|(id, _)| *id != gone.id));
            }
            other => panic!("expected the missed delta, got {other:?}"),
        }
        // A resumed watch goes on receiving what changes afterwards.
        let later: SocketAddr = "192.0.2.98:51820".parse().unwrap();
        c.call(&Request::Update {
            auth: b_auth.clone(),
            update: DeviceUpdate {
                endpoints: Some(vec![later]),
                ..Default::default()
            },
        })
        .await
        .expect("update after the resume");
        let (upserts, _) = next_delta(&mut wa, b.id).await;
        let b_later = upserts.iter().find(|x| x.id == b.id).unwrap();
        assert_eq!(b_later.endpoints, vec![later]);
        drop(wa);

        // Another database's revision, and one ahead of this coordinator: snapshots.
        for bad in [
            ResumeFrom {
                database: database ^ 1,
                ..asked
            },
            ResumeFrom {
                revision: at + 1000,
                ..asked
            },
        ] {
            let mut w = c
                .watch_resuming(a_auth.clone(), Some(1), Some(bad))
                .await
                .unwrap();
            match w.next().await {
                Ok(Some(Response::Watching { resumed: None, .. })) => {}
                other => panic!("{bad:?}: expected no resume, got {other:?}"),
            }
            match w.next().await {
                Ok(Some(Response::Snapshot { devices, .. })) => {
                    assert_eq!(ids(&devices), [a.id, b.id, d.id]);
                }
                other => panic!("{bad:?}: expected a snapshot, got {other:?}"),
            }
        }
    })
    .await;
}
