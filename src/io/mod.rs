//! The node's I/O shell: TUN device, UDP socket, kernel routes, host facts.
//!
//! Thin wrappers only; decisions live in [`crate::node`].

pub mod eventfd;
pub mod nft;
pub mod packet_buf;
pub mod packet_pipe;
pub mod policy_route;
pub mod route;
pub mod sysinfo;
pub mod tun;
pub mod udp;
