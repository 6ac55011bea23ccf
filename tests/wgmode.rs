//! `nexodus wg IFNAME` as a drop-in userspace WireGuard, driven only through `wg`,
//! `wg-quick` and `ip`, as wireguard-go's own conformance script drives it: two
//! interfaces in two namespaces joined by a veth pair, over IPv4 and IPv6 outer
//! transport; ping and TCP both ways, roaming, the cryptokey reverse-path filter,
//! `wg setconf` read back by `wg showconf`, and `wg-quick up` with nexodus as the
//! userspace implementation against a stock wireguard-go peer, with `wg syncconf`.
//! Needs root, wireguard-tools, wireguard-go and iperf3 (scripts/test installs them).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::proc::Proc;
use common::{BIN, DieWithParent, wait_until};

const WAIT: Duration = Duration::from_secs(20);

fn genkey() -> (String, String) {
    let key = String::from_utf8(Command::new("wg").arg("genkey").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), key.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        key,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("wgm-{tag}-"))
        .tempdir()
        .unwrap()
}

/// One side: a namespace with `veth` on the underlay and a `nexodus wg` interface.
struct Side {
    iface: String,
    key: String,
    public: String,
    inner4: String,
    inner6: String,
    ns: Netns,
}

impl Side {
    fn wg(&self, args: &[&str]) -> String {
        let mut all = vec!["wg"];
        all.extend_from_slice(args);
        self.ns.ok(&all)
    }

    fn wg_try(&self, args: &[&str]) -> bool {
        let mut all = vec!["wg"];
        all.extend_from_slice(args);
        self.ns.try_run(&all)
    }

    /// `wg show IFACE KEY` as lines.
    fn show(&self, what: &str) -> String {
        self.wg(&["show", &self.iface, what])
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/wireguard/{}.sock", self.iface))
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        // Deleting the interface makes the process exit and remove its socket.
        let _ = self.ns.cmd(&["ip", "link", "del", &self.iface]).output();
        let until = Instant::now() + Duration::from_secs(5);
        while self.socket().exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(self.socket());
    }
}

/// Two namespaces `wgm-TAG-1`/`-2` joined by a veth pair (192.0.2.1/2 and
/// 2001:db8:7::1/2), each running `nexodus wg wgmTAGn` (detached, as wg-quick runs
/// it) with keys, ports 10001/10002, inner addresses 10.77.0.n/24 and fd77::n/64, and
/// the other as peer with its /32 and /128 (no endpoint yet).
fn pair(tag: &str) -> (Side, Side) {
    let nss = [1, 2].map(|n| Netns::new(&format!("wgm-{tag}-{n}")));
    let [a, b] = &nss;
    a.ok(&[
        "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", &b.name,
    ]);
    for (ns, n) in nss.iter().zip(1..) {
        ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("192.0.2.{n}/24"),
            "dev",
            "veth0",
        ]);
        ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("2001:db8:7::{n}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
        ns.ok(&["ip", "link", "set", "veth0", "up"]);
    }
    wg_sides(&format!("wgm{tag}"), 77, nss)
}

/// Points each side at the other's underlay address of one family.
fn endpoints(a: &Side, b: &Side, v6: bool) {
    for (me, other, n) in [(a, b, 2), (b, a, 1)] {
        let ep = if v6 {
            format!("[2001:db8:7::{n}]:1000{n}")
        } else {
            format!("192.0.2.{n}:1000{n}")
        };
        me.wg(&["set", &me.iface, "peer", &other.public, "endpoint", &ep]);
    }
}

fn pings(from: &Side, to: &str) {
    assert!(
        from.ns.ping_until(to, WAIT),
        "{} cannot ping {to}:\n{}",
        from.iface,
        from.wg(&["show", &from.iface])
    );
}

/// A TCP transfer of `bytes` from `client` to `server_addr` (and back with `-R`).
fn iperf(server: &Side, client: &Side, server_addr: &str, reverse: bool) -> f64 {
    let srv = Proc::quiet({
        let mut c = server.ns.cmd(&["iperf3", "-s", "-1", "-B", server_addr]);
        c.die_with_parent();
        c
    });
    let mut args = vec!["iperf3", "-c", server_addr, "-n", "64M", "-J"];
    if reverse {
        args.push("-R");
    }
    let bps = wait_until("an iperf3 run", WAIT, || {
        let out = client.ns.cmd(&args).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
        if bps.is_none() {
            eprintln!("iperf3: {}", String::from_utf8_lossy(&out.stdout));
        }
        bps
    });
    drop(srv);
    assert!(bps > 0.0);
    bps / 1e6
}

#[test]
fn ping_and_tcp_both_ways_over_v4_and_v6_transport() {
    let (a, b) = pair("t");
    for v6 in [false, true] {
        endpoints(&a, &b, v6);
        for (x, y) in [(&a, &b), (&b, &a)] {
            pings(x, &y.inner4);
            pings(x, &y.inner6);
        }
        let fwd = iperf(&b, &a, &b.inner4, false);
        let rev = iperf(&b, &a, &b.inner6, true);
        eprintln!("outer v6={v6}: TCP a→b {fwd:.0} Mbit/s, b→a {rev:.0} Mbit/s");
        let eps = a.show("endpoints");
        assert!(
            eps.contains(if v6 {
                "[2001:db8:7::2]:10002"
            } else {
                "192.0.2.2:10002"
            }),
            "{eps}"
        );
    }
}

#[test]
fn roaming_on_both_families() {
    let (a, b) = pair("r");
    for v6 in [false, true] {
        // Only a knows where b is; b learns a from its packets.
        a.wg(&[
            "set",
            &a.iface,
            "peer",
            &b.public,
            "endpoint",
            &if v6 {
                "[2001:db8:7::2]:10002".to_string()
            } else {
                "192.0.2.2:10002".to_string()
            },
        ]);
        pings(&a, &b.inner4);
        let learned = b.show("endpoints");
        assert!(
            learned.contains(if v6 {
                "[2001:db8:7::1]:10001"
            } else {
                "192.0.2.1:10001"
            }),
            "{learned}"
        );
        // a moves: a new port and a new address; b follows its authenticated packets.
        a.wg(&["set", &a.iface, "listen-port", "10011"]);
        let new_addr = if v6 { "2001:db8:7::11" } else { "192.0.2.11" };
        let old_addr = if v6 { "2001:db8:7::1" } else { "192.0.2.1" };
        let (cidr_new, cidr_old) = if v6 {
            (format!("{new_addr}/64"), format!("{old_addr}/64"))
        } else {
            (format!("{new_addr}/24"), format!("{old_addr}/24"))
        };
        // The new v4 address is a secondary one: keep it when the primary goes.
        a.ns.ok(&["sysctl", "-qw", "net.ipv4.conf.veth0.promote_secondaries=1"]);
        a.ns.ok(&["ip", "addr", "add", &cidr_new, "dev", "veth0", "nodad"]);
        a.ns.ok(&["ip", "addr", "del", &cidr_old, "dev", "veth0"]);
        pings(&a, &b.inner6);
        let want = if v6 {
            format!("[{new_addr}]:10011")
        } else {
            format!("{new_addr}:10011")
        };
        wait_until("b to see a's new endpoint", WAIT, || {
            b.show("endpoints").contains(&want).then_some(())
        });
        // b answers to the new endpoint.
        pings(&b, &a.inner4);
        assert!(a.show("listen-port").trim() == "10011");
        // Put a back for the next family.
        a.ns.ok(&["ip", "addr", "add", &cidr_old, "dev", "veth0", "nodad"]);
        a.ns.ok(&["ip", "addr", "del", &cidr_new, "dev", "veth0"]);
        a.wg(&["set", &a.iface, "listen-port", "10001"]);
    }
}

#[test]
fn cryptokey_reverse_path_with_a_more_specific_peer() {
    let (a, b) = pair("c");
    endpoints(&a, &b, false);
    pings(&a, &b.inner4);
    // A third peer takes b's /32 on a: a's packets to b go to it (no endpoint:
    // dropped), and b's packets from that address fail a's source check.
    let (_, third) = genkey();
    a.wg(&[
        "set",
        &a.iface,
        "peer",
        &third,
        "allowed-ips",
        &format!("{}/32", b.inner4),
    ]);
    assert!(!a.ns.try_run(&["ping", "-c", "2", "-W", "1", &b.inner4]));
    assert!(!b.ns.try_run(&["ping", "-c", "2", "-W", "1", &a.inner4]));
    let allowed = a.show("allowed-ips");
    assert!(
        allowed.contains(&format!("{third}\t{}/32", b.inner4)),
        "{allowed}"
    );
    assert!(
        allowed.contains(&format!("{}\tfd77::2/128", b.public)),
        "{allowed}"
    );
    a.wg(&["set", &a.iface, "peer", &third, "remove"]);
    a.wg(&[
        "set",
        &a.iface,
        "peer",
        &b.public,
        "allowed-ips",
        &format!("{}/32,fd77::2/128", b.inner4),
    ]);
    pings(&a, &b.inner4);
    pings(&b, &a.inner4);
}

#[test]
fn setconf_with_many_allowed_ips_reads_back_exactly() {
    let (a, _b) = pair("s");
    let dir = tempdir("setconf");
    let check = |conf: String| {
        let path = dir.path().join("wg.conf");
        std::fs::write(&path, &conf).unwrap();
        let start = Instant::now();
        a.wg(&["setconf", &a.iface, path.to_str().unwrap()]);
        let set = start.elapsed();
        let shown = a.wg(&["showconf", &a.iface]);
        let read = start.elapsed() - set;
        // showconf prints what we set, in order (listen port first, as wg does).
        let norm = |s: &str| -> Vec<String> {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .flat_map(|l| match l.strip_prefix("AllowedIPs = ") {
                    Some(list) => list
                        .split(", ")
                        .map(|x| format!("AllowedIPs = {x}"))
                        .collect(),
                    None => vec![l.to_string()],
                })
                .collect()
        };
        let mut want = norm(&conf);
        let mut got = norm(&shown);
        want.sort();
        got.sort();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "showconf differs from setconf");
        eprintln!("{} lines: setconf {set:?}, showconf {read:?}", want.len());
    };
    let header = format!("[Interface]\nListenPort = 10001\nPrivateKey = {}\n", a.key);
    // 130,560 allowed IPs on one peer.
    let (_, p) = genkey();
    let mut conf = format!("{header}\n[Peer]\nPublicKey = {p}\n");
    for i in 0..130_560u32 {
        conf.push_str(&format!(
            "AllowedIPs = {}.{}.{}.0/24\n",
            10 + (i >> 16),
            (i >> 8) & 255,
            i & 255
        ));
    }
    check(conf);
    // 40 peers × 52 allowed IPs, then 30 peers.
    let mut conf = header.clone();
    for p in 0..40u32 {
        let (_, k) = genkey();
        conf.push_str(&format!("\n[Peer]\nPublicKey = {k}\n"));
        for i in 0..52u32 {
            conf.push_str(&format!("AllowedIPs = 10.{p}.{i}.0/24\n"));
        }
    }
    check(conf);
    let mut conf = header;
    for p in 0..30u32 {
        let (_, k) = genkey();
        conf.push_str(&format!("\n[Peer]\nPublicKey = {k}\nAllowedIPs = 10.99.{p}.0/24\nEndpoint = 192.0.2.{}:51820\nPersistentKeepalive = 25\n", p + 10));
    }
    check(conf);
}

/// One raw UAPI exchange on the socket (the path is the same in every namespace).
fn uapi(side: &Side, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(side.socket()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn bad_values_are_refused_and_the_lines_before_stay() {
    let (a, _b) = pair("b");
    // EINVAL for a bad port; the lines before it applied, none after.
    let out = uapi(&a, "set=1\nfwmark=7\nlisten_port=99999\nfwmark=8\n\n");
    assert_eq!(out, "errno=-22\n\n");
    assert_eq!(a.show("fwmark").trim(), "0x7");
    assert_eq!(a.show("listen-port").trim(), "10001");
    a.wg(&["set", &a.iface, "fwmark", "0"]);
    assert_eq!(a.show("fwmark").trim(), "off");
    // No '=': EPROTO. An unknown operation: closed without an answer.
    assert_eq!(uapi(&a, "set=1\nlisten_port\n\n"), "errno=-71\n\n");
    assert_eq!(uapi(&a, "bogus=1\n\n"), "");
    // A get split over many writes, and two operations on one connection.
    let get = uapi(&a, "get=1\n\nget=1\n\n");
    assert_eq!(get.matches("errno=0\n\n").count(), 2, "{get}");
    // A port in use in a's namespace: EADDRINUSE, the old port kept.
    let held = common::netns::in_ns(&a.ns.name, || {
        std::net::UdpSocket::bind("[::]:10050").unwrap()
    });
    assert!(!a.wg_try(&["set", &a.iface, "listen-port", "10050"]));
    assert_eq!(a.show("listen-port").trim(), "10001");
    drop(held);
    a.wg(&["set", &a.iface, "listen-port", "10050"]);
    assert_eq!(a.show("listen-port").trim(), "10050");
}

#[test]
fn exits_when_the_interface_is_deleted() {
    let (a, _b) = pair("x");
    assert!(a.socket().exists());
    a.ns.ok(&["ip", "link", "del", &a.iface]);
    // The data path reports the dead TUN at once (no spinning on its errors).
    wait_until("the socket to go", Duration::from_secs(2), || {
        (!a.socket().exists()).then_some(())
    });
    wait_until("the process to exit", WAIT, || {
        let out = Command::new("ip")
            .args(["netns", "pids", &a.ns.name])
            .output()
            .unwrap();
        out.stdout.trim_ascii().is_empty().then_some(())
    });
}

/// An interface brought up by `wg-quick up CONF` in a namespace; `ip link del` on drop
/// (the userspace process then exits and removes its socket).
struct Quick {
    iface: String,
    ns: Netns,
}

impl Drop for Quick {
    fn drop(&mut self) {
        let _ = self.ns.cmd(&["ip", "link", "del", &self.iface]).output();
        let sock = PathBuf::from(format!("/var/run/wireguard/{}.sock", self.iface));
        let until = Instant::now() + Duration::from_secs(5);
        while sock.exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(sock);
    }
}

fn quick_conf(key: &str, n: u8, peer: &str, endpoint: &str, extra: &str) -> String {
    let o = 3 - n;
    format!(
        "[Interface]\nPrivateKey = {key}\nAddress = 10.78.0.{n}/24, fd78::{n}/64\nListenPort = 1000{n}\n\n\
         [Peer]\nPublicKey = {peer}\nAllowedIPs = 10.78.0.{o}/32, fd78::{o}/128{extra}\nEndpoint = {endpoint}\n"
    )
}

#[test]
fn wg_quick_with_nexodus_against_stock_wireguard_go_and_syncconf() {
    let dir = tempdir("quick");
    // wg-quick runs one command with the interface name as its only argument.
    let wrapper = dir.path().join("nexodus-wg");
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec {BIN} wg \"$@\"\n")).unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&wrapper)
        .status()
        .unwrap();
    let (k1, p1) = genkey();
    let (k2, p2) = genkey();
    let ns1 = Netns::new("wgm-q-1");
    let ns2 = Netns::new("wgm-q-2");
    ns1.ok(&[
        "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", &ns2.name,
    ]);
    for (ns, n) in [(&ns1, 1), (&ns2, 2)] {
        ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("192.0.2.{n}/24"),
            "dev",
            "veth0",
        ]);
        ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("2001:db8:7::{n}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
        ns.ok(&["ip", "link", "set", "veth0", "up"]);
    }
    let up = |ns: &Netns, iface: &str, conf: String, userspace: &str| {
        let path = dir.path().join(format!("{iface}.conf"));
        std::fs::write(&path, conf).unwrap();
        let out = ns
            .cmd(&["wg-quick", "up", path.to_str().unwrap()])
            .env("WG_QUICK_USERSPACE_IMPLEMENTATION", userspace)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wg-quick up {iface}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let q1 = Quick {
        iface: "wgmq1".into(),
        ns: ns1,
    };
    let q2 = Quick {
        iface: "wgmq2".into(),
        ns: ns2,
    };
    up(
        &q1.ns,
        "wgmq1",
        quick_conf(&k1, 1, &p2, "192.0.2.2:10002", ""),
        wrapper.to_str().unwrap(),
    );
    up(
        &q2.ns,
        "wgmq2",
        quick_conf(&k2, 2, &p1, "192.0.2.1:10001", ""),
        "wireguard-go",
    );
    // Which implementation serves each: nexodus answers with our process name.
    let comm = |ns: &Netns| {
        let out = Command::new("ip")
            .args(["netns", "pids", &ns.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
            .collect::<String>()
    };
    assert!(comm(&q1.ns).contains("nexodus"), "{}", comm(&q1.ns));
    assert!(comm(&q2.ns).contains("wireguard-go"), "{}", comm(&q2.ns));
    for (from, to) in [
        (&q1.ns, "10.78.0.2"),
        (&q1.ns, "fd78::2"),
        (&q2.ns, "10.78.0.1"),
        (&q2.ns, "fd78::1"),
    ] {
        assert!(from.ping_until(to, WAIT), "{} cannot ping {to}", from.name);
    }
    // syncconf, live: IPv6 transport and one more allowed prefix.
    let conf2 = dir.path().join("wgmq1-v6.conf");
    std::fs::write(
        &conf2,
        quick_conf(&k1, 1, &p2, "[2001:db8:7::2]:10002", ", 10.78.9.0/24"),
    )
    .unwrap();
    q1.ns.ok(&[
        "bash",
        "-c",
        &format!("wg syncconf wgmq1 <(wg-quick strip {})", conf2.display()),
    ]);
    let allowed = q1.ns.ok(&["wg", "show", "wgmq1", "allowed-ips"]);
    assert!(allowed.contains("10.78.9.0/24"), "{allowed}");
    // Our packets now leave over v6; the stock peer roams to our v6 address (and a
    // packet it sent before that may move us back to v4 for a moment: wait).
    assert!(q1.ns.ping_until("10.78.0.2", WAIT));
    assert!(q1.ns.ping_until("fd78::2", WAIT));
    wait_until("both sides on v6 transport", WAIT, || {
        let ours = q1.ns.ok(&["wg", "show", "wgmq1", "endpoints"]);
        let theirs = q2.ns.ok(&["wg", "show", "wgmq2", "endpoints"]);
        let done =
            ours.contains("[2001:db8:7::2]:10002") && theirs.contains("[2001:db8:7::1]:10001");
        if !done {
            assert!(q1.ns.ping_until("10.78.0.2", WAIT));
        }
        done.then_some(())
    });
    assert!(q2.ns.ping_until("10.78.0.1", WAIT));
    // wg-quick down removes the interface; our process exits with it.
    let path1 = dir.path().join("wgmq1.conf");
    q1.ns.ok(&["wg-quick", "down", path1.to_str().unwrap()]);
    wait_until("nexodus wg to exit", WAIT, || {
        (!comm(&q1.ns).contains("nexodus")).then_some(())
    });
}

/// wireguard-go's own topology (`tests/netns.sh`): both `nexodus wg` processes run in
/// `wm-TAG-0`, their interfaces are moved to `wm-TAG-1` and `wm-TAG-2` right after
/// creation, and the UDP sockets stay behind in `wm-TAG-0`, where the peers reach each
/// other over its loopback. Inner addresses 10.79.0.n/24 and fd79::n/64, a preshared
/// key, ports 1000n, no endpoints yet. Sides are dropped before `ns0` (field order).
struct Moved {
    a: Side,
    b: Side,
    ns0: Netns,
}

fn moved(tag: &str) -> Moved {
    let ns0 = Netns::new(&format!("wm-{tag}-0"));
    let psk = String::from_utf8(Command::new("wg").arg("genpsk").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let mut sides = Vec::new();
    for n in 1..=2 {
        let ns = Netns::new(&format!("wm-{tag}-{n}"));
        let iface = format!("wm{tag}{n}");
        let status = ns0
            .cmd(&[BIN, "wg", &iface])
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "nexodus wg {iface}: {status}");
        ns0.ok(&["ip", "link", "set", &iface, "netns", &ns.name]);
        let (key, public) = genkey();
        sides.push(Side {
            inner4: format!("10.79.0.{n}"),
            inner6: format!("fd79::{n}"),
            iface,
            key,
            public,
            ns,
        });
    }
    let dir = tempdir(tag);
    for (n, me) in [1, 2].into_iter().zip(&sides) {
        let other = &sides[2 - n];
        let key = dir.path().join(format!("key{n}"));
        std::fs::write(&key, &me.key).unwrap();
        let pskf = dir.path().join("psk");
        std::fs::write(&pskf, &psk).unwrap();
        // Driven from ns0, where the processes run, as the script does.
        let mut args = vec!["wg", "set", &me.iface, "private-key"];
        let (key, pskf) = (key.to_str().unwrap(), pskf.to_str().unwrap());
        let port = format!("1000{n}");
        let allowed = format!("{}/32,{}/128", other.inner4, other.inner6);
        args.extend([key, "listen-port", &port, "peer", &other.public]);
        args.extend(["preshared-key", pskf, "allowed-ips", &allowed]);
        ns0.ok(&args);
        me.ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", me.inner4),
            "dev",
            &me.iface,
        ]);
        let cidr6 = format!("{}/64", me.inner6);
        me.ns
            .ok(&["ip", "addr", "add", &cidr6, "dev", &me.iface, "nodad"]);
        me.ns.ok(&["ip", "link", "set", "up", "dev", &me.iface]);
    }
    let b = sides.pop().unwrap();
    let a = sides.pop().unwrap();
    Moved { a, b, ns0 }
}

impl Moved {
    /// Points each side at the other over ns0's loopback, of one family.
    fn endpoints(&self, v6: bool) {
        for (me, other, n) in [(&self.a, &self.b, 2), (&self.b, &self.a, 1)] {
            let ep = if v6 {
                format!("[::1]:1000{n}")
            } else {
                format!("127.0.0.1:1000{n}")
            };
            let args = [
                "wg",
                "set",
                &me.iface,
                "peer",
                &other.public,
                "endpoint",
                &ep,
            ];
            self.ns0.ok(&args);
        }
    }

    fn set_mtu(&self, mtu: u32) {
        for s in [&self.a, &self.b] {
            s.ns.ok(&["ip", "link", "set", &s.iface, "mtu", &mtu.to_string()]);
        }
    }

    /// The script's `tests`: pings each way on both inner families, TCP a→b (v4)
    /// and b→a (v6), UDP b→a (v4) and a→b (v6).
    fn rounds(&self, what: &str) {
        let (a, b) = (&self.a, &self.b);
        for (x, y) in [(a, b), (b, a)] {
            pings(x, &y.inner4);
            pings(x, &y.inner6);
            flood_ping(x, &y.inner4);
            flood_ping(x, &y.inner6);
        }
        let tcp4 = iperf(b, a, &b.inner4, false);
        let tcp6 = iperf(a, b, &a.inner6, false);
        let udp4 = iperf_udp(a, b, &a.inner4);
        let udp6 = iperf_udp(b, a, &b.inner6);
        eprintln!(
            "{what}: TCP a→b {tcp4:.0} Mbit/s, b→a {tcp6:.0} Mbit/s; \
             UDP received b→a {udp4} MiB, a→b {udp6} MiB"
        );
    }
}

/// A counter of `/proc/net/FILE` as seen in `ns` (`snmp`: header and value lines
/// per protocol; `snmp6`: name and value per line).
fn snmp_counter(ns: &Netns, file: &str, name: &str) -> u64 {
    let text = ns.ok(&["cat", &format!("/proc/net/{file}")]);
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&name) {
            return words.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
        if let Some(at) = words.iter().position(|w| *w == name) {
            let values = lines
                .get(i + 1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>());
            return values
                .and_then(|v| v.get(at).and_then(|v| v.parse().ok()))
                .unwrap_or(0);
        }
    }
    0
}

/// `ping -c 10 -f -W 1` as the script runs it: every reply must come back.
fn flood_ping(from: &Side, to: &str) {
    let out = from
        .ns
        .cmd(&["ping", "-c", "10", "-f", "-W", "1", to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} flood ping {to}: {}",
        from.iface,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// UDP bytes the iperf3 receiver counted, from the client's JSON.
fn udp_received(json: &serde_json::Value) -> Option<u64> {
    let end = &json["end"];
    // iperf3 ≥ 3.11 reports the receiver's side apart; older ones in `sum`.
    let sum = if end["sum_received"].is_object() {
        &end["sum_received"]
    } else {
        &end["sum"]
    };
    let bytes = sum["bytes"].as_u64()?;
    let lost = sum["lost_packets"].as_u64().unwrap_or(0);
    let packets = sum["packets"].as_u64().unwrap_or(0);
    if end["sum_received"].is_object() || packets == 0 {
        return Some(bytes);
    }
    // `sum` holds what was sent; scale by what arrived.
    Some(bytes * packets.saturating_sub(lost) / packets)
}

/// A UDP flood (`-u -b 0`) of 256 MiB from `client` to `server_addr`; returns the
/// MiB the receiver got, which must be more than nothing.
fn iperf_udp(server: &Side, client: &Side, server_addr: &str) -> u64 {
    let srv = Proc::quiet({
        let mut c = server.ns.cmd(&["iperf3", "-s", "-1", "-B", server_addr]);
        c.die_with_parent();
        c
    });
    let args = [
        "iperf3",
        "-Z",
        "-u",
        "-b",
        "0",
        "-n",
        "256M",
        "-c",
        server_addr,
        "-J",
    ];
    let got = wait_until("a UDP iperf3 run", WAIT, || {
        let out = client.ns.cmd(&args).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let got = udp_received(&v);
        if got.is_none() {
            eprintln!("iperf3: {}", String::from_utf8_lossy(&out.stdout));
        }
        got
    });
    drop(srv);
    assert!(got > 0, "the UDP receiver at {server_addr} got nothing");
    got >> 20
}

#[test]
fn moved_interfaces_ping_tcp_udp_with_v4_v6_transport_and_34k_mtu() {
    let m = moved("u");
    let orig: u32 = 1420;
    let big = 34816 - 1500 + orig;
    for v6 in [false, true] {
        m.endpoints(v6);
        m.rounds(&format!("outer v6={v6}, MTU {orig}"));
        m.set_mtu(big);
        m.rounds(&format!("outer v6={v6}, MTU {big}"));
        m.set_mtu(orig);
    }
    // The UDP sockets stayed in ns0: the endpoints are its loopback.
    let eps = m.a.show("endpoints");
    assert!(eps.contains("[::1]:10002"), "{eps}");
    // Datagrams larger than the path: the kernel fragments them (as wireguard-go's).
    m.ns0.ok(&["ip", "link", "set", "lo", "mtu", "1500"]);
    m.set_mtu(big);
    for v6 in [false, true] {
        m.endpoints(v6);
        m.rounds(&format!("outer v6={v6} over a 1500-byte path, MTU {big}"));
    }
    for (file, counter) in [("snmp", "FragCreates"), ("snmp6", "Ip6FragCreates")] {
        let n = snmp_counter(&m.ns0, file, counter);
        assert!(
            n > 0,
            "no {counter} in ns0: the large datagrams were not fragmented"
        );
    }
}

#[test]
fn a_moved_interface_deleted_in_its_new_namespace_ends_the_process() {
    let m = moved("d");
    m.endpoints(false);
    pings(&m.a, &m.b.inner4);
    // `wg` in the interface's new namespace reaches the same socket.
    let port = m.a.show("listen-port");
    assert_eq!(port.trim(), "10001");
    let started = Instant::now();
    m.a.ns.ok(&["ip", "link", "del", &m.a.iface]);
    // A new process of the same name starts right after (as the script does), in
    // ns0, and can move too.
    let status = m
        .ns0
        .cmd(&[BIN, "wg", &m.a.iface])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "a second nexodus wg {}: {status}",
        m.a.iface
    );
    eprintln!("deleted and started again in {:?}", started.elapsed());
    m.ns0
        .ok(&["ip", "link", "set", &m.a.iface, "netns", &m.a.ns.name]);
    assert!(!m.a.show("listen-port").trim().is_empty());
}

#[test]
fn a_peer_with_a_larger_mtu_than_ours_is_heard() {
    let m = moved("p");
    m.endpoints(false);
    pings(&m.a, &m.b.inner4);
    // Only a goes to 34 KiB: b decrypts datagrams larger than its own MTU allows for
    // (written to its TUN as they are), and its replies come back in 1,420-byte pieces.
    let big = (34816 - 1500 + 1420).to_string();
    m.a.ns.ok(&["ip", "link", "set", &m.a.iface, "mtu", &big]);
    for to in [&m.b.inner4, &m.b.inner6] {
        wait_until("a 30,000-byte ping", WAIT, || {
            m.a.ns
                .try_run(&[
                    "ping", "-c", "1", "-W", "1", "-s", "30000", "-M", "dont", to,
                ])
                .then_some(())
        });
    }
}

// Source addresses and NAT (the `ws` tests): each peer is answered from the local
// address it wrote to, the source falls over when that address goes, and a peer
// behind a NAT with a 2 s conntrack timeout stays reachable by persistent keepalive.

/// Starts `nexodus wg ws{tag}{n}` in each of `nss` (their underlay already set up),
/// inner addresses 10.79.0.n/24 and fd79::n/64 (see [`wg_sides`]).
fn ws_sides(tag: &str, nss: [Netns; 2]) -> (Side, Side) {
    wg_sides(&format!("ws{tag}"), 79, nss)
}

/// Starts `nexodus wg {prefix}{n}` in each of `nss` (their underlay already set up):
/// keys, listen ports 1000n, inner addresses 10.{inner}.0.n/24 and fd{inner}::n/64,
/// and the other side as peer with its /32 and /128 (no endpoint).
fn wg_sides(prefix: &str, inner: u8, nss: [Netns; 2]) -> (Side, Side) {
    let keys = [genkey(), genkey()];
    let mut sides = Vec::new();
    for (i, ns) in nss.into_iter().enumerate() {
        let n = i + 1;
        let other = 2 - i;
        let iface = format!("{prefix}{n}");
        let status = ns
            .cmd(&[BIN, "wg", &iface])
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "nexodus wg {iface}: {status}");
        let (key, public) = keys[i].clone();
        let side = Side {
            inner4: format!("10.{inner}.0.{n}"),
            inner6: format!("fd{inner}::{n}"),
            iface,
            key,
            public,
            ns,
        };
        let keyfile = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(keyfile.path(), &side.key).unwrap();
        side.wg(&[
            "set",
            &side.iface,
            "private-key",
            keyfile.path().to_str().unwrap(),
            "listen-port",
            &format!("1000{n}"),
            "peer",
            &keys[other - 1].1,
            "allowed-ips",
            &format!("10.{inner}.0.{other}/32,fd{inner}::{other}/128"),
        ]);
        for addr in [format!("{}/24", side.inner4), format!("{}/64", side.inner6)] {
            side.ns
                .ok(&["ip", "addr", "add", &addr, "dev", &side.iface, "nodad"]);
        }
        side.ns.ok(&["ip", "link", "set", &side.iface, "up"]);
        sides.push(side);
    }
    let b = sides.pop().unwrap();
    let a = sides.pop().unwrap();
    (a, b)
}

/// Two namespaces `ws-TAG-1`/`-2` joined by a veth pair `wsv0` (no addresses yet;
/// IPv6 without duplicate address detection, promoted IPv4 secondaries).
fn ws_linked(tag: &str) -> [Netns; 2] {
    let a = Netns::new(&format!("ws-{tag}-1"));
    let b = Netns::new(&format!("ws-{tag}-2"));
    a.ok(&[
        "ip", "link", "add", "wsv0", "type", "veth", "peer", "name", "wsv0", "netns", &b.name,
    ]);
    for ns in [&a, &b] {
        ns.ok(&["sysctl", "-qw", "net.ipv6.conf.wsv0.accept_dad=0"]);
        ns.ok(&["sysctl", "-qw", "net.ipv4.conf.wsv0.promote_secondaries=1"]);
        ns.ok(&["ip", "link", "set", "wsv0", "up"]);
    }
    [a, b]
}

/// The endpoint `side` has for its one peer, as `wg show IF endpoints` prints it.
fn ws_endpoint(side: &Side) -> String {
    side.show("endpoints")
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Pings `to` from `from` until `other` sees `want` as `from`'s endpoint.
fn ws_until_endpoint(from: &Side, to: &str, other: &Side, want: &str) {
    wait_until(&format!("{} to see {want}", other.iface), WAIT, || {
        pings(from, to);
        (ws_endpoint(other) == want).then_some(())
    });
}

/// "Sticky but not too sticky" (wireguard-go's netns.sh): a answers b from the
/// address b knows; when a's address goes (a secondary of the same prefix takes
/// over), a's packets fall over to the new one at once and b roams to it.
#[test]
fn sticky_source_falls_over_when_the_address_goes() {
    let [n1, n2] = ws_linked("f");
    for (ns, n) in [(&n1, 1), (&n2, 2)] {
        ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("192.0.2.{n}/24"),
            "dev",
            "wsv0",
        ]);
        ns.ok(&[
            "ip",
            "addr",
            "add",
            &format!("2001:db8:5::{n}/64"),
            "dev",
            "wsv0",
        ]);
    }
    let (a, b) = ws_sides("f", [n1, n2]);
    for v6 in [false, true] {
        let (old, new, far, cidr) = if v6 {
            (
                "2001:db8:5::1",
                "2001:db8:5::10",
                "[2001:db8:5::2]:10002",
                "64",
            )
        } else {
            ("192.0.2.1", "192.0.2.10", "192.0.2.2:10002", "24")
        };
        let at = |ip: &str| {
            if v6 {
                format!("[{ip}]:10001")
            } else {
                format!("{ip}:10001")
            }
        };
        a.wg(&["set", &a.iface, "peer", &b.public, "endpoint", far]);
        ws_until_endpoint(&a, &b.inner4, &b, &at(old));
        let start = Instant::now();
        a.ns.ok(&["ip", "addr", "add", &format!("{new}/{cidr}"), "dev", "wsv0"]);
        a.ns.ok(&["ip", "addr", "del", &format!("{old}/{cidr}"), "dev", "wsv0"]);
        // The first packet after the change gets through: a's send from the
        // vanished source fails, and it goes again from the kernel's choice.
        assert!(
            a.ns.ping(&b.inner4) || a.ns.ping(&b.inner4),
            "no fall-over from {old}:\n{}",
            a.wg(&["show", &a.iface])
        );
        assert_eq!(ws_endpoint(&b), at(new));
        pings(&b, &a.inner6);
        eprintln!(
            "v6={v6}: fell over from {old} to {new} in {:?}",
            start.elapsed()
        );
    }
}

/// Reply-to-sender (wireguard-go's netns.sh): a has two addresses per family; b
/// writes to each in turn, and a answers from that one, so b's endpoint for a stays
/// where b put it (the kernel alone would answer from 192.0.2.1, and from
/// 2001:db8:5::2, the longest match towards 2001:db8:5::3).
#[test]
fn replies_leave_from_the_address_the_peer_wrote_to() {
    let [n1, n2] = ws_linked("r");
    for a in [
        "192.0.2.1/24",
        "192.0.2.2/24",
        "2001:db8:5::1/64",
        "2001:db8:5::2/64",
    ] {
        n1.ok(&["ip", "addr", "add", a, "dev", "wsv0"]);
    }
    for a in ["192.0.2.3/24", "2001:db8:5::3/64"] {
        n2.ok(&["ip", "addr", "add", a, "dev", "wsv0"]);
    }
    let (a, b) = ws_sides("r", [n1, n2]);
    for want in [
        "192.0.2.1:10001",
        "[2001:db8:5::1]:10001",
        "192.0.2.2:10001",
        "[2001:db8:5::2]:10001",
        "192.0.2.1:10001",
    ] {
        b.wg(&["set", &b.iface, "peer", &a.public, "endpoint", want]);
        pings(&b, &a.inner4);
        ws_until_endpoint(&b, &a.inner6, &b, want);
        // Several round trips later, still there.
        pings(&b, &a.inner4);
        pings(&a, &b.inner6);
        assert_eq!(ws_endpoint(&b), want);
    }
}

/// NAT (wireguard-go's netns.sh): a sits behind a router that source-NATs its LAN
/// (192.0.2.0/24) to 198.51.100.1 with UDP conntrack entries that expire after 2 s;
/// a keeps them alive with `persistent-keepalive 1`, b sees a at the NAT address and
/// still reaches it 3 s later.
#[test]
fn nat_with_persistent_keepalive_and_a_short_conntrack_timeout() {
    let n1 = Netns::new("ws-n-1");
    let router = Netns::new("ws-n-r");
    let n2 = Netns::new("ws-n-2");
    router.ok(&[
        "ip", "link", "add", "wsrc", "type", "veth", "peer", "name", "wsc", "netns", &n1.name,
    ]);
    router.ok(&[
        "ip", "link", "add", "wsrs", "type", "veth", "peer", "name", "wss", "netns", &n2.name,
    ]);
    router.ok(&["ip", "addr", "add", "192.0.2.1/24", "dev", "wsrc"]);
    router.ok(&["ip", "addr", "add", "198.51.100.1/24", "dev", "wsrs"]);
    n1.ok(&["ip", "addr", "add", "192.0.2.100/24", "dev", "wsc"]);
    n2.ok(&["ip", "addr", "add", "198.51.100.100/24", "dev", "wss"]);
    for (ns, dev) in [
        (&router, "wsrc"),
        (&router, "wsrs"),
        (&n1, "wsc"),
        (&n2, "wss"),
    ] {
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
    n1.ok(&["ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);
    router.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        rules.path(),
        "table ip wsnat {\n chain post {\n  type nat hook postrouting priority srcnat;\n  \
         ip saddr 192.0.2.0/24 ip daddr 198.51.100.0/24 snat to 198.51.100.1\n }\n}\n",
    )
    .unwrap();
    router.ok(&["nft", "-f", rules.path().to_str().unwrap()]);
    // Per namespace once conntrack runs in it (the NAT table above).
    for t in [
        "nf_conntrack_udp_timeout",
        "nf_conntrack_udp_timeout_stream",
    ] {
        router.ok(&[
            "sh",
            "-c",
            &format!("printf 2 > /proc/sys/net/netfilter/{t}"),
        ]);
    }
    let (a, b) = ws_sides("n", [n1, n2]);
    a.wg(&[
        "set",
        &a.iface,
        "peer",
        &b.public,
        "endpoint",
        "198.51.100.100:10002",
        "persistent-keepalive",
        "1",
    ]);
    pings(&a, &b.inner4);
    pings(&b, &a.inner4);
    pings(&b, &a.inner6);
    assert_eq!(ws_endpoint(&b), "198.51.100.1:10001");
    // Longer than the conntrack timeout: only a's keepalives keep the mapping (the
    // time passing is what is tested, so this is a fixed wait).
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        b.ns.ping_until(&a.inner4, Duration::from_secs(3)),
        "b lost a behind the NAT:\n{}",
        b.wg(&["show", &b.iface])
    );
    assert_eq!(ws_endpoint(&b), "198.51.100.1:10001");
}
