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
