#![allow(clippy::unwrap_used)]
use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const PEER: &str = "100.64.0.2:40000";
const OURS: &str = "100.64.0.1:443";
const SERVICE: &str = "127.0.0.1:8443";

/// An egress or SOCKS5 flow from PEER to OURS (no early bytes).
fn flow<L>(rule: usize, origin: Origin, local: L, port: u16, t0: Instant) -> TcpFlow<L> {
    TcpFlow::egress(
        rule,
        origin,
        addr(PEER),
        addr(OURS),
        local,
        vec![],
        port,
        t0,
    )
}

/// A table with ingress port 443 (rule 0) and room for `max` sockets.
fn table(max: usize) -> TcpTable<u32, &'static str> {
    let mut t = TcpTable::new(max);
    t.add_ingress(443, 0, addr(SERVICE));
    t
}

#[test]
fn a_syn_arms_one_listener_which_becomes_the_flow() {
    let t0 = Instant::now();
    let mut t = table(8);
    assert!(t.is_ingress(443));
    assert!(!t.is_ingress(80));
    assert_eq!(t.arm(80), Arm::Ready, "not an ingress port");
    assert_eq!(t.arm(443), Arm::Needed);
    t.add_listener(443, 7);
    assert_eq!(t.arm(443), Arm::Ready, "one listener is enough");
    assert_eq!(t.sockets(), 1);
    assert!(t.is_empty());

    assert_eq!(t.listener(443, 0), Some(7));
    assert_eq!(t.target(443), Some(addr(SERVICE)));
    t.claim(443, 0, (addr(PEER), addr(OURS)), "connecting", t0);
    assert_eq!(t.listener(443, 0), None);
    assert_eq!((t.len(), t.sockets()), (1, 1));
    let f = t.flows().next().unwrap();
    assert_eq!(f.origin, Origin::Ingress);
    assert_eq!((f.rule, f.from, f.to), (0, addr(PEER), addr(SERVICE)));
    assert_eq!(f.local, "connecting");

    // The same SYN again is no new connection; another peer's is.
    assert!(t.is_repeat_syn(addr(PEER), addr(OURS)));
    assert!(!t.is_repeat_syn(addr("100.64.0.3:40000"), addr(OURS)));
    assert_eq!(
        t.arm(443),
        Arm::Needed,
        "the next connection needs a listener"
    );

    // Once the flow ends, the tuple may open a new connection.
    let f = t.end(7, t0).unwrap();
    assert_eq!(f.from, addr(PEER));
    assert!(!t.is_repeat_syn(addr(PEER), addr(OURS)));
    assert!(t.end(7, t0).is_none());
    assert_eq!((t.len(), t.sockets()), (0, 1), "still closing");
}

#[test]
fn sockets_are_bounded_listeners_and_closing_ones_included() {
    let t0 = Instant::now();
    let mut t = table(3);
    t.add_listener(443, 1);
    let egress = |port| flow(1, Origin::Egress, "", port, t0);
    t.insert(2, egress(50000));
    assert!(t.has_room());
    t.insert(3, egress(50001));
    assert!(!t.has_room());
    // A SYN while full: no listener is armed (one waits already, though).
    assert_eq!(t.arm(443), Arm::Ready);
    t.claim(443, 0, (addr(PEER), addr(OURS)), "", t0);
    assert_eq!(t.arm(443), Arm::Full);
    t.end(2, t0).unwrap();
    assert_eq!(t.arm(443), Arm::Full, "a closing socket still counts");
    let mut freed = Vec::new();
    t.reap(t0, |h, port, _| {
        freed.push((h, port));
        true
    });
    assert_eq!(freed, vec![(2, Some(50000))]);
    assert_eq!(t.arm(443), Arm::Needed);
}

#[test]
fn closing_sockets_go_when_finished_or_after_the_drain_timeout() {
    let t0 = Instant::now();
    let mut t = table(8);
    let flow = flow(1, Origin::Egress, "", 50000, t0);
    t.insert(1, flow);
    t.add_listener(443, 2);
    t.end(1, t0).unwrap();
    // A listener that lost its SYN without a peer closes without a port.
    t.discard_listener(443, 0, t0 + Duration::from_secs(10));
    assert_eq!(t.sockets(), 2);

    // Neither socket finished its close: only the timeout removes one.
    let mut freed = Vec::new();
    let mut reap = |t: &mut TcpTable<u32, &str>, now, finished: u32| {
        t.reap(now, |h, port, timed_out| {
            let go = timed_out || h == finished;
            if go {
                freed.push((h, port));
            }
            go
        })
    };
    reap(&mut t, t0 + DRAIN_TIMEOUT - Duration::from_secs(1), 0);
    reap(&mut t, t0 + DRAIN_TIMEOUT, 0);
    assert_eq!(t.sockets(), 1);
    // The discarded listener finishes its close.
    reap(&mut t, t0 + DRAIN_TIMEOUT, 2);
    assert_eq!(t.sockets(), 0);
    assert_eq!(freed, vec![(1, Some(50000)), (2, None)]);
}

#[test]
fn opening_fails_at_the_deadline_or_on_refusal() {
    let t0 = Instant::now();
    let mut f = flow(0, Origin::Egress, (), 50000, t0);
    assert_eq!(f.state.opening(State::SynSent, t0), Ok(Opening::Wait));
    let late = t0 + CONNECT_TIMEOUT;
    assert_eq!(
        f.state
            .opening(State::SynSent, late - Duration::from_millis(1)),
        Ok(Opening::Wait)
    );
    assert_eq!(
        f.state.opening(State::SynSent, late),
        Err(End::Failed(Reply::HostUnreachable))
    );
    assert_eq!(
        f.state.opening(State::Closed, t0),
        Err(End::Failed(Reply::ConnectionRefused))
    );
    // An egress client is reset; a SOCKS5 client waiting for its reply gets a reply.
    assert_eq!(
        f.state.local_close(End::Failed(Reply::HostUnreachable)),
        LocalClose::Reset
    );
    let s = flow(0, Origin::Socks, (), 50000, t0);
    assert_eq!(
        s.state.local_close(End::Failed(Reply::ConnectionRefused)),
        LocalClose::Reply(Reply::ConnectionRefused)
    );
    assert_eq!(s.state.local_close(End::Abort), LocalClose::Reset);
}

#[test]
fn established_owes_the_socks_reply_once_and_has_no_deadline() {
    let t0 = Instant::now();
    let mut f = TcpFlow::egress(
        0,
        Origin::Socks,
        addr(PEER),
        addr(OURS),
        (),
        b"early".to_vec(),
        50000,
        t0,
    );
    assert_eq!(f.state.to_mesh.pending(), b"early");
    assert_eq!(
        f.state.opening(State::Established, t0),
        Ok(Opening::Established { socks_reply: true })
    );
    // Later looks, even far past the connect deadline, change nothing.
    let later = t0 + CONNECT_TIMEOUT * 10;
    assert_eq!(f.state.opening(State::SynSent, later), Ok(Opening::Open));
    // The reply was sent: a later failure resets.
    assert_eq!(
        f.state.local_close(End::Failed(Reply::HostUnreachable)),
        LocalClose::Reset
    );

    let mut e = flow(0, Origin::Egress, (), 50000, t0);
    assert_eq!(
        e.state.opening(State::CloseWait, t0),
        Ok(Opening::Established { socks_reply: false }),
        "a connection the peer already half-closed is open too"
    );
}

#[test]
fn fins_are_passed_on_after_the_data_and_both_end_the_flow() {
    let t0 = Instant::now();
    let mut f = flow(0, Origin::Egress, (), 50000, t0);
    f.state.opening(State::Established, t0).unwrap();
    assert!(!f.state.take_fin_to_local(), "no FIN yet");
    f.state.to_local.push(b"tail");
    f.state.mesh_finished();
    assert!(f.state.mesh_fin());
    assert!(
        !f.state.take_fin_to_local(),
        "data before the FIN goes first"
    );
    f.state.to_local.advance(2);
    assert_eq!(f.state.to_local.pending(), b"il");
    assert!(!f.state.take_fin_to_local());
    f.state.to_local.advance(10);
    assert!(f.state.take_fin_to_local());
    assert!(!f.state.take_fin_to_local(), "passed on once");
    assert_eq!(
        f.state.finished(State::FinWait1, false),
        None,
        "the local side still sends"
    );
    f.state.local_finished();
    assert!(f.state.local_eof());
    assert_eq!(
        f.state.finished(State::TimeWait, false),
        Some(End::Graceful)
    );
    assert_eq!(f.state.local_close(End::Graceful), LocalClose::Fin);
    assert!(!End::Graceful.aborts_mesh());
}

#[test]
fn a_reset_mesh_side_ends_the_flow_and_resets_the_local_one() {
    let t0 = Instant::now();
    let mut f = flow(0, Origin::Egress, (), 50000, t0);
    f.state.opening(State::Established, t0).unwrap();
    assert_eq!(f.state.finished(State::Established, false), None);
    // Closed with unread data: the data goes to the local side first.
    assert_eq!(f.state.finished(State::Closed, true), None);
    assert_eq!(f.state.finished(State::Closed, false), Some(End::MeshGone));
    assert_eq!(f.state.local_close(End::MeshGone), LocalClose::Reset);
    assert!(End::MeshGone.aborts_mesh());
    assert!(End::Abort.aborts_mesh());
    // After the local FIN, a closed mesh side is the normal end of the close.
    f.state.local_finished();
    assert_eq!(f.state.finished(State::Closed, false), None);
}
