//! The node's packet path: WireGuard encryption, peer selection and
//! cryptokey routing, as pure state machines.
//!
//! * [`routing`]: a longest-prefix-match table (allowed IPs → peer).
//! * [`dataplane`]: [`DataPlane`], which turns TUN packets into UDP datagrams
//!   and back for many peers on top of boringtun's `Tunn`.
//! * [`filter`]: the stateful policy filter the data plane applies to decrypted
//!   inbound packets (flow table, ICMP errors, fragments).
//!
//! Nothing in here opens sockets or TUN devices, spawns tasks or reads the
//! clock: an I/O shell (elsewhere) owns the file descriptors and the event
//! loop, feeds bytes and `Instant`s in and sends what comes out.

pub mod access;
pub mod agent;
pub mod coordinators;
pub mod dataplane;
pub mod dns;
pub mod filter;
pub mod mesh;
pub mod nat;
pub mod route_guard;
pub mod routing;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod testutil;

pub use dataplane::{
    Counters, DataPlane, DataPlaneError, DropReason, Incoming, Outgoing, PeerConfig, PeerId,
    PeerStats,
};
pub use routing::RoutingTable;
