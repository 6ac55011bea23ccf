//! A look at packets from the mesh before the stack takes them: is this a TCP
//! connection request (SYN without ACK), and between which endpoints? The shell uses
//! it to have a listening socket ready for every new connection to an ingress port.
//!
//! Checked views only (smoltcp `wire`): never panics on bad input.

use std::net::{IpAddr, SocketAddr};

use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};

/// The endpoints of a TCP SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syn {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// `Some` when `packet` is an IPv4 or IPv6 TCP segment with SYN set and ACK clear (no
/// IPv6 extension headers, not an IPv4 fragment).
pub fn tcp_syn(packet: &[u8]) -> Option<Syn> {
    let (src, dst, payload): (IpAddr, IpAddr, &[u8]) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.frag_offset() != 0 || ip.more_frags() {
                return None;
            }
            (ip.src_addr().into(), ip.dst_addr().into(), ip.payload())
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (ip.src_addr().into(), ip.dst_addr().into(), ip.payload())
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    if !tcp.syn() || tcp.ack() || tcp.rst() {
        return None;
    }
    Some(Syn {
        src: SocketAddr::new(src, tcp.src_port()),
        dst: SocketAddr::new(dst, tcp.dst_port()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, IpRepr, TcpControl, TcpRepr, TcpSeqNumber};

    fn segment(src: SocketAddr, dst: SocketAddr, control: TcpControl, ack: bool) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: src.port(),
            dst_port: dst.port(),
            control,
            seq_number: TcpSeqNumber(1),
            ack_number: ack.then_some(TcpSeqNumber(2)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: Some(1380),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip = IpRepr::new(
            IpAddress::from(src.ip()),
            IpAddress::from(dst.ip()),
            IpProtocol::Tcp,
            tcp.buffer_len(),
            64,
        );
        let mut buf = vec![0; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut buf[..], &caps);
        let hl = ip.header_len();
        tcp.emit(
            &mut TcpPacket::new_unchecked(&mut buf[hl..]),
            &IpAddress::from(src.ip()),
            &IpAddress::from(dst.ip()),
            &caps,
        );
        buf
    }

    #[test]
    fn finds_syns_v4_and_v6() {
        for (s, d) in [
            ("100.64.0.1:40000", "100.64.0.2:8080"),
            ("[200::1]:40000", "[200::2]:8080"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let syn = segment(s, d, TcpControl::Syn, false);
            assert_eq!(tcp_syn(&syn), Some(Syn { src: s, dst: d }));
            assert_eq!(tcp_syn(&segment(s, d, TcpControl::Syn, true)), None);
            assert_eq!(tcp_syn(&segment(s, d, TcpControl::None, true)), None);
            assert_eq!(tcp_syn(&segment(s, d, TcpControl::Rst, false)), None);
            for cut in 0..syn.len() {
                assert_eq!(tcp_syn(&syn[..cut]), None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x2545_f491_u32;
        let mut buf = [0u8; 80];
        for _ in 0..50_000 {
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *b = state as u8;
            }
            buf[0] = if state & 1 == 0 { 0x45 } else { 0x60 };
            let _ = tcp_syn(&buf[..(state as usize) % 80]);
        }
    }
}
