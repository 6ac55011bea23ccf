//! Many datagrams per system call (`recvmmsg`, `sendmmsg`) on a datagram socket, into
//! and out of caller-owned buffers. Used on both ends of the packet socket pair of
//! rootless mode (the data path and the userspace stack).

use std::os::fd::RawFd;

/// Datagrams per call at most (larger batches are cut to this).
pub const MAX_BATCH: usize = 128;

/// Receives up to `bufs.len()` datagrams (at most [`MAX_BATCH`]) without blocking,
/// datagram `i` into `bufs[i][offset..]`, its length into `sizes[i]`. Returns how many
/// arrived; `WouldBlock` if none had.
pub fn recv_batch(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
    sizes: &mut [usize],
    offset: usize,
) -> std::io::Result<usize> {
    // SAFETY: zeroed iovec/mmsghdr are valid (null pointers, zero lengths).
    let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    let mut n = 0;
    for ((v, m), b) in iov.iter_mut().zip(msgs.iter_mut()).zip(bufs.iter_mut()) {
        if n == sizes.len() {
            break;
        }
        let Some(room) = b.get_mut(offset..) else {
            break;
        };
        v.iov_base = room.as_mut_ptr().cast();
        v.iov_len = room.len();
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: `msgs[..n]` point at `n` live iovecs, each over a live buffer of its
    // length; the kernel writes at most that much into each.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let got = usize::try_from(r).unwrap_or(0).min(n);
    for ((size, m), v) in sizes.iter_mut().zip(&msgs).zip(&iov).take(got) {
        *size = (m.msg_len as usize).min(v.iov_len);
    }
    Ok(got)
}

/// Sends the packets in order (at most [`MAX_BATCH`]) without blocking; returns how
/// many left (fewer when the socket is full; `WouldBlock` if none did).
pub fn send_batch<'a>(
    fd: RawFd,
    packets: impl IntoIterator<Item = &'a [u8]>,
) -> std::io::Result<usize> {
    // SAFETY: zeroed iovec/mmsghdr are valid (null pointers, zero lengths).
    let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    let mut n = 0;
    for ((v, m), p) in iov.iter_mut().zip(msgs.iter_mut()).zip(packets) {
        v.iov_base = p.as_ptr().cast_mut().cast();
        v.iov_len = p.len();
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: `msgs[..n]` point at `n` live iovecs over live buffers; the kernel only
    // reads them.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(r).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn batches_round_trip_in_order_with_offset() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let packets: Vec<Vec<u8>> = (1..=5u8).map(|i| vec![i; usize::from(i) * 10]).collect();
        let sent = send_batch(a.as_raw_fd(), packets.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(sent, 5);
        let mut bufs = vec![vec![0u8; 64]; 8];
        let mut sizes = vec![0usize; 8];
        let got = recv_batch(b.as_raw_fd(), &mut bufs, &mut sizes, 4).unwrap();
        assert_eq!(got, 5);
        for (i, p) in packets.iter().enumerate() {
            assert_eq!(&bufs[i][4..4 + sizes[i]], p.as_slice());
        }
        // Empty socket: WouldBlock, nothing written.
        let e = recv_batch(b.as_raw_fd(), &mut bufs, &mut sizes, 0).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_datagram_larger_than_its_buffer_is_cut_to_it() {
        let (a, b) = UnixDatagram::pair().unwrap();
        send_batch(a.as_raw_fd(), [&[7u8; 100][..]]).unwrap();
        let mut bufs = vec![vec![0u8; 40]];
        let mut sizes = vec![0usize];
        assert_eq!(
            recv_batch(b.as_raw_fd(), &mut bufs, &mut sizes, 8).unwrap(),
            1
        );
        assert_eq!(sizes[0], 32);
    }
}
