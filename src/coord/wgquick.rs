//! The wg-quick configuration of an unmanaged device: it peers only with the relay,
//! which carries the organization's supernets.

use std::fmt::Write;

use crate::wire::control::Device;

/// Keepalive for stock peers (they are usually behind NAT).
pub const KEEPALIVE: u16 = 25;

/// Renders the config. Without `private_key` the line is left for the user to fill.
pub fn render(device: &Device, private_key: Option<&str>, relay: &Device) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# nexodus device {} (id {}): stock WireGuard, reaches the mesh through relay {}",
        device.hostname, device.id, relay.hostname
    );
    let _ = writeln!(out, "[Interface]");
    match private_key {
        Some(k) => {
            let _ = writeln!(out, "PrivateKey = {k}");
        }
        None => {
            let _ = writeln!(
                out,
                "# PrivateKey = <the private key of {}>",
                device.public_key
            );
        }
    }
    let _ = writeln!(out, "Address = {}/32", device.tunnel_ip);
    if let Some(v6) = device.tunnel_ip_v6 {
        let _ = writeln!(out, "Address = {v6}/128");
    }
    let _ = writeln!(out, "\n[Peer]");
    let _ = writeln!(out, "PublicKey = {}", relay.public_key);
    // An IPv4 endpoint where the relay has one (the one most hosts reach), and
    // the v6 one beside it for an IPv6-only host (DESIGN §9).
    let of_family = |v6: bool| {
        let reflexive = if v6 {
            relay.reflexive_endpoint_v6.or(relay.reflexive_endpoint)
        } else {
            relay.reflexive_endpoint
        };
        reflexive
            .filter(|e| e.is_ipv6() == v6)
            .or_else(|| relay.endpoints.iter().copied().find(|e| e.is_ipv6() == v6))
    };
    match (of_family(false), of_family(true)) {
        (Some(v4), v6) => {
            let _ = writeln!(out, "Endpoint = {v4}");
            if let Some(v6) = v6 {
                let _ = writeln!(
                    out,
                    "# Endpoint = {v6}  (IPv6 underlay: use this on an IPv6-only host)"
                );
            }
        }
        (None, Some(v6)) => {
            let _ = writeln!(out, "Endpoint = {v6}");
        }
        (None, None) => {}
    }
    let _ = writeln!(
        out,
        "AllowedIPs = {}, {}",
        device.organization_prefix, device.organization_prefix_v6
    );
    let _ = writeln!(out, "PersistentKeepalive = {KEEPALIVE}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_relays_v4_endpoint_and_its_v6_one_beside_it() {
        let mut relay = crate::node::mesh::tests::device(1, true);
        relay.endpoints = vec![
            "[2001:db8::4]:51820".parse().unwrap(),
            "203.0.113.4:51820".parse().unwrap(),
        ];
        relay.reflexive_endpoint = Some("[2001:db8::4]:51820".parse().unwrap());
        let dev = crate::node::mesh::tests::device(2, true);
        let text = render(&dev, None, &relay);
        assert!(text.contains("\nEndpoint = 203.0.113.4:51820\n"), "{text}");
        assert!(text.contains("# Endpoint = [2001:db8::4]:51820"), "{text}");
        relay.endpoints.truncate(1);
        let text = render(&dev, None, &relay);
        assert!(
            text.contains("\nEndpoint = [2001:db8::4]:51820\n"),
            "{text}"
        );
    }
}
