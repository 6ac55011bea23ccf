//! A cloned node (its state directory copied to another host, as a VM or container
//! image would be) is refused by the coordinator while the original is connected,
//! with a message naming the original's address; the original keeps its traffic.
//! Namespaces on bridge "cln", interfaces `cln*`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::proc;

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
