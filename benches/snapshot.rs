//! A node's snapshot of N peers applied from scratch: the mesh plans the peers and
//! routes, the data plane installs every peer (no `Tunn` yet: those are made on first
//! use). Kernel routes are not part of it (they go to `ip -batch` on their own thread).
//! Run: `cargo bench --bench snapshot` (criterion).

mod common;

use std::time::Instant;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use nexodus::node::dataplane::{DataPlane, PeerConfig};
use nexodus::node::mesh::{Action, LocalView, MeshState};
use nexodus::wire::control::Device;

fn fresh() -> (MeshState, DataPlane) {
    let mesh = MeshState::new(LocalView {
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
    (mesh, DataPlane::new(common::key(u64::MAX)))
}

/// Applies the snapshot; returns the number of routes the kernel would get.
fn apply(mesh: &mut MeshState, dp: &mut DataPlane, devices: &[Device]) -> usize {
    let mut routes = 0;
    for a in mesh.apply_snapshot(devices, Instant::now()) {
        match a {
            Action::UpsertPeer(p) => dp
                .upsert_peer(
                    p.id,
                    PeerConfig {
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        allowed_ips: p.allowed_ips,
                        persistent_keepalive: Some(20),
                    },
                )
                .expect("peer"),
            Action::AddRoute(_) => routes += 1,
            _ => {}
        }
    }
    routes
}

fn snapshot_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("snapshot_apply");
    group.sample_size(10);
    for peers in [1_000i64, 10_000] {
        let devices: Vec<Device> = (1..=peers).map(common::device).collect();
        group.bench_with_input(
            BenchmarkId::from_parameter(peers),
            &devices,
            |b, devices| {
                b.iter_batched(
                    fresh,
                    |(mut mesh, mut dp)| {
                        let routes = apply(&mut mesh, &mut dp, devices);
                        (mesh, dp, routes)
                    },
                    BatchSize::PerIteration,
                );
            },
        );
    }
    group.finish();
}

criterion_group!(benches, snapshot_apply);
criterion_main!(benches);
