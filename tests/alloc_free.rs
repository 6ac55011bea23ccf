//! Steady-state packet processing must not touch the heap.
//!
//! A counting global allocator (wrapping `System`) counts allocations made by
//! the current thread while its (thread-local) flag is on; counts are
//! per-thread too, so tests running in parallel do not disturb each other. Each test establishes a session
//! between two data planes, warms up, then encrypts and decrypts 10 000
//! packets in each direction with reused buffers and expects zero allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nexodus::node::testutil::{
    A_V4, A_V6, B_V4, B_V6, BUF_LEN, Pair, connected_pair, ipv4_packet, ipv6_packet,
};
use nexodus::node::{DataPlane, Incoming, Outgoing};

struct CountingAlloc;

/// Allocations counted over all threads (for the report only).
static TOTAL_COUNTED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        TOTAL_COUNTED.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Allocations made by this thread while running `f`.
fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get) - before
}

const ITERATIONS: usize = 10_000;

/// Encrypts `packet` on `tx` and decrypts it on `rx` `n` times; returns how
/// many round trips did not deliver the packet intact.
fn shuttle(
    tx: &mut DataPlane,
    rx: &mut DataPlane,
    from: SocketAddr,
    packet: &[u8],
    bufs: &mut Bufs,
    n: usize,
) -> usize {
    let mut failures = 0;
    let len = packet.len();
    for _ in 0..n {
        match tx.handle_tun_packet(&mut bufs.tun, len, &mut bufs.wire) {
            Outgoing::Send { data, .. } => match rx.handle_datagram(from, data, &mut bufs.plain) {
                Incoming::WriteTun { packet: got, .. } if got == packet => {}
                _ => failures += 1,
            },
            _ => failures += 1,
        }
        while rx.poll_transmit(&mut bufs.flush).is_some() {
            failures += 1;
        }
        while tx.poll_transmit(&mut bufs.flush).is_some() {
            failures += 1;
        }
    }
    failures
}

struct Bufs {
    tun: Vec<u8>,
    wire: Vec<u8>,
    plain: Vec<u8>,
    flush: Vec<u8>,
}

impl Bufs {
    fn new(packet: &[u8]) -> Self {
        let mut tun = vec![0u8; BUF_LEN];
        tun[..packet.len()].copy_from_slice(packet);
        Bufs {
            tun,
            wire: vec![0u8; BUF_LEN],
            plain: vec![0u8; BUF_LEN],
            flush: vec![0u8; BUF_LEN],
        }
    }
}

fn check_both_directions(a_to_b: &[u8], b_to_a: &[u8]) {
    let mut pair = connected_pair();
    let Pair {
        a,
        b,
        a_addr,
        b_addr,
        ..
    } = &mut pair;

    let mut bufs = Bufs::new(a_to_b);
    assert_eq!(
        shuttle(a, b, *a_addr, a_to_b, &mut bufs, 100),
        0,
        "warm-up A→B"
    );
    let mut failures = 0;
    let allocs = allocations_during(|| {
        failures = shuttle(a, b, *a_addr, a_to_b, &mut bufs, ITERATIONS);
    });
    assert_eq!(failures, 0, "A→B deliveries failed");
    assert_eq!(
        allocs, 0,
        "A→B allocated {allocs} times in {ITERATIONS} packets"
    );

    let mut bufs = Bufs::new(b_to_a);
    assert_eq!(
        shuttle(b, a, *b_addr, b_to_a, &mut bufs, 100),
        0,
        "warm-up B→A"
    );
    let allocs = allocations_during(|| {
        failures = shuttle(b, a, *b_addr, b_to_a, &mut bufs, ITERATIONS);
    });
    assert_eq!(failures, 0, "B→A deliveries failed");
    assert_eq!(
        allocs, 0,
        "B→A allocated {allocs} times in {ITERATIONS} packets"
    );

    assert_eq!(a.counters().total_drops(), 0);
    assert_eq!(b.counters().total_drops(), 0);
}

#[test]
fn steady_state_ipv4_is_allocation_free() {
    check_both_directions(&ipv4_packet(A_V4, B_V4, 1000), &ipv4_packet(B_V4, A_V4, 77));
}

#[test]
fn steady_state_ipv6_is_allocation_free() {
    check_both_directions(&ipv6_packet(A_V6, B_V6, 1380), &ipv6_packet(B_V6, A_V6, 33));
}

#[test]
fn quiet_timer_ticks_are_allocation_free() {
    let mut pair = connected_pair();
    let mut out = vec![0u8; BUF_LEN];
    let t0 = Instant::now();
    pair.a.handle_timeout(t0);
    while pair.a.poll_transmit(&mut out).is_some() {}
    let allocs = allocations_during(|| {
        for i in 1..=100u32 {
            pair.a.handle_timeout(t0 + Duration::from_millis(250) * i);
            while pair.a.poll_transmit(&mut out).is_some() {}
        }
    });
    assert_eq!(allocs, 0);
}

#[test]
fn the_counter_sees_allocations() {
    let allocs = allocations_during(|| {
        std::hint::black_box(vec![1u8; 64]);
    });
    assert!(allocs >= 1);
    assert!(TOTAL_COUNTED.load(Ordering::Relaxed) >= 1);
}
