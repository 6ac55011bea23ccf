//! Coordinator benchmarks: registrations per second through the SQLite store (with
//! fsync, as in production), and the cost of one delta reaching N watchers.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use nexodus::coord::keys::encode_key;
use nexodus::coord::token::hash_secret;
use nexodus::serve::hub::{OrgDelta, encode_delta};
use nexodus::store::{DEFAULT_ORG, SqliteStore, Store};
use nexodus::wire::control::RegisterRequest;
use sha2::Digest;

fn request(n: u64) -> RegisterRequest {
    let bytes: [u8; 32] = sha2::Sha256::digest(n.to_le_bytes()).into();
    let public = boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(bytes));
    RegisterRequest {
        public_key: encode_key(public.as_bytes()),
        hostname: format!("bench{n}"),
        os: "linux".into(),
        ipv6_supported: true,
        endpoints: vec!["192.0.2.1:51820".parse().expect("literal")],
        ..Default::default()
    }
}

fn registrations(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = SqliteStore::open(&dir.path().join("bench.db")).expect("open");
    store.ensure_default_org(0).expect("org");
    let org = store.org_by_name(DEFAULT_ORG).expect("org");
    store
        .create_token(org.id, &hash_secret("t"), true, None, 0)
        .expect("token");
    let token = hash_secret("t");
    let mut n = 0u64;
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.bench_function("register_device", |b| {
        b.iter_batched(
            || {
                n += 1;
                request(n)
            },
            |req| {
                black_box(
                    store
                        .register_device(&req, &token, "cred", 1)
                        .expect("register"),
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn delta_fanout(c: &mut Criterion) {
    let device = {
        let mut store = SqliteStore::open_in_memory().expect("store");
        store.ensure_default_org(0).expect("org");
        let org = store.org_by_name(DEFAULT_ORG).expect("org");
        store
            .create_token(org.id, &hash_secret("t"), true, None, 0)
            .expect("token");
        store
            .register_device(&request(1), &hash_secret("t"), "c", 1)
            .expect("register")
    };
    let mut g = c.benchmark_group("delta_to_watchers");
    for n in [100usize, 1_000, 10_000] {
        let (tx, _) = tokio::sync::broadcast::channel::<Arc<OrgDelta>>(16);
        let mut rxs: Vec<_> = (0..n).map(|_| tx.subscribe()).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n}"), |b| {
            b.iter(|| {
                let mut devices = std::collections::BTreeMap::new();
                devices.insert(device.id, Some(device.clone()));
                let delta = Arc::new(encode_delta(2, devices, None).expect("encode"));
                tx.send(delta).expect("send");
                for rx in &mut rxs {
                    black_box(rx.try_recv().expect("recv").frame.len());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, registrations, delta_fanout);
criterion_main!(benches);
