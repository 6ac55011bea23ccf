//! Pure coordinator logic: address allocation, join tokens, key checks, limits.
//!
//! No sockets, no database, no clock, no OS randomness: callers pass in what is stored,
//! the time and random bytes. The store and the QUIC shell build on these.

pub mod adminkey;
pub mod ipam;
pub mod keys;
pub mod limits;
pub mod names;
pub mod resume;
pub mod token;
pub mod wgquick;
