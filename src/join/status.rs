//! `nexodus status`: a unix socket (0600) in the node's state dir answers with the
//! node's status as JSON; the CLI prints it as JSON or as a table. The status is
//! built from the driver's published view and the data path's counters ([`build`]).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::datapath::DataPathStatus;
use crate::node::agent::NodeView;
use crate::node::mesh::Path as MeshPath;

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
    /// Age of the last handshake with this peer itself: `None` while it is reached
    /// through the relay (the relay's own handshake says nothing about this peer).
    pub last_handshake_secs: Option<u64>,
    /// Bytes exchanged with this peer itself (0 through the relay: those count on the
    /// relay's row).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The prefixes this peer routes for (approved ones only: what this node installs).
    #[serde(default)]
    pub advertised: Vec<IpNet>,
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
    /// Packets written to TUN inside another's super-packet: the receive side's
    /// coalescing at work (GRO; 0 without TUN offload or in rootless mode).
    #[serde(default)]
    pub tun_coalesced: u64,
    /// Handshake initiations answered with a cookie reply instead of being processed
    /// (more than the rate limit allows per second arrived: under load or attack).
    #[serde(default)]
    pub cookie_replies: u64,
    /// Rootless mode: rules and open flows.
    #[serde(default)]
    pub userspace: Option<crate::userspace::UserspaceStatus>,
    pub peers: Vec<PeerStatus>,
    /// Peers' prefixes this node refuses to route now (they cover its underlay, a
    /// coordinator, loopback, link-local or multicast space, or are a default route).
    #[serde(default)]
    pub routes_refused: Vec<IpNet>,
    /// How many times a prefix started being refused.
    #[serde(default)]
    pub routes_refused_total: u64,
    /// The exit node chosen with `--use-exit-node` and how it stands.
    #[serde(default)]
    pub exit_node: Option<ExitStatus>,
    /// The access policy in force (`None`: no policy, everything allowed).
    #[serde(default)]
    pub policy: Option<PolicyStatus>,
    /// Packets dropped by the data plane, by reason (only non-zero ones).
    pub drops: BTreeMap<String, u64>,
    /// Link-local and multicast packets the kernel sends into the TUN of its own
    /// accord (IPv6 router solicitations, MLD, ...): dropped silently, not drops.
    #[serde(default)]
    pub link_local_ignored: u64,
    /// The prefixes this node advertises (`--advertise-cidr`); whether they are
    /// approved shows in `nexodus devices`.
    #[serde(default)]
    pub advertised: Vec<IpNet>,
}

/// The exit in use (`--use-exit-node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub hostname: String,
    pub state: crate::node::mesh::ExitState,
    /// The default routes it carries for us now (none: traffic is dropped).
    pub routes: Vec<IpNet>,
}

/// The access policy a node enforces (DESIGN §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The policy's revision as the coordinator numbered it.
    pub revision: i64,
    /// Inbound rules of this node's compiled table (0: nothing may start a flow
    /// into it).
    pub rules: usize,
    /// On a relay: the unmanaged devices (stock WireGuard) it enforces the policy for.
    #[serde(default)]
    pub relay_enforced: usize,
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

/// The status of a node from the driver's view, the data path's counters, the
/// listen port and (rootless mode) the userspace stack.
pub(crate) fn build(
    s: &NodeView,
    dp: Option<&DataPathStatus>,
    listen_port: u16,
    stack: Option<&crate::userspace::Stack>,
    advertised: Vec<IpNet>,
) -> Status {
    let stats: BTreeMap<i64, _> = dp
        .map(|d| d.peers.iter().copied().collect())
        .unwrap_or_default();
    let relay = s.relay_id.and_then(|r| stats.get(&r));
    let peers = s
        .peers
        .iter()
        .map(|&(ref d, path)| {
            let plan = s.plans.get(&d.id);
            let (st, path_name) = match path {
                MeshPath::Direct => (stats.get(&d.id), "direct"),
                MeshPath::Relay => (relay, "relay"),
                MeshPath::None => (None, "none"),
            };
            let allowed_ips = match plan {
                Some(p) if path == MeshPath::Direct => p.allowed_ips.clone(),
                _ => std::iter::once(IpNet::V4(d.tunnel_ip.into()))
                    .chain(d.tunnel_ip_v6.map(|a| IpNet::V6(a.into())))
                    .collect(),
            };
            let own_bytes = path == MeshPath::Direct;
            PeerStatus {
                id: d.id,
                hostname: d.hostname.clone(),
                public_key: d.public_key.clone(),
                tunnel_ip: d.tunnel_ip,
                tunnel_ip_v6: d.tunnel_ip_v6,
                allowed_ips,
                endpoint: st
                    .and_then(|s| s.endpoint)
                    .or(plan.and_then(|p| p.endpoint)),
                path: path_name.into(),
                last_handshake_secs: st
                    .filter(|_| own_bytes)
                    .and_then(|s| s.last_handshake)
                    .map(|d| d.as_secs()),
                rx_bytes: st.filter(|_| own_bytes).map_or(0, |s| s.rx_bytes),
                tx_bytes: st.filter(|_| own_bytes).map_or(0, |s| s.tx_bytes),
                advertised: d.advertise_cidrs.clone(),
            }
        })
        .collect();
    let mut drops = BTreeMap::new();
    if let Some(d) = dp {
        let c = &d.counters;
        for (name, v) in [
            ("no_route", c.no_route),
            ("no_endpoint", c.no_endpoint),
            ("malformed", c.malformed),
            ("bad_source", c.bad_source),
            ("unknown_peer", c.unknown_peer),
            ("decrypt", c.decrypt),
            ("replay", c.replay),
            ("bad_mac", c.bad_mac),
            ("handshake", c.handshake),
            ("policy", c.policy),
            ("flow_table_full", c.flow_table_full),
            ("io", d.io_drops),
            ("stun_unsolicited", d.stun_unsolicited),
            ("stun_queue_full", d.stun_queue_full),
        ] {
            if v > 0 {
                drops.insert(name.to_string(), v);
            }
        }
    }
    Status {
        device: DeviceStatus {
            id: s.device.id,
            hostname: s.device.hostname.clone(),
            public_key: s.device.public_key.clone(),
            tunnel_ip: s.device.tunnel_ip,
            tunnel_ip_v6: s.device.tunnel_ip_v6.filter(|_| s.device.ipv6_supported),
            ipv6_supported: s.device.ipv6_supported,
            listen_port,
        },
        coordinator_connected: s.connected,
        relay: s.relay,
        relayed_packets: dp.map_or(0, |d| d.relayed_packets),
        relayed_bytes: dp.map_or(0, |d| d.relayed_bytes),
        tun_coalesced: dp.map_or(0, |d| d.tun_coalesced),
        cookie_replies: dp.map_or(0, |d| d.counters.cookie_replies),
        userspace: stack.map(crate::userspace::Stack::status),
        peers,
        routes_refused: s.routes_refused.clone(),
        routes_refused_total: s.routes_refused_total,
        exit_node: s.exit.as_ref().map(|(hostname, state)| ExitStatus {
            hostname: hostname.clone(),
            state: *state,
            routes: s
                .plans
                .values()
                .flat_map(|p| p.allowed_ips.iter().copied())
                .filter(|n| n.prefix_len() == 0)
                .collect(),
        }),
        policy: s
            .policy
            .map(|(revision, rules, relay_enforced)| PolicyStatus {
                revision,
                rules,
                relay_enforced,
            }),
        drops,
        link_local_ignored: dp.map_or(0, |d| d.counters.link_local_ignored),
        advertised,
    }
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
    if !s.advertised.is_empty() {
        let _ = writeln!(
            out,
            "  advertises {}   (approved or pending: see `nexodus devices`)",
            join_nets(&s.advertised)
        );
    }
    let _ = writeln!(
        out,
        "\n{:<18} {:<15} {:<22} {:<7} {:<22} {:>12} {:>12}",
        "PEER", "TUNNEL IP", "TUNNEL IPV6", "PATH", "ENDPOINT", "HANDSHAKE", "RX / TX"
    );
    for p in &s.peers {
        // Through the relay this node has no session of its own with the peer: its
        // handshake and bytes are the relay's, shown on the relay's row.
        let (handshake, bytes) = if p.path == "relay" {
            ("via relay".to_string(), "-".to_string())
        } else {
            (
                ago(p.last_handshake_secs),
                format!("{} / {}", p.rx_bytes, p.tx_bytes),
            )
        };
        let _ = writeln!(
            out,
            "{:<18} {:<15} {:<22} {:<7} {:<22} {:>12} {:>12}",
            p.hostname,
            p.tunnel_ip,
            p.tunnel_ip_v6.map_or_else(|| "-".into(), |a| a.to_string()),
            p.path,
            p.endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
            handshake,
            bytes,
        );
    }
    let routed: Vec<String> = s
        .peers
        .iter()
        .filter(|p| !p.advertised.is_empty())
        .map(|p| format!("  {:<18} {}", p.hostname, join_nets(&p.advertised)))
        .collect();
    if !routed.is_empty() {
        let _ = writeln!(
            out,
            "
subnets routed through peers:\n{}",
            routed.join("\n")
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
            let bytes = format!("{} / {}", f.to_mesh_bytes, f.from_mesh_bytes);
            let (proto, from, to, rule) = (&f.proto, &f.from, &f.to, &f.rule);
            let _ = writeln!(out, "{proto:<4} {from:<46} {to:<46} {bytes:>12}  {rule}");
        }
    }
    if s.routes_refused_total > 0 {
        let list: Vec<String> = s.routes_refused.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "\nroutes refused: {} (now: {})",
            s.routes_refused_total,
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        );
    }
    if let Some(e) = &s.exit_node {
        let routes: Vec<String> = e.routes.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "\nexit node: {} {} (through it: {})",
            e.hostname,
            e.state,
            if routes.is_empty() {
                "nothing".to_string()
            } else {
                routes.join(", ")
            }
        );
    }
    match s.policy {
        Some(p) => {
            let _ = writeln!(
                out,
                "\naccess policy: revision {}, {} inbound rules for this node (dropped: {})",
                p.revision,
                p.rules,
                s.drops.get("policy").copied().unwrap_or(0)
            );
            if p.relay_enforced > 0 {
                let _ = writeln!(
                    out,
                    "  enforced by this relay for {} stock WireGuard devices",
                    p.relay_enforced
                );
            }
        }
        None => {
            let _ = writeln!(out, "\naccess policy: none (everything allowed)");
        }
    }
    if !s.drops.is_empty() {
        let _ = writeln!(out, "\ndropped: {}", render_drops(&s.drops));
    }
    out
}

fn join_nets(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `no_route: 2` → `2 with no route`: what each drop counter means, in words.
fn render_drops(drops: &BTreeMap<String, u64>) -> String {
    drops
        .iter()
        .map(|(reason, n)| {
            let what = match reason.as_str() {
                "no_route" => "to no peer (no route)",
                "no_endpoint" => "to peers with no known endpoint",
                "malformed" => "malformed",
                "bad_source" => "with a source the peer may not use",
                "unknown_peer" => "from unknown peers",
                "decrypt" => "that failed to decrypt",
                "replay" => "replayed",
                "bad_mac" => "not for our key (bad MAC)",
                "handshake" => "refused handshakes",
                "io" => "lost to socket errors",
                "stun_unsolicited" => "unsolicited STUN answers",
                "stun_queue_full" => "STUN answers (queue full)",
                other => other,
            };
            format!("{n} {what}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(hostname: &str, path: &str, handshake: Option<u64>) -> PeerStatus {
        PeerStatus {
            id: 2,
            hostname: hostname.into(),
            public_key: "k".into(),
            tunnel_ip: "100.64.0.2".parse().unwrap(),
            tunnel_ip_v6: None,
            allowed_ips: Vec::new(),
            endpoint: None,
            path: path.into(),
            last_handshake_secs: handshake,
            rx_bytes: 212,
            tx_bytes: 92,
            advertised: Vec::new(),
        }
    }

    #[test]
    fn status_reads_as_text() {
        let mut gw = peer("gw1", "relay", None);
        gw.advertised = vec!["198.51.100.0/24".parse().unwrap()];
        let s = Status {
            device: DeviceStatus {
                id: 1,
                hostname: "web1".into(),
                public_key: "k".into(),
                tunnel_ip: "100.64.0.1".parse().unwrap(),
                tunnel_ip_v6: None,
                ipv6_supported: false,
                listen_port: 51820,
            },
            coordinator_connected: true,
            relay: false,
            relayed_packets: 0,
            relayed_bytes: 0,
            tun_coalesced: 0,
            cookie_replies: 0,
            userspace: None,
            peers: vec![peer("relay", "direct", Some(4)), gw],
            exit_node: None,
            policy: None,
            routes_refused: Vec::new(),
            routes_refused_total: 0,
            drops: [("decrypt".to_string(), 1), ("no_route".to_string(), 2)]
                .into_iter()
                .collect(),
            link_local_ignored: 9,
            advertised: vec!["203.0.113.0/24".parse().unwrap()],
        };
        let text = render(&s);
        assert!(
            text.contains(
                "  advertises 203.0.113.0/24   (approved or pending: see `nexodus devices`)"
            ),
            "{text}"
        );
        let row = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no row {name}: {text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(
            row("relay ").ends_with("direct - 4s ago 212 / 92"),
            "{text}"
        );
        assert!(row("gw1 ").ends_with("relay - via relay -"), "{text}");
        assert!(
            text.contains("subnets routed through peers:\n  gw1                198.51.100.0/24\n"),
            "{text}"
        );
        assert!(
            text.contains("dropped: 1 that failed to decrypt, 2 to no peer (no route)\n"),
            "{text}"
        );
        assert!(!text.contains('{'), "{text}");
    }
}
