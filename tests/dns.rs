//! End-to-end: mesh DNS (DESIGN §10). Nodes in network namespaces answer A and AAAA
//! for every device on their tunnel addresses over UDP and TCP (queried with `dig`);
//! a v4-only device has no AAAA; a new device resolves within about a second and a
//! removed one stops resolving; names outside the domain are refused; a rootless
//! node's SOCKS5 server resolves mesh names (`curl --socks5-hostname`) and an
//! `--egress` rule may name its mesh host. Needs root (namespaces, TUN) and `dig`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Deadline;
use common::cluster::{Cluster, wait_until};
use common::netns::{Netns, in_ns, spawn_in_ns};
use nexodus::join::status::Status;

const DOMAIN: &str = "nexodus.internal";
const WAIT: Duration = Duration::from_secs(30);

/// (status, addresses) of `dig @server name qtype` run in `ns`, over TCP if `tcp`.
fn dig(ns: &Netns, server: &str, name: &str, qtype: &str, tcp: bool) -> (String, Vec<String>) {
    let server = format!("@{server}");
    let mut args = vec![
        "dig",
        &server,
        name,
        qtype,
        "+noall",
        "+comments",
        "+answer",
        "+time=2",
        "+tries=1",
    ];
    if tcp {
        args.push("+tcp");
    }
    let out = ns.cmd(&args).output().expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("NO ANSWER")
        .to_string();
    let addrs = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(ToString::to_string))
        .collect();
    (status, addrs)
}

fn fqdn(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}

/// A small HTTP server in `ns` on port 8080 answering "hello from NAME", until
/// `stop` is set.
fn http_server(ns: &str, name: &str, stop: Arc<AtomicBool>) {
    let body = format!("hello from {name}\n");
    let listener = in_ns(ns, || TcpListener::bind("0.0.0.0:8080").unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = write!(
                        s,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
}

/// The SOCKS5 reply code to a CONNECT to `name`:80 through `proxy` from `ns`.
fn socks_reply(ns: &str, proxy: &str, name: &str) -> u8 {
    let (proxy, name) = (proxy.to_string(), name.to_string());
    spawn_in_ns(ns, move || {
        let mut s = TcpStream::connect(&proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[5, 1, 0]).unwrap();
        let mut method = [0u8; 2];
        s.read_exact(&mut method).unwrap();
        assert_eq!(method, [5, 0]);
        let mut req = vec![5, 1, 0, 3, u8::try_from(name.len()).unwrap()];
        req.extend_from_slice(name.as_bytes());
        req.extend_from_slice(&80u16.to_be_bytes());
        s.write_all(&req).unwrap();
        let mut reply = [0u8; 2];
        s.read_exact(&mut reply).unwrap();
        reply[1]
    })
    .join()
    .unwrap()
}

fn curl(ns: &Netns, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["curl", "-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = ns.cmd(&all).output().expect("run curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Polls `dig` (UDP) in `ns` until `name`'s status is `want`; returns how long it
/// took, failing after `timeout`.
fn until_status(ns: &Netns, server: &str, name: &str, want: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (status, _) = dig(ns, server, name, "A", false);
        if status == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{name} still {status} (want {want}) after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn mesh_names_resolve_everywhere() {
    let deadline = Deadline::after(Duration::from_secs(240));
    let mut c = Cluster::new("dn", "192.0.2.1/24");
    let iface = ["--interface", "dn0"];
    let a = c.add_node(
        "a",
        "192.0.2.11/24",
        true,
        &[&iface[..], &["--dns"][..]].concat(),
    );
    let b = c.add_node("b", "192.0.2.12/24", true, &iface);
    let v4 = c.add_node("v4only", "192.0.2.13/24", false, &iface);
    for i in [a, b, v4] {
        c.start(i);
    }
    let statuses: Vec<Status> = [a, b, v4]
        .iter()
        .map(|&i| c.nodes[i].wait_peers(2))
        .collect();
    assert_eq!(statuses[2].device.tunnel_ip_v6, None);

    // `devices` shows every name; `org create --domain` checks the domain.
    let table = c.coord.admin(&["devices"]);
    for name in ["a", "b", "v4only"] {
        assert!(table.contains(&format!(" {} ", fqdn(name))), "{table}");
    }
    let out = c
        .coord
        .admin(&["org", "create", "lab", "--domain", "Lab.Example"]);
    assert!(out.contains("names under lab.example"), "{out}");
    let err = c
        .coord
        .admin_result(&["org", "create", "bad", "--domain", "no_underscore"])
        .unwrap_err();
    assert!(err.contains("invalid domain \"no_underscore\""), "{err}");

    // Every node answers for every device, over UDP and TCP, on each of its tunnel
    // addresses.
    let names = ["a", "b", "v4only"];
    for (i, &node) in [a, b, v4].iter().enumerate() {
        let ns = &c.nodes[node].ns;
        let me = &statuses[i].device;
        let servers: Vec<String> = std::iter::once(me.tunnel_ip.to_string())
            .chain(me.tunnel_ip_v6.map(|a| a.to_string()))
            .collect();
        for server in &servers {
            for tcp in [false, true] {
                for (j, name) in names.iter().enumerate() {
                    let d = &statuses[j].device;
                    let how = format!("node {i} asks {server} (tcp {tcp}) for {name}");
                    let got = dig(ns, server, &fqdn(name), "A", tcp);
                    assert_eq!(
                        got,
                        ("NOERROR".into(), vec![d.tunnel_ip.to_string()]),
                        "{how}"
                    );
                    let want: Vec<String> = d.tunnel_ip_v6.iter().map(|a| a.to_string()).collect();
                    let got = dig(ns, server, &fqdn(name), "AAAA", tcp);
                    // A v4-only device: NOERROR, no answer (not NXDOMAIN).
                    assert_eq!(got, ("NOERROR".into(), want), "{how} AAAA");
                }
                let got = dig(ns, server, &fqdn("nosuch"), "A", tcp);
                assert_eq!(got, ("NXDOMAIN".into(), vec![]), "{server} tcp {tcp}");
                let got = dig(ns, server, "example.com", "A", tcp);
                assert_eq!(got, ("REFUSED".into(), vec![]), "{server} tcp {tcp}");
            }
        }
    }
    deadline.check("resolving every node");

    // `--dns` without systemd-resolved: said, and nothing changed.
    let log = c.nodes[a].log_text();
    assert!(
        log.contains("--dns:") && log.contains("the host's DNS settings are left unchanged"),
        "{log}"
    );

    // A new device resolves within about a second of its registration.
    let server = statuses[0].device.tunnel_ip.to_string();
    let ns_a = &c.nodes[a].ns;
    assert_eq!(dig(ns_a, &server, &fqdn("late"), "A", false).0, "NXDOMAIN");
    let late = c.add_node("late", "192.0.2.14/24", true, &iface);
    c.start(late);
    wait_until("late to register", WAIT, || c.coord.device("late"));
    let ns_a = &c.nodes[a].ns;
    let took = until_status(
        ns_a,
        &server,
        &fqdn("late"),
        "NOERROR",
        Duration::from_secs(5),
    );
    eprintln!("a new device resolved {took:?} after the coordinator listed it");
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    // A removed device stops resolving.
    let id = c.coord.device_id("late");
    c.coord.admin(&["devices", "remove", &id.to_string()]);
    let took = until_status(
        ns_a,
        &server,
        &fqdn("late"),
        "NXDOMAIN",
        Duration::from_secs(5),
    );
    eprintln!("a removed device stopped resolving {took:?} after its removal");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    deadline.check("join and removal");

    // Rootless: SOCKS5 with host names (socks5h) and an egress rule naming its host.
    let stop = Arc::new(AtomicBool::new(false));
    http_server(&c.nodes[a].ns.name, "a", stop.clone());
    let r = c.add_node(
        "r",
        "192.0.2.15/24",
        true,
        &[
            "--userspace",
            "--socks5",
            "127.0.0.1:1080",
            "--egress",
            &format!("tcp:18080:{}:8080", fqdn("a")),
        ],
    );
    c.start(r);
    c.nodes[r].wait_peers(3);
    let ns_r = &c.nodes[r].ns;
    let url = format!("http://{}:8080/", fqdn("a"));
    let body = wait_until("curl through SOCKS5 by name", WAIT, || {
        curl(ns_r, &["--socks5-hostname", "127.0.0.1:1080", &url]).ok()
    });
    assert_eq!(body, "hello from a\n");
    let body = curl(ns_r, &["-x", "socks5h://127.0.0.1:1080", &url]).unwrap();
    assert_eq!(body, "hello from a\n");
    let body = wait_until("curl through the named egress", WAIT, || {
        curl(ns_r, &["http://127.0.0.1:18080/"]).ok()
    });
    assert_eq!(body, "hello from a\n");
    // Other names: "host unreachable" (4), never the host's resolver.
    let r_ns = c.nodes[r].ns.name.clone();
    assert_eq!(socks_reply(&r_ns, "127.0.0.1:1080", "example.com"), 4);
    assert_eq!(socks_reply(&r_ns, "127.0.0.1:1080", &fqdn("nosuch")), 4);
    // The rootless node is a name too, answered by the TUN nodes.
    let r_v4 = c.nodes[r].current().device.tunnel_ip.to_string();
    assert_eq!(
        dig(
            &c.nodes[b].ns,
            &statuses[1].device.tunnel_ip.to_string(),
            &fqdn("r"),
            "A",
            true
        ),
        ("NOERROR".into(), vec![r_v4])
    );
    stop.store(true, Ordering::Relaxed);
    deadline.check("rootless names");

    // Another DNS server holding port 53: the node meshes all the same (without
    // answering names itself) and is a name for the others.
    let busy = c.add_node("busy", "192.0.2.16/24", true, &iface);
    let holder = in_ns(&c.nodes[busy].ns.name, || {
        std::net::UdpSocket::bind("0.0.0.0:53").unwrap()
    });
    c.start(busy);
    let s = c.nodes[busy].wait_peers(4);
    let log = c.nodes[busy].log_text();
    assert!(log.contains("names are not answered here"), "{log}");
    let ns_a = &c.nodes[a].ns;
    until_status(
        ns_a,
        &server,
        &fqdn("busy"),
        "NOERROR",
        Duration::from_secs(5),
    );
    assert_eq!(
        dig(ns_a, &server, &fqdn("busy"), "A", false).1,
        [s.device.tunnel_ip.to_string()]
    );
    drop(holder);
}

/// `join --dns` with a real systemd-resolved (in a container booted with systemd,
/// the package `scripts/test` downloads): the host resolves `NAME.DOMAIN` through
/// the node's resolver (`resolvectl`, getaddrinfo, ping), other names in the domain
/// are not found, and stopping the node reverts the split DNS.
#[test]
fn join_dns_points_systemd_resolved_at_the_mesh() {
    let resolved = resolved_package();
    let bin = std::path::Path::new(common::BIN);
    let c = common::systemd::SystemdContainer::boot(&[
        (resolved.as_path(), "/run/systemd-resolved.deb"),
        (bin, "/usr/local/bin/nexodus"),
    ]);
    c.expect(&["dpkg", "-i", "/run/systemd-resolved.deb"]);
    c.expect(&["systemctl", "enable", "--now", "systemd-resolved"]);
    c.expect(&[
        "systemd-run",
        "--unit=nx-serve",
        "nexodus",
        "serve",
        "--state-dir",
        "/root/coord",
        "--listen",
        "127.0.0.1:4443",
        "--stun-listen",
        "127.0.0.1:3478",
    ]);
    let token = c.wait_for("a join token", || {
        let (ok, out) = c.run_status(&[
            "nexodus",
            "token",
            "create",
            "--reusable",
            "--state-dir",
            "/root/coord",
        ]);
        ok.then(|| out.lines().last().unwrap_or_default().trim().to_owned())
    });
    for (name, iface, port, dns) in [
        ("alpha", "nxa", "51820", true),
        ("beta", "nxb", "51821", false),
    ] {
        let unit = format!("--unit=nx-{name}");
        let mut args = vec![
            "systemd-run",
            &unit,
            "nexodus",
            "join",
            "127.0.0.1:4443",
            "--token",
            &token,
            "--hostname",
            name,
            "--interface",
            iface,
            "--listen-port",
            port,
            "--state-dir",
        ];
        let state = format!("/root/{name}");
        args.push(&state);
        if dns {
            args.push("--dns");
        }
        c.expect(&args);
    }
    let answer = c.wait_for("resolvectl to answer beta's name", || {
        let (ok, out) = c.run_status(&["resolvectl", "query", "beta.nexodus.internal"]);
        (ok && out.contains("100.64.") && out.contains("200::")).then_some(out)
    });
    assert!(answer.contains("link: nxa"), "{answer}");
    let hosts = c.expect(&["getent", "ahostsv4", "alpha.nexodus.internal"]);
    assert!(hosts.starts_with("100.64."), "{hosts}");
    c.expect(&["ping", "-c", "1", "-W", "5", "beta.nexodus.internal"]);
    let (found, _) = c.run_status(&["resolvectl", "query", "nothere.nexodus.internal"]);
    assert!(!found, "an unknown name in the domain resolved");

    c.expect(&["systemctl", "stop", "nx-alpha"]);
    c.wait_for("the split DNS to be reverted", || {
        let status = c.run(&["resolvectl", "status"]);
        (!status.contains("nexodus.internal")).then_some(())
    });
    let (found, _) = c.run_status(&["resolvectl", "query", "beta.nexodus.internal"]);
    assert!(
        !found,
        "beta still resolves after alpha, the --dns node, stopped"
    );
}

/// The systemd-resolved package: `NEXODUS_RESOLVED_DEB`, else the one `scripts/test`
/// downloads into target/debs.
fn resolved_package() -> std::path::PathBuf {
    if let Some(deb) = std::env::var_os("NEXODUS_RESOLVED_DEB") {
        return deb.into();
    }
    let pattern = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/debs/systemd-resolved_*.deb"
    );
    glob::glob(pattern)
        .expect("glob pattern")
        .filter_map(Result::ok)
        .next()
        .expect("no systemd-resolved package: run scripts/test (it downloads one) or set NEXODUS_RESOLVED_DEB")
}
