//! Facts about the host the node runs on, read from `/proc`.

use std::path::Path;

/// True when the host can use IPv6: `/proc/net/if_inet6` exists (the stack is there)
/// and `disable_ipv6` is 0 for `all` and, if given, for `interface`.
pub fn ipv6_supported(interface: Option<&str>) -> bool {
    ipv6_supported_at(Path::new("/proc"), interface)
}

fn disabled(proc: &Path, name: &str) -> bool {
    let path = proc
        .join("sys/net/ipv6/conf")
        .join(name)
        .join("disable_ipv6");
    match std::fs::read_to_string(&path) {
        Ok(v) => v.trim() != "0",
        // The interface does not exist yet: it will inherit `default`.
        Err(_) => name != "default" && disabled(proc, "default"),
    }
}

/// [`ipv6_supported`] against another root, for tests.
pub fn ipv6_supported_at(proc: &Path, interface: Option<&str>) -> bool {
    if !proc.join("net/if_inet6").exists() {
        return false;
    }
    if disabled(proc, "all") {
        return false;
    }
    interface.is_none_or(|i| !disabled(proc, i))
}

/// Reads a sysctl under `/proc/sys` (e.g. `net/ipv4/ip_forward`).
pub fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path))
        .ok()
        .map(|s| s.trim().to_string())
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot enable {family} forwarding ({path}: {source}); a subnet router needs it: set it on the host (in a container: sysctl {sysctl}=1 at start)"
)]
pub struct ForwardingError {
    family: &'static str,
    path: String,
    sysctl: &'static str,
    #[source]
    source: std::io::Error,
}

/// Turns on forwarding for the given families, reading `/proc` first so nothing is
/// written when it is already on (containers often mount it read-only).
pub fn enable_forwarding(v4: bool, v6: bool) -> Result<(), ForwardingError> {
    let wanted = [
        (v4, "IPv4", "net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            v6,
            "IPv6",
            "net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ];
    for (on, family, path, sysctl) in wanted {
        if !on || read_sysctl(path).as_deref() == Some("1") {
            continue;
        }
        let full = Path::new("/proc/sys").join(path);
        std::fs::write(&full, "1").map_err(|source| ForwardingError {
            family,
            path: full.display().to_string(),
            sysctl,
            source,
        })?;
        tracing::info!(family, "enabled forwarding for the advertised prefixes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(all: &str, default: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("net")).unwrap();
        std::fs::write(d.path().join("net/if_inet6"), "").unwrap();
        for (name, v) in [("all", all), ("default", default)] {
            let p = d.path().join("sys/net/ipv6/conf").join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("disable_ipv6"), v).unwrap();
        }
        d
    }

    #[test]
    fn detects_disabled_ipv6() {
        let on = fake("0\n", "0\n");
        assert!(ipv6_supported_at(on.path(), Some("nx0")));
        let off = fake("1\n", "0\n");
        assert!(!ipv6_supported_at(off.path(), None));
        let new_ifaces_off = fake("0\n", "1\n");
        assert!(!ipv6_supported_at(new_ifaces_off.path(), Some("nx0")));
        let none = tempfile::tempdir().unwrap();
        assert!(!ipv6_supported_at(none.path(), None));
    }
}
