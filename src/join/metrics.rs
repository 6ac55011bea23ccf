//! The node's Prometheus figures (DESIGN §11), rendered from the same [`Status`] that
//! `nexodus status` prints: per peer (labels `peer` = hostname and `path`) bytes
//! received and sent and the age of the last handshake; drops by reason; bytes
//! relayed; cookie replies; peers' prefixes the route guard refused.
//!
//! Each scrape builds a fresh registry from the status, so a removed peer's series
//! disappear with it and a peer that changes path shows under its new `path` label.
//! Nothing here counts anything: the data plane keeps the counters.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::status::Status;

/// The text exposition (Prometheus format 0.0.4) of `status`.
pub fn render(status: &Status) -> String {
    match gather(status) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            String::new()
        }
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn gather(status: &Status) -> prometheus::Result<String> {
    let labels = ["peer", "path"];
    let rx = counter_vec(
        "nexodus_peer_rx_bytes_total",
        "Bytes of WireGuard datagrams received from the peer (as wg show counts)",
        &labels,
    )?;
    let tx = counter_vec(
        "nexodus_peer_tx_bytes_total",
        "Bytes of WireGuard datagrams sent to the peer (as wg show counts)",
        &labels,
    )?;
    let handshake = IntGaugeVec::new(
        Opts::new(
            "nexodus_peer_last_handshake_seconds",
            "Seconds since the last completed handshake with the peer",
        ),
        &labels,
    )?;
    for p in &status.peers {
        let values = [p.hostname.as_str(), p.path.as_str()];
        rx.with_label_values(&values).inc_by(p.rx_bytes);
        tx.with_label_values(&values).inc_by(p.tx_bytes);
        if let Some(age) = p.last_handshake_secs {
            handshake
                .with_label_values(&values)
                .set(i64::try_from(age).unwrap_or(i64::MAX));
        }
    }
    let drops = counter_vec(
        "nexodus_drops_total",
        "Packets dropped by the data plane, by reason",
        &["reason"],
    )?;
    for (reason, n) in &status.drops {
        drops.with_label_values(&[reason.as_str()]).inc_by(*n);
    }
    let relayed = IntCounter::new(
        "nexodus_relayed_bytes_total",
        "Bytes this node forwarded between peers (relay mode)",
    )?;
    relayed.inc_by(status.relayed_bytes);
    let cookies = IntCounter::new(
        "nexodus_cookie_replies_total",
        "Handshake initiations answered with a cookie reply (under load)",
    )?;
    cookies.inc_by(status.cookie_replies);
    let refused = IntCounter::new(
        "nexodus_node_routes_refused_total",
        "Times a peer's prefix was refused by the route guard (it covered this host's underlay, a coordinator, reserved space or a default route)",
    )?;
    refused.inc_by(status.routes_refused_total);
    let registry = Registry::new();
    registry.register(Box::new(rx))?;
    registry.register(Box::new(tx))?;
    registry.register(Box::new(handshake))?;
    registry.register(Box::new(drops))?;
    registry.register(Box::new(relayed))?;
    registry.register(Box::new(cookies))?;
    registry.register(Box::new(refused))?;
    crate::metrics::encode(&registry)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::join::status::{DeviceStatus, PeerStatus};

    fn peer(hostname: &str, path: &str, rx: u64, handshake: Option<u64>) -> PeerStatus {
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
            rx_bytes: rx,
            tx_bytes: 7,
            advertised: Vec::new(),
        }
    }

    #[test]
    fn every_series_carries_its_peer_and_path() {
        let mut status = Status {
            device: DeviceStatus {
                id: 1,
                hostname: "a".into(),
                public_key: "k".into(),
                tunnel_ip: "100.64.0.1".parse().unwrap(),
                tunnel_ip_v6: None,
                ipv6_supported: false,
                listen_port: 51820,
            },
            coordinator_connected: true,
            relay: false,
            relayed_packets: 0,
            relayed_bytes: 12,
            tun_coalesced: 0,
            cookie_replies: 3,
            userspace: None,
            peers: vec![
                peer("beta", "direct", 100, Some(4)),
                peer("gamma", "relay", 5, None),
            ],
            routes_refused: vec!["2000::/3".parse().unwrap()],
            routes_refused_total: 2,
            exit_node: None,
            policy: None,
            drops: [("no_route".to_string(), 2)].into_iter().collect(),
            link_local_ignored: 0,
            advertised: Vec::new(),
        };
        let text = render(&status);
        for line in [
            "nexodus_peer_rx_bytes_total{path=\"direct\",peer=\"beta\"} 100",
            "nexodus_peer_tx_bytes_total{path=\"relay\",peer=\"gamma\"} 7",
            "nexodus_peer_last_handshake_seconds{path=\"direct\",peer=\"beta\"} 4",
            "nexodus_drops_total{reason=\"no_route\"} 2",
            "nexodus_relayed_bytes_total 12",
            "nexodus_cookie_replies_total 3",
            "nexodus_node_routes_refused_total 2",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("last_handshake_seconds{path=\"relay\""),
            "{text}"
        );
        // A removed peer's series go with it.
        status.peers.truncate(1);
        assert!(!render(&status).contains("gamma"));
    }
}
