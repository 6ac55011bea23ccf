//! A cloned node (its state directory copied to another host, as a VM or container
//! image would be) is refused by the coordinator while the original is connected,
//! with a message naming the original's address; the original keeps its traffic.
//! Also across two PostgreSQL replicas: the clone reaches another replica than the
//! original. Namespaces on bridges "cln" and "clpg", interfaces `cln*` and `clpg*`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, wait_until};
use common::proc;
use nexodus::store::testpg::TempPostgres;

#[test]
fn cloned_state_dir_on_another_host_is_refused_naming_the_first() {
    let mut c = Cluster::new("cln", "203.0.113.1/24");
    let a = c.add_node("a", "203.0.113.2/24", true, &["--interface", "cln0"]);
    let b = c.add_node("b", "203.0.113.3/24", true, &["--interface", "cln1"]);
    // The clone's host: its own namespace and address, not started by the harness.
    let x = c.add_node("x", "203.0.113.4/24", true, &["--interface", "cln2"]);
    c.start(a);
    c.start(b);
    let sa = c.nodes[a].wait_peers(1);
    c.nodes[b].wait_peers(1);
    let ip_a = sa.device.tunnel_ip.to_string();
    assert!(c.nodes[b].ns.ping_until(&ip_a, Duration::from_secs(20)));

    // The copy: a's state directory as it is on disk, on another host.
    let clone_dir = c.nodes[x].dir.clone();
    std::fs::create_dir_all(&clone_dir).unwrap();
    let src = format!("{}/.", c.nodes[a].dir.display());
    let st = Command::new("cp")
        .args(["-a", &src, clone_dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let log = c.scratch("clone").join("clone.log");
    let coordinator = c.nodes[a].coordinator.clone();
    let started = Instant::now();
    let mut clone = c.nodes[x].ns.spawn_nexodus(
        &[
            "join",
            &coordinator,
            "--hostname",
            "a",
            "--interface",
            "cln2",
            "--state-dir",
            clone_dir.to_str().unwrap(),
        ],
        &log,
    );
    let status = proc::exit_within(&mut clone, Duration::from_secs(40)).unwrap_or_else(|| {
        panic!(
            "the clone still runs:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    eprintln!("clone stopped after {:?}", started.elapsed());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    let id = sa.device.id;
    assert!(
        text.contains(&format!("device {id} already connected from 203.0.113.2:")),
        "{text}"
    );
    // The original keeps its record, its endpoint and its traffic.
    assert!(c.nodes[a].alive());
    assert!(c.nodes[a].status().is_some(), "status socket gone");
    let rec = c.coord.device("a").unwrap();
    assert!(
        rec.endpoints
            .iter()
            .all(|e| e.ip().to_string() != "203.0.113.4"),
        "the clone moved the endpoint: {:?}",
        rec.endpoints
    );
    assert!(rec.online);
    assert!(c.nodes[b].ns.ping_until(&ip_a, Duration::from_secs(5)));
    // A restart of the original itself (a new process, same state) is served.
    c.nodes[a].stop();
    c.nodes[a].start(None);
    c.nodes[a].wait_peers(1);
    assert!(c.nodes[b].ns.ping_until(&ip_a, Duration::from_secs(20)));
}

/// Copies a node's state directory as it is on disk to `to`.
fn copy_state(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    let src = format!("{}/.", from.display());
    let st = Command::new("cp")
        .args(["-a", &src, to.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Two replicas on one PostgreSQL database: the original is connected through
/// replica A, its clone reaches only replica B and is refused with the same message
/// as on one coordinator; the original keeps its traffic, and when A is SIGKILLed it
/// (the same process) moves to B within the failover bound.
#[test]
fn clone_reaching_another_replica_is_refused() {
    let mut c = Cluster::new("clpg", "203.0.113.1/24");
    // The cluster's own (SQLite) coordinator is not used here.
    c.coord.kill();
    let ns = c.coord.ns.name.clone();
    for ip in ["203.0.113.2/24", "203.0.113.3/24"] {
        c.coord.ns.ok(&["ip", "addr", "add", ip, "dev", "eth0"]);
    }
    let pg = TempPostgres::start_with("127.0.0.1", Some(&ns)).unwrap();
    pg.create_database("nx").unwrap();
    let url = pg.url("nx");
    let logs = c.scratch("logs");
    let spawn_replica = |ip: &str| c.coord.spawn_replica(ip, &url, &logs);
    let (mut ra, a_log) = spawn_replica("203.0.113.2");
    let (mut rb, b_log) = spawn_replica("203.0.113.3");
    let dump = |what: &str| {
        format!(
            "{what}\n===== replica A =====\n{}\n===== replica B =====\n{}",
            std::fs::read_to_string(&a_log).unwrap_or_default(),
            std::fs::read_to_string(&b_log).unwrap_or_default()
        )
    };
    let socket_url = format!(
        "host={} port={} user={} dbname=nx",
        pg.socket_dir().display(),
        pg.port,
        nexodus::store::testpg::USER
    );
    let admin = |args: &[&str]| {
        common::admin_command(args, &["--database-url", &socket_url])
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    };
    let token = admin(&["token", "create", "--reusable"]).trim().to_string();

    // A listed first: both nodes connect through it.
    let both = "203.0.113.2:4443,203.0.113.3:4443";
    let o = c.add_node("o", "203.0.113.11/24", true, &["--interface", "clpg0"]);
    let p = c.add_node("p", "203.0.113.12/24", true, &["--interface", "clpg1"]);
    let x = c.add_node("x", "203.0.113.13/24", true, &["--interface", "clpg2"]);
    for i in [o, p] {
        c.nodes[i].coordinator = both.into();
    }
    c.nodes[o].start(Some(&token));
    c.nodes[p].start(Some(&token));
    let so = c.nodes[o].wait_peers(1);
    c.nodes[p].wait_peers(1);
    let id = so.device.id;
    let ip_o = so.device.tunnel_ip.to_string();
    assert!(c.nodes[p].ns.ping_until(&ip_o, Duration::from_secs(20)));
    wait_until("o to watch through A", Duration::from_secs(20), || {
        std::fs::read_to_string(&a_log)
            .ok()?
            .contains(&format!("watch started id={id} "))
            .then_some(())
    });

    // The copy, on another host, told only of replica B.
    let clone_dir = c.nodes[x].dir.clone();
    copy_state(&c.nodes[o].dir, &clone_dir);
    let log = c.scratch("clone").join("clone.log");
    let started = Instant::now();
    let mut clone = c.nodes[x].ns.spawn_nexodus(
        &[
            "join",
            "203.0.113.3:4443",
            "--hostname",
            "o",
            "--interface",
            "clpg2",
            "--state-dir",
            clone_dir.to_str().unwrap(),
        ],
        &log,
    );
    let status = proc::exit_within(&mut clone, Duration::from_secs(40)).unwrap_or_else(|| {
        panic!(
            "{}",
            dump(&format!(
                "the clone still runs:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        )
    });
    eprintln!("clone stopped after {:?}", started.elapsed());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{}", dump(&text));
    assert!(
        text.contains(&format!("device {id} already connected from 203.0.113.11:")),
        "{}",
        dump(&text)
    );
    // The original keeps its endpoint, its online flag and its traffic.
    assert!(c.nodes[o].alive());
    assert!(c.nodes[o].status().is_some(), "status socket gone");
    let devices: Vec<nexodus::wire::control::Device> =
        serde_json::from_str(&admin(&["devices", "--json"])).unwrap();
    let rec = devices.iter().find(|d| d.id == id).unwrap();
    assert!(rec.online);
    assert!(
        rec.endpoints
            .iter()
            .all(|e| e.ip().to_string() != "203.0.113.13"),
        "the clone moved the endpoint: {:?}",
        rec.endpoints
    );
    assert!(c.nodes[p].ns.ping_until(&ip_o, Duration::from_secs(5)));

    // A dies: the original, the same process, is taken on by B.
    let _ = ra.kill();
    let killed = Instant::now();
    let _ = ra.wait();
    let log_o = c.nodes[o].log.clone();
    wait_until("o to watch through B", Duration::from_secs(60), || {
        let b = std::fs::read_to_string(&b_log).ok()?;
        let reconnected = std::fs::read_to_string(&log_o)
            .ok()?
            .contains("reconnected to the coordinator");
        (reconnected && b.contains(&format!("watch started id={id} "))).then_some(())
    });
    let moved = killed.elapsed();
    eprintln!("the original moved to replica B {moved:?} after the kill");
    assert!(moved <= Duration::from_secs(20), "{moved:?}");
    assert!(
        !std::fs::read_to_string(&b_log)
            .unwrap()
            .contains(&format!("watch ended id={id} ")),
        "{}",
        dump("o's watch on B ended")
    );
    assert!(c.nodes[o].alive());
    assert!(c.nodes[p].ns.ping_until(&ip_o, Duration::from_secs(20)));
    let _ = rb.kill();
    let _ = rb.wait();
}
