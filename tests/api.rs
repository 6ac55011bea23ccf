//! End-to-end: the admin API (DESIGN §12) with the real binary.
//!
//! On SQLite, in namespaces `nx-apx-*` (underlay 203.0.113.0/24; needs root): auth
//! (none, wrong, revoked → 401 with an empty body; too many failures → 429), every
//! route, a token made over the API joins a node, a device removed over the API leaves
//! its peers, oversized and malformed bodies get 4xx and change nothing, path reports
//! appear in `GET /devices`, and the remote CLI run from a node's namespace prints
//! the same bytes as the local one on the coordinator host.
//!
//! On two PostgreSQL replicas (loopback 127.61.0.1 and .2): a key made once works on
//! both, what one replica's API changes the other's shows, a key revoked is refused
//! by both.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::{Cluster, has_peers};
use common::netns::in_ns;
use common::{BIN, Coordinator, wait_until};
use nexodus::admin::client::Remote;
use nexodus::store::testpg::TempPostgres;
use serde_json::Value;

const API: &str = "https://203.0.113.1:8443";

/// A request from namespace `ns` (`auth`: the whole Authorization value, or none);
/// the status and the body as text.
fn call(
    ns: &str,
    url: &str,
    key: &str,
    method: &str,
    path: &str,
    auth: Option<String>,
    body: Vec<u8>,
) -> (u16, String) {
    let (url, key, method, path) = (
        url.to_string(),
        key.to_string(),
        method.to_string(),
        path.to_string(),
    );
    let run = move || {
        let remote = Remote::new(&url, &key).unwrap();
        let (status, body) = remote
            .raw(&method, &path, auth.as_deref(), &body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    if ns.is_empty() { run() } else { in_ns(ns, run) }
}

/// An authorised request with a JSON answer.
fn ok(ns: &str, url: &str, key: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = call(
        ns,
        url,
        key,
        method,
        path,
        Some(format!("Bearer {key}")),
        body.as_bytes().to_vec(),
    );
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: {status} {text:?}: {e}"));
    (status, v)
}

/// stdout and stderr of `nexodus ARGS`, run in `ns` (or here when empty), with `env`.
fn cli(ns: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = if ns.is_empty() {
        Command::new(BIN)
    } else {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, BIN]);
        c
    };
    cmd.args(args)
        .env_remove("NEXODUS_API")
        .env_remove("NEXODUS_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn token_count(ns: &str, key: &str) -> usize {
    let (s, v) = ok(ns, API, key, "GET", "/tokens", "");
    assert_eq!(s, 200);
    v.as_array().unwrap().len()
}

fn device<'a>(list: &'a Value, hostname: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|d| d["hostname"] == hostname)
}

#[test]
fn api_on_sqlite_end_to_end() {
    let mut c = Cluster::new("apx", "203.0.113.1/24");
    // The coordinator again, now with its API.
    c.coord.kill();
    c.coord.serve_flags = vec!["--api-listen".into(), "203.0.113.1:8443".into()];
    c.coord.start();
    let a = c.add_node("a", "203.0.113.11/24", true, &[]);
    let b = c.add_node("b", "203.0.113.12/24", true, &[]);
    c.start_all();
    c.nodes[a].wait_named(&["b"], Duration::from_secs(20));
    c.nodes[b].wait_named(&["a"], Duration::from_secs(20));
    let coord_ns = c.coord.ns.name.clone();
    let a_ns = c.nodes[a].ns.name.clone();
    let state = c.coord.dir.to_str().unwrap().to_string();

    let key = c
        .coord
        .admin(&["admin-key", "create", "--name", "ci"])
        .trim()
        .to_string();
    assert!(key.starts_with("nxa1."), "{key}");
    let revoked = c
        .coord
        .admin(&["admin-key", "create", "--name", "old"])
        .trim()
        .to_string();
    let listed = c.coord.admin(&["admin-key", "list"]);
    assert!(listed.contains("ci") && listed.contains("old"), "{listed}");
    assert!(
        !listed.contains(&key[5..]),
        "a key's secret is never shown again"
    );
    let old_id = listed
        .lines()
        .find(|l| l.contains(" old "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    c.coord.admin(&["admin-key", "revoke", &old_id]);

    // Auth: none, wrong, revoked, not a bearer key: 401, nothing said.
    let mut wrong = nexodus::coord::adminkey::AdminKeyText::parse(&key).unwrap();
    wrong.secret[0] ^= 1;
    let wrong = wrong.to_string();
    for auth in [
        None,
        Some(format!("Bearer {wrong}")),
        Some(format!("Bearer {revoked}")),
        Some(format!("Basic {key}")),
        Some("Bearer ".to_string()),
    ] {
        let (status, body) = call(&a_ns, API, &key, "GET", "/devices", auth.clone(), vec![]);
        assert_eq!((status, body.as_str()), (401, ""), "{auth:?}");
    }
    let (status, body) = call(&a_ns, API, &key, "DELETE", "/devices/1", None, vec![]);
    assert_eq!((status, body.as_str()), (401, ""));
    assert_eq!(
        c.coord.devices().len(),
        2,
        "an unauthorised delete changed nothing"
    );

    // GET /devices: the DESIGN fields, and the paths each node reports.
    let list = wait_until("path reports", Duration::from_secs(30), || {
        let (s, v) = ok(&a_ns, API, &key, "GET", "/devices", "");
        assert_eq!(s, 200);
        let da = device(&v, "a")?;
        (da["paths"]["b"] == "direct" && device(&v, "b")?["paths"]["a"] == "direct").then_some(v)
    });
    let da = device(&list, "a").unwrap();
    for field in [
        "id",
        "hostname",
        "name",
        "tunnel_ip",
        "tunnel_ip_v6",
        "online",
        "endpoint",
        "last_seen",
        "paths",
    ] {
        assert!(da.get(field).is_some(), "GET /devices lacks {field}: {da}");
    }
    assert_eq!(da["name"], "a");
    assert_eq!(da["online"], true);
    assert!(
        da["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("203.0.113.11:"),
        "{da}"
    );

    // The remote CLI from node a's namespace prints what the local one prints.
    let remote_flags = ["--api", API, "--api-key", &key];
    for args in [
        vec!["devices"],
        vec!["devices", "--json"],
        vec!["token", "list"],
        vec!["org", "list"],
        vec!["policy", "show"],
        vec!["policy", "show", "--json"],
        vec!["devices", "--org", "nope"],
    ] {
        let mut local = args.clone();
        local.extend(["--state-dir", &state]);
        let mut remote = args.clone();
        remote.extend(remote_flags);
        let here = cli("", &local, &[]);
        let there = cli(&a_ns, &remote, &[]);
        assert_eq!(here, there, "{args:?}: local and remote differ");
    }
    // The same through the environment.
    let here = cli("", &["devices", "--state-dir", &state], &[]);
    let there = cli(
        &a_ns,
        &["devices"],
        &[("NEXODUS_API", API), ("NEXODUS_API_KEY", &key)],
    );
    assert_eq!(here, there);
    // A key pinned to another certificate is refused before anything is sent.
    let mut other = nexodus::coord::adminkey::AdminKeyText::parse(&key).unwrap();
    other.fingerprint[0] ^= 1;
    let (okay, _, err) = cli(
        &a_ns,
        &["devices", "--api", API, "--api-key", &other.to_string()],
        &[],
    );
    assert!(!okay && err.contains("fingerprint"), "{err}");

    // Oversized and malformed bodies: 4xx, nothing changes.
    let tokens = token_count(&coord_ns, &key);
    let auth = Some(format!("Bearer {key}"));
    let big = format!(
        "{{\"org\":\"default\",\"pad\":\"{}\"}}",
        "x".repeat(100 << 10)
    );
    for (body, want) in [
        (big.into_bytes(), 413),
        (b"{".to_vec(), 400),
        (b"[1,2]".to_vec(), 400),
        (br#"{"reusable":"yes"}"#.to_vec(), 400),
        (br#"{"expires":0}"#.to_vec(), 422),
        (br#"{"org":"nope"}"#.to_vec(), 404),
        (vec![0xff, 0xfe], 400),
    ] {
        let (status, text) = call(&coord_ns, API, &key, "POST", "/tokens", auth.clone(), body);
        assert_eq!(status, want, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"]["code"].is_string(), "{text}");
    }
    let (status, _) = call(
        &coord_ns,
        API,
        &key,
        "PUT",
        "/policy",
        auth.clone(),
        br#"{"text":"[[allow]]\nfrom = 3"}"#.to_vec(),
    );
    assert_eq!(status, 422);
    let (_, p) = ok(&coord_ns, API, &key, "GET", "/policy", "");
    assert_eq!(p["revision"], Value::Null, "a refused policy was stored");
    assert_eq!(
        call(&coord_ns, API, &key, "GET", "/nope", auth.clone(), vec![]).0,
        404
    );
    assert_eq!(
        call(
            &coord_ns,
            API,
            &key,
            "PATCH",
            "/tokens",
            auth.clone(),
            vec![]
        )
        .0,
        405
    );
    assert_eq!(
        token_count(&coord_ns, &key),
        tokens,
        "a refused request made a token"
    );

    // Orgs.
    let (s, org) = ok(
        &coord_ns,
        API,
        &key,
        "POST",
        "/orgs",
        r#"{"name":"lab","cidr":"100.80.0.0/16"}"#,
    );
    assert_eq!((s, org["name"].as_str()), (201, Some("lab")));
    let (_, orgs) = ok(&coord_ns, API, &key, "GET", "/orgs", "");
    assert_eq!(orgs.as_array().unwrap().len(), 2);
    assert_eq!(
        ok(&coord_ns, API, &key, "POST", "/orgs", r#"{"name":"lab"}"#).0,
        409
    );

    // Policy: set, read, clear.
    let policy = "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\n";
    let (s, set) = ok(
        &coord_ns,
        API,
        &key,
        "PUT",
        "/policy",
        &serde_json::json!({ "text": policy }).to_string(),
    );
    assert_eq!((s, set["revision"].as_i64()), (200, Some(1)));
    let (_, got) = ok(&coord_ns, API, &key, "GET", "/policy?org=default", "");
    assert_eq!(got["text"], policy);
    let (_, cleared) = ok(&coord_ns, API, &key, "DELETE", "/policy", "");
    assert_eq!(cleared["cleared"], true);

    // A token made over the API joins a node.
    let (s, made) = ok(
        &coord_ns,
        API,
        &key,
        "POST",
        "/tokens",
        r#"{"org":"default","reusable":false,"expires":"1h"}"#,
    );
    assert_eq!(s, 201);
    let token = made["token"].as_str().unwrap().to_string();
    let token_id = made["id"].as_i64().unwrap();
    let (_, listed) = ok(&coord_ns, API, &key, "GET", "/tokens?org=default", "");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == token_id && t["reusable"] == false)
    );
    let n = c.add_node("c", "203.0.113.13/24", true, &[]);
    c.nodes[n].start_with(Some(&token), &[]);
    c.nodes[a].wait_named(&["b", "c"], Duration::from_secs(20));
    // Spent (single use), then revoked over the API: gone from the list.
    let (s, _) = ok(
        &coord_ns,
        API,
        &key,
        "DELETE",
        &format!("/tokens/{token_id}"),
        "",
    );
    assert_eq!(s, 200);
    assert_eq!(
        ok(
            &coord_ns,
            API,
            &key,
            "DELETE",
            &format!("/tokens/{token_id}"),
            ""
        )
        .0,
        404
    );
    assert!(
        !c.coord
            .admin(&["token", "list"])
            .lines()
            .any(|l| l.starts_with(&format!("{token_id} ")))
    );

    // Approvals over the API.
    let c_id = c.coord.device_id("c");
    let (s, d) = ok(
        &coord_ns,
        API,
        &key,
        "POST",
        &format!("/devices/{c_id}/approve"),
        r#"{"relay":true}"#,
    );
    assert_eq!(
        (s, &d["in_effect"]["relay"]),
        (200, &Value::Bool(false)),
        "c claims no relay role: {d}"
    );

    // A device removed over the API leaves its peers.
    let (s, _) = ok(
        &coord_ns,
        API,
        &key,
        "DELETE",
        &format!("/devices/{c_id}?org=lab"),
        "",
    );
    assert_eq!(s, 404, "device c is not in org lab");
    let (s, _) = ok(
        &coord_ns,
        API,
        &key,
        "DELETE",
        &format!("/devices/{c_id}"),
        "",
    );
    assert_eq!(s, 200);
    for i in [a, b] {
        c.nodes[i].wait_status("to forget c", Duration::from_secs(5), |s| {
            has_peers(s, &[if i == a { "b" } else { "a" }])
                && !s.peers.iter().any(|p| p.hostname == "c")
        });
    }
    assert_eq!(
        ok(
            &coord_ns,
            API,
            &key,
            "DELETE",
            &format!("/devices/{c_id}"),
            ""
        )
        .0,
        404
    );

    // Too many failures from one address: 429 before the key is looked at, even a
    // right one; other addresses are not affected.
    for _ in 0..10 {
        let (s, _) = call(
            &coord_ns,
            API,
            &key,
            "GET",
            "/devices",
            Some(format!("Bearer {wrong}")),
            vec![],
        );
        assert!(s == 401 || s == 429);
    }
    assert_eq!(
        call(
            &coord_ns,
            API,
            &key,
            "GET",
            "/devices",
            auth.clone(),
            vec![]
        )
        .0,
        429
    );
    assert_eq!(
        call(&a_ns, API, &key, "GET", "/devices", auth, vec![]).0,
        200
    );
}

/// Two replicas on one PostgreSQL database, each with its API: any replica serves it.
#[test]
fn api_on_two_postgres_replicas() {
    let pg = TempPostgres::start().unwrap();
    let url = pg.fresh_database("nx").unwrap();
    let logs = tempfile::tempdir().unwrap();
    let r1 = Coordinator::replica_with(
        "127.61.0.1",
        &url,
        logs.path(),
        &["--api-listen", "127.61.0.1:8443"],
    );
    let r2 = Coordinator::replica_with(
        "127.61.0.2",
        &url,
        logs.path(),
        &["--api-listen", "127.61.0.2:8443"],
    );
    let fail = |what: &str| {
        panic!(
            "{what}\n===== r1 =====\n{}\n===== r2 =====\n{}",
            r1.log_text(),
            r2.log_text()
        )
    };
    let admin = |args: &[&str]| {
        common::admin_command(args, &["--database-url", &url]).unwrap_or_else(|e| fail(&e))
    };
    let key = admin(&["admin-key", "create"]).trim().to_string();
    let (u1, u2) = ("https://127.61.0.1:8443", "https://127.61.0.2:8443");
    wait_until("both APIs", Duration::from_secs(20), || {
        [u1, u2]
            .iter()
            .all(|u| {
                Remote::new(u, &key)
                    .ok()
                    .and_then(|r| {
                        r.raw("GET", "/orgs", Some(&format!("Bearer {key}")), b"")
                            .ok()
                    })
                    .is_some_and(|(s, _)| s == 200)
            })
            .then_some(())
    });
    // A token made on replica 1 is listed and revoked on replica 2.
    let (s, made) = ok("", u1, &key, "POST", "/tokens", r#"{"reusable":true}"#);
    assert_eq!(s, 201, "{made}");
    let id = made["id"].as_i64().unwrap();
    let (_, listed) = ok("", u2, &key, "GET", "/tokens", "");
    assert!(
        listed
            .as_array()
            .unwrap_or_else(|| panic!("{listed}"))
            .iter()
            .any(|t| t["id"] == id),
        "{listed}"
    );
    // Remote CLI output through either replica is the local output.
    for u in [u1, u2] {
        for args in [vec!["token", "list"], vec!["devices"], vec!["org", "list"]] {
            let mut local = args.clone();
            local.extend(["--database-url", &url]);
            let mut remote = args.clone();
            remote.extend(["--api", u, "--api-key", &key]);
            assert_eq!(
                cli("", &local, &[]),
                cli("", &remote, &[]),
                "{args:?} via {u}"
            );
        }
    }
    assert_eq!(
        ok("", u2, &key, "DELETE", &format!("/tokens/{id}"), "").0,
        200
    );
    let (_, listed) = ok("", u1, &key, "GET", "/tokens", "");
    assert!(!listed.as_array().unwrap().iter().any(|t| t["id"] == id));
    // A malformed body on one replica changes nothing anywhere.
    assert_eq!(ok("", u1, &key, "POST", "/orgs", r#"{"name":1}"#).0, 400);
    assert_eq!(
        ok("", u2, &key, "GET", "/orgs", "")
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Revoked once, refused by both.
    let listed = admin(&["admin-key", "list"]);
    let kid = listed
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    admin(&["admin-key", "revoke", &kid]);
    for u in [u1, u2] {
        let (s, body) = call(
            "",
            u,
            &key,
            "GET",
            "/devices",
            Some(format!("Bearer {key}")),
            vec![],
        );
        assert_eq!((s, body.as_str()), (401, ""), "{u}");
    }
}
