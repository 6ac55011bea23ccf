//! The dashboard (DESIGN §12) in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by scripts/test), driven over WebDriver by a small
//! client here: log in with a key, see the devices and the mesh graph (a direct edge,
//! an edge through the relay, an offline device greyed), create a token, remove a
//! device after confirming; the key from the URL fragment too. The coordinator runs on
//! loopback 127.61.0.5; devices are registered, kept online and report their paths
//! over the real QUIC control protocol. On failure a screenshot is written to
//! `target/test-output/dashboard-failure.png` (or `$NEXODUS_TEST_OUTPUT`). With
//! `NEXODUS_DASHBOARD_SCREENSHOT=FILE` the page is also saved there once it shows the
//! mesh (how `docs/dashboard.png` was made).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Coordinator, DieWithParent, register_request};
use nexodus::client::ControlClient;
use nexodus::coord::token::JoinToken;
use nexodus::wire::control::{Auth, PathKind, PeerPath, Request, Response};
use serde_json::{Value, json};

const IP: &str = "127.61.0.5";
const URL: &str = "https://127.61.0.5:8443/";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver HTTP exchange with chromedriver on loopback.
fn wd(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    // Read the head, then exactly Content-Length bytes (chromedriver may keep the
    // connection open).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let (end, length) = loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before an answer".into());
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("no content-length")?;
            break (end, length);
        }
    };
    while raw.len() < end + 4 + length {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    raw.truncate(end + 4 + length);
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let v: Value = serde_json::from_slice(&raw[end + 4..]).map_err(|e| e.to_string())?;
    if status == 200 {
        Ok(v["value"].clone())
    } else {
        Err(format!("{method} {path}: {status} {v}"))
    }
}

/// chromedriver and one browser session, both ended on drop; a screenshot is taken
/// first if the test is failing.
struct Browser {
    port: u16,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let profile = tempfile::tempdir().unwrap();
        // A port of our own: try a few until chromedriver answers.
        let mut last = String::new();
        for port in (0..20).map(|i| 24_600 + i * 7 + (std::process::id() % 7) as u16) {
            let mut driver = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .die_with_parent()
                .spawn()
                .expect("chromedriver (apt install chromium-driver)");
            let deadline = Instant::now() + Duration::from_secs(10);
            let ready = loop {
                if let Ok(v) = wd(port, "GET", "/status", None)
                    && v["ready"] == true
                {
                    break true;
                }
                if Instant::now() > deadline || driver.try_wait().ok().flatten().is_some() {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if !ready {
                let _ = driver.kill();
                let _ = driver.wait();
                last = format!("chromedriver on port {port} never became ready");
                continue;
            }
            let caps = json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "acceptInsecureCerts": true,
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--disable-dev-shm-usage", "--window-size=1280,1100",
                        format!("--user-data-dir={}", profile.path().display()),
                    ]
                }
            }}});
            let v = wd(port, "POST", "/session", Some(&caps)).expect("new WebDriver session");
            let session = v["sessionId"].as_str().unwrap().to_string();
            return Self {
                port,
                session,
                driver,
                _profile: profile,
            };
        }
        panic!("{last}");
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let p = format!("/session/{}{path}", self.session);
        wd(self.port, method, &p, body).unwrap_or_else(|e| panic!("{e}"))
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(&json!({ "url": url })));
    }

    fn script(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": []})),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(&json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/click"), Some(&json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(&json!({ "text": text })),
        );
    }

    /// Waits until `script` returns true.
    fn until(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.script(script) != Value::Bool(true) {
            assert!(
                Instant::now() < deadline,
                "the dashboard never showed {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, path: &PathBuf) {
        if let Ok(v) = wd(
            self.port,
            "GET",
            &format!("/session/{}/screenshot", self.session),
            None,
        ) && let Some(b64) = v.as_str()
            && let Ok(png) = base64::engine::general_purpose::STANDARD.decode(b64)
        {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = std::fs::write(path, png);
            eprintln!("screenshot: {}", path.display());
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = std::env::var_os("NEXODUS_TEST_OUTPUT").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-output"),
                PathBuf::from,
            );
            self.screenshot(&dir.join("dashboard-failure.png"));
        }
        let _ = wd(
            self.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn register(
    coord: &Coordinator,
    token: &JoinToken,
    name: &str,
    seed: u64,
    relay: bool,
) -> Auth {
    let c = ControlClient::connect(coord.addr, token.fingerprint)
        .await
        .unwrap();
    let mut req = register_request(token, name, seed);
    req.relay = relay;
    req.endpoints = vec![format!("192.0.2.{seed}:51820").parse().unwrap()];
    let resp = c.call(&Request::Register(req)).await.unwrap();
    c.close().await;
    match resp {
        Response::Registered { device, credential } => Auth {
            device_id: device.id,
            credential,
        },
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    common::within(Duration::from_secs(150), async {
        let coord = Coordinator::start_with(IP, &["--api-listen", "127.61.0.5:8443"]).await;
        let token = coord.token(&["--reusable"]);
        let key = coord
            .admin(&["admin-key", "create"])
            .unwrap()
            .trim()
            .to_string();
        let relay = register(&coord, &token, "relay", 1, true).await;
        let alpha = register(&coord, &token, "alpha", 2, false).await;
        let beta = register(&coord, &token, "beta", 3, false).await;
        let gamma = register(&coord, &token, "gamma", 4, false).await;
        coord
            .admin(&[
                "devices",
                "approve",
                &relay.device_id.to_string(),
                "--relay",
            ])
            .unwrap();
        // relay, alpha and beta online (each holds a watch stream); gamma offline.
        let client = coord.client().await;
        let mut watches = Vec::new();
        for a in [&relay, &alpha, &beta] {
            watches.push(client.watch(a.clone()).await.unwrap());
        }
        let report = |auth: &Auth, paths: Vec<(i64, PathKind)>| Request::ReportPaths {
            auth: auth.clone(),
            paths: paths
                .into_iter()
                .map(|(peer_id, path)| PeerPath {
                    peer_id,
                    path,
                    handshake_age: Some(4),
                })
                .collect(),
        };
        for (who, paths) in [
            (
                &alpha,
                vec![
                    (relay.device_id, PathKind::Direct),
                    (beta.device_id, PathKind::Relay),
                ],
            ),
            (
                &beta,
                vec![
                    (relay.device_id, PathKind::Direct),
                    (alpha.device_id, PathKind::Relay),
                ],
            ),
            (
                &relay,
                vec![
                    (alpha.device_id, PathKind::Direct),
                    (beta.device_id, PathKind::Direct),
                ],
            ),
        ] {
            assert_eq!(
                client.call(&report(who, paths)).await.unwrap(),
                Response::Ok
            );
        }

        let key2 = key.clone();
        let fingerprint = token.fingerprint;
        let beta_id = beta.device_id;
        let state = coord.state_dir().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let b = Browser::start();
            // Log in by typing the key.
            b.go(URL);
            b.until("the login form", "return !!document.getElementById('key')");
            b.type_into("#key", &key2);
            b.click("#login");
            b.until(
                "four devices",
                "return document.querySelectorAll('#devices tbody tr').length === 4",
            );
            let online = b.script(
                "return [...document.querySelectorAll('#devices tbody tr')]\
                 .map(r => r.dataset.name + ':' + r.children[2].textContent).sort().join(',')",
            );
            assert_eq!(
                online,
                "alpha:online,beta:online,gamma:offline,relay:online"
            );
            // The graph: alpha–relay and beta–relay direct, gamma greyed.
            b.until(
                "direct edges",
                "return document.querySelectorAll('#graph line.direct').length === 2",
            );
            b.until(
                "alpha and beta through the relay",
                "return document.querySelectorAll('#graph path.relay').length === 1",
            );
            b.until(
                "gamma greyed",
                "return document.querySelector('#graph circle[data-name=gamma]')\
                 .classList.contains('offline')",
            );
            b.until(
                "the relay in the middle",
                "return document.querySelector('#graph circle[data-name=relay]')\
                 .classList.contains('relay-node')",
            );
            if let Some(path) = std::env::var_os("NEXODUS_DASHBOARD_SCREENSHOT") {
                b.screenshot(&PathBuf::from(path));
            }
            // Create a token.
            b.click("#token-reusable");
            b.click("#token-create");
            b.until(
                "a token",
                "return document.getElementById('token-output').textContent.startsWith('nx1.')",
            );
            let text = b.script("return document.getElementById('token-output').textContent");
            let made = JoinToken::parse(text.as_str().unwrap()).unwrap();
            assert_eq!(made.fingerprint, fingerprint);
            // Remove beta, confirming.
            b.click(&format!("button.remove[data-id='{beta_id}']"));
            b.cmd("POST", "/alert/accept", Some(&json!({})));
            b.until(
                "beta gone",
                "return document.querySelectorAll('#devices tbody tr').length === 3 && \
                 !document.querySelector('#devices tr[data-name=beta]')",
            );
            let listed = common::admin_command(
                &["devices", "--json"],
                &["--state-dir", state.to_str().unwrap()],
            )
            .unwrap();
            assert!(!listed.contains("\"beta\""), "{listed}");
            // The key from the fragment, which leaves the address bar at once.
            b.script("sessionStorage.clear(); return true");
            b.go(&format!("{URL}#key={key2}"));
            b.until(
                "devices after a fragment login",
                "return document.querySelectorAll('#devices tbody tr').length === 3",
            );
            assert_eq!(b.script("return location.hash"), "");
            // A wrong key is refused and forgotten.
            b.script("sessionStorage.setItem('nexodus-admin-key', 'nxa1.AAAA'); return true");
            b.go(URL);
            b.until(
                "the login form again",
                "return !document.getElementById('login-box').hidden && \
                 sessionStorage.getItem('nexodus-admin-key') === null",
            );
        })
        .await
        .unwrap();
        drop(watches);
        let _ = gamma;
    })
    .await;
}
