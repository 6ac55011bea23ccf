//! End-to-end: what a device claims takes effect only once approved (DESIGN §13).
//! An advertised prefix (v4 and v6) is installed by no peer until `nexodus devices
//! approve`, then by every peer within a second, and by none after `devices revoke`;
//! the policy file's `[approve]` section approves in advance; an unapproved relay
//! with the lowest id is never chosen. Namespaces `nx-ap-*`, underlay 203.0.113.0/24;
//! the advertised prefixes 198.51.100.0/24 and 2001:db8:100::/64 exist nowhere (only
//! routes are looked at). Needs root.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, Node, has_peers};
use common::{Deadline, wait_until};
use ipnet::IpNet;
use nexodus::join::status::Status;

const ADVERTISE: &str = "198.51.100.0/24,2001:db8:100::/64";
const LAN_V4: &str = "198.51.100.0/24";
const LAN_V6: &str = "2001:db8:100::/64";
/// How soon after an approval or revocation every node must have followed.
const WITHIN: Duration = Duration::from_secs(1);

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// True when `routes` (`ip route` output) routes `prefix` into the tunnel.
fn routed(routes: &str, prefix: &str) -> bool {
    let want = format!("{prefix} dev nx0");
    routes
        .lines()
        .any(|l| l == want || l.starts_with(&format!("{want} ")))
}

fn has_lan_routes(node: &Node) -> (bool, bool) {
    let (v4, v6) = node.routes();
    (routed(&v4, LAN_V4), routed(&v6, LAN_V6))
}

/// No peer of `s` carries either prefix.
fn nobody_carries(s: &Status) -> bool {
    s.peers
        .iter()
        .all(|p| !p.allowed_ips.contains(&net(LAN_V4)) && !p.allowed_ips.contains(&net(LAN_V6)))
}

/// Waits (at most `bound` from `since`) until every node in `nodes` has (`want`) or
/// lacks both LAN routes; returns how long it took.
fn wait_all(w: &Cluster, nodes: &[usize], want: bool, since: Instant, bound: Duration) -> Duration {
    let what = if want { "install" } else { "remove" };
    wait_until(
        &format!("every node to {what} the LAN routes"),
        bound.saturating_sub(since.elapsed()),
        || {
            nodes
                .iter()
                .all(|&i| has_lan_routes(&w.nodes[i]) == (want, want))
                .then_some(())
        },
    );
    since.elapsed()
}

/// The admin's JSON view of device `hostname`.
fn admin_view(w: &Cluster, hostname: &str) -> serde_json::Value {
    let json = w.coord.admin(&["devices", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    all.into_iter()
        .find(|d| d["hostname"] == hostname)
        .unwrap_or_else(|| panic!("{hostname} not listed: {json}"))
}

/// The router (advertising both prefixes) and two peers, all running and peered.
fn world(tag: &str, router_name: &str, deadline: Deadline) -> (Cluster, usize, [usize; 2]) {
    let mut w = Cluster::new(tag, "203.0.113.1/24");
    let router = w.add_node(router_name, "203.0.113.3/24", true, &[]);
    let a = w.add_node("a", "203.0.113.4/24", true, &[]);
    let b = w.add_node("b", "203.0.113.5/24", true, &[]);
    w.start_with(router, &["--advertise-cidr", ADVERTISE]);
    w.start(a);
    w.start(b);
    for i in [a, b] {
        w.nodes[i].wait_status(
            "both peers listed",
            deadline.left(Duration::from_secs(40)),
            |s| has_peers(s, &[router_name]) && s.peers.len() == 2,
        );
    }
    (w, router, [a, b])
}

/// Unapproved prefixes are installed nowhere; once approved, everywhere within a
/// second; once revoked, nowhere within a second.
#[test]
fn approve_and_revoke_routes() {
    let deadline = Deadline::after(Duration::from_secs(120));
    let (w, router, peers) = world("ap-r", "gw", deadline);

    // Pending: the coordinator keeps the claim, shows it pending, tells no one.
    let view = admin_view(&w, "gw");
    assert_eq!(
        view["pending"]["routes"],
        serde_json::json!([LAN_V4, LAN_V6]),
        "{view}"
    );
    assert_eq!(view["in_effect"]["routes"], serde_json::json!([]), "{view}");
    let listed = w.coord.admin(&["devices"]);
    assert!(
        listed.contains(&format!("{LAN_V4},{LAN_V6}")),
        "pending prefixes not shown: {listed}"
    );
    for &i in &peers {
        let s = w.nodes[i].current();
        assert!(
            nobody_carries(&s),
            "{}: unapproved prefix carried: {:?}",
            w.nodes[i].name,
            s.peers
        );
        assert_eq!(
            has_lan_routes(&w.nodes[i]),
            (false, false),
            "{}: unapproved prefix routed",
            w.nodes[i].name
        );
    }

    // Approved: every peer installs both within a second.
    w.approve_routes(router, ADVERTISE);
    let since = Instant::now();
    let took = wait_all(
        &w,
        &peers,
        true,
        since,
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("approval reached every node in {took:?}");
    assert!(took <= WITHIN, "approval took {took:?} to reach every node");
    let view = admin_view(&w, "gw");
    assert_eq!(view["pending"]["routes"], serde_json::json!([]), "{view}");
    assert_eq!(
        view["approved"]["routes"],
        serde_json::json!([LAN_V4, LAN_V6]),
        "{view}"
    );

    // Revoked: gone everywhere within a second.
    w.revoke(router, &[]);
    let since = Instant::now();
    let took = wait_all(
        &w,
        &peers,
        false,
        since,
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("revocation reached every node in {took:?}");
    assert!(
        took <= WITHIN,
        "revocation took {took:?} to reach every node"
    );
    for &i in &peers {
        let s = w.nodes[i].current();
        assert!(
            nobody_carries(&s),
            "{}: revoked prefix still carried: {:?}",
            w.nodes[i].name,
            s.peers
        );
    }

    // Refusals: an unknown device, a prefix with host bits.
    let err = w
        .coord
        .admin_result(&["devices", "approve", "9999", "--routes", LAN_V4])
        .unwrap_err();
    assert!(err.contains("device 9999 not found"), "{err}");
    let id = w.coord.device_id("gw").to_string();
    let err = w
        .coord
        .admin_result(&["devices", "approve", &id, "--routes", "198.51.100.1/24"])
        .unwrap_err();
    assert!(err.contains("198.51.100.0/24"), "{err}");
    w.coord.admin(&[
        "org",
        "create",
        "lab",
        "--cidr",
        "100.100.0.0/16",
        "--cidr-v6",
        "fd00:1::/64",
    ]);
    let err = w
        .coord
        .admin_result(&["devices", "approve", &id, "--relay", "--org", "lab"])
        .unwrap_err();
    assert!(err.contains("not in organization \"lab\""), "{err}");
    assert_eq!(admin_view(&w, "gw")["approved"], serde_json::Value::Null);
}

/// The policy's `[approve]` section approves in advance, by hostname; clearing the
/// policy takes it back.
#[test]
fn policy_approves_in_advance() {
    let deadline = Deadline::after(Duration::from_secs(120));
    let (w, _router, peers) = world("ap-p", "router1", deadline);
    for &i in &peers {
        assert_eq!(has_lan_routes(&w.nodes[i]), (false, false));
    }
    let file = w.scratch("policy").join("policy.toml");
    std::fs::write(
        &file,
        "[approve]\nroutes = [{ cidr = \"198.51.100.0/23\", by = [\"router*\"] },\n          { cidr = \"2001:db8:100::/48\", by = [\"router*\"] }]\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    // A file that does not validate is refused; nothing changes.
    let bad = w.scratch("policy").join("bad.toml");
    std::fs::write(&bad, "[[allow]]\nfrom = [\"group:nope\"]\nto = [\"*\"]\n").unwrap();
    let err = w
        .coord
        .admin_result(&["policy", "set", bad.to_str().unwrap()])
        .unwrap_err();
    assert!(err.contains("nope"), "{err}");

    let out = w.coord.admin(&["policy", "set", file]);
    let since = Instant::now();
    assert_eq!(out.trim(), "1", "policy set prints its revision");
    let took = wait_all(
        &w,
        &peers,
        true,
        since,
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("policy approval reached every node in {took:?}");
    assert!(took <= WITHIN, "policy approval took {took:?}");
    let shown: serde_json::Value =
        serde_json::from_str(&w.coord.admin(&["policy", "show", "--json"])).unwrap();
    assert_eq!(shown["revision"], 1, "{shown}");
    assert!(
        shown["text"].as_str().unwrap().contains("router*"),
        "{shown}"
    );
    let view = admin_view(&w, "router1");
    assert_eq!(
        view["in_effect"]["routes"],
        serde_json::json!([LAN_V4, LAN_V6]),
        "{view}"
    );
    assert_eq!(
        view["approved"],
        serde_json::Value::Null,
        "not the admin's: {view}"
    );

    let out = w.coord.admin(&["policy", "clear"]);
    let since = Instant::now();
    assert!(out.contains("cleared"), "{out}");
    let took = wait_all(
        &w,
        &peers,
        false,
        since,
        deadline.left(Duration::from_secs(10)),
    );
    eprintln!("policy clear reached every node in {took:?}");
    assert!(took <= WITHIN, "policy clear took {took:?}");
}

/// An unapproved relay with the lowest id is never chosen: the relay-only spoke peers
/// with the approved one only, its traffic goes through it (its relayed counters move,
/// the unapproved one's stay 0), and the unapproved relay itself reaches the spoke
/// through the approved one too.
#[test]
fn only_approved_relays_are_chosen() {
    let deadline = Deadline::after(Duration::from_secs(150));
    let mut w = Cluster::new("ap-l", "203.0.113.1/24");
    let rogue = w.add_node("rogue", "203.0.113.2/24", true, &["--relay"]);
    let good = w.add_node("good", "203.0.113.3/24", true, &["--relay"]);
    let public = w.add_node("pub", "203.0.113.4/24", true, &[]);
    let spoke = w.add_node("spoke", "203.0.113.5/24", true, &["--relay-only"]);
    // The rogue joins first (lowest id) and is not approved (started outside the
    // harness, which approves relays).
    let token = w.token.clone();
    w.nodes[rogue].start(Some(&token));
    let rogue_id = w.coord.device_id("rogue");
    w.start(good); // approved by the harness
    let good_id = w.coord.device_id("good");
    assert!(rogue_id < good_id);
    w.start(public);
    w.start(spoke);

    let cap = Duration::from_secs(40);
    let st_spoke = w.nodes[spoke].wait_only_peer("good", deadline.left(cap));
    let st_pub = w.nodes[public].wait_named(&["rogue", "good", "spoke"], deadline.left(cap));
    let st_rogue = w.nodes[rogue].wait_named(&["good", "pub", "spoke"], deadline.left(cap));
    assert!(!st_rogue.relay, "the unapproved relay thinks it relays");
    let view = admin_view(&w, "rogue");
    assert_eq!(view["pending"]["relay"], true, "{view}");

    // Both ways, v4 and v6, through the approved relay; the rogue reaches the spoke
    // through it too.
    for v6 in [false, true] {
        w.nodes[public].ping_node(&st_spoke, v6, deadline.left(Duration::from_secs(30)));
        w.nodes[spoke].ping_node(&st_pub, v6, deadline.left(Duration::from_secs(30)));
        w.nodes[rogue].ping_node(&st_spoke, v6, deadline.left(Duration::from_secs(30)));
    }
    let good_st = w.nodes[good].current();
    let rogue_st = w.nodes[rogue].current();
    assert!(
        good_st.relay && good_st.relayed_packets > 0,
        "approved relay carried nothing: {}",
        good_st.relayed_packets
    );
    assert_eq!(
        rogue_st.relayed_packets, 0,
        "the unapproved relay carried traffic"
    );
    assert!(
        w.nodes[spoke]
            .current()
            .peers
            .iter()
            .all(|p| p.hostname == "good")
    );

    // Approved now: it is the lowest-id relay, and the spoke moves to it.
    w.approve(rogue, &["--relay"]);
    w.nodes[spoke].wait_only_peer("rogue", deadline.left(Duration::from_secs(20)));
    w.nodes[rogue].wait_status("to relay", deadline.left(Duration::from_secs(10)), |s| {
        s.relay
    });
    w.nodes[public].ping_node(&st_spoke, false, deadline.left(Duration::from_secs(30)));
    assert!(w.nodes[rogue].current().relayed_packets > 0);
}
