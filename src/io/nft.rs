//! A subnet router's nftables table: forwarding from the mesh limited to the
//! advertised prefixes, and optional masquerade (`--masquerade`); and an exit
//! node's table of its own ([`exit_script`]).
//!
//! One table per interface, `nexodus_<interface>`, so it is easy to find and is
//! replaced whole: packets from the mesh are forwarded only towards the advertised
//! prefixes (the router is not an exit); with masquerade, traffic from the
//! organization's prefixes leaving towards them gets the router's address, for LANs
//! that have no route back to the mesh.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft` (is nftables installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the subnet router's rules: {0}")]
    Failed(String),
}

/// `nft` can be run here (checked before a subnet router registers).
pub fn check() -> Result<(), NftError> {
    let out = Command::new("nft")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn table(interface: &str) -> String {
    format!(
        "nexodus_{}",
        interface.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

fn nft(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The nftables script that (re)creates a subnet router's table: packets entering
/// from the mesh interface are forwarded only towards the `advertised` prefixes (and
/// as replies of connections made from elsewhere); everything else from the mesh is
/// dropped, so the router is no exit, unless it is one too (`exit_uplinks`, from
/// `--exit-node`: (is IPv6, interface)): then mesh traffic of a family its uplinks
/// carry may leave through them (the exit's own table masquerades it). With
/// `masquerade` (the organization's v4 and v6 prefixes), mesh traffic leaving
/// towards the advertised prefixes gets the router's address.
pub fn router_script(
    interface: &str,
    advertised: &[IpNet],
    masquerade: Option<(Ipv4Net, Option<Ipv6Net>)>,
    exit_uplinks: &[(bool, String)],
) -> String {
    let t = table(interface);
    let set = |v6: bool| -> Option<String> {
        let nets: Vec<String> = advertised
            .iter()
            .filter(|n| n.addr().is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        (!nets.is_empty()).then(|| format!("{{ {} }}", nets.join(", ")))
    };
    let (v4, v6) = (set(false), set(true));
    let mut s = format!(
        "table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n"
    );
    if let Some(v4) = &v4 {
        s.push_str(&format!(
            "    iifname \"{interface}\" ip daddr {v4} accept\n"
        ));
    }
    if let Some(v6) = &v6 {
        s.push_str(&format!(
            "    iifname \"{interface}\" ip6 daddr {v6} accept\n"
        ));
    }
    for (v6, proto) in [(false, "ipv4"), (true, "ipv6")] {
        let devs: Vec<String> = exit_uplinks
            .iter()
            .filter(|(f, _)| *f == v6)
            .map(|(_, d)| format!("\"{d}\""))
            .collect();
        if !devs.is_empty() {
            s.push_str(&format!(
                "    iifname \"{interface}\" meta nfproto {proto} oifname {{ {} }} accept\n",
                devs.join(", ")
            ));
        }
    }
    s.push_str(&format!(
        "    iifname \"{interface}\" ct state established,related accept\n    iifname \"{interface}\" counter drop\n  }}\n"
    ));
    if let Some((org_v4, org_v6)) = masquerade {
        s.push_str("  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
        if let Some(v4) = &v4 {
            s.push_str(&format!(
                "    oifname != \"{interface}\" ip saddr {org_v4} ip daddr {v4} masquerade\n"
            ));
        }
        if let (Some(org_v6), Some(v6)) = (org_v6, &v6) {
            s.push_str(&format!(
                "    oifname != \"{interface}\" ip6 saddr {org_v6} ip6 daddr {v6} masquerade\n"
            ));
        }
        s.push_str("  }\n");
    }
    s.push_str("}\n");
    s
}

/// Installs (or replaces) a subnet router's table (see [`router_script`]).
pub fn install_router(
    interface: &str,
    advertised: &[IpNet],
    masquerade: Option<(Ipv4Net, Option<Ipv6Net>)>,
    exit_uplinks: &[(bool, String)],
) -> Result<(), NftError> {
    nft(&router_script(
        interface,
        advertised,
        masquerade,
        exit_uplinks,
    ))
}

/// Removes the router's table, if any.
pub fn remove_router(interface: &str) -> Result<(), NftError> {
    let t = table(interface);
    nft(&format!("table inet {t}\ndelete table inet {t}\n"))
}

/// The exit node's table (`--exit-node`, DESIGN §8), `nexodus_exit_<interface>`:
/// mesh traffic from the organization's prefixes leaving through an uplink gets the
/// uplink's address; mesh traffic of a family no uplink carries is dropped here,
/// never sent anywhere else. `uplinks` are (is IPv6, interface) pairs.
pub fn exit_script(
    interface: &str,
    uplinks: &[(bool, String)],
    org_v4: Ipv4Net,
    org_v6: Option<Ipv6Net>,
) -> String {
    let t = format!("{}_exit", table(interface));
    let devs = |v6: bool| -> Option<String> {
        let d: Vec<String> = uplinks
            .iter()
            .filter(|(f, _)| *f == v6)
            .map(|(_, d)| format!("\"{d}\""))
            .collect();
        (!d.is_empty()).then(|| format!("{{ {} }}", d.join(", ")))
    };
    let mut s = format!(
        "table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n"
    );
    for (v6, proto) in [(false, "ipv4"), (true, "ipv6")] {
        if devs(v6).is_none() {
            s.push_str(&format!(
                "    iifname \"{interface}\" meta nfproto {proto} oifname != \"{interface}\" counter drop\n"
            ));
        }
    }
    s.push_str("  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
    if let Some(d) = devs(false) {
        s.push_str(&format!("    oifname {d} ip saddr {org_v4} masquerade\n"));
    }
    if let (Some(d), Some(org_v6)) = (devs(true), org_v6) {
        s.push_str(&format!("    oifname {d} ip6 saddr {org_v6} masquerade\n"));
    }
    s.push_str("  }\n}\n");
    s
}

/// Installs (or replaces) the exit node's table (see [`exit_script`]).
pub fn install_exit(
    interface: &str,
    uplinks: &[(bool, String)],
    org_v4: Ipv4Net,
    org_v6: Option<Ipv6Net>,
) -> Result<(), NftError> {
    nft(&exit_script(interface, uplinks, org_v4, org_v6))
}

/// Removes the exit node's table, if any.
pub fn remove_exit(interface: &str) -> Result<(), NftError> {
    let t = format!("{}_exit", table(interface));
    nft(&format!("table inet {t}\ndelete table inet {t}\n"))
}

/// `--use-exit-node`'s tables, `nexodus_<interface>_mark` (families `inet` and
/// `arp`), so that the kernel's reverse-path check (with `src_valid_mark`) looks
/// what comes from the underlay up as our marked packets are routed, on the
/// underlay, and a strict `rp_filter` lets it in: the mark of our UDP socket's
/// packets is saved in their connection and restored on what belongs to it
/// (answers, ICMP errors such as Fragmentation Needed); every datagram to our
/// WireGuard port (`port`) carries it, even the first of a connection a peer
/// starts (wg-quick restores the connection's mark only); and so do ARP requests,
/// whose check would otherwise find our table's default and leave the peers on
/// the LAN unable to resolve us.
pub fn mark_script(interface: &str, mark: u32, port: u16) -> String {
    let t = format!("{}_mark", table(interface));
    format!(
        "table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  chain premangle {{\n    type filter hook prerouting priority mangle; policy accept;\n    ct mark {mark:#x} meta mark set ct mark\n    udp dport {port} meta mark set {mark:#x}\n  }}\n  chain postmangle {{\n    type filter hook postrouting priority mangle; policy accept;\n    meta l4proto udp meta mark {mark:#x} ct mark set meta mark\n  }}\n}}\ntable arp {t}\ndelete table arp {t}\ntable arp {t} {{\n  chain arpin {{\n    type filter hook input priority -150; policy accept;\n    meta mark set {mark:#x}\n  }}\n}}\n"
    )
}

/// Installs (or replaces) the mark tables (see [`mark_script`]).
pub fn install_mark(interface: &str, mark: u32, port: u16) -> Result<(), NftError> {
    nft(&mark_script(interface, mark, port))
}

/// Removes the mark tables, if any.
pub fn remove_mark(interface: &str) -> Result<(), NftError> {
    let t = format!("{}_mark", table(interface));
    nft(&format!(
        "table inet {t}\ndelete table inet {t}\ntable arp {t}\ndelete table arp {t}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_peers_first_datagrams_carry_the_mark() {
        let s = mark_script("nx0", 0x6e78, 51820);
        assert!(s.contains("table inet nexodus_nx0_mark {"), "{s}");
        assert!(s.contains("ct mark 0x6e78 meta mark set ct mark"), "{s}");
        assert!(s.contains("table arp nexodus_nx0_mark {"), "{s}");
        assert!(s.contains("udp dport 51820 meta mark set 0x6e78"), "{s}");
        assert!(s.contains("meta mark 0x6e78 ct mark set meta mark"), "{s}");
    }

    #[test]
    fn exit_masquerades_out_of_its_uplinks_and_drops_a_missing_family() {
        let s = exit_script(
            "nx0",
            &[(false, "eth0".into()), (true, "eth0".into())],
            "100.64.0.0/10".parse().unwrap(),
            Some("200::/64".parse().unwrap()),
        );
        assert!(s.contains("table inet nexodus_nx0_exit {"), "{s}");
        assert!(
            s.contains("oifname { \"eth0\" } ip saddr 100.64.0.0/10 masquerade"),
            "{s}"
        );
        assert!(
            s.contains("oifname { \"eth0\" } ip6 saddr 200::/64 masquerade"),
            "{s}"
        );
        assert!(!s.contains("drop"), "{s}");
        let v4_only = exit_script(
            "nx0",
            &[(false, "eth0".into())],
            "100.64.0.0/10".parse().unwrap(),
            Some("200::/64".parse().unwrap()),
        );
        assert!(
            v4_only.contains("iifname \"nx0\" meta nfproto ipv6 oifname != \"nx0\" counter drop"),
            "{v4_only}"
        );
        assert!(!v4_only.contains("ip6 saddr"), "{v4_only}");
        assert!(!v4_only.contains("nfproto ipv4"), "{v4_only}");
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn router_forwards_from_the_mesh_only_to_its_prefixes() {
        let s = router_script(
            "nx0",
            &nets(&["198.51.100.0/24", "2001:db8:100::/64", "192.0.2.0/26"]),
            None,
            &[],
        );
        assert!(s.contains("table inet nexodus_nx0 {"));
        assert!(s.contains("type filter hook forward priority filter; policy accept;"));
        assert!(s.contains("iifname \"nx0\" ip daddr { 198.51.100.0/24, 192.0.2.0/26 } accept"));
        assert!(s.contains("iifname \"nx0\" ip6 daddr { 2001:db8:100::/64 } accept"));
        // Replies of connections made from elsewhere; then the rest is dropped.
        let established = s.find("iifname \"nx0\" ct state established,related accept");
        let drop = s.find("iifname \"nx0\" counter drop");
        assert!(
            established.is_some() && drop.is_some() && established < drop,
            "{s}"
        );
        assert!(s.find("ip daddr").unwrap() < drop.unwrap());
        // No masquerade unless asked.
        assert!(!s.contains("masquerade"), "{s}");
        // One family only: no empty set for the other.
        let v4_only = router_script("nx0", &nets(&["198.51.100.0/24"]), None, &[]);
        assert!(!v4_only.contains("ip6 daddr"), "{v4_only}");
        assert!(v4_only.contains("counter drop"));
        assert!(!v4_only.contains("{  }") && !v4_only.contains("{ }"));
        // Also an exit: the mesh may leave through its uplinks, before the drop.
        let exit = router_script(
            "nx0",
            &nets(&["192.0.2.0/24"]),
            None,
            &[(false, "eth0".into()), (true, "eth0".into())],
        );
        let up4 = exit.find("iifname \"nx0\" meta nfproto ipv4 oifname { \"eth0\" } accept");
        let up6 = exit.find("iifname \"nx0\" meta nfproto ipv6 oifname { \"eth0\" } accept");
        let drop = exit.find("counter drop");
        assert!(
            up4.is_some() && up6.is_some() && up4 < drop && up6 < drop,
            "{exit}"
        );
    }

    #[test]
    fn masquerade_only_towards_the_advertised_prefixes() {
        let s = router_script(
            "nx0",
            &nets(&["198.51.100.0/24", "2001:db8:100::/64"]),
            Some((
                "100.64.0.0/10".parse().unwrap(),
                Some("200::/64".parse().unwrap()),
            )),
            &[],
        );
        assert!(s.contains("type nat hook postrouting priority srcnat; policy accept;"));
        assert!(s.contains(
            "oifname != \"nx0\" ip saddr 100.64.0.0/10 ip daddr { 198.51.100.0/24 } masquerade"
        ));
        assert!(s.contains(
            "oifname != \"nx0\" ip6 saddr 200::/64 ip6 daddr { 2001:db8:100::/64 } masquerade"
        ));
        assert_eq!(s.matches("masquerade").count(), 2, "{s}");
        // No v6 on the mesh here: no v6 masquerade.
        let s = router_script(
            "nx0",
            &nets(&["198.51.100.0/24", "2001:db8:100::/64"]),
            Some(("100.64.0.0/10".parse().unwrap(), None)),
            &[],
        );
        assert_eq!(s.matches("masquerade").count(), 1, "{s}");
    }
}
