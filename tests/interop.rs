//! Interop with stock WireGuard: Debian's `wireguard-go` + `wg`, configured from the
//! wg-quick file `nexodus devices add` prints, meshes with managed nodes through the
//! relay; `wg show` reads our nodes over the UAPI socket. Needs root, wireguard-go and
//! wireguard-tools (scripts/test installs them).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::cluster::{Cluster, wait_until};
use common::stock::stock_host;
use nexodus::join::status::Status;

const PING_WAIT: Duration = Duration::from_secs(30);

/// `wg show IFACE dump` peers: public key → (endpoint, allowed ips, rx, tx).
fn wg_dump(iface: &str) -> Vec<(String, String, BTreeSet<String>, u64, u64)> {
    let out = Command::new("wg")
        .args(["show", iface, "dump"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wg show {iface} dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() >= 8, "dump line {l:?}");
            let allowed = f[3]
                .split(',')
                .filter(|s| *s != "(none)")
                .map(str::to_string)
                .collect();
            (
                f[0].to_string(),
                f[2].to_string(),
                allowed,
                f[5].parse().unwrap(),
                f[6].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn stock_wireguard_peer_through_the_relay_and_wg_show() {
    let mut c = Cluster::new("wi", "203.0.113.1/24");
    let relay = c.add_relay("relay", "203.0.113.2/24", "wir0");
    let a = c.add_node("a", "203.0.113.3/24", true, &["--interface", "wia0"]);
    let b = c.add_node("b", "203.0.113.4/24", true, &["--interface", "wib0"]);
    for i in [relay, a, b] {
        c.start(i);
    }
    for i in [relay, a, b] {
        c.nodes[i].wait_peers(2);
    }

    // Refusals first: malformed and duplicate keys.
    let relay_key = c.nodes[relay].status().unwrap().device.public_key;
    for (hostname, key, refusal) in [
        ("bad", "not-a-key", "public key"),
        ("dup", relay_key.as_str(), "already registered"),
    ] {
        let err = c
            .coord
            .admin_result(&[
                "devices",
                "add",
                "--hostname",
                hostname,
                "--public-key",
                key,
            ])
            .unwrap_err();
        assert!(err.contains(refusal), "{err}");
    }

    // The stock device: config from the coordinator, applied by hand.
    let (config, stock, wggo) =
        stock_host(&mut c, "203.0.113.5/24", "wis0", Duration::from_secs(10));
    assert!(config.contains("PersistentKeepalive = 25"), "{config}");
    assert!(
        config.contains("AllowedIPs = 100.64.0.0/10, 200::/64"),
        "{config}"
    );
    let listed = c.coord.admin(&["devices", "--json"]);
    assert!(listed.contains("\"unmanaged\": true"), "{listed}");

    // Managed nodes see the new device (through the relay) and everyone pings.
    let sa = wait_until(
        "a to list the stock device",
        Duration::from_secs(30),
        || c.nodes[a].status().filter(|s| s.peers.len() == 3),
    );
    let sb = c.nodes[b].wait_peers(3);
    let stock_peer = sa.peers.iter().find(|p| p.hostname == "stock").unwrap();
    assert_eq!(stock_peer.path, "relay");
    let stock_v4 = stock_peer.tunnel_ip.to_string();
    let stock_v6 = stock_peer.tunnel_ip_v6.unwrap().to_string();
    for s in [&sa, &sb] {
        let v4 = s.device.tunnel_ip.to_string();
        let v6 = s.device.tunnel_ip_v6.unwrap().to_string();
        assert!(stock.ping_until(&v4, PING_WAIT), "stock cannot ping {v4}");
        assert!(stock.ping_until(&v6, PING_WAIT), "stock cannot ping {v6}");
    }
    for i in [a, b] {
        assert!(
            c.nodes[i].ns.ping_until(&stock_v4, PING_WAIT),
            "node {i} cannot ping {stock_v4}"
        );
        assert!(
            c.nodes[i].ns.ping_until(&stock_v6, PING_WAIT),
            "node {i} cannot ping {stock_v6}"
        );
    }
    let relay_status = c.nodes[relay].status().unwrap();
    assert!(
        relay_status.relayed_packets > 0,
        "the relay forwarded nothing"
    );

    // `wg show` on a managed node lists what `nexodus status` says.
    let status: Status = c.nodes[a].status().unwrap();
    let dump = wg_dump("wia0");
    let direct: Vec<_> = status.peers.iter().filter(|p| p.path == "direct").collect();
    assert_eq!(dump.len(), direct.len(), "{dump:?} vs {direct:?}");
    for p in direct {
        let (_, endpoint, allowed, rx, tx) = dump
            .iter()
            .find(|d| d.0 == p.public_key)
            .unwrap_or_else(|| panic!("{} missing from wg show: {dump:?}", p.hostname));
        assert_eq!(
            Some(endpoint.as_str()),
            p.endpoint.map(|e| e.to_string()).as_deref()
        );
        let expected: BTreeSet<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(allowed, &expected);
        assert!(
            *rx >= p.rx_bytes && *tx >= p.tx_bytes,
            "counters went backwards"
        );
        assert!(*rx > 0 && *tx > 0);
    }
    let shown = Command::new("wg").args(["show", "wia0"]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("latest handshake"), "{shown}");

    // Removing the stock device drops it everywhere.
    let id = c
        .coord
        .admin(&["devices", "--json"])
        .split("\"id\": ")
        .skip(1)
        .filter_map(|s| s.split(',').next()?.trim().parse::<i64>().ok())
        .max()
        .unwrap();
    c.coord.admin(&["devices", "remove", &id.to_string()]);
    c.nodes[a].wait_peers(2);
    drop(wggo);
}
