//! End-to-end: the access policy (DESIGN §7) with the real binary. Dual-stack nodes
//! `laptop-a` (group ops) and `db1`, and the v4-only `web1` (group web), each in its
//! own namespace (`nx-pl-*`, underlay 192.0.2.0/24). Allowed TCP and UDP flows over v4
//! and v6 connect and are answered (replies pass), denied ones do not and are counted
//! as `policy` drops; `icmp` lets ping through on both families; a `0.0.0.0/0` rule
//! opens v4 only; the policy reaches every node within a second; a bad file is
//! refused with the old policy still enforced; `policy clear` opens everything; an
//! IPv6 destination-options header does not carry a datagram past the policy. Probes
//! are the TCP and UDP echo servers and clients of `tests/common/probe.rs`. Also: a
//! subnet router's LAN and path MTU discovery, a relay-only spoke, and a stock
//! WireGuard device the relay filters for, under policy. Needs root.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::Deadline;
use common::cluster::{Cluster, Node, wait_until};
use common::probe::{
    DstOptsReceiver, EchoServer, TcpEcho, tcp_echo, tcp_echo_until, udp_answered, udp_send_dstopts,
};
use nexodus::join::status::Status;

/// How soon after `policy set` every node must enforce it.
const WITHIN: Duration = Duration::from_secs(1);
/// How long a probe that must not be answered is given (the tunnel is up: allowed
/// probes on the same path were answered just before).
const DENIED: Duration = Duration::from_millis(1500);
/// How long an allowed probe may take (first handshakes included).
const ALLOWED: Duration = Duration::from_secs(10);

const POLICY: &str = r#"[groups]
web = ["web*"]
ops = ["laptop*", "ops1"]

[[allow]]
from  = ["group:ops"]
to    = ["db*"]
proto = "tcp"
ports = ["5432", "8000-8099"]

[[allow]]
from  = ["group:ops"]
to    = ["db*"]
proto = "udp"
ports = ["5353"]

[[allow]]
from  = ["group:web"]
to    = ["db*"]
proto = "tcp"
ports = ["5432"]

[[allow]]
from  = ["*"]
to    = ["db*"]
proto = "icmp"

[[allow]]
from  = ["0.0.0.0/0"]
to    = ["db*"]
proto = "udp"
ports = ["7000"]
"#;

/// The same, with a second rule that does not validate (ports with icmp).
const BAD: &str = r#"[[allow]]
from = ["*"]
to   = ["*"]

[[allow]]
from  = ["*"]
to    = ["db*"]
proto = "icmp"
ports = ["1"]
"#;

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn v4(s: &Status) -> IpAddr {
    s.device.tunnel_ip.into()
}

fn v6(s: &Status) -> IpAddr {
    s.device.tunnel_ip_v6.expect("a v6 tunnel address").into()
}

fn policy_drops(n: &Node) -> u64 {
    n.current().drops.get("policy").copied().unwrap_or(0)
}

/// The policy revision each node enforces (None: none).
fn revisions(w: &Cluster) -> Vec<Option<i64>> {
    w.nodes
        .iter()
        .map(|n| n.status().and_then(|s| s.policy).map(|p| p.revision))
        .collect()
}

/// Waits until every node enforces `revision` (None: no policy); returns how long it
/// took from `since`.
fn wait_revision(w: &Cluster, revision: Option<i64>, since: Instant, bound: Duration) -> Duration {
    wait_until(
        &format!("every node to enforce policy revision {revision:?}"),
        bound,
        || revisions(w).iter().all(|r| *r == revision).then_some(()),
    );
    since.elapsed()
}

/// One probe: a name for messages and whether it was answered.
type Probe<'a> = (String, Box<dyn Fn(Duration) -> bool + Send + Sync + 'a>);

fn tcp<'a>(from: &'a Node, to: SocketAddr) -> Probe<'a> {
    (
        format!("tcp {} -> {to}", from.name),
        Box::new(move |limit| {
            if limit > DENIED {
                tcp_echo_until(&from.ns, to, 1000, limit).is_ok()
            } else {
                tcp_echo(&from.ns, to, 1000, limit).is_ok()
            }
        }),
    )
}

fn udp<'a>(from: &'a Node, to: SocketAddr) -> Probe<'a> {
    (
        format!("udp {} -> {to}", from.name),
        Box::new(move |limit| udp_answered(&from.ns, to, limit)),
    )
}

fn ping<'a>(from: &'a Node, to: IpAddr) -> Probe<'a> {
    (
        format!("ping {} -> {to}", from.name),
        Box::new(move |limit| from.ns.ping_until(&to.to_string(), limit)),
    )
}

/// Runs the probes in parallel, each given `limit`; fails the test naming every
/// probe whose outcome is not `answered`.
fn expect(probes: &[Probe<'_>], answered: bool, limit: Duration) {
    let wrong: Vec<&str> = std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|(name, f)| s.spawn(move || (name.as_str(), f(limit))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&(_, got)| got != answered)
            .map(|(name, _)| name)
            .collect()
    });
    let what = if answered {
        "not answered"
    } else {
        "answered though denied"
    };
    assert!(wrong.is_empty(), "{what}: {wrong:?}");
}

#[allow(dead_code)]
struct World {
    w: Cluster,
    a: Status,
    b: Status,
    c: Status,
}

/// laptop-a and db1 dual-stack, web1 v4-only; all peered.
fn world(tag: &str, deadline: Deadline) -> World {
    let mut w = Cluster::new(tag, "192.0.2.1/24");
    let a = w.add_node("laptop-a", "192.0.2.2/24", true, &[]);
    let b = w.add_node("db1", "192.0.2.3/24", true, &[]);
    let c = w.add_node("web1", "192.0.2.4/24", false, &[]);
    w.start_all();
    let mut st = Vec::new();
    for i in [a, b, c] {
        st.push(w.nodes[i].wait_peer_count(2, deadline.left(Duration::from_secs(40))));
    }
    let c = st.pop().unwrap();
    let b = st.pop().unwrap();
    let a = st.pop().unwrap();
    assert!(c.device.tunnel_ip_v6.is_none(), "web1 is v4-only");
    World { w, a, b, c }
}

#[test]
fn policy_allows_exactly_what_it_says_for_both_families() {
    let deadline = Deadline::after(Duration::from_secs(240));
    let World { w, a, b, .. } = world("pl", deadline);
    let (na, nb, nc) = (&w.nodes[0], &w.nodes[1], &w.nodes[2]);
    let any6: IpAddr = "::".parse().unwrap();
    let on = |ports: &[u16]| -> Vec<SocketAddr> { ports.iter().map(|&p| sa(any6, p)).collect() };
    let _db_tcp = TcpEcho::start(&nb.ns, &on(&[5432, 8050, 8100, 22]));
    let _db_udp = EchoServer::start(&nb.ns, &["[::]:5353", "[::]:5354", "[::]:7000"]);
    let _laptop_tcp = TcpEcho::start(&na.ns, &on(&[5432]));
    let _laptop_udp = EchoServer::start(&na.ns, &["[::]:5353"]);

    let (b4, b6, a4, a6) = (v4(&b), v6(&b), v4(&a), v6(&a));
    // What the policy will allow, and what it will deny.
    let allowed = || {
        vec![
            tcp(na, sa(b4, 5432)),
            tcp(na, sa(b6, 5432)),
            tcp(na, sa(b4, 8050)),
            tcp(na, sa(b6, 8050)),
            udp(na, sa(b4, 5353)),
            udp(na, sa(b6, 5353)),
            udp(na, sa(b4, 7000)),
            tcp(nc, sa(b4, 5432)),
            ping(na, b4),
            ping(na, b6),
            ping(nc, b4),
        ]
    };
    let denied = || {
        vec![
            tcp(na, sa(b4, 22)),
            tcp(na, sa(b6, 22)),
            tcp(na, sa(b4, 8100)),
            tcp(na, sa(b6, 8100)),
            udp(na, sa(b4, 5354)),
            udp(na, sa(b6, 5354)),
            // 0.0.0.0/0 does not match IPv6.
            udp(na, sa(b6, 7000)),
            tcp(nc, sa(b4, 8050)),
            // Nothing may start a flow into laptop-a.
            tcp(nb, sa(a4, 5432)),
            tcp(nb, sa(a6, 5432)),
            udp(nb, sa(a4, 5353)),
            udp(nb, sa(a6, 5353)),
            ping(nb, a4),
            ping(nb, a6),
        ]
    };

    // No policy: everything answers (the probes can succeed).
    expect(&allowed(), true, deadline.left(ALLOWED));
    expect(&denied(), true, deadline.left(ALLOWED));
    assert_eq!(revisions(&w), vec![None, None, None]);

    // The policy: every node enforces it within a second.
    let dir = w.scratch("policy");
    let file = dir.join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let out = w.coord.admin(&["policy", "set", file.to_str().unwrap()]);
    let since = Instant::now();
    let revision: i64 = out.trim().parse().unwrap_or_else(|e| panic!("{out}: {e}"));
    let took = wait_revision(
        &w,
        Some(revision),
        since,
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("policy revision {revision} in force on every node {took:?} after `policy set`");
    assert!(
        took <= WITHIN,
        "the policy took {took:?} to reach every node"
    );
    let rules = |n: &Node| n.current().policy.unwrap().rules;
    assert_eq!(rules(na), 0, "no rule lets anything into laptop-a");
    assert_eq!(rules(nc), 0, "no rule lets anything into web1");
    assert!(rules(nb) > 0, "db1 has inbound rules");
    let text = nb.status_text();
    assert!(
        text.contains(&format!("access policy: revision {revision}")),
        "{text}"
    );

    let drops_before = (policy_drops(na), policy_drops(nb));
    expect(&allowed(), true, deadline.left(ALLOWED));
    expect(&denied(), false, DENIED);
    let drops_after = (policy_drops(na), policy_drops(nb));
    eprintln!("policy drops (laptop-a, db1): {drops_before:?} -> {drops_after:?}");
    assert!(
        drops_after.0 > drops_before.0,
        "laptop-a counted no policy drop"
    );
    assert!(drops_after.1 > drops_before.1, "db1 counted no policy drop");

    // A file that does not validate: refused naming the rule; the old policy stays.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, BAD).unwrap();
    let err = w
        .coord
        .admin_result(&["policy", "set", bad.to_str().unwrap()])
        .unwrap_err();
    assert!(
        err.contains("allow rule 2"),
        "error does not name the rule: {err}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&w.coord.admin(&["policy", "show", "--json"])).unwrap();
    assert_eq!(shown["revision"], revision, "{shown}");
    // Given the hub's poll interval to act on anything the refusal might have changed.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(revisions(&w), vec![Some(revision); 3]);
    expect(&denied(), false, DENIED);
    expect(&allowed()[..2], true, deadline.left(ALLOWED));

    // A new policy without the udp 5353 rule: a live flow it forbids stops within a
    // second (the same socket, still sending every 50 ms).
    let sock = common::probe::udp_socket(&na.ns, sa("0.0.0.0".parse().unwrap(), 0));
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let to = sa(b4, 5353);
    let mut buf = [0u8; 256];
    let mut ask = || {
        let _ = sock.send_to(b"live", to);
        matches!(sock.recv_from(&mut buf), Ok((_, src)) if src == to)
    };
    wait_until(
        "the live udp flow to be answered",
        deadline.left(ALLOWED),
        || ask().then_some(()),
    );
    let narrower = POLICY.replace("ports = [\"5353\"]", "ports = [\"5399\"]");
    assert_ne!(narrower, POLICY);
    let file2 = dir.join("narrower.toml");
    std::fs::write(&file2, narrower).unwrap();
    w.coord.admin(&["policy", "set", file2.to_str().unwrap()]);
    let since = Instant::now();
    let mut last = None;
    while since.elapsed() < Duration::from_secs(3) {
        if ask() {
            last = Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("a live flow the new policy forbids answered last {last:?} after `policy set`");
    assert!(
        last.is_none_or(|t| t <= WITHIN),
        "the forbidden flow went on for {last:?}"
    );
    assert!(
        revisions(&w).iter().all(|r| *r > Some(revision)),
        "{:?}",
        revisions(&w)
    );

    // Cleared: everything answers again.
    w.coord.admin(&["policy", "clear"]);
    let since = Instant::now();
    let took = wait_revision(&w, None, since, deadline.left(Duration::from_secs(10)));
    eprintln!("policy clear in force on every node {took:?} after `policy clear`");
    assert!(
        took <= WITHIN,
        "the clear took {took:?} to reach every node"
    );
    expect(&denied(), true, deadline.left(ALLOWED));
    expect(&allowed(), true, deadline.left(ALLOWED));
    deadline.check("policy e2e");
}

/// A UDP datagram behind an IPv6 destination-options header is matched on its real
/// protocol and port: to an allowed port it arrives (with the header), to a denied
/// one it does not.
#[test]
fn ipv6_extension_headers_do_not_pass_a_denied_port() {
    let deadline = Deadline::after(Duration::from_secs(150));
    let World { w, b, .. } = world("plx", deadline);
    let (na, nb) = (&w.nodes[0], &w.nodes[1]);
    let b6 = v6(&b);
    let open = DstOptsReceiver::bind(&nb.ns, sa("::".parse().unwrap(), 5353));
    let shut = DstOptsReceiver::bind(&nb.ns, sa("::".parse().unwrap(), 5354));

    // No policy: both ports get the datagram, with its header.
    let send = |port: u16, what: &[u8]| udp_send_dstopts(&na.ns, sa(b6, port), what, 1);
    let got = wait_until(
        "a datagram on 5354 without policy",
        Duration::from_secs(10),
        || {
            send(5354, b"before");
            shut.recv(Duration::from_millis(200))
        },
    );
    assert!(
        got.1,
        "the destination-options header did not arrive: {got:?}"
    );

    let file = w.scratch("policy").join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let out = w.coord.admin(&["policy", "set", file.to_str().unwrap()]);
    let revision: i64 = out.trim().parse().unwrap();
    wait_revision(
        &w,
        Some(revision),
        Instant::now(),
        deadline.left(Duration::from_secs(10)),
    );
    // Drain what arrived before.
    while shut.recv(Duration::from_millis(100)).is_some() {}
    while open.recv(Duration::from_millis(100)).is_some() {}

    let got = wait_until(
        "a datagram on the allowed port",
        deadline.left(ALLOWED),
        || {
            send(5353, b"allowed");
            open.recv(Duration::from_millis(200))
        },
    );
    assert_eq!(
        got,
        (b"allowed".to_vec(), true),
        "allowed port behind a header"
    );

    let drops = policy_drops(nb);
    udp_send_dstopts(&na.ns, sa(b6, 5354), b"denied", 10);
    let got = shut.recv(DENIED);
    assert_eq!(got, None, "a denied port got a datagram behind a header");
    assert!(policy_drops(nb) >= drops + 10, "the drops were not counted");
}

const LAN_V4: &str = "198.51.100.0/24";
const LAN_V6: &str = "2001:db8:100::/64";
const ADVERTISE: &str = "198.51.100.0/24,2001:db8:100::/64";
const LAN_HOST_V4: &str = "198.51.100.10";
const LAN_HOST_V6: &str = "2001:db8:100::10";
/// The router's side of the LAN link: smaller than what the tunnel carries, so
/// that the router must send Packet Too Big for full-sized segments from the mesh.
const LAN_MTU: &str = "1280";

const LAN_POLICY: &str = r#"[groups]
ops = ["laptop*"]

[[allow]]
from  = ["group:ops"]
to    = ["198.51.100.0/24", "2001:db8:100::/64"]
proto = "tcp"
ports = ["5432"]
"#;

/// Gives node `router` a LAN: `lan0` (198.51.100.1/24, 2001:db8:100::1/64, MTU
/// [`LAN_MTU`]) to a host `nx-<tag>-lanh` (198.51.100.10/24, 2001:db8:100::10/64,
/// MTU 1500 on its side) routing the mesh prefixes back via the router.
fn lan_site(w: &mut Cluster, router: usize, deadline: Deadline) -> usize {
    let host = w.lan.netns("lanh");
    let r = &w.nodes[router].ns;
    r.ok(&[
        "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &host.name,
    ]);
    r.ok(&["ip", "link", "set", "lan0", "mtu", LAN_MTU]);
    r.ok(&["sysctl", "-qw", "net.ipv6.conf.lan0.accept_dad=0"]);
    host.ok(&["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
    for (ns, dev, v4, v6) in [
        (r, "lan0", "198.51.100.1", "2001:db8:100::1"),
        (&host, "eth0", LAN_HOST_V4, LAN_HOST_V6),
    ] {
        ns.ok(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
        ns.ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            dev,
            "nodad",
        ]);
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
    host.ok(&["ip", "route", "add", "100.64.0.0/10", "via", "198.51.100.1"]);
    host.ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "200::/64",
        "via",
        "2001:db8:100::1",
    ]);
    assert!(r.ping_until(LAN_HOST_V4, deadline.left(Duration::from_secs(10))));
    assert!(r.ping_until(LAN_HOST_V6, deadline.left(Duration::from_secs(10))));
    w.aux.push(host);
    w.aux.len() - 1
}

/// A subnet router enforces the policy for its LAN (a CIDR `to` rule: the LAN
/// host's allowed port answers over v4 and v6, other ports and the router itself do
/// not), and path MTU discovery works through an allowed v6 flow: the router's
/// Packet Too Big reaches the sender through its filter and a bulk transfer
/// completes.
#[test]
fn subnet_lan_under_policy_and_path_mtu_discovery() {
    let deadline = Deadline::after(Duration::from_secs(200));
    let mut w = Cluster::new("pls", "192.0.2.1/24");
    let a = w.add_node("laptop-a", "192.0.2.2/24", true, &[]);
    let r = w.add_node("router1", "192.0.2.3/24", true, &[]);
    let lanh = lan_site(&mut w, r, deadline);
    w.start_with(r, &["--advertise-cidr", ADVERTISE]);
    w.approve_routes(r, ADVERTISE);
    w.start(a);
    let rs = w.nodes[r].wait_peer_count(1, deadline.left(Duration::from_secs(40)));
    w.nodes[a].wait_routes(
        "routes to the LAN",
        deadline.left(Duration::from_secs(40)),
        |v4, v6| {
            v4.contains(&format!("{LAN_V4} dev nx0")) && v6.contains(&format!("{LAN_V6} dev nx0"))
        },
    );
    let host = &w.aux[lanh];
    let any6: IpAddr = "::".parse().unwrap();
    let _lan_tcp = TcpEcho::start(host, &[sa(any6, 5432), sa(any6, 22)]);
    let _lan_udp = EchoServer::start(host, &["[::]:5353"]);
    let _router_tcp = TcpEcho::start(&w.nodes[r].ns, &[sa(any6, 5432)]);
    let (l4, l6): (IpAddr, IpAddr) = (LAN_HOST_V4.parse().unwrap(), LAN_HOST_V6.parse().unwrap());
    let na = &w.nodes[a];
    let allowed = || vec![tcp(na, sa(l4, 5432)), tcp(na, sa(l6, 5432))];
    let denied = || {
        vec![
            tcp(na, sa(l4, 22)),
            tcp(na, sa(l6, 22)),
            udp(na, sa(l4, 5353)),
            udp(na, sa(l6, 5353)),
            tcp(na, sa(v4(&rs), 5432)),
            tcp(na, sa(v6(&rs), 5432)),
        ]
    };
    expect(&allowed(), true, deadline.left(ALLOWED));
    expect(&denied(), true, deadline.left(ALLOWED));

    let file = w.scratch("policy").join("policy.toml");
    std::fs::write(&file, LAN_POLICY).unwrap();
    let out = w.coord.admin(&["policy", "set", file.to_str().unwrap()]);
    let revision: i64 = out.trim().parse().unwrap();
    let took = wait_revision(
        &w,
        Some(revision),
        Instant::now(),
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("policy in force on every node {took:?} after `policy set`");
    let drops = policy_drops(&w.nodes[r]);
    expect(&allowed(), true, deadline.left(ALLOWED));
    expect(&denied(), false, DENIED);
    assert!(
        policy_drops(&w.nodes[r]) > drops,
        "the router counted no policy drop"
    );

    // Full-sized segments over v6 do not fit the LAN link: the router answers with
    // Packet Too Big, which must pass laptop-a's filter as an error about a live flow.
    let na = &w.nodes[a];
    let mtu_learned = || {
        na.ns
            .ok(&["ip", "-6", "route", "get", LAN_HOST_V6])
            .contains("mtu 1280")
    };
    assert!(
        !mtu_learned(),
        "a path MTU is known before any large packet"
    );
    let started = Instant::now();
    tcp_echo_until(
        &na.ns,
        sa(l6, 5432),
        256 * 1024,
        deadline.left(Duration::from_secs(20)),
    )
    .unwrap_or_else(|e| panic!("bulk transfer over v6 through the router: {e}"));
    eprintln!(
        "256 KiB echoed over v6 through a 1280-byte link in {:?}",
        started.elapsed()
    );
    assert!(
        mtu_learned(),
        "laptop-a learned no path MTU: no Packet Too Big arrived"
    );
    deadline.check("subnet policy e2e");
}

/// A spoke reached only through the relay (`--relay-only`) enforces the policy on
/// what the relay forwards to it, over v4 and v6, and the relay (with a policy that
/// lets nothing into itself) still forwards the allowed flows and their replies.
#[test]
fn relayed_spoke_under_policy() {
    let deadline = Deadline::after(Duration::from_secs(200));
    let mut w = Cluster::new("plr", "192.0.2.1/24");
    let a = w.add_node("laptop-a", "192.0.2.2/24", true, &[]);
    let s = w.add_node("db-spoke", "192.0.2.3/24", true, &[]);
    let r = w.add_relay("relay1", "192.0.2.4/24", "nx0");
    w.start(r);
    w.start(a);
    w.start_with(s, &["--relay-only"]);
    let ss = w.nodes[s].wait_status(
        "the relay as its only peer",
        deadline.left(Duration::from_secs(40)),
        |st| st.peers.len() == 1 && st.peers[0].hostname == "relay1",
    );
    let sa_ = w.nodes[a].wait_status(
        "db-spoke reached through the relay",
        deadline.left(Duration::from_secs(40)),
        |st| {
            st.peers
                .iter()
                .any(|p| p.hostname == "db-spoke" && p.path == "relay")
        },
    );
    let (na, ns) = (&w.nodes[a], &w.nodes[s]);
    let any6: IpAddr = "::".parse().unwrap();
    let _db_tcp = TcpEcho::start(&ns.ns, &[sa(any6, 5432), sa(any6, 22)]);
    let _laptop_tcp = TcpEcho::start(&na.ns, &[sa(any6, 5432)]);
    let allowed = || {
        vec![
            tcp(na, sa(v4(&ss), 5432)),
            tcp(na, sa(v6(&ss), 5432)),
            ping(na, v4(&ss)),
            ping(na, v6(&ss)),
        ]
    };
    let denied = || {
        vec![
            tcp(na, sa(v4(&ss), 22)),
            tcp(na, sa(v6(&ss), 22)),
            tcp(ns, sa(v4(&sa_), 5432)),
            tcp(ns, sa(v6(&sa_), 5432)),
        ]
    };
    expect(&allowed(), true, deadline.left(ALLOWED));
    expect(&denied(), true, deadline.left(ALLOWED));

    let file = w.scratch("policy").join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let out = w.coord.admin(&["policy", "set", file.to_str().unwrap()]);
    let revision: i64 = out.trim().parse().unwrap();
    let took = wait_revision(
        &w,
        Some(revision),
        Instant::now(),
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("policy in force on every node {took:?} after `policy set`");
    let relayed = w.nodes[r].current().relayed_packets;
    let drops = policy_drops(&w.nodes[s]);
    expect(&allowed(), true, deadline.left(ALLOWED));
    expect(&denied(), false, DENIED);
    assert!(
        policy_drops(&w.nodes[s]) > drops,
        "the spoke counted no policy drop"
    );
    assert!(
        w.nodes[r].current().relayed_packets > relayed,
        "the allowed flows did not go through the relay"
    );
    deadline.check("relayed spoke policy e2e");
}

const STOCK_POLICY: &str = r#"[groups]
ops = ["laptop*"]

[[allow]]
from  = ["group:ops"]
to    = ["stock"]
proto = "tcp"
ports = ["5432"]

[[allow]]
from  = ["stock"]
to    = ["group:ops"]
proto = "udp"
ports = ["5353"]
"#;

/// A stock WireGuard device cannot enforce: the relay enforces its inbound table on
/// what it forwards to it (v4 and v6), and the device's own flows get their replies.
#[test]
fn relay_filters_for_a_stock_wireguard_device() {
    let deadline = Deadline::after(Duration::from_secs(200));
    let mut w = Cluster::new("plw", "192.0.2.1/24");
    let r = w.add_relay("relay1", "192.0.2.2/24", "plwr0");
    let a = w.add_node("laptop-a", "192.0.2.3/24", true, &["--interface", "plwa0"]);
    w.start(r);
    w.start(a);
    w.nodes[a].wait_peer_count(1, deadline.left(Duration::from_secs(40)));
    let (_config, stock, _wggo) = common::stock::stock_host(
        &mut w,
        "192.0.2.9/24",
        "plws0",
        deadline.left(Duration::from_secs(10)),
    );
    let sa_ = w.nodes[a].wait_status(
        "the stock device through the relay",
        deadline.left(Duration::from_secs(30)),
        |s| {
            s.peers
                .iter()
                .any(|p| p.hostname == "stock" && p.path == "relay")
        },
    );
    let sp = sa_.peers.iter().find(|p| p.hostname == "stock").unwrap();
    let (s4, s6): (IpAddr, IpAddr) = (sp.tunnel_ip.into(), sp.tunnel_ip_v6.unwrap().into());
    let any6: IpAddr = "::".parse().unwrap();
    let _stock_tcp = TcpEcho::start(&stock, &[sa(any6, 5432), sa(any6, 22)]);
    let _laptop_udp = EchoServer::start(&w.nodes[a].ns, &["[::]:5353"]);
    let na = &w.nodes[a];
    let from_stock = |to: SocketAddr| -> Probe<'_> {
        let ns = &stock;
        (
            format!("udp stock -> {to}"),
            Box::new(move |limit| udp_answered(ns, to, limit)),
        )
    };
    let allowed = || {
        vec![
            tcp(na, sa(s4, 5432)),
            tcp(na, sa(s6, 5432)),
            from_stock(sa(v4(&sa_), 5353)),
            from_stock(sa(v6(&sa_), 5353)),
        ]
    };
    let denied = || {
        vec![
            tcp(na, sa(s4, 22)),
            tcp(na, sa(s6, 22)),
            ping(na, s4),
            ping(na, s6),
        ]
    };
    expect(&allowed(), true, deadline.left(Duration::from_secs(30)));
    expect(&denied(), true, deadline.left(ALLOWED));

    let file = w.scratch("policy").join("policy.toml");
    std::fs::write(&file, STOCK_POLICY).unwrap();
    let out = w.coord.admin(&["policy", "set", file.to_str().unwrap()]);
    let revision: i64 = out.trim().parse().unwrap();
    let took = wait_revision(
        &w,
        Some(revision),
        Instant::now(),
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("policy in force on every node {took:?} after `policy set`");
    let shown = w.nodes[r].current().policy.unwrap();
    assert_eq!(shown.relay_enforced, 1, "{shown:?}");
    let drops = policy_drops(&w.nodes[r]);
    expect(&allowed(), true, deadline.left(ALLOWED));
    expect(&denied(), false, DENIED);
    assert!(
        policy_drops(&w.nodes[r]) > drops,
        "the relay counted no policy drop"
    );
    deadline.check("stock device policy e2e");
}
