//! The node's WireGuard UDP socket (socket2): dual stack when the host allows it,
//! non-blocking, with enlarged buffers (the default 208 KiB receive buffer drops tens
//! of thousands of datagrams per 10 s under one TCP stream), and the data path's
//! receive and send calls on it with their control messages: [`Receiver`] takes
//! datagrams with `recvmmsg`, each with its GRO segment size and the local address
//! and interface it arrived on (`IP_PKTINFO`/`IPV6_PKTINFO`); [`send`] sends one
//! datagram or a UDP GSO train, from a given local address if asked ("sticky
//! source", [`LocalAddr`]). Control buffers are allocated once (receive) or live on
//! the stack (send): nothing is allocated per packet.

use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::node::dataplane::LocalAddr;

/// Socket buffer size asked for (the kernel may cap it without privileges).
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Binds the listen port, on `[::]` (dual stack) if possible, else on `0.0.0.0`.
pub fn bind(port: u16) -> std::io::Result<UdpSocket> {
    let socket = match bind_v6(port) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "no dual-stack UDP socket; using IPv4 only");
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            s
        }
    };
    for (what, result) in [
        ("receive", socket.set_recv_buffer_size(SOCKET_BUFFER)),
        ("send", socket.set_send_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot enlarge the UDP {what} buffer");
        }
    }
    force_buffers(&socket);
    recv_pktinfo(&socket)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Asks for the local address and interface of each received datagram: on a
/// dual-stack socket `IPV6_PKTINFO` covers both families (IPv4 as v4-mapped).
fn recv_pktinfo(socket: &Socket) -> std::io::Result<()> {
    let (level, opt) = if socket.local_addr()?.is_ipv6() {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    set_int_option(socket.as_raw_fd(), level, opt, 1)
}

/// `setsockopt` of one `c_int` value.
fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the caller's fd; pointer to a live c_int of the stated length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Lets the kernel fragment datagrams above the path MTU (`nexodus wg`), undoing
/// quinn-udp's `IP_PMTUDISC_PROBE`/`IPV6_DONTFRAG` (the socket then behaves as
/// wireguard-go's: the kernel's default path-MTU handling).
pub fn allow_fragments(socket: &UdpSocket) {
    let v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
    let v4_options = [(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    )];
    let v6_options = [
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        ),
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0),
    ];
    let options = v4_options
        .iter()
        .chain(if v6 { &v6_options[..] } else { &[] });
    for &(level, name, value) in options {
        if let Err(error) = set_int_option(socket.as_raw_fd(), level, name, value) {
            tracing::debug!(level, name, %error, "cannot allow fragmentation");
        }
    }
}

fn bind_v6(port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

/// As root, go past `net.core.rmem_max`/`wmem_max` (SO_RCVBUFFORCE/SO_SNDBUFFORCE).
fn force_buffers(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: valid fd, pointer to a live c_int of the stated length.
        let _ = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

/// The address to pass to `send_to` on `socket`: v4 destinations become v4-mapped on a
/// dual-stack v6 socket.
pub fn to_socket_family(local_is_v6: bool, addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if local_is_v6 => {
            SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port())
        }
        other => other,
    }
}

/// A received source address in canonical form (v4-mapped v6 becomes v4).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The local address the kernel would use to reach `remote` (no packet is sent).
pub fn local_address_towards(remote: SocketAddr) -> Option<std::net::IpAddr> {
    let bind: SocketAddr = if remote.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(remote).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Room for the control messages of one datagram: its GRO segment size, its
/// `PKTINFO` and its TOS/traffic class (88 bytes on Linux), with margin.
const CONTROL: usize = 128;

/// A control-message buffer aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL]);

/// Datagrams one [`Receiver::recv`] takes at most.
pub const MAX_RECV: usize = 32;

/// What [`Receiver::recv`] learned about one received buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    /// The sender, as the socket gave it (see [`canonical`]).
    pub from: SocketAddr,
    /// Bytes in the buffer (a GRO train: several datagrams of `stride` bytes, the
    /// last possibly shorter).
    pub len: usize,
    /// Size of each datagram in the buffer.
    pub stride: usize,
    /// The local address and interface the datagram(s) arrived on, if the kernel
    /// said (unicast only).
    pub local: Option<LocalAddr>,
}

impl Default for RecvMeta {
    fn default() -> Self {
        Self {
            from: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            len: 0,
            stride: 0,
            local: None,
        }
    }
}

/// `recvmmsg` with control messages, into caller-owned buffers; owns the address
/// and control buffers it hands the kernel (allocated once, reused).
pub struct Receiver {
    names: Vec<libc::sockaddr_storage>,
    control: Vec<Control>,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    pub fn new() -> Self {
        Self {
            // SAFETY: an all-zero sockaddr_storage is valid (family AF_UNSPEC).
            names: vec![unsafe { std::mem::zeroed() }; MAX_RECV],
            control: vec![Control([0; CONTROL]); MAX_RECV],
        }
    }

    /// Receives up to `bufs.len()` buffers (at most [`MAX_RECV`]) without
    /// blocking, buffer `i` described by `meta[i]`. Returns how many arrived;
    /// `WouldBlock` if none had.
    pub fn recv(
        &mut self,
        fd: RawFd,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> std::io::Result<usize> {
        // SAFETY: zeroed mmsghdrs are valid (null pointers, zero lengths).
        let mut msgs: [libc::mmsghdr; MAX_RECV] = unsafe { std::mem::zeroed() };
        let mut n = 0;
        for (((m, buf), name), control) in msgs
            .iter_mut()
            .zip(bufs.iter_mut())
            .zip(self.names.iter_mut())
            .zip(self.control.iter_mut())
            .take(meta.len())
        {
            m.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            // IoSliceMut is ABI-compatible with iovec.
            m.msg_hdr.msg_iov = std::ptr::from_mut(buf).cast();
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = CONTROL as _;
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        let r = loop {
            // SAFETY: `msgs[..n]` point at live names, one live iovec each (over a
            // live buffer of its length) and live control buffers of the stated
            // lengths; the kernel writes at most that much into each.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let got = usize::try_from(r).unwrap_or(0).min(n);
        for ((m, meta), name) in msgs.iter().zip(meta.iter_mut()).zip(&self.names).take(got) {
            let len = m.msg_len as usize;
            let (stride, local) = decode_control(&m.msg_hdr);
            *meta = RecvMeta {
                from: sockaddr_to_std(name).unwrap_or(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))),
                len,
                stride: stride.unwrap_or(len),
                local,
            };
        }
        Ok(got)
    }
}

/// The GRO segment size and the local address in a received message's control
/// messages.
fn decode_control(hdr: &libc::msghdr) -> (Option<usize>, Option<LocalAddr>) {
    let (mut stride, mut local) = (None, None);
    // SAFETY: `hdr` is a msghdr the kernel filled: `msg_control` points at
    // `msg_controllen` bytes of control messages; the CMSG_* macros stay inside
    // them, and each payload read is checked against its cmsg_len first.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while let Some(cmsg) = c.as_ref() {
            let data = libc::CMSG_DATA(cmsg);
            let room = cmsg.cmsg_len.saturating_sub(libc::CMSG_LEN(0) as usize);
            match (cmsg.cmsg_level, cmsg.cmsg_type) {
                (libc::SOL_UDP, libc::UDP_GRO) if room >= std::mem::size_of::<libc::c_int>() => {
                    let v = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    stride = usize::try_from(v).ok().filter(|&s| s > 0);
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO)
                    if room >= std::mem::size_of::<libc::in_pktinfo>() =>
                {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    let ip = Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes());
                    local = unicast(IpAddr::V4(ip), u32::try_from(info.ipi_ifindex).unwrap_or(0));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO)
                    if room >= std::mem::size_of::<libc::in6_pktinfo>() =>
                {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr).to_canonical();
                    local = unicast(ip, info.ipi6_ifindex);
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    (stride, local)
}

/// `ip` as a source to send from, if it can be one (not multicast, broadcast or
/// unspecified).
fn unicast(ip: IpAddr, ifindex: u32) -> Option<LocalAddr> {
    let ok = match ip {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast() || a.is_unspecified()),
        IpAddr::V6(a) => !(a.is_multicast() || a.is_unspecified()),
    };
    ok.then_some(LocalAddr { ip, ifindex })
}

fn sockaddr_to_std(name: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(name.ss_family) {
        libc::AF_INET => {
            // SAFETY: a sockaddr_storage of family AF_INET holds a sockaddr_in
            // (and is large and aligned enough for one).
            let a = unsafe { &*std::ptr::from_ref(name).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for AF_INET6 and sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref(name).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Whether a send from a given source failed because that source cannot be used
/// any more (the address was removed): Linux answers `ENETUNREACH` for IPv4 and
/// `EINVAL` for IPv6; `EADDRNOTAVAIL` for completeness.
pub fn source_unusable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH)
    )
}

/// Whether a GSO send failed because the device or driver cannot segment.
pub fn gso_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL))
}

/// Sends `data` to `to` (already in the socket's family, see [`to_socket_family`])
/// with one `sendmsg`: several datagrams of `segment` bytes (UDP GSO) when
/// `segment` is less than the length, from `src` when given and of `to`'s family
/// (else the kernel chooses).
pub fn send(
    fd: RawFd,
    to: SocketAddr,
    data: &[u8],
    segment: Option<usize>,
    src: Option<LocalAddr>,
) -> std::io::Result<()> {
    let dst = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = Control([0; CONTROL]);
    // SAFETY: a zeroed msghdr is valid (null pointers, zero lengths).
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = dst.as_ptr().cast_mut().cast();
    hdr.msg_namelen = dst.len();
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = CONTROL as _;
    let mut used = 0usize;
    // SAFETY: `hdr.msg_control` points at CONTROL live, aligned bytes; `push`
    // writes each message only where CMSG_FIRSTHDR/CMSG_NXTHDR say it fits.
    unsafe {
        let mut next = libc::CMSG_FIRSTHDR(&hdr);
        if let Some(seg) = segment.filter(|&s| s > 0 && s < data.len()) {
            let seg = u16::try_from(seg).unwrap_or(u16::MAX);
            push(
                &hdr,
                &mut next,
                &mut used,
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                seg,
            );
        }
        let dst_v4 = match to {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
        };
        match src.map(|s| (s.ip, s.ifindex)) {
            Some((IpAddr::V4(ip), _)) if dst_v4 => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                push(
                    &hdr,
                    &mut next,
                    &mut used,
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    info,
                );
            }
            Some((IpAddr::V6(ip), ifindex)) if !dst_v4 => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    // The interface binds the route: only a link-local address
                    // needs it (it names no link by itself).
                    ipi6_ifindex: if ip.is_unicast_link_local() {
                        ifindex
                    } else {
                        0
                    },
                };
                push(
                    &hdr,
                    &mut next,
                    &mut used,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    info,
                );
            }
            _ => {}
        }
    }
    hdr.msg_controllen = used as _;
    if used == 0 {
        hdr.msg_control = std::ptr::null_mut();
    }
    loop {
        // SAFETY: `hdr` points at a live address, one iovec over `data` and
        // `used` bytes of control messages; the kernel only reads them.
        let n = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes one control message of `value` at `*next` (if it fits) and advances.
///
/// # Safety
/// `hdr.msg_control` must point at `hdr.msg_controllen` writable bytes aligned for
/// `cmsghdr`, and `*next` must come from `CMSG_FIRSTHDR`/`CMSG_NXTHDR` on `hdr`.
unsafe fn push<T: Copy>(
    hdr: &libc::msghdr,
    next: &mut *mut libc::cmsghdr,
    used: &mut usize,
    level: libc::c_int,
    ty: libc::c_int,
    value: T,
) {
    let size = std::mem::size_of::<T>() as libc::c_uint;
    // SAFETY: by the caller's contract, `*next` is null or a cmsghdr inside the
    // buffer; the space check keeps the whole message inside it.
    unsafe {
        let space = libc::CMSG_SPACE(size) as usize;
        let Some(c) = next.as_mut() else {
            return;
        };
        if *used + space > hdr.msg_controllen {
            return;
        }
        c.cmsg_level = level;
        c.cmsg_type = ty;
        c.cmsg_len = libc::CMSG_LEN(size) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<T>(), value);
        *used += space;
        *next = libc::CMSG_NXTHDR(hdr, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives what is waiting on `socket` (bounded wait).
    fn recv_all(rx: &mut Receiver, socket: &UdpSocket) -> Vec<(RecvMeta, Vec<u8>)> {
        let mut got = Vec::new();
        let mut bufs = vec![vec![0u8; 2048]; 4];
        for _ in 0..200 {
            let mut iovs: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = vec![RecvMeta::default(); iovs.len()];
            match rx.recv(socket.as_raw_fd(), &mut iovs, &mut meta) {
                Ok(n) => {
                    for (m, iov) in meta.iter().zip(&iovs).take(n) {
                        got.push((*m, iov[..m.len].to_vec()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !got.is_empty() {
                        return got;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        got
    }

    #[test]
    fn local_address_comes_in_and_replies_leave_from_it() {
        let server = bind(0).expect("bind");
        let port = server.local_addr().expect("addr").port();
        let v6 = server.local_addr().expect("addr").is_ipv6();
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        client.set_nonblocking(true).expect("nonblocking");
        let mut rx = Receiver::new();
        // Loopback owns 127.0.0.0/8: write to 127.0.0.3, the reply comes from it.
        client.send_to(b"hello", ("127.0.0.3", port)).expect("send");
        let got = recv_all(&mut rx, &server);
        assert_eq!(got.len(), 1);
        let (meta, data) = &got[0];
        assert_eq!(data.as_slice(), b"hello");
        let local = meta.local.expect("pktinfo");
        assert_eq!(local.ip, "127.0.0.3".parse::<IpAddr>().expect("ip"));
        assert!(local.ifindex > 0);
        let peer = canonical(meta.from);
        assert_eq!(peer, client.local_addr().expect("addr"));
        let fd = server.as_raw_fd();
        send(fd, to_socket_family(v6, peer), b"back", None, Some(local)).expect("reply");
        let mut buf = [0u8; 64];
        let (n, from) = (0..200)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                client.recv_from(&mut buf).ok()
            })
            .expect("reply arrives");
        assert_eq!(&buf[..n], b"back");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 3], port)));
        // Without a source the kernel chooses (127.0.0.1 towards 127.0.0.1).
        send(fd, to_socket_family(v6, peer), b"any", None, None).expect("send");
        let (_, from) = (0..200)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                client.recv_from(&mut buf).ok()
            })
            .expect("arrives");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 1], port)));
        // A source the host does not have: refused in a way `source_unusable` knows.
        let gone = LocalAddr {
            ip: "192.0.2.77".parse().expect("ip"),
            ifindex: 0,
        };
        let e = send(fd, to_socket_family(v6, peer), b"x", None, Some(gone)).expect_err("refused");
        assert!(source_unusable(&e), "{e}");
    }

    #[test]
    fn a_gso_train_leaves_from_the_source_as_separate_datagrams() {
        let sender = bind(0).expect("bind");
        let v6 = sender.local_addr().expect("addr").is_ipv6();
        let receiver = bind(0).expect("bind");
        let port = receiver.local_addr().expect("addr").port();
        let src = LocalAddr {
            ip: "127.0.0.5".parse().expect("ip"),
            ifindex: 0,
        };
        let train: Vec<u8> = (0..250u8).collect();
        let to = to_socket_family(v6, SocketAddr::from(([127, 0, 0, 6], port)));
        send(sender.as_raw_fd(), to, &train, Some(100), Some(src)).expect("send");
        let mut rx = Receiver::new();
        let got = recv_all(&mut rx, &receiver);
        let sizes: Vec<usize> = got.iter().map(|(m, _)| m.len).collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        for (m, _) in &got {
            assert_eq!(canonical(m.from).ip(), src.ip);
            assert_eq!(
                m.local.map(|l| l.ip),
                Some("127.0.0.6".parse().expect("ip"))
            );
        }
        let joined: Vec<u8> = got.into_iter().flat_map(|(_, d)| d).collect();
        assert_eq!(joined, train);
    }
}
