//! A checked view of an IPv4 or IPv6 packet's header (smoltcp's `Packet::new_checked`
//! style): [`IpPacket::new_checked`] validates the version and every length the
//! accessors rely on, after which the accessors are infallible and never panic.
//!
//! Used by the data plane (destination and real length of a TUN packet, the relay's
//! forwarding decision, the source of a decrypted packet) and by the rootless stack
//! (protocol and payload of a SYN).
//!
//! What it deliberately does not do (yet): walk IPv6 extension headers. For IPv6,
//! [`IpPacket::upper_layer`] reports the fixed header's next header, which is an
//! extension header's type when there are any; the walk over hop-by-hop, routing,
//! destination options and fragment headers belongs in `upper_layer`, so that callers
//! asking for the transport protocol (and, later, ports) need not change. It checks
//! no checksums and reads no options.

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
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Wraps `buffer` after checking that it holds a whole IPv4 or IPv6 header and
    /// at least as many bytes as the header's length field says (bytes past that
    /// are allowed and ignored).
    pub fn new_checked(buffer: T) -> Result<Self, IpError> {
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
                if total > bytes.len() {
                    return Err(IpError::Truncated);
                }
                IpVersion::V4
            }
            6 => {
                if bytes.len() < IPV6_HEADER_LEN
                    || IPV6_HEADER_LEN + usize::from(be16(bytes, 4)) > bytes.len()
                {
                    return Err(IpError::Truncated);
                }
                IpVersion::V6
            }
            v => return Err(IpError::Version(v)),
        };
        Ok(Self { buffer, version })
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
    pub fn total_len(&self) -> usize {
        match self.version {
            IpVersion::V4 => usize::from(be16(self.bytes(), 2)),
            IpVersion::V6 => IPV6_HEADER_LEN + usize::from(be16(self.bytes(), 4)),
        }
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

    /// True for an IPv4 fragment (more-fragments set or a non-zero offset). IPv6
    /// fragments are announced by an extension header and are not seen yet.
    pub fn is_fragment(&self) -> bool {
        match self.version {
            IpVersion::V4 => be16(self.bytes(), 6) & 0x3fff != 0,
            IpVersion::V6 => false,
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

    /// The transport header, or `None` when this packet cannot carry it (an IPv4
    /// fragment other than the first). See the [module docs](self) for IPv6.
    pub fn upper_layer(&self) -> Option<UpperLayer> {
        if self.version == IpVersion::V4 && be16(self.bytes(), 6) & 0x1fff != 0 {
            return None;
        }
        Some(UpperLayer {
            protocol: self.next_header(),
            offset: self.payload_offset(),
        })
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
                        let _ = (ip.upper_layer(), ip.is_fragment(), ip.version());
                    }
                }
            }
        }
    }
}
