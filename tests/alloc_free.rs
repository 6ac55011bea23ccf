//! Steady-state packet processing must not touch the heap.
//!
//! A counting global allocator (wrapping `System`) counts allocations made by
//! the current thread while its (thread-local) flag is on; counts are
//! per-thread too, so tests running in parallel do not disturb each other. Each test establishes a session
//! between two data planes (or two spokes and a relay), warms up, then encrypts and
//! decrypts (and relays) 10 000 packets in each direction with reused buffers and
//! expects zero allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nexodus::node::testutil::{
    A_V4, A_V6, B_ID, B_V4, B_V6, BUF_LEN, Pair, Relayed, Side, connected_pair, hundred_rules,
    ip_packet, ipv4_packet, ipv6_packet, pair_table, relayed, tcp_header, udp_datagram,
};
use nexodus::node::{DataPlane, DropReason, Incoming, Outgoing};

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

/// Runs `deliver` (one packet through, `true` if it arrived intact) 100 times to
/// warm up, then `ITERATIONS` times counting allocations: none may fail or allocate.
fn assert_allocation_free(what: &str, mut deliver: impl FnMut() -> bool) {
    assert_eq!((0..100).filter(|_| !deliver()).count(), 0, "warm-up {what}");
    let mut failures = 0;
    let allocs = allocations_during(|| {
        failures = (0..ITERATIONS).filter(|_| !deliver()).count();
    });
    assert_eq!(failures, 0, "{what} deliveries failed");
    assert_eq!(
        allocs, 0,
        "{what} allocated {allocs} times in {ITERATIONS} packets"
    );
}

/// Drains `dp`'s transmissions; `true` if there were none.
fn quiet(dp: &mut DataPlane, out: &mut [u8]) -> bool {
    let mut quiet = true;
    while dp.poll_transmit(out).is_some() {
        quiet = false;
    }
    quiet
}

/// Buffers reused by every packet.
struct Bufs {
    tun: Vec<u8>,
    wire: Vec<u8>,
    plain: Vec<u8>,
    forward: Vec<u8>,
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
            forward: vec![0u8; BUF_LEN],
            flush: vec![0u8; BUF_LEN],
        }
    }
}

/// Encrypts `packet` on `tx` and decrypts it on `rx`.
fn shuttle(
    tx: &mut DataPlane,
    rx: &mut DataPlane,
    from: SocketAddr,
    packet: &[u8],
    bufs: &mut Bufs,
) -> bool {
    let arrived = match tx.handle_tun_packet(&mut bufs.tun, packet.len(), &mut bufs.wire) {
        Outgoing::Send { data, .. } => matches!(
            rx.handle_datagram(from, data, &mut bufs.plain),
            Incoming::WriteTun { packet: got, .. } if got == packet
        ),
        _ => false,
    };
    quiet(rx, &mut bufs.flush) & quiet(tx, &mut bufs.flush) & arrived
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
    assert_allocation_free("A→B", || shuttle(a, b, *a_addr, a_to_b, &mut bufs));
    let mut bufs = Bufs::new(b_to_a);
    assert_allocation_free("B→A", || shuttle(b, a, *b_addr, b_to_a, &mut bufs));
    assert_eq!(a.counters().total_drops(), 0);
    assert_eq!(b.counters().total_drops(), 0);
}

/// Spoke A encrypts `packet` for the relay, the relay re-encrypts it for spoke B,
/// B decrypts it.
fn relay_once(net: &mut Relayed, packet: &[u8], bufs: &mut Bufs) -> bool {
    let Relayed {
        a,
        r,
        b,
        a_addr,
        r_addr,
        ..
    } = net;
    let arrived = match a.handle_tun_packet(&mut bufs.tun, packet.len(), &mut bufs.wire) {
        Outgoing::Send { data, .. } => {
            match r.handle_datagram_or_forward(
                *a_addr,
                None,
                data,
                &mut bufs.plain,
                &mut bufs.forward,
            ) {
                Incoming::Forward { data, .. } => matches!(
                    b.handle_datagram(*r_addr, data, &mut bufs.wire),
                    Incoming::WriteTun { packet: got, .. } if got == packet
                ),
                _ => false,
            }
        }
        _ => false,
    };
    let flush = &mut bufs.flush;
    quiet(a, flush) & quiet(r, flush) & quiet(b, flush) & arrived
}

#[test]
fn relay_forwarding_is_allocation_free() {
    let mut net = relayed();
    for packet in [ipv4_packet(A_V4, B_V4, 1000), ipv6_packet(A_V6, B_V6, 1380)] {
        let mut bufs = Bufs::new(&packet);
        assert_allocation_free("A→R→B", || relay_once(&mut net, &packet, &mut bufs));
    }
    assert_eq!(
        net.r.counters().relayed_packets,
        2 * (100 + ITERATIONS as u64)
    );
    for dp in [&net.a, &net.r, &net.b] {
        assert_eq!(dp.counters().total_drops(), 0);
    }
}

/// A relay enforcing a 100-rule table for spoke B (a stock WireGuard device).
#[test]
fn relay_filtering_for_an_unmanaged_peer_is_allocation_free() {
    let mut net = relayed();
    net.r.set_relay_policy(
        B_ID,
        Some(pair_table(&hundred_rules(), Side::B)),
        Instant::now(),
    );
    for packet in [ipv4_packet(A_V4, B_V4, 1000), ipv6_packet(A_V6, B_V6, 1380)] {
        let mut bufs = Bufs::new(&packet);
        assert_allocation_free("A→R→B filtered", || {
            relay_once(&mut net, &packet, &mut bufs)
        });
    }
    for dp in [&net.a, &net.r, &net.b] {
        assert_eq!(dp.counters().total_drops(), 0);
    }
}

#[test]
fn steady_state_ipv4_is_allocation_free() {
    check_both_directions(&ipv4_packet(A_V4, B_V4, 1000), &ipv4_packet(B_V4, A_V4, 77));
}

#[test]
fn steady_state_ipv6_is_allocation_free() {
    check_both_directions(&ipv6_packet(A_V6, B_V6, 1380), &ipv6_packet(B_V6, A_V6, 33));
}

/// A policy at both ends: B has 100 rules (the last lets A in), A lets nothing in,
/// so B's packets reach A only as replies of A's flows.
fn policed_pair() -> Pair {
    let mut pair = connected_pair();
    let now = Instant::now();
    pair.b
        .set_policy(Some(pair_table(&hundred_rules(), Side::B)), now);
    pair.a.set_policy(Some(pair_table("", Side::A)), now);
    pair
}

#[test]
fn policy_filter_is_allocation_free() {
    let ping4 = (ipv4_packet(A_V4, B_V4, 1000), ipv4_packet(B_V4, A_V4, 77));
    let ping6 = (ipv6_packet(A_V6, B_V6, 1380), ipv6_packet(B_V6, A_V6, 33));
    for (a_to_b, b_to_a) in [ping4, ping6] {
        let mut pair = policed_pair();
        let Pair {
            a,
            b,
            a_addr,
            b_addr,
            ..
        } = &mut pair;
        let mut bufs = Bufs::new(&a_to_b);
        assert!(shuttle(a, b, *a_addr, &a_to_b, &mut bufs));
        let mut bufs = Bufs::new(&b_to_a);
        assert_allocation_free("policed B→A reply", || {
            shuttle(b, a, *b_addr, &b_to_a, &mut bufs)
        });
        let mut bufs = Bufs::new(&a_to_b);
        assert_allocation_free("policed A→B", || {
            shuttle(a, b, *a_addr, &a_to_b, &mut bufs)
        });
        assert_eq!(a.counters().total_drops(), 0);
        assert_eq!(b.counters().total_drops(), 0);
    }
}

#[test]
fn new_flows_and_policy_drops_are_allocation_free() {
    let mut pair = policed_pair();
    let Pair { a, b, a_addr, .. } = &mut pair;
    // Every packet a new UDP flow (the source port changes in place).
    let udp = ip_packet(A_V4.into(), B_V4.into(), 17, &udp_datagram(1, 53, 100));
    let mut bufs = Bufs::new(&udp);
    let mut port = 1u16;
    assert_allocation_free("new flows A→B", || {
        port += 1;
        bufs.tun[20..22].copy_from_slice(&port.to_be_bytes());
        let arrived = match a.handle_tun_packet(&mut bufs.tun, udp.len(), &mut bufs.wire) {
            Outgoing::Send { data, .. } => matches!(
                b.handle_datagram(*a_addr, data, &mut bufs.plain),
                Incoming::WriteTun { packet, .. } if packet[20..22] == port.to_be_bytes()
            ),
            _ => false,
        };
        quiet(a, &mut bufs.flush) & quiet(b, &mut bufs.flush) & arrived
    });
    assert!(b.filter().is_some_and(|f| f.live_flows() > ITERATIONS));
    // Denied at A: B's TCP to A's port 22 (no flow, no rule).
    let syn = ip_packet(B_V6.into(), A_V6.into(), 6, &tcp_header(40000, 22));
    let mut bufs = Bufs::new(&syn);
    let b_addr = pair.b_addr;
    let (a, b) = (&mut pair.a, &mut pair.b);
    assert_allocation_free("policy drops", || {
        let dropped = match b.handle_tun_packet(&mut bufs.tun, syn.len(), &mut bufs.wire) {
            Outgoing::Send { data, .. } => matches!(
                a.handle_datagram(b_addr, data, &mut bufs.plain),
                Incoming::Drop(DropReason::Policy)
            ),
            _ => false,
        };
        quiet(a, &mut bufs.flush) & quiet(b, &mut bufs.flush) & dropped
    });
    assert_eq!(a.counters().policy, 100 + ITERATIONS as u64);
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

/// Rootless mode's packet pipe: the data path's batched write and read
/// (`send_from`/`recv_into`) and the stack side's take/push/pop/recycle move packets
/// in the pipe's own buffers, allocated once.
#[test]
fn rootless_packet_pipe_is_allocation_free() {
    use nexodus::io::packet_pipe;
    let (dp, stack) = packet_pipe::pair(8, 8, packet_pipe::SLOT).expect("pipe");
    let packet = ipv4_packet(A_V4, B_V4, 100);
    let batch = vec![packet.clone(); 4];
    let mut bufs = vec![vec![0u8; packet_pipe::SLOT]; 4];
    let mut sizes = [0usize; 4];
    assert_allocation_free("rootless packet pipe", || {
        // Data path → stack.
        let Ok(written) = dp.send_from(&batch, 0) else {
            return false;
        };
        if written.sent != 4 {
            return false;
        }
        let mut intact = 0;
        while let Ok(Some(p)) = stack.pop() {
            intact += usize::from(p.bytes() == packet.as_slice());
            stack.recycle(p);
        }
        stack.notify_freed();
        stack.drain_wake();
        // Stack → data path.
        for _ in 0..4 {
            let Ok(Some(mut b)) = stack.take_free(true) else {
                return false;
            };
            b[..packet.len()].copy_from_slice(&packet);
            if stack.push(b, packet.len()).is_err() {
                return false;
            }
        }
        stack.signal_peer();
        let Ok(4) = dp.recv_into(&mut bufs, &mut sizes, 0) else {
            return false;
        };
        intact += bufs
            .iter()
            .zip(&sizes)
            .filter(|(b, n)| b.get(..**n) == Some(packet.as_slice()))
            .count();
        dp.drain_wake();
        intact == 8
    });
}

/// The TUN write's coalescer: planning a batch of 64 TCP segments (grouped into
/// super-packets, their first packets' headers rewritten) and walking the writes
/// allocates nothing.
#[test]
fn tun_write_coalescing_is_allocation_free() {
    use nexodus::wire::gro::{Coalescer, VIRTIO_HDR_LEN};
    let segment = |seq: u32| {
        let mut tcp = tcp_header(40000, 5201);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[13] = 0x10; // ACK
        tcp.extend(std::iter::repeat_n(0xab, 1400));
        let mut slot = vec![0u8; VIRTIO_HDR_LEN];
        slot.extend(ip_packet(A_V4.into(), B_V4.into(), 6, &tcp));
        slot
    };
    let batch: Vec<Vec<u8>> = (0..64).map(|i| segment(i * 1400)).collect();
    let mut bufs = batch.clone();
    let mut gro = Coalescer::with_capacity(128, true);
    assert_allocation_free("TUN write coalescing", || {
        for (buf, original) in bufs.iter_mut().zip(&batch) {
            buf.copy_from_slice(original);
        }
        gro.plan(&mut bufs, VIRTIO_HDR_LEN);
        let (mut writes, mut packets) = (0, 0);
        for w in gro.writes() {
            writes += 1;
            packets += 1 + w.members().count();
        }
        // 64 segments of 1,400 bytes: 46 in the first super-packet (below 65,535
        // bytes), 18 in the second.
        writes == 2 && packets == 64
    });
}
