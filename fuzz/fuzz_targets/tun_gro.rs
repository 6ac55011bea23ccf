//! The TUN write's coalescer on any batch of decrypted packets (a peer decides their
//! bytes): planning never panics, the writes name every packet exactly once, a
//! packet written alone is left as it came, and a super-packet's IP length is the
//! bytes written for it, never above 65,535.
//!
//! Input: one byte of flags (bit 0: the device takes UDP super-packets), then
//! packets, each a big-endian 16-bit length (at most 2,048) and that many bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexodus::wire::gro::{Coalescer, VIRTIO_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    while rest.len() >= 2 && bufs.len() < 128 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(2048);
        let body = &rest[2..];
        let take = len.min(body.len());
        let mut slot = vec![0u8; VIRTIO_HDR_LEN];
        slot.extend_from_slice(&body[..take]);
        bufs.push(slot);
        rest = &body[take..];
    }
    let before = bufs.clone();
    let mut gro = Coalescer::with_capacity(128, flags & 1 == 1);
    gro.plan(&mut bufs, VIRTIO_HDR_LEN);
    let mut seen = vec![false; bufs.len()];
    for w in gro.writes() {
        let mut ids = vec![w.head];
        ids.extend(w.members());
        assert_eq!(ids.len(), w.count);
        for &i in &ids {
            assert!(!std::mem::replace(&mut seen[i], true), "packet {i} twice");
        }
        let head = &bufs[w.head][VIRTIO_HDR_LEN..];
        if w.count == 1 {
            assert_eq!(w.header, [0; VIRTIO_HDR_LEN]);
            assert_eq!(bufs[w.head], before[w.head], "a packet alone is unchanged");
            continue;
        }
        let total = head.len()
            + ids[1..]
                .iter()
                .map(|&m| bufs[m].len() - VIRTIO_HDR_LEN - w.skip)
                .sum::<usize>();
        assert!(total <= 65_535, "super-packet of {total} bytes");
        let ip_len = match head[0] >> 4 {
            4 => usize::from(u16::from_be_bytes([head[2], head[3]])),
            6 => usize::from(u16::from_be_bytes([head[4], head[5]])) + 40,
            v => panic!("coalesced IP version {v}"),
        };
        assert_eq!(ip_len, total, "the IP length says what is written");
        assert!(w.header[0] == 1, "NEEDS_CSUM");
    }
    assert!(
        seen.iter().take(gro.planned(bufs.len())).all(|&s| s),
        "every planned packet written"
    );
});
