//! Pure codecs of untrusted bytes: control frames and messages, STUN, and a checked
//! IP header view.
//!
//! Nothing here does I/O, reads the clock or allocates per datagram on the STUN path.
//! Every parser returns an error for bad input and never panics.

pub mod control;
pub mod frame;
pub mod gro;
pub mod ip;
pub mod peers;
pub mod stun;
