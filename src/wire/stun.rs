//! Minimal sans-IO STUN (RFC 5389) codec for the Binding method.
//!
//! This module lets a node discover its server-reflexive (public) address and
//! lets a node answer such queries, without doing any I/O itself: callers hand
//! in received datagrams and caller-owned output buffers, and get back parsed
//! values or the number of bytes written. Nothing here allocates.
//!
//! What it does:
//! * validates STUN headers ([`Packet::new_checked`]) and walks attributes
//!   (with 4-byte padding) via [`Packet::attributes`];
//! * encodes Binding requests and Binding success responses carrying
//!   XOR-MAPPED-ADDRESS (IPv4 or IPv6);
//! * parses Binding requests and Binding success responses (XOR-MAPPED-ADDRESS,
//!   falling back to the legacy MAPPED-ADDRESS);
//! * offers [`is_stun`], a cheap test to demultiplex STUN from WireGuard
//!   datagrams arriving on the same UDP socket, and [`respond`], a one-call
//!   server helper.
//!
//! What it deliberately does not do:
//! * any method other than Binding (no TURN, no ICE-specific handling);
//! * MESSAGE-INTEGRITY, FINGERPRINT, short-term or long-term credentials,
//!   or any other authentication: such attributes are skipped, never checked
//!   nor generated;
//! * error responses (e.g. 420 Unknown Attribute): anything we do not like is
//!   dropped silently by [`respond`];
//! * retransmission timers or transaction bookkeeping (left to the caller);
//! * RFC 3489 "classic STUN" messages without the magic cookie.
//!
//! Every function is total: no input can make it panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The fixed magic cookie found in bytes 4..8 of every RFC 5389 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Length of the fixed STUN message header.
pub const HEADER_LEN: usize = 20;

/// 96-bit transaction identifier.
pub type TransactionId = [u8; 12];

/// The Binding method.
const METHOD_BINDING: u16 = 0x0001;
/// Message type of a Binding request (method 0x001, class request).
const TYPE_BINDING_REQUEST: u16 = 0x0001;
/// Message type of a Binding success response.
const TYPE_BINDING_SUCCESS: u16 = 0x0101;

/// MAPPED-ADDRESS attribute (RFC 5389 section 15.1).
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS attribute (RFC 5389 section 15.2).
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// XOR-MAPPED-ADDRESS ports are XORed with the top 16 bits of the cookie.
const XOR_PORT_MASK: u16 = (MAGIC_COOKIE >> 16) as u16;

const FAMILY_IPV4: u8 = 0x01;
const FAMILY_IPV6: u8 = 0x02;

/// Attribute header: 16-bit type + 16-bit length.
const ATTR_HEADER_LEN: usize = 4;
/// Value length of an IPv4 (XOR-)MAPPED-ADDRESS.
const ADDR_V4_LEN: usize = 8;
/// Value length of an IPv6 (XOR-)MAPPED-ADDRESS.
const ADDR_V6_LEN: usize = 20;

/// STUN message class, encoded in bits C1 (0x0100) and C0 (0x0010) of the type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageClass {
    Request,
    Indication,
    SuccessResponse,
    ErrorResponse,
}

/// Reasons a buffer is rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StunError {
    /// The input is shorter than its header claims (or than a header), or the
    /// output buffer is too small for the message being encoded.
    #[error("buffer too short for STUN message")]
    Truncated,
    /// Not an RFC 5389 STUN message: top two bits set, wrong magic cookie,
    /// message length not a multiple of 4, or trailing bytes after the message.
    #[error("not a STUN message")]
    NotStun,
    /// A well-formed STUN message of a method other than Binding.
    #[error("unsupported STUN method {0:#05x}")]
    UnsupportedMethod(u16),
    /// A STUN message that violates the protocol in the given way.
    #[error("malformed STUN message: {0}")]
    Malformed(&'static str),
}

/// Reads a big-endian `u16` at `off`, or `None` if out of range.
fn read_u16(buf: &[u8], off: usize) -> Option<u16> {
    buf.get(off..)?
        .first_chunk::<2>()
        .map(|b| u16::from_be_bytes(*b))
}

/// Reads a big-endian `u32` at `off`, or `None` if out of range.
fn read_u32(buf: &[u8], off: usize) -> Option<u32> {
    buf.get(off..)?
        .first_chunk::<4>()
        .map(|b| u32::from_be_bytes(*b))
}

/// Checked view over a STUN message.
///
/// [`Packet::new_checked`] validates the header once (length, top bits, magic
/// cookie, message length); afterwards every accessor is infallible and cannot
/// panic.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buf` after validating the STUN header.
    ///
    /// The buffer must hold exactly one message: `HEADER_LEN + message length`
    /// bytes. A shorter buffer yields [`StunError::Truncated`]; trailing bytes,
    /// a bad cookie, set top bits or a length that is not a multiple of 4 yield
    /// [`StunError::NotStun`].
    pub fn new_checked(buf: T) -> Result<Self, StunError> {
        let bytes = buf.as_ref();
        if bytes.len() < HEADER_LEN {
            return Err(StunError::Truncated);
        }
        let msg_type = read_u16(bytes, 0).ok_or(StunError::Truncated)?;
        let msg_len = read_u16(bytes, 2).ok_or(StunError::Truncated)?;
        let cookie = read_u32(bytes, 4).ok_or(StunError::Truncated)?;
        if msg_type & 0xC000 != 0 || cookie != MAGIC_COOKIE || !msg_len.is_multiple_of(4) {
            return Err(StunError::NotStun);
        }
        let total = HEADER_LEN + usize::from(msg_len);
        if bytes.len() < total {
            return Err(StunError::Truncated);
        }
        if bytes.len() > total {
            return Err(StunError::NotStun);
        }
        Ok(Packet { buf })
    }

    fn msg_type(&self) -> u16 {
        read_u16(self.buf.as_ref(), 0).unwrap_or(0)
    }

    /// Message class (request, indication, success or error response).
    pub fn class(&self) -> MessageClass {
        let t = self.msg_type();
        match (t & 0x0100 != 0, t & 0x0010 != 0) {
            (false, false) => MessageClass::Request,
            (false, true) => MessageClass::Indication,
            (true, false) => MessageClass::SuccessResponse,
            (true, true) => MessageClass::ErrorResponse,
        }
    }

    /// 12-bit method number, with the class bits removed (Binding is 0x001).
    pub fn method(&self) -> u16 {
        let t = self.msg_type();
        (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
    }

    /// The 96-bit transaction ID (bytes 8..20).
    pub fn transaction_id(&self) -> TransactionId {
        self.buf
            .as_ref()
            .get(8..)
            .and_then(|b| b.first_chunk::<12>())
            .copied()
            .unwrap_or([0; 12])
    }

    /// Iterates over `(type, value)` pairs of the attributes, skipping the
    /// padding that follows each value. Values exclude padding. Yields one
    /// `Err` and then stops if an attribute overruns the message.
    pub fn attributes(&self) -> AttributeIter<'_> {
        let bytes = self.buf.as_ref();
        let len = usize::from(read_u16(bytes, 2).unwrap_or(0));
        let body = bytes
            .get(HEADER_LEN..)
            .and_then(|b| b.get(..len))
            .unwrap_or(&[]);
        AttributeIter { rest: body }
    }
}

/// Iterator over the attributes of a [`Packet`]; see [`Packet::attributes`].
#[derive(Debug, Clone)]
pub struct AttributeIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AttributeIter<'a> {
    type Item = Result<(u16, &'a [u8]), StunError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = self.rest;
        // Whatever happens below, a failure ends the iteration.
        self.rest = &[];
        let (Some(attr_type), Some(attr_len)) = (read_u16(rest, 0), read_u16(rest, 2)) else {
            return Some(Err(StunError::Malformed("truncated attribute header")));
        };
        let attr_len = usize::from(attr_len);
        let Some(after_header) = rest.get(ATTR_HEADER_LEN..) else {
            return Some(Err(StunError::Malformed("truncated attribute header")));
        };
        let Some(value) = after_header.get(..attr_len) else {
            return Some(Err(StunError::Malformed(
                "attribute length exceeds message",
            )));
        };
        let padded = (attr_len + 3) & !3;
        let Some(next) = after_header.get(padded..) else {
            return Some(Err(StunError::Malformed("attribute padding missing")));
        };
        self.rest = next;
        Some(Ok((attr_type, value)))
    }
}

impl std::iter::FusedIterator for AttributeIter<'_> {}

/// Cheap test for demultiplexing STUN from other traffic (e.g. WireGuard,
/// whose message types 1..=4 are followed by three zero bytes) on one socket:
/// at least [`HEADER_LEN`] bytes, top two bits zero, magic cookie at 4..8.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && buf.first().is_some_and(|b| b & 0xC0 == 0)
        && read_u32(buf, 4) == Some(MAGIC_COOKIE)
}

/// Bounds-checked sequential writer over a caller-provided buffer.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), StunError> {
        let end = self
            .pos
            .checked_add(bytes.len())
            .ok_or(StunError::Truncated)?;
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(StunError::Truncated)?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    fn put_u16(&mut self, v: u16) -> Result<(), StunError> {
        self.put(&v.to_be_bytes())
    }

    fn put_u32(&mut self, v: u32) -> Result<(), StunError> {
        self.put(&v.to_be_bytes())
    }
}

/// Writes a header, after checking that `out` can hold the whole message, so
/// that a too-small buffer is reported before anything is written.
fn start_message<'a>(
    out: &'a mut [u8],
    msg_type: u16,
    body_len: usize,
    txid: &TransactionId,
) -> Result<Writer<'a>, StunError> {
    let body_len_u16 =
        u16::try_from(body_len).map_err(|_| StunError::Malformed("body too long"))?;
    if out.len() < HEADER_LEN + body_len {
        return Err(StunError::Truncated);
    }
    let mut w = Writer { buf: out, pos: 0 };
    w.put_u16(msg_type)?;
    w.put_u16(body_len_u16)?;
    w.put_u32(MAGIC_COOKIE)?;
    w.put(txid)?;
    Ok(w)
}

/// Encodes a Binding request (no attributes) into `out`; returns the number
/// of bytes written ([`HEADER_LEN`]). Does not allocate.
pub fn encode_binding_request(txid: &TransactionId, out: &mut [u8]) -> Result<usize, StunError> {
    let w = start_message(out, TYPE_BINDING_REQUEST, 0, txid)?;
    Ok(w.pos)
}

/// Encodes a Binding success response carrying one XOR-MAPPED-ADDRESS for
/// `mapped` into `out`; returns the number of bytes written (32 for IPv4, 44
/// for IPv6). IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are encoded as
/// IPv4. Does not allocate.
pub fn encode_binding_response(
    txid: &TransactionId,
    mapped: SocketAddr,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let ip = mapped.ip().to_canonical();
    let port = mapped.port() ^ XOR_PORT_MASK;
    let value_len = match ip {
        IpAddr::V4(_) => ADDR_V4_LEN,
        IpAddr::V6(_) => ADDR_V6_LEN,
    };
    let mut w = start_message(out, TYPE_BINDING_SUCCESS, ATTR_HEADER_LEN + value_len, txid)?;
    w.put_u16(ATTR_XOR_MAPPED_ADDRESS)?;
    w.put_u16(value_len as u16)?;
    match ip {
        IpAddr::V4(v4) => {
            w.put(&[0, FAMILY_IPV4])?;
            w.put_u16(port)?;
            w.put_u32(v4.to_bits() ^ MAGIC_COOKIE)?;
        }
        IpAddr::V6(v6) => {
            w.put(&[0, FAMILY_IPV6])?;
            w.put_u16(port)?;
            w.put(&(v6.to_bits() ^ xor_key_v6(txid)).to_be_bytes())?;
        }
    }
    Ok(w.pos)
}

/// The 128-bit XOR key for IPv6 addresses: magic cookie || transaction ID.
fn xor_key_v6(txid: &TransactionId) -> u128 {
    let mut key = u128::from(MAGIC_COOKIE);
    for b in txid {
        key = (key << 8) | u128::from(*b);
    }
    key
}

/// Decodes a (XOR-)MAPPED-ADDRESS value. With `xor_txid`, the value is
/// un-XORed as XOR-MAPPED-ADDRESS for that transaction.
fn decode_address(value: &[u8], xor_txid: Option<&TransactionId>) -> Result<SocketAddr, StunError> {
    let family = *value
        .get(1)
        .ok_or(StunError::Malformed("address attribute too short"))?;
    let port = read_u16(value, 2).ok_or(StunError::Malformed("address attribute too short"))?;
    match family {
        FAMILY_IPV4 => {
            if value.len() != ADDR_V4_LEN {
                return Err(StunError::Malformed("bad IPv4 address attribute length"));
            }
            let raw = read_u32(value, 4)
                .ok_or(StunError::Malformed("bad IPv4 address attribute length"))?;
            let (port, raw) = match xor_txid {
                Some(_) => (port ^ XOR_PORT_MASK, raw ^ MAGIC_COOKIE),
                None => (port, raw),
            };
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from_bits(raw)), port))
        }
        FAMILY_IPV6 => {
            if value.len() != ADDR_V6_LEN {
                return Err(StunError::Malformed("bad IPv6 address attribute length"));
            }
            let raw = value
                .get(4..)
                .and_then(|b| b.first_chunk::<16>())
                .map(|b| u128::from_be_bytes(*b))
                .ok_or(StunError::Malformed("bad IPv6 address attribute length"))?;
            let (port, raw) = match xor_txid {
                Some(txid) => (port ^ XOR_PORT_MASK, raw ^ xor_key_v6(txid)),
                None => (port, raw),
            };
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from_bits(raw)), port))
        }
        _ => Err(StunError::Malformed("unknown address family")),
    }
}

/// Validates a Binding message of the expected class and returns its packet.
fn checked_binding<'a>(
    buf: &'a [u8],
    class: MessageClass,
    what: &'static str,
) -> Result<Packet<&'a [u8]>, StunError> {
    let pkt = Packet::new_checked(buf)?;
    let method = pkt.method();
    if method != METHOD_BINDING {
        return Err(StunError::UnsupportedMethod(method));
    }
    if pkt.class() != class {
        return Err(StunError::Malformed(what));
    }
    Ok(pkt)
}

/// Parses a Binding request and returns its transaction ID. Attributes are
/// ignored, but they must be well-formed.
pub fn parse_binding_request(buf: &[u8]) -> Result<TransactionId, StunError> {
    let pkt = checked_binding(buf, MessageClass::Request, "expected a Binding request")?;
    for attr in pkt.attributes() {
        attr?;
    }
    Ok(pkt.transaction_id())
}

/// Parses a Binding success response and returns its transaction ID and the
/// reflexive address from the first XOR-MAPPED-ADDRESS (0x0020), falling back
/// to the first MAPPED-ADDRESS (0x0001). All attributes must be well-formed.
pub fn parse_binding_response(buf: &[u8]) -> Result<(TransactionId, SocketAddr), StunError> {
    let pkt = checked_binding(
        buf,
        MessageClass::SuccessResponse,
        "expected a Binding success response",
    )?;
    let txid = pkt.transaction_id();
    let mut xor_mapped = None;
    let mut mapped = None;
    for attr in pkt.attributes() {
        let (attr_type, value) = attr?;
        match attr_type {
            ATTR_XOR_MAPPED_ADDRESS if xor_mapped.is_none() => {
                xor_mapped = Some(decode_address(value, Some(&txid))?);
            }
            ATTR_MAPPED_ADDRESS if mapped.is_none() => {
                mapped = Some(decode_address(value, None)?);
            }
            _ => {}
        }
    }
    let addr = xor_mapped
        .or(mapped)
        .ok_or(StunError::Malformed("no mapped address attribute"))?;
    Ok((txid, addr))
}

/// Server-side sans-IO helper: if `datagram` is a valid Binding request,
/// writes a Binding success response reporting `source` into `out` and
/// returns `Some(len)`; otherwise (not STUN, not a Binding request, malformed,
/// or `out` too small) returns `None` and the datagram should be dropped.
pub fn respond(datagram: &[u8], source: SocketAddr, out: &mut [u8]) -> Option<usize> {
    let txid = parse_binding_request(datagram).ok()?;
    encode_binding_response(&txid, source, out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: TransactionId = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    /// RFC 5769 section 2.1: sample request (SOFTWARE, PRIORITY,
    /// ICE-CONTROLLED, USERNAME with 3 bytes of padding, MESSAGE-INTEGRITY,
    /// FINGERPRINT).
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74,
        0x65, 0x73, 0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e,
        0x00, 0x01, 0xff, 0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36,
        0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20,
        0x20, 0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e,
        0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5,
        0x7a, 0x3b, 0xcf,
    ];

    /// RFC 5769 section 2.2: sample IPv4 response.
    const RFC5769_RESPONSE_V4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    /// RFC 5769 section 2.3: sample IPv6 response.
    const RFC5769_RESPONSE_V6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    const RFC5769_TXID: TransactionId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// Plain bitwise CRC-32 (IEEE); test-only, used to confirm the vectors
    /// above were transcribed correctly via their FINGERPRINT attribute.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Checks the trailing FINGERPRINT (RFC 5389 section 15.5) of `msg`.
    fn assert_fingerprint(msg: &[u8]) {
        let split = msg.len() - 8;
        let (covered, fp) = msg.split_at(split);
        assert_eq!(&fp[..4], &[0x80, 0x28, 0x00, 0x04]);
        let expected = u32::from_be_bytes(fp[4..8].try_into().unwrap());
        assert_eq!(crc32(covered) ^ 0x5354_554E, expected);
    }

    /// Builds a message of the given type with raw attribute bytes.
    fn build(msg_type: u16, txid: &TransactionId, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&msg_type.to_be_bytes());
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        v.extend_from_slice(txid);
        v.extend_from_slice(body);
        v
    }

    /// Appends an attribute with zero padding to `body`.
    fn attr(body: &mut Vec<u8>, t: u16, value: &[u8]) {
        body.extend_from_slice(&t.to_be_bytes());
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
    }

    #[test]
    fn rfc5769_vectors_transcribed_correctly() {
        assert_fingerprint(&RFC5769_REQUEST);
        assert_fingerprint(&RFC5769_RESPONSE_V4);
        assert_fingerprint(&RFC5769_RESPONSE_V6);
    }

    #[test]
    fn rfc5769_request() {
        assert!(is_stun(&RFC5769_REQUEST));
        assert_eq!(parse_binding_request(&RFC5769_REQUEST), Ok(RFC5769_TXID));
        let pkt = Packet::new_checked(&RFC5769_REQUEST[..]).unwrap();
        assert_eq!(pkt.class(), MessageClass::Request);
        assert_eq!(pkt.method(), 1);
        let attrs: Vec<_> = pkt.attributes().collect::<Result<_, _>>().unwrap();
        let types: Vec<u16> = attrs.iter().map(|(t, _)| *t).collect();
        assert_eq!(types, [0x8022, 0x0024, 0x8029, 0x0006, 0x0008, 0x8028]);
        assert_eq!(attrs[0].1, b"STUN test client");
        // USERNAME: 9 bytes of value, 3 bytes of padding skipped.
        assert_eq!(attrs[3].1, b"evtj:h6vY");
        assert_eq!(attrs[4].1.len(), 20);
        assert_eq!(attrs[5].1, [0xe5, 0x7a, 0x3b, 0xcf]);
        // And it is something a server answers.
        let src: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let mut out = [0u8; 64];
        let n = respond(&RFC5769_REQUEST, src, &mut out).unwrap();
        assert_eq!(parse_binding_response(&out[..n]), Ok((RFC5769_TXID, src)));
    }

    #[test]
    fn rfc5769_response_v4() {
        let (txid, addr) = parse_binding_response(&RFC5769_RESPONSE_V4).unwrap();
        assert_eq!(txid, RFC5769_TXID);
        assert_eq!(addr, "192.0.2.1:32853".parse::<SocketAddr>().unwrap());
        // SOFTWARE "test vector" has 11 bytes and one byte of padding.
        let pkt = Packet::new_checked(&RFC5769_RESPONSE_V4).unwrap();
        let first = pkt.attributes().next().unwrap().unwrap();
        assert_eq!(first, (0x8022, &b"test vector"[..]));
        // Our encoder produces the same XOR-MAPPED-ADDRESS attribute bytes.
        let mut out = [0u8; 64];
        let n = encode_binding_response(&RFC5769_TXID, addr, &mut out).unwrap();
        assert_eq!(&out[20..n], &RFC5769_RESPONSE_V4[36..48]);
    }

    #[test]
    fn rfc5769_response_v6() {
        let (txid, addr) = parse_binding_response(&RFC5769_RESPONSE_V6).unwrap();
        assert_eq!(txid, RFC5769_TXID);
        let expected: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap();
        assert_eq!(addr, expected);
        let mut out = [0u8; 64];
        let n = encode_binding_response(&RFC5769_TXID, addr, &mut out).unwrap();
        assert_eq!(&out[20..n], &RFC5769_RESPONSE_V6[36..60]);
    }

    #[test]
    fn round_trip_request() {
        let mut out = [0u8; 32];
        let n = encode_binding_request(&TXID, &mut out).unwrap();
        assert_eq!(n, HEADER_LEN);
        assert!(is_stun(&out[..n]));
        assert_eq!(parse_binding_request(&out[..n]), Ok(TXID));
        let pkt = Packet::new_checked(&out[..n]).unwrap();
        assert_eq!(pkt.class(), MessageClass::Request);
        assert_eq!(pkt.method(), 1);
        assert_eq!(pkt.transaction_id(), TXID);
        assert_eq!(pkt.attributes().count(), 0);
        // A request is not a response and vice versa.
        assert_eq!(
            parse_binding_response(&out[..n]),
            Err(StunError::Malformed("expected a Binding success response"))
        );
    }

    #[test]
    fn round_trip_response_v4_and_v6() {
        for s in [
            "203.0.113.7:51820",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[2001:db8::1]:51820",
            "[::]:1",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        ] {
            let addr: SocketAddr = s.parse().unwrap();
            let mut out = [0u8; 64];
            let n = encode_binding_response(&TXID, addr, &mut out).unwrap();
            assert_eq!(n, if addr.is_ipv4() { 32 } else { 44 });
            assert!(is_stun(&out[..n]));
            assert_eq!(parse_binding_response(&out[..n]), Ok((TXID, addr)), "{s}");
            let pkt = Packet::new_checked(&out[..n]).unwrap();
            assert_eq!(pkt.class(), MessageClass::SuccessResponse);
            assert_eq!(pkt.method(), 1);
            assert_eq!(
                parse_binding_request(&out[..n]),
                Err(StunError::Malformed("expected a Binding request"))
            );
        }
    }

    #[test]
    fn v4_mapped_source_reported_as_v4() {
        let src: SocketAddr = "[::ffff:198.51.100.9]:4242".parse().unwrap();
        let mut req = [0u8; HEADER_LEN];
        encode_binding_request(&TXID, &mut req).unwrap();
        let mut out = [0u8; 64];
        let n = respond(&req, src, &mut out).unwrap();
        assert_eq!(n, 32);
        let (_, addr) = parse_binding_response(&out[..n]).unwrap();
        assert_eq!(addr, "198.51.100.9:4242".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn output_buffer_too_small() {
        let v4: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let mut out = [0xAAu8; 64];
        assert_eq!(
            encode_binding_request(&TXID, &mut out[..19]),
            Err(StunError::Truncated)
        );
        assert_eq!(
            encode_binding_response(&TXID, v4, &mut out[..31]),
            Err(StunError::Truncated)
        );
        assert_eq!(
            encode_binding_response(&TXID, v6, &mut out[..43]),
            Err(StunError::Truncated)
        );
        // Nothing was written on failure.
        assert!(out.iter().all(|&b| b == 0xAA));
        let mut req = [0u8; HEADER_LEN];
        encode_binding_request(&TXID, &mut req).unwrap();
        assert_eq!(respond(&req, v6, &mut out[..43]), None);
        assert_eq!(respond(&req, v6, &mut out[..44]), Some(44));
    }

    #[test]
    fn truncated_and_garbage_inputs() {
        let mut full = [0u8; 64];
        let addr: SocketAddr = "[2001:db8::2]:9".parse().unwrap();
        let n = encode_binding_response(&TXID, addr, &mut full).unwrap();
        for i in 0..n {
            assert!(parse_binding_response(&full[..i]).is_err(), "prefix {i}");
            assert_eq!(respond(&full[..i], addr, &mut [0u8; 64]), None);
        }
        for i in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&full[..i]).err(),
                Some(StunError::Truncated)
            );
            assert!(!is_stun(&full[..i]));
        }
        // Header claims 24 bytes of body, only 20 present.
        assert_eq!(
            Packet::new_checked(&full[..40]).err(),
            Some(StunError::Truncated)
        );
        // Trailing bytes after the message.
        assert_eq!(
            Packet::new_checked(&full[..n + 4]).err(),
            Some(StunError::NotStun)
        );
        assert!(parse_binding_request(&[]).is_err());
        assert!(parse_binding_request(&[0xFF; 100]).is_err());
        assert!(parse_binding_response(b"hello world, this is not STUN").is_err());
        // A WireGuard handshake initiation starts with 1, 0, 0, 0.
        let mut wg = [0u8; 148];
        wg[0] = 1;
        wg[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert!(!is_stun(&wg));
        assert_eq!(parse_binding_request(&wg), Err(StunError::NotStun));
    }

    #[test]
    fn header_validation() {
        let mut req = [0u8; HEADER_LEN];
        encode_binding_request(&TXID, &mut req).unwrap();

        let mut bad_cookie = req;
        bad_cookie[7] ^= 1;
        assert!(!is_stun(&bad_cookie));
        assert_eq!(parse_binding_request(&bad_cookie), Err(StunError::NotStun));

        for top in [0x40, 0x80, 0xC0] {
            let mut bad = req;
            bad[0] |= top;
            assert!(!is_stun(&bad));
            assert_eq!(parse_binding_request(&bad), Err(StunError::NotStun));
        }

        // Length not a multiple of four.
        let mut odd = build(TYPE_BINDING_REQUEST, &TXID, &[0, 0, 0]);
        assert_eq!(parse_binding_request(&odd), Err(StunError::NotStun));
        odd.push(0);
        odd[3] = 4;
        // Now 4 bytes of body: an attribute header with zero length.
        assert_eq!(parse_binding_request(&odd), Ok(TXID));
    }

    #[test]
    fn class_and_method_bits() {
        let cases = [
            (0x0001, MessageClass::Request, 1),
            (0x0011, MessageClass::Indication, 1),
            (0x0101, MessageClass::SuccessResponse, 1),
            (0x0111, MessageClass::ErrorResponse, 1),
            (0x0003, MessageClass::Request, 3),
            (0x3EEF, MessageClass::Request, 0x0FFF),
            (0x3FFF, MessageClass::ErrorResponse, 0x0FFF),
            (0x0020, MessageClass::Request, 0x0010),
            (0x0200, MessageClass::Request, 0x0080),
        ];
        for (t, class, method) in cases {
            let msg = build(t, &TXID, &[]);
            let pkt = Packet::new_checked(msg).unwrap();
            assert_eq!(pkt.class(), class, "{t:#06x}");
            assert_eq!(pkt.method(), method, "{t:#06x}");
        }
        let allocate = build(0x0003, &TXID, &[]);
        assert_eq!(
            parse_binding_request(&allocate),
            Err(StunError::UnsupportedMethod(3))
        );
        assert_eq!(
            respond(&allocate, "1.2.3.4:5".parse().unwrap(), &mut [0; 64]),
            None
        );
        let indication = build(0x0011, &TXID, &[]);
        assert!(parse_binding_request(&indication).is_err());
        let error = build(0x0111, &TXID, &[]);
        assert!(parse_binding_response(&error).is_err());
    }

    #[test]
    fn odd_attribute_lengths_and_padding() {
        let mut body = Vec::new();
        attr(&mut body, 0x8022, b"a");
        attr(&mut body, 0x8023, b"");
        attr(&mut body, 0x8024, b"abcde");
        attr(&mut body, 0x8025, b"abcdefg");
        attr(&mut body, 0x8026, b"abcdefgh");
        let msg = build(TYPE_BINDING_REQUEST, &TXID, &body);
        let pkt = Packet::new_checked(&msg[..]).unwrap();
        let got: Vec<_> = pkt.attributes().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![
                (0x8022, &b"a"[..]),
                (0x8023, &b""[..]),
                (0x8024, &b"abcde"[..]),
                (0x8025, &b"abcdefg"[..]),
                (0x8026, &b"abcdefgh"[..]),
            ]
        );
        assert_eq!(parse_binding_request(&msg), Ok(TXID));
    }

    #[test]
    fn attribute_overrun_and_short_header() {
        // Attribute claims 9 bytes but only 8 fit in the message.
        let mut body = Vec::new();
        body.extend_from_slice(&[0x80, 0x22, 0x00, 0x09]);
        body.extend_from_slice(&[0; 8]);
        let msg = build(TYPE_BINDING_REQUEST, &TXID, &body);
        let pkt = Packet::new_checked(&msg[..]).unwrap();
        let mut it = pkt.attributes();
        assert!(matches!(it.next(), Some(Err(StunError::Malformed(_)))));
        assert_eq!(it.next(), None);
        assert!(matches!(
            parse_binding_request(&msg),
            Err(StunError::Malformed(_))
        ));
        assert_eq!(
            respond(&msg, "1.2.3.4:5".parse().unwrap(), &mut [0; 64]),
            None
        );

        // A maximal length field.
        let msg = build(
            TYPE_BINDING_REQUEST,
            &TXID,
            &[0x80, 0x22, 0xFF, 0xFF, 0, 0, 0, 0],
        );
        assert!(parse_binding_request(&msg).is_err());
    }

    #[test]
    fn mapped_address_fallback_and_preference() {
        let xor_addr: SocketAddr = "198.51.100.1:1000".parse().unwrap();
        let plain_addr: SocketAddr = "[2001:db8::7]:2000".parse().unwrap();

        let mut plain_v6 = vec![0, FAMILY_IPV6, 0x07, 0xD0];
        plain_v6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        let mut xor_v4 = vec![0, FAMILY_IPV4];
        xor_v4.extend_from_slice(&(1000u16 ^ 0x2112).to_be_bytes());
        xor_v4.extend_from_slice(
            &(u32::from_be_bytes([198, 51, 100, 1]) ^ MAGIC_COOKIE).to_be_bytes(),
        );

        // Only MAPPED-ADDRESS: used.
        let mut body = Vec::new();
        attr(&mut body, 0x8022, b"srv");
        attr(&mut body, ATTR_MAPPED_ADDRESS, &plain_v6);
        let msg = build(TYPE_BINDING_SUCCESS, &TXID, &body);
        assert_eq!(parse_binding_response(&msg), Ok((TXID, plain_addr)));

        // Both, MAPPED first: XOR-MAPPED-ADDRESS wins.
        attr(&mut body, ATTR_XOR_MAPPED_ADDRESS, &xor_v4);
        let msg = build(TYPE_BINDING_SUCCESS, &TXID, &body);
        assert_eq!(parse_binding_response(&msg), Ok((TXID, xor_addr)));

        // Plain IPv4 MAPPED-ADDRESS.
        let mut body = Vec::new();
        attr(
            &mut body,
            ATTR_MAPPED_ADDRESS,
            &[0, 1, 0x12, 0x34, 10, 0, 0, 1],
        );
        let msg = build(TYPE_BINDING_SUCCESS, &TXID, &body);
        assert_eq!(
            parse_binding_response(&msg),
            Ok((TXID, "10.0.0.1:4660".parse().unwrap()))
        );

        // Neither: error.
        let msg = build(TYPE_BINDING_SUCCESS, &TXID, &[]);
        assert_eq!(
            parse_binding_response(&msg),
            Err(StunError::Malformed("no mapped address attribute"))
        );
    }

    #[test]
    fn bad_address_attributes() {
        for value in [
            &[][..],
            &[0, 1, 0, 0][..],
            &[0, 1, 0, 0, 1, 2, 3][..],
            &[0, 1, 0, 0, 1, 2, 3, 4, 5][..],
            &[0, 2, 0, 0, 1, 2, 3, 4][..],
            &[0, 3, 0, 0, 1, 2, 3, 4][..],
        ] {
            let mut body = Vec::new();
            attr(&mut body, ATTR_XOR_MAPPED_ADDRESS, value);
            let msg = build(TYPE_BINDING_SUCCESS, &TXID, &body);
            assert!(
                matches!(parse_binding_response(&msg), Err(StunError::Malformed(_))),
                "{value:?}"
            );
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            StunError::Truncated.to_string(),
            "buffer too short for STUN message"
        );
        assert_eq!(StunError::NotStun.to_string(), "not a STUN message");
        assert_eq!(
            StunError::UnsupportedMethod(3).to_string(),
            "unsupported STUN method 0x003"
        );
        assert_eq!(
            StunError::Malformed("x").to_string(),
            "malformed STUN message: x"
        );
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    /// Runs every entry point on `buf`; any panic fails the test.
    fn exercise(buf: &[u8], out: &mut [u8]) {
        let _ = is_stun(buf);
        let _ = parse_binding_request(buf);
        let _ = parse_binding_response(buf);
        let _ = respond(buf, "192.0.2.1:1".parse().unwrap(), out);
        let _ = respond(buf, "[2001:db8::1]:1".parse().unwrap(), out);
        if let Ok(pkt) = Packet::new_checked(buf) {
            let _ = (pkt.class(), pkt.method(), pkt.transaction_id());
            for a in pkt.attributes() {
                let _ = a;
            }
        }
    }

    #[test]
    fn pseudo_random_inputs_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut buf = [0u8; 160];
        let mut out = [0u8; 64];
        let mut accepted = 0u32;
        for i in 0..100_000u32 {
            let len = (rng.next() % buf.len() as u64) as usize;
            for b in buf.iter_mut() {
                *b = rng.next() as u8;
            }
            match i % 4 {
                // Pure garbage.
                0 => {}
                // Valid header with consistent length, random everything else.
                1 | 2 if len >= HEADER_LEN => {
                    let body = (len - HEADER_LEN) & !3;
                    buf[0] &= 0x3F;
                    if i % 4 == 2 {
                        // Bias towards Binding request / success response.
                        buf[0] = (rng.next() % 2) as u8;
                        buf[1] = 0x01;
                    }
                    buf[2..4].copy_from_slice(&(body as u16).to_be_bytes());
                    buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                    // Sometimes make the first attribute a plausible address.
                    if body >= 12 && rng.next().is_multiple_of(2) {
                        buf[20..22].copy_from_slice(&[0x00, 0x20]);
                        buf[22] = 0;
                        buf[23] = [8u8, 20, 7, 9][(rng.next() % 4) as usize];
                        buf[25] = (rng.next() % 3) as u8;
                    }
                    exercise(&buf[..HEADER_LEN + body], &mut out);
                    if Packet::new_checked(&buf[..HEADER_LEN + body]).is_ok() {
                        accepted += 1;
                    }
                    continue;
                }
                // Bit flips of a valid response.
                _ => {
                    let addr: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
                    let n = encode_binding_response(&TXID, addr, &mut buf).unwrap();
                    let flips = rng.next() % 4;
                    for _ in 0..flips {
                        let bit = (rng.next() % (n as u64 * 8)) as usize;
                        buf[bit / 8] ^= 1 << (bit % 8);
                    }
                    exercise(&buf[..n], &mut out);
                    continue;
                }
            }
            exercise(&buf[..len], &mut out);
        }
        // The header-forcing branch really produced accepted packets.
        assert!(accepted > 10_000, "{accepted}");
    }
}
