//! Per-packet cost of the data plane with an established session.
//!
//! * `encapsulate_route`: `handle_tun_packet` (header parse, longest-prefix
//!   lookup, padding, ChaCha20-Poly1305 seal).
//! * `decapsulate_check`: `handle_datagram` (peer by receiver index, open,
//!   replay check, source-address check). Each iteration needs a fresh
//!   datagram (replay protection), produced outside the timed routine.
//!
//! * `policy`: both paths again, each with no policy and with a 100-rule policy in
//!   force at the receiver (whose last rule lets the sender in; the sender's own
//!   policy admits nothing, so its outbound packets record flows), in the same run:
//!   `decapsulate/none` vs `decapsulate/100_rules` is the filter's per-packet cost on
//!   an established flow. `policy_rules` is the cost of deciding a new flow against
//!   those 100 rules (the match is the last rule); `filter_*_live_flow` the filter
//!   alone on a packet of a live flow (steadier than the difference of two runs on
//!   a busy machine).
//!
//! Sizes are inner IPv4 packet lengths; throughput is in packets.

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Instant;

use nexodus::node::filter::{Filter, Verdict};
use nexodus::node::testutil::{
    A_V4, B_V4, BUF_LEN, Pair, Side, connected_pair, hundred_rules, ipv4_packet, pair_table,
};
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

/// A connected pair; with `rules`, B enforces the 100-rule policy and A a policy
/// that admits nothing new (replies of A's flows only).
fn policed(rules: bool) -> Pair {
    let mut pair = connected_pair();
    if rules {
        let now = Instant::now();
        pair.b
            .set_policy(Some(pair_table(&hundred_rules(), Side::B)), now);
        pair.a.set_policy(Some(pair_table("", Side::A)), now);
    }
    pair
}

fn policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    group.throughput(Throughput::Elements(1));
    for size in [64, 1420] {
        for (name, rules) in [("none", false), ("100_rules", true)] {
            let packet = ipv4_packet(A_V4, B_V4, size - 20);
            let mut buf = vec![0u8; BUF_LEN];
            buf[..size].copy_from_slice(&packet);
            let mut wire = vec![0u8; BUF_LEN];
            let mut out = vec![0u8; BUF_LEN];

            let mut pair = policed(rules);
            let id = BenchmarkId::new(format!("encapsulate/{name}"), size);
            group.bench_function(id, |b| {
                b.iter(
                    || match pair.a.handle_tun_packet(&mut buf, size, &mut wire) {
                        Outgoing::Send { data, .. } => black_box(data.len()),
                        other => panic!("unexpected {other:?}"),
                    },
                )
            });

            let mut pair = policed(rules);
            let Pair { a, b, a_addr, .. } = &mut pair;
            let from = *a_addr;
            let id = BenchmarkId::new(format!("decapsulate/{name}"), size);
            group.bench_function(id, |bench| {
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
    }
    group.finish();

    let mut group = c.benchmark_group("policy_rules");
    group.throughput(Throughput::Elements(1));
    let table = pair_table(&hundred_rules(), Side::B);
    let (src, dst) = (A_V4.into(), B_V4.into());
    group.bench_function("allows_last_of_100", |b| {
        b.iter(|| black_box(table.allows(black_box(src), dst, 17, Some(53))))
    });
    // The filter alone on a packet of a live flow: what each packet pays.
    let mut filter = Filter::new(table, Instant::now());
    let packet = ipv4_packet(A_V4, B_V4, 1400);
    assert_eq!(filter.inbound(&packet), Verdict::Pass);
    group.bench_function("filter_inbound_live_flow", |b| {
        b.iter(|| black_box(filter.inbound(black_box(&packet))))
    });
    let reply = ipv4_packet(B_V4, A_V4, 1400);
    group.bench_function("filter_outbound_live_flow", |b| {
        b.iter(|| black_box(filter.outbound(black_box(&reply))))
    });
    group.finish();
}

criterion_group!(benches, encapsulate_route, decapsulate_check, policy);
criterion_main!(benches);
