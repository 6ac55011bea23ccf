//! A look at packets from the mesh before the stack takes them: is this a TCP
//! connection request (SYN without ACK), and between which endpoints? The shell uses
//! it to have a listening socket ready for every new connection to an ingress port.
//!
//! Checked views only (our `wire::ip` view for the IP header, smoltcp's for TCP): never
//! panics on bad input.

use std::net::SocketAddr;

use smoltcp::wire::TcpPacket;

use crate::wire::ip::{IpPacket, protocol};

/// The endpoints of a TCP SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syn {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// `Some` when `packet` is an IPv4 or IPv6 TCP segment with SYN set and ACK clear (no
/// IPv6 extension headers, not an IPv4 fragment).
pub fn tcp_syn(packet: &[u8]) -> Option<Syn> {
    let ip = IpPacket::new_checked(packet).ok()?;
    if ip.next_header() != protocol::TCP || ip.is_fragment() {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    if !tcp.syn() || tcp.ack() || tcp.rst() {
        return None;
    }
    Some(Syn {
        src: SocketAddr::new(ip.src(), tcp.src_port()),
        dst: SocketAddr::new(ip.dst(), tcp.dst_port()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, IpProtocol, IpRepr, TcpControl, TcpRepr, TcpSeqNumber};

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
        // Every byte of a real v4 and v6 SYN set to a few telling values, each cut
        // at every length.
        for (s, d) in [
            ("100.64.0.1:1", "100.64.0.2:2"),
            ("[200::1]:1", "[200::2]:2"),
        ] {
            let syn = segment(
                s.parse().unwrap(),
                d.parse().unwrap(),
                TcpControl::Syn,
                false,
            );
            for at in 0..syn.len() {
                for x in [0x00, 0x02, 0x06, 0x12, 0x45, 0x4f, 0x60, 0xff] {
                    let mut p = syn.clone();
                    p[at] = x;
                    for len in 0..=p.len() {
                        let _ = tcp_syn(&p[..len]);
                    }
                }
            }
        }
    }
}
