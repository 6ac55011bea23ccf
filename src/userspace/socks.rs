//! SOCKS5 (RFC 1928) messages, without authentication: the method negotiation, the
//! request, the reply and the UDP ASSOCIATE datagram header.
//!
//! Pure parsers of untrusted bytes: they say `Ok(None)` when more bytes are needed and
//! return errors, never panic. Domain names are parsed but not resolved here (the
//! session resolves mesh names from the mesh DNS table and refuses others with "host
//! unreachable"); a name that is an IP literal is taken as that address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const VERSION: u8 = 5;
/// "No authentication required".
pub const METHOD_NONE: u8 = 0x00;
/// "No acceptable methods".
pub const METHOD_REFUSED: u8 = 0xff;

const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// Longest reply (IPv6 bound address).
pub const MAX_REPLY: usize = 22;
/// Longest UDP header (a 255-byte domain name).
pub const MAX_UDP_HEADER: usize = 4 + 1 + 255 + 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    #[error("not SOCKS version 5 (version byte {0})")]
    Version(u8),
    #[error("the client offers no method without authentication")]
    NoAcceptableMethod,
    #[error("unknown address type {0}")]
    AddressType(u8),
    #[error("the domain name is not UTF-8")]
    BadDomain,
    #[error("fragmented SOCKS UDP datagrams are not supported")]
    Fragmented,
    #[error("SOCKS UDP datagram too short")]
    Truncated,
}

/// Parses the method negotiation (`VER NMETHODS METHODS...`): `Ok(Some(used))` when the
/// client offers "no authentication".
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    let end = 2 + usize::from(n);
    let Some(methods) = buf.get(2..end) else {
        return Ok(None);
    };
    if methods.contains(&METHOD_NONE) {
        Ok(Some(end))
    } else {
        Err(SocksError::NoAcceptableMethod)
    }
}

/// The command of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
    Unknown(u8),
}

/// A destination as the client wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl Address {
    /// The socket address, if the destination is (or spells) an IP address.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Self::Ip(a) => Some(*a),
            Self::Domain(name, port) => {
                let name = name
                    .strip_prefix('[')
                    .and_then(|n| n.strip_suffix(']'))
                    .unwrap_or(name);
                name.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, *port))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub address: Address,
}

/// Parses `ATYP ADDR PORT` at the start of `buf`: the address and the bytes used.
fn parse_address(buf: &[u8]) -> Result<Option<(Address, usize)>, SocksError> {
    let Some(&atyp) = buf.first() else {
        return Ok(None);
    };
    let (ip_len, start) = match atyp {
        ATYP_V4 => (4, 1),
        ATYP_V6 => (16, 1),
        ATYP_DOMAIN => match buf.get(1) {
            Some(&n) => (usize::from(n), 2),
            None => return Ok(None),
        },
        other => return Err(SocksError::AddressType(other)),
    };
    let end = start + ip_len + 2;
    let (Some(addr), Some(port)) = (buf.get(start..start + ip_len), buf.get(end - 2..end)) else {
        return Ok(None);
    };
    let port = u16::from_be_bytes([port[0], port[1]]);
    let address = match atyp {
        ATYP_V4 => {
            let o: [u8; 4] = addr.try_into().map_err(|_| SocksError::Truncated)?;
            Address::Ip(SocketAddr::new(Ipv4Addr::from(o).into(), port))
        }
        ATYP_V6 => {
            let o: [u8; 16] = addr.try_into().map_err(|_| SocksError::Truncated)?;
            Address::Ip(SocketAddr::new(Ipv6Addr::from(o).into(), port))
        }
        _ => Address::Domain(
            std::str::from_utf8(addr)
                .map_err(|_| SocksError::BadDomain)?
                .to_string(),
            port,
        ),
    };
    Ok(Some((address, end)))
}

/// Parses a request (`VER CMD RSV ATYP DST.ADDR DST.PORT`): `Ok(Some((request, used)))`.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    let (Some(&cmd), Some(_rsv)) = (buf.get(1), buf.get(2)) else {
        return Ok(None);
    };
    let command = match cmd {
        1 => Command::Connect,
        2 => Command::Bind,
        3 => Command::UdpAssociate,
        other => Command::Unknown(other),
    };
    let Some(rest) = buf.get(3..) else {
        return Ok(None);
    };
    Ok(parse_address(rest)?.map(|(address, used)| (Request { command, address }, 3 + used)))
}

/// Reply codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

fn put_address(addr: SocketAddr, out: &mut [u8]) -> usize {
    let mut n = 0;
    let mut push = |bytes: &[u8]| {
        for &b in bytes {
            if let Some(slot) = out.get_mut(n) {
                *slot = b;
            }
            n += 1;
        }
    };
    match addr.ip() {
        IpAddr::V4(v) => {
            push(&[ATYP_V4]);
            push(&v.octets());
        }
        IpAddr::V6(v) => {
            push(&[ATYP_V6]);
            push(&v.octets());
        }
    }
    push(&addr.port().to_be_bytes());
    n
}

/// Writes a reply (`VER REP RSV ATYP BND.ADDR BND.PORT`) into `out`; returns its length.
pub fn encode_reply(reply: Reply, bound: SocketAddr, out: &mut [u8; MAX_REPLY]) -> usize {
    out[0] = VERSION;
    out[1] = reply as u8;
    out[2] = 0;
    3 + put_address(bound, &mut out[3..])
}

/// Parses the header of a datagram a client sends to its UDP relay (`RSV RSV FRAG ATYP
/// DST.ADDR DST.PORT DATA`): the destination and where the data starts.
pub fn parse_udp_header(datagram: &[u8]) -> Result<(Address, usize), SocksError> {
    let Some(&frag) = datagram.get(2) else {
        return Err(SocksError::Truncated);
    };
    if frag != 0 {
        return Err(SocksError::Fragmented);
    }
    let rest = datagram.get(3..).ok_or(SocksError::Truncated)?;
    match parse_address(rest)? {
        Some((addr, used)) => Ok((addr, 3 + used)),
        None => Err(SocksError::Truncated),
    }
}

/// Writes the header of a datagram from `from` to the client into `out` (room for
/// [`MAX_UDP_HEADER`] at least); returns its length.
pub fn encode_udp_header(from: SocketAddr, out: &mut [u8]) -> usize {
    if let Some(h) = out.get_mut(..3) {
        h.copy_from_slice(&[0, 0, 0]);
    }
    3 + put_address(from, out.get_mut(3..).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn greeting() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0, 9]), Ok(Some(4)));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(SocksError::NoAcceptableMethod)
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(SocksError::Version(4)));
    }

    #[test]
    fn requests() {
        let v4 = [5, 1, 0, 1, 100, 64, 0, 5, 0x15, 0x38, 0xee];
        let (r, used) = parse_request(&v4).unwrap().unwrap();
        assert_eq!(used, 10);
        assert_eq!(r.command, Command::Connect);
        assert_eq!(r.address, Address::Ip("100.64.0.5:5432".parse().unwrap()));
        for cut in 0..10 {
            assert_eq!(parse_request(&v4[..cut]), Ok(None), "{cut}");
        }
        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&"200::5".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&53u16.to_be_bytes());
        let (r, used) = parse_request(&v6).unwrap().unwrap();
        assert_eq!(used, 22);
        assert_eq!(r.command, Command::UdpAssociate);
        assert_eq!(r.address.ip(), Some("[200::5]:53".parse().unwrap()));
        let mut dom = vec![5, 1, 0, 3, 7];
        dom.extend_from_slice(b"db.mesh");
        dom.extend_from_slice(&80u16.to_be_bytes());
        let (r, _) = parse_request(&dom).unwrap().unwrap();
        assert_eq!(r.address, Address::Domain("db.mesh".into(), 80));
        assert_eq!(r.address.ip(), None);
        assert_eq!(
            Address::Domain("[200::1]".into(), 80).ip(),
            Some("[200::1]:80".parse().unwrap())
        );
        assert_eq!(
            Address::Domain("100.64.0.1".into(), 80).ip(),
            Some("100.64.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse_request(&[5, 9, 0, 1, 1, 2, 3, 4, 0, 1])
                .unwrap()
                .unwrap()
                .0
                .command,
            Command::Unknown(9)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 2, 0]),
            Err(SocksError::AddressType(2))
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 1, 0xff, 0, 1]),
            Err(SocksError::BadDomain)
        );
    }

    #[test]
    fn replies() {
        let mut out = [0; MAX_REPLY];
        let n = encode_reply(
            Reply::Succeeded,
            "100.64.0.2:40000".parse().unwrap(),
            &mut out,
        );
        assert_eq!(&out[..n], &[5, 0, 0, 1, 100, 64, 0, 2, 0x9c, 0x40]);
        let n = encode_reply(
            Reply::ConnectionRefused,
            "[200::2]:1".parse().unwrap(),
            &mut out,
        );
        assert_eq!(n, 22);
        assert_eq!(out[1], 5);
        assert_eq!(out[3], 4);
    }

    #[test]
    fn udp_headers_round_trip() {
        let mut buf = [0u8; MAX_UDP_HEADER + 4];
        for from in ["100.64.0.9:53", "[200::9]:5353"] {
            let from: SocketAddr = from.parse().unwrap();
            let n = encode_udp_header(from, &mut buf);
            buf[n..n + 4].copy_from_slice(b"ping");
            let (addr, start) = parse_udp_header(&buf[..n + 4]).unwrap();
            assert_eq!(addr, Address::Ip(from));
            assert_eq!(&buf[start..n + 4], b"ping");
        }
        assert_eq!(
            parse_udp_header(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 1]),
            Err(SocksError::Fragmented)
        );
        assert_eq!(parse_udp_header(&[0, 0]), Err(SocksError::Truncated));
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 1, 1]),
            Err(SocksError::Truncated)
        );
    }

    #[test]
    fn garbage_never_panics() {
        // Small byte values, so versions, lengths and address types often look right.
        let mut lcg = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            lcg = lcg
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            lcg >> 33
        };
        let mut buf = [0u8; 40];
        for _ in 0..50_000 {
            buf.fill_with(|| (next() % 7) as u8);
            let b = &buf[..(next() % 40) as usize];
            let _ = parse_greeting(b);
            let _ = parse_request(b);
            let _ = parse_udp_header(b);
        }
    }
}
