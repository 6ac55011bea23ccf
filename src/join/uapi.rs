//! WireGuard's cross-platform userspace API (the `get` operation), so `wg show` and
//! `wg show nx0 dump` read this node like any WireGuard interface.
//!
//! The socket is `/var/run/wireguard/<interface>.sock`, mode 0600 (it reveals the
//! private key, as the kernel's does to root). `set` is refused: the coordinator, not
//! `wg set`, configures peers. If another live process already serves the path (a
//! node with the same interface name in another network namespace), this node leaves
//! it alone and says so.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::datapath::DataPathStatus;
use crate::node::agent::NodeView;
use crate::node::dataplane::PeerStats;

/// Where `wg` looks for userspace interfaces.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// One peer as `wg` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UapiPeer {
    pub public_key: [u8; 32],
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: u16,
    /// Endpoint, handshake age and byte counts from the data plane.
    pub stats: PeerStats,
}

/// The data plane's peers with what the driver installed for them.
pub(crate) fn peers(view: &NodeView, dp: Option<&DataPathStatus>, keepalive: u16) -> Vec<UapiPeer> {
    dp.iter()
        .flat_map(|d| d.peers.iter())
        .filter_map(|(id, stats)| {
            let plan = view.plans.get(id)?;
            Some(UapiPeer {
                public_key: plan.public_key,
                allowed_ips: plan.allowed_ips.clone(),
                persistent_keepalive: keepalive,
                stats: *stats,
            })
        })
        .collect()
}

fn hex32(k: &[u8; 32]) -> String {
    crate::coord::token::hex(k)
}

/// The answer to `get=1`: key=value lines, `errno=0`, a blank line.
pub fn render_get(
    private_key: &[u8; 32],
    listen_port: u16,
    peers: &[UapiPeer],
    now: SystemTime,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "private_key={}", hex32(private_key));
    let _ = writeln!(out, "listen_port={listen_port}");
    for p in peers {
        let _ = writeln!(out, "public_key={}", hex32(&p.public_key));
        if let Some(e) = p.stats.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let (sec, nsec) = p
            .stats
            .last_handshake
            .and_then(|age| now.checked_sub(age))
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", p.stats.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.stats.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        let _ = writeln!(out, "protocol_version=1");
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

/// Binds the socket unless a live process serves it already (`Ok(None)`).
pub async fn bind(interface: &str) -> std::io::Result<Option<tokio::net::UnixListener>> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(interface);
    if tokio::net::UnixStream::connect(&path).await.is_ok() {
        tracing::warn!(path = %path.display(), "another process serves this WireGuard socket; `wg show` will not see this node");
        return Ok(None);
    }
    crate::fsutil::create_private_dir(Path::new(SOCKET_DIR))?;
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Some(listener))
}

/// Reads one request (lines up to a blank line); answers `get` with `answer`, refuses
/// anything else.
pub async fn serve_one(
    stream: tokio::net::UnixStream,
    answer: impl FnOnce() -> String,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Some(first) = lines.next_line().await? else {
        return Ok(());
    };
    // Skip the rest of the request, bounded.
    for _ in 0..4096 {
        match lines.next_line().await? {
            Some(l) if !l.is_empty() => continue,
            _ => break,
        }
    }
    let reply = if first == "get=1" {
        answer()
    } else {
        // EPERM: peers come from the coordinator, not from `wg set`.
        "errno=1\n\n".to_string()
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn get_answer_has_wg_keys() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let out = render_get(
            &[1; 32],
            51820,
            &[UapiPeer {
                public_key: [2; 32],
                allowed_ips: vec![
                    "100.64.0.2/32".parse().unwrap(),
                    "200::2/128".parse().unwrap(),
                ],
                persistent_keepalive: 20,
                stats: PeerStats {
                    endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                    last_handshake: Some(Duration::from_secs(10)),
                    rx_bytes: 5,
                    tx_bytes: 6,
                    path: Default::default(),
                },
            }],
            now,
        );
        assert!(out.starts_with(&format!(
            "private_key={}\nlisten_port=51820\n",
            "01".repeat(32)
        )));
        assert!(out.contains(&format!("public_key={}\n", "02".repeat(32))));
        assert!(out.contains("endpoint=192.0.2.1:51820\n"));
        assert!(out.contains("last_handshake_time_sec=999990\n"));
        assert!(out.contains("allowed_ip=200::2/128\n"));
        assert!(out.ends_with("errno=0\n\n"));
    }
}
