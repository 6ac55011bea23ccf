//! End-to-end: a newcomer's first hour (issue 18, items 2, 3, 5 and 6). A coordinator
//! listening on its defaults is reached over IPv6 and IPv4, and starts on a host
//! without IPv6; a node skips coordinator addresses of a family it lacks; `join`
//! checks the interface before it registers; `status` and `devices` read as text; a
//! subnet router's forwarding follows the accepted prefix and is restored on exit.
//! Needs root.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, has_peers};
use common::netns::Netns;
use common::{BIN, Deadline, DieWithParent, proc, wait_until};

/// A coordinator on its default listen addresses (`[::]`), on a host with IPv6 and
/// IPv4: nodes join over IPv6 (`join [2001:db8:18::1]:4443`) and mesh over the v6
/// underlay, and a v4-only node joins the same coordinator over IPv4.
#[test]
fn default_listen_takes_ipv6_and_ipv4() {
    let deadline = Deadline::after(Duration::from_secs(90));
    let mut c = Cluster::new_with("fh6", "2001:db8:18::1/64", true, true);
    c.coord
        .ns
        .ok(&["ip", "addr", "add", "203.0.113.1/24", "dev", "eth0"]);
    let a = c.add_node("a", "2001:db8:18::2/64", true, &[]);
    let b = c.add_node("b", "2001:db8:18::3/64", true, &[]);
    let v4 = c.add_node("v4only", "203.0.113.4/24", false, &[]);
    c.nodes[v4].coordinator = "203.0.113.1:4443".into();
    assert_eq!(c.nodes[a].coordinator, "[2001:db8:18::1]:4443");
    c.start_all();
    let sb = c.nodes[b].wait_status("a as peer", deadline.left(Duration::from_secs(30)), |s| {
        has_peers(s, &["a"]) && s.coordinator_connected
    });
    // The tunnel runs over the v6 underlay.
    c.nodes[a].ping_node(&sb, false, deadline.left(Duration::from_secs(20)));
    let sa = c.nodes[a].current();
    let peer = sa.peers.iter().find(|p| p.hostname == "b").unwrap();
    assert!(
        peer.endpoint.is_some_and(|e| e.is_ipv6()),
        "a reaches b over {:?}",
        peer.endpoint
    );
    // The same coordinator answers IPv4.
    c.nodes[v4].wait_status("connected", deadline.left(Duration::from_secs(30)), |s| {
        s.coordinator_connected
    });
    // Both STUN ports answer each family with its own address (v4 not v4-mapped).
    wait_until(
        "STUN mappings of both families",
        deadline.left(Duration::from_secs(40)),
        || {
            let devices = c.coord.devices();
            let mapped = |name: &str| {
                devices
                    .iter()
                    .find(|d| d.hostname == name)
                    .and_then(|d| d.reflexive_endpoint)
                    .map(|e| e.ip().to_string())
            };
            (devices.len() == 3
                && mapped("v4only").as_deref() == Some("203.0.113.4")
                && mapped("a").as_deref() == Some("2001:db8:18::2"))
            .then_some(())
        },
    );
}

/// A coordinator on a host with IPv6 disabled still starts on its defaults, and a
/// v4-only node given a v6 coordinator address first skips it at once instead of
/// waiting out a handshake timeout on it.
#[test]
fn v4_only_hosts_start_and_skip_ipv6_coordinators() {
    let deadline = Deadline::after(Duration::from_secs(60));
    let mut c = Cluster::new_with("fh4", "203.0.113.1/24", false, true);
    let a = c.add_node("a", "203.0.113.2/24", false, &[]);
    c.nodes[a].coordinator = "[2001:db8:18::1]:4443,203.0.113.1:4443".into();
    let started = Instant::now();
    c.start(a);
    c.nodes[a].wait_status("connected", deadline.left(Duration::from_secs(30)), |s| {
        s.coordinator_connected
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "joining took {took:?}: the IPv6 address was not skipped"
    );
}

/// The exact message when the interface is taken (issue 18, item 3).
const IN_USE: &str = "interface fhi0 already exists (another `nexodus join`?): pick another name \
                      with --interface NAME, or run rootless with --userspace";

/// `join` with its interface already in use, or without privileges, stops before it
/// registers: no device is left behind, and the message names both remedies.
#[test]
fn join_checks_the_host_before_registering() {
    let deadline = Deadline::after(Duration::from_secs(90));
    let mut c = Cluster::new("fhi", "203.0.113.1/24");
    let a = c.add_node("a", "203.0.113.2/24", true, &["--interface", "fhi0"]);
    c.nodes[a]
        .ns
        .ok(&["ip", "tuntap", "add", "dev", "fhi0", "mode", "tun"]);
    c.start(a);
    let code = c.nodes[a]
        .exit_within(deadline.left(Duration::from_secs(20)))
        .expect("join with its interface taken still running");
    assert!(!code.success());
    let log = c.nodes[a].log_text();
    assert!(
        log.contains(&format!("error: node failed: {IN_USE}\n")),
        "{log}"
    );
    assert!(c.coord.devices().is_empty(), "{:?}", c.coord.devices());
    let table = c.coord.admin(&["devices"]);
    assert_eq!(
        table.lines().count(),
        1,
        "a device was registered:\n{table}"
    );

    // Unprivileged, without --userspace: the same, naming --userspace.
    let dir = c.scratch("nobody");
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(
        dir.parent().unwrap(),
        std::fs::Permissions::from_mode(0o711),
    )
    .unwrap();
    let log_path = c.scratch("logs").join("nobody.log");
    let file = std::fs::File::create(&log_path).unwrap();
    let mut child = c.nodes[a]
        .ns
        .cmd(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            BIN,
            "join",
            "203.0.113.1:4443",
            "--hostname",
            "nobody",
            "--state-dir",
            dir.to_str().unwrap(),
            "--token",
            &c.token,
            "--interface",
            "fhi1",
        ])
        .env("HOME", &dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .die_with_parent()
        .spawn()
        .unwrap();
    let code = proc::exit_within(&mut child, deadline.left(Duration::from_secs(20)));
    proc::kill(child);
    assert!(code.is_some_and(|c| !c.success()), "{code:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("error: node failed: cannot create TUN interface fhi1: ")
            && log.contains("without them run rootless with --userspace"),
        "{log}"
    );
    assert!(c.coord.devices().is_empty(), "{:?}", c.coord.devices());

    // With the interface free, the same node joins.
    c.nodes[a].ns.ok(&["ip", "link", "del", "fhi0"]);
    c.start(a);
    c.nodes[a].wait_status("to run", deadline.left(Duration::from_secs(30)), |_| true);
    assert_eq!(c.coord.devices().len(), 1);
}

/// A row of `text` starting with `name`, its columns joined by single spaces.
fn row(text: &str, name: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row {name}:\n{text}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `status` and `devices` as a newcomer reads them (issue 18, item 5): a peer reached
/// through the relay says so instead of showing the relay's handshake and `0 / 0`,
/// advertised prefixes show in the plain output, the kernel's own link-local chatter
/// into the TUN is no drop, and online devices are "online" in LAST SEEN.
#[test]
fn status_and_devices_read_as_text() {
    let deadline = Deadline::after(Duration::from_secs(120));
    let mut c = Cluster::new("fht", "203.0.113.1/24");
    let relay = c.add_relay("relay", "203.0.113.2/24", "fhtr0");
    let gw = c.add_node(
        "gw",
        "203.0.113.3/24",
        true,
        &["--advertise-cidr", "198.51.100.0/24"],
    );
    let spoke = c.add_node("spoke", "203.0.113.4/24", true, &["--relay-only"]);
    c.start_all();
    c.approve_routes(gw, "198.51.100.0/24");
    // A spoke sees only its relay; the others reach it through the relay.
    let sg = c.nodes[gw].wait_status(
        "the spoke through the relay",
        deadline.left(Duration::from_secs(40)),
        |s| {
            s.peers
                .iter()
                .any(|p| p.hostname == "spoke" && p.path == "relay")
        },
    );
    drop(sg);
    let spoke_status =
        c.nodes[spoke].wait_only_peer("relay", deadline.left(Duration::from_secs(30)));
    c.nodes[gw].ping_node(&spoke_status, false, deadline.left(Duration::from_secs(30)));
    c.nodes[relay].wait_status(
        "gw's approved prefix",
        deadline.left(Duration::from_secs(20)),
        |s| {
            s.peers
                .iter()
                .any(|p| p.hostname == "gw" && !p.advertised.is_empty())
        },
    );

    let text = c.nodes[gw].status_text();
    assert!(
        row(&text, "spoke").ends_with(" relay - via relay -")
            || row(&text, "spoke").ends_with(" via relay -"),
        "{text}"
    );
    assert!(
        row(&text, "relay").contains(" direct ") && row(&text, "relay").contains("s ago"),
        "{text}"
    );
    assert!(
        text.contains(
            "  advertises 198.51.100.0/24   (approved or pending: see `nexodus devices`)"
        ),
        "{text}"
    );
    let relay_text = c.nodes[relay].status_text();
    assert!(
        relay_text
            .contains("subnets routed through peers:\n  gw                 198.51.100.0/24\n"),
        "{relay_text}"
    );

    // The kernel's router solicitations and MLD reports into the TUN are set apart.
    let ignored = wait_until(
        "the kernel's link-local packets to be seen",
        deadline.left(Duration::from_secs(20)),
        || {
            let s = c.nodes[relay].current();
            (s.link_local_ignored > 0).then_some(s)
        },
    );
    for n in &c.nodes {
        let s = n.current();
        assert!(
            !s.drops.contains_key("no_route"),
            "{}: {:?}",
            n.name,
            s.drops
        );
        let text = n.status_text();
        assert!(!text.contains('{'), "{text}");
    }
    drop(ignored);

    let table = c.coord.admin(&["devices"]);
    for name in ["relay", "gw", "spoke"] {
        let r = row(&table, &c.coord.device_id(name).to_string());
        assert_eq!(r.matches(" online").count(), 2, "{name}: {table}");
        assert!(!r.contains("s ago"), "{name}: {table}");
    }
}

fn forwarding(ns: &Netns) -> (String, String) {
    (
        ns.ok(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim()
            .to_string(),
        ns.ok(&["cat", "/proc/sys/net/ipv6/conf/all/forwarding"])
            .trim()
            .to_string(),
    )
}

/// A subnet router enables forwarding only once the coordinator took and an admin
/// approved its prefixes, and puts back what was there when they are revoked and when
/// it stops; a refused prefix leaves the host as it was (issue 18, item 6).
#[test]
fn forwarding_follows_the_accepted_prefix() {
    let deadline = Deadline::after(Duration::from_secs(90));
    let mut c = Cluster::new("fhf", "203.0.113.1/24");
    let gw = c.add_node("gw", "203.0.113.2/24", true, &[]);
    let ovl = c.add_node("ovl", "203.0.113.3/24", true, &[]);
    let off = ("0".to_string(), "0".to_string());
    for i in [gw, ovl] {
        let ns = &c.nodes[i].ns;
        ns.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
        ns.ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"]);
        assert_eq!(forwarding(ns), off);
    }
    c.start_with(
        gw,
        &["--advertise-cidr", "198.51.100.0/24,2001:db8:100::/64"],
    );
    c.nodes[gw].wait_status("to run", deadline.left(Duration::from_secs(30)), |s| {
        s.coordinator_connected
    });
    wait_until("gw online", deadline.left(Duration::from_secs(10)), || {
        c.coord.device("gw").filter(|d| d.online).map(|_| ())
    });
    // Registered, watching, not approved: nothing is routed to it, nothing forwarded.
    assert_eq!(forwarding(&c.nodes[gw].ns), off);
    let on = ("1".to_string(), "1".to_string());
    let becomes = |ns: &Netns, want: &(String, String), what: &str| {
        wait_until(what, deadline.left(Duration::from_secs(5)), || {
            (forwarding(ns) == *want).then_some(())
        });
    };
    let both = "198.51.100.0/24,2001:db8:100::/64";
    c.approve_routes(gw, both);
    becomes(&c.nodes[gw].ns, &on, "forwarding on once approved");
    c.revoke(gw, &[]);
    becomes(&c.nodes[gw].ns, &off, "forwarding back off once revoked");
    c.approve_routes(gw, both);
    becomes(&c.nodes[gw].ns, &on, "forwarding on again");

    // Refused by the coordinator (overlap): forwarding stays as it was.
    c.start_with(ovl, &["--advertise-cidr", "198.51.100.128/25"]);
    let code = c.nodes[ovl]
        .exit_within(deadline.left(Duration::from_secs(30)))
        .expect("refused node still running");
    assert!(!code.success());
    assert!(c.nodes[ovl].log_text().contains("advertised by device"));
    assert_eq!(forwarding(&c.nodes[ovl].ns), off);

    // A normal exit restores it.
    c.nodes[gw].stop_within(deadline.left(Duration::from_secs(10)));
    assert_eq!(forwarding(&c.nodes[gw].ns), off);
}
