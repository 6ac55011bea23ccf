//! Rootless mode (`nexodus join --userspace`): the tunnel ends in a userspace TCP/IP
//! stack instead of a TUN device, and rules carry connections between the mesh and
//! local sockets (ingress, egress, SOCKS5).
//!
//! The data path exchanges IP packets with this stack over a datagram socket pair
//! ([`crate::io::tun::PacketDevice::Pipe`]), so nothing here needs privileges.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error("bad rule {rule:?}: {reason}")]
    BadRule { rule: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("userspace stack: {0}")]
    Stack(String),
}

/// What the user asked for on the command line (raw rule strings, parsed by
/// [`UserspaceConfig::parse`]).
#[derive(Debug, Clone, Default)]
pub struct UserspaceArgs {
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
    pub socks5: Option<SocketAddr>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    pub args: UserspaceArgs,
}

impl UserspaceConfig {
    /// Validates every rule before anything starts.
    pub fn parse(args: UserspaceArgs) -> Result<Self, UserspaceError> {
        Ok(Self { args })
    }
}

/// Rules and flows for `nexodus status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserspaceStatus {
    pub rules: Vec<String>,
    pub open_flows: Vec<String>,
}

/// The running stack.
pub struct Stack {}

impl Stack {
    /// Starts the stack on `pipe` with the node's mesh addresses.
    pub fn start(
        _config: UserspaceConfig,
        _pipe: std::os::unix::net::UnixDatagram,
        _v4: Ipv4Addr,
        _v6: Option<Ipv6Addr>,
        _mtu: u16,
    ) -> Result<Self, UserspaceError> {
        Err(UserspaceError::Stack("not implemented yet".into()))
    }

    pub fn status(&self) -> UserspaceStatus {
        UserspaceStatus::default()
    }
}
