//! UAPI requests from a local `wg` (`uapi::Conn` over `uapi::Device`): never a panic,
//! whatever the bytes and however they are split; the line buffer stays bounded; every
//! answer is `errno=0` or a known negative errno; `get` renders what was set, and a
//! second device fed the rendered configuration renders it the same (showconf/setconf).
#![no_main]

use std::time::UNIX_EPOCH;

use libfuzzer_sys::fuzz_target;
use nexodus::uapi::{Conn, Device, Event, render_get};

fuzz_target!(|data: &[u8]| {
    // First byte: the split size.
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let mut dev = Device::new();
    let mut conn = Conn::new();
    let mut events = Vec::new();
    for chunk in body.chunks(usize::from(split).max(1)) {
        conn.handle_input(chunk, &mut dev, &mut events);
    }
    conn.handle_eof(&mut dev, &mut events);
    for e in &events {
        if let Event::Set(Err(e)) | Event::Fail(e) = e {
            assert!(
                [-5, -22, -28, -71, -98].contains(&e.errno()),
                "unexpected errno {e:?}"
            );
        }
    }
    let _ = dev.take_changes();
    let shown = render_get(&dev, |_| None, UNIX_EPOCH);
    // Replaying what `get` shows (minus statistics) gives the same device.
    let replay: String = shown
        .lines()
        .filter(|l| {
            !l.starts_with("last_handshake")
                && !l.starts_with("tx_bytes")
                && !l.starts_with("rx_bytes")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mut again = Device::new();
    let mut conn = Conn::new();
    let mut ev = Vec::new();
    conn.handle_input(format!("set=1\n{replay}\n").as_bytes(), &mut again, &mut ev);
    assert_eq!(ev.len(), 1, "{replay}");
    assert!(matches!(ev.first(), Some(Event::Set(Ok(())))), "{ev:?}\n{replay}");
    assert_eq!(render_get(&again, |_| None, UNIX_EPOCH), shown);
});
