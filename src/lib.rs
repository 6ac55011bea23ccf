//! nexodus: a WireGuard mesh in one binary. See ARCHITECTURE.md for the map.

pub mod coord;
pub mod store;
pub mod wire;
