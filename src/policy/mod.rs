//! Access policy and approval (DESIGN §7, §13): pure, no I/O.
//!
//! `file` parses and validates the TOML policy file an admin sets with
//! `nexodus policy set`; its `[approve]` section approves claims (advertised routes,
//! relay and exit roles) in advance.

pub mod file;

pub use file::{AllowRule, Approve, HostGlob, Policy, PolicyError, PortRange, Proto, Selector};
