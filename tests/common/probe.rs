//! UDP probes between namespaces, run inside the test process: echo servers that
//! answer each datagram with the sender's address as they see it, a probe asking them
//! how one local port is mapped, and UDP hole punching. Sockets are made inside the
//! namespace (`in_ns`) and then used from any thread. Every loop is bounded. They
//! check the test topology (NAT routers) without nexodus; they are not a STUN client.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::{Netns, in_ns};

/// Binds a UDP socket to `addr` inside `ns`.
pub fn udp_socket(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let name = ns.name.clone();
    in_ns(&ns.name, move || {
        UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {name}: {e}"))
    })
}

/// UDP servers on `addrs` in `ns` answering each datagram with the sender's address
/// ("IP:PORT"), and remembering every sender ([`EchoServer::seen`]); they stop on
/// drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    seen: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, addrs: &[&str]) -> Self {
        let socks: Vec<UdpSocket> = addrs
            .iter()
            .map(|a| {
                let s = udp_socket(ns, a.parse().expect("echo address"));
                s.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("read timeout");
                s
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                for s in &socks {
                    if let Ok((_, src)) = s.recv_from(&mut buf) {
                        if let Ok(mut l) = log.lock() {
                            l.push(src);
                        }
                        let _ = s.send_to(src.to_string().as_bytes(), src);
                    }
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
            seen,
        }
    }

    /// Every sender seen so far, in order.
    pub fn seen(&self) -> Vec<SocketAddr> {
        self.seen.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// From local port `port` in `ns`, asks each echo server in turn (retrying every
/// 200 ms, at most `limit` in all) how it sees us; the answers in order.
pub fn mappings(
    ns: &Netns,
    port: u16,
    servers: &[SocketAddr],
    limit: Duration,
) -> Result<Vec<SocketAddr>, String> {
    let s = udp_socket(ns, SocketAddr::from(([0, 0, 0, 0], port)));
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let end = Instant::now() + limit;
    let mut buf = [0u8; 2048];
    let mut seen = Vec::new();
    for &dst in servers {
        loop {
            if Instant::now() > end {
                return Err(format!("no answer from {dst} (got {seen:?})"));
            }
            s.send_to(b"probe", dst).map_err(|e| e.to_string())?;
            let Ok((n, src)) = s.recv_from(&mut buf) else {
                continue;
            };
            if src == dst {
                let text = String::from_utf8_lossy(&buf[..n]);
                seen.push(text.parse().map_err(|e| format!("{text}: {e}"))?);
                break;
            }
        }
    }
    Ok(seen)
}

/// UDP hole punching from local port `port` in `ns` to `peer`, for at most `limit`.
/// Sends "0" until it hears the peer, then "1"; succeeds once it heard the peer say
/// "1" (the peer heard it too).
pub fn punch(ns: &Netns, port: u16, peer: SocketAddr, limit: Duration) -> bool {
    let s = udp_socket(ns, SocketAddr::from(([0, 0, 0, 0], port)));
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let end = Instant::now() + limit;
    let mut heard = false;
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        let _ = s.send_to(if heard { b"1" } else { b"0" }, peer);
        let Ok((n, src)) = s.recv_from(&mut buf) else {
            continue;
        };
        if src != peer {
            continue;
        }
        heard = true;
        if &buf[..n] == b"1" {
            for _ in 0..5 {
                let _ = s.send_to(b"1", peer);
            }
            return true;
        }
    }
    false
}

/// Sends `count` datagrams from a socket bound to `bind` in `ns` to `to`, as fast as
/// one thread can, for at most `limit`; `fill(i, buf)` writes the `i`th datagram
/// into `buf` and returns its length. Returns how many the kernel took.
pub fn blast(
    ns: &Netns,
    bind: SocketAddr,
    to: SocketAddr,
    count: u64,
    limit: Duration,
    mut fill: impl FnMut(u64, &mut [u8]) -> usize,
) -> u64 {
    let sock = udp_socket(ns, bind);
    let end = Instant::now() + limit;
    let mut buf = [0u8; 1500];
    let mut sent = 0;
    for i in 0..count {
        // Look at the clock only now and then: it would cost as much as the send.
        if i % 4096 == 0 && Instant::now() >= end {
            break;
        }
        let n = fill(i, &mut buf);
        if sock.send_to(&buf[..n.min(buf.len())], to).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// TCP echo servers on `addrs` in `ns` (a `[::]` address takes both families):
/// each connection gets back what it sends. They stop on drop.
pub struct TcpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(ns: &Netns, addrs: &[SocketAddr]) -> Self {
        let listeners: Vec<std::net::TcpListener> = addrs
            .iter()
            .map(|&a| {
                let name = ns.name.clone();
                let l = in_ns(&ns.name, move || {
                    std::net::TcpListener::bind(a)
                        .unwrap_or_else(|e| panic!("bind tcp {a} in {name}: {e}"))
                });
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let mut idle = true;
                for l in &listeners {
                    if let Ok((conn, _)) = l.accept() {
                        idle = false;
                        std::thread::spawn(move || echo_tcp(conn));
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo_tcp(mut conn: std::net::TcpStream) {
    use std::io::{Read, Write};
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP connection from `ns` to `to`, `len` bytes sent and read back, all within
/// `timeout`: Ok, or what failed.
pub fn tcp_echo(ns: &Netns, to: SocketAddr, len: usize, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let end = Instant::now() + timeout;
    let mut conn = in_ns(&ns.name, move || {
        std::net::TcpStream::connect_timeout(&to, timeout)
    })
    .map_err(|e| format!("connect {to}: {e}"))?;
    let left = || {
        end.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    conn.set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    conn.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    // No period: a segment delivered at another offset cannot read back the same.
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ len as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut back = vec![0u8; len];
    let writer = {
        let mut w = conn.try_clone().map_err(|e| e.to_string())?;
        let data = data.clone();
        std::thread::spawn(move || w.write_all(&data))
    };
    conn.read_exact(&mut back)
        .map_err(|e| format!("read back from {to}: {e}"))?;
    writer
        .join()
        .map_err(|_| "writer panicked".to_string())?
        .map_err(|e| format!("write to {to}: {e}"))?;
    if back != data {
        return Err(format!("{to} echoed other bytes"));
    }
    Ok(())
}

/// Retries [`tcp_echo`] (fresh connections) until one succeeds or `limit` passes.
pub fn tcp_echo_until(
    ns: &Netns,
    to: SocketAddr,
    len: usize,
    limit: Duration,
) -> Result<(), String> {
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let r = tcp_echo(
            ns,
            to,
            len,
            left.min(Duration::from_secs(3))
                .max(Duration::from_millis(100)),
        );
        if r.is_ok() || Instant::now() >= end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// From a fresh socket in `ns`, sends a datagram to the UDP echo server `to` every
/// 200 ms until it answers (true) or `limit` passes (false).
pub fn udp_answered(ns: &Netns, to: SocketAddr, limit: Duration) -> bool {
    let bind = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let s = udp_socket(ns, bind);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let end = Instant::now() + limit;
    let mut buf = [0u8; 256];
    while Instant::now() < end {
        let _ = s.send_to(b"probe", to);
        if matches!(s.recv_from(&mut buf), Ok((_, src)) if src == to) {
            return true;
        }
    }
    false
}

/// A UDP socket on `addr` (IPv6) in `ns` that reports, with each datagram, whether
/// it came with an IPv6 destination-options header (`IPV6_RECVDSTOPTS`).
pub struct DstOptsReceiver {
    sock: UdpSocket,
}

impl DstOptsReceiver {
    pub fn bind(ns: &Netns, addr: SocketAddr) -> Self {
        use std::os::fd::AsRawFd;
        let sock = udp_socket(ns, addr);
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVDSTOPTS,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(
            r,
            0,
            "IPV6_RECVDSTOPTS: {}",
            std::io::Error::last_os_error()
        );
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        Self { sock }
    }

    /// The next datagram within `limit`: its payload and whether a
    /// destination-options header came with it.
    pub fn recv(&self, limit: Duration) -> Option<(Vec<u8>, bool)> {
        use std::os::fd::AsRawFd;
        let end = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        let mut control = [0u64; 64];
        while Instant::now() < end {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: zeroed msghdr is valid; the pointers below outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: msg describes live buffers.
            let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &raw mut msg, 0) };
            if n < 0 {
                continue;
            }
            let mut dstopts = false;
            // SAFETY: walking the control buffer the kernel filled, with its macros.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::IPPROTO_IPV6 && (*c).cmsg_type == libc::IPV6_DSTOPTS
                    {
                        dstopts = true;
                    }
                    c = libc::CMSG_NXTHDR(&raw const msg, c);
                }
            }
            return Some((buf[..n as usize].to_vec(), dstopts));
        }
        None
    }
}

/// Sends `payload` `count` times (50 ms apart) from a fresh IPv6 UDP socket in `ns`
/// to `to` with an IPv6 destination-options header (one PadN option) before the UDP
/// header (`IPV6_DSTOPTS`, which needs CAP_NET_RAW).
pub fn udp_send_dstopts(ns: &Netns, to: SocketAddr, payload: &[u8], count: usize) {
    use std::os::fd::AsRawFd;
    let s = udp_socket(ns, SocketAddr::from(([0u16; 8], 0)));
    // Next header (filled by the kernel), length 0 (8 bytes), PadN of 4 bytes.
    let hdr: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: a valid socket and an 8-byte option buffer.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            hdr.as_ptr().cast(),
            hdr.len() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
    for _ in 0..count {
        let _ = s.send_to(payload, to);
        std::thread::sleep(Duration::from_millis(50));
    }
}
