//! A checked view of an IPv4 or IPv6 packet's header (smoltcp's `Packet::new_checked`
//! style): [`IpPacket::new_checked`] validates the version and every length the
//! accessors rely on, after which the accessors are infallible and never panic.
//!
//! Used by the data plane (destination and real length of a TUN packet, the relay's
//! forwarding decision, the source of a decrypted packet) and by the rootless stack
//! (protocol and payload of a SYN).
//!
//! [`IpPacket::walk`] follows IPv6 extension headers (hop-by-hop, routing,
//! destination options, fragment, AH) to the upper-layer protocol, and reads IPv4
//! fragmentation from the header; an unparsable chain, or one of more than
//! [`MAX_EXTENSION_HEADERS`], is an error (the policy filter drops such packets).
//! [`IpPacket::new_quoted`] views the (truncated) packet an ICMP error quotes.
//! It checks no checksums and reads no options.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;

/// IP protocol / IPv6 next-header numbers this crate names.
pub mod protocol {
    /// Transmission Control Protocol.
    pub const TCP: u8 = 6;
    /// User Datagram Protocol.
    pub const UDP: u8 = 17;
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 hop-by-hop options (only right after the fixed header).
    pub const HOP_BY_HOP: u8 = 0;
    /// IPv6 routing header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Authentication header (length in 4-byte units).
    pub const AH: u8 = 51;
    /// IPv6 destination options.
    pub const DEST_OPTS: u8 = 60;
}

/// Longest IPv6 extension-header chain [`IpPacket::walk`] follows.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// Why [`IpPacket::walk`] could not reach the upper layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An extension header runs past the end of the packet.
    #[error("IPv6 extension header truncated")]
    Truncated,
    /// More than [`MAX_EXTENSION_HEADERS`] extension headers.
    #[error("IPv6 extension-header chain too long")]
    TooLong,
    /// Hop-by-hop options not first, or a second fragment header.
    #[error("IPv6 extension-header chain out of order")]
    Unparsable,
}

/// Fragmentation of a packet (IPv4 header fields, or an IPv6 fragment header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// Offset in 8-byte units; 0 for the first fragment.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// Result of [`IpPacket::walk`]: the upper-layer protocol, where its header starts
/// (for a fragment other than the first: where that fragment's data starts, which
/// holds no header) and the fragmentation, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Upper-layer protocol number (after every extension header).
    pub protocol: u8,
    /// Offset of the upper-layer header (or fragment data) in the packet.
    pub offset: usize,
    /// `Some` for a fragment.
    pub fragment: Option<Fragment>,
}

impl Walk {
    /// A fragment other than the first: no upper-layer header here.
    pub fn is_later_fragment(&self) -> bool {
        self.fragment.is_some_and(|f| f.offset != 0)
    }
}

/// Why [`IpPacket::new_checked`] refused a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    /// The version nibble is neither 4 nor 6 (an empty buffer has version 0).
    #[error("IP version {0} is neither 4 nor 6")]
    Version(u8),
    /// The buffer ends before the header, or before the length its header states.
    #[error("IP packet truncated")]
    Truncated,
    /// The IPv4 header length is under 20 bytes, or the total length is under the
    /// header length.
    #[error("IP header lengths are inconsistent")]
    BadLength,
}

/// IP version of a checked packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVersion {
    V4,
    V6,
}

/// The transport header as far as the view can reach it: its protocol number and
/// where it starts in the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperLayer {
    /// IP protocol number (`protocol::TCP`, ...).
    pub protocol: u8,
    /// Offset of the upper-layer header from the start of the packet.
    pub offset: usize,
}

/// A checked IPv4 or IPv6 packet over `T` (a byte slice, a `Vec`, ...). See the
/// [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPacket<T: AsRef<[u8]>> {
    buffer: T,
    version: IpVersion,
    /// The packet's length as far as the buffer holds it.
    len: usize,
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Wraps `buffer` after checking that it holds a whole IPv4 or IPv6 header and
    /// at least as many bytes as the header's length field says (bytes past that
    /// are allowed and ignored).
    pub fn new_checked(buffer: T) -> Result<Self, IpError> {
        Self::check(buffer, false)
    }

    /// Wraps the packet an ICMP error quotes: the header must be whole, but the
    /// packet may be cut short of the length its header states (the view then ends
    /// where the buffer does).
    pub fn new_quoted(buffer: T) -> Result<Self, IpError> {
        Self::check(buffer, true)
    }

    fn check(buffer: T, quoted: bool) -> Result<Self, IpError> {
        let bytes = buffer.as_ref();
        let first = bytes.first().copied().unwrap_or(0);
        let version = match first >> 4 {
            4 => {
                let header_len = usize::from(first & 0x0f) * 4;
                if bytes.len() < IPV4_HEADER_LEN {
                    return Err(IpError::Truncated);
                }
                if header_len < IPV4_HEADER_LEN {
                    return Err(IpError::BadLength);
                }
                if bytes.len() < header_len {
                    return Err(IpError::Truncated);
                }
                let total = usize::from(be16(bytes, 2));
                if total < header_len {
                    return Err(IpError::BadLength);
                }
                if total > bytes.len() && !quoted {
                    return Err(IpError::Truncated);
                }
                (IpVersion::V4, total.min(bytes.len()))
            }
            6 => {
                if bytes.len() < IPV6_HEADER_LEN {
                    return Err(IpError::Truncated);
                }
                let total = IPV6_HEADER_LEN + usize::from(be16(bytes, 4));
                if total > bytes.len() && !quoted {
                    return Err(IpError::Truncated);
                }
                (IpVersion::V6, total.min(bytes.len()))
            }
            v => return Err(IpError::Version(v)),
        };
        let (version, len) = version;
        Ok(Self {
            buffer,
            version,
            len,
        })
    }

    /// The buffer given to [`IpPacket::new_checked`].
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// IP version.
    pub fn version(&self) -> IpVersion {
        self.version
    }

    /// Header length: the IPv4 IHL in bytes (options included), or 40 for IPv6
    /// (extension headers are payload here).
    pub fn header_len(&self) -> usize {
        match self.version {
            IpVersion::V4 => usize::from(self.bytes().first().copied().unwrap_or(0) & 0x0f) * 4,
            IpVersion::V6 => IPV6_HEADER_LEN,
        }
    }

    /// The packet's real length from its header (total length, or 40 + payload
    /// length); never more than the buffer.
    /// (For a [quoted](IpPacket::new_quoted) packet: as far as the buffer holds it.)
    pub fn total_len(&self) -> usize {
        self.len
    }

    /// Source address.
    pub fn src(&self) -> IpAddr {
        match self.version {
            IpVersion::V4 => Ipv4Addr::from(array::<4>(self.bytes(), 12)).into(),
            IpVersion::V6 => Ipv6Addr::from(array::<16>(self.bytes(), 8)).into(),
        }
    }

    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        match self.version {
            IpVersion::V4 => Ipv4Addr::from(array::<4>(self.bytes(), 16)).into(),
            IpVersion::V6 => Ipv6Addr::from(array::<16>(self.bytes(), 24)).into(),
        }
    }

    /// The header's protocol (IPv4) or next-header (IPv6) field.
    pub fn next_header(&self) -> u8 {
        let at = match self.version {
            IpVersion::V4 => 9,
            IpVersion::V6 => 6,
        };
        self.bytes().get(at).copied().unwrap_or(0)
    }

    /// True for a fragment: IPv4 more-fragments set or a non-zero offset, or an
    /// IPv6 fragment header in a chain [`IpPacket::walk`] can follow.
    pub fn is_fragment(&self) -> bool {
        match self.version {
            IpVersion::V4 => be16(self.bytes(), 6) & 0x3fff != 0,
            IpVersion::V6 => self.walk().is_ok_and(|w| w.fragment.is_some()),
        }
    }

    /// Where the payload starts: right after the (fixed or IPv4 option-carrying)
    /// header.
    pub fn payload_offset(&self) -> usize {
        self.header_len()
    }

    /// The payload: from [`IpPacket::payload_offset`] to [`IpPacket::total_len`].
    pub fn payload(&self) -> &[u8] {
        self.bytes()
            .get(self.payload_offset()..self.total_len())
            .unwrap_or_default()
    }

    /// The transport header, or `None` when this packet does not carry it (a
    /// fragment other than the first) or its IPv6 extension headers cannot be
    /// walked (see [`IpPacket::walk`]).
    pub fn upper_layer(&self) -> Option<UpperLayer> {
        let walk = self.walk().ok()?;
        (!walk.is_later_fragment()).then_some(UpperLayer {
            protocol: walk.protocol,
            offset: walk.offset,
        })
    }

    /// Follows the IPv6 extension headers (hop-by-hop first only, routing,
    /// destination options, one fragment header, AH) to the upper-layer protocol;
    /// for IPv4 reads the fragmentation fields. A fragment other than the first
    /// ends the walk at its fragment header. Any other next header (ESP, No Next
    /// Header, mobility, ...) counts as the upper layer.
    pub fn walk(&self) -> Result<Walk, ChainError> {
        let bytes = self.bytes().get(..self.len).unwrap_or_default();
        if self.version == IpVersion::V4 {
            let flags = be16(bytes, 6);
            let fragment = (flags & 0x3fff != 0).then(|| Fragment {
                id: u32::from(be16(bytes, 4)),
                offset: flags & 0x1fff,
                more: flags & 0x2000 != 0,
            });
            return Ok(Walk {
                protocol: self.next_header(),
                offset: self.header_len(),
                fragment,
            });
        }
        let mut next = self.next_header();
        let mut at = IPV6_HEADER_LEN;
        let mut fragment = None;
        let mut count = 0;
        loop {
            let len = match next {
                protocol::HOP_BY_HOP if count > 0 => return Err(ChainError::Unparsable),
                protocol::HOP_BY_HOP | protocol::ROUTING | protocol::DEST_OPTS => {
                    let words = bytes.get(at + 1).ok_or(ChainError::Truncated)?;
                    (usize::from(*words) + 1) * 8
                }
                protocol::AH => {
                    let words = bytes.get(at + 1).ok_or(ChainError::Truncated)?;
                    (usize::from(*words) + 2) * 4
                }
                protocol::FRAGMENT => 8,
                _ => {
                    return Ok(Walk {
                        protocol: next,
                        offset: at,
                        fragment,
                    });
                }
            };
            count += 1;
            if count > MAX_EXTENSION_HEADERS {
                return Err(ChainError::TooLong);
            }
            if at + len > bytes.len() {
                return Err(ChainError::Truncated);
            }
            let header_type = next;
            next = bytes.get(at).copied().unwrap_or(0);
            if header_type == protocol::FRAGMENT {
                if fragment.is_some() {
                    return Err(ChainError::Unparsable);
                }
                let field = be16(bytes, at + 2);
                let f = Fragment {
                    id: u32::from_be_bytes(array::<4>(bytes, at + 4)),
                    offset: field >> 3,
                    more: field & 1 != 0,
                };
                fragment = Some(f);
                if f.offset != 0 {
                    return Ok(Walk {
                        protocol: next,
                        offset: at + len,
                        fragment,
                    });
                }
            }
            at += len;
        }
    }
}

/// Big-endian u16 at `at` (0 past the end; callers check lengths first).
fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(array::<2>(bytes, at))
}

/// `N` bytes at `at` (zeros past the end; callers check lengths first).
fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    at.checked_add(N)
        .and_then(|end| bytes.get(at..end))
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0; N])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A v4 header (IHL 5 + `options` words) with `payload` zero bytes after it.
    fn v4(options: usize, payload: usize) -> Vec<u8> {
        let header = IPV4_HEADER_LEN + 4 * options;
        let total = header + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x40 | (5 + options as u8);
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = protocol::TCP;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p
    }

    fn v6(payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER_LEN + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        p[6] = protocol::UDP;
        p[23] = 1;
        p[39] = 2;
        p
    }

    #[test]
    fn reads_valid_headers() {
        let mut v4 = v4(1, 9);
        v4.extend_from_slice(&[0xaa; 3]); // trailing bytes past the total length
        // (packet, version, header, total, src, dst, protocol)
        let cases = [
            (
                v4,
                IpVersion::V4,
                24,
                33,
                "100.64.0.1",
                "100.64.0.2",
                protocol::TCP,
            ),
            (v6(12), IpVersion::V6, 40, 52, "::1", "::2", protocol::UDP),
        ];
        for (p, version, header, total, src, dst, proto) in cases {
            let ip = IpPacket::new_checked(&p[..]).unwrap();
            assert_eq!(ip.version(), version);
            assert_eq!((ip.header_len(), ip.payload_offset()), (header, header));
            assert_eq!(ip.total_len(), total);
            assert_eq!(ip.src(), src.parse::<IpAddr>().unwrap());
            assert_eq!(ip.dst(), dst.parse::<IpAddr>().unwrap());
            assert_eq!(ip.next_header(), proto);
            assert_eq!(ip.payload(), &vec![0u8; total - header][..]);
            assert!(!ip.is_fragment());
            let upper = UpperLayer {
                protocol: proto,
                offset: header,
            };
            assert_eq!(ip.upper_layer(), Some(upper));
            assert_eq!(ip.into_inner().len(), p.len());
        }
    }

    #[test]
    fn v4_fragments_hide_the_upper_layer_after_the_first() {
        let mut p = v4(0, 8);
        p[6] = 0x20; // more fragments, offset 0: the first fragment
        let ip = IpPacket::new_checked(&p[..]).unwrap();
        assert!(ip.is_fragment());
        assert!(ip.upper_layer().is_some());
        p[6] = 0x00;
        p[7] = 0x01; // offset 8
        let ip = IpPacket::new_checked(&p[..]).unwrap();
        assert!(ip.is_fragment());
        assert_eq!(ip.upper_layer(), None);
        p[6] = 0x40; // don't fragment, offset 0
        p[7] = 0;
        assert!(!IpPacket::new_checked(&p[..]).unwrap().is_fragment());
    }

    #[test]
    fn truncated_headers_are_refused() {
        let p4 = v4(1, 9);
        for cut in 0..p4.len() {
            let want = if cut == 0 {
                IpError::Version(0)
            } else {
                IpError::Truncated
            };
            assert_eq!(IpPacket::new_checked(&p4[..cut]), Err(want), "v4 cut {cut}");
        }
        let p6 = v6(12);
        for cut in 1..p6.len() {
            assert_eq!(
                IpPacket::new_checked(&p6[..cut]),
                Err(IpError::Truncated),
                "v6 cut {cut}"
            );
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = v4(0, 20);
        let mut p = good.clone();
        p[0] = 0x44; // IHL 4
        assert_eq!(IpPacket::new_checked(&p[..]), Err(IpError::BadLength));
        let mut p = good.clone();
        p[0] = 0x4f; // IHL 15 = 60 bytes, more than the 40 there are
        assert_eq!(IpPacket::new_checked(&p[..]), Err(IpError::Truncated));
        let mut p = good.clone();
        p[2..4].copy_from_slice(&19u16.to_be_bytes()); // total under the header
        assert_eq!(IpPacket::new_checked(&p[..]), Err(IpError::BadLength));
        let mut p = good.clone();
        p[2..4].copy_from_slice(&41u16.to_be_bytes()); // total past the buffer
        assert_eq!(IpPacket::new_checked(&p[..]), Err(IpError::Truncated));
        let mut p = v6(4);
        p[4..6].copy_from_slice(&5u16.to_be_bytes()); // payload past the buffer
        assert_eq!(IpPacket::new_checked(&p[..]), Err(IpError::Truncated));
        for version in [0u8, 5, 7, 15] {
            let mut p = good.clone();
            p[0] = (version << 4) | 5;
            assert_eq!(
                IpPacket::new_checked(&p[..]),
                Err(IpError::Version(version))
            );
        }
    }

    #[test]
    fn any_bytes_never_panic() {
        // Every byte of a v4 header with options and of a v6 header set to a few
        // telling values, each cut at every length.
        for base in [v4(2, 8), v6(8)] {
            for at in 0..base.len() {
                for x in [0x00, 0x01, 0x0f, 0x40, 0x45, 0x4f, 0x60, 0x80, 0xff] {
                    let mut p = base.clone();
                    p[at] = x;
                    for len in 0..=p.len() {
                        let Ok(ip) = IpPacket::new_checked(&p[..len]) else {
                            continue;
                        };
                        assert!(ip.total_len() <= len);
                        assert!(ip.payload_offset() <= ip.total_len());
                        let _ = (ip.src(), ip.dst(), ip.next_header(), ip.payload());
                        let _ = (ip.upper_layer(), ip.is_fragment(), ip.version(), ip.walk());
                    }
                }
            }
        }
    }

    /// A v6 packet whose fixed header names `first`, then `chain` (each header:
    /// its type is given by the previous one; bytes as given), then `tail`.
    fn v6_chain(first: u8, chain: &[Vec<u8>], tail: &[u8]) -> Vec<u8> {
        let mut p = v6(0);
        p[6] = first;
        for h in chain {
            p.extend_from_slice(h);
        }
        p.extend_from_slice(tail);
        let payload = (p.len() - IPV6_HEADER_LEN) as u16;
        p[4..6].copy_from_slice(&payload.to_be_bytes());
        p
    }

    /// A generic 8-byte extension header (options, routing) naming `next`.
    fn ext(next: u8) -> Vec<u8> {
        vec![next, 0, 1, 4, 0, 0, 0, 0]
    }

    fn frag(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
        let mut h = vec![next, 0];
        h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h
    }

    const UDP_53: [u8; 8] = [0x30, 0x39, 0, 53, 0, 8, 0, 0];

    #[test]
    fn udp_behind_destination_options_is_reached() {
        let p = v6_chain(protocol::DEST_OPTS, &[ext(protocol::UDP)], &UDP_53);
        let ip = IpPacket::new_checked(&p[..]).unwrap();
        let walk = ip.walk().unwrap();
        assert_eq!(
            (walk.protocol, walk.offset, walk.fragment),
            (protocol::UDP, 48, None)
        );
        assert_eq!(&p[walk.offset + 2..walk.offset + 4], &[0, 53]);
        assert_eq!(
            ip.upper_layer(),
            Some(UpperLayer {
                protocol: protocol::UDP,
                offset: 48
            })
        );
        // The fixed header alone names only the first extension header.
        assert_eq!(ip.next_header(), protocol::DEST_OPTS);
    }

    #[test]
    fn full_chain_with_fragment_header_and_ah() {
        let mut ah = vec![protocol::TCP, 4]; // (4 + 2) * 4 = 24 bytes
        ah.resize(24, 0);
        let chain = [
            ext(protocol::ROUTING),
            ext(protocol::FRAGMENT),
            frag(protocol::DEST_OPTS, 0, true, 0xdead_beef),
            ext(protocol::AH),
            ah,
        ];
        let p = v6_chain(protocol::HOP_BY_HOP, &chain, &[0u8; 20]);
        let ip = IpPacket::new_checked(&p[..]).unwrap();
        let walk = ip.walk().unwrap();
        assert_eq!(walk.protocol, protocol::TCP);
        assert_eq!(walk.offset, 40 + 8 + 8 + 8 + 8 + 24);
        let f = walk.fragment.unwrap();
        assert_eq!((f.id, f.offset, f.more), (0xdead_beef, 0, true));
        assert!(ip.is_fragment() && !walk.is_later_fragment());
        assert!(ip.upper_layer().is_some());

        // A later fragment: the walk stops after its fragment header.
        let p = v6_chain(
            protocol::DEST_OPTS,
            &[ext(protocol::FRAGMENT), frag(protocol::UDP, 181, false, 7)],
            &[0u8; 16],
        );
        let ip = IpPacket::new_checked(&p[..]).unwrap();
        let walk = ip.walk().unwrap();
        assert_eq!((walk.protocol, walk.offset), (protocol::UDP, 56));
        assert!(walk.is_later_fragment());
        assert_eq!(walk.fragment.unwrap().id, 7);
        assert_eq!(ip.upper_layer(), None);
    }

    #[test]
    fn malformed_and_long_chains_are_errors() {
        // Hop-by-hop anywhere but first.
        let p = v6_chain(
            protocol::DEST_OPTS,
            &[ext(protocol::HOP_BY_HOP), ext(17)],
            &UDP_53,
        );
        assert_eq!(
            IpPacket::new_checked(&p[..]).unwrap().walk(),
            Err(ChainError::Unparsable)
        );
        // Two fragment headers.
        let p = v6_chain(
            protocol::FRAGMENT,
            &[frag(protocol::FRAGMENT, 0, true, 1), frag(17, 0, true, 1)],
            &UDP_53,
        );
        assert_eq!(
            IpPacket::new_checked(&p[..]).unwrap().walk(),
            Err(ChainError::Unparsable)
        );
        // A header whose length runs past the packet, and one cut in its first bytes.
        let mut long = ext(protocol::UDP);
        long[1] = 3; // 32 bytes, 8 + 8 present
        let p = v6_chain(protocol::DEST_OPTS, &[long], &UDP_53);
        assert_eq!(
            IpPacket::new_checked(&p[..]).unwrap().walk(),
            Err(ChainError::Truncated)
        );
        let p = v6_chain(protocol::ROUTING, &[], &[]);
        assert_eq!(
            IpPacket::new_checked(&p[..]).unwrap().walk(),
            Err(ChainError::Truncated)
        );
        assert_eq!(IpPacket::new_checked(&p[..]).unwrap().upper_layer(), None);
        // Eight headers are fine, nine are not.
        for (n, want) in [(8, Ok(protocol::UDP)), (9, Err(ChainError::TooLong))] {
            let mut chain: Vec<Vec<u8>> = (1..n).map(|_| ext(protocol::DEST_OPTS)).collect();
            chain.push(ext(protocol::UDP));
            let p = v6_chain(protocol::DEST_OPTS, &chain, &UDP_53);
            let got = IpPacket::new_checked(&p[..])
                .unwrap()
                .walk()
                .map(|w| w.protocol);
            assert_eq!(got, want, "{n} headers");
        }
        // A chain of 255 headers costs no more than nine.
        let chain: Vec<Vec<u8>> = (0..255).map(|_| ext(protocol::DEST_OPTS)).collect();
        let p = v6_chain(protocol::DEST_OPTS, &chain, &[]);
        assert_eq!(
            IpPacket::new_checked(&p[..]).unwrap().walk(),
            Err(ChainError::TooLong)
        );
    }

    #[test]
    fn v4_walk_reads_fragmentation() {
        let mut p = v4(0, 8);
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x20;
        let w = IpPacket::new_checked(&p[..]).unwrap().walk().unwrap();
        assert_eq!(
            w.fragment,
            Some(Fragment {
                id: 0x1234,
                offset: 0,
                more: true
            })
        );
        assert_eq!((w.protocol, w.offset), (protocol::TCP, 20));
        p[6] = 0x40; // don't fragment
        let w = IpPacket::new_checked(&p[..]).unwrap().walk().unwrap();
        assert_eq!(w.fragment, None);
    }

    #[test]
    fn quoted_packets_may_be_cut_short() {
        let p = v6_chain(protocol::DEST_OPTS, &[ext(protocol::UDP)], &[0u8; 100]);
        assert_eq!(IpPacket::new_checked(&p[..60]), Err(IpError::Truncated));
        let q = IpPacket::new_quoted(&p[..60]).unwrap();
        assert_eq!(q.total_len(), 60);
        assert_eq!(q.walk().unwrap().protocol, protocol::UDP);
        assert_eq!(IpPacket::new_quoted(&p[..39]), Err(IpError::Truncated));
        let p4 = v4(0, 100);
        let q = IpPacket::new_quoted(&p4[..28]).unwrap();
        assert_eq!((q.total_len(), q.payload().len()), (28, 8));
    }
}
