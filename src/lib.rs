//! nexodus: a WireGuard mesh in one binary. See ARCHITECTURE.md for the map.

pub mod admin;
pub mod cli;
pub mod client;
pub mod coord;
pub mod fsutil;
pub mod identity;
pub mod io;
pub mod join;
pub mod loadgen;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod quicio;
pub mod serve;
pub mod store;
pub mod uapi;
pub mod userspace;
pub mod wgmode;
pub mod wire;
