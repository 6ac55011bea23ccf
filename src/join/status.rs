//! `nexodus status`: a unix socket (0600) in the node's state dir answers with the
//! node's status as JSON; the CLI prints it as JSON or as a table.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SOCKET_FILE: &str = "nexodus.sock";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub id: i64,
    pub hostname: String,
    pub public_key: String,
    pub tunnel_ip: Ipv4Addr,
    pub tunnel_ip_v6: Option<Ipv6Addr>,
    pub ipv6_supported: bool,
    pub listen_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: i64,
    pub hostname: String,
    pub public_key: String,
    pub tunnel_ip: Ipv4Addr,
    pub tunnel_ip_v6: Option<Ipv6Addr>,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    /// "direct" or "relay".
    pub path: String,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub device: DeviceStatus,
    /// Whether the control connection to the coordinator is up.
    pub coordinator_connected: bool,
    /// This node relays for spokes (`--relay`).
    #[serde(default)]
    pub relay: bool,
    /// Packets and bytes forwarded between peers by this node (relay mode).
    #[serde(default)]
    pub relayed_packets: u64,
    #[serde(default)]
    pub relayed_bytes: u64,
    /// Handshake initiations answered with a cookie reply instead of being processed
    /// (more than the rate limit allows per second arrived: under load or attack).
    #[serde(default)]
    pub cookie_replies: u64,
    /// Rootless mode: rules and open flows.
    #[serde(default)]
    pub userspace: Option<crate::userspace::UserspaceStatus>,
    pub peers: Vec<PeerStatus>,
    /// Packets dropped by the data plane, by reason (only non-zero ones).
    pub drops: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the node at {path} (is `nexodus join` running with this --state-dir?): {source}"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the node status: {0}")]
    Read(#[from] std::io::Error),
    #[error("node answered garbage: {0}")]
    Decode(#[from] serde_json::Error),
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// Binds the status socket (replacing a stale one) with mode 0600.
pub fn bind(state_dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers one status connection.
pub async fn answer(mut stream: tokio::net::UnixStream, status: &Status) -> std::io::Result<()> {
    let body = serde_json::to_vec(status).map_err(std::io::Error::other)?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// Asks a running node for its status.
pub async fn query(state_dir: &Path) -> Result<Status, StatusError> {
    let path = socket_path(state_dir);
    let mut stream = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(|source| StatusError::Connect {
            path: path.clone(),
            source,
        })?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    Ok(serde_json::from_slice(&buf)?)
}

fn ago(secs: Option<u64>) -> String {
    secs.map_or_else(|| "never".into(), |s| format!("{s}s ago"))
}

/// The human form.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let d = &s.device;
    let _ = writeln!(
        out,
        "device {} ({}), id {}\n  tunnel ip  {}  {}\n  listen     udp/{}   coordinator {}",
        d.hostname,
        d.public_key,
        d.id,
        d.tunnel_ip,
        d.tunnel_ip_v6
            .map_or_else(|| "(no IPv6 on this host)".to_string(), |a| a.to_string()),
        d.listen_port,
        if s.coordinator_connected {
            "connected"
        } else {
            "DISCONNECTED (tunnels keep running)"
        }
    );
    let _ = writeln!(
        out,
        "\n{:<18} {:<15} {:<22} {:<7} {:<22} {:>12} {:>12}",
        "PEER", "TUNNEL IP", "TUNNEL IPV6", "PATH", "ENDPOINT", "HANDSHAKE", "RX / TX"
    );
    for p in &s.peers {
        let _ = writeln!(
            out,
            "{:<18} {:<15} {:<22} {:<7} {:<22} {:>12} {:>12}",
            p.hostname,
            p.tunnel_ip,
            p.tunnel_ip_v6.map_or_else(|| "-".into(), |a| a.to_string()),
            p.path,
            p.endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
            ago(p.last_handshake_secs),
            format!("{} / {}", p.rx_bytes, p.tx_bytes),
        );
    }
    if s.relay {
        let _ = writeln!(
            out,
            "\nrelay: forwarded {} packets, {} bytes",
            s.relayed_packets, s.relayed_bytes
        );
    }
    if s.cookie_replies > 0 {
        let _ = writeln!(
            out,
            "\nunder load: answered {} handshake initiations with cookie replies",
            s.cookie_replies
        );
    }
    if let Some(u) = &s.userspace {
        let _ = writeln!(out, "\nuserspace stack (rootless): {} rules", u.rules.len());
        for r in &u.rules {
            let _ = writeln!(out, "  {:<52} {} open", r.rule, r.open_flows);
        }
        if !u.open_flows.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<4} {:<46} {:<46} {:>12}  RULE",
                "FLOW", "FROM", "TO", "OUT / IN"
            );
        }
        for f in &u.open_flows {
            let _ = writeln!(
                out,
                "{:<4} {:<46} {:<46} {:>12}  {}",
                f.proto,
                f.from,
                f.to,
                format!("{} / {}", f.to_mesh_bytes, f.from_mesh_bytes),
                f.rule
            );
        }
    }
    if !s.drops.is_empty() {
        let _ = writeln!(out, "\ndropped: {:?}", s.drops);
    }
    out
}
