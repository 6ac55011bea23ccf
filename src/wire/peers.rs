//! The compact binary form of what a watch stream carries: [`Response::Snapshot`] and
//! [`Response::Delta`].
//!
//! A snapshot goes to every watcher of an organization, so its size is paid once per
//! watcher: with JSON a device is ~550 bytes, here ~100 (keys as 32 raw bytes, addresses
//! as bytes, integers as varints, flags as bits). Each device is encoded on its own
//! ([`encode_device`]) so the coordinator can keep devices encoded and assemble a
//! snapshot by concatenation ([`snapshot_frame`]), once per revision, sharing the bytes
//! between watchers.
//!
//! A frame whose version byte is [`PEERS_VERSION`] carries one of these bodies; every
//! other message stays JSON (version [`frame::VERSION`]). Nodes and coordinator are the
//! same build, so there is no negotiation. Decoding checks every length against the
//! bytes left before reading or allocating, and garbage is a [`FrameError::Malformed`]
//! naming what was wrong, never a panic.
//!
//! Body layout (after the version byte), integers as LEB128 varints (signed ones
//! zigzagged):
//! ```text
//! snapshot: 0 | revision | stun_port? | policy? | count | device…
//! delta:    1 | revision | policy?    | count | device… | count | removed id…
//!             | count | (id, online flag)…
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::control::{Approved, Device, PolicyState, Response};
use super::frame::{self, FrameError};
use crate::coord::names;

/// The frame version byte of a binary peer-state body.
pub const PEERS_VERSION: u8 = 2;

const SNAPSHOT: u8 = 0;
const DELTA: u8 = 1;

// Device flags.
const SYMMETRIC_NAT: u32 = 1 << 0;
const RELAY: u32 = 1 << 1;
const RELAY_ONLY: u32 = 1 << 2;
const IPV6_SUPPORTED: u32 = 1 << 3;
const UNMANAGED: u32 = 1 << 4;
const ONLINE: u32 = 1 << 5;
const EXIT_NODE: u32 = 1 << 6;
const TUNNEL_V6: u32 = 1 << 7;
const LOCAL_IP: u32 = 1 << 8;
const LOCAL_IP_V6: u32 = 1 << 9;
const REFLEXIVE: u32 = 1 << 10;
const APPROVED_RELAY: u32 = 1 << 11;
const APPROVED_EXIT: u32 = 1 << 12;
/// The public key is sent as its 32 raw bytes (else as text).
const RAW_KEY: u32 = 1 << 13;
/// The DNS domain is the default one (`nexodus.internal`) and is left out.
const DEFAULT_DOMAIN: u32 = 1 << 14;
/// The device names the exit it uses (a device id follows the domain).
const USE_EXIT: u32 = 1 << 15;
/// A v6 reflexive endpoint (STUN over v6) follows the `use_exit` field.
const REFLEXIVE_V6: u32 = 1 << 16;
const KNOWN_FLAGS: u32 = (1 << 17) - 1;

/// Fewest bytes a device takes: a bound on how many a body can claim to hold.
const MIN_DEVICE_LEN: usize = 27;

fn malformed(what: impl Into<String>) -> FrameError {
    FrameError::Malformed(what.into())
}

// ---- writing ----

fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    put_u64(out, n as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

fn put_socket(out: &mut Vec<u8>, s: &SocketAddr) {
    match s {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => {
            out.push(7);
            out.extend_from_slice(&v6.ip().octets());
            out.extend_from_slice(&v6.scope_id().to_be_bytes());
        }
        _ => put_ip(out, s.ip()),
    }
    out.extend_from_slice(&s.port().to_be_bytes());
}

fn put_net(out: &mut Vec<u8>, n: &IpNet) {
    put_ip(out, n.addr());
    out.push(n.prefix_len());
}

fn put_nets(out: &mut Vec<u8>, nets: &[IpNet]) {
    put_len(out, nets.len());
    for n in nets {
        put_net(out, n);
    }
}

fn put_policy(out: &mut Vec<u8>, p: Option<&PolicyState>) {
    match p {
        None => out.push(0),
        Some(PolicyState { revision, text }) => {
            out.push(1);
            put_i64(out, *revision);
            match text {
                None => out.push(0),
                Some(t) => {
                    out.push(1);
                    put_str(out, t);
                }
            }
        }
    }
}

/// The key's raw bytes when its text is exactly their standard base64.
fn raw_key(text: &str) -> Option<[u8; 32]> {
    let bytes = STANDARD.decode(text).ok()?;
    let key: [u8; 32] = bytes.as_slice().try_into().ok()?;
    (STANDARD.encode(key) == text).then_some(key)
}

/// Appends one device.
pub fn encode_device(d: &Device, out: &mut Vec<u8>) {
    let key = raw_key(&d.public_key);
    let mut flags = 0;
    for (on, bit) in [
        (d.symmetric_nat, SYMMETRIC_NAT),
        (d.relay, RELAY),
        (d.relay_only, RELAY_ONLY),
        (d.ipv6_supported, IPV6_SUPPORTED),
        (d.unmanaged, UNMANAGED),
        (d.online, ONLINE),
        (d.exit_node, EXIT_NODE),
        (d.tunnel_ip_v6.is_some(), TUNNEL_V6),
        (d.local_ip.is_some(), LOCAL_IP),
        (d.local_ip_v6.is_some(), LOCAL_IP_V6),
        (d.reflexive_endpoint.is_some(), REFLEXIVE),
        (d.approved.relay, APPROVED_RELAY),
        (d.approved.exit, APPROVED_EXIT),
        (key.is_some(), RAW_KEY),
        (d.domain == names::DEFAULT_DOMAIN, DEFAULT_DOMAIN),
        (d.use_exit.is_some(), USE_EXIT),
        (d.reflexive_endpoint_v6.is_some(), REFLEXIVE_V6),
    ] {
        if on {
            flags |= bit;
        }
    }
    put_u64(out, u64::from(flags));
    put_i64(out, d.id);
    put_i64(out, d.organization_id);
    match key {
        Some(k) => out.extend_from_slice(&k),
        None => put_str(out, &d.public_key),
    }
    put_str(out, &d.hostname);
    put_str(out, &d.os);
    out.extend_from_slice(&d.tunnel_ip.octets());
    if let Some(v6) = d.tunnel_ip_v6 {
        out.extend_from_slice(&v6.octets());
    }
    out.extend_from_slice(&d.organization_prefix.addr().octets());
    out.push(d.organization_prefix.prefix_len());
    out.extend_from_slice(&d.organization_prefix_v6.addr().octets());
    out.push(d.organization_prefix_v6.prefix_len());
    if let Some(ip) = d.local_ip {
        out.extend_from_slice(&ip.octets());
    }
    if let Some(ip) = d.local_ip_v6 {
        out.extend_from_slice(&ip.octets());
    }
    put_len(out, d.endpoints.len());
    for e in &d.endpoints {
        put_socket(out, e);
    }
    if let Some(r) = &d.reflexive_endpoint {
        put_socket(out, r);
    }
    put_nets(out, &d.advertise_cidrs);
    put_i64(out, d.revision);
    put_i64(out, d.last_seen);
    put_nets(out, &d.approved.routes);
    put_str(out, &d.name);
    if d.domain != names::DEFAULT_DOMAIN {
        put_str(out, &d.domain);
    }
    if let Some(e) = d.use_exit {
        put_i64(out, e);
    }
    if let Some(r) = &d.reflexive_endpoint_v6 {
        put_socket(out, r);
    }
}

/// One device, encoded.
pub fn device_bytes(d: &Device) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_device(d, &mut out);
    out
}

/// Starts a frame: length placeholder, version byte.
fn start() -> Vec<u8> {
    vec![0, 0, 0, 0, PEERS_VERSION]
}

/// Fills in the length of a frame started with [`start`].
fn finish(mut out: Vec<u8>, max: usize) -> Result<Vec<u8>, FrameError> {
    let len = out.len() - 4;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// A whole snapshot frame from devices already encoded with [`encode_device`].
pub fn snapshot_frame<'a>(
    revision: i64,
    stun_port: Option<u16>,
    policy: Option<&PolicyState>,
    devices: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    // Checked before anything is copied (the exact size is checked at the end).
    let len: usize = devices.clone().map(<[u8]>::len).sum();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut out = start();
    out.reserve(len + 32 + policy.and_then(|p| p.text.as_ref()).map_or(0, String::len));
    out.push(SNAPSHOT);
    put_i64(&mut out, revision);
    match stun_port {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            out.extend_from_slice(&p.to_be_bytes());
        }
    }
    put_policy(&mut out, policy);
    put_len(&mut out, devices.len());
    for d in devices {
        out.extend_from_slice(d);
    }
    finish(out, max)
}

/// A whole delta frame.
pub fn delta_frame(
    revision: i64,
    upserts: &[Device],
    removed: &[i64],
    policy: Option<&PolicyState>,
    online: &[(i64, bool)],
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let encoded: Vec<Vec<u8>> = upserts.iter().map(device_bytes).collect();
    delta_frame_encoded(
        revision,
        encoded.iter().map(Vec::as_slice),
        removed,
        policy,
        online,
        max,
    )
}

/// [`delta_frame`] from devices already encoded with [`encode_device`] (a resumed
/// watcher's delta, assembled from the coordinator's encoded devices).
pub fn delta_frame_encoded<'a>(
    revision: i64,
    upserts: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    removed: &[i64],
    policy: Option<&PolicyState>,
    online: &[(i64, bool)],
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let len: usize = upserts.clone().map(<[u8]>::len).sum();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut out = start();
    out.reserve(len + removed.len() * 4 + online.len() * 4 + 32);
    out.push(DELTA);
    put_i64(&mut out, revision);
    put_policy(&mut out, policy);
    put_len(&mut out, upserts.len());
    for d in upserts {
        out.extend_from_slice(d);
    }
    put_len(&mut out, removed.len());
    for id in removed {
        put_i64(&mut out, *id);
    }
    put_len(&mut out, online.len());
    for (id, on) in online {
        put_i64(&mut out, *id);
        out.push(u8::from(*on));
    }
    finish(out, max)
}

/// The revision a snapshot or delta body (after the frame's length prefix, from its
/// version byte on) is at, read without decoding the rest; `None` for anything else.
pub fn revision_of(body: &[u8]) -> Option<i64> {
    let (&version, rest) = body.split_first()?;
    let (&kind, rest) = rest.split_first()?;
    if version != PEERS_VERSION || (kind != SNAPSHOT && kind != DELTA) {
        return None;
    }
    let mut v: u64 = 0;
    for (i, &b) in rest.iter().take(10).enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // Zigzag, as put_i64 writes it.
            return Some(((v >> 1) as i64) ^ -((v & 1) as i64));
        }
    }
    None
}

/// Encodes a snapshot or delta as a frame; any other message as JSON.
pub fn to_frame(resp: &Response, max: usize) -> Result<Vec<u8>, FrameError> {
    match resp {
        Response::Snapshot {
            revision,
            devices,
            stun_port,
            policy,
        } => {
            let encoded: Vec<Vec<u8>> = devices.iter().map(device_bytes).collect();
            snapshot_frame(
                *revision,
                *stun_port,
                policy.as_ref(),
                encoded.iter().map(Vec::as_slice),
                max,
            )
        }
        Response::Delta {
            revision,
            upserts,
            removed,
            policy,
            online,
        } => delta_frame(*revision, upserts, removed, policy.as_ref(), online, max),
        other => frame::to_frame(other, max),
    }
}

// ---- reading ----

/// A checked view of the bytes left: every read checks the length first.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FrameError> {
        if n > self.buf.len() {
            return Err(malformed(format!(
                "peer state: {what} needs {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FrameError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u64(&mut self, what: &str) -> Result<u64, FrameError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(malformed(format!("peer state: {what} overflows 64 bits")));
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed(format!("peer state: {what} overflows 64 bits")))
    }

    fn i64(&mut self, what: &str) -> Result<i64, FrameError> {
        let z = self.u64(what)?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    /// A count of items each at least `min_len` bytes long: never more than the bytes
    /// left can hold, so a hostile count allocates nothing.
    fn count(&mut self, min_len: usize, what: &str) -> Result<usize, FrameError> {
        let n = self.u64(what)?;
        let fits = self.buf.len() / min_len.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= fits => Ok(n),
            _ => Err(malformed(format!(
                "peer state: {n} {what} cannot fit in {} bytes",
                self.buf.len()
            ))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String, FrameError> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| malformed(format!("peer state: {what} is not UTF-8")))
    }

    fn flag(&mut self, what: &str) -> Result<bool, FrameError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(malformed(format!("peer state: {what} flag is {b}"))),
        }
    }

    fn v4(&mut self, what: &str) -> Result<Ipv4Addr, FrameError> {
        Ok(Ipv4Addr::from(self.array::<4>(what)?))
    }

    fn v6(&mut self, what: &str) -> Result<Ipv6Addr, FrameError> {
        Ok(Ipv6Addr::from(self.array::<16>(what)?))
    }

    fn socket(&mut self, what: &str) -> Result<SocketAddr, FrameError> {
        let ip: SocketAddr = match self.u8(what)? {
            4 => (self.v4(what)?, 0).into(),
            6 => (self.v6(what)?, 0).into(),
            7 => {
                let ip = self.v6(what)?;
                let scope = u32::from_be_bytes(self.array(what)?);
                SocketAddrV6::new(ip, 0, 0, scope).into()
            }
            t => {
                return Err(malformed(format!(
                    "peer state: {what} has address type {t}"
                )));
            }
        };
        let port = u16::from_be_bytes(self.array(what)?);
        let mut s = ip;
        s.set_port(port);
        Ok(s)
    }

    fn net(&mut self, what: &str) -> Result<IpNet, FrameError> {
        let bad = |_| malformed(format!("peer state: {what} has a bad prefix length"));
        match self.u8(what)? {
            4 => {
                let a = self.v4(what)?;
                Ipv4Net::new(a, self.u8(what)?).map(IpNet::V4).map_err(bad)
            }
            6 => {
                let a = self.v6(what)?;
                Ipv6Net::new(a, self.u8(what)?).map(IpNet::V6).map_err(bad)
            }
            t => Err(malformed(format!(
                "peer state: {what} has address type {t}"
            ))),
        }
    }

    fn nets(&mut self, what: &str) -> Result<Vec<IpNet>, FrameError> {
        let n = self.count(6, what)?;
        (0..n).map(|_| self.net(what)).collect()
    }

    fn policy(&mut self) -> Result<Option<PolicyState>, FrameError> {
        if !self.flag("policy")? {
            return Ok(None);
        }
        let revision = self.i64("policy revision")?;
        let text = if self.flag("policy text")? {
            Some(self.string("policy text")?)
        } else {
            None
        };
        Ok(Some(PolicyState { revision, text }))
    }

    fn device(&mut self) -> Result<Device, FrameError> {
        let flags = self.u64("device flags")?;
        let flags = u32::try_from(flags)
            .ok()
            .filter(|f| f & !KNOWN_FLAGS == 0)
            .ok_or_else(|| malformed(format!("peer state: unknown device flags {flags:#x}")))?;
        let has = |bit: u32| flags & bit != 0;
        let id = self.i64("device id")?;
        let organization_id = self.i64("organization id")?;
        let public_key = if has(RAW_KEY) {
            STANDARD.encode(self.array::<32>("public key")?)
        } else {
            self.string("public key")?
        };
        let hostname = self.string("hostname")?;
        let os = self.string("os")?;
        let tunnel_ip = self.v4("tunnel address")?;
        let tunnel_ip_v6 = if has(TUNNEL_V6) {
            Some(self.v6("tunnel v6 address")?)
        } else {
            None
        };
        let bad = |_| malformed("peer state: organization prefix has a bad length");
        let p4 = self.v4("organization prefix")?;
        let organization_prefix = Ipv4Net::new(p4, self.u8("organization prefix")?).map_err(bad)?;
        let p6 = self.v6("organization v6 prefix")?;
        let organization_prefix_v6 =
            Ipv6Net::new(p6, self.u8("organization v6 prefix")?).map_err(bad)?;
        let local_ip = if has(LOCAL_IP) {
            Some(self.v4("local address")?)
        } else {
            None
        };
        let local_ip_v6 = if has(LOCAL_IP_V6) {
            Some(self.v6("local v6 address")?)
        } else {
            None
        };
        let n = self.count(7, "endpoints")?;
        let endpoints = (0..n)
            .map(|_| self.socket("endpoint"))
            .collect::<Result<_, _>>()?;
        let reflexive_endpoint = if has(REFLEXIVE) {
            Some(self.socket("reflexive endpoint")?)
        } else {
            None
        };
        let advertise_cidrs = self.nets("advertised routes")?;
        let revision = self.i64("device revision")?;
        let last_seen = self.i64("last seen")?;
        let routes = self.nets("approved routes")?;
        let name = self.string("DNS name")?;
        let domain = if has(DEFAULT_DOMAIN) {
            names::DEFAULT_DOMAIN.to_owned()
        } else {
            self.string("DNS domain")?
        };
        let use_exit = if has(USE_EXIT) {
            Some(self.i64("exit in use")?)
        } else {
            None
        };
        let reflexive_endpoint_v6 = if has(REFLEXIVE_V6) {
            Some(self.socket("v6 reflexive endpoint")?)
        } else {
            None
        };
        Ok(Device {
            id,
            organization_id,
            public_key,
            hostname,
            os,
            tunnel_ip,
            tunnel_ip_v6,
            organization_prefix,
            organization_prefix_v6,
            local_ip,
            local_ip_v6,
            endpoints,
            reflexive_endpoint,
            reflexive_endpoint_v6,
            symmetric_nat: has(SYMMETRIC_NAT),
            relay: has(RELAY),
            relay_only: has(RELAY_ONLY),
            ipv6_supported: has(IPV6_SUPPORTED),
            advertise_cidrs,
            revision,
            last_seen,
            unmanaged: has(UNMANAGED),
            online: has(ONLINE),
            exit_node: has(EXIT_NODE),
            approved: Approved {
                routes,
                relay: has(APPROVED_RELAY),
                exit: has(APPROVED_EXIT),
            },
            name,
            domain,
            use_exit,
        })
    }

    fn devices(&mut self) -> Result<Vec<Device>, FrameError> {
        let n = self.count(MIN_DEVICE_LEN, "devices")?;
        (0..n).map(|_| self.device()).collect()
    }
}

/// Decodes one device encoded with [`encode_device`] (and nothing after it).
pub fn decode_device(bytes: &[u8]) -> Result<Device, FrameError> {
    let mut r = Reader { buf: bytes };
    let d = r.device()?;
    if !r.buf.is_empty() {
        return Err(malformed("peer state: bytes after the device"));
    }
    Ok(d)
}

/// Decodes a [`PEERS_VERSION`] body (the bytes after the version byte).
pub fn decode(body: &[u8]) -> Result<Response, FrameError> {
    let mut r = Reader { buf: body };
    let resp = match r.u8("message type")? {
        SNAPSHOT => {
            let revision = r.i64("revision")?;
            let stun_port = if r.flag("stun port")? {
                Some(u16::from_be_bytes(r.array("stun port")?))
            } else {
                None
            };
            let policy = r.policy()?;
            let devices = r.devices()?;
            Response::Snapshot {
                revision,
                devices,
                stun_port,
                policy,
            }
        }
        DELTA => {
            let revision = r.i64("revision")?;
            let policy = r.policy()?;
            let upserts = r.devices()?;
            let n = r.count(1, "removed ids")?;
            let removed = (0..n)
                .map(|_| r.i64("removed id"))
                .collect::<Result<_, _>>()?;
            let n = r.count(2, "online changes")?;
            let online = (0..n)
                .map(|_| Ok((r.i64("online id")?, r.flag("online")?)))
                .collect::<Result<_, FrameError>>()?;
            Response::Delta {
                revision,
                upserts,
                removed,
                policy,
                online,
            }
        }
        t => return Err(malformed(format!("peer state: unknown message type {t}"))),
    };
    if !r.buf.is_empty() {
        return Err(malformed(format!(
            "peer state: {} bytes after the message",
            r.buf.len()
        )));
    }
    Ok(resp)
}

impl frame::Message for Response {
    fn decode_other(version: u8, body: &[u8]) -> Result<Self, FrameError> {
        match version {
            PEERS_VERSION => decode(body),
            v => Err(FrameError::UnsupportedVersion(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{MAX_RESPONSE_LEN, decode_payload};

    fn device(id: i64) -> Device {
        let mut key = [0u8; 32];
        key[0] = id as u8;
        key[31] = 9;
        Device {
            use_exit: (id % 3 == 0).then_some(5),
            id,
            organization_id: 1,
            public_key: STANDARD.encode(key),
            hostname: format!("h\"{id}\u{e9}"),
            os: "linux".into(),
            tunnel_ip: "100.64.0.1".parse().unwrap(),
            tunnel_ip_v6: (id % 2 == 0).then(|| "200::1".parse().unwrap()),
            organization_prefix: "100.64.0.0/10".parse().unwrap(),
            organization_prefix_v6: "200::/64".parse().unwrap(),
            local_ip: (id % 3 == 0).then(|| "192.168.1.2".parse().unwrap()),
            local_ip_v6: (id % 3 == 1).then(|| "fd00::2".parse().unwrap()),
            endpoints: vec![
                "192.0.2.1:51820".parse().unwrap(),
                "[2001:db8::1]:51820".parse().unwrap(),
                "[fe80::1%3]:7".parse().unwrap(),
            ],
            reflexive_endpoint: (id % 2 == 1).then(|| "198.51.100.7:4000".parse().unwrap()),
            reflexive_endpoint_v6: (id % 4 == 1).then(|| "[2001:db8::7]:4000".parse().unwrap()),
            symmetric_nat: id % 2 == 0,
            relay: id == 1,
            relay_only: id == 3,
            ipv6_supported: true,
            advertise_cidrs: vec![
                "198.51.100.0/24".parse().unwrap(),
                "2001:db8::/48".parse().unwrap(),
            ],
            revision: id.wrapping_mul(1_000_003),
            last_seen: -5,
            unmanaged: id == 4,
            online: id % 2 == 1,
            exit_node: id == 5,
            approved: Approved {
                routes: if id == 6 {
                    vec!["203.0.113.0/24".parse().unwrap()]
                } else {
                    vec![]
                },
                relay: id == 6,
                exit: id == 5,
            },
            name: if id == 2 {
                String::new()
            } else {
                format!("h-{id}")
            },
            domain: if id == 3 {
                "lab.example".into()
            } else {
                "nexodus.internal".into()
            },
        }
    }

    fn decode_frame(bytes: &[u8]) -> Response {
        let (_, used) = frame::decode(bytes, MAX_RESPONSE_LEN).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        decode_payload(&bytes[4..]).unwrap()
    }

    #[test]
    fn devices_round_trip_and_are_small() {
        for id in [0, 1, 2, 3, 4, 5, 6, -1, i64::MAX, i64::MIN] {
            let d = device(id);
            let bytes = device_bytes(&d);
            let json = serde_json::to_vec(&d).unwrap();
            assert!(
                bytes.len() * 3 < json.len(),
                "{} vs {}",
                bytes.len(),
                json.len()
            );
            let mut r = Reader { buf: &bytes };
            assert_eq!(r.device().unwrap(), d);
            assert!(r.buf.is_empty());
        }
        // A key that is not canonical base64 of 32 bytes is kept as text.
        let mut d = device(2);
        d.public_key = "not a key".into();
        let bytes = device_bytes(&d);
        assert_eq!(Reader { buf: &bytes }.device().unwrap(), d);
    }

    #[test]
    fn shared_snapshot_is_the_snapshot() {
        let policy = PolicyState {
            revision: 2,
            text: Some("[[allow]]\nfrom = [\"*\"]\n".into()),
        };
        let cleared = PolicyState {
            revision: 3,
            text: None,
        };
        for (devices, stun_port, policy) in [
            (
                (1..=7).map(device).collect::<Vec<_>>(),
                Some(3478),
                Some(policy),
            ),
            (vec![device(2)], None, Some(cleared)),
            (vec![], None, None),
        ] {
            let encoded: Vec<Vec<u8>> = devices.iter().map(device_bytes).collect();
            let bytes = snapshot_frame(
                9,
                stun_port,
                policy.as_ref(),
                encoded.iter().map(Vec::as_slice),
                MAX_RESPONSE_LEN,
            )
            .unwrap();
            let want = Response::Snapshot {
                revision: 9,
                devices,
                stun_port,
                policy,
            };
            assert_eq!(decode_frame(&bytes), want);
            assert_eq!(to_frame(&want, MAX_RESPONSE_LEN).unwrap(), bytes);
        }
    }

    #[test]
    fn deltas_round_trip() {
        let want = Response::Delta {
            revision: 12,
            upserts: vec![device(1), device(2)],
            removed: vec![3, -4, i64::MAX],
            policy: Some(PolicyState {
                revision: 4,
                text: Some("x".into()),
            }),
            online: vec![(7, true), (8, false)],
        };
        assert_eq!(
            decode_frame(&to_frame(&want, MAX_RESPONSE_LEN).unwrap()),
            want
        );
        // Other messages stay JSON and decode as before.
        let pong = to_frame(&Response::Pong, MAX_RESPONSE_LEN).unwrap();
        assert_eq!(pong[4], frame::VERSION);
        assert_eq!(decode_frame(&pong), Response::Pong);
    }

    #[test]
    fn oversized_is_refused() {
        let encoded: Vec<Vec<u8>> = (1..=50).map(|i| device_bytes(&device(i))).collect();
        let r = snapshot_frame(1, None, None, encoded.iter().map(Vec::as_slice), 1000);
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    }

    /// Every truncation, every single-byte change and a pile of hostile headers give an
    /// error or a message, never a panic; lengths are checked before allocating.
    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let want = Response::Snapshot {
            revision: 5,
            devices: (1..=6).map(device).collect(),
            stun_port: Some(1),
            policy: Some(PolicyState {
                revision: 1,
                text: Some("p".into()),
            }),
        };
        let full = to_frame(&want, MAX_RESPONSE_LEN).unwrap();
        let body = &full[5..];
        for cut in 0..body.len() {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = body.to_vec();
        extra.push(0);
        assert!(decode(&extra).is_err());
        for i in 0..body.len() {
            for x in [0x01, 0x80, 0xff] {
                let mut b = body.to_vec();
                b[i] ^= x;
                let _ = decode(&b);
            }
        }
        // Hostile counts and varints: refused without allocating.
        let errors = [
            vec![],
            vec![9],
            vec![0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f],
            vec![
                1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            vec![
                0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
            vec![0, 0, 2, 0, 0],
            vec![0, 0, 0, 1, 0, 2, 0],
        ];
        for e in errors {
            let r = decode(&e);
            assert!(matches!(r, Err(FrameError::Malformed(_))), "{e:?}: {r:?}");
        }
        // Through the frame layer: an unknown version is named.
        assert_eq!(
            decode_payload::<Response>(&[9, 0]),
            Err(FrameError::UnsupportedVersion(9))
        );
        // A request never comes in binary.
        assert_eq!(
            decode_payload::<crate::wire::control::Request>(&[PEERS_VERSION, 0]),
            Err(FrameError::UnsupportedVersion(PEERS_VERSION))
        );
        // A pseudo-random stream of bodies.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let len = (x % 64) as usize;
            let mut b = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(x as u8);
            }
            if let Some(t) = b.first_mut() {
                *t &= 1;
            }
            let _ = decode(&b);
        }
    }
}
