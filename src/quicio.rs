//! Reading and writing control frames on QUIC streams (the async edge of
//! [`crate::wire::frame`]).

use serde::Serialize;
use thiserror::Error;

use crate::wire::frame::{self, FrameError};

#[derive(Debug, Error)]
pub enum FrameIoError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

/// Reads one frame and decodes its message. `Ok(None)`: the stream ended cleanly
/// before a new frame began. `buf` is reused between calls.
pub async fn read_message<M: frame::Message>(
    recv: &mut quinn::RecvStream,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<M>, FrameIoError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameIoError::Truncated),
        Err(e) => return Err(e.into()),
    }
    let len = frame::parse_length(prefix, max)?;
    buf.clear();
    // Grown as bytes arrive, not to the announced length: a peer that announces a
    // large frame and sends nothing makes us hold nothing.
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(FrameIoError::Truncated),
            Err(e) => return Err(quinn::ReadExactError::ReadError(e).into()),
        }
    }
    Ok(Some(frame::decode_payload(buf)?))
}

/// Encodes and writes one message.
pub async fn write_message<M: Serialize>(
    send: &mut quinn::SendStream,
    msg: &M,
    max: usize,
) -> Result<(), FrameIoError> {
    let bytes = frame::to_frame(msg, max)?;
    send.write_all(&bytes).await?;
    Ok(())
}
