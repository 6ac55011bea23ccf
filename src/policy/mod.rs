//! Access policy and approval (DESIGN §7, §13): pure, no I/O.
//!
//! `file` parses and validates the TOML policy file an admin sets with
//! `nexodus policy set`; its `[approve]` section approves claims (advertised routes,
//! relay and exit roles) in advance; `approve` reduces a device's claims to what is
//! approved, which is all its peers are told.

pub mod approve;
pub mod file;

pub use file::{AllowRule, Approve, HostGlob, Policy, PolicyError, PortRange, Proto, Selector};
