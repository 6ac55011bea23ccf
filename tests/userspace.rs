//! End-to-end: rootless mode (`nexodus join --userspace`). The rootless node runs as
//! `nobody` with no capabilities at all (setpriv) in a namespace where it never opens
//! a TUN device; TUN-mode nodes share the mesh with it. Local services and clients
//! run inside the test process, in the right namespace (setns on a thread of their
//! own). Needs root (namespaces, TUN for the other nodes).
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::cluster::{Cluster, wait_until};
use common::netns::{enter, in_ns};
use common::{BIN, DieWithParent, proc};
use nexodus::join::status::Status;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NOBODY: u32 = 65534;
const WAIT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---- namespaces from inside the test process ----

/// Runs async `f` to completion on a current-thread runtime inside `ns`.
fn block_in_ns<T, F, Fut>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    in_ns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

/// A server running in a namespace until dropped.
struct Service {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts `serve` (given its bound sockets' future) inside `ns`; returns once it is
/// listening.
fn service<F, Fut>(ns: &str, serve: F) -> Service
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns = ns.to_string();
    let thread = std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let fut = serve();
            ready_tx.send(()).unwrap();
            tokio::select! {
                () = fut => {}
                _ = stopped => {}
            }
        });
    });
    ready_rx.recv_timeout(IO_TIMEOUT).unwrap();
    Service {
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// TCP echo on `addrs` (each connection: everything read is written back; EOF is
/// passed on).
fn tcp_echo(ns: &str, addrs: Vec<SocketAddr>) -> Service {
    let (bound_tx, bound_rx) = mpsc::channel();
    let s = service(ns, move || {
        let listeners: Vec<_> = addrs
            .iter()
            .map(|a| {
                let l = std::net::TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"));
                l.set_nonblocking(true).unwrap();
                tokio::net::TcpListener::from_std(l).unwrap()
            })
            .collect();
        bound_tx.send(()).unwrap();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for l in listeners {
                tasks.spawn(async move {
                    loop {
                        let Ok((mut s, _)) = l.accept().await else {
                            continue;
                        };
                        tokio::spawn(async move {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        });
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    });
    bound_rx.recv_timeout(IO_TIMEOUT).unwrap();
    s
}

/// TCP echoes on 127.0.0.1:9000 in `local_ns` (the rootless host's local service)
/// and on [::]:7000 in `mesh_ns` (a TUN node's).
fn tcp_echoes(local_ns: &str, mesh_ns: &str) -> [Service; 2] {
    [
        tcp_echo(local_ns, vec!["127.0.0.1:9000".parse().unwrap()]),
        tcp_echo(mesh_ns, vec!["[::]:7000".parse().unwrap()]),
    ]
}

/// UDP echo on `addr`.
fn udp_echo(ns: &str, addr: SocketAddr) -> Service {
    service(ns, move || {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        let s = tokio::net::UdpSocket::from_std(s).unwrap();
        async move {
            let mut buf = vec![0; 65536];
            loop {
                if let Ok((n, from)) = s.recv_from(&mut buf).await {
                    let _ = s.send_to(&buf[..n], from).await;
                }
            }
        }
    })
}

/// How a connection to the observer ended, as the observer saw it.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Eof(usize),
    Reset,
    Other(String),
}

/// What the observer does with a connection.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Reads until the client ends it.
    Watch,
    /// After reading this many bytes, answers "bye" and closes (FIN).
    CloseAfter(usize),
    /// After reading this many bytes, resets the connection (RST).
    ResetAfter(usize),
}

/// A tokio TCP listener on `addr` (called inside a [`service`]'s runtime).
fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
    let l = std::net::TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(l).unwrap()
}

/// A server that reports how each connection ended.
fn observer(ns: &str, addr: SocketAddr, mode: Mode) -> (Service, mpsc::Receiver<Ended>) {
    let (tx, rx) = mpsc::channel();
    let s = service(ns, move || {
        let l = listen(addr);
        async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut total = 0;
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break Ended::Eof(total),
                            Ok(n) => {
                                total += n;
                                match mode {
                                    Mode::CloseAfter(c) if total >= c => {
                                        let _ = s.write_all(b"bye").await;
                                        break Ended::Eof(total);
                                    }
                                    Mode::ResetAfter(c) if total >= c => {
                                        let _ = socket2::SockRef::from(&s)
                                            .set_linger(Some(Duration::ZERO));
                                        break Ended::Reset;
                                    }
                                    _ => {}
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                                break Ended::Reset;
                            }
                            Err(e) => break Ended::Other(e.to_string()),
                        }
                    };
                    let _ = tx.send(end);
                });
            }
        }
    });
    (s, rx)
}

// ---- clients (blocking, run with in_ns) ----

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    Ok(s)
}

/// Sends `payload`, half-closes, reads everything back.
fn echo_over(mut s: TcpStream, payload: &[u8]) -> Result<(), String> {
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != payload {
        return Err(format!(
            "echo differs: {} bytes back of {}",
            back.len(),
            payload.len()
        ));
    }
    Ok(())
}

/// A TCP echo round trip to `addr` from inside `ns`, retried until it works.
fn wait_echo(ns: &str, addr: SocketAddr, what: &str) {
    let mut last = String::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let payload = format!("hello over {what} to {addr}").into_bytes();
        match in_ns(ns, move || {
            connect(addr).and_then(|s| echo_over(s, &payload))
        }) {
            Ok(()) => return,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: no echo from {addr}: {last}");
}

/// A UDP round trip to `addr` from inside `ns`, retried until it works.
fn wait_udp_echo(ns: &str, addr: SocketAddr, what: &str) {
    let ok = in_ns(ns, move || {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .unwrap();
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let msg = format!("datagram to {addr}");
            let _ = s.send_to(msg.as_bytes(), addr);
            if let Ok((n, from)) = s.recv_from(&mut buf)
                && from == addr
                && &buf[..n] == msg.as_bytes()
            {
                return true;
            }
        }
        false
    });
    assert!(ok, "{what}: no UDP echo from {addr}");
}

/// SOCKS5 negotiation and request; returns the reply code, the bound address and the
/// stream.
fn socks_request(
    proxy: SocketAddr,
    cmd: u8,
    target: &SocksTarget,
) -> Result<(u8, SocketAddr, TcpStream), String> {
    let mut s = connect(proxy)?;
    s.write_all(&[5, 1, 0]).map_err(|e| e.to_string())?;
    let mut hello = [0u8; 2];
    s.read_exact(&mut hello)
        .map_err(|e| format!("greeting: {e}"))?;
    if hello != [5, 0] {
        return Err(format!("greeting answer {hello:?}"));
    }
    let mut req = vec![5, cmd, 0];
    match target {
        SocksTarget::Ip(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        SocksTarget::Ip(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
            req.extend_from_slice(&a.port().to_be_bytes());
        }
        SocksTarget::Name(n, port) => {
            req.push(3);
            req.push(n.len() as u8);
            req.extend_from_slice(n.as_bytes());
            req.extend_from_slice(&port.to_be_bytes());
        }
    }
    s.write_all(&req).map_err(|e| e.to_string())?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).map_err(|e| format!("reply: {e}"))?;
    let bound = match head[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).map_err(|e| e.to_string())?;
            SocketAddr::new(
                Ipv4Addr::new(a[0], a[1], a[2], a[3]).into(),
                u16::from_be_bytes([a[4], a[5]]),
            )
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).map_err(|e| e.to_string())?;
            let ip: [u8; 16] = a[..16].try_into().unwrap();
            SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([a[16], a[17]]),
            )
        }
        t => return Err(format!("reply address type {t}")),
    };
    Ok((head[1], bound, s))
}

enum SocksTarget {
    Ip(SocketAddr),
    Name(String, u16),
}

/// Echo through SOCKS5 CONNECT, retried until it works.
fn wait_socks_echo(ns: &str, proxy: SocketAddr, target: SocketAddr) {
    let mut last = String::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let r = in_ns(ns, move || {
            let (code, _, s) = socks_request(proxy, 1, &SocksTarget::Ip(target))?;
            if code != 0 {
                return Err(format!("SOCKS5 reply {code}"));
            }
            echo_over(s, format!("socks to {target}").as_bytes())
        });
        match r {
            Ok(()) => return,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("SOCKS5 CONNECT to {target}: {last}");
}

// ---- the rootless node ----

/// Starts node `i` (added, not started) as `join --userspace FLAGS`, run as nobody
/// without capabilities.
fn start_rootless(c: &mut Cluster, i: usize, flags: &[String]) {
    let dir = c.nodes[i].dir.clone();
    // The state dir belongs to the unprivileged user; its parent is only traversable.
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(
        dir.parent().unwrap(),
        std::fs::Permissions::from_mode(0o711),
    )
    .unwrap();
    let name = c.nodes[i].name.clone();
    let log = c.scratch("logs").join(format!("{name}.rootless.log"));
    let file = std::fs::File::create(&log).unwrap();
    let node = &mut c.nodes[i];
    let child = node
        .ns
        .cmd(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            BIN,
            "join",
            &node.coordinator,
            "--hostname",
            &name,
            "--state-dir",
            dir.to_str().unwrap(),
            "--token",
            &c.token,
            "--userspace",
        ])
        .args(flags)
        .env("RUST_LOG", "info,nexodus=debug")
        .env("HOME", &dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .die_with_parent()
        .spawn()
        .unwrap();
    node.log = log;
    node.child = Some(child);
}

/// Rules reaching [`tcp_echoes`]: ingress 8080 to the local echo, egress 17000 to the
/// mesh echo at `t0`; then `more` flags.
fn echo_rules(t0: IpAddr, more: &[&str]) -> Vec<String> {
    let egress = format!("tcp:17000:{t0}:7000");
    let mut flags = strings(&["--ingress", "tcp:8080:127.0.0.1:9000", "--egress", &egress]);
    flags.extend(strings(more));
    flags
}

fn strings(flags: &[&str]) -> Vec<String> {
    flags.iter().map(ToString::to_string).collect()
}

/// The rootless process really runs as nobody, with no capabilities, and has no TUN
/// device open (nor any interface but lo and eth0 in its namespace).
fn assert_unprivileged(c: &Cluster, i: usize) {
    let node = &c.nodes[i];
    let pid = node.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap()
    };
    assert!(field("Uid:").iter().all(|u| *u == "65534"), "{status}");
    assert!(field("Gid:").iter().all(|g| *g == "65534"), "{status}");
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(cap), ["0000000000000000"], "{cap} {status}");
    }
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().contains("tun"),
            "fd {:?} -> {target:?}",
            fd.path()
        );
    }
    let links = node.ns.ok(&["ip", "-o", "link", "show"]);
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or(""))
        .collect();
    assert_eq!(names, ["lo", "eth0"], "{links}");
}

fn userspace(s: &Status) -> &nexodus::userspace::UserspaceStatus {
    s.userspace
        .as_ref()
        .expect("a userspace section in the status")
}

fn v6(s: &Status) -> Ipv6Addr {
    s.device.tunnel_ip_v6.expect("a v6 tunnel address")
}

/// Coordinator and a TUN node `t0` running (its status returned).
fn cluster(tag: &str) -> (Cluster, Status) {
    let mut c = Cluster::new(tag, "192.0.2.1/24");
    let t = c.add_node(
        "t0",
        "192.0.2.11/24",
        true,
        &["--interface", &format!("nx{tag}")],
    );
    c.start(t);
    let st = c.nodes[t].wait_peers(0);
    (c, st)
}

#[test]
fn rootless_node_reaches_and_is_reached_over_v4_and_v6() {
    let (mut c, t0) = cluster("usa");
    let t0_v4 = IpAddr::V4(t0.device.tunnel_ip);
    let t0_v6 = IpAddr::V6(v6(&t0));
    let flags: Vec<String> = [
        "--ingress",
        "tcp:8080:127.0.0.1:9000",
        "--ingress",
        "udp:8053:127.0.0.1:9053",
        "--ingress",
        "tcp:8082:127.0.0.1:9099",
        "--egress",
        &format!("tcp:17000:{t0_v4}:7000"),
        "--egress",
        &format!("tcp:17001:[{t0_v6}]:7000"),
        "--egress",
        &format!("udp:17053:{t0_v4}:7053"),
        "--egress",
        &format!("udp:[::1]:17054:[{t0_v6}]:7053"),
        "--egress",
        &format!("tcp:17002:{t0_v4}:7002"),
        "--egress",
        &format!("tcp:17003:{t0_v4}:7003"),
        "--egress",
        &format!("tcp:17004:{t0_v4}:7004"),
        "--socks5",
        "127.0.0.1:1080",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let r = c.add_node("r", "192.0.2.12/24", true, &[]);
    start_rootless(&mut c, r, &flags);
    let rs = c.nodes[r].wait_peers(1);
    let r_ns = c.nodes[r].ns.name.clone();
    let t_ns = c.nodes[0].ns.name.clone();
    assert_unprivileged(&c, r);
    assert!(rs.device.ipv6_supported, "the userspace stack speaks IPv6");
    let e = Ends {
        r_ns,
        t_ns,
        t0_v4,
        t0_v6,
        r_v4: IpAddr::V4(rs.device.tunnel_ip),
        r_v6: IpAddr::V6(v6(&rs)),
    };

    // Services: local ones on the rootless host, mesh ones on the TUN node.
    let _tcp = tcp_echoes(&e.r_ns, &e.t_ns);
    let _local_udp = udp_echo(&e.r_ns, "127.0.0.1:9053".parse().unwrap());
    let _mesh_udp = udp_echo(&e.t_ns, "[::]:7053".parse().unwrap());

    // The stack answers pings on both addresses.
    assert!(
        c.nodes[0].ns.ping_until(&e.r_v4.to_string(), WAIT),
        "ping {}",
        e.r_v4
    );
    assert!(
        c.nodes[0].ns.ping_until(&e.r_v6.to_string(), WAIT),
        "ping {}",
        e.r_v6
    );

    ingress_and_egress(&e);
    socks5(&e);
    let (_observer, ends) = tcp_ends(&e);
    reset_and_status(&c, r, &e, &ends);
}

/// The rootless node (`r_*`) and the TUN node t0 of
/// `rootless_node_reaches_and_is_reached_over_v4_and_v6`: namespaces and tunnel
/// addresses.
struct Ends {
    r_ns: String,
    t_ns: String,
    t0_v4: IpAddr,
    t0_v6: IpAddr,
    r_v4: IpAddr,
    r_v6: IpAddr,
}

/// Ingress to the rootless node's local services and egress to the mesh, v4 and v6.
fn ingress_and_egress(e: &Ends) {
    // Ingress: the TUN node reaches the rootless node's local service, v4 and v6.
    wait_echo(&e.t_ns, SocketAddr::new(e.r_v4, 8080), "ingress v4");
    wait_echo(&e.t_ns, SocketAddr::new(e.r_v6, 8080), "ingress v6");
    wait_udp_echo(&e.t_ns, SocketAddr::new(e.r_v4, 8053), "ingress udp v4");
    wait_udp_echo(&e.t_ns, SocketAddr::new(e.r_v6, 8053), "ingress udp v6");
    // A port without a rule is refused, not left hanging; so is a rule whose local
    // service is not there.
    for port in [8081, 8082] {
        let to = SocketAddr::new(e.r_v4, port);
        let refused = in_ns(&e.t_ns, move || connect(to).err());
        assert!(
            refused.as_deref().is_some_and(|e| e.contains("refused")),
            "{port}: {refused:?}"
        );
    }

    // Egress: the rootless host reaches the TUN node's services, v4 and v6, TCP and UDP.
    wait_echo(&e.r_ns, "127.0.0.1:17000".parse().unwrap(), "egress v4");
    wait_echo(&e.r_ns, "127.0.0.1:17001".parse().unwrap(), "egress v6");
    wait_udp_echo(&e.r_ns, "127.0.0.1:17053".parse().unwrap(), "egress udp v4");
    wait_udp_echo(&e.r_ns, "[::1]:17054".parse().unwrap(), "egress udp v6");
}

/// SOCKS5 CONNECT and UDP ASSOCIATE to mesh addresses.
fn socks5(e: &Ends) {
    let (r_ns, t0_v4, t0_v6) = (&e.r_ns, e.t0_v4, e.t0_v6);
    // SOCKS5 CONNECT to mesh addresses, v4 and v6.
    let proxy: SocketAddr = "127.0.0.1:1080".parse().unwrap();
    wait_socks_echo(r_ns, proxy, SocketAddr::new(t0_v4, 7000));
    wait_socks_echo(r_ns, proxy, SocketAddr::new(t0_v6, 7000));
    // Mesh names resolve (tests/dns.rs has more); other names are "host
    // unreachable"; a closed port: "refused".
    let code = in_ns(r_ns, move || {
        socks_request(
            proxy,
            1,
            &SocksTarget::Name("t0.nexodus.internal".into(), 7000),
        )
        .map(|r| r.0)
    });
    assert_eq!(code, Ok(0));
    let code = in_ns(r_ns, move || {
        socks_request(proxy, 1, &SocksTarget::Name("t0.mesh".into(), 7000)).map(|r| r.0)
    });
    assert_eq!(code, Ok(4));
    let code = in_ns(r_ns, move || {
        socks_request(proxy, 1, &SocksTarget::Ip(SocketAddr::new(t0_v4, 7999))).map(|r| r.0)
    });
    assert_eq!(code, Ok(5));
    // SOCKS5 UDP ASSOCIATE: a datagram to the TUN node's UDP echo and back.
    let echoed = in_ns(r_ns, move || {
        let (code, relay, control) =
            socks_request(proxy, 3, &SocksTarget::Ip("0.0.0.0:0".parse().unwrap()))?;
        if code != 0 {
            return Err(format!("UDP ASSOCIATE reply {code}"));
        }
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let target = SocketAddr::new(t0_v6, 7053);
        let mut dgram = vec![0, 0, 0, 4];
        if let IpAddr::V6(a) = target.ip() {
            dgram.extend_from_slice(&a.octets());
        }
        dgram.extend_from_slice(&target.port().to_be_bytes());
        dgram.extend_from_slice(b"via socks udp");
        let mut buf = [0u8; 2048];
        for _ in 0..20 {
            u.send_to(&dgram, relay).unwrap();
            if let Ok(n) = u.recv(&mut buf) {
                drop(control);
                return Ok(buf[..n].to_vec());
            }
        }
        Err("no answer through the UDP relay".into())
    })
    .unwrap();
    assert_eq!(&echoed[22..], b"via socks udp", "{echoed:?}");
    assert_eq!(&echoed[..4], &[0, 0, 0, 4]);
}

/// FINs pass both ways through the rootless stack.
/// Returns the observer of the second (on port 7003) for [`reset_and_status`].
fn tcp_ends(e: &Ends) -> (Service, mpsc::Receiver<Ended>) {
    // Closing: a FIN from the mesh side reaches the local client...
    let (_closer, closer_ends) =
        observer(&e.t_ns, "[::]:7002".parse().unwrap(), Mode::CloseAfter(5));
    let got = in_ns(&e.r_ns, || {
        let mut s = wait_until("egress to the closing server", WAIT, || {
            connect("127.0.0.1:17002".parse().unwrap())
                .ok()
                .filter(|s| {
                    let mut s = s;
                    s.write_all(b"hello").is_ok()
                })
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .map(|_| back)
            .map_err(|e| e.to_string())
    });
    assert_eq!(got.as_deref(), Ok(&b"bye"[..]));
    assert_eq!(closer_ends.recv_timeout(IO_TIMEOUT).unwrap(), Ended::Eof(5));
    // ... a local FIN reaches the mesh side, and a local reset resets it.
    let (observer_7003, ends) = observer(&e.t_ns, "[::]:7003".parse().unwrap(), Mode::Watch);
    in_ns(&e.r_ns, || {
        let mut s = connect("127.0.0.1:17003".parse().unwrap()).unwrap();
        s.write_all(b"12345678").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    });
    assert_eq!(ends.recv_timeout(IO_TIMEOUT).unwrap(), Ended::Eof(8));
    (observer_7003, ends)
}

/// A local reset resets the mesh side (the open flow listed in the status meanwhile);
/// a reset from the mesh side resets the local client.
fn reset_and_status(c: &Cluster, r: usize, e: &Ends, ends: &mpsc::Receiver<Ended>) {
    let t0_v4 = e.t0_v4;
    let t0_v6 = e.t0_v6;
    let status_before_reset = in_ns(&e.r_ns, || {
        let mut s = connect("127.0.0.1:17003".parse().unwrap()).unwrap();
        s.write_all(b"abc").unwrap();
        s
    });
    // While it is open, the status lists the flow under its rule.
    let rule = format!("egress tcp:17003:{t0_v4}:7003");
    let target = SocketAddr::new(e.t0_v4, 7003);
    let st = wait_until("the open flow in the status", WAIT, || {
        c.nodes[r].status().filter(|s| {
            userspace(s).open_flows.iter().any(|f| {
                f.rule == rule && f.to == target && f.proto == "tcp" && f.to_mesh_bytes == 3
            })
        })
    });
    let u = userspace(&st);
    assert!(
        u.rules.iter().any(|r| r.rule == rule && r.open_flows == 1),
        "{:?}",
        u.rules
    );
    for want in [
        "ingress tcp:8080:127.0.0.1:9000".to_string(),
        "ingress udp:8053:127.0.0.1:9053".into(),
        format!("egress udp:[::1]:17054:[{t0_v6}]:7053"),
        "socks5 127.0.0.1:1080".into(),
    ] {
        assert!(
            u.rules.iter().any(|r| r.rule == want),
            "{want} not in {:?}",
            u.rules
        );
    }
    assert!(
        u.open_flows
            .iter()
            .any(|f| f.proto == "udp" && f.rule == "ingress udp:8053:127.0.0.1:9053"),
        "{:?}",
        u.open_flows
    );
    let human = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(&c.nodes[r].dir)
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("userspace stack") && human.contains(&rule),
        "{human}"
    );
    let _ = socket2::SockRef::from(&status_before_reset).set_linger(Some(Duration::ZERO));
    drop(status_before_reset);
    assert_eq!(ends.recv_timeout(IO_TIMEOUT).unwrap(), Ended::Reset);
    wait_until("the reset flow to leave the status", WAIT, || {
        c.nodes[r]
            .status()
            .filter(|s| !userspace(s).open_flows.iter().any(|f| f.to == target))
    });
    // A reset from the mesh side resets the local client.
    let (_rst, rst_ends) = observer(&e.t_ns, "[::]:7004".parse().unwrap(), Mode::ResetAfter(1));
    let end = in_ns(&e.r_ns, || {
        let mut s = connect("127.0.0.1:17004".parse().unwrap()).unwrap();
        s.write_all(b"x").unwrap();
        let mut buf = [0u8; 16];
        s.read(&mut buf).map_err(|e| e.kind())
    });
    assert_eq!(rst_ends.recv_timeout(IO_TIMEOUT).unwrap(), Ended::Reset);
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));
}

/// Pseudo-random bytes (xorshift), different for every `seed`.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes through an echo at `addr`; true when what comes back has the
/// same SHA-256.
async fn checked_echo(addr: SocketAddr, seed: u64, len: usize) -> Result<(), String> {
    let s = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timeout"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut rd, mut wr) = s.into_split();
    let sent = data(seed, len);
    let want = Sha256::digest(&sent);
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await?;
        wr.shutdown().await
    });
    let mut back = Vec::with_capacity(len);
    rd.read_to_end(&mut back)
        .await
        .map_err(|e| format!("read from {addr}: {e}"))?;
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("write to {addr}: {e}"))?;
    if back.len() != len || Sha256::digest(&back) != want {
        return Err(format!(
            "{addr} seed {seed}: {} bytes back of {len}, checksum differs",
            back.len()
        ));
    }
    Ok(())
}

/// Runs `count` checked echoes of `len` bytes at once from inside `ns`, spread over
/// `addrs`.
fn parallel_echoes(
    ns: &str,
    addrs: Vec<SocketAddr>,
    count: u64,
    len: usize,
    seed: u64,
) -> Vec<String> {
    block_in_ns(ns, move || async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..count {
            let addr = addrs[i as usize % addrs.len()];
            set.spawn(checked_echo(addr, seed + i, len));
        }
        let mut errors = Vec::new();
        let all = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(r) = set.join_next().await {
                if let Err(e) = r.map_err(|e| e.to_string()).and_then(|r| r) {
                    errors.push(e);
                }
            }
        })
        .await;
        if all.is_err() {
            errors.push(format!("timed out with {} transfers left", set.len()));
        }
        errors
    })
}

/// A server that reads everything, then answers with the byte count (8 bytes).
fn sink(ns: &str, addr: SocketAddr) -> Service {
    service(ns, move || {
        let l = listen(addr);
        async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    let mut total = 0u64;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = s.write_all(&total.to_be_bytes()).await;
                });
            }
        }
    })
}

/// MB/s of one upload of `len` bytes to a [`sink`] at `addr` from inside `ns`.
fn upload_rate(ns: &str, addr: SocketAddr, len: u64) -> f64 {
    block_in_ns(ns, move || async move {
        let start = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let chunk = vec![0x5a_u8; 1 << 16];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n]).await.unwrap();
            left -= n as u64;
        }
        s.shutdown().await.unwrap();
        let mut count = [0u8; 8];
        s.read_exact(&mut count).await.unwrap();
        assert_eq!(u64::from_be_bytes(count), len);
        len as f64 / start.elapsed().as_secs_f64() / 1e6
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn rootless_parallel_transfers_arrive_intact() {
    let (mut c, t0) = cluster("usp");
    let t0_v4 = IpAddr::V4(t0.device.tunnel_ip);
    let t0_v6 = IpAddr::V6(v6(&t0));
    let t1 = c.add_node("t1", "192.0.2.13/24", true, &["--interface", "nxusp1"]);
    c.start(t1);
    let r = c.add_node("r", "192.0.2.12/24", true, &[]);
    start_rootless(
        &mut c,
        r,
        &echo_rules(
            t0_v4,
            &[
                "--egress",
                &format!("tcp:17001:[{t0_v6}]:7000"),
                "--egress",
                &format!("tcp:17010:{t0_v4}:7010"),
            ],
        ),
    );
    let rs = c.nodes[r].wait_peers(2);
    c.nodes[t1].wait_peers(2);
    let (r_ns, t_ns) = (c.nodes[r].ns.name.clone(), c.nodes[0].ns.name.clone());
    let t1_ns = c.nodes[t1].ns.name.clone();
    let _echoes = tcp_echoes(&r_ns, &t_ns);
    let _sink = sink(&t_ns, "[::]:7010".parse().unwrap());
    let egress: Vec<SocketAddr> = vec![
        "127.0.0.1:17000".parse().unwrap(),
        "127.0.0.1:17001".parse().unwrap(),
    ];
    let r_v4 = SocketAddr::new(rs.device.tunnel_ip.into(), 8080);
    let r_v6 = SocketAddr::new(v6(&rs).into(), 8080);
    wait_echo(&r_ns, egress[0], "egress v4");
    wait_echo(&r_ns, egress[1], "egress v6");
    wait_echo(&t_ns, r_v4, "ingress v4");
    let pid = c.nodes[r].child.as_ref().unwrap().id();
    let fds_before = open_fds(pid);

    // 100 transfers of 1 MiB out through the egress rules (v4 and v6) while 20 come in
    // through the ingress rule, all at once; every byte comes back.
    const MIB: usize = 1 << 20;
    let inbound = std::thread::spawn({
        let t_ns = t_ns.clone();
        move || parallel_echoes(&t_ns, vec![r_v4, r_v6], 20, MIB, 1000)
    });
    let out_errors = parallel_echoes(&r_ns, egress, 100, MIB, 1);
    let in_errors = inbound.join().unwrap();
    assert!(out_errors.is_empty(), "egress: {out_errors:?}");
    assert!(in_errors.is_empty(), "ingress: {in_errors:?}");

    // Every flow is closed and forgotten; no descriptor leaked.
    wait_until("all flows to close", WAIT, || {
        c.nodes[r]
            .status()
            .filter(|s| userspace(s).open_flows.is_empty())
    });
    wait_until("descriptors back to where they were", WAIT, || {
        (open_fds(pid) <= fds_before).then_some(())
    });

    // One transfer through the userspace stack and one between TUN nodes, for the
    // record (debug build, shared CI machine: not asserted).
    let len = 32 << 20;
    let userspace_rate = upload_rate(&r_ns, "127.0.0.1:17010".parse().unwrap(), len);
    let tun_rate = upload_rate(&t1_ns, SocketAddr::new(t0_v4, 7010), len);
    eprintln!(
        "one TCP upload of {} MiB: userspace {userspace_rate:.0} MB/s, TUN {tun_rate:.0} MB/s ({:.0}%)",
        len >> 20,
        100.0 * userspace_rate / tun_rate
    );
}

/// Runs `join --userspace` with `rules`; it must refuse to start, saying `want`.
fn refused(rules: &[&str], want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "join",
        "192.0.2.1:4443",
        "--token",
        "nx1.bogus",
        "--state-dir",
    ])
    .arg(dir.path())
    .arg("--userspace")
    .args(rules);
    let err = proc::assert_fails_within(cmd, IO_TIMEOUT, &format!("{rules:?}"));
    for w in want {
        assert!(err.contains(w), "{rules:?}: {w:?} not in {err:?}");
    }
    // Nothing was enrolled: the refusal came before the coordinator was asked.
    assert!(!err.contains("token"), "{rules:?}: {err}");
}

#[test]
fn rootless_bad_rules_are_refused_at_start() {
    refused(
        &["--ingress", "sctp:80:127.0.0.1:8080"],
        &[
            "--ingress",
            "sctp:80:127.0.0.1:8080",
            "unknown protocol \"sctp\"",
        ],
    );
    refused(&["--ingress", "tcp:0:127.0.0.1:8080"], &["bad port \"0\""]);
    refused(
        &["--egress", "udp:5353:100.64.0.5:99999"],
        &["bad port \"99999\""],
    );
    refused(
        &["--egress", "tcp:5432:100.64.0:5432"],
        &["bad address \"100.64.0\""],
    );
    refused(
        &["--egress", "tcp:5432:200::5:5432"],
        &["expected PROTO:[BIND:]LOCALPORT:MESHHOST:PORT"],
    );
    refused(
        &["--ingress", "tcp:80:localhost:8080"],
        &["bad address \"localhost\""],
    );
    refused(
        &[
            "--ingress",
            "tcp:80:127.0.0.1:8080",
            "--ingress",
            "tcp:80:127.0.0.1:9090",
        ],
        &["tcp port 80 is already used by rule \"ingress tcp:80:127.0.0.1:8080\""],
    );
    // Ports already in use on this host.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    refused(
        &["--egress", &format!("tcp:{port}:100.64.0.5:5432")],
        &[&format!("cannot listen on 127.0.0.1:{port}"), "in use"],
    );
    refused(
        &["--socks5", &format!("127.0.0.1:{port}")],
        &[
            &format!("cannot listen on 127.0.0.1:{port} (socks5)"),
            "in use",
        ],
    );
    let taken_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let uport = taken_udp.local_addr().unwrap().port();
    refused(
        &["--egress", &format!("udp:{uport}:[200::5]:53")],
        &[&format!("cannot listen on 127.0.0.1:{uport}"), "in use"],
    );
    // Rules need --userspace.
    let out = Command::new(BIN)
        .args(["join", "192.0.2.1:4443", "--ingress", "tcp:80:127.0.0.1:80"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--userspace"));
}

#[test]
fn rootless_node_behind_symmetric_nat_goes_through_the_relay() {
    use common::netns::Nat;
    let mut c = Cluster::new("usn", "203.0.113.1/24");
    let relay = c.add_relay("rl", "203.0.113.2/24", "nxusnr");
    let t = c.add_node("t0", "203.0.113.11/24", true, &["--interface", "nxusn0"]);
    c.start(relay);
    c.start(t);
    let t0 = c.nodes[t].wait_peers(1);
    let site = c
        .lan
        .nat_site("r", "203.0.113.20/24", "192.0.2.0/26", Nat::Symmetric);
    let _router = site.router;
    let r = c.add_node_in("r", site.node, &[]);
    let t0_v4 = IpAddr::V4(t0.device.tunnel_ip);
    let t0_v6 = IpAddr::V6(v6(&t0));
    start_rootless(
        &mut c,
        r,
        &echo_rules(t0_v4, &["--socks5", "127.0.0.1:1080"]),
    );
    // Behind symmetric NAT the rootless node is a spoke: its one peer is the relay.
    let rs = c.nodes[r].wait_only_peer("rl", Duration::from_secs(60));
    let (r_ns, t_ns) = (c.nodes[r].ns.name.clone(), c.nodes[t].ns.name.clone());
    let _echoes = tcp_echoes(&r_ns, &t_ns);
    let relayed = |c: &Cluster| c.nodes[relay].status().map_or(0, |s| s.relayed_bytes);
    let before = relayed(&c);
    wait_echo(
        &t_ns,
        SocketAddr::new(rs.device.tunnel_ip.into(), 8080),
        "ingress v4 via relay",
    );
    wait_echo(
        &t_ns,
        SocketAddr::new(v6(&rs).into(), 8080),
        "ingress v6 via relay",
    );
    wait_echo(
        &r_ns,
        "127.0.0.1:17000".parse().unwrap(),
        "egress v4 via relay",
    );
    wait_socks_echo(
        &r_ns,
        "127.0.0.1:1080".parse().unwrap(),
        SocketAddr::new(t0_v6, 7000),
    );
    let errors = parallel_echoes(
        &r_ns,
        vec!["127.0.0.1:17000".parse().unwrap()],
        10,
        256 << 10,
        7,
    );
    assert!(errors.is_empty(), "{errors:?}");
    let after = relayed(&c);
    assert!(
        after >= before + 10 * (256 << 10),
        "the relay forwarded {before} -> {after} bytes"
    );
}
