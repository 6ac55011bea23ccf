//! WireGuard's cross-platform userspace API (UAPI), sans-IO: the `get=1` and `set=1`
//! operations as `wg`, `wg-quick` and wireguard-go speak them over
//! `/var/run/wireguard/IFNAME.sock`.
//!
//! [`Conn`] takes the bytes of one socket as they arrive (any split), cuts them into
//! lines (each at most [`MAX_LINE`] bytes: the bound is checked before a line is
//! kept), and applies every `set` line to the [`Device`] model at once (streaming: a
//! configuration of 130,000 allowed IPs costs one push per line, never a rebuild).
//! Bad values answer `errno=-N` with wireguard-go's codes ([`UapiError`]); the lines
//! before the bad one stay applied, as in wireguard-go. The shell (`wgmode`) turns
//! the model's [`Changes`] into data-plane commands and renders `get` answers with
//! [`render_get`] from the model and the data plane's statistics.
//!
//! What it does not do: sockets, binding ports, key agreement beyond deriving our
//! public key, or reading the clock (the shell passes `now` to [`render_get`]).

mod conn;
mod device;

pub use conn::{Conn, Event, MAX_LINE};
pub use device::{Changes, Device, MAX_ALLOWED_IPS, MAX_PEERS, PeerChange, WgPeer, render_get};

/// Why a `set` (or `get`) failed: the `errno=` answer, as wireguard-go sends it
/// (negative `errno` values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// A line without `=`, or longer than [`MAX_LINE`].
    #[error("malformed line: {0}")]
    Protocol(String),
    /// A key we do not know, or a value that does not parse.
    #[error("invalid {key}: {value:?}")]
    Invalid { key: &'static str, value: String },
    /// An unknown key.
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// The listen port cannot be bound.
    #[error("listen port {0} in use")]
    PortInUse(u16),
    /// More peers or allowed IPs than [`MAX_PEERS`] / [`MAX_ALLOWED_IPS`].
    #[error("too many {0}")]
    Limit(&'static str),
    /// Another failure of the shell (reading the socket, setting a socket option).
    #[error("I/O error: {0}")]
    Io(String),
}

impl UapiError {
    /// The value of the `errno=` line: `-EPROTO`, `-EINVAL`, `-EADDRINUSE`, `-ENOSPC`,
    /// `-EIO`.
    pub fn errno(&self) -> i32 {
        -match self {
            UapiError::Protocol(_) => libc::EPROTO,
            UapiError::Invalid { .. } | UapiError::UnknownKey(_) => libc::EINVAL,
            UapiError::PortInUse(_) => libc::EADDRINUSE,
            UapiError::Limit(_) => libc::ENOSPC,
            UapiError::Io(_) => libc::EIO,
        }
    }
}

/// The `errno=` line and the blank line that end every answer.
pub fn status_line(result: &Result<(), UapiError>) -> String {
    format!(
        "errno={}\n\n",
        result.as_ref().map_or_else(UapiError::errno, |()| 0)
    )
}

/// Lowercase hex of a key.
pub fn hex32(k: &[u8; 32]) -> String {
    crate::coord::token::hex(k)
}

/// A 32-byte key in hex (64 digits, either case), as UAPI carries keys.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let hi = hex_digit(*pair.first()?)?;
        let lo = hex_digit(*pair.get(1)?)?;
        *o = hi << 4 | lo;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A decimal number of ASCII digits only (no sign, no spaces), as Go's
/// `strconv.ParseUint(v, 10, bits)` reads it.
pub fn parse_decimal<T: TryFrom<u64>>(s: &str) -> Option<T> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    T::try_from(s.parse::<u64>().ok()?).ok()
}

#[cfg(test)]
mod tests;
