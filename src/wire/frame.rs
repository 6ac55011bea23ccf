//! Length-delimited, versioned control frames.
//!
//! A frame is `u32 length (big endian) | u8 version | body`, where `length` counts the
//! version byte and the body. The body is one JSON-encoded control message
//! ([`super::control`]), or, with version [`super::peers::PEERS_VERSION`], a snapshot or
//! delta in its compact binary form ([`super::peers`]). Decoding is sans-IO: feed a buffer, get the frame's body or a
//! reason to close the stream. Each direction has its own hard maximum size.

use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;

/// The only frame version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes before the body: length (4) and version (1).
pub const HEADER_LEN: usize = 5;
/// Largest request a node may send to the coordinator.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Largest frame the coordinator sends (a full snapshot of a large organization).
pub const MAX_RESPONSE_LEN: usize = 32 * 1024 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unsupported frame version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Reads the length prefix: the number of bytes that follow the 4-byte length field.
/// Rejects zero and anything above `max` before the caller reads the rest.
pub fn parse_length(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one complete frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, otherwise the body
/// and the number of bytes consumed.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = parse_length(*prefix, max)?;
    let Some(frame) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let (version, body) = frame.split_first().ok_or(FrameError::Empty)?;
    if *version != VERSION && *version != super::peers::PEERS_VERSION {
        return Err(FrameError::UnsupportedVersion(*version));
    }
    Ok(Some((body, 4 + len)))
}

/// A message a frame carries: JSON under [`VERSION`]; a type may also know a body of
/// another version (a [`super::control::Response`] the binary peer state).
pub trait Message: DeserializeOwned {
    /// Decodes a body of `version` (not [`VERSION`]).
    fn decode_other(version: u8, _body: &[u8]) -> Result<Self, FrameError> {
        Err(FrameError::UnsupportedVersion(version))
    }
}

impl Message for super::control::Request {}

/// Decodes the payload of a frame (version byte and body, without the length prefix)
/// into a message.
pub fn decode_payload<M: Message>(payload: &[u8]) -> Result<M, FrameError> {
    let (version, body) = payload.split_first().ok_or(FrameError::Empty)?;
    if *version != VERSION {
        return M::decode_other(*version, body);
    }
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Appends one encoded frame carrying `msg` to `out`.
pub fn encode<M: Serialize>(msg: &M, out: &mut Vec<u8>, max: usize) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, VERSION]);
    serde_json::to_writer(&mut *out, msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - start - 4;
    if len > max {
        out.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[start..start + 4].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// Encodes `msg` into a new frame.
pub fn to_frame<M: Serialize>(msg: &M, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode(msg, &mut out, max)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::{Auth, Request};

    #[test]
    fn round_trip() {
        let req = Request::Deregister {
            auth: Auth {
                device_id: 7,
                credential: "c".into(),
            },
        };
        let buf = to_frame(&req, MAX_REQUEST_LEN).unwrap();
        let (body, used) = decode(&buf, MAX_REQUEST_LEN).unwrap().unwrap();
        assert_eq!(used, buf.len());
        let back: Request = serde_json::from_slice(body).unwrap();
        assert_eq!(back, req);
        let back: Request = decode_payload(&buf[4..]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn partial_frames_wait() {
        let buf = to_frame(&Request::Ping, MAX_REQUEST_LEN).unwrap();
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut], MAX_REQUEST_LEN), Ok(None));
        }
    }

    #[test]
    fn oversized_and_bad_version_rejected() {
        let big = (MAX_REQUEST_LEN as u32 + 1).to_be_bytes();
        assert!(matches!(
            decode(&big, MAX_REQUEST_LEN),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(decode(&[0, 0, 0, 0], 10), Err(FrameError::Empty));
        assert_eq!(
            decode(&[0, 0, 0, 2, 9, b'{'], 10),
            Err(FrameError::UnsupportedVersion(9))
        );
        assert!(matches!(
            decode_payload::<Request>(&[VERSION, b'{', b'x']),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode_payload::<Request>(&[VERSION, b'{', b'}']),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn encode_refuses_oversized() {
        let mut out = vec![1, 2];
        let err = encode(&"x".repeat(100), &mut out, 50).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert_eq!(out, vec![1, 2]);
    }
}
