//! Receive coalescing (GRO) for a TUN device with a virtio header: a batch of
//! decrypted IP packets grouped into the fewest writes the kernel takes as one
//! packet each.
//!
//! Consecutive TCP segments of one flow (the next sequence number, the same
//! acknowledgement, options and IP header fields, only ACK and a final PSH set)
//! become one super-packet with `VIRTIO_NET_HDR_GSO_TCPV4`/`TCPV6`; UDP datagrams of
//! one flow of the same size (the last may be shorter) one with `GSO_UDP_L4`, when
//! the device takes it. The first packet of a group keeps its headers, which
//! [`Coalescer::plan`] rewrites in place (lengths, IPv4 header checksum, the
//! pseudo-header sum for `NEEDS_CSUM`); the writer sends the others' payloads after
//! it with one vectored write, so no byte is copied here.
//!
//! Checksums of the coalesced segments are not checked: every packet arrived
//! authenticated by ChaCha20-Poly1305, and the kernel's WireGuard marks such packets
//! `CHECKSUM_UNNECESSARY` for the same reason. Packets that are not coalesced are
//! written as they came (a zero header: the kernel checks them as usual).
//!
//! Order within a flow is kept: a packet of a flow that cannot join the flow's open
//! group (a pure ACK, a gap, a FIN) closes that group, and groups are written in the
//! order of their first packet. Nothing here allocates after
//! [`Coalescer::with_capacity`]; packets past the capacity are written alone.

use smoltcp::wire::checksum;
use smoltcp::wire::{IpProtocol, Ipv4Address, Ipv6Address};

/// Bytes of `struct virtio_net_hdr` before every packet on a TUN with offload.
pub const VIRTIO_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;

/// Largest IP packet a group may grow to (the IPv4 total length field).
const MAX_PACKET: usize = 65_535;
/// Most segments in one UDP super-packet (below the kernel's `UDP_MAX_SEGMENTS`).
const MAX_UDP_SEGMENTS: u16 = 64;

const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

const END: u16 = u16::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// What a packet is to the coalescer.
#[derive(Debug, Clone, Copy)]
struct Segment {
    v6: bool,
    proto: Proto,
    /// IP header length (20 or 40: IPv4 options and IPv6 extension headers are
    /// never coalesced).
    iph: usize,
    /// Transport header length (TCP with options, or 8).
    l4h: usize,
    payload: usize,
    seq: u32,
    flags: u8,
    /// May start or join a group (TCP: payload, only ACK/PSH; UDP: payload).
    eligible: bool,
}

/// One write: a group of packets of one flow, or a packet alone.
#[derive(Debug, Clone, Copy)]
struct Group {
    head: u16,
    tail: u16,
    count: u16,
    /// The flow's transport, or `None` for a packet that is no flow of ours.
    proto: Option<Proto>,
    v6: bool,
    open: bool,
    psh: bool,
    iph: u16,
    l4h: u16,
    gso_size: u16,
    /// IP length of the super-packet so far.
    total: u32,
    next_seq: u32,
}

/// Groups a batch of packets for one TUN write each; see the module docs.
#[derive(Debug)]
pub struct Coalescer {
    groups: Vec<Group>,
    /// Next packet of the same group, by packet index (`END` after the last).
    next: Vec<u16>,
    udp: bool,
    coalesced: u64,
}

/// One planned write: the virtio header, then the whole first packet, then the
/// payload of each further packet (its bytes from `skip` on).
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub header: [u8; VIRTIO_HDR_LEN],
    pub head: usize,
    pub skip: usize,
    next: &'a [u16],
    first_member: u16,
    pub count: usize,
}

impl<'a> Write<'a> {
    /// Indices of the packets after the first, in order.
    pub fn members(&self) -> impl Iterator<Item = usize> + 'a {
        let next = self.next;
        let mut at = self.first_member;
        std::iter::from_fn(move || {
            if at == END {
                return None;
            }
            let i = at;
            at = next.get(usize::from(at)).copied().unwrap_or(END);
            Some(usize::from(i))
        })
    }
}

impl Coalescer {
    /// Room for batches of `capacity` packets (at most 65,534); `udp`: the device
    /// takes UDP segmentation offload (`TUN_F_USO4/6`).
    pub fn with_capacity(capacity: usize, udp: bool) -> Self {
        let capacity = capacity.min(usize::from(END) - 1);
        Self {
            groups: Vec::with_capacity(capacity),
            next: Vec::with_capacity(capacity),
            udp,
            coalesced: 0,
        }
    }

    /// Packets that travelled inside another's write so far.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// Plans the writes of `bufs` (each packet is `buf[offset..]`) and rewrites the
    /// headers of every group's first packet. Afterwards [`Coalescer::writes`] lists
    /// every packet exactly once.
    pub fn plan<B: AsRef<[u8]> + AsMut<[u8]>>(&mut self, bufs: &mut [B], offset: usize) {
        self.groups.clear();
        self.next.clear();
        let n = bufs.len().min(self.groups.capacity());
        for i in 0..n {
            self.next.push(END);
            // `i` fits: the capacity is below `END`.
            self.add(bufs, offset, i as u16);
        }
        for g in &self.groups {
            if g.count > 1 {
                self.coalesced += u64::from(g.count - 1);
                if let Some(pkt) = bufs
                    .get_mut(usize::from(g.head))
                    .and_then(|b| b.as_mut().get_mut(offset..))
                {
                    finish(g, pkt);
                }
            }
        }
    }

    /// The planned writes in order (after [`Coalescer::plan`] on the same batch).
    /// Packets past the capacity are not listed: the caller writes them alone.
    pub fn writes(&self) -> impl Iterator<Item = Write<'_>> {
        self.groups.iter().map(|g| Write {
            header: if g.count > 1 {
                header(g)
            } else {
                [0; VIRTIO_HDR_LEN]
            },
            head: usize::from(g.head),
            skip: usize::from(g.iph + g.l4h),
            next: &self.next,
            first_member: self.next.get(usize::from(g.head)).copied().unwrap_or(END),
            count: usize::from(g.count),
        })
    }

    /// How many packets [`Coalescer::writes`] covers of a batch of `n`.
    pub fn planned(&self, n: usize) -> usize {
        n.min(self.next.len())
    }

    fn add<B: AsRef<[u8]>>(&mut self, bufs: &[B], offset: usize, index: u16) {
        let view = |i: u16| {
            bufs.get(usize::from(i))
                .and_then(|b| b.as_ref().get(offset..))
        };
        let pkt = view(index).unwrap_or_default();
        let Some(seg) = classify(pkt, self.udp) else {
            self.push_alone(index);
            return;
        };
        // The flow's latest group, if any: only it can be open.
        let found = self.groups.iter().rposition(|g| {
            g.proto == Some(seg.proto)
                && g.v6 == seg.v6
                && view(g.head).is_some_and(|head| same_flow(head, pkt, &seg))
        });
        if let Some((gi, g)) = found.and_then(|gi| Some((gi, self.groups.get(gi)?))) {
            let joins = seg.eligible
                && g.open
                && view(g.head).is_some_and(|head| can_join(g, head, pkt, &seg));
            if joins {
                self.join(gi, index, &seg);
                return;
            }
            if let Some(g) = self.groups.get_mut(gi) {
                g.open = false;
            }
        }
        if seg.eligible {
            self.push_group(index, &seg);
        } else {
            self.push_alone(index);
        }
    }

    fn push_alone(&mut self, index: u16) {
        self.groups.push(Group {
            head: index,
            tail: index,
            count: 1,
            proto: None,
            v6: false,
            open: false,
            psh: false,
            iph: 0,
            l4h: 0,
            gso_size: 0,
            total: 0,
            next_seq: 0,
        });
    }

    fn push_group(&mut self, index: u16, seg: &Segment) {
        let psh = seg.flags & TCP_PSH != 0;
        self.groups.push(Group {
            head: index,
            tail: index,
            count: 1,
            proto: Some(seg.proto),
            v6: seg.v6,
            open: !(seg.proto == Proto::Tcp && psh),
            psh,
            iph: seg.iph as u16,
            l4h: seg.l4h as u16,
            gso_size: seg.payload as u16,
            total: (seg.iph + seg.l4h + seg.payload) as u32,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
        });
    }

    fn join(&mut self, gi: usize, index: u16, seg: &Segment) {
        let Some(g) = self.groups.get_mut(gi) else {
            return;
        };
        if let Some(n) = self.next.get_mut(usize::from(g.tail)) {
            *n = index;
        }
        g.tail = index;
        g.count += 1;
        g.total += seg.payload as u32;
        g.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        if usize::from(g.gso_size) > seg.payload {
            g.open = false;
        }
        if seg.proto == Proto::Tcp && seg.flags & TCP_PSH != 0 {
            g.psh = true;
            g.open = false;
        }
        if g.proto == Some(Proto::Udp) && g.count >= MAX_UDP_SEGMENTS {
            g.open = false;
        }
    }
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(at..at + 2)?.try_into().ok()?))
}

fn be32(p: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(at..at + 4)?.try_into().ok()?))
}

/// A TCP or UDP packet the coalescer may group, or `None` for anything else
/// (another protocol, IPv4 options or fragments, IPv6 extension headers, lengths
/// that disagree with the packet).
fn classify(pkt: &[u8], udp: bool) -> Option<Segment> {
    let first = *pkt.first()?;
    let (v6, iph, proto_byte) = match first >> 4 {
        4 => {
            if first & 0x0f != 5 || usize::from(be16(pkt, 2)?) != pkt.len() {
                return None;
            }
            // More fragments, or a fragment offset.
            if be16(pkt, 6)? & 0x3fff != 0 {
                return None;
            }
            (false, 20, *pkt.get(9)?)
        }
        6 => {
            if usize::from(be16(pkt, 4)?) + 40 != pkt.len() {
                return None;
            }
            (true, 40, *pkt.get(6)?)
        }
        _ => return None,
    };
    match proto_byte {
        6 => {
            let l4h = usize::from(*pkt.get(iph + 12)? >> 4) * 4;
            if l4h < 20 || iph + l4h > pkt.len() {
                return None;
            }
            let flags = *pkt.get(iph + 13)?;
            let payload = pkt.len() - iph - l4h;
            // ACK, perhaps PSH, nothing else (no FIN, SYN, RST, URG, ECE, CWR).
            let eligible = payload > 0 && flags & TCP_ACK != 0 && flags & !(TCP_ACK | TCP_PSH) == 0;
            Some(Segment {
                v6,
                proto: Proto::Tcp,
                iph,
                l4h,
                payload,
                seq: be32(pkt, iph + 4)?,
                flags,
                eligible,
            })
        }
        17 => {
            if pkt.len() < iph + 8 || usize::from(be16(pkt, iph + 4)?) != pkt.len() - iph {
                return None;
            }
            let payload = pkt.len() - iph - 8;
            Some(Segment {
                v6,
                proto: Proto::Udp,
                iph,
                l4h: 8,
                payload,
                seq: 0,
                flags: 0,
                eligible: udp && payload > 0,
            })
        }
        _ => None,
    }
}

/// Same addresses and ports (the caller matched protocol and family).
fn same_flow(head: &[u8], pkt: &[u8], seg: &Segment) -> bool {
    let addrs = if seg.v6 { 8..40 } else { 12..20 };
    head.get(addrs.clone()) == pkt.get(addrs)
        && head.get(seg.iph..seg.iph + 4) == pkt.get(seg.iph..seg.iph + 4)
}

/// Whether `pkt` continues the open group `g` whose first packet is `head`.
fn can_join(g: &Group, head: &[u8], pkt: &[u8], seg: &Segment) -> bool {
    if usize::from(g.iph) != seg.iph
        || seg.payload > usize::from(g.gso_size)
        || g.total as usize + seg.payload > MAX_PACKET
    {
        return false;
    }
    // IP fields the super-packet carries for all: IPv4 TOS, flags and TTL; IPv6
    // version, traffic class, flow label and hop limit.
    let ip_same = if seg.v6 {
        head.get(..4) == pkt.get(..4) && head.get(7) == pkt.get(7)
    } else {
        head.get(1) == pkt.get(1) && head.get(6..9) == pkt.get(6..9)
    };
    if !ip_same {
        return false;
    }
    match seg.proto {
        Proto::Udp => true,
        Proto::Tcp => {
            let t = seg.iph;
            usize::from(g.l4h) == seg.l4h
                && g.next_seq == seg.seq
                // Acknowledgement and window.
                && head.get(t + 8..t + 12) == pkt.get(t + 8..t + 12)
                && head.get(t + 14..t + 16) == pkt.get(t + 14..t + 16)
                // Options (timestamps and the like).
                && head.get(t + 20..t + seg.l4h) == pkt.get(t + 20..t + seg.l4h)
        }
    }
}

/// Rewrites a group's first packet for the whole super-packet.
fn finish(g: &Group, pkt: &mut [u8]) {
    let total = g.total as usize;
    let iph = usize::from(g.iph);
    let l4_len = (total - iph) as u16;
    let Some(proto) = g.proto else {
        return;
    };
    let (ip_proto, csum_at) = match proto {
        Proto::Tcp => (IpProtocol::Tcp, iph + 16),
        Proto::Udp => (IpProtocol::Udp, iph + 6),
    };
    let pseudo = if g.v6 {
        let (Some(src), Some(dst)) = (addr16(pkt, 8), addr16(pkt, 24)) else {
            return;
        };
        checksum::pseudo_header_v6(
            &Ipv6Address::from(src),
            &Ipv6Address::from(dst),
            ip_proto,
            u32::from(l4_len),
        )
    } else {
        let (Some(src), Some(dst)) = (addr4(pkt, 12), addr4(pkt, 16)) else {
            return;
        };
        checksum::pseudo_header_v4(
            &Ipv4Address::from(src),
            &Ipv4Address::from(dst),
            ip_proto,
            u32::from(l4_len),
        )
    };
    if g.v6 {
        put16(pkt, 4, l4_len);
    } else {
        put16(pkt, 2, total as u16);
        put16(pkt, 10, 0);
        let sum = !checksum::data(pkt.get(..20).unwrap_or_default());
        put16(pkt, 10, sum);
    }
    match proto {
        Proto::Tcp => {
            if g.psh
                && let Some(flags) = pkt.get_mut(iph + 13)
            {
                *flags |= TCP_PSH;
            }
        }
        Proto::Udp => put16(pkt, iph + 4, l4_len),
    }
    put16(pkt, csum_at, pseudo);
}

fn header(g: &Group) -> [u8; VIRTIO_HDR_LEN] {
    let (gso_type, csum_offset) = match (g.proto, g.v6) {
        (Some(Proto::Tcp), false) => (GSO_TCPV4, 16u16),
        (Some(Proto::Tcp), true) => (GSO_TCPV6, 16),
        (Some(Proto::Udp), _) => (GSO_UDP_L4, 6),
        (None, _) => return [0; VIRTIO_HDR_LEN],
    };
    // struct virtio_net_hdr in the host's byte order (a TUN without TUNSETVNETLE
    // on a little-endian host, as tun-rs sets it up).
    let mut h = [0u8; VIRTIO_HDR_LEN];
    h[0] = F_NEEDS_CSUM;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&(g.iph + g.l4h).to_ne_bytes());
    h[4..6].copy_from_slice(&g.gso_size.to_ne_bytes());
    h[6..8].copy_from_slice(&g.iph.to_ne_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
    h
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    if let Some(s) = p.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn addr4(p: &[u8], at: usize) -> Option<[u8; 4]> {
    p.get(at..at + 4)?.try_into().ok()
}

fn addr16(p: &[u8], at: usize) -> Option<[u8; 16]> {
    p.get(at..at + 16)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A4: [u8; 4] = [100, 64, 0, 1];
    const B4: [u8; 4] = [100, 64, 0, 2];
    const A6: [u8; 16] = [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const OFFSET: usize = VIRTIO_HDR_LEN;
    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;
    const TCP_URG: u8 = 0x20;
    const TCP_ECE: u8 = 0x40;
    const TCP_CWR: u8 = 0x80;

    struct Tcp {
        v6: bool,
        sport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        ttl: u8,
        options: Vec<u8>,
        payload: Vec<u8>,
    }

    fn tcp(seq: u32, len: usize) -> Tcp {
        Tcp {
            v6: false,
            sport: 40000,
            seq,
            ack: 7,
            flags: TCP_ACK,
            ttl: 64,
            options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
            payload: (0..len).map(|i| (seq as usize + i) as u8).collect(),
        }
    }

    fn ip_header(v6: bool, proto: u8, ttl: u8, l4_len: usize) -> Vec<u8> {
        if v6 {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend((l4_len as u16).to_be_bytes());
            h.extend([proto, ttl]);
            h.extend(A6);
            h.extend(B6);
            h
        } else {
            let mut h = vec![0x45, 0];
            h.extend(((20 + l4_len) as u16).to_be_bytes());
            h.extend([0, 1, 0x40, 0, ttl, proto, 0, 0]);
            h.extend(A4);
            h.extend(B4);
            let sum = !checksum::data(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h
        }
    }

    fn pseudo(v6: bool, proto: IpProtocol, len: usize) -> u16 {
        if v6 {
            checksum::pseudo_header_v6(&A6.into(), &B6.into(), proto, len as u32)
        } else {
            checksum::pseudo_header_v4(&A4.into(), &B4.into(), proto, len as u32)
        }
    }

    /// The packet in a slot with virtio room before it, with a valid checksum.
    fn build(t: &Tcp) -> Vec<u8> {
        let l4h = 20 + t.options.len();
        let mut l4 = Vec::new();
        l4.extend(t.sport.to_be_bytes());
        l4.extend(5201u16.to_be_bytes());
        l4.extend(t.seq.to_be_bytes());
        l4.extend(t.ack.to_be_bytes());
        l4.extend([((l4h / 4) as u8) << 4, t.flags, 0xff, 0xff, 0, 0, 0, 0]);
        l4.extend(&t.options);
        l4.extend(&t.payload);
        let sum =
            !checksum::combine(&[pseudo(t.v6, IpProtocol::Tcp, l4.len()), checksum::data(&l4)]);
        l4[16..18].copy_from_slice(&sum.to_be_bytes());
        let mut slot = vec![0u8; OFFSET];
        slot.extend(ip_header(t.v6, 6, t.ttl, l4.len()));
        slot.extend(l4);
        slot
    }

    fn udp(v6: bool, payload: usize) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend(5353u16.to_be_bytes());
        l4.extend(4242u16.to_be_bytes());
        l4.extend(((8 + payload) as u16).to_be_bytes());
        l4.extend([0, 0]);
        l4.extend((0..payload).map(|i| i as u8));
        let mut slot = vec![0u8; OFFSET];
        slot.extend(ip_header(v6, 17, 64, l4.len()));
        slot.extend(l4);
        slot
    }

    /// What the kernel is handed per write: header, then the bytes.
    fn written(
        c: &Coalescer,
        bufs: &[Vec<u8>],
    ) -> Vec<([u8; VIRTIO_HDR_LEN], Vec<usize>, Vec<u8>)> {
        c.writes()
            .map(|w| {
                let mut bytes = bufs[w.head][OFFSET..].to_vec();
                let mut ids = vec![w.head];
                for m in w.members() {
                    bytes.extend(&bufs[m][OFFSET + w.skip..]);
                    ids.push(m);
                }
                assert_eq!(ids.len(), w.count);
                (w.header, ids, bytes)
            })
            .collect()
    }

    fn ne16(h: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([h[at], h[at + 1]])
    }

    /// Completes the checksum as the kernel does for `NEEDS_CSUM` and checks the
    /// result is a valid packet.
    fn assert_valid_after_offload(v6: bool, proto: IpProtocol, header: &[u8], pkt: &mut [u8]) {
        assert_eq!(header[0], F_NEEDS_CSUM);
        let start = usize::from(ne16(header, 6));
        let at = start + usize::from(ne16(header, 8));
        let sum = !checksum::data(&pkt[start..]);
        pkt[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        let iph = if v6 { 40 } else { 20 };
        assert_eq!(
            checksum::combine(&[
                pseudo(v6, proto, pkt.len() - iph),
                checksum::data(&pkt[iph..])
            ]),
            0xffff,
            "transport checksum"
        );
        if !v6 {
            assert_eq!(checksum::data(&pkt[..20]), 0xffff, "IPv4 header checksum");
            assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
        } else {
            assert_eq!(
                usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40,
                pkt.len()
            );
        }
    }

    fn plan(bufs: &mut [Vec<u8>], udp: bool) -> Coalescer {
        let mut c = Coalescer::with_capacity(128, udp);
        c.plan(bufs, OFFSET);
        c
    }

    #[test]
    fn consecutive_tcp_segments_become_one_super_packet() {
        for v6 in [false, true] {
            let mut segs = [tcp(1000, 1000), tcp(2000, 1000), tcp(3000, 500)];
            for s in &mut segs {
                s.v6 = v6;
            }
            let mut bufs: Vec<Vec<u8>> = segs.iter().map(build).collect();
            let c = plan(&mut bufs, true);
            let w = written(&c, &bufs);
            assert_eq!(w.len(), 1);
            let (h, ids, mut bytes) = w.into_iter().next().unwrap();
            assert_eq!(ids, [0, 1, 2]);
            assert_eq!(h[1], if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            let iph = if v6 { 40 } else { 20 };
            assert_eq!(usize::from(ne16(&h, 2)), iph + 32, "headers with options");
            assert_eq!(ne16(&h, 4), 1000, "segment size");
            let payload: Vec<u8> = segs.iter().flat_map(|s| s.payload.clone()).collect();
            assert_eq!(&bytes[iph + 32..], &payload[..]);
            assert_valid_after_offload(v6, IpProtocol::Tcp, &h, &mut bytes);
            assert_eq!(c.coalesced(), 2);
        }
    }

    #[test]
    fn a_gap_another_flow_or_other_fields_start_new_groups() {
        let mut other = tcp(2000, 1000);
        other.sport = 40001;
        let mut ttl = tcp(3000, 1000);
        ttl.ttl = 63;
        let mut opts = tcp(4000, 1000);
        opts.options[11] = 3;
        let mut ack = tcp(5000, 1000);
        ack.ack = 8;
        let mut bufs: Vec<Vec<u8>> = [
            tcp(1000, 1000),
            other,
            tcp(2000, 1000),
            ttl,
            opts,
            ack,
            tcp(7000, 1000),
        ]
        .iter()
        .map(build)
        .collect();
        let c = plan(&mut bufs, true);
        let ids: Vec<Vec<usize>> = written(&c, &bufs).into_iter().map(|w| w.1).collect();
        assert_eq!(
            ids,
            [vec![0, 2], vec![1], vec![3], vec![4], vec![5], vec![6]]
        );
    }

    #[test]
    fn flow_order_is_kept_around_packets_that_cannot_join() {
        // A pure ACK, then data that would continue the first group: it must not
        // jump ahead of the ACK.
        let mut bufs: Vec<Vec<u8>> = [tcp(1000, 1000), tcp(2000, 0), tcp(2000, 1000)]
            .iter()
            .map(build)
            .collect();
        let before = bufs.clone();
        let c = plan(&mut bufs, true);
        let w = written(&c, &bufs);
        let ids: Vec<Vec<usize>> = w.iter().map(|w| w.1.clone()).collect();
        assert_eq!(ids, [vec![0], vec![1], vec![2]]);
        assert!(w.iter().all(|w| w.0 == [0; VIRTIO_HDR_LEN]));
        assert_eq!(bufs, before, "packets written alone are not changed");
    }

    #[test]
    fn psh_or_a_short_segment_ends_a_group() {
        let mut psh = tcp(2000, 1000);
        psh.flags |= TCP_PSH;
        let mut bufs: Vec<Vec<u8>> = [
            tcp(1000, 1000),
            psh,
            tcp(3000, 1000),
            tcp(4000, 600),
            tcp(4600, 600),
        ]
        .iter()
        .map(build)
        .collect();
        let c = plan(&mut bufs, true);
        let w = written(&c, &bufs);
        let ids: Vec<Vec<usize>> = w.iter().map(|w| w.1.clone()).collect();
        assert_eq!(ids, [vec![0, 1], vec![2, 3], vec![4]]);
        let mut first = w[0].2.clone();
        assert_eq!(
            first[20 + 13] & TCP_PSH,
            TCP_PSH,
            "the PSH moves to the head"
        );
        assert_valid_after_offload(false, IpProtocol::Tcp, &w[0].0, &mut first);
    }

    #[test]
    fn flags_other_than_ack_and_psh_are_never_coalesced() {
        for flag in [TCP_FIN, TCP_SYN, TCP_RST, TCP_URG, TCP_ECE, TCP_CWR] {
            let mut odd = tcp(2000, 1000);
            odd.flags |= flag;
            let mut bufs: Vec<Vec<u8>> = [tcp(1000, 1000), odd].iter().map(build).collect();
            let c = plan(&mut bufs, true);
            assert_eq!(c.writes().count(), 2, "flag {flag:#x}");
        }
    }

    #[test]
    fn a_group_stops_below_the_largest_ip_packet() {
        let mut bufs: Vec<Vec<u8>> = (0..100u32).map(|i| build(&tcp(i * 1400, 1400))).collect();
        let c = plan(&mut bufs, true);
        let w = written(&c, &bufs);
        assert!(w.len() > 1);
        assert_eq!(w.iter().map(|w| w.1.len()).sum::<usize>(), 100);
        for (h, _, mut bytes) in w {
            assert!(bytes.len() <= MAX_PACKET);
            if h[0] != 0 {
                assert_valid_after_offload(false, IpProtocol::Tcp, &h, &mut bytes);
            }
        }
    }

    #[test]
    fn udp_datagrams_coalesce_only_when_the_device_takes_them() {
        for v6 in [false, true] {
            let mut bufs = vec![udp(v6, 1200), udp(v6, 1200), udp(v6, 800), udp(v6, 1200)];
            let c = plan(&mut bufs, true);
            let w = written(&c, &bufs);
            let ids: Vec<Vec<usize>> = w.iter().map(|w| w.1.clone()).collect();
            assert_eq!(ids, [vec![0, 1, 2], vec![3]]);
            let (h, _, mut bytes) = w[0].clone();
            assert_eq!(h[1], GSO_UDP_L4);
            assert_eq!(ne16(&h, 4), 1200);
            assert_valid_after_offload(v6, IpProtocol::Udp, &h, &mut bytes);

            let mut bufs = vec![udp(v6, 1200), udp(v6, 1200)];
            let c = plan(&mut bufs, false);
            assert_eq!(c.writes().count(), 2);
        }
    }

    #[test]
    fn anything_else_is_written_alone_and_untouched() {
        let mut icmp = vec![0u8; OFFSET];
        icmp.extend(ip_header(false, 1, 64, 8));
        icmp.extend([8, 0, 0, 0, 0, 1, 0, 1]);
        let mut fragment = build(&tcp(2000, 1000));
        fragment[OFFSET + 6] = 0x20; // more fragments
        let mut bufs = vec![
            build(&tcp(1000, 1000)),
            icmp,
            fragment,
            vec![0u8; OFFSET],
            vec![0u8; OFFSET + 3],
            vec![0x45; OFFSET + 30],
            vec![0x60; OFFSET + 60],
            vec![0x70; OFFSET + 60],
        ];
        let before = bufs.clone();
        let c = plan(&mut bufs, true);
        assert_eq!(c.writes().count(), bufs.len());
        assert_eq!(bufs, before);
        // A short offset leaves every packet empty, alone.
        let c2 = {
            let mut c = Coalescer::with_capacity(8, true);
            c.plan(&mut bufs, 10_000);
            c
        };
        assert_eq!(c2.writes().count(), bufs.len());
    }

    #[test]
    fn packets_past_the_capacity_are_left_to_the_caller() {
        let mut bufs: Vec<Vec<u8>> = (0..10u32).map(|i| build(&tcp(i * 100, 100))).collect();
        let mut c = Coalescer::with_capacity(4, true);
        c.plan(&mut bufs, OFFSET);
        assert_eq!(c.planned(bufs.len()), 4);
        let ids: Vec<Vec<usize>> = written(&c, &bufs).into_iter().map(|w| w.1).collect();
        assert_eq!(ids, [vec![0, 1, 2, 3]]);
    }
}
