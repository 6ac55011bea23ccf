//! Memory of a node's peer state: RSS growth of one process holding the data plane
//! (one boringtun `Tunn` per peer, routing table) and the mesh state for N peers.
//! Run: `cargo bench --bench peers_memory` (prints figures; asserts nothing).

use std::time::Instant;

mod common;

use common::{device, key};
use nexodus::node::dataplane::{DataPlane, PeerConfig};
use nexodus::node::mesh::{LocalView, MeshState};
use nexodus::wire::control::Device;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    for peers in [100usize, 1_000, 10_000] {
        let before = rss_kib();
        let mut dp = DataPlane::new(key(u64::MAX));
        let devices: Vec<Device> = (1..=peers as i64).map(device).collect();
        let mut mesh = MeshState::new(LocalView {
            device_id: 0,
            ipv6: true,
            relay: false,
            spoke: false,
            reflexive: None,
            underlay_v4: true,
            underlay_v6: true,
            org_v4: "100.64.0.0/10".parse().expect("literal"),
            org_v6: "200::/64".parse().expect("literal"),
        });
        let started = Instant::now();
        let actions = mesh.apply_snapshot(&devices, Instant::now());
        let planned = started.elapsed();
        for a in actions {
            if let nexodus::node::mesh::Action::UpsertPeer(p) = a {
                dp.upsert_peer(
                    p.id,
                    PeerConfig {
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        allowed_ips: p.allowed_ips,
                        persistent_keepalive: Some(20),
                    },
                )
                .expect("peer");
            }
        }
        let took = started.elapsed();
        let grown = rss_kib().saturating_sub(before);
        println!(
            "{peers:>6} peers: +{grown} KiB RSS ({:.1} KiB/peer), snapshot applied in {took:?} \
             (planned by the mesh in {planned:?}, the rest in the data plane)",
            grown as f64 / peers as f64
        );
        drop((dp, mesh));
    }
}
