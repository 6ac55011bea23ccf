//! Coordinator replicas on one PostgreSQL database, with the real binary.
//!
//! Every test starts its own PostgreSQL (Debian's package; initdb into a temp dir, the
//! server a child of the test on a loopback address and a port of its own, stopped
//! and removed on every exit path; see `nexodus::store::testpg`). The store's own
//! contract against PostgreSQL is in `src/store/tests.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, wait_until};
use common::{Coordinator, DieWithParent, register_request, wait_for};
use nexodus::client::ControlClient;
use nexodus::coord::token::JoinToken;
use nexodus::store::testpg::TempPostgres;
use nexodus::wire::control::{Auth, Device, Request, Response};

const DEADLINE: Duration = Duration::from_secs(170);

/// Prints the replicas' and the database's logs if the test fails.
struct LogsOnFailure<'a>(Vec<&'a Coordinator>, &'a TempPostgres);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for r in &self.0 {
                eprintln!("===== {} =====\n{}", r.addr, r.log_text());
            }
            eprintln!("===== postgres =====\n{}", self.1.log_text());
        }
    }
}

/// An admin command against the database; returns stdout.
fn admin(url: &str, args: &[&str]) -> String {
    common::admin_command(args, &["--database-url", url])
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn listed(url: &str) -> Vec<Device> {
    serde_json::from_str(&admin(url, &["devices", "--json"])).unwrap()
}

async fn register(addr: SocketAddr, token: &JoinToken, name: &str, seed: u64) -> (Device, Auth) {
    let c = ControlClient::connect(addr, token.fingerprint)
        .await
        .unwrap();
    let req = register_request(token, name, seed);
    let resp = c.call(&Request::Register(req)).await;
    c.close().await;
    match resp {
        Ok(Response::Registered { device, credential }) => {
            let auth = Auth {
                device_id: device.id,
                credential,
            };
            (device, auth)
        }
        other => panic!("registration through {addr} failed: {other:?}"),
    }
}

/// A watch stream held on one replica, with every device id it has heard of.
struct Watcher {
    _client: ControlClient,
    stream: nexodus::client::WatchStream,
    known: HashMap<i64, Device>,
}

impl Watcher {
    async fn open(addr: SocketAddr, token: &JoinToken, auth: Auth) -> Self {
        let client = ControlClient::connect(addr, token.fingerprint)
            .await
            .unwrap();
        let mut stream = client.watch(auth).await.unwrap();
        let mut known = HashMap::new();
        match stream.next().await.unwrap() {
            Some(Response::Snapshot { devices, .. }) => {
                for d in devices {
                    known.insert(d.id, d);
                }
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
        Self {
            _client: client,
            stream,
            known,
        }
    }

    /// Reads deltas until `id` is known; the time it took, or None after `limit`.
    async fn until_known(&mut self, id: i64, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        while !self.known.contains_key(&id) {
            let left = limit.checked_sub(started.elapsed())?;
            match tokio::time::timeout(left, self.stream.next()).await {
                Ok(Ok(Some(Response::Delta { upserts, .. }))) => {
                    for d in upserts {
                        self.known.insert(d.id, d);
                    }
                }
                Ok(Ok(Some(Response::Snapshot { devices, .. }))) => {
                    for d in devices {
                        self.known.insert(d.id, d);
                    }
                }
                Ok(other) => panic!("watch stream: {other:?}"),
                Err(_) => return None,
            }
        }
        Some(started.elapsed())
    }
}

/// Two replicas on one database: one token (one pinned fingerprint) for both, 200
/// concurrent registrations spread over both get distinct addresses, and what is
/// committed through replica 1 reaches a watch held on replica 2 within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_addresses_identity_and_changes() {
    common::within(DEADLINE, async {
        let pg = TempPostgres::start().unwrap();
        let url = pg.fresh_database("nx").unwrap();
        let _replicas = two_replicas(&pg, &url, ["127.43.0.1", "127.43.0.2"]).await;
    })
    .await;
}

/// The same over TLS: the database has a certificate from a test CA, and both
/// replicas (requests and the notification channel) and the admin commands connect
/// with `sslmode=verify-full`. Every connection of theirs is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_over_tls_verify_full() {
    common::within(DEADLINE, async {
        let pg = TempPostgres::start_tls("127.0.0.1", None).unwrap();
        pg.create_database("nx").unwrap();
        let url = pg.tls_url("nx", "verify-full");
        let _replicas = two_replicas(&pg, &url, ["127.43.0.21", "127.43.0.22"]).await;
        let plain = pg
            .query(
                "nx",
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name = 'nexodus' AND NOT s.ssl",
            )
            .unwrap();
        let encrypted = pg
            .query(
                "nx",
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name = 'nexodus' AND s.ssl",
            )
            .unwrap();
        assert_eq!(plain, ["0"], "a replica's connection is not encrypted");
        // Each replica: its store and its LISTEN connection.
        let encrypted: u32 = encrypted[0].parse().unwrap();
        assert!(encrypted >= 4, "{encrypted} encrypted connections");
    })
    .await;
}

/// `serve` that must fail at start: its output (stdout and stderr) once it exited.
fn serve_fails(url: &str, ip: &str) -> String {
    let mut child = Command::new(common::BIN)
        .args(["serve", "--listen", &format!("{ip}:4443")])
        .args(["--stun-listen", &format!("{ip}:3478")])
        .args(["--database-url", url])
        .args(["--state-dir", "/nonexistent/nexodus-test"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .die_with_parent()
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve on {url} did not fail within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "serve on {url} exited successfully");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The store connects to `url` (and migrates its schema).
fn connects(url: &str) {
    if let Err(e) = nexodus::store::PgStore::connect(url) {
        panic!("{url}: {e}");
    }
}

/// TLS refused: `verify-full` against a certificate from another CA, and `require`
/// against a server without TLS, each fail at start with a message naming the
/// database, the mode and why.
#[test]
fn tls_misconfigurations_fail_clearly() {
    let deadline = Instant::now() + DEADLINE;
    let pg = TempPostgres::start_tls("127.0.0.1", None).unwrap();
    pg.create_database("nx").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("other-ca.pem");
    nexodus::store::testpg::TestCa::new("some other CA")
        .unwrap()
        .write(&wrong)
        .unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("nx"),
        wrong.display()
    );
    let out = serve_fails(&url, "127.43.0.23");
    eprintln!("wrong CA:\n{out}");
    let at = format!("{}:{}", pg.host, pg.port);
    for want in [
        at.as_str(),
        "sslmode=verify-full",
        "certificate",
        "UnknownIssuer",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    // The right CA but a name the certificate does not carry: refused under
    // verify-full, accepted under verify-ca.
    let ca = pg.ca_file().unwrap().display().to_string();
    let by_name = format!(
        "postgres://{}@localhost4.invalid:{}/nx?sslmode=verify-full&sslrootcert={ca}&hostaddr=127.0.0.1",
        nexodus::store::testpg::USER,
        pg.port
    );
    let out = serve_fails(&by_name, "127.43.0.23");
    assert!(out.contains("not valid for name"), "{out}");
    let verify_ca = by_name.replace("verify-full", "verify-ca");
    connects(&verify_ca);

    let plain = TempPostgres::start().unwrap();
    plain.create_database("nx").unwrap();
    let out = serve_fails(
        &format!("{}?sslmode=require", plain.url("nx")),
        "127.43.0.23",
    );
    eprintln!("require, no TLS:\n{out}");
    let at = format!("{}:{}", plain.host, plain.port);
    for want in [
        at.as_str(),
        "sslmode=require",
        "server does not support TLS",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    // `prefer` (the default) falls back to plain; `disable` never tries.
    connects(&format!("{}?sslmode=prefer", plain.url("nx")));
    connects(&format!("{}?sslmode=disable", plain.url("nx")));
    // `require` against the TLS server: encrypted, the certificate not checked.
    connects(
        &pg.tls_url("nx", "require")
            .replace(&format!("&sslrootcert={ca}"), ""),
    );
    assert!(Instant::now() < deadline, "took too long");
}

/// Two replicas on database `url` at `ips`: the scenario of
/// [`two_replicas_share_addresses_identity_and_changes`]. Returns the replicas, still
/// running, and their logs' directory.
async fn two_replicas(
    pg: &TempPostgres,
    url: &str,
    ips: [&str; 2],
) -> (Coordinator, Coordinator, tempfile::TempDir) {
    {
        let url = url.to_string();
        let logs = tempfile::tempdir().unwrap();
        let r1 = Coordinator::replica(ips[0], &url, logs.path());
        let r2 = Coordinator::replica(ips[1], &url, logs.path());
        let _logs = LogsOnFailure(vec![&r1, &r2], pg);
        let token =
            JoinToken::parse(admin(&url, &["token", "create", "--reusable"]).trim()).unwrap();
        // Both present the certificate pinned in the token.
        for addr in [r1.addr, r2.addr] {
            let c = ControlClient::connect(addr, token.fingerprint)
                .await
                .unwrap();
            assert_eq!(c.call(&Request::Ping).await.unwrap(), Response::Pong);
            c.close().await;
        }
        assert!(
            !r1.log_text()
                .contains("created the coordinator TLS identity")
                || !r2
                    .log_text()
                    .contains("created the coordinator TLS identity"),
            "only the first replica makes the identity"
        );

        let (_, watcher_auth) = register(r2.addr, &token, "watcher", 1_000_000).await;
        let mut watcher = Watcher::open(r2.addr, &token, watcher_auth).await;

        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let addr = if i % 2 == 0 { r1.addr } else { r2.addr };
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                register(addr, &token, &format!("node{i}"), i).await.0
            }));
        }
        let mut devices = Vec::new();
        for t in tasks {
            devices.push(t.await.unwrap());
        }
        assert_eq!(devices.len(), 200);
        common::assert_unique_addresses(&devices);
        // What the database holds: the same 201 devices and addresses.
        let stored = listed(&url);
        assert_eq!(stored.len(), 201);
        common::assert_unique_addresses(&stored);
        let answered = common::address_set(&devices);
        let persisted = common::address_set(&stored);
        assert!(answered.is_subset(&persisted));
        // The watcher on replica 2 heard of all of them, half committed on replica 1.
        for d in &devices {
            assert!(
                watcher
                    .until_known(d.id, Duration::from_secs(30))
                    .await
                    .is_some(),
                "watcher on replica 2 never heard of device {}",
                d.id
            );
        }
        // One more through replica 1, timed: it is pushed, not polled for.
        let sent = Instant::now();
        let (late, _) = register(r1.addr, &token, "late", 2_000_000).await;
        let waited = watcher
            .until_known(late.id, Duration::from_secs(10))
            .await
            .expect("registration on replica 1 never reached replica 2's watcher");
        let total = sent.elapsed();
        eprintln!("replica 1 → replica 2 watcher: {total:?} (after the answer: {waited:?})");
        assert!(
            total < Duration::from_secs(1),
            "took {total:?}: notifications are not reaching the other replica"
        );
        drop(_logs);
        (r1, r2, logs)
    }
}

/// The database restarts under two replicas: they reconnect (requests and the
/// notification channel), keep their watch streams, and nothing committed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_restart_loses_nothing() {
    common::within(DEADLINE, async {
        let mut pg = TempPostgres::start().unwrap();
        let url = pg.fresh_database("nx").unwrap();
        let logs = tempfile::tempdir().unwrap();
        let r1 = Coordinator::replica("127.43.0.11", &url, logs.path());
        let r2 = Coordinator::replica("127.43.0.12", &url, logs.path());
        let token =
            JoinToken::parse(admin(&url, &["token", "create", "--reusable"]).trim()).unwrap();
        let mut before = Vec::new();
        for i in 0..20u64 {
            let addr = if i % 2 == 0 { r1.addr } else { r2.addr };
            before.push(register(addr, &token, &format!("b{i}"), i).await.0);
        }
        let (_, auth) = register(r2.addr, &token, "watcher", 99).await;
        let mut watcher = Watcher::open(r2.addr, &token, auth).await;

        pg.restart().unwrap();
        {
            let _logs = LogsOnFailure(vec![&r1, &r2], &pg);
            // Requests work again (the first may land while a replica reconnects).
            let fp = token.fingerprint;
            let req = register_request(&token, "after", 1234);
            let after: Device = wait_for(
                "a registration through replica 1 after the restart",
                Duration::from_secs(60),
                || {
                    let req = req.clone();
                    async move {
                        let c = ControlClient::connect(r1.addr, fp).await.ok()?;
                        match c.call(&Request::Register(req)).await {
                            Ok(Response::Registered { device, .. }) => Some(device),
                            _ => None,
                        }
                    }
                },
            )
            .await;
            // Replica 2's watch stream (still the same) gets it.
            assert!(
                watcher
                    .until_known(after.id, Duration::from_secs(15))
                    .await
                    .is_some(),
                "replica 2's watcher did not hear of a change after the restart"
            );
            // Both LISTEN again; then a change through replica 1 is pushed to replica 2
            // at once, not found by its fallback poll (every 10 s).
            for r in [&r1, &r2] {
                wait_for(
                    "the replica to LISTEN again",
                    Duration::from_secs(20),
                    || {
                        let n = r
                            .log_text()
                            .matches("listening for changes committed by any replica")
                            .count();
                        async move { (n >= 2).then_some(()) }
                    },
                )
                .await;
            }
            let (pushed, _) = register(r1.addr, &token, "pushed", 5678).await;
            let waited = watcher.until_known(pushed.id, Duration::from_secs(5)).await;
            assert!(
                waited.is_some(),
                "replica 2 did not hear of replica 1's commit: notifications not restored"
            );
            // Every committed registration is there, with its addresses.
            let stored: HashMap<i64, Device> =
                listed(&url).into_iter().map(|d| (d.id, d)).collect();
            for d in &before {
                let s = stored.get(&d.id).expect("device lost");
                assert_eq!((s.tunnel_ip, s.tunnel_ip_v6), (d.tunnel_ip, d.tunnel_ip_v6));
            }
            assert_eq!(stored.len(), before.len() + 3);
            // And replica 2 takes registrations too.
            let (d, _) = register(r2.addr, &token, "after2", 4321).await;
            assert!(!before.iter().any(|b| b.tunnel_ip == d.tunnel_ip));
        }
    })
    .await;
}

/// A ping running in a namespace until stopped; reports (sent, received).
struct Pinger {
    child: Option<Child>,
}

impl Pinger {
    fn start(ns: &str, target: &str) -> Self {
        let child = Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-n", "-i", "0.2", "-W", "1", target,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .die_with_parent()
            .spawn()
            .unwrap();
        Self { child: Some(child) }
    }

    fn stop(&mut self) -> (u32, u32) {
        let child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary in {text}"));
        let nums: Vec<u32> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        (nums[0], nums[1])
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kill (SIGKILL) the replica two nodes are connected to while they ping each other:
/// the pings go on, both nodes reconnect to the other replica and resync, and a node
/// joining afterwards is reached by the others.
#[test]
fn node_fails_over_to_another_replica() {
    let started = Instant::now();
    let mut cl = Cluster::new("pgfo", "203.0.113.1/24");
    // The cluster's own (SQLite) coordinator is not used here.
    cl.coord.kill();
    let ns = cl.coord.ns.name.clone();
    cl.coord
        .ns
        .ok(&["ip", "addr", "add", "203.0.113.2/24", "dev", "eth0"]);
    cl.coord
        .ns
        .ok(&["ip", "addr", "add", "203.0.113.3/24", "dev", "eth0"]);
    // PostgreSQL on the coordinators' loopback, inside their namespace.
    let pg = TempPostgres::start_with("127.0.0.1", Some(&ns)).unwrap();
    pg.create_database("nx").unwrap();
    let url = pg.url("nx");
    let logs = cl.scratch("logs");
    let spawn_replica = |ip: &str| cl.coord.spawn_replica(ip, &url, &logs);
    let (mut a, _a_log) = spawn_replica("203.0.113.2");
    let (mut b, b_log) = spawn_replica("203.0.113.3");
    // Admin commands from outside the namespace reach the database over its socket.
    let socket_url = format!(
        "host={} port={} user={} dbname=nx",
        pg.socket_dir().display(),
        pg.port,
        nexodus::store::testpg::USER
    );
    let token = admin(&socket_url, &["token", "create", "--reusable"])
        .trim()
        .to_string();
    let coordinators = "203.0.113.2:4443,203.0.113.3:4443";
    let n1 = cl.add_node("n1", "203.0.113.11/24", true, &["--interface", "nxfo1"]);
    let n2 = cl.add_node("n2", "203.0.113.12/24", true, &["--interface", "nxfo2"]);
    let n3 = cl.add_node("n3", "203.0.113.13/24", true, &["--interface", "nxfo3"]);
    for i in [n1, n2, n3] {
        cl.nodes[i].coordinator = coordinators.into();
    }
    cl.nodes[n1].start(Some(&token));
    cl.nodes[n2].start(Some(&token));
    let s1 = cl.nodes[n1].wait_peers(1);
    let s2 = cl.nodes[n2].wait_peers(1);
    let ip2 = s2.device.tunnel_ip.to_string();
    let ns1 = cl.nodes[n1].ns.name.clone();
    assert!(
        cl.nodes[n1].ns.ping_until(&ip2, Duration::from_secs(20)),
        "n1 cannot reach n2 before the failover"
    );
    let mut pinger = Pinger::start(&ns1, &ip2);

    // Replica A (first in the nodes' list, so they are on it) dies, and a node joins
    // at once: it must skip the dead replica, and n1 must notice and move in time to
    // learn of it (issue 19: 30 s and 43 s before; the target is 10 s).
    let _ = a.kill();
    let killed = Instant::now();
    let _ = a.wait();
    cl.nodes[n3].start(Some(&token));
    let registered = wait_until("n3 to register", Duration::from_secs(60), || {
        std::fs::read_to_string(&cl.nodes[n3].log)
            .ok()?
            .contains("registered with the coordinator")
            .then(|| killed.elapsed())
    });
    let s3 = cl.nodes[n3].wait_peers(2);
    let ip1 = s1.device.tunnel_ip.to_string();
    let ip3 = s3.device.tunnel_ip.to_string();
    assert!(
        cl.nodes[n1].ns.ping_until(&ip3, Duration::from_secs(60)),
        "n1 cannot reach the new node"
    );
    let reached = killed.elapsed();
    eprintln!(
        "failover: the new node registered {registered:?} and was reached from n1 {reached:?} after the kill"
    );
    assert!(registered <= Duration::from_secs(20), "{registered:?}");
    assert!(reached <= Duration::from_secs(20), "{reached:?}");
    for (i, id) in [(n1, s1.device.id), (n2, s2.device.id)] {
        let node = &cl.nodes[i];
        wait_until(
            &format!("{} to watch through replica B", node.name),
            Duration::from_secs(90),
            || {
                let log = std::fs::read_to_string(&b_log).ok()?;
                let reconnected = std::fs::read_to_string(&node.log)
                    .ok()?
                    .contains("reconnected to the coordinator");
                (reconnected && log.contains(&format!("watch started id={id} "))).then_some(())
            },
        );
        wait_until(
            &format!("{} to report the coordinator connected", node.name),
            Duration::from_secs(30),
            || {
                node.status()
                    .filter(|s| s.coordinator_connected)
                    .map(|_| ())
            },
        );
    }

    // The new node reaches the others, and they it, through replica B.
    cl.nodes[n1].wait_peers(2);
    cl.nodes[n2].wait_peers(2);
    assert!(
        cl.nodes[n3].ns.ping_until(&ip1, Duration::from_secs(20)),
        "the new node cannot reach n1"
    );
    let v6 = s3.device.tunnel_ip_v6.unwrap().to_string();
    assert!(
        cl.nodes[n2].ns.ping_until(&v6, Duration::from_secs(20)),
        "n2 cannot reach the new node over IPv6"
    );

    let (sent, received) = pinger.stop();
    eprintln!("pings during the failover: {received}/{sent}");
    assert!(sent >= 20, "ping ran too briefly: {sent}");
    assert!(
        sent - received <= 1,
        "tunnel lost {} of {sent} pings while the coordinator failed over",
        sent - received
    );
    // The database says all three are online (watched through replica B).
    let devices: Vec<Device> =
        serde_json::from_str(&admin(&socket_url, &["devices", "--json"])).unwrap();
    assert_eq!(devices.len(), 3);
    assert!(devices.iter().all(|d| d.online), "{devices:?}");
    let _ = b.kill();
    let _ = b.wait();
    eprintln!("failover test took {:?}", started.elapsed());
}
