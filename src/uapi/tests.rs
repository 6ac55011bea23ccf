use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::node::dataplane::PeerStats;

fn key(b: u8) -> String {
    format!("{b:02x}").repeat(32)
}

/// Feeds `input` in pieces of `split` bytes; returns the events.
fn run(dev: &mut Device, input: &str, split: usize) -> Vec<Event> {
    let mut conn = Conn::new();
    let mut events = Vec::new();
    for chunk in input.as_bytes().chunks(split.max(1)) {
        conn.handle_input(chunk, dev, &mut events);
    }
    conn.handle_eof(dev, &mut events);
    events
}

fn set(dev: &mut Device, lines: &str) -> Result<(), UapiError> {
    let events = run(dev, &format!("set=1\n{lines}\n"), 7);
    match events.as_slice() {
        [Event::Set(r)] => r.clone(),
        other => panic!("unexpected events {other:?}"),
    }
}

fn get(dev: &Device) -> String {
    render_get(dev, |_| None, UNIX_EPOCH)
}

#[test]
fn every_device_key() {
    let mut dev = Device::new();
    set(
        &mut dev,
        &format!("private_key={}\nlisten_port=51820\nfwmark=4660\n", key(1)),
    )
    .unwrap();
    let c = dev.take_changes();
    assert!(c.private_key && c.listen_port && c.fwmark);
    assert_eq!(dev.private_key(), Some([1; 32]));
    assert_eq!((dev.listen_port, dev.fwmark), (51820, 4660));
    let out = get(&dev);
    assert!(out.starts_with(&format!(
        "private_key={}\nlisten_port=51820\nfwmark=4660\n",
        key(1)
    )));
    // The same key again changes nothing (`wg syncconf` sends it).
    set(&mut dev, &format!("private_key={}\n", key(1))).unwrap();
    assert!(!dev.take_changes().private_key);
    // A zero key unsets it; fwmark 0 clears.
    set(&mut dev, &format!("private_key={}\nfwmark=0\n", key(0))).unwrap();
    assert_eq!(dev.private_key(), None);
    assert!(!get(&dev).contains("private_key") && !get(&dev).contains("fwmark"));
}

#[test]
fn every_peer_key() {
    let mut dev = Device::new();
    set(
        &mut dev,
        &format!(
            "public_key={}\nprotocol_version=1\npreshared_key={}\nendpoint=192.0.2.1:51820\n\
             persistent_keepalive_interval=25\nallowed_ip=10.0.0.1/24\nallowed_ip=2001:db8::1/64\n",
            key(2),
            key(3)
        ),
    )
    .unwrap();
    let c = dev.take_changes();
    let (&id, change) = c.peers.iter().next().unwrap();
    assert_eq!(change.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    assert!(change.preshared_key);
    let p = dev.peer(id).unwrap();
    assert_eq!(p.preshared_key, Some([3; 32]));
    assert_eq!(p.persistent_keepalive, 25);
    assert_eq!(
        dev.allowed_ips(id),
        vec![
            "10.0.0.0/24".parse().unwrap(),
            "2001:db8::/64".parse().unwrap()
        ]
    );
    let out = get(&dev);
    assert!(out.contains(&format!(
        "public_key={}\npreshared_key={}\nprotocol_version=1\n",
        key(2),
        key(3)
    )));
    assert!(out.contains("endpoint=192.0.2.1:51820\n"));
    assert!(out.contains(
        "persistent_keepalive_interval=25\nallowed_ip=10.0.0.0/24\nallowed_ip=2001:db8::/64\n"
    ));

    // v6 endpoint, replace_allowed_ips, removal of one prefix.
    set(
        &mut dev,
        &format!(
            "public_key={}\nendpoint=[2001:db8::2]:1234\nreplace_allowed_ips=true\nallowed_ip=10.1.0.0/16\n\
             allowed_ip=10.2.0.0/16\nallowed_ip=-10.1.0.0/16\n",
            key(2)
        ),
    )
    .unwrap();
    assert_eq!(dev.allowed_ips(id), vec!["10.2.0.0/16".parse().unwrap()]);
    assert_eq!(
        dev.peer(id).unwrap().endpoint,
        Some("[2001:db8::2]:1234".parse().unwrap())
    );

    // update_only on a new peer creates nothing; on an existing one it updates.
    set(
        &mut dev,
        &format!(
            "public_key={}\nupdate_only=true\nallowed_ip=10.9.0.0/16\n",
            key(4)
        ),
    )
    .unwrap();
    assert_eq!(dev.peer_count(), 1);
    set(
        &mut dev,
        &format!(
            "public_key={}\nupdate_only=true\npersistent_keepalive_interval=0\n",
            key(2)
        ),
    )
    .unwrap();
    assert_eq!(dev.peer(id).unwrap().persistent_keepalive, 0);

    // remove
    dev.take_changes();
    set(&mut dev, &format!("public_key={}\nremove=true\n", key(2))).unwrap();
    assert_eq!(dev.peer_count(), 0);
    assert!(dev.take_changes().removed.contains(&id));
}

#[test]
fn replace_peers_and_moves() {
    let mut dev = Device::new();
    set(
        &mut dev,
        &format!(
            "public_key={}\nallowed_ip=10.0.0.0/8\npublic_key={}\nallowed_ip=10.0.0.0/8\n",
            key(5),
            key(6)
        ),
    )
    .unwrap();
    let ids: Vec<_> = dev.peers().map(|(id, _)| id).collect();
    // The prefix moved to the second peer.
    assert!(dev.allowed_ips(ids[0]).is_empty());
    assert_eq!(dev.allowed_ips(ids[1]).len(), 1);
    set(
        &mut dev,
        &format!("public_key={}\nallowed_ip=10.0.0.0/8\n", key(5)),
    )
    .unwrap();
    assert_eq!(dev.allowed_ips(ids[0]).len(), 1);
    assert!(dev.allowed_ips(ids[1]).is_empty());
    // Moving back and forth never repeats a prefix.
    for _ in 0..5 {
        set(
            &mut dev,
            &format!(
                "public_key={}\nallowed_ip=10.0.0.0/8\npublic_key={}\nallowed_ip=10.0.0.0/8\n",
                key(5),
                key(6)
            ),
        )
        .unwrap();
    }
    set(
        &mut dev,
        &format!("public_key={}\nallowed_ip=10.0.0.0/8\n", key(5)),
    )
    .unwrap();
    assert_eq!(dev.allowed_ips(ids[0]), vec!["10.0.0.0/8".parse().unwrap()]);
    dev.take_changes();
    set(
        &mut dev,
        &format!("replace_peers=true\npublic_key={}\n", key(7)),
    )
    .unwrap();
    assert_eq!(dev.peer_count(), 1);
    let c = dev.take_changes();
    assert_eq!(c.removed.len(), 2);
    assert_eq!(c.peers.len(), 1);
}

#[test]
fn own_key_peer_is_ignored() {
    let mut dev = Device::new();
    let public =
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from([9u8; 32]));
    let pk = hex32(public.as_bytes());
    set(
        &mut dev,
        &format!("public_key={pk}\nallowed_ip=10.0.0.0/8\n"),
    )
    .unwrap();
    assert_eq!(dev.peer_count(), 1);
    // Taking that key as ours drops the peer; naming it later is ignored.
    set(
        &mut dev,
        &format!(
            "private_key={}\npublic_key={pk}\nallowed_ip=10.0.0.0/8\n",
            key(9)
        ),
    )
    .unwrap();
    assert_eq!(dev.peer_count(), 0);
}

#[test]
fn bad_values_answer_like_wireguard_go() {
    let einval = -libc::EINVAL;
    let cases = [
        format!("private_key={}", &key(1)[..63]),
        format!("private_key={}z", &key(1)[..63]),
        "listen_port=65536".into(),
        "listen_port=-1".into(),
        "listen_port=+1".into(),
        "listen_port=".into(),
        "fwmark=4294967296".into(),
        "replace_peers=false".into(),
        "bogus=1".into(),
        "protocol_version=1".into(),
        format!("public_key={}\nendpoint=192.0.2.1", key(2)),
        format!("public_key={}\nendpoint=[2001:db8::1]", key(2)),
        format!("public_key={}\nendpoint=2001:db8::1:80", key(2)),
        format!("public_key={}\nallowed_ip=10.0.0.0/33", key(2)),
        format!("public_key={}\nallowed_ip=10.0.0.0", key(2)),
        format!("public_key={}\nallowed_ip=2001:db8::/129", key(2)),
        format!("public_key={}\npersistent_keepalive_interval=65536", key(2)),
        format!("public_key={}\nprotocol_version=2", key(2)),
        format!("public_key={}\nremove=yes", key(2)),
        format!("public_key={}\nupdate_only=1", key(2)),
        format!("public_key={}\nreplace_allowed_ips=false", key(2)),
        format!("public_key={}\npreshared_key=00", key(2)),
        format!("public_key={}\nlisten_port=1", key(2)),
        "public_key=xyz".into(),
    ];
    for case in cases {
        let mut dev = Device::new();
        let err = set(&mut dev, &case).expect_err(&case);
        assert_eq!(err.errno(), einval, "{case}: {err}");
    }
    let mut dev = Device::new();
    assert_eq!(
        set(&mut dev, "no equals sign").unwrap_err().errno(),
        -libc::EPROTO
    );
}

#[test]
fn lines_before_an_error_stay_applied_and_the_connection_goes_on() {
    let mut dev = Device::new();
    let events = run(
        &mut dev,
        "set=1\nlisten_port=1000\nlisten_port=x\nfwmark=7\n\nget=1\n\n",
        3,
    );
    assert_eq!(events.len(), 2);
    assert!(matches!(&events[0], Event::Set(Err(e)) if e.errno() == -libc::EINVAL));
    assert_eq!(events[1], Event::Get);
    assert_eq!((dev.listen_port, dev.fwmark), (1000, 0));
}

#[test]
fn operations_and_framing() {
    let mut dev = Device::new();
    assert_eq!(run(&mut dev, "get=1\n\n", 1), vec![Event::Get]);
    assert_eq!(
        run(&mut dev, "get=1\n\nget=1\n\n", 5),
        vec![Event::Get, Event::Get]
    );
    assert_eq!(run(&mut dev, "bogus=1\n\n", 2), vec![Event::Close]);
    assert!(matches!(
        run(&mut dev, "get=1\nx\n\n", 2).as_slice(),
        [Event::Fail(_)]
    ));
    // A set ended by EOF, without its blank line.
    assert_eq!(
        run(&mut dev, "set=1\nlisten_port=5", 4),
        vec![Event::Set(Ok(()))]
    );
    assert_eq!(dev.listen_port, 5);
    // Nothing at all.
    assert!(run(&mut dev, "", 1).is_empty());
}

#[test]
fn oversized_lines_end_the_connection() {
    let mut dev = Device::new();
    let long = "x".repeat(MAX_LINE + 1);
    for split in [1, 100, MAX_LINE * 2] {
        let events = run(&mut dev, &format!("set=1\nlisten_port={long}\n\n"), split);
        assert!(
            matches!(events.as_slice(), [Event::Fail(e)] if e.errno() == -libc::EPROTO),
            "{split}: {events:?}"
        );
    }
    // The bound holds before the newline arrives: the buffer never grows past it.
    let mut conn = Conn::new();
    let mut events = Vec::new();
    for _ in 0..100 {
        conn.handle_input(&[b'a'; 1000], &mut dev, &mut events);
    }
    assert!(conn.is_closed());
}

#[test]
fn many_allowed_ips_stream_and_read_back_in_order() {
    let mut dev = Device::new();
    let mut req = format!("set=1\npublic_key={}\n", key(2));
    let mut expect = Vec::new();
    for i in 0..130_560u32 {
        let net = format!("{}.{}.{}.0/24", 10 + (i >> 16), (i >> 8) & 255, i & 255);
        req.push_str(&format!("allowed_ip={net}\n"));
        expect.push(net);
    }
    req.push('\n');
    let start = std::time::Instant::now();
    let events = run(&mut dev, &req, 4096);
    assert_eq!(events, vec![Event::Set(Ok(()))]);
    let out = get(&dev);
    let got: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("allowed_ip="))
        .collect();
    assert_eq!(got, expect);
    // Linear, not quadratic: far below a second even unoptimized.
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn get_uses_live_stats() {
    let mut dev = Device::new();
    set(
        &mut dev,
        &format!("public_key={}\nendpoint=192.0.2.1:1\n", key(2)),
    )
    .unwrap();
    let out = render_get(
        &dev,
        |_| {
            Some(PeerStats {
                endpoint: Some("192.0.2.9:9".parse().unwrap()),
                last_handshake: Some(Duration::from_secs(10)),
                rx_bytes: 5,
                tx_bytes: 6,
                path: Default::default(),
            })
        },
        UNIX_EPOCH + Duration::from_secs(1000),
    );
    assert!(out.contains("endpoint=192.0.2.9:9\nlast_handshake_time_sec=990\nlast_handshake_time_nsec=0\ntx_bytes=6\nrx_bytes=5\n"));
}

#[test]
fn status_lines() {
    assert_eq!(status_line(&Ok(())), "errno=0\n\n");
    assert_eq!(status_line(&Err(UapiError::PortInUse(1))), "errno=-98\n\n");
}
