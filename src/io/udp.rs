//! The node's WireGuard UDP socket (socket2): dual stack when the host allows it,
//! non-blocking, with enlarged buffers (the default 208 KiB receive buffer drops tens
//! of thousands of datagrams per 10 s under one TCP stream).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

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
    socket.set_nonblocking(true)?;
    Ok(socket.into())
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
