//! Memory of a node's peer state: RSS growth of one process holding the data plane
//! (one boringtun `Tunn` per peer, routing table) and the mesh state for N peers.
//! Run: `cargo bench --bench peers_memory` (prints figures; asserts nothing).

use std::time::Instant;

use nexodus::coord::keys::encode_key;
use nexodus::node::dataplane::{DataPlane, PeerConfig};
use nexodus::node::mesh::{LocalView, MeshState};
use nexodus::wire::control::Device;
use sha2::Digest;

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

fn key(n: u64) -> [u8; 32] {
    let secret: [u8; 32] = sha2::Sha256::digest(n.to_le_bytes()).into();
    *boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(secret)).as_bytes()
}

fn device(id: i64) -> Device {
    let n = id as u32;
    Device {
        id,
        organization_id: 1,
        public_key: encode_key(&key(id as u64)),
        hostname: format!("node{id}"),
        os: "linux".into(),
        tunnel_ip: std::net::Ipv4Addr::from(0x6440_0000 + n),
        tunnel_ip_v6: Some(std::net::Ipv6Addr::from(0x0200_u128 << 112 | u128::from(n))),
        organization_prefix: "100.64.0.0/10".parse().expect("literal"),
        organization_prefix_v6: "200::/64".parse().expect("literal"),
        local_ip: None,
        local_ip_v6: None,
        endpoints: vec![std::net::SocketAddr::from((
            [192, 0, 2, (n % 250) as u8 + 1],
            51820,
        ))],
        reflexive_endpoint: None,
        symmetric_nat: false,
        relay: false,
        relay_only: false,
        ipv6_supported: true,
        advertise_cidrs: vec![],
        revision: 1,
        last_seen: 0,
        unmanaged: false,
        online: true,
        exit_node: false,
        approved: Default::default(),
    }
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
