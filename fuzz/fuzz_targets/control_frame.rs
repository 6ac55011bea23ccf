//! Control frames and messages from untrusted peers: decoding never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexodus::wire::control::{Request, Response};
use nexodus::wire::frame;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((body, used))) = frame::decode(rest, frame::MAX_REQUEST_LEN) {
        let _ = serde_json::from_slice::<Request>(body);
        let _ = serde_json::from_slice::<Response>(body);
        rest = &rest[used..];
    }
    let _ = frame::decode_payload::<Request>(data);
    let _ = frame::decode_payload::<Response>(data);
    // The binary peer state (snapshots and deltas) on its own.
    let _ = nexodus::wire::peers::decode(data);
    if let Some(prefix) = data.first_chunk::<4>() {
        let _ = frame::parse_length(*prefix, frame::MAX_REQUEST_LEN);
    }
});
