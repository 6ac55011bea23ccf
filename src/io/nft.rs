//! Optional masquerade for subnet routers (`--masquerade`), with nftables.
//!
//! One table per interface, `nexodus_<interface>`, so it is easy to find and is
//! replaced whole: traffic from the organization's prefixes leaving through any other
//! interface gets the router's address, for LANs that have no route back to the mesh.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run `nft` (is nftables installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the masquerade rules: {0}")]
    Failed(String),
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

/// The nftables script that (re)creates the masquerade table.
pub fn masquerade_script(interface: &str, v4: Ipv4Net, v6: Option<Ipv6Net>) -> String {
    let t = table(interface);
    let mut s = format!(
        "table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname != \"{interface}\" ip saddr {v4} masquerade\n"
    );
    if let Some(v6) = v6 {
        s.push_str(&format!(
            "    oifname != \"{interface}\" ip6 saddr {v6} masquerade\n"
        ));
    }
    s.push_str("  }\n}\n");
    s
}

/// Installs (or replaces) the masquerade table.
pub fn install_masquerade(
    interface: &str,
    v4: Ipv4Net,
    v6: Option<Ipv6Net>,
) -> Result<(), NftError> {
    nft(&masquerade_script(interface, v4, v6))
}

/// Removes the masquerade table, if any.
pub fn remove_masquerade(interface: &str) -> Result<(), NftError> {
    let t = table(interface);
    nft(&format!("table inet {t}\ndelete table inet {t}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_prefixes_and_excludes_the_mesh_interface() {
        let s = masquerade_script(
            "nx0",
            "100.64.0.0/10".parse().unwrap(),
            Some("200::/64".parse().unwrap()),
        );
        assert!(s.contains("table inet nexodus_nx0 {"));
        assert!(s.contains("oifname != \"nx0\" ip saddr 100.64.0.0/10 masquerade"));
        assert!(s.contains("oifname != \"nx0\" ip6 saddr 200::/64 masquerade"));
        assert!(!masquerade_script("nx0", "100.64.0.0/10".parse().unwrap(), None).contains("ip6"));
    }
}
