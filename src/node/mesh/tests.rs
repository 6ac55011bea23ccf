use super::*;
use crate::node::dataplane::PathCounters;

pub(crate) fn device(id: i64, v6: bool) -> Device {
    let secret = boringtun::x25519::StaticSecret::from([id as u8 + 1; 32]);
    let public = boringtun::x25519::PublicKey::from(&secret);
    Device {
        use_exit: None,
        id,
        organization_id: 1,
        public_key: keys::encode_key(public.as_bytes()),
        hostname: format!("d{id}"),
        os: "linux".into(),
        tunnel_ip: format!("100.64.0.{id}").parse().unwrap(),
        tunnel_ip_v6: v6.then(|| format!("200::{id}").parse().unwrap()),
        organization_prefix: "100.64.0.0/10".parse().unwrap(),
        organization_prefix_v6: "200::/64".parse().unwrap(),
        local_ip: None,
        local_ip_v6: None,
        endpoints: vec![format!("192.0.2.{id}:51820").parse().unwrap()],
        reflexive_endpoint: None,
        reflexive_endpoint_v6: None,
        symmetric_nat: false,
        relay: false,
        relay_only: false,
        ipv6_supported: v6,
        advertise_cidrs: vec![],
        revision: 1,
        last_seen: 0,
        unmanaged: false,
        online: true,
        exit_node: false,
        approved: Default::default(),
        name: String::new(),
        domain: String::new(),
    }
}

pub(crate) fn local(id: i64, ipv6: bool) -> LocalView {
    LocalView {
        device_id: id,
        ipv6,
        relay: false,
        spoke: false,
        reflexive: None,
        underlay_v4: true,
        underlay_v6: true,
        org_v4: "100.64.0.0/10".parse().unwrap(),
        org_v6: "200::/64".parse().unwrap(),
    }
}

fn nets(p: &PeerPlan) -> Vec<String> {
    p.allowed_ips.iter().map(ToString::to_string).collect()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn dual_stack_peer_gets_both_host_routes() {
    let now = Instant::now();
    let mut m = MeshState::new(local(1, true));
    let mut d2 = device(2, true);
    d2.advertise_cidrs = vec![net("198.51.100.0/24"), net("2001:db8:100::/64")];
    m.apply_snapshot(&[device(1, true), d2], now);
    let p = m.plan(2).unwrap();
    assert_eq!(
        nets(p),
        [
            "100.64.0.2/32",
            "200::2/128",
            "198.51.100.0/24",
            "2001:db8:100::/64"
        ]
    );
    assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    assert!(m.plan(1).is_none(), "never peer with ourselves");
}

#[test]
fn v4_only_on_either_side_means_no_v6() {
    let now = Instant::now();
    let mut m = MeshState::new(local(1, false));
    m.apply_snapshot(&[device(2, true)], now);
    assert!(
        m.plan(2)
            .unwrap()
            .allowed_ips
            .iter()
            .all(|n| n.addr().is_ipv4())
    );
    let mut m = MeshState::new(local(1, true));
    m.apply_snapshot(&[device(3, false)], now);
    assert!(
        m.plan(3)
            .unwrap()
            .allowed_ips
            .iter()
            .all(|n| n.addr().is_ipv4())
    );
}

#[test]
fn bad_keys_skipped() {
    let mut d = device(3, true);
    d.public_key = keys::encode_key(&[0; 32]);
    let mut m = MeshState::new(local(1, true));
    m.apply_snapshot(&[d], Instant::now());
    assert!(m.plan(3).is_none());
}

#[test]
fn only_changes_are_emitted() {
    let now = Instant::now();
    let mut m = MeshState::new(local(1, true));
    let acts = m.apply_snapshot(&[device(2, true), device(3, false)], now);
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::UpsertPeer(_)))
            .count(),
        2
    );
    assert!(acts.contains(&Action::AddRoute(net("200::2/128"))));
    assert!(!acts.contains(&Action::AddRoute(net("200::3/128"))));
    assert!(m.apply_delta(&[device(3, false)], &[], now).is_empty());
    let acts = m.apply_delta(&[], &[2], now);
    assert!(acts.contains(&Action::RemovePeer(2)));
    assert!(acts.contains(&Action::RemoveRoute(net("200::2/128"))));
    let acts = m.apply_snapshot(&[], now);
    assert!(acts.contains(&Action::RemovePeer(3)));
    assert_eq!(m.routes().count(), 0);
}

#[test]
fn same_nat_uses_the_lan_address() {
    let now = Instant::now();
    let mut me = local(1, true);
    me.reflexive = Some("203.0.113.5:40000".parse().unwrap());
    let mut m = MeshState::new(me);
    let mut same = device(2, true);
    same.reflexive_endpoint = Some("203.0.113.5:40001".parse().unwrap());
    let mut other = device(3, true);
    other.reflexive_endpoint = Some("203.0.113.6:40002".parse().unwrap());
    m.apply_snapshot(&[same, other], now);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("192.0.2.2:51820".parse().unwrap())
    );
    assert_eq!(
        m.plan(3).unwrap().endpoint,
        Some("203.0.113.6:40002".parse().unwrap())
    );
}

#[test]
fn spoke_peers_only_with_the_lowest_id_relay() {
    let now = Instant::now();
    let mut me = local(1, true);
    me.spoke = true;
    let mut m = MeshState::new(me);
    let mut r5 = device(5, true);
    r5.relay = true;
    let mut r4 = device(4, true);
    r4.relay = true;
    let mut lan = device(2, true);
    lan.advertise_cidrs = vec![net("198.51.100.0/24")];
    m.apply_snapshot(&[lan, device(3, true), r4, r5.clone()], now);
    assert!(m.plan(2).is_none() && m.plan(3).is_none() && m.plan(5).is_none());
    let relay = m.plan(4).unwrap();
    assert_eq!(
        nets(relay),
        ["100.64.0.0/10", "200::/64", "198.51.100.0/24"]
    );
    assert_eq!(m.paths().len(), 1);
    // The v6 supernet is the interface's own connected route: not added again.
    assert!(m.routes().any(|n| *n == net("100.64.0.0/10")));
    assert!(!m.routes().any(|n| *n == net("200::/64")));
    // Relay 4 goes offline: the spoke moves to relay 5, and back when 4 returns.
    let mut r4_off = device(4, true);
    r4_off.relay = true;
    r4_off.online = false;
    let acts = m.apply_delta(&[r4_off], &[], now);
    assert!(acts.contains(&Action::RemovePeer(4)));
    assert!(m.plan(5).is_some());
    let mut r4_on = device(4, true);
    r4_on.relay = true;
    m.apply_delta(&[r4_on], &[], now);
    assert!(m.plan(4).is_some() && m.plan(5).is_none());
    // Relay 4 is removed: the spoke moves to relay 5.
    let acts = m.apply_delta(&[], &[4], now);
    assert!(acts.contains(&Action::RemovePeer(4)));
    assert!(m.plan(5).is_some());
}

#[test]
fn others_reach_spokes_through_the_relay() {
    let now = Instant::now();
    let mut relay = device(4, true);
    relay.relay = true;
    let mut spoke = device(6, true);
    spoke.symmetric_nat = true;
    let mut m = MeshState::new(local(1, true));
    m.apply_snapshot(&[device(2, true), relay.clone(), spoke.clone()], now);
    assert!(m.plan(6).is_none());
    assert_eq!(
        nets(m.plan(4).unwrap()),
        ["100.64.0.4/32", "200::4/128", "100.64.0.6/32", "200::6/128"]
    );
    let paths: BTreeMap<i64, Path> = m.paths().into_iter().map(|(d, p)| (d.id, p)).collect();
    assert_eq!(paths[&6], Path::Relay);
    assert_eq!(paths[&2], Path::Direct);
    // The relay itself peers directly with the spoke.
    let mut me = local(4, true);
    me.relay = true;
    let mut r = MeshState::new(me);
    r.apply_snapshot(&[device(1, true), relay, spoke], now);
    assert_eq!(nets(r.plan(6).unwrap()), ["100.64.0.6/32", "200::6/128"]);
}

#[test]
fn failed_direct_path_falls_back_and_recovers() {
    let t0 = Instant::now();
    let mut relay = device(4, true);
    relay.relay = true;
    let mut m = MeshState::new(local(1, true));
    m.apply_snapshot(&[device(2, true), relay], t0);
    // No handshake, but not yet timed out.
    assert!(
        m.handle_handshakes(t0 + Duration::from_secs(5), [(2, None)])
            .is_empty()
    );
    // Timed out: 2's addresses move to the relay; 2 stays installed without any.
    let acts = m.handle_handshakes(t0 + DIRECT_TIMEOUT, [(2, None)]);
    assert!(!acts.is_empty());
    assert!(m.plan(2).unwrap().allowed_ips.is_empty());
    assert!(nets(m.plan(4).unwrap()).contains(&"100.64.0.2/32".to_string()));
    assert!(
        m.routes().any(|n| *n == net("100.64.0.2/32")),
        "route kept, via the relay"
    );
    // A fresh handshake alone (we may only have answered the peer's) does not move
    // it back; one we initiated and the peer answered does.
    assert!(
        !m.handle_handshakes(
            t0 + Duration::from_secs(20),
            [(2, Some(Duration::from_secs(1)))]
        )
        .iter()
        .any(|a| matches!(a, Action::UpsertPeer(_)))
    );
    let acts = m.handle_handshakes(
        t0 + Duration::from_secs(40),
        [sample(2, 0, 0, 1, Some(Duration::from_secs(1)))],
    );
    assert!(acts.iter().any(|a| matches!(a, Action::UpsertPeer(_))));
    assert_eq!(nets(m.plan(2).unwrap()), ["100.64.0.2/32", "200::2/128"]);
    assert_eq!(nets(m.plan(4).unwrap()), ["100.64.0.4/32", "200::4/128"]);
    // A healthy path never falls back.
    let later = t0 + Duration::from_secs(400);
    assert!(
        m.handle_handshakes(later, [(2, Some(Duration::from_secs(100)))])
            .is_empty()
    );
}

#[test]
fn without_a_relay_nothing_falls_back() {
    let t0 = Instant::now();
    let mut m = MeshState::new(local(1, true));
    m.apply_snapshot(&[device(2, true)], t0);
    assert!(
        m.handle_handshakes(t0 + Duration::from_secs(100), [(2, None)])
            .is_empty()
    );
    assert_eq!(m.plan(2).unwrap().allowed_ips.len(), 2);
}

#[test]
fn no_route_over_a_peer_endpoint() {
    let now = Instant::now();
    let mut m = MeshState::new(local(1, true));
    let mut router = device(2, true);
    // Advertises the underlay that holds peer 3's endpoint (192.0.2.3).
    router.advertise_cidrs = vec![net("192.0.2.0/24")];
    m.apply_snapshot(&[router, device(3, true)], now);
    assert!(nets(m.plan(2).unwrap()).contains(&"192.0.2.0/24".to_string()));
    assert!(!m.routes().any(|n| *n == net("192.0.2.0/24")));
    assert!(m.routes().any(|n| *n == net("100.64.0.3/32")));
}

fn guard() -> RouteGuard {
    RouteGuard::new([
        net("203.0.113.7/24"),
        net("2001:db8:16::7/64"),
        net("198.51.100.1/32"),
    ])
}

#[test]
fn guarded_prefixes_become_neither_allowed_ips_nor_routes() {
    let now = Instant::now();
    let mut m = MeshState::new(local(1, true));
    assert!(m.set_guard(guard()).is_empty(), "no peers yet");
    let mut d2 = device(2, true);
    d2.advertise_cidrs = vec![
        net("198.51.100.0/24"),
        net("203.0.113.128/25"),
        net("192.0.0.0/2"),
        net("2000::/3"),
        net("fe80::/10"),
        net("10.1.0.0/16"),
        net("fd00:1::/64"),
    ];
    let acts = m.apply_snapshot(&[d2.clone()], now);
    assert_eq!(
        nets(m.plan(2).unwrap()),
        ["100.64.0.2/32", "200::2/128", "10.1.0.0/16", "fd00:1::/64"]
    );
    let added: Vec<IpNet> = acts
        .iter()
        .filter_map(|a| match a {
            Action::AddRoute(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(
        added,
        [
            net("10.1.0.0/16"),
            net("100.64.0.2/32"),
            net("200::2/128"),
            net("fd00:1::/64")
        ]
    );
    let refused: Vec<String> = m.refused().map(ToString::to_string).collect();
    assert_eq!(
        refused,
        [
            "192.0.0.0/2",
            "198.51.100.0/24",
            "203.0.113.128/25",
            "2000::/3",
            "fe80::/10"
        ]
    );
    assert_eq!(m.refused_total(), 5);
    // The same record again: nothing new is refused or counted.
    m.apply_delta(&[d2.clone()], &[], now);
    assert_eq!(m.refused_total(), 5);
    // A spoke's relay gets the guarded list too (the org supernets stay).
    let mut me = local(1, true);
    me.spoke = true;
    let mut spoke = MeshState::new(me);
    spoke.set_guard(guard());
    let mut relay = device(3, true);
    relay.relay = true;
    spoke.apply_snapshot(&[d2, relay], now);
    assert_eq!(
        nets(spoke.plan(3).unwrap()),
        ["100.64.0.0/10", "200::/64", "10.1.0.0/16", "fd00:1::/64"]
    );
    // The advertiser withdraws: nothing is refused any more, the count stays.
    m.apply_delta(&[device(2, true)], &[], now);
    assert_eq!(m.refused().count(), 0);
    assert_eq!(m.refused_total(), 5);
}

#[test]
fn a_new_guard_removes_routes_it_now_refuses() {
    let now = Instant::now();
    let mut m = MeshState::new(local(1, false));
    let mut d2 = device(2, false);
    d2.advertise_cidrs = vec![net("203.0.0.0/16"), net("0.0.0.0/1")];
    m.apply_snapshot(&[d2], now);
    // Before the shell read the host's addresses, only the fixed classes apply.
    assert!(m.routes().any(|n| *n == net("203.0.0.0/16")));
    assert!(
        !m.routes().any(|n| *n == net("0.0.0.0/1")),
        "covers loopback"
    );
    let acts = m.set_guard(guard());
    assert!(acts.contains(&Action::RemoveRoute(net("203.0.0.0/16"))));
    assert!(
        !m.plan(2)
            .unwrap()
            .allowed_ips
            .contains(&net("203.0.0.0/16"))
    );
    assert_eq!(m.refused_total(), 2);
    assert!(m.set_guard(guard()).is_empty());
}

fn sample(
    id: i64,
    tx_data: u64,
    rx_bytes: u64,
    responses: u64,
    age: Option<Duration>,
) -> PathSample {
    PathSample {
        id,
        handshake_age: age,
        rx_bytes,
        counters: PathCounters {
            tx_data,
            responses,
            ..Default::default()
        },
    }
}

fn with_relay_mesh(t0: Instant) -> MeshState {
    let mut relay = device(4, true);
    relay.relay = true;
    let mut m = MeshState::new(local(1, true));
    m.apply_snapshot(&[device(2, true), device(3, true), relay], t0);
    m
}

fn on_relay(m: &MeshState, id: i64) -> bool {
    m.plan(id).unwrap().allowed_ips.is_empty()
}

#[test]
fn unanswered_data_is_probed_then_moves_to_the_relay() {
    let t0 = Instant::now();
    let s = |secs| t0 + Duration::from_secs(secs);
    let age = Some(Duration::from_secs(30));
    let mut m = with_relay_mesh(t0);
    m.handle_handshakes(t0, [sample(2, 10, 500, 1, age)]);
    // Data goes out, nothing comes back.
    assert!(
        m.handle_handshakes(s(1), [sample(2, 11, 500, 1, age)])
            .is_empty()
    );
    assert!(
        m.handle_handshakes(s(2), [sample(2, 12, 500, 1, age)])
            .is_empty()
    );
    assert_eq!(
        m.handle_handshakes(s(3), [sample(2, 13, 500, 1, age)]),
        vec![Action::Probe(2)]
    );
    // The peer's own keepalives still arrive (a one-way block): not an answer.
    assert!(
        m.handle_handshakes(s(5), [sample(2, 15, 600, 1, age)])
            .is_empty()
    );
    assert!(!on_relay(&m, 2));
    let acts = m.handle_handshakes(s(9), [sample(2, 19, 600, 1, age)]);
    assert!(!acts.is_empty());
    assert!(
        on_relay(&m, 2),
        "moved to the relay {:?} after the block",
        s(9) - s(1)
    );
    assert!(nets(m.plan(4).unwrap()).contains(&"100.64.0.2/32".to_string()));
    // Checked again every RETRY_DIRECT, back once a check is answered.
    assert!(
        m.handle_handshakes(s(12), [sample(2, 19, 600, 1, age)])
            .is_empty()
    );
    assert_eq!(
        m.handle_handshakes(s(19), [sample(2, 19, 600, 1, age)]),
        vec![Action::Probe(2)]
    );
    m.handle_handshakes(s(20), [sample(2, 19, 700, 2, Some(Duration::ZERO))]);
    assert!(!on_relay(&m, 2));
}

#[test]
fn an_answered_probe_keeps_the_direct_path() {
    let t0 = Instant::now();
    let s = |secs| t0 + Duration::from_secs(secs);
    let age = Some(Duration::from_secs(30));
    let mut m = with_relay_mesh(t0);
    m.handle_handshakes(t0, [sample(2, 10, 500, 1, age)]);
    m.handle_handshakes(s(1), [sample(2, 11, 500, 1, age)]);
    assert_eq!(
        m.handle_handshakes(s(3), [sample(2, 13, 500, 1, age)]),
        vec![Action::Probe(2)]
    );
    // One-way traffic: the peer answers the check handshake.
    m.handle_handshakes(s(4), [sample(2, 14, 600, 2, Some(Duration::ZERO))]);
    // The peer's keepalives then come as they do for one-way traffic.
    for t in 5..20 {
        let rx = 600 + t / 2 * 10;
        m.handle_handshakes(s(t), [sample(2, 10 + t, rx, 2, Some(Duration::ZERO))]);
    }
    assert!(!on_relay(&m, 2));
    // Answers keep coming: no probe while data is answered.
    assert!(
        m.handle_handshakes(s(30), [sample(2, 40, 900, 2, age)])
            .is_empty()
    );
}

#[test]
fn traffic_arriving_through_the_relay_is_answered_through_it() {
    let t0 = Instant::now();
    let age = Some(Duration::from_secs(3));
    let mut m = with_relay_mesh(t0);
    m.handle_handshakes(t0, [sample(2, 0, 0, 1, age), sample(3, 0, 0, 1, age)]);
    let via = |id, through| PathSample {
        id,
        handshake_age: age,
        rx_bytes: 0,
        counters: PathCounters {
            responses: 1,
            via_other: 1,
            via: Some(through),
            ..Default::default()
        },
    };
    // Through a peer that is not the relay: ignored.
    m.handle_handshakes(t0 + Duration::from_secs(1), [via(3, 2)]);
    assert!(!on_relay(&m, 3));
    // Through the relay: at once.
    m.handle_handshakes(t0 + Duration::from_secs(1), [via(2, 4)]);
    assert!(on_relay(&m, 2));
    // The peer's traffic arriving directly again brings it back.
    let back = PathSample {
        counters: PathCounters {
            responses: 1,
            via_other: 1,
            via: Some(4),
            direct_while_elsewhere: 1,
            ..Default::default()
        },
        ..via(2, 4)
    };
    m.handle_handshakes(t0 + Duration::from_secs(2), [back]);
    assert!(!on_relay(&m, 2));
}

#[test]
fn exit_routes_only_to_the_chosen_approved_online_exit() {
    let now = Instant::now();
    let mut exit = device(2, true);
    exit.hostname = "exit1".into();
    exit.exit_node = true;
    let mut other_exit = device(3, true);
    other_exit.exit_node = true;
    // An ordinary peer never gets a default route, chosen exit or not.
    let mut plain = MeshState::new(local(1, true));
    plain.set_guard(RouteGuard::default().allowing_default(true));
    plain.apply_snapshot(&[exit.clone(), other_exit.clone()], now);
    assert!(plain.routes().all(|n| n.prefix_len() > 0));
    assert_eq!(plain.exit_state(), None);

    let mut m = MeshState::new(local(1, true));
    m.set_guard(RouteGuard::default().allowing_default(true));
    m.set_exit(Some("exit1".into()));
    assert_eq!(m.exit_state(), Some(("exit1", ExitState::Absent)));
    let actions = m.apply_snapshot(&[exit.clone(), other_exit.clone()], now);
    assert!(
        actions.contains(&Action::AddRoute(net("0.0.0.0/0"))),
        "{actions:?}"
    );
    assert!(
        actions.contains(&Action::AddRoute(net("::/0"))),
        "{actions:?}"
    );
    assert_eq!(
        nets(m.plan(2).unwrap()),
        ["100.64.0.2/32", "200::2/128", "0.0.0.0/0", "::/0"]
    );
    assert!(
        m.plan(3)
            .unwrap()
            .allowed_ips
            .iter()
            .all(|n| n.prefix_len() > 0)
    );
    assert_eq!(m.exit_state(), Some(("exit1", ExitState::Active)));

    // Offline: the routes go (fail closed: our table's unreachable route remains).
    let mut off = exit.clone();
    off.online = false;
    let actions = m.apply_delta(&[off], &[], now);
    assert!(
        actions.contains(&Action::RemoveRoute(net("0.0.0.0/0"))),
        "{actions:?}"
    );
    assert!(
        actions.contains(&Action::RemoveRoute(net("::/0"))),
        "{actions:?}"
    );
    assert_eq!(m.exit_state(), Some(("exit1", ExitState::Offline)));

    // Not approved (the coordinator sends the role only once approved).
    let mut unapproved = exit.clone();
    unapproved.exit_node = false;
    m.apply_delta(&[unapproved], &[], now);
    assert!(m.routes().all(|n| n.prefix_len() > 0));
    assert_eq!(m.exit_state(), Some(("exit1", ExitState::NotApproved)));

    // A v4-only exit carries only v4.
    let mut v4_exit = device(2, false);
    v4_exit.hostname = "exit1".into();
    v4_exit.exit_node = true;
    m.apply_delta(&[v4_exit], &[], now);
    let defaults: Vec<&IpNet> = m.routes().filter(|n| n.prefix_len() == 0).collect();
    assert_eq!(defaults, [&net("0.0.0.0/0")]);

    // Without the guard's consent nothing passes either.
    let mut refused = MeshState::new(local(1, true));
    refused.set_exit(Some("exit1".into()));
    refused.apply_snapshot(&[exit], now);
    assert!(refused.routes().all(|n| n.prefix_len() > 0));
}

#[test]
fn a_spoke_reaches_its_own_exit_through_the_relay() {
    let now = Instant::now();
    let mut exit = device(2, true);
    exit.hostname = "exit1".into();
    exit.exit_node = true;
    let mut other_exit = device(3, true);
    other_exit.hostname = "exit2".into();
    other_exit.exit_node = true;
    let mut relay = device(4, true);
    relay.relay = true;
    let mut spoke_view = local(1, true);
    spoke_view.spoke = true;
    let mut spoke = MeshState::new(spoke_view);
    spoke.set_guard(RouteGuard::default().allowing_default(true));
    // exit2 is not the lowest-id exit: it is still the one used.
    spoke.set_exit(Some("exit2".into()));
    let mut me = device(1, true);
    me.relay_only = true;
    let actions = spoke.apply_snapshot(
        &[me.clone(), exit.clone(), other_exit.clone(), relay.clone()],
        now,
    );
    assert_eq!(spoke.wanted_use_exit(), Some(3));
    // Until our record names it, the relay does not know: dropped, not leaked.
    assert!(
        !actions.contains(&Action::AddRoute(net("0.0.0.0/0"))),
        "{actions:?}"
    );
    assert_eq!(spoke.exit_state(), Some(("exit2", ExitState::Relayed)));
    me.use_exit = Some(3);
    let actions = spoke.apply_delta(std::slice::from_ref(&me), &[], now);
    assert!(
        actions.contains(&Action::AddRoute(net("0.0.0.0/0"))),
        "{actions:?}"
    );
    assert_eq!(
        nets(spoke.plan(4).unwrap()),
        ["100.64.0.0/10", "200::/64", "0.0.0.0/0", "::/0"]
    );
    assert_eq!(spoke.exit_state(), Some(("exit2", ExitState::Active)));
    // Another choice the record does not name yet: dropped.
    spoke.set_exit(Some("exit1".into()));
    assert_eq!(spoke.wanted_use_exit(), Some(2));
    assert!(spoke.routes().all(|n| n.prefix_len() > 0));
    assert_eq!(spoke.exit_state(), Some(("exit1", ExitState::Relayed)));
    // No exit: the record is to be cleared.
    spoke.set_exit(None);
    assert_eq!(spoke.wanted_use_exit(), None);
    // The exit goes offline: the routes go.
    spoke.set_exit(Some("exit2".into()));
    assert!(spoke.routes().any(|n| n.prefix_len() == 0));
    let mut off3 = other_exit.clone();
    off3.online = false;
    spoke.apply_delta(std::slice::from_ref(&off3), &[], now);
    assert!(spoke.routes().all(|n| n.prefix_len() > 0));
    assert_eq!(spoke.exit_state(), Some(("exit2", ExitState::Offline)));
    // A relay that is the exit: the spoke's defaults go to it, directly.
    let mut relay_exit = relay.clone();
    relay_exit.hostname = "exit1".into();
    relay_exit.exit_node = true;
    let mut spoke = MeshState::new(spoke_view);
    spoke.set_guard(RouteGuard::default().allowing_default(true));
    spoke.set_exit(Some("exit1".into()));
    spoke.apply_snapshot(&[relay_exit], now);
    assert_eq!(spoke.exit_state(), Some(("exit1", ExitState::Active)));
    assert!(nets(spoke.plan(4).unwrap()).contains(&"0.0.0.0/0".to_string()));

    // The relay's side: each spoke's internet traffic goes to the exit its record
    // names, never back to our own prefixes; dropped while that exit is offline.
    let mut relay_view = local(4, true);
    relay_view.relay = true;
    let mut r = MeshState::new(relay_view);
    let mut me = relay.clone();
    me.advertise_cidrs = vec![net("198.51.100.0/24")];
    let mut spoke_b = device(1, true);
    spoke_b.relay_only = true;
    spoke_b.use_exit = Some(3);
    let mut spoke_a = device(5, true);
    spoke_a.relay_only = true;
    spoke_a.use_exit = Some(2);
    let mut spoke_none = device(6, true);
    spoke_none.relay_only = true;
    let local_nets = vec![
        net("100.64.0.0/10"),
        net("200::/64"),
        net("198.51.100.0/24"),
    ];
    let actions = r.apply_snapshot(
        &[
            me,
            spoke_b,
            spoke_a,
            spoke_none,
            exit.clone(),
            other_exit.clone(),
        ],
        now,
    );
    let want = RelayExit::new(vec![(1, Some(3)), (5, Some(2))], local_nets.clone());
    assert!(
        actions.contains(&Action::RelayExit(Some(want))),
        "{actions:?}"
    );
    // The relay installs no default route of its own.
    assert!(r.routes().all(|n| n.prefix_len() > 0));
    // exit2 dies: its spoke's traffic is dropped, not sent to exit1.
    let actions = r.apply_delta(&[off3], &[], now);
    let want = RelayExit::new(vec![(1, None), (5, Some(2))], local_nets);
    assert!(
        actions.contains(&Action::RelayExit(Some(want))),
        "{actions:?}"
    );

    // A relay that is an exit itself: a spoke that chose it uses its own uplink.
    let mut r = MeshState::new(local(1, true));
    let mut me = device(1, true);
    me.relay = true;
    me.exit_node = true;
    let mut spoke_dev = device(4, true);
    spoke_dev.relay_only = true;
    spoke_dev.use_exit = Some(1);
    let mut r_view = local(1, true);
    r_view.relay = true;
    r.set_local(r_view);
    let actions = r.apply_snapshot(&[me, spoke_dev, exit, other_exit], now);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::RelayExit(Some(_)))),
        "{actions:?}"
    );
}

/// A device whose underlay is `v4` and/or `v6` (DESIGN §9).
fn underlay(id: i64, v4: bool, v6: bool) -> Device {
    let mut d = device(id, true);
    d.endpoints.clear();
    if v4 {
        d.endpoints
            .push(format!("192.0.2.{id}:51820").parse().unwrap());
    }
    if v6 {
        d.endpoints
            .push(format!("[2001:db8::{id}]:51820").parse().unwrap());
    }
    d
}

fn local_underlay(id: i64, v4: bool, v6: bool) -> LocalView {
    LocalView {
        underlay_v4: v4,
        underlay_v6: v6,
        ..local(1, true)
    }
    .with_id(id)
}

impl LocalView {
    fn with_id(self, device_id: i64) -> Self {
        Self { device_id, ..self }
    }
}

fn relay_device(id: i64) -> Device {
    let mut r = underlay(id, true, true);
    r.relay = true;
    r
}

#[test]
fn v6_endpoint_preferred_when_both_sides_have_v6() {
    let t0 = Instant::now();
    let mut m = MeshState::new(local_underlay(1, true, true));
    m.apply_snapshot(&[underlay(2, true, true), underlay(3, true, false)], t0);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("[2001:db8::2]:51820".parse().unwrap())
    );
    assert_eq!(
        m.plan(3).unwrap().endpoint,
        Some("192.0.2.3:51820".parse().unwrap()),
        "v4-only peer: v4"
    );
    // A v4-only underlay here: v4 to the dual-stack peer.
    let mut m = MeshState::new(local_underlay(1, true, false));
    m.apply_snapshot(&[underlay(2, true, true)], t0);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("192.0.2.2:51820".parse().unwrap())
    );
}

#[test]
fn a_v6_reflexive_address_is_the_v6_endpoint() {
    let t0 = Instant::now();
    let mut d = underlay(2, true, true);
    d.reflexive_endpoint = Some("[2001:db8:ff::2]:40000".parse().unwrap());
    let mut m = MeshState::new(local_underlay(1, false, true));
    m.apply_snapshot(&[d], t0);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("[2001:db8:ff::2]:40000".parse().unwrap())
    );
}

/// A dual-stack peer reports both mappings: the v4 one in `reflexive_endpoint`,
/// the v6 one (STUN over v6) in `reflexive_endpoint_v6`; each family uses its own.
#[test]
fn the_v6_reflexive_address_beside_the_v4_one_is_the_v6_endpoint() {
    let t0 = Instant::now();
    let mut d = underlay(2, true, true);
    d.reflexive_endpoint = Some("198.51.100.2:40001".parse().unwrap());
    d.reflexive_endpoint_v6 = Some("[2001:db8:ff::2]:40002".parse().unwrap());
    let mut m = MeshState::new(local_underlay(1, true, true));
    m.apply_snapshot(std::slice::from_ref(&d), t0);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("[2001:db8:ff::2]:40002".parse().unwrap())
    );
    // A v4-only underlay here: the v4 mapping.
    let mut m = MeshState::new(local_underlay(1, true, false));
    m.apply_snapshot(std::slice::from_ref(&d), t0);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("198.51.100.2:40001".parse().unwrap())
    );
    // A new v6 mapping alone is news: the plan follows it.
    let mut m = MeshState::new(local_underlay(1, true, true));
    m.apply_snapshot(std::slice::from_ref(&d), t0);
    d.reflexive_endpoint_v6 = Some("[2001:db8:ff::2]:40003".parse().unwrap());
    d.revision += 1;
    m.apply_delta(std::slice::from_ref(&d), &[], t0);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("[2001:db8:ff::2]:40003".parse().unwrap())
    );
}

#[test]
fn no_common_family_goes_to_the_relay_at_once() {
    let t0 = Instant::now();
    // We are v6-only; 2 is v4-only, 3 dual-stack, 9 the dual-stack relay.
    let mut m = MeshState::new(local_underlay(1, false, true));
    m.apply_snapshot(
        &[
            underlay(2, true, false),
            underlay(3, true, true),
            relay_device(9),
        ],
        t0,
    );
    assert!(m.plan(2).is_none(), "nothing to probe directly");
    let relay = nets(m.plan(9).unwrap());
    assert!(relay.contains(&"100.64.0.2/32".to_string()), "{relay:?}");
    assert!(relay.contains(&"200::2/128".to_string()), "{relay:?}");
    assert_eq!(
        m.plan(9).unwrap().endpoint,
        Some("[2001:db8::9]:51820".parse().unwrap())
    );
    assert_eq!(nets(m.plan(3).unwrap()), ["100.64.0.3/32", "200::3/128"]);
    let paths: BTreeMap<i64, Path> = m.paths().into_iter().map(|(d, p)| (d.id, p)).collect();
    assert_eq!(paths[&2], Path::Relay);
    assert_eq!(paths[&3], Path::Direct);
    // The v4-only side decides the same about us, at once.
    let mut me = underlay(1, false, true);
    me.endpoints = vec!["[2001:db8::1]:51820".parse().unwrap()];
    let mut v4 = MeshState::new(local_underlay(2, true, false));
    v4.apply_snapshot(&[me, relay_device(9)], t0);
    assert!(v4.plan(1).is_none());
    assert!(nets(v4.plan(9).unwrap()).contains(&"100.64.0.1/32".to_string()));
    assert_eq!(
        v4.plan(9).unwrap().endpoint,
        Some("192.0.2.9:51820".parse().unwrap())
    );
    // The relay itself peers with both directly.
    let mut r = MeshState::new(LocalView {
        relay: true,
        ..local_underlay(9, true, true)
    });
    let mut me = underlay(1, false, true);
    me.endpoints = vec!["[2001:db8::1]:51820".parse().unwrap()];
    r.apply_snapshot(&[me, underlay(2, true, false)], t0);
    assert!(r.plan(1).unwrap().endpoint.unwrap().is_ipv6());
    assert!(r.plan(2).unwrap().endpoint.unwrap().is_ipv4());
    assert!(!r.plan(1).unwrap().allowed_ips.is_empty());
}

#[test]
fn without_a_relay_no_common_family_stays_direct() {
    let t0 = Instant::now();
    let mut m = MeshState::new(local_underlay(1, false, true));
    m.apply_snapshot(&[underlay(2, true, false)], t0);
    assert!(!m.plan(2).unwrap().allowed_ips.is_empty());
}

#[test]
fn a_silent_v6_path_gives_way_to_v4_then_the_relay() {
    let t0 = Instant::now();
    let mut m = MeshState::new(local_underlay(1, true, true));
    m.apply_snapshot(&[underlay(2, true, true), relay_device(9)], t0);
    assert!(m.plan(2).unwrap().endpoint.unwrap().is_ipv6());
    // No handshake over v6: v4 next, still direct.
    let acts = m.handle_handshakes(t0 + DIRECT_TIMEOUT, [(2, None)]);
    assert!(
        acts.iter()
            .any(|a| matches!(a, Action::UpsertPeer(p) if p.id == 2))
    );
    let p = m.plan(2).unwrap();
    assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    assert!(!p.allowed_ips.is_empty(), "still direct");
    // No handshake over v4 either: the relay.
    m.handle_handshakes(t0 + DIRECT_TIMEOUT * 2, [(2, None)]);
    assert!(m.plan(2).unwrap().allowed_ips.is_empty());
    assert!(nets(m.plan(9).unwrap()).contains(&"100.64.0.2/32".to_string()));
    // New endpoints: v6 first again.
    let mut moved = underlay(2, true, true);
    moved.endpoints[1] = "[2001:db8::22]:51820".parse().unwrap();
    m.apply_delta(&[moved], &[], t0 + DIRECT_TIMEOUT * 3);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("[2001:db8::22]:51820".parse().unwrap())
    );
}

#[test]
fn a_peer_without_endpoints_is_not_judged_by_family() {
    let t0 = Instant::now();
    let mut d = underlay(2, false, false);
    d.endpoints.clear();
    let mut m = MeshState::new(local_underlay(1, false, true));
    m.apply_snapshot(&[d, relay_device(9)], t0);
    let p = m.plan(2).unwrap();
    assert!(!p.allowed_ips.is_empty());
    assert_eq!(p.endpoint, None);
}

#[test]
fn unanswered_data_over_v6_moves_to_v4_then_the_relay() {
    let t0 = Instant::now();
    let s = |secs| t0 + Duration::from_secs(secs);
    let age = Some(Duration::from_secs(30));
    let mut m = MeshState::new(local_underlay(1, true, true));
    m.apply_snapshot(&[underlay(2, true, true), relay_device(9)], t0);
    assert!(m.plan(2).unwrap().endpoint.unwrap().is_ipv6());
    m.handle_handshakes(t0, [sample(2, 10, 500, 1, age)]);
    // Our v6 address went away: data goes out, nothing comes back; a check
    // handshake unanswered too.
    m.handle_handshakes(s(1), [sample(2, 11, 500, 1, age)]);
    assert_eq!(
        m.handle_handshakes(s(3), [sample(2, 13, 500, 1, age)]),
        vec![Action::Probe(2)]
    );
    m.handle_handshakes(s(9), [sample(2, 19, 500, 1, age)]);
    let p = m.plan(2).unwrap();
    assert_eq!(p.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
    assert!(!p.allowed_ips.is_empty(), "direct over v4, not the relay");
    // v4 silent as well: the relay.
    m.handle_handshakes(s(10), [sample(2, 20, 500, 1, age)]);
    assert_eq!(
        m.handle_handshakes(s(12), [sample(2, 22, 500, 1, age)]),
        vec![Action::Probe(2)]
    );
    m.handle_handshakes(s(18), [sample(2, 28, 500, 1, age)]);
    assert!(m.plan(2).unwrap().allowed_ips.is_empty());
}

#[test]
fn without_a_relay_a_silent_v6_path_still_moves_to_v4() {
    let t0 = Instant::now();
    let mut m = MeshState::new(local_underlay(1, true, true));
    m.apply_snapshot(&[underlay(2, true, true), underlay(3, true, false)], t0);
    assert!(
        m.poll_timeout().is_some(),
        "a v6 path with v4 beside it is watched"
    );
    m.handle_handshakes(t0 + DIRECT_TIMEOUT, [(2, None), (3, None)]);
    assert_eq!(
        m.plan(2).unwrap().endpoint,
        Some("192.0.2.2:51820".parse().unwrap())
    );
    assert_eq!(m.plan(2).unwrap().allowed_ips.len(), 2, "still direct");
    assert_eq!(m.plan(3).unwrap().allowed_ips.len(), 2);
    assert_eq!(m.poll_timeout(), None, "nothing left to move");
}
