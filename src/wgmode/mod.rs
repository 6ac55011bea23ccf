//! `nexodus wg IFNAME`: our data plane as a userspace WireGuard interface that `wg`,
//! `wg-quick` and anything else speaking WireGuard's userspace API configure, as they
//! do wireguard-go (DESIGN §14).
//!
//! The shell only: it creates the TUN interface (no address: `ip` or `wg-quick` adds
//! them), the UAPI socket `/var/run/wireguard/IFNAME.sock` (0600) and the UDP socket,
//! starts the same data-path thread and `DataPlane` as `join` (`join::datapath`), and
//! runs one driver loop that owns the [`crate::uapi::Device`] model: it answers each
//! connection's `get` and `set` (parsed and applied by the sans-IO `uapi` module) and
//! turns the model's changes into data-path commands (peers, preshared keys, a new
//! socket for a new listen port, `SO_MARK` for the fwmark, a new `DataPlane` for a new
//! private key). It follows the interface through its TUN descriptor (`link`), in
//! whatever namespace it was moved to: every [`CHECK`] it reads the MTU (up to
//! 65,535) for the data path, and it exits when the interface is deleted (the data
//! path reports a dead TUN at once; the check catches the rest).
//!
//! What it does not do: anything of the mesh (no coordinator, no NAT traversal, no
//! relay, no routes or addresses of its own).

use std::collections::HashMap;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::io::{tun, udp};
use crate::join::datapath::{Command, DataPath, DataPathConfig, STUN_QUEUE};
use crate::join::uapi::{SOCKET_DIR, socket_path};
use crate::node::dataplane::{DataPlane, PeerConfig, PeerStats};
use crate::uapi::{Changes, Conn, Device, Event, UapiError, render_get, status_line};

mod link;
use link::{Link, LinkState};

/// Environment variable that makes the detached child report readiness on stdout.
pub const NOTIFY_ENV: &str = "NEXODUS_WG_NOTIFY";

/// A connection that sends nothing for this long is closed.
const IDLE: Duration = Duration::from_secs(10);

/// Tunnel MTU until the interface says otherwise (wireguard-go's default).
const DEFAULT_MTU: u16 = 1420;

/// How long a UAPI socket still answering may take to go before it counts as in use.
const SOCKET_RELEASE: Duration = Duration::from_secs(2);

/// How often the interface's MTU and existence are looked at (`ip link set mtu`
/// has no other way to reach us once the interface is in another namespace).
const CHECK: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("invalid interface name {0:?} (1 to 15 characters, no '/', ':' or spaces)")]
    Name(String),
    #[error(transparent)]
    Tun(#[from] tun::TunError),
    #[error("{0} is served by another running process")]
    SocketInUse(PathBuf),
    #[error("cannot open the UAPI socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the WireGuard UDP socket: {0}")]
    Udp(#[source] std::io::Error),
    #[error("cannot start the data path: {0}")]
    DataPath(#[source] std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the background process: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the background process failed: {0}")]
    Child(String),
}

fn check_name(name: &str) -> Result<(), WgError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(WgError::Name(name.into()))
    }
}

/// Runs `nexodus wg --foreground IFNAME` in the background (its own process group,
/// no terminal) and returns once it reports the interface and socket exist, as
/// wireguard-go does.
pub fn detach(interface: &str) -> Result<(), WgError> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    check_name(interface)?;
    let exe = std::env::current_exe().map_err(WgError::Spawn)?;
    let mut child = std::process::Command::new(exe)
        .args(["wg", "--foreground", interface])
        .env(NOTIFY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(WgError::Spawn)?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    match line.trim_end() {
        "ok" => Ok(()),
        "" => {
            let status = child.wait().map_err(WgError::Spawn)?;
            Err(WgError::Child(format!(
                "exited before it was ready ({status})"
            )))
        }
        err => {
            let _ = child.wait();
            Err(WgError::Child(err.to_string()))
        }
    }
}

/// Tells the parent of a detached run that we are up, then lets go of stdout.
fn notify_ready() {
    if std::env::var_os(NOTIFY_ENV).is_none() {
        return;
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b"ok\n");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both fds are valid; dup2 replaces stdout with /dev/null.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

/// Creates the interface and serves it until it is deleted or a signal arrives.
pub fn run(interface: &str) -> Result<(), WgError> {
    check_name(interface)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WgError::Runtime)?;
    rt.block_on(async {
        let tun = tun::create_bare(interface, DEFAULT_MTU)?;
        let link = Link::new(&tun).map_err(WgError::DataPath)?;
        let path = socket_path(interface);
        let listener = bind_socket(&path).await?;
        let _cleanup = RemoveOnDrop(path.clone());
        let socket = udp::bind(0).map_err(WgError::Udp)?;
        let port = socket.local_addr().map_err(WgError::Udp)?.port();
        let options = socket.try_clone().map_err(WgError::Udp)?;
        let (stun_tx, _stun_rx) = tokio::sync::mpsc::channel(STUN_QUEUE);
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
        let mut plane = DataPlane::new(rand::random());
        plane.set_mtu(usize::from(DEFAULT_MTU));
        let datapath = DataPath::spawn(
            plane,
            tun::PacketDevice::Tun(tun),
            socket,
            DataPathConfig {
                relay: false,
                stun_answers: stun_tx,
                fragment: true,
                tun_gone: Some(gone_tx),
            },
        )
        .map_err(WgError::DataPath)?;
        let mut dev = Device::new();
        dev.listen_port = port;
        let mut wg = Wg {
            interface: interface.to_string(),
            dev,
            datapath,
            options,
            port,
            mtu: usize::from(DEFAULT_MTU),
            link,
        };
        tracing::info!(interface, socket = %path.display(), listen_port = port, "userspace WireGuard interface up");
        notify_ready();
        wg.serve(listener, gone_rx).await;
        Ok(())
    })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the UAPI socket (0600), refusing one a live process serves.
async fn bind_socket(path: &Path) -> Result<UnixListener, WgError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| WgError::Socket {
        path: path.to_path_buf(),
        source,
    };
    // A process whose interface was just deleted is on its way out (it removes its
    // socket within milliseconds): give it a moment before calling the name taken,
    // so `ip link del wg0; nexodus wg wg0` works as with wireguard-go.
    let deadline = tokio::time::Instant::now() + SOCKET_RELEASE;
    while UnixStream::connect(path).await.is_ok() {
        if tokio::time::Instant::now() >= deadline {
            return Err(WgError::SocketInUse(path.to_path_buf()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crate::fsutil::create_private_dir(Path::new(SOCKET_DIR)).map_err(err)?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// The driver: owns the device model and the data path.
struct Wg {
    interface: String,
    dev: Device,
    datapath: DataPath,
    /// A second handle on the data path's UDP socket, for socket options.
    options: UdpSocket,
    port: u16,
    mtu: usize,
    link: Link,
}

impl Wg {
    async fn serve(
        &mut self,
        listener: UnixListener,
        mut tun_gone: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut check = tokio::time::interval(CHECK);
        let mut watching = true;
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => self.serve_conn(stream).await,
                    Err(e) => tracing::warn!(error = %e, "UAPI accept failed"),
                },
                _ = check.tick() => match self.link.check() {
                    LinkState::Gone => {
                        tracing::info!(interface = %self.interface, "interface deleted; exiting");
                        return;
                    }
                    LinkState::Up(mtu) => self.follow_mtu(mtu),
                },
                gone = &mut tun_gone, if watching => match gone {
                    Ok(()) => {
                        tracing::info!(interface = %self.interface, "TUN device gone; exiting");
                        return;
                    }
                    // The data path stopped without a word: the check decides.
                    Err(_) => watching = false,
                },
                _ = tokio::signal::ctrl_c() => return,
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => return,
            }
        }
    }

    fn follow_mtu(&mut self, mtu: Option<usize>) {
        let Some(mtu) = mtu.map(|m| m.min(65_535)) else {
            return;
        };
        if mtu != self.mtu {
            tracing::debug!(interface = %self.interface, mtu, "interface MTU");
            self.mtu = mtu;
            self.datapath.send(Command::SetMtu(mtu));
        }
    }

    /// Serves one connection: any number of `get`/`set` operations.
    async fn serve_conn(&mut self, mut stream: UnixStream) {
        let mut conn = Conn::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut events = Vec::new();
        loop {
            let n = match tokio::time::timeout(IDLE, stream.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => 0,
            };
            match buf.get(..n) {
                Some(data) if n > 0 => conn.handle_input(data, &mut self.dev, &mut events),
                _ => conn.handle_eof(&mut self.dev, &mut events),
            }
            for event in events.drain(..) {
                let reply = match event {
                    Event::Get => {
                        let stats = self.stats().await;
                        let mut out =
                            render_get(&self.dev, |id| stats.get(&id).copied(), SystemTime::now());
                        out.push_str(&status_line(&Ok(())));
                        out
                    }
                    Event::Set(parsed) => {
                        let changes = self.dev.take_changes();
                        let applied = self.apply(changes).await;
                        if let Some(e) = parsed.as_ref().err().or(applied.as_ref().err()) {
                            tracing::info!(error = %e, "UAPI set failed");
                        }
                        status_line(&parsed.and(applied))
                    }
                    Event::Fail(e) => {
                        tracing::info!(error = %e, "UAPI request refused");
                        status_line(&Err(e))
                    }
                    Event::Close => return,
                };
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
            if n == 0 || conn.is_closed() {
                return;
            }
        }
    }

    async fn stats(&self) -> HashMap<i64, PeerStats> {
        self.datapath
            .status()
            .await
            .map(|s| s.peers.into_iter().collect())
            .unwrap_or_default()
    }

    fn peer_config(&self, id: i64, endpoint: Option<std::net::SocketAddr>) -> Option<PeerConfig> {
        let p = self.dev.peer(id)?;
        Some(PeerConfig {
            allowed_ips: self.dev.allowed_ips(id),
            endpoint,
            persistent_keepalive: Some(p.persistent_keepalive),
            public_key: p.public_key,
        })
    }

    /// Hands what a `set` changed to the data path.
    async fn apply(&mut self, changes: Changes) -> Result<(), UapiError> {
        tracing::debug!(
            private_key = changes.private_key,
            listen_port = changes.listen_port,
            fwmark = changes.fwmark,
            peers = changes.peers.len(),
            removed = changes.removed.len(),
            "UAPI set"
        );
        let mut result = Ok(());
        if changes.listen_port {
            let want = self.dev.listen_port;
            if want != 0 && want != self.port {
                match udp::bind(want) {
                    Ok(socket) => match socket.try_clone() {
                        Ok(options) => {
                            self.options = options;
                            self.port = want;
                            if self.dev.fwmark != 0 {
                                result = self.set_mark();
                            }
                            self.datapath.send(Command::SetSocket(socket));
                        }
                        Err(e) => result = Err(UapiError::Io(e.to_string())),
                    },
                    Err(_) => result = Err(UapiError::PortInUse(want)),
                }
            }
            self.dev.listen_port = self.port;
        }
        if changes.fwmark {
            let r = self.set_mark();
            if result.is_ok() {
                result = r;
            }
        }
        if changes.private_key {
            self.replace_plane(&changes).await;
            return result;
        }
        if self.dev.private_key().is_none() {
            // No key, no sessions: peers wait in the model.
            return result;
        }
        for id in changes.removed {
            self.datapath.send(Command::Remove(id));
        }
        for (id, change) in changes.peers {
            let Some(cfg) = self.peer_config(id, change.endpoint) else {
                continue;
            };
            self.datapath.send(Command::Upsert(id, cfg));
            if change.preshared_key {
                let psk = self.dev.peer(id).and_then(|p| p.preshared_key);
                self.datapath.send(Command::SetPresharedKey(id, psk));
            }
        }
        result
    }

    fn set_mark(&self) -> Result<(), UapiError> {
        socket2::SockRef::from(&self.options)
            .set_mark(self.dev.fwmark)
            .map_err(|e| UapiError::Io(e.to_string()))
    }

    /// A new private key: a new data plane with every peer (keeping the endpoints
    /// they roamed to), sessions starting over.
    async fn replace_plane(&mut self, changes: &Changes) {
        let stats = self.stats().await;
        let mut plane = DataPlane::new(self.dev.private_key().unwrap_or_else(rand::random));
        plane.set_mtu(self.mtu);
        if self.dev.private_key().is_some() {
            let ids: Vec<i64> = self.dev.peers().map(|(id, _)| id).collect();
            for id in ids {
                let endpoint = changes
                    .peers
                    .get(&id)
                    .and_then(|c| c.endpoint)
                    .or_else(|| stats.get(&id).and_then(|s| s.endpoint))
                    .or_else(|| self.dev.peer(id).and_then(|p| p.endpoint));
                let Some(cfg) = self.peer_config(id, endpoint) else {
                    continue;
                };
                if let Err(e) = plane.upsert_peer(id, cfg) {
                    tracing::warn!(peer = id, error = %e, "peer refused");
                }
                plane.set_preshared_key(id, self.dev.peer(id).and_then(|p| p.preshared_key));
            }
        }
        self.datapath.send(Command::ReplacePlane(Box::new(plane)));
    }
}
