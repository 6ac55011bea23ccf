//! Mesh DNS, pure (DESIGN §10): the table of device names a node answers from, and
//! the answer to one DNS query — bytes in, bytes out.
//!
//! [`NameTable`] maps `NAME.DOMAIN` to a device's tunnel addresses; the node's control
//! core rebuilds it from the coordinator's device records on every change.
//! [`answer`] parses a query with hickory-proto (a maintained DNS crate, not a parser of
//! our own) and builds the response: `A` is the tunnel IPv4, `AAAA` the tunnel IPv6;
//! a device without IPv6 answers `AAAA` with NOERROR and no record (NODATA); an
//! unknown name in the domain is NXDOMAIN; a name outside it is REFUSED (no open
//! resolver). Queries longer than [`MAX_QUERY`] are dropped before parsing; a query
//! that does not parse gets FORMERR if its header can be read, else nothing; a
//! response (QR set) gets nothing, so two resolvers cannot loop.
//!
//! Deliberately not here: sockets, the TCP length prefix (the shell, `join::dns`),
//! recursion, zone transfers, DNSSEC, EDNS options. Answers are one record and fit
//! any UDP response (under 512 bytes), so nothing is ever truncated.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::wire::control::Device;

/// TTL of every answer, seconds: short, since devices come and go within a second.
pub const TTL: u32 = 5;

/// Longest query taken (UDP or one TCP message); longer ones are dropped unparsed.
pub const MAX_QUERY: usize = 4096;

/// A device's tunnel addresses, as names resolve to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub v4: Ipv4Addr,
    /// `None`: the device has no IPv6 (its `AAAA` is NODATA).
    pub v6: Option<Ipv6Addr>,
}

/// Device names of one organization (lower-case, one label each) under its domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    /// Lower-case, no final dot; empty: nothing is answered (REFUSED).
    domain: String,
    hosts: HashMap<String, Host>,
}

impl NameTable {
    /// The table of `devices` (each carries its name and its organization's domain;
    /// devices without a name, from an older coordinator, are left out).
    pub fn from_devices<'a>(domain: &str, devices: impl IntoIterator<Item = &'a Device>) -> Self {
        let hosts = devices
            .into_iter()
            .filter(|d| !d.name.is_empty())
            .map(|d| {
                (
                    d.name.to_ascii_lowercase(),
                    Host {
                        v4: d.tunnel_ip,
                        v6: d.tunnel_ip_v6,
                    },
                )
            })
            .collect();
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            hosts,
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// What `NAME.DOMAIN` (any case, a final dot allowed) is.
    pub fn lookup(&self, fqdn: &str) -> Lookup {
        let fqdn = fqdn.strip_suffix('.').unwrap_or(fqdn).to_ascii_lowercase();
        self.classify(fqdn.split('.').map(str::as_bytes))
    }

    /// The addresses of `NAME.DOMAIN`, if it is a device's.
    pub fn resolve(&self, fqdn: &str) -> Option<Host> {
        match self.lookup(fqdn) {
            Lookup::Host(h) => Some(h),
            _ => None,
        }
    }

    /// `labels`: lower-case, in order, without the root.
    fn classify<'a>(&self, labels: impl DoubleEndedIterator<Item = &'a [u8]>) -> Lookup {
        if self.domain.is_empty() {
            return Lookup::Outside;
        }
        let mut labels = labels.rev();
        for want in self.domain.rsplit('.') {
            if labels.next() != Some(want.as_bytes()) {
                return Lookup::Outside;
            }
        }
        let host = labels.next();
        match (host, labels.next()) {
            (None, _) => Lookup::Apex,
            (Some(h), None) => std::str::from_utf8(h)
                .ok()
                .and_then(|h| self.hosts.get(h))
                .map_or(Lookup::Unknown, |h| Lookup::Host(*h)),
            (Some(_), Some(_)) => Lookup::Unknown,
        }
    }
}

/// What a name is to a [`NameTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A device's name.
    Host(Host),
    /// The domain itself (exists, holds no addresses).
    Apex,
    /// In the domain, no such device (NXDOMAIN).
    Unknown,
    /// Not in the domain (REFUSED).
    Outside,
}

/// The response to the DNS query `query` from `table`, or `None` when nothing must
/// be sent (too long, no readable header, not a query). See the module docs.
pub fn answer(table: &NameTable, query: &[u8]) -> Option<Vec<u8>> {
    if query.len() > MAX_QUERY || query.len() < 12 {
        return None;
    }
    // The header is 12 bytes; QR is the top bit of byte 2.
    let id = u16::from_be_bytes([query[0], query[1]]);
    if query[2] & 0x80 != 0 {
        return None;
    }
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return encode(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)),
    };
    let meta = request.metadata;
    if meta.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(id, meta.op_code);
    response.metadata.recursion_desired = meta.recursion_desired;
    if meta.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return encode(response);
    }
    let [q] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return encode(response);
    };
    response.add_query(q.clone());
    let name = q.name().to_lowercase();
    let lookup = table.classify(name.iter());
    let code = match (lookup, q.query_class()) {
        (Lookup::Outside, _) => ResponseCode::Refused,
        (_, DNSClass::IN) => {
            response.metadata.authoritative = true;
            match lookup {
                Lookup::Host(h) => {
                    if let Some(record) = record(q.name(), h, q.query_type()) {
                        response.add_answer(record);
                    }
                    ResponseCode::NoError
                }
                Lookup::Unknown => ResponseCode::NXDomain,
                Lookup::Apex | Lookup::Outside => ResponseCode::NoError,
            }
        }
        _ => ResponseCode::Refused,
    };
    response.metadata.response_code = code;
    encode(response)
}

/// The record answering `qtype` for a host, if it has one.
fn record(name: &Name, h: Host, qtype: RecordType) -> Option<Record> {
    let data = match qtype {
        RecordType::A => RData::A(A(h.v4)),
        RecordType::AAAA => RData::AAAA(AAAA(h.v6?)),
        _ => return None,
    };
    Some(Record::from_rdata(name.clone(), TTL, data))
}

fn encode(m: Message) -> Option<Vec<u8>> {
    match m.to_vec() {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::debug!(error = %e, "cannot encode a DNS response");
            None
        }
    }
}

#[cfg(test)]
mod tests;
