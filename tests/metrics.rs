//! `--metrics-listen`: the coordinator's `/metrics`, scraped over HTTP as Prometheus
//! does and checked by Prometheus's own `promtool check metrics`. Loopback only; this
//! test's addresses are 127.42.9.x.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{BIN, register_request, wait_for};
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
