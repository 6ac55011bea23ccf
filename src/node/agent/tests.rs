use super::*;
use crate::node::mesh::PATH_CHECK_INTERVAL;
use crate::node::mesh::tests::{device, local};
use crate::wire::stun;
use std::time::Duration;

fn coordinator() -> SocketAddr {
    "198.51.100.1:4443".parse().unwrap()
}

/// Peer 2, and relay 3.
fn with_relay() -> [Device; 2] {
    let mut relay = device(3, true);
    relay.relay = true;
    [device(2, true), relay]
}

fn agent() -> Agent {
    Agent::new(device(1, true), local(1, true), false, coordinator())
}

fn actions(a: &mut Agent) -> Vec<Action> {
    std::iter::from_fn(|| a.poll_action()).collect()
}

fn route(s: &str) -> Action {
    Action::AddRoute(s.parse().unwrap())
}

#[test]
fn actions_leave_in_the_order_of_the_events() {
    let now = Instant::now();
    let mut a = agent();
    a.handle_snapshot(
        &[device(1, true), device(2, false)],
        None,
        coordinator(),
        now,
    );
    a.handle_delta(&[], &[2], now);
    a.handle_delta(&[device(2, false)], &[], now);
    let acts = actions(&mut a);
    let routes: Vec<&Action> = acts
        .iter()
        .filter(|x| matches!(x, Action::AddRoute(_) | Action::RemoveRoute(_)))
        .collect();
    assert_eq!(
        routes,
        [
            &route("100.64.0.2/32"),
            &Action::RemoveRoute("100.64.0.2/32".parse().unwrap()),
            &route("100.64.0.2/32"),
        ]
    );
    assert!(matches!(acts[0], Action::UpsertPeer(ref p) if p.id == 2));
    assert_eq!(a.poll_action(), None);
}

#[test]
fn no_timer_without_a_relay_or_stun() {
    let now = Instant::now();
    let mut a = agent();
    a.handle_snapshot(&[device(2, true)], None, coordinator(), now);
    assert_eq!(a.poll_timeout(), None);
}

#[test]
fn path_checks_come_every_interval_while_a_relay_exists() {
    let t0 = Instant::now();
    let mut a = agent();
    a.handle_snapshot(&with_relay(), None, coordinator(), t0);
    assert_eq!(a.poll_timeout(), Some((t0, Timer::PathCheck)));
    a.handle_handshakes(t0, [(2, None)]);
    assert_eq!(
        a.poll_timeout(),
        Some((t0 + PATH_CHECK_INTERVAL, Timer::PathCheck))
    );
}

#[test]
fn stun_mapping_is_reported_and_reshapes_the_mesh() {
    let t0 = Instant::now();
    let mut a = agent();
    let [two, relay] = with_relay();
    a.handle_snapshot(
        &[device(1, true), two, relay],
        Some(3478),
        coordinator(),
        t0,
    );
    actions(&mut a);
    assert!(a.poll_view().is_some());
    assert_eq!(a.poll_view(), None);
    // The first STUN round is due at once.
    let (when, why) = a.poll_timeout().unwrap();
    assert_eq!((when, why), (t0, Timer::PathCheck));
    a.handle_handshakes(t0, [(2, Some(Duration::from_secs(1)))]);
    assert_eq!(a.poll_timeout(), Some((t0, Timer::Probe)));
    a.handle_timeout(t0, std::array::from_fn(|i| i as u8));
    let reqs: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert_eq!(
        reqs.iter().map(|(to, _)| to.port()).collect::<Vec<_>>(),
        [3478, 3479]
    );
    // Two different mappings: a symmetric NAT makes us a spoke of the relay.
    for (i, (_, data)) in reqs.iter().enumerate() {
        let txid = stun::parse_binding_request(data).unwrap();
        let mapped = SocketAddr::new("203.0.113.7".parse().unwrap(), 40000 + i as u16);
        a.handle_stun_answer(txid, mapped, t0);
    }
    assert_eq!(
        a.poll_update(),
        Some(DeviceUpdate {
            reflexive_endpoint: Some("203.0.113.7:40000".parse().unwrap()),
            symmetric_nat: Some(true),
            ..Default::default()
        })
    );
    assert!(a.mesh().local().spoke);
    assert!(actions(&mut a).contains(&Action::RemovePeer(2)));
    // Once the coordinator has it, nothing more to report.
    let mut me = a.device().clone();
    me.reflexive_endpoint = Some("203.0.113.7:40000".parse().unwrap());
    me.symmetric_nat = true;
    a.handle_device(me.clone());
    a.handle_snapshot(&[me], Some(3478), coordinator(), t0);
    assert_eq!(a.poll_update(), None);
    assert!(a.poll_view().is_some());
}

/// The v4 coordinator address and the v6 one (a dual-stack coordinator).
fn listed() -> [SocketAddr; 2] {
    [coordinator(), "[2001:db8::1]:4443".parse().unwrap()]
}

/// Answers every request: `v4` maps each v4 request (by its index among them),
/// `v6` each v6 one.
fn answer(
    a: &mut Agent,
    reqs: &[(SocketAddr, Vec<u8>)],
    v4: impl Fn(usize) -> SocketAddr,
    v6: impl Fn(usize) -> SocketAddr,
    now: Instant,
) {
    let (mut i4, mut i6) = (0, 0);
    for (to, data) in reqs {
        let txid = stun::parse_binding_request(data).unwrap();
        let mapped = if to.is_ipv6() {
            i6 += 1;
            v6(i6 - 1)
        } else {
            i4 += 1;
            v4(i4 - 1)
        };
        a.handle_stun_answer(txid, mapped, now);
    }
}

#[test]
fn a_dual_stack_node_learns_its_v6_mapping_beside_the_v4_one() {
    let t0 = Instant::now();
    // Connected over v6; the coordinator is listed at its v4 address too.
    let v6_coordinator: SocketAddr = "[2001:db8::1]:4443".parse().unwrap();
    let mut a = Agent::new(device(1, true), local(1, true), false, v6_coordinator);
    a.set_coordinators(&listed());
    a.handle_snapshot(&[device(1, true)], Some(3478), v6_coordinator, t0);
    a.handle_timeout(t0, std::array::from_fn(|i| i as u8));
    let reqs: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
    let mut to: Vec<String> = reqs.iter().map(|(to, _)| to.to_string()).collect();
    to.sort();
    assert_eq!(
        to,
        [
            "198.51.100.1:3478",
            "198.51.100.1:3479",
            "[2001:db8::1]:3478",
            "[2001:db8::1]:3479"
        ]
    );
    // The v4 NAT keeps one mapping; over v6 the two servers see two ports (a
    // stateful firewall may do that): the classification stays v4's.
    answer(
        &mut a,
        &reqs,
        |_| "203.0.113.7:40000".parse().unwrap(),
        |i| SocketAddr::new("2001:db8::9".parse().unwrap(), 50000 + i as u16),
        t0,
    );
    assert_eq!(
        a.poll_update(),
        Some(DeviceUpdate {
            reflexive_endpoint: Some("203.0.113.7:40000".parse().unwrap()),
            reflexive_endpoint_v6: Some("[2001:db8::9]:50000".parse().unwrap()),
            symmetric_nat: Some(false),
            ..Default::default()
        })
    );
    assert!(!a.mesh().local().spoke);
    assert_eq!(
        a.mesh().local().reflexive,
        Some("203.0.113.7:40000".parse().unwrap())
    );
    // Once the coordinator has both, nothing more to report; the next rounds find
    // the same.
    let mut me = a.device().clone();
    me.reflexive_endpoint = Some("203.0.113.7:40000".parse().unwrap());
    me.reflexive_endpoint_v6 = Some("[2001:db8::9]:50000".parse().unwrap());
    a.handle_device(me);
    let t1 = t0 + Duration::from_secs(nat::PROBE_INTERVAL_SECS);
    a.handle_timeout(t1, std::array::from_fn(|i| 30 + i as u8));
    let reqs: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
    assert_eq!(reqs.len(), 4);
    answer(
        &mut a,
        &reqs,
        |_| "203.0.113.7:40000".parse().unwrap(),
        |_| "[2001:db8::9]:50000".parse().unwrap(),
        t1,
    );
    assert_eq!(a.poll_update(), None);
    // Only the v6 mapping moved: only it is reported.
    let t2 = t1 + Duration::from_secs(nat::PROBE_INTERVAL_SECS);
    a.handle_timeout(t2, std::array::from_fn(|i| 60 + i as u8));
    let reqs: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
    answer(
        &mut a,
        &reqs,
        |_| "203.0.113.7:40000".parse().unwrap(),
        |_| "[2001:db8::9]:50001".parse().unwrap(),
        t2,
    );
    assert_eq!(
        a.poll_update(),
        Some(DeviceUpdate {
            reflexive_endpoint_v6: Some("[2001:db8::9]:50001".parse().unwrap()),
            ..Default::default()
        })
    );
}

#[test]
fn stun_over_v6_only_where_the_host_and_a_coordinator_have_v6() {
    let t0 = Instant::now();
    let requests = |local: LocalView, connected: SocketAddr, listed: &[SocketAddr]| {
        let mut a = Agent::new(device(1, true), local, false, connected);
        a.set_coordinators(listed);
        a.handle_snapshot(&[device(1, true)], Some(3478), connected, t0);
        a.handle_timeout(t0, std::array::from_fn(|i| i as u8));
        let mut to: Vec<String> = std::iter::from_fn(|| a.poll_transmit())
            .map(|(to, _)| to.to_string())
            .collect();
        to.sort();
        to
    };
    let v4_only = LocalView {
        underlay_v6: false,
        ..local(1, true)
    };
    // A v4-only host: v4 only, whatever is listed.
    assert_eq!(
        requests(v4_only, coordinator(), &listed()),
        ["198.51.100.1:3478", "198.51.100.1:3479"]
    );
    // A dual-stack host, connected over v4, the coordinator listed at v4 only.
    assert_eq!(
        requests(local(1, true), coordinator(), &[coordinator()]),
        ["198.51.100.1:3478", "198.51.100.1:3479"]
    );
    // Connected over v4, a v6 address listed: both.
    assert_eq!(requests(local(1, true), coordinator(), &listed()).len(), 4);
    // A v6-only host: its v6 mapping is its only one, in `reflexive_endpoint`.
    let v6_only = LocalView {
        underlay_v4: false,
        ..local(1, true)
    };
    let v6: SocketAddr = "[2001:db8::1]:4443".parse().unwrap();
    assert_eq!(
        requests(v6_only, v6, &listed()),
        ["[2001:db8::1]:3478", "[2001:db8::1]:3479"]
    );
    let mut a = Agent::new(device(1, true), v6_only, false, v6);
    a.handle_snapshot(&[device(1, true)], Some(3478), v6, t0);
    a.handle_timeout(t0, std::array::from_fn(|i| i as u8));
    let reqs: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
    answer(
        &mut a,
        &reqs,
        |_| unreachable!(),
        |_| "[2001:db8::5]:51820".parse().unwrap(),
        t0,
    );
    assert_eq!(
        a.poll_update(),
        Some(DeviceUpdate {
            reflexive_endpoint: Some("[2001:db8::5]:51820".parse().unwrap()),
            symmetric_nat: Some(false),
            ..Default::default()
        })
    );
}

#[test]
fn disconnect_shows_in_the_view() {
    let mut a = agent();
    assert!(a.poll_view().unwrap().connected);
    a.handle_disconnected();
    assert!(!a.poll_view().unwrap().connected);
    a.handle_delta(&[], &[], Instant::now());
    assert!(a.poll_view().unwrap().connected);
}

#[test]
fn an_unapproved_relay_is_no_relay_until_the_coordinator_says_so() {
    let now = Instant::now();
    // Started with --relay; the coordinator sends our record without the role (not
    // approved), and another relay, 3, which is approved.
    let mut a = Agent::new(
        device(1, true),
        LocalView {
            relay: true,
            ..local(1, true)
        },
        false,
        coordinator(),
    );
    let [two, relay] = with_relay();
    a.handle_snapshot(&[device(1, true), two, relay], None, coordinator(), now);
    assert!(!a.view().relay);
    assert_eq!(a.view().relay_id, Some(3), "the approved relay, not us");
    // Approved: our record now carries the role; we are the lowest-id relay.
    let mut me = device(1, true);
    me.relay = true;
    a.handle_delta(&[me], &[], now);
    assert!(a.view().relay);
    assert_eq!(a.view().relay_id, Some(1));
    // Revoked again.
    a.handle_delta(&[device(1, true)], &[], now);
    assert_eq!(a.view().relay_id, Some(3));
}

#[test]
fn the_route_guard_shows_in_the_view() {
    let now = Instant::now();
    let mut a = agent();
    a.set_route_guard(RouteGuard::new(["198.51.100.1/32".parse().unwrap()]));
    let mut d2 = device(2, true);
    d2.advertise_cidrs = vec![
        "198.51.100.0/24".parse().unwrap(),
        "10.9.0.0/16".parse().unwrap(),
    ];
    a.handle_snapshot(&[device(1, true), d2], None, coordinator(), now);
    let acts = actions(&mut a);
    assert!(acts.contains(&route("10.9.0.0/16")));
    assert!(!acts.contains(&route("198.51.100.0/24")));
    let view = a.poll_view().unwrap();
    assert_eq!(
        view.routes_refused,
        ["198.51.100.0/24".parse::<IpNet>().unwrap()]
    );
    assert_eq!(view.routes_refused_total, 1);
    // A guard that no longer protects it lets it through, in order.
    a.set_route_guard(RouteGuard::default());
    let acts = actions(&mut a);
    let plan = a.mesh().plan(2).unwrap().clone();
    assert!(
        plan.allowed_ips
            .contains(&"198.51.100.0/24".parse().unwrap())
    );
    assert_eq!(acts, [Action::UpsertPeer(plan), route("198.51.100.0/24")]);
    assert!(a.poll_view().unwrap().routes_refused.is_empty());
}

#[test]
fn unanswered_data_asks_the_shell_for_a_check_handshake_then_uses_the_relay() {
    use crate::node::dataplane::PathCounters;
    use crate::node::mesh::{PROBE_WAIT, PathSample, UNANSWERED};
    let t0 = Instant::now();
    let mut a = agent();
    a.handle_snapshot(&with_relay(), None, coordinator(), t0);
    actions(&mut a);
    let sample = |tx_data| PathSample {
        id: 2,
        handshake_age: Some(Duration::from_secs(5)),
        rx_bytes: 100,
        counters: PathCounters {
            tx_data,
            responses: 1,
            ..Default::default()
        },
    };
    a.handle_handshakes(t0, [sample(1)]);
    a.handle_handshakes(t0 + PATH_CHECK_INTERVAL, [sample(2)]);
    assert!(actions(&mut a).is_empty());
    let probed = t0 + PATH_CHECK_INTERVAL + UNANSWERED;
    a.handle_handshakes(probed, [sample(3)]);
    assert_eq!(actions(&mut a), vec![Action::Probe(2)]);
    a.handle_handshakes(probed + PROBE_WAIT, [sample(4)]);
    let acts = actions(&mut a);
    assert!(
        acts.iter()
            .any(|x| matches!(x, Action::UpsertPeer(p) if p.id == 2 && p.allowed_ips.is_empty())),
        "{acts:?}"
    );
    assert!(
        a.mesh()
            .paths()
            .iter()
            .any(|(d, p)| d.id == 2 && *p == crate::node::mesh::Path::Relay)
    );
}

/// The mesh DNS table follows snapshots, deltas and our own record, and is handed
/// out once per change (DESIGN §10).
#[test]
fn names_follow_every_device_change() {
    let now = Instant::now();
    let named = |id: i64, v6: bool, name: &str| {
        let mut d = device(id, v6);
        d.name = name.into();
        d.domain = "nexodus.internal".into();
        d
    };
    let mut a = agent();
    assert_eq!(a.poll_names(), None);
    a.handle_snapshot(
        &[named(1, true, "me"), named(2, false, "beta")],
        None,
        coordinator(),
        now,
    );
    let t = a.poll_names().expect("a table after the snapshot");
    assert_eq!(t.domain(), "nexodus.internal");
    assert!(t.resolve("me.nexodus.internal").is_some());
    let beta = t.resolve("beta.nexodus.internal").unwrap();
    assert_eq!((beta.v4.to_string(), beta.v6), ("100.64.0.2".into(), None));
    assert_eq!(a.poll_names(), None, "once per change");
    // A delta that changes no name hands out nothing.
    a.handle_delta(&[named(2, false, "beta")], &[], now);
    assert_eq!(a.poll_names(), None);
    // New, renamed and removed devices.
    a.handle_delta(&[named(3, true, "gamma"), named(2, false, "b2")], &[], now);
    let t = a.poll_names().unwrap();
    assert!(t.resolve("gamma.nexodus.internal").is_some());
    assert!(t.resolve("b2.nexodus.internal").is_some());
    assert!(t.resolve("beta.nexodus.internal").is_none());
    a.handle_delta(&[], &[3], now);
    assert!(
        a.poll_names()
            .unwrap()
            .resolve("gamma.nexodus.internal")
            .is_none()
    );
    // Our own record, as an update's answer.
    a.handle_device(named(1, true, "me-renamed"));
    assert!(
        a.poll_names()
            .unwrap()
            .resolve("me-renamed.nexodus.internal")
            .is_some()
    );
}

/// A delta's devices that only went online or offline come back as the known
/// records with the flag set; unknown ids are skipped.
#[test]
fn online_changes_become_records() {
    let now = Instant::now();
    let mut a = agent();
    let [peer, relay] = with_relay();
    a.handle_snapshot(&[peer.clone(), relay.clone()], None, coordinator(), now);
    assert!(a.with_online(&[]).is_empty());
    let got = a.with_online(&[(3, false), (99, true)]);
    assert_eq!(
        got,
        vec![Device {
            online: false,
            ..relay
        }]
    );
    a.handle_delta(&got, &[], now);
    assert!(a.mesh.devices().any(|d| d.id == 3 && !d.online));
}

#[test]
fn the_exit_in_use_is_reported_and_cleared() {
    let now = Instant::now();
    let mut a = agent();
    let mut exit = device(2, true);
    exit.hostname = "exit2".into();
    exit.exit_node = true;
    a.set_exit(Some("exit2".into()));
    // Not resolved yet: our record names none, nothing to say.
    assert_eq!(a.poll_update(), None);
    a.handle_snapshot(&[device(1, true), exit.clone()], None, coordinator(), now);
    let want = |e| {
        Some(DeviceUpdate {
            use_exit: Some(e),
            ..Default::default()
        })
    };
    assert_eq!(a.poll_update(), want(2));
    // The coordinator has it: nothing more.
    let mut me = a.device().clone();
    me.use_exit = Some(2);
    a.handle_delta(&[me], &[], now);
    assert_eq!(a.poll_update(), None);
    // No exit any more: cleared (0).
    a.set_exit(None);
    assert_eq!(a.poll_update(), want(0));
}
