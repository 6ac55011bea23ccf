//! Per-packet cost of the data plane with an established session.
//!
//! * `encapsulate_route`: `handle_tun_packet` (header parse, longest-prefix
//!   lookup, padding, ChaCha20-Poly1305 seal).
//! * `decapsulate_check`: `handle_datagram` (peer by receiver index, open,
//!   replay check, source-address check). Each iteration needs a fresh
//!   datagram (replay protection), produced outside the timed routine.
//!
//! Sizes are inner IPv4 packet lengths; throughput is in packets.

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nexodus::node::testutil::{A_V4, B_V4, BUF_LEN, Pair, connected_pair, ipv4_packet};
use nexodus::node::{Incoming, Outgoing};

const SIZES: [usize; 3] = [64, 512, 1420];

fn encapsulate_route(c: &mut Criterion) {
    let mut group = c.benchmark_group("encapsulate_route");
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let mut pair = connected_pair();
        let packet = ipv4_packet(A_V4, B_V4, size - 20);
        let mut buf = vec![0u8; BUF_LEN];
        buf[..size].copy_from_slice(&packet);
        let mut out = vec![0u8; BUF_LEN];
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(
                || match pair.a.handle_tun_packet(&mut buf, size, &mut out) {
                    Outgoing::Send { data, .. } => black_box(data.len()),
                    other => panic!("unexpected {other:?}"),
                },
            )
        });
    }
    group.finish();
}

fn decapsulate_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("decapsulate_check");
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let mut pair = connected_pair();
        let Pair { a, b, a_addr, .. } = &mut pair;
        let from = *a_addr;
        let packet = ipv4_packet(A_V4, B_V4, size - 20);
        let mut buf = vec![0u8; BUF_LEN];
        buf[..size].copy_from_slice(&packet);
        let mut wire = vec![0u8; BUF_LEN];
        let mut out = vec![0u8; BUF_LEN];
        group.bench_function(BenchmarkId::from_parameter(size), |bench| {
            bench.iter_batched(
                || match a.handle_tun_packet(&mut buf, size, &mut wire) {
                    Outgoing::Send { data, .. } => data.to_vec(),
                    other => panic!("unexpected {other:?}"),
                },
                |datagram| match b.handle_datagram(from, &datagram, &mut out) {
                    Incoming::WriteTun { packet, .. } => black_box(packet.len()),
                    other => panic!("unexpected {other:?}"),
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, encapsulate_route, decapsulate_check);
criterion_main!(benches);
