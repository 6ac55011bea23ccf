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
    if let Some(e) = relay
        .reflexive_endpoint
        .or_else(|| relay.endpoints.first().copied())
    {
        let _ = writeln!(out, "Endpoint = {e}");
    }
    let _ = writeln!(
        out,
        "AllowedIPs = {}, {}",
        device.organization_prefix, device.organization_prefix_v6
    );
    let _ = writeln!(out, "PersistentKeepalive = {KEEPALIVE}");
    out
}
