//! `--metrics-listen`: the coordinator's and the nodes' `/metrics`, scraped over HTTP
//! as Prometheus does and checked by Prometheus's own `promtool check metrics`. The
//! coordinator test runs on loopback (127.42.9.x); the node test in namespaces
//! (`nx-mx-*`, underlay 192.0.2.0/24), scraping each node's loopback from inside.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::cluster::Cluster;
use common::netns::in_ns;
use common::{BIN, register_request, wait_for, wait_until};
use nexodus::client::ControlClient;
use nexodus::coord::token::JoinToken;
use nexodus::wire::control::{Auth, Request, Response};

const DEADLINE: Duration = Duration::from_secs(120);

/// A coordinator with `--metrics-listen`, killed on drop.
struct Served {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn start(ip: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("{ip}:4443").parse().unwrap();
        let metrics: SocketAddr = format!("{ip}:9101").parse().unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--listen", &addr.to_string()])
            .args(["--stun-listen", &format!("{ip}:3478")])
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--state-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            dir,
            addr,
            metrics,
        }
    }

    fn admin(&self, args: &[&str]) -> String {
        let dir = self.dir.path().to_string_lossy();
        common::admin_command(args, &["--state-dir", &dir]).unwrap()
    }

    fn fingerprint(&self) -> [u8; 32] {
        let der = std::fs::read(self.dir.path().join("coordinator-cert.der")).unwrap();
        nexodus::identity::fingerprint(&der)
    }
}

/// GET /metrics over plain HTTP/1.1; the body, or None while nothing answers.
fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(body.to_string())
}

/// `promtool check metrics` (Debian's prometheus package; scripts/test installs it).
fn promtool_check(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample line `name` (with its labels) in `body`.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn scraped_until(addr: SocketAddr, what: &str, ok: impl Fn(&str) -> bool) -> String {
    wait_for(what, Duration::from_secs(20), || {
        let body = scrape(addr);
        let hit = body.filter(|b| ok(b));
        async move { hit }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_metrics_follow_devices_and_watchers() {
    tokio::time::timeout(DEADLINE, async {
        let serve = Served::start("127.42.9.1");
        let first = scraped_until(serve.metrics, "metrics to answer", |b| {
            sample(b, "nexodus_devices{org=\"default\"}") == Some(0.0)
        })
        .await;
        promtool_check(&first);
        assert_eq!(sample(&first, "nexodus_watchers"), Some(0.0));
        assert_eq!(sample(&first, "nexodus_registrations_total"), Some(0.0));

        let token =
            JoinToken::parse(serve.admin(&["token", "create", "--reusable"]).trim()).unwrap();
        let client = ControlClient::connect(serve.addr, serve.fingerprint())
            .await
            .unwrap();
        let mut creds = Vec::new();
        for (i, name) in ["alpha", "beta"].into_iter().enumerate() {
            let req = register_request(&token, name, 900 + i as u64);
            match client.call(&Request::Register(req)).await.unwrap() {
                Response::Registered { device, credential } => creds.push((device.id, credential)),
                other => panic!("registration: {other:?}"),
            }
        }
        let (id, credential) = creds[0].clone();
        let mut watch = client
            .watch(Auth {
                device_id: id,
                credential,
            })
            .await
            .unwrap();
        assert!(matches!(
            watch.next().await.unwrap(),
            Some(Response::Snapshot { .. })
        ));
        let body = scraped_until(serve.metrics, "two devices, one online", |b| {
            sample(b, "nexodus_devices{org=\"default\"}") == Some(2.0)
                && sample(b, "nexodus_devices_online{org=\"default\"}") == Some(1.0)
        })
        .await;
        promtool_check(&body);
        assert_eq!(sample(&body, "nexodus_watchers"), Some(1.0));
        assert_eq!(sample(&body, "nexodus_registrations_total"), Some(2.0));

        // A change reaches the watcher: the fan-out histogram counts the write.
        serve.admin(&["devices", "remove", &creds[1].0.to_string()]);
        let body = scraped_until(serve.metrics, "the removal and its fan-out", |b| {
            sample(b, "nexodus_devices{org=\"default\"}") == Some(1.0)
                && sample(b, "nexodus_change_fanout_seconds_count").is_some_and(|n| n >= 1.0)
        })
        .await;
        promtool_check(&body);
        assert_eq!(sample(&body, "nexodus_store_errors_total"), Some(0.0));
        // Anything but /metrics is not found.
        let mut s = TcpStream::connect(serve.metrics).unwrap();
        write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
        client.close().await;
    })
    .await
    .expect("test deadline");
}

/// Scrapes `addr` from inside namespace `ns`.
fn scrape_in(ns: &str, addr: SocketAddr) -> Option<String> {
    in_ns(ns, move || scrape(addr))
}

/// The sample of `metric` for `peer` (any path label), if present.
fn peer_sample(body: &str, metric: &str, peer: &str) -> Option<f64> {
    let label = format!("peer=\"{peer}\"");
    body.lines()
        .filter(|l| l.starts_with(metric) && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn node_metrics_count_a_ping_and_forget_a_removed_peer() {
    let mut mesh = Cluster::new("mx", "192.0.2.1/24");
    let metrics: SocketAddr = "127.0.0.1:9102".parse().unwrap();
    for (i, name) in ["n0", "n1"].into_iter().enumerate() {
        mesh.add_node(
            name,
            &format!("192.0.2.{}/24", 11 + i),
            true,
            &["--metrics-listen", "127.0.0.1:9102"],
        );
    }
    mesh.start_all();
    let a = mesh.nodes[0].wait_peers(1);
    let b = mesh.nodes[1].wait_peers(1);
    let (a_ns, b_ns) = (mesh.nodes[0].ns.name.clone(), mesh.nodes[1].ns.name.clone());
    let b_v4 = b.device.tunnel_ip.to_string();
    assert!(mesh.nodes[0].ns.ping_until(&b_v4, Duration::from_secs(30)));

    let before = wait_until("n0's metrics", Duration::from_secs(20), || {
        scrape_in(&a_ns, metrics)
            .filter(|t| peer_sample(t, "nexodus_peer_tx_bytes_total", "n1").is_some())
    });
    promtool_check(&before);
    let tx0 = peer_sample(&before, "nexodus_peer_tx_bytes_total", "n1").unwrap();
    let rx0 = peer_sample(&before, "nexodus_peer_rx_bytes_total", "n1").unwrap();
    assert!(
        before.contains("nexodus_peer_tx_bytes_total{path=\"direct\",peer=\"n1\"}"),
        "{before}"
    );
    assert!(peer_sample(&before, "nexodus_peer_last_handshake_seconds", "n1").is_some());

    // Five pings of 84-byte IP packets: each is one WireGuard datagram of at least
    // 84 + 32 bytes each way.
    mesh.nodes[0]
        .ns
        .ok(&["ping", "-c", "5", "-i", "0.2", "-W", "2", &b_v4]);
    let after = scrape_in(&a_ns, metrics).expect("scrape n0");
    promtool_check(&after);
    let sent = peer_sample(&after, "nexodus_peer_tx_bytes_total", "n1").unwrap() - tx0;
    let received = peer_sample(&after, "nexodus_peer_rx_bytes_total", "n1").unwrap() - rx0;
    let least = 5.0 * (84.0 + 32.0);
    let most = 5.0 * (96.0 + 32.0) + 1024.0; // plus a keepalive or handshake at most
    assert!(
        (least..=most).contains(&sent),
        "sent {sent} bytes for 5 pings"
    );
    assert!(
        (least..=most).contains(&received),
        "received {received} bytes for 5 pings"
    );
    let b_side = scrape_in(&b_ns, metrics).expect("scrape n1");
    promtool_check(&b_side);
    assert!(peer_sample(&b_side, "nexodus_peer_rx_bytes_total", "n0").is_some_and(|v| v >= least));

    // The coordinator removes n1: its series vanish from n0's metrics.
    mesh.coord
        .admin(&["devices", "remove", &b.device.id.to_string()]);
    let gone = wait_until("n1's series to vanish", Duration::from_secs(20), || {
        scrape_in(&a_ns, metrics).filter(|t| !t.contains("peer=\"n1\""))
    });
    promtool_check(&gone);
    assert_eq!(a.device.hostname, "n0");
}
