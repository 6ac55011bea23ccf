//! Control messages between nodes and the coordinator.
//!
//! Every QUIC bidirectional stream carries one [`Request`] from the node and one or more
//! [`Response`]s from the coordinator (many for [`Request::Watch`]). Messages are JSON
//! inside [`super::frame`] frames: unknown fields are ignored, so either side can add
//! optional fields without a new frame version; an unknown message type is an error.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// QUIC ALPN of the control protocol.
pub const ALPN: &[u8] = b"nexodus/1";
/// TLS server name the coordinator certificate is issued for (the client pins the
/// certificate's fingerprint, so the name itself carries no trust).
pub const SERVER_NAME: &str = "nexodus-coordinator";

/// A registered device's proof of identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    pub device_id: i64,
    pub credential: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The join token's secret part (the fingerprint part stays with the client).
    pub token_secret: String,
    /// WireGuard public key, base64.
    pub public_key: String,
    pub hostname: String,
    #[serde(default)]
    pub os: String,
    pub ipv6_supported: bool,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    #[serde(default)]
    pub advertise_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub relay: bool,
    #[serde(default)]
    pub relay_only: bool,
    #[serde(default)]
    pub symmetric_nat: bool,
    #[serde(default)]
    pub request_ip: Option<Ipv4Addr>,
    /// Claims the exit role (`--exit-node`); peers see it once approved.
    #[serde(default)]
    pub exit_node: bool,
    #[serde(default)]
    pub request_ip_v6: Option<Ipv6Addr>,
}

/// Fields a device may change about itself; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUpdate {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub endpoints: Option<Vec<SocketAddr>>,
    #[serde(default)]
    pub reflexive_endpoint: Option<SocketAddr>,
    /// The v6 mapping seen by STUN over v6, beside the v4 one above.
    #[serde(default)]
    pub reflexive_endpoint_v6: Option<SocketAddr>,
    #[serde(default)]
    pub symmetric_nat: Option<bool>,
    #[serde(default)]
    pub relay: Option<bool>,
    #[serde(default)]
    pub relay_only: Option<bool>,
    #[serde(default)]
    pub advertise_cidrs: Option<Vec<IpNet>>,
    #[serde(default)]
    pub exit_node: Option<bool>,
    /// The exit this device sends its internet traffic through (`--use-exit-node`,
    /// resolved to a device id); `Some(0)` clears it.
    #[serde(default)]
    pub use_exit: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// Join with a token; answered with [`Response::Registered`].
    Register(RegisterRequest),
    /// Reconnect with the device credential; answered with [`Response::Device`].
    /// `ipv6_supported` is refreshed (a host may have gained or lost IPv6 since).
    Login {
        auth: Auth,
        #[serde(default)]
        ipv6_supported: Option<bool>,
        /// The node process's random id, the same on its watch streams: a second
        /// process with the same credential (a cloned state directory) is refused
        /// while the first is connected.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<u64>,
    },
    /// Change own fields; answered with [`Response::Device`].
    Update { auth: Auth, update: DeviceUpdate },
    /// Remove own device; answered with [`Response::Ok`].
    Deregister { auth: Auth },
    /// The node's path to each peer (DESIGN §12), every 30 s; answered with
    /// [`Response::Ok`]. Replaces what the device reported before.
    ReportPaths { auth: Auth, paths: Vec<PeerPath> },
    /// Answered with one [`Response::Snapshot`], then [`Response::Delta`]s as changes
    /// commit, until the stream closes.
    Watch {
        auth: Auth,
        /// As in [`Request::Login`]: a newer stream of the same instance replaces the
        /// older; another instance's is refused while the older one lives.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<u64>,
        /// What the node last applied, if anything: the coordinator then answers
        /// [`Response::Watching`] first, and brings the node current with a delta
        /// instead of a snapshot when it can. Older nodes leave it out and get the
        /// snapshot alone, as before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<ResumeFrom>,
    },
}

/// Where a reconnecting node's view of its organization stands: the revision it last
/// applied, of which database and organization. A node with nothing yet sends
/// database 0 (never a real one: it is always sent a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeFrom {
    pub database: i64,
    pub organization_id: i64,
    pub revision: i64,
}

/// How a node reaches one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Direct,
    Relay,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
        }
    }
}

/// One line of a node's path report: the peer (device id), the path its traffic
/// takes and the age of the last handshake in seconds (`None`: none yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPath {
    pub peer_id: i64,
    pub path: PathKind,
    #[serde(default)]
    pub handshake_age: Option<i64>,
}

/// Most peers one path report may name (a larger organization's report is cut).
pub const MAX_PATH_REPORTS: usize = 1024;

/// A device as every member of its organization sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: i64,
    pub organization_id: i64,
    pub public_key: String,
    pub hostname: String,
    pub os: String,
    pub tunnel_ip: Ipv4Addr,
    /// `None` for a device without IPv6: peers install no v6 route for it.
    pub tunnel_ip_v6: Option<Ipv6Addr>,
    pub organization_prefix: Ipv4Net,
    pub organization_prefix_v6: Ipv6Net,
    #[serde(default)]
    pub local_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub local_ip_v6: Option<Ipv6Addr>,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    #[serde(default)]
    pub reflexive_endpoint: Option<SocketAddr>,
    /// Its v6 address and port as the coordinator's STUN server saw them over v6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflexive_endpoint_v6: Option<SocketAddr>,
    pub symmetric_nat: bool,
    pub relay: bool,
    pub relay_only: bool,
    pub ipv6_supported: bool,
    #[serde(default)]
    pub advertise_cidrs: Vec<IpNet>,
    pub revision: i64,
    pub last_seen: i64,
    /// Runs stock WireGuard from an exported config (reached through the relay).
    #[serde(default)]
    pub unmanaged: bool,
    /// Holds a watch stream to a coordinator right now.
    #[serde(default)]
    pub online: bool,
    /// Offers its uplink as an exit (a claim, like `relay`; see [`Approved`]).
    #[serde(default)]
    pub exit_node: bool,
    /// What an admin approved of the claims above (`nexodus devices approve`). Only
    /// the admin's view carries it: peers are sent the claims already reduced to what
    /// is approved (`policy::approve::effective`), with this left empty.
    #[serde(default, skip_serializing_if = "Approved::is_empty")]
    pub approved: Approved,
    /// Its DNS name in the organization: one label, unique there (DESIGN §10).
    #[serde(default)]
    pub name: String,
    /// The organization's DNS domain: the device answers to `NAME.DOMAIN`.
    #[serde(default)]
    pub domain: String,
    /// The exit (device id) it sends its internet traffic through: the relay
    /// carries a spoke's internet traffic to this one (DESIGN §8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_exit: Option<i64>,
}

/// The address of the first IPv4 endpoint: a device's `local_ip`.
pub fn first_v4(endpoints: &[SocketAddr]) -> Option<Ipv4Addr> {
    endpoints.iter().find_map(|e| match e.ip() {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(_) => None,
    })
}

/// The address of the first IPv6 endpoint: a device's `local_ip_v6` (its v6
/// underlay, DESIGN §9).
pub fn first_v6(endpoints: &[SocketAddr]) -> Option<Ipv6Addr> {
    endpoints.iter().find_map(|e| match e.ip() {
        std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => Some(a),
        _ => None,
    })
}

impl Device {
    /// Sets `local_ip` and `local_ip_v6` from the endpoints the device reported.
    pub fn set_local_ips(&mut self) {
        self.local_ip = first_v4(&self.endpoints);
        self.local_ip_v6 = first_v6(&self.endpoints);
    }
}

/// A device's claims an admin approved (DESIGN §13). A prefix inside an approved
/// one counts as approved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approved {
    #[serde(default)]
    pub routes: Vec<IpNet>,
    #[serde(default)]
    pub relay: bool,
    #[serde(default)]
    pub exit: bool,
}

impl Approved {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && !self.relay && !self.exit
    }
}

/// An organization's access policy as nodes receive it: the file as an admin set it
/// (validated by the coordinator; nodes parse and compile it for themselves) and its
/// revision, which only grows. `text: None`: cleared, everything allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    pub revision: i64,
    pub text: Option<String>,
}

/// Machine-readable error kinds, so a client can react without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidToken,
    TokenExpired,
    TokenUsed,
    Unauthorized,
    InvalidRequest,
    AddressUnavailable,
    PoolExhausted,
    Conflict,
    NotFound,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong,
    Ok,
    Registered {
        device: Device,
        credential: String,
    },
    Device {
        device: Device,
    },
    /// Every device of the organization (the watcher included) at `revision`.
    Snapshot {
        revision: i64,
        devices: Vec<Device>,
        /// The coordinator's first STUN port (the next one answers too), on the
        /// address the node connected to.
        #[serde(default)]
        stun_port: Option<u16>,
        /// The organization's access policy (DESIGN §7); `None`: everything allowed.
        #[serde(default)]
        policy: Option<PolicyState>,
    },
    /// What changed since the previous message, up to `revision`. A watcher whose own id
    /// is in `removed` has been removed from the organization.
    Delta {
        revision: i64,
        upserts: Vec<Device>,
        removed: Vec<i64>,
        /// The organization's policy, when it changed in this delta.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy: Option<PolicyState>,
        /// Devices whose only change is going online (`true`) or offline: the
        /// receiver already has the rest of their record. A storm of reconnects then
        /// costs a few bytes per device and watcher, not a whole record.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        online: Vec<(i64, bool)>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The first answer to a watch that carried [`ResumeFrom`]: the database the
    /// revisions that follow belong to. `resumed: Some(R)`: the node keeps the peers
    /// it has, and one [`Response::Delta`] at revision `R` (possibly empty) follows
    /// with everything that changed since the revision it named; `None`: a
    /// [`Response::Snapshot`] follows, as for a node that names none.
    Watching {
        database: i64,
        #[serde(default)]
        resumed: Option<i64>,
        /// As in [`Response::Snapshot`] (a snapshot carries its own).
        #[serde(default)]
        stun_port: Option<u16>,
    },
}
