//! Access policy and approval (DESIGN §7, §13): pure, no I/O.
//!
//! `file` parses and validates the TOML policy file an admin sets with
//! `nexodus policy set`; its `[approve]` section approves claims (advertised routes,
//! relay and exit roles) in advance; `approve` reduces a device's claims to what is
//! approved, which is all its peers are told. `compile` turns a policy, the
//! organization's devices and one node into that node's inbound table, which its data
//! plane's filter (`node::filter`) enforces.

pub mod approve;
pub mod compile;
pub mod file;

pub use compile::{DeviceInfo, InboundTable, compile};

pub use file::{AllowRule, Approve, HostGlob, Policy, PolicyError, PortRange, Proto, Selector};
