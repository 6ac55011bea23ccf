//! End-to-end: the access policy (DESIGN §7) with the real binary. Dual-stack nodes
//! `laptop-a` (group ops) and `db1`, and the v4-only `web1` (group web), each in its
//! own namespace (`nx-pl-*`, underlay 192.0.2.0/24). Allowed TCP and UDP flows over v4
//! and v6 connect and are answered (replies pass), denied ones do not and are counted
//! as `policy` drops; `icmp` lets ping through on both families; a `0.0.0.0/0` rule
//! opens v4 only; the policy reaches every node within a second; a bad file is
//! refused with the old policy still enforced; `policy clear` opens everything; an
//! IPv6 destination-options header does not carry a datagram past the policy. Probes
//! are the TCP and UDP echo servers and clients of `tests/common/probe.rs`. Needs root.
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
